"""Calibration sets: `size` prompt/response pairs per task, sampled with a seed from one source.

Sources: the toy zoo's calibration pool, or a local JSONL or a Hugging Face dataset (name or local
directory), each with a column mapping (prompt_column, response_column). Calibration data must never
come from an evaluation split: the zoo keeps them apart by construction, and for real configs the
README says which splits to use.
"""

from __future__ import annotations

import random

from .errors import LedmergeError
from .fileio import read_jsonl, write_jsonl
from .layout import ZOO


def _from_hf(spec: dict) -> list[dict]:
    from .hub import load_rows

    return load_rows(spec, {"prompt": spec.get("prompt_column", "prompt"),
                            "response": spec.get("response_column", "response")})


def build_calibration(task: str, spec: dict, size: int, seed: int, out_path, pool_path=None) -> int:
    """Write the calibration JSONL for `task`; returns the number of rows written."""
    source = spec["source"]
    if source == ZOO:
        rows = read_jsonl(pool_path, required=("prompt", "response"))
    elif source == "jsonl":  # columns prompt_column / response_column (default prompt / response)
        columns = (spec.get("prompt_column", "prompt"), spec.get("response_column", "response"))
        rows = [{"prompt": r[columns[0]], "response": r[columns[1]]}
                for r in read_jsonl(spec["path"], required=columns, text=columns)]
    elif source == "hf":  # the workflow exports the dataset on the submitting host and passes it as the pool
        rows = read_jsonl(pool_path, required=("prompt", "response")) if pool_path else _from_hf(spec)
    else:
        raise LedmergeError(f"unknown calibration source {source!r}: use zoo, jsonl or hf")
    rows = [r for r in rows if str(r["prompt"]).strip() and str(r["response"]).strip()]
    if not rows:
        raise LedmergeError(f"calibration data for task '{task}' has no row with a non-empty prompt and response")
    rng = random.Random(seed)
    picked = rng.sample(rows, size) if size <= len(rows) else rows
    write_jsonl(out_path, [{"prompt": r["prompt"], "response": r["response"], "task": task} for r in picked])
    return len(picked)
