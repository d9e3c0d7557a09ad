"""A systematic sweep of bad input, grouped by the input the user controls: the config file and its values, model
directories and weight files, tokenizer directories, JSONL data, command-line options and output paths.

Each case builds its bad input in a fresh folder and runs one `ledmerge` step in this process. It must end with
exit code 2, exactly one `ledmerge: error:` line on stderr that matches the case's `says` (`<...>` stands for a
path or a detail), no traceback, and the folder exactly as it was: no file written, changed or deleted, no
temporary left. `docs/bad-input.md` lists these cases in tables generated from CASES
(`python tests/test_bad_input_sweep.py docs/bad-input.md` rewrites them; `test_docs_list_every_case` fails when they
are stale). The property-based tests at the end (hypothesis) generate configs and damaged weight headers.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_cli_errors import ledmerge  # noqa: E402

from ledmerge.errors import LedmergeError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-input.md"
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SPEC = json.dumps({"method": "task_arithmetic", "scale": 0.5})


@dataclass(frozen=True)
class Case:
    input: str  # the group in docs/bad-input.md
    name: str
    says: str  # the one line after `ledmerge: error: `; <...> stands for any text
    make: Callable[[Path, dict], list[str]]  # (fresh folder, tiny models) -> the ledmerge arguments


# --- builders -------------------------------------------------------------------------------------------------


def config(change: Callable[[dict, Path], None] | None = None, raw: bytes | None = None):
    """check-config on the default config changed by `change` (or on the raw bytes given)."""
    def make(tmp, zoo):
        path = tmp / "config.yaml"
        if raw is not None:
            path.write_bytes(raw)
        else:
            cfg = yaml.safe_load(yaml.safe_dump(DEFAULT))
            cfg["results"] = str(tmp / "results")
            change(cfg, tmp)
            path.write_text(yaml.safe_dump(cfg))
        return ["check-config", path]
    return make


def setting(key: str, value):
    """A config whose dotted `key` is set to `value`."""
    def change(cfg, tmp):
        *parents, last = key.split(".")
        node = cfg
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return config(change)


def calibration_file(content: bytes):
    """A config whose safety calibration is a JSONL file holding `content`."""
    def change(cfg, tmp):
        (tmp / "calibration.jsonl").write_bytes(content)
        cfg["tasks"]["safety"]["calibration"] = {"source": "jsonl", "path": str(tmp / "calibration.jsonl")}
    return config(change)


def evaluation_file(key: str, content: bytes):
    def change(cfg, tmp):
        (tmp / f"{key}.jsonl").write_bytes(content)
        cfg["evaluation"] = {**cfg.get("evaluation", {}), key: str(tmp / f"{key}.jsonl")}
    return config(change)


def merge(*extra: str, spec: str = SPEC, expert: Callable[[Path, dict], Path] | None = None,
          out: Callable[[Path], Path] = lambda tmp: tmp / "merged", tokenizer=None):
    """`ledmerge merge` of the tiny base and one expert (or the expert `expert` builds)."""
    def make(tmp, zoo):
        expert_dir = expert(tmp, zoo) if expert else zoo["math"]
        args = ["merge", "--base", zoo["base"], "--expert", f"math={expert_dir}", "--spec", spec, "--out", out(tmp)]
        if tokenizer:
            args += ["--tokenizer", tokenizer(tmp, zoo)]
        return [*args, *extra]
    return make


def damaged_expert(damage: Callable[[Path], None]):
    """A copy of the math expert, then `damage` applied to its folder."""
    def build(tmp, zoo):
        d = tmp / "expert"
        shutil.copytree(zoo["math"], d)
        damage(d)
        return d
    return build


def weights(edit: Callable[[bytes], bytes]):
    def damage(d):
        f = d / "model.safetensors"
        f.write_bytes(edit(f.read_bytes()))
    return damaged_expert(damage)


def header(edit: Callable[[dict], None]):
    """Weights whose JSON header is parsed, edited and written back (the data untouched)."""
    def change(raw: bytes) -> bytes:
        n = int.from_bytes(raw[:8], "little")
        head = json.loads(raw[8:8 + n])
        edit(head)
        text = json.dumps(head).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + raw[8 + n:]
    return weights(change)


def first_tensor(head: dict) -> str:
    return next(k for k in sorted(head) if k != "__metadata__")


def without_tensor(d: Path):
    from safetensors.torch import load_file

    tensors = load_file(d / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def write(name: str, content: str | bytes):
    def damage(d):
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return damage


def tokenizer_copy(damage=None):
    def build(tmp, zoo):
        d = tmp / "tokenizer"
        d.mkdir()
        for f in Path(zoo["base"]).iterdir():
            if "token" in f.name:
                shutil.copy(f, d / f.name)
        if damage:
            damage(d)
        return d
    return build


def scores(tmp: Path, name: str) -> Path:
    from ledmerge.led.files import save_scores

    save_scores(tmp / name, {"w": torch.rand(8, 8, generator=torch.Generator().manual_seed(len(name)))})
    return tmp / name


def election(*extra: str, out: Callable[[Path], Path] = lambda tmp: tmp / "mask.safetensors"):
    def make(tmp, zoo):
        return ["election", "--expert", scores(tmp, "expert.safetensors"), "--base", scores(tmp, "base.safetensors"),
                "--out", out(tmp), *extra]
    return make


def a_file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("a user's file\n")
    return tmp / "notes.txt"


# --- the cases ------------------------------------------------------------------------------------------------

CONFIG_FILE, CONFIG_VALUES = "Config file (YAML)", "Config values"
MODELS, TOKENIZERS, JSONL = "Model directories and weight files", "Tokenizer directories", "JSONL data files"
OPTIONS, OUTPUTS = "Command-line options", "Output paths"
GOOD = (REPO / "config" / "config.yaml").read_bytes()

CASES = [
    Case(CONFIG_FILE, "not UTF-8 (Latin-1 bytes)", "config file <path> is not UTF-8 text (byte 0xe9 at offset 12): "
         "re-save it as UTF-8", config(raw="results: caf\u00e9\n".encode("latin-1"))),
    Case(CONFIG_FILE, "a key given twice (YAML keeps the last silently)", "config file <path> is not valid YAML "
         "(line <n>, column 1): key 'seed' is given twice (lines <n> and <n>); the first would be ignored: keep one",
         config(raw=GOOD + b"\nseed: 7\nseed: 8\n")),
    Case(CONFIG_FILE, "YAML syntax error", "config file <path> is not valid YAML (line 2, column 1): did not find "
         "expected ',' or ']'", config(raw=b"tasks: [unclosed\n")),
    Case(CONFIG_FILE, "a list, not a mapping", "config error at '(top level)': ['a', 'b'] is not of type 'object' "
         "(<schema description>)", config(raw=b"- a\n- b\n")),
    Case(CONFIG_FILE, "empty file", "config error at '(top level)': None is not of type 'object' (<schema "
         "description>)", config(raw=b"")),
    Case(CONFIG_FILE, "the path does not exist", "cannot read config file <path>: No such file or directory: check "
         "the path", lambda tmp, zoo: ["check-config", tmp / "nope.yaml"]),
    Case(CONFIG_FILE, "the path is a directory", "cannot read config file <path>: Is a directory: check the path",
         lambda tmp, zoo: ["check-config", tmp]),

    Case(CONFIG_VALUES, "NaN (`.nan`) where a number goes", "config error at 'tasks.math.rate': nan is not a finite "
         "number: write a number", setting("tasks.math.rate", math.nan)),
    Case(CONFIG_VALUES, "infinity (`.inf`) where a number goes", "config error at 'merges.led.lambdas.math': inf is "
         "not a finite number: write a number", setting("merges.led.lambdas", {"math": math.inf})),
    Case(CONFIG_VALUES, "a number written as a string", "config error at 'tasks.math.rate': '0.1' is not of type "
         "'number' (election rate <...>)", setting("tasks.math.rate", "0.1")),
    Case(CONFIG_VALUES, "negative seed", "config error at 'seed': -1 is less than the minimum of 0",
         setting("seed", -1)),
    Case(CONFIG_VALUES, "fractional seed", "config error at 'seed': 1.5 is not of type 'integer'",
         setting("seed", 1.5)),
    Case(CONFIG_VALUES, "zero threads", "config error at 'threads': 0 is less than the minimum of 1 (torch threads "
         "per job)", setting("threads", 0)),
    Case(CONFIG_VALUES, "no tasks", "config error at 'tasks': {} should be non-empty", setting("tasks", {})),
    Case(CONFIG_VALUES, "no merges", "config error at 'merges': {} should be non-empty (<...>)",
         setting("merges", {})),
    Case(CONFIG_VALUES, "empty base_model", "config error at 'base_model': '' is not valid under any of the given "
         "schemas (<...>)", setting("base_model", "")),
    Case(CONFIG_VALUES, "a task name that is not an identifier", "config error at 'tasks': 'bad name' does not match "
         "'^[a-z][a-z0-9_]*$'", setting("tasks.bad name", {"model": "zoo"})),
    Case(CONFIG_VALUES, "a task named base", "config error: 'base' is reserved for the base model: rename that task",
         setting("tasks.base", {"model": "zoo", "rate": 0.1, "calibration": {"source": "zoo"}})),
    Case(CONFIG_VALUES, "a zoo model for a task the toy lacks", "config error at 'tasks.bio.model': the toy zoo has "
         "experts only for [<...>]", setting("tasks.bio", {"model": "zoo", "rate": 0.1, "calibration": {"source": "zoo"}})),
    Case(CONFIG_VALUES, "zoo.start_from names no model directory", "config error at 'zoo.start_from': <path> is not a "
         "Hugging Face model directory with its tokenizer: name scratch (the toy base), smollm2, or such a directory",
         config(lambda cfg, tmp: cfg.setdefault("zoo", {}).update(start_from=str(tmp / "no_model")))),
    Case(CONFIG_VALUES, "zoo.start_from is a folder without a model", "config error at 'zoo.start_from': <path> is "
         "not a Hugging Face model directory with its tokenizer: name scratch (the toy base), smollm2, or such a "
         "directory", config(lambda cfg, tmp: cfg.setdefault("zoo", {}).update(start_from=str(tmp)))),
    Case(CONFIG_VALUES, "jsonl calibration without a path", "config error at 'tasks.safety.calibration': source "
         "jsonl needs a 'path'", setting("tasks.safety.calibration", {"source": "jsonl"})),
    Case(CONFIG_VALUES, "results is a file", "config error at 'results': <path> is a file, not a directory: choose "
         "another folder to write to", config(lambda cfg, tmp: cfg.update(results=str(a_file(tmp))))),
    Case(CONFIG_VALUES, "results lies under a file", "config error at 'results': <path> lies under <path>, which is "
         "a file, not a directory: choose another folder to write to",
         config(lambda cfg, tmp: cfg.update(results=str(a_file(tmp) / "results")))),
    Case(CONFIG_VALUES, "a misspelt key in a section", "config error at 'importance': Additional properties are not "
         "allowed ('loss_reductoin' was unexpected) (allowed keys: <...>)",
         setting("importance.loss_reductoin", "mean")),
    Case(CONFIG_VALUES, "evaluation limit below 1", "config error at 'evaluation.limit': -1 is less than the minimum "
         "of 1 (<...>)", setting("evaluation.limit", -1)),
    Case(CONFIG_VALUES, "a merge parameter of the wrong type", "config error at 'merges.ties': merge method 'ties': "
         "density must be a number in (0, 1], got '0.5': fix it in the merge spec",
         setting("merges.ties.density", "0.5")),

    Case(CONFIG_VALUES, "an lm-eval task name with a typo (was found only by the evaluation, after the merges)",
         "config error at 'evaluation.lm_eval_tasks': lm-eval has no task(s) ['gsm8kk']: fix evaluation.lm_eval_tasks "
         "(lm_eval ls tasks lists lm-eval's; ledmerge ships <...>)", setting("evaluation.lm_eval_tasks", ["gsm8kk"])),
    Case(CONFIG_VALUES, "lm-eval's own code task (it runs model-written code unsandboxed)", "config error at "
         "'evaluation.lm_eval_tasks': lm-eval task 'mbpp_plus' executes model-written code outside ledmerge's sandbox "
         "(unsafe_code in its YAML), next to your files and network: use ledmerge_humaneval or ledmerge_mbpp, whose "
         "checks run contained, or set evaluation.unsandboxed_code: true to run it anyway",
         setting("evaluation.lm_eval_tasks", ["mbpp_plus"])),

    Case(MODELS, "a model directory that is a file", "model directory <path> is a file: give the directory that "
         "holds config.json and the weights", merge(expert=lambda tmp, zoo: a_file(tmp))),
    Case(MODELS, "an empty model directory", "<path> has no model.safetensors or model.safetensors.index.json: is it "
         "a Hugging Face model directory?", merge(expert=lambda tmp, zoo: (tmp / "empty").mkdir() or tmp / "empty")),
    Case(MODELS, "an empty weight file (0 bytes)", "cannot read <path>/model.safetensors (no header): the file is "
         "corrupt or truncated; re-create or re-download it", merge(expert=weights(lambda b: b""))),
    Case(MODELS, "truncated weights", "cannot read <path>/model.safetensors (tensor <name> lies outside the file): "
         "the file is corrupt or truncated; re-create or re-download it",
         merge(expert=weights(lambda b: b[: len(b) // 2]))),
    Case(MODELS, "a header that is not JSON", "cannot read <path>/model.safetensors (bad header: <...>): the file is "
         "corrupt or truncated; re-create or re-download it",
         merge(expert=weights(lambda b: b[:8] + b"\x00" * 16 + b[24:]))),
    Case(MODELS, "a header length beyond the file", "cannot read <path>/model.safetensors (header length "
         "1099511627776 exceeds the file): the file is corrupt or truncated; re-create or re-download it",
         merge(expert=weights(lambda b: (2 ** 40).to_bytes(8, "little") + b[8:]))),
    Case(MODELS, "a header whose dtype was edited (F32 to F64)", "cannot read <path>/model.safetensors (the header "
         "gives tensor <name> dtype F64 and shape [<...>], <n> bytes, but data offsets spanning <n> bytes: its header "
         "was edited or damaged): the file is corrupt or truncated; re-create or re-download it",
         merge(expert=header(lambda h: h[first_tensor(h)].update(dtype="F64")))),
    Case(MODELS, "a header entry that is not an object", "cannot read <path>/model.safetensors (bad header entry for "
         "<name>): the file is corrupt or truncated; re-create or re-download it",
         merge(expert=header(lambda h: h.update({first_tensor(h): 5})))),
    Case(MODELS, "a header with an unknown dtype", "cannot read <path>/model.safetensors (bad header entry for "
         "<name>): the file is corrupt or truncated; re-create or re-download it",
         merge(expert=header(lambda h: h[first_tensor(h)].update(dtype="F128")))),
    Case(MODELS, "a weight index naming a missing shard", "shard <path>/missing.safetensors named by "
         "<path>/model.safetensors.index.json is missing: re-download or re-save the model",
         merge(expert=damaged_expert(write("model.safetensors.index.json",
                                           '{"weight_map": {"lm_head.weight": "missing.safetensors"}}')))),
    Case(MODELS, "a weight index that is not JSON", "<path>/model.safetensors.index.json is not a valid weight index "
         "(<...>): re-download or re-save the model",
         merge(expert=damaged_expert(write("model.safetensors.index.json", "{not json")))),
    Case(MODELS, "a weight index whose weight_map is not a mapping", "<path>/model.safetensors.index.json is not a "
         "valid weight index (<...>): re-download or re-save the model",
         merge(expert=damaged_expert(write("model.safetensors.index.json", '{"weight_map": [1, 2]}')))),
    Case(MODELS, "an expert that lacks a tensor of the base", "model 'math' (<path>) lacks "
         "['model.layers.1.mlp.up_proj.weight'] compared with the base (<path>): experts must be fine-tuned from the "
         "same base architecture",
         merge(expert=damaged_expert(without_tensor))),

    Case(TOKENIZERS, "a tokenizer directory that does not exist", "tokenizer directory <path> does not exist: give the "
         "`ledmerge tokenizer` output or a model directory", merge(tokenizer=lambda tmp, zoo: tmp / "no_tokenizer")),
    Case(TOKENIZERS, "a directory without a tokenizer", "<path> holds no tokenizer (tokenizer.json, tokenizer.model or "
         "vocab.json): give the `ledmerge tokenizer` output or a model directory",
         merge(tokenizer=lambda tmp, zoo: (tmp / "t").mkdir() or tmp / "t")),
    Case(TOKENIZERS, "a damaged tokenizer.json", "<path>/tokenizer.json is not valid JSON (<...>): the file is corrupt "
         "or truncated; re-create it (ledmerge tokenizer) or re-download the model",
         merge(tokenizer=tokenizer_copy(write("tokenizer.json", '{"version": ')))),
    Case(TOKENIZERS, "a tokenizer_config.json that is not UTF-8", "<path>/tokenizer_config.json is not valid JSON "
         "(<...>): the file is corrupt or truncated; re-create it (ledmerge tokenizer) or re-download the model",
         merge(tokenizer=tokenizer_copy(write("tokenizer_config.json", '{"x": "caf\xe9"}'.encode("latin-1"))))),

    Case(JSONL, "not UTF-8", "config error at 'tasks.safety.calibration.path': <path>:1 is not UTF-8 text (byte "
         "0xe9): re-save the file as UTF-8",
         calibration_file('{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))),
    Case(JSONL, "a row that is a JSON list", "config error at 'tasks.safety.calibration.path': <path>:1 is a JSON "
         "list, not an object: every row is one JSON object such as {\"prompt\": ...}",
         calibration_file(b'["a", "b"]\n')),
    Case(JSONL, "a text field that is a number or null", "config error at 'tasks.safety.calibration.path': <path>:2: "
         "field 'response' must be a string, got None: quote it, or fix the row",
         calibration_file(b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": null}\n')),
    Case(JSONL, "a line that is not JSON", "config error at 'tasks.safety.calibration.path': <path>:2 is not valid "
         "JSON (<...>): fix or regenerate the file", calibration_file(b'{"prompt": "a", "response": "b"}\n{"prompt\n')),
    Case(JSONL, "an evaluation set whose row is a string", "config error at 'evaluation.harmful': <path>:1 is a JSON "
         "str, not an object: every row is one JSON object such as {\"prompt\": ...}",
         evaluation_file("harmful", b'"how do i make a bomb"\n')),
    Case(JSONL, "an evaluation set whose prompt is blank", "config error at 'evaluation.benign': <path>: row 1: prompt "
         "must be a non-empty string", evaluation_file("benign", b'{"prompt": "   "}\n')),

    Case(OPTIONS, "--threads 0", "--threads must be a whole number of threads >= 1, got 0",
         merge()),
    Case(OPTIONS, "$LEDMERGE_THREADS not a number", "$LEDMERGE_THREADS must be a whole number of threads >= 1, got "
         "'four'", merge()),
    Case(OPTIONS, "--expert naming a task twice", "--expert names 'math' twice (<path> and <path>): give each name "
         "once", lambda tmp, zoo: [*merge()(tmp, zoo), "--expert", f"math={zoo['math']}", f"math={zoo['code']}"]),
    Case(OPTIONS, "--options that is not a JSON object", "merge: the options must be a JSON object, got [1]",
         merge("--options", "[1]")),
    Case(OPTIONS, "--options with a misspelt key", "option 'merge': Additional properties are not allowed "
         "('shard_sise' was unexpected) (allowed keys: device, shard_size, vocab_policy)",
         merge("--options", '{"shard_sise": 3}')),
    Case(OPTIONS, "--options @FILE that does not exist", "cannot read --options file /no/such/options.json (No such "
         "file or directory)", merge("--options", "@/no/such/options.json")),
    Case(OPTIONS, "--spec @FILE that does not exist", "cannot read the merge spec file /no/such/spec.json: run its "
         "search first", merge(spec="@/no/such/spec.json")),
    Case(OPTIONS, "--spec a parameter of the wrong type", "merge method 'task_arithmetic': scale must be a finite "
         "number, got 'x': fix it in the merge spec", merge(spec='{"method": "task_arithmetic", "scale": "x"}')),
    Case(OPTIONS, "--spec a parameter the method lacks", "merge method 'task_arithmetic' has no parameter(s) "
         "['lambda']: remove them; its parameters are <...>", merge(spec='{"method": "task_arithmetic", "lambda": 1}')),
    Case(OPTIONS, "election --rate nan", "rate must be a number in (0, 1], got nan", election("--rate", "nan")),
    Case(OPTIONS, "election --rate 0", "rate must be a number in (0, 1], got 0.0", election("--rate", "0")),

    Case(OUTPUTS, "merge --out inside a plain file", "<path> is a file, not a directory: choose another folder to "
         "write to", merge(out=lambda tmp: a_file(tmp) / "merged")),
    Case(OUTPUTS, "merge --out a plain file", "output <path> already exists and is a file (no ledmerge_merge.json in it); "
         "replacing it would delete what it holds: choose another output directory, or pass --force to replace it",
         merge(out=a_file)),
    Case(OUTPUTS, "election --out inside a plain file", "<path> is a file, not a directory: choose another folder "
         "to write to", election("--rate", "0.5", out=lambda tmp: a_file(tmp) / "mask.safetensors")),
]
ENVIRONMENT = {"$LEDMERGE_THREADS not a number": {"LEDMERGE_THREADS": "four"}}
GLOBAL_ARGS = {"--threads 0": ["--threads", "0"]}


def pattern(says: str) -> re.Pattern:
    """`says` as a regular expression over the whole line: <...> matches any text."""
    return re.compile("ledmerge: error: " + ".+?".join(map(re.escape, re.split(r"<[^>]*>", says))) + "$")


def snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns))
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.input}: {c.name}")
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, tiny_zoo, monkeypatch):
    for key, value in ENVIRONMENT.get(case.name, {}).items():
        monkeypatch.setenv(key, value)
    args = [*GLOBAL_ARGS.get(case.name, []), *case.make(tmp_path, tiny_zoo)]
    before = snapshot(tmp_path)
    proc = ledmerge(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ledmerge: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert pattern(case.says).match(lines[0]), f"\n{lines[0]}\ndoes not match\n{case.says}"
    assert snapshot(tmp_path) == before  # nothing written, changed, deleted or left half-written


RECOVERABLE = [c for c in CASES if c.input in (MODELS, TOKENIZERS)]  # a bad model or tokenizer given to merge


@pytest.mark.parametrize("case", RECOVERABLE, ids=lambda c: c.name)
def test_a_rerun_with_the_input_fixed_recovers(case, tmp_path, tiny_zoo):
    """After the refused merge, the same merge with good inputs and the same --out succeeds: nothing the refusal
    left (there is nothing) stands in the way."""
    assert ledmerge(*case.make(tmp_path, tiny_zoo)).returncode == 2
    proc = ledmerge(*merge()(tmp_path, tiny_zoo))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "merged" / "ledmerge_merge.json").is_file()


def test_unsandboxed_code_lets_lm_evals_code_task_through(tmp_path):
    from ledmerge.config import check, validate

    cfg = yaml.safe_load(yaml.safe_dump(DEFAULT))
    cfg["results"] = str(tmp_path / "results")
    cfg["evaluation"] = {"lm_eval_tasks": ["humaneval"], "unsandboxed_code": True}
    check(validate(cfg))


def test_cases_are_unique_and_many():
    assert len({(c.input, c.name) for c in CASES}) == len(CASES)
    assert len(CASES) >= 50


# --- docs/bad-input.md ------------------------------------------------------------------------------------------

BEGIN, END = "<!-- sweep: generated from tests/test_bad_input_sweep.py -->", "<!-- sweep: end -->"
TEST = "test_bad_input_sweep.py::test_bad_input_is_one_line_and_changes_nothing"


def render() -> str:
    parts = [BEGIN]
    for group in dict.fromkeys(c.input for c in CASES):
        parts += [f"\n### {group}\n", "| case | the one line says (exit 2) | left on disk | test |", "|---|---|---|---|"]
        parts += [f"| {c.name} | `{c.says.replace('|', chr(92) + '|')}` | nothing changed | `[{c.input}: {c.name}]` |"
                  for c in CASES if c.input == group]
    return "\n".join(parts) + f"\n\nEach row is `{TEST}[<group>: <case>]`.\n{END}"


def with_sweep(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    return head + render() + rest.split(END, 1)[1]


def test_docs_list_every_case():
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} lacks the generated sweep block"
    assert with_sweep(text) == text, f"{DOC} is stale: run python tests/test_bad_input_sweep.py {DOC}"


# --- property-based: generated configs and damaged headers --------------------------------------------------------

def leaves(node, path=()):
    """Every (path, value) of the default config, containers included (each is a place a bad value can go)."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from leaves(v, (*path, k))


PLACES = [p for p, _ in leaves(DEFAULT) if p]
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=8), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(PLACES), ODD_VALUES), min_size=1, max_size=3))
def test_generated_configs_pass_or_fail_in_one_line(changes, tmp_path):
    """Any value at any place of the config: `check-config` accepts it or refuses it in one line, never a traceback."""
    from ledmerge.config import check, validate

    cfg = yaml.safe_load(yaml.safe_dump(DEFAULT))
    cfg["results"] = str(tmp_path / "results")
    def holds(node, key) -> bool:  # an earlier change may have replaced a section by another type
        return (isinstance(node, dict) and key in node) or \
            (isinstance(node, list) and isinstance(key, int) and key < len(node))

    for path, value in changes:
        node = cfg
        for k in path[:-1]:
            if not holds(node, k):
                break
            node = node[k]
        else:
            if holds(node, path[-1]):
                node[path[-1]] = value
    try:
        validate(cfg)
        check(cfg)
    except LedmergeError as exc:
        assert "\n" not in str(exc) and str(exc).strip(), repr(str(exc))


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16)}, path)
    return path.read_bytes()


@settings(max_examples=300, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_weight_files_are_read_correctly_or_refused(data, small_weights, tmp_path):
    """Random byte edits of a safetensors file (header and data), truncations and extensions: the reader either
    refuses the file in one line or returns tensors whose layout lies inside the file; never another exception."""
    from ledmerge.checkpoint.reader import read_safetensors_header

    raw = bytearray(small_weights)
    n = int.from_bytes(raw[:8], "little")
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, min(len(raw) - 1, 8 + n + 8)))  # mostly the header
        raw[where] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))] + data.draw(st.binary(max_size=16))
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(raw))
    try:
        infos, _ = read_safetensors_header(path)
    except LedmergeError as exc:
        assert "\n" not in str(exc)
        return
    for info in infos.values():
        assert 8 <= info.begin <= info.end <= len(raw)
        assert info.nbytes == math.prod(info.shape) * info.dtype.itemsize


@settings(max_examples=200, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_as_jsonl_are_rows_or_one_line(content, tmp_path):
    from ledmerge.fileio import read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    try:
        rows = read_jsonl(path, required=("prompt",), text=("prompt",))
    except LedmergeError as exc:
        assert "\n" not in str(exc)
        return
    assert rows and all(isinstance(r, dict) and isinstance(r["prompt"], str) for r in rows)


if __name__ == "__main__":  # python tests/test_bad_input_sweep.py docs/bad-input.md
    target = Path(sys.argv[1])
    target.write_text(with_sweep(target.read_text()))
