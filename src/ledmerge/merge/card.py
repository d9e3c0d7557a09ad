"""The merged model's card (README.md): HF front matter, the full recipe, what each post-step did, whether a
mergekit equivalent was written, where the tokenizer and chat template come from, and the sha256 of every input
file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from .. import __version__
from ..checkpoint import ADAPTER_CONFIG
from ..fileio import file_sha256
from ..tokenizer import GENERATION_CONFIG, TEMPLATE_FILE, TOKENIZER_FILES
from .base import MergeMethod
from .mergekit_io import EQUIVALENTS, MERGEKIT_VERSION
from .mergekit_io import FILE_NAME as MERGEKIT_FILE

CONFIG_FILES = ("config.json", GENERATION_CONFIG, ADAPTER_CONFIG)  # a LoRA expert's scale and targets are in its config
TOKENIZER_INPUTS = (*TOKENIZER_FILES, TEMPLATE_FILE, GENERATION_CONFIG)  # what copy_tokenizer_files copies


def config_sha256s(model_dir, names) -> dict[Path, str]:
    """sha256 of the files of `names` that `model_dir` holds."""
    return {Path(model_dir) / f: file_sha256(Path(model_dir) / f) for f in names if (Path(model_dir) / f).is_file()}


def post_step_sections(method: MergeMethod, reports: Mapping[str, Mapping[str, dict]]) -> list[str]:
    lines = []
    for step in method.post:
        body = step.card_lines(reports.get(step.name, {}))
        if body:
            lines += [f"## Post-step `{step.name}`", "", *body]
    return lines


def model_card(method: MergeMethod, base_dir, expert_dirs: Mapping, hashes: Mapping[str, Mapping[Path, str]],
               masks: Mapping | None, vocab_policy: str | None = None, tokenizer: Mapping | None = None,
               tokenizer_dir=None, reports: Mapping[str, Mapping[str, dict]] | None = None,
               mergekit: bool = False) -> str:
    """README.md: HF front matter, then the full recipe, a section per post-step with what it did per tensor
    (`reports`: post-step -> tensor -> its record, `PostStep.card_lines`), where the tokenizer and chat template
    come from, and the sha256 of every input file: weights and config.json (generation config) of each model, and
    the tokenizer, chat template and generation config files the merged model got (role "tokenizer"). `mergekit`:
    the directory holds the equivalent mergekit configuration (`mergekit_io.FILE_NAME`); if not, the card says
    why."""
    front = {"base_model": str(base_dir), "library_name": "transformers", "tags": ["merge", "ledmerge"]}
    dirs = {"base": base_dir, **{f"expert `{t}`": expert_dirs[t] for t in sorted(expert_dirs)},
            "tokenizer": tokenizer_dir or base_dir}
    lines = []
    for role, files in hashes.items():
        for path, digest in files.items():
            lines.append(f"| {role} | `{dirs[role]}` | `{path.name}` | `{digest}` |")
    for t, path in (masks or {}).items():
        lines.append(f"| mask `{t}` | `{Path(path).parent}` | `{Path(path).name}` | `{file_sha256(path)}` |")
    return "\n".join([
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# Merged model ({method.name})", "",
        f"Merged with ledmerge {__version__} using the `{method.name}` method.", "",
        "## Recipe", "", "```yaml", yaml.safe_dump(method.recipe(), sort_keys=False).strip(), "```", "",
        (f"The same merge as a mergekit {MERGEKIT_VERSION} configuration: `{MERGEKIT_FILE}` (what still differs is "
         "in its comments)." if mergekit else
         f"No mergekit configuration: mergekit has no `{method.name}` method." if method.name not in EQUIVALENTS else
         "No mergekit configuration: mergekit has no post-steps (RESTA, SafeMERGE)." if method.post else
         "No mergekit configuration: the experts' vocabularies were aligned to the base's rows by index, which "
         "mergekit has no setting for."), "",
        *([f"Experts with another vocabulary were merged into the base's (vocab_policy: {vocab_policy}).", ""]
          if vocab_policy else []),
        *post_step_sections(method, reports or {}),
        "## Tokenizer and chat template", "",
        *([f"From `{tokenizer['tokenizer_source']}` ({tokenizer['chosen_because']}); chat template: "
           f"{tokenizer['chat_template']}; generation stops on EOS ids {tokenizer['eos_token_ids']}.", ""]
          if tokenizer else [f"From the base, `{base_dir}`.", ""]),
        "## Inputs", "", "| role | model | file | sha256 |", "|---|---|---|---|", *lines, "",
    ])
