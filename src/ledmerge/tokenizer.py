"""The one tokenizer, chat template and set of stop tokens of a run.

Pretrained bases (Meta-Llama-3-8B, Mistral-7B-v0.1, Llama-2-13b) ship no chat template; their instruct
models do, and some stop on several EOS ids (Llama-3-Instruct: `<|eot_id|>` and `<|end_of_text|>`). So a
run takes all of these from one model, `tokenizer_source` (mergekit's name), into one directory that
every step uses: scoring renders the base's and the expert's calibration text with it (the same token ids
for both, so the election intersects scores of the same text), data-aware fitness and evaluation do too,
and every merged model gets its tokenizer files, template and generation config (hence stop tokens).

`auto` picks the base when its tokenizer has a chat template, else the aligned (instruct) expert. A
`chat_template` file replaces the source's own template.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from .errors import LedmergeError
from .fileio import atomic_path, check_not_input

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
SOURCE_FILE = "tokenizer_source.json"  # what was chosen and why; read by the model card
AUTO = "auto"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LedmergeError(f"cannot read {path} ({exc}): is it a Hugging Face model directory?") from None


def check_tokenizer_dir(tokenizer_dir: str | Path) -> None:
    """A tokenizer directory given by hand (`--tokenizer`) holds a tokenizer whose JSON files parse: checked before
    the merge, so a typo or a damaged file does not become a merged model that transformers cannot load."""
    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise LedmergeError(f"tokenizer directory {d} does not exist: give the `ledmerge tokenizer` output or a model "
                            "directory")
    if not any((d / f).is_file() for f in TOKENIZER_FILES[:1] + TOKENIZER_FILES[3:5]):
        raise LedmergeError(f"{d} holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json): give the "
                            "`ledmerge tokenizer` output or a model directory")
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if name.endswith(".json") and (d / name).is_file():
            try:
                json.loads((d / name).read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise LedmergeError(f"{d / name} is not valid JSON ({exc}): the file is corrupt or truncated; "
                                    "re-create it (ledmerge tokenizer) or re-download the model") from None


def chat_template_of(model_dir: str | Path) -> str | None:
    """The chat template a model directory ships (chat_template.jinja, chat_template.json or the
    tokenizer config's entry, in transformers' order of precedence), or None."""
    d = Path(model_dir)
    if (d / TEMPLATE_FILE).is_file():
        return (d / TEMPLATE_FILE).read_text() or None
    if (d / "chat_template.json").is_file():
        return _read_json(d / "chat_template.json").get("chat_template") or None
    if (d / "tokenizer_config.json").is_file():
        template = _read_json(d / "tokenizer_config.json").get("chat_template")
        if isinstance(template, list):  # named templates: [{name, template}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template or None
    return None


def resolve_source(source: str, base_dir: str | Path, expert_dirs: Mapping[str, str | Path],
                   alignment_task: str) -> tuple[Path, str]:
    """The model directory the tokenizer comes from, and why it was chosen (for the model card)."""
    if source == AUTO:
        if chat_template_of(base_dir):
            return Path(base_dir), "auto: the base has a chat template"
        if alignment_task not in expert_dirs:
            raise LedmergeError(f"the base {base_dir} has no chat template and alignment_task {alignment_task!r} "
                                "is not a task: set tokenizer_source to a model with a template, or chat_template")
        return Path(expert_dirs[alignment_task]), f"auto: the base has no chat template; the aligned expert " \
                                                  f"{alignment_task!r} has"
    if source == "base":
        return Path(base_dir), "tokenizer_source: base"
    if source in expert_dirs:
        return Path(expert_dirs[source]), f"tokenizer_source: {source}"
    if Path(source).is_dir():
        return Path(source), "tokenizer_source: a directory"
    raise LedmergeError(f"tokenizer_source {source!r} is neither auto, base, a task ({sorted(expert_dirs)}) nor "
                        "a directory")


def check_source(source_dir: Path, chat_template: str | Path | None) -> str:
    """The template the run will use; an error naming the fix when there is none."""
    if chat_template is not None:
        path = Path(chat_template)
        if not path.is_file():
            raise LedmergeError(f"chat_template {path} is not a file: give a Jinja template file (.jinja)")
        template = path.read_text()
        if not template.strip():
            raise LedmergeError(f"chat_template {path} is empty: give a Jinja chat template")
        return template
    template = chat_template_of(source_dir)
    if not template:
        raise LedmergeError(f"{source_dir} has no chat template, so neither would the merged models: set "
                            "tokenizer_source to an instruct model that has one, or chat_template to a .jinja file")
    return template


def _generation_config(source_dir: Path) -> dict:
    """The source's generation config; else its config.json's special-token ids (what transformers derives)."""
    if (source_dir / GENERATION_CONFIG).is_file():
        return _read_json(source_dir / GENERATION_CONFIG)
    cfg = _read_json(source_dir / "config.json") if (source_dir / "config.json").is_file() else {}
    text = cfg.get("text_config", cfg)
    return {k: text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if text.get(k) is not None}


def eos_ids(model_dir: str | Path) -> list[int]:
    """Every EOS id a model directory stops on (its generation config's, else its config's), validated."""
    ids = _generation_config(Path(model_dir)).get("eos_token_id")
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise LedmergeError(f"{model_dir}: eos_token_id must be an integer or a list of integers, got {ids!r}")
    return ids


def build_tokenizer_dir(source: str, base_dir, expert_dirs: Mapping[str, str | Path], alignment_task: str,
                        out_dir, chat_template: str | Path | None = None, trust_remote_code: bool = False,
                        force: bool = False) -> dict:
    """Write the run's tokenizer directory (atomic): the source's tokenizer files verbatim, the chat template as
    chat_template.jinja (which transformers prefers to a template inside tokenizer_config.json), the generation
    config, and tokenizer_source.json. Returns that record. With `trust_remote_code`, the source's Python files
    (a tokenizer class of the repository's own) are copied too and the directory is loaded with remote code."""
    from transformers import AutoTokenizer

    source_dir, reason = resolve_source(source, base_dir, expert_dirs, alignment_task)
    template = check_source(source_dir, chat_template)
    files = [f for f in TOKENIZER_FILES if (source_dir / f).is_file()]
    if trust_remote_code:
        files += sorted(p.name for p in source_dir.glob("*.py"))
    if "tokenizer_config.json" not in files:
        raise LedmergeError(f"{source_dir} has no tokenizer_config.json: tokenizer_source must be a model "
                            "directory with its tokenizer")
    generation = _generation_config(source_dir)
    check_not_input(out_dir, [base_dir, *expert_dirs.values(), chat_template])
    with atomic_path(out_dir, directory=True, marker=SOURCE_FILE, force=force) as out:
        for f in files:
            shutil.copy2(source_dir / f, out / f)
        if chat_template is None and (source_dir / TEMPLATE_FILE).is_file():
            shutil.copy2(source_dir / TEMPLATE_FILE, out / TEMPLATE_FILE)
        else:
            (out / TEMPLATE_FILE).write_text(template)
        (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        # the directory must load, with the template, as every step will
        tok = AutoTokenizer.from_pretrained(out, trust_remote_code=trust_remote_code)
        if tok.chat_template != template:
            raise LedmergeError(f"the tokenizer written from {source_dir} does not load with the chosen template")
        record = {
            "tokenizer_source": str(source_dir), "chosen_because": reason,
            "chat_template": str(chat_template) if chat_template is not None else f"{source_dir}'s own",
            "eos_token_ids": eos_ids(out),
            "eos_token": tok.eos_token, "pad_token": tok.pad_token,
            "sha256": {f: hashlib.sha256((out / f).read_bytes()).hexdigest()
                       for f in sorted([*files, TEMPLATE_FILE, GENERATION_CONFIG])},
        }
        (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def copy_tokenizer_files(tokenizer_dir: str | Path, out_dir: str | Path) -> dict | None:
    """The run's tokenizer, template and generation config, into a merged model directory; the record of
    where they came from (None for a plain model directory given as the tokenizer)."""
    src = Path(tokenizer_dir)
    for f in (*TOKENIZER_FILES, TEMPLATE_FILE, GENERATION_CONFIG, *(p.name for p in src.glob("*.py"))):
        if (src / f).is_file():
            shutil.copy2(src / f, Path(out_dir) / f)
    return _read_json(src / SOURCE_FILE) if (src / SOURCE_FILE).is_file() else None
