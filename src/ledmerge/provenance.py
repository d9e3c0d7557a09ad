"""Which models and calibration data a score or mask file came from, so masks of other models are refused.

A score file records the weight files of the model it scored (`weights_fingerprint`: file name -> bytes and
sha256) and the sha256 of its calibration set. The election copies the expert's and the base's records into
the elected mask (keys `expert_*`, `base_*`), Disjoint copies them into the final masks, and the merge compares
them with the models it merges: file names and sizes before any work, sha256 (which the merge computes while
reading) before its output is renamed into place (`ledmerge.merge.base.MaskFiles.check_sources`).
Files written by an older ledmerge carry no record: they are used with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .checkpoint import weight_files
from .errors import LedmergeError

MODEL_FILES = "model_files"  # score file metadata: JSON {file name: {"bytes": n, "sha256": hex}}
# What a score file records about its sources, and the election copies under an expert_/base_ prefix.
SOURCE_KEYS = ("model_dir", MODEL_FILES, "calibration", "calibration_sha256")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(model_dir: str | os.PathLike, allow_pickle: bool = False) -> dict[str, dict]:
    """{weight file, relative to the model directory: {"bytes", "sha256"}} of every weight file (each read once)."""
    model_dir = Path(model_dir)
    return {str(p.relative_to(model_dir)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in weight_files(model_dir, allow_pickle=allow_pickle)}


def sources_metadata(role: str, score_meta: dict[str, str], scores_path) -> dict[str, str]:
    """The `role_*` metadata an elected mask records from one score file's metadata."""
    out = {f"{role}_{k}": score_meta[k] for k in SOURCE_KEYS if k in score_meta}
    out[f"{role}_scores"] = str(scores_path)
    return out


def recorded_files(meta: dict[str, str], role: str, path) -> dict[str, dict] | None:
    """The weight files a mask file says its `role` model had, or None when it records none (older files)."""
    raw = meta.get(f"{role}_{MODEL_FILES}")
    if raw is None:
        return None
    try:
        files = json.loads(raw)
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"bytes", "sha256"} <= set(v)
                                                  for v in files.values()):
            raise ValueError("not {file: {bytes, sha256}}")
    except (TypeError, ValueError) as exc:
        raise LedmergeError(f"{path} has corrupt {role}_{MODEL_FILES} metadata ({exc}): rerun the election and "
                            "disjoint steps") from None
    return files
