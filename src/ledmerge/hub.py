"""Downloads from the Hugging Face hub, run by the workflow's local rules on the submitting host.

Cluster compute nodes often have no network. The `fetch_model` and `fetch_dataset` rules run where
Snakemake runs (the login node), so every job afterwards reads local files only and can run with
HF_HUB_OFFLINE=1. Both write atomically: a directory or file that exists is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import LedmergeError
from .fileio import check_replaceable, replace_output, write_jsonl

# What a model directory needs: weights (safetensors only), configs, tokenizer and chat template.
MODEL_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model", "*.tiktoken", "*.txt",
               "*.jinja"]


MARKER = "ledmerge_fetch.json"  # {repo, revision}: what was downloaded, and proof to a rerun that ledmerge wrote it


def fetch_model(repo: str, out_dir, revision: str, force: bool = False) -> Path:
    """Download the safetensors checkpoint, configs and tokenizer of hub model `repo` into `out_dir`. An existing
    `out_dir` is replaced only when it is an earlier download (`MARKER`) or empty, or with `force`."""
    from huggingface_hub import snapshot_download

    out_dir = Path(out_dir)
    check_replaceable(out_dir, MARKER, force=force)
    tmp = out_dir.with_name(out_dir.name + ".partial")  # kept on failure: a rerun resumes the download
    try:
        snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES, local_dir=tmp)
    except Exception as exc:  # the hub client raises many types; all mean "cannot get this model"
        raise LedmergeError(f"cannot download {repo}@{revision} ({type(exc).__name__}: {exc}): check the name, "
                            "network access and, for gated models, `huggingface-cli login`") from None
    if not list(tmp.glob("*.safetensors")):
        raise LedmergeError(f"{repo}@{revision} has no safetensors weights: convert it or use a local directory")
    shutil.rmtree(tmp / ".cache", ignore_errors=True)  # the download bookkeeping, not part of the model
    (tmp / MARKER).write_text(json.dumps({"repo": repo, "revision": revision}) + "\n")
    replace_output(tmp, out_dir, MARKER, force=force)
    return out_dir


def load_rows(spec: dict, columns: dict[str, str | None]) -> list[dict]:
    """Rows of split `spec['split']` of datasets name `spec['name']`, renamed by `columns`
    ({output field: dataset column}; a None column is skipped), values as strings."""
    import datasets

    name = spec["name"]
    try:
        ds = datasets.load_dataset(name, spec.get("config_name"), split=spec.get("split", "train"))
    except Exception as exc:  # datasets raises many types; all mean "cannot get this dataset"
        raise LedmergeError(f"cannot load dataset {name!r} ({type(exc).__name__}: {exc}): check the name, config "
                            "and split, network access and, for gated datasets, `huggingface-cli login`") from None
    columns = {field: col for field, col in columns.items() if col}
    missing = sorted(set(columns.values()) - set(ds.column_names))
    if missing:
        raise LedmergeError(f"dataset {name!r} has no column(s) {missing} (it has {ds.column_names}): fix the "
                            "column mapping in the config")
    return [{field: str(row[col]) for field, col in columns.items()} for row in ds]


def fetch_dataset(spec: dict, out_path, columns: dict[str, str | None]) -> int:
    """Export a dataset split to JSONL (see `load_rows`). Returns the number of rows."""
    rows = load_rows(spec, columns)
    if not rows:
        raise LedmergeError(f"dataset {spec['name']!r} split {spec['split']!r} is empty")
    write_jsonl(out_path, rows)
    return len(rows)
