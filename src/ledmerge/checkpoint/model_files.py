"""Which files of a model directory hold its weights: file names, shard indexes, adapters, pickle checkpoints.

No torch here: the workflow asks these questions for every job it plans (and again in every cluster job), and
importing torch for them would cost each Snakemake start seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LedmergeError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter directory (see `adapter.py`)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_HELP = ("convert them to safetensors with `AutoModelForCausalLM.from_pretrained(d).save_pretrained(d)`, "
               "or set allow_pickle: true (--allow-pickle) if you trust the files: unpickling can run code")


def is_adapter(model_dir: str | os.PathLike) -> bool:
    """Whether `model_dir` is a PEFT adapter (its adapter_config.json) rather than a full checkpoint (a directory
    holding both is read as the full checkpoint, as `ModelReader` does)."""
    d = Path(model_dir)
    return (d / ADAPTER_CONFIG).is_file() and not (d / SINGLE).is_file() and not (d / INDEX).is_file()


def index_files(index: Path) -> dict[Path, set[str]]:
    """Shard file -> tensor names, from a (safetensors or pickle) index."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        by_file: dict[Path, set[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(index.parent / fname, set()).add(name)
        return by_file
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise LedmergeError(f"{index} is not a valid weight index ({exc}): re-download or re-save the model") from None


def weight_layout(model_dir: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[Path, set[str] | None], bool]:
    """(weight file -> the tensor names its index places there, None without an index; whether they are pickle).

    Safetensors (single or sharded) first, then an adapter's weights; pickle files only with `allow_pickle`."""
    d = Path(model_dir)
    if d.is_file():
        raise LedmergeError(f"model directory {d} is a file: give the directory that holds config.json and the weights")
    if not d.is_dir():
        raise LedmergeError(f"model directory {d} does not exist: check the path in your config or build it first")
    if (d / INDEX).is_file():
        files = index_files(d / INDEX)
    elif (d / SINGLE).is_file():
        files = {d / SINGLE: None}
    elif (d / ADAPTER_CONFIG).is_file():
        if not (d / ADAPTER_WEIGHTS).is_file():
            raise LedmergeError(f"{d} is a PEFT adapter without {ADAPTER_WEIGHTS}: re-save it with peft's "
                                "save_pretrained(d, safe_serialization=True)")
        files = {d / ADAPTER_WEIGHTS: None}
    elif (d / PICKLE_INDEX).is_file() or (d / PICKLE_SINGLE).is_file() or any(d.glob("*.bin")) or any(d.glob("*.pt")):
        if not allow_pickle:
            raise LedmergeError(f"{d} holds only pickle weights (.bin/.pt), which ledmerge does not load by default: "
                                + PICKLE_HELP)
        if (d / PICKLE_INDEX).is_file():
            return dict.fromkeys(sorted(index_files(d / PICKLE_INDEX))), True
        return dict.fromkeys(sorted(d.glob("*.bin")) or sorted(d.glob("*.pt"))), True
    else:
        raise LedmergeError(f"{d} has no {SINGLE} or {INDEX}: is it a Hugging Face model directory?")
    for path in files:
        if not path.is_file():
            raise LedmergeError(f"shard {path} named by {d / INDEX} is missing: re-download or re-save the model")
    return files, False


def weight_files(model_dir: str | os.PathLike, allow_pickle: bool = False) -> list[Path]:
    """The files holding a model's weights (one, or every shard), sorted."""
    return sorted(weight_layout(model_dir, allow_pickle)[0])
