"""Checking models against the base before a merge: same tensor names and shapes, or only the vocabulary rows
differ (then `vocab_policy` decides, and `align_rows` puts an expert's rows on the base's); a PEFT adapter must
adapt tensors the base has, in their shapes (`adapter.check_adapter`)."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LedmergeError
from .adapter import check_adapter
from .model_files import is_adapter
from .reader import ModelReader

log = logging.getLogger(__name__)

VOCAB_POLICIES = ("error", "base")
_VOCAB_NAME = re.compile(r"(embed|lm_head|wte|wpe|output|word)", re.IGNORECASE)


def _vocab_size(model_dir: Path) -> int | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def _headers(model_dir, allow_pickle: bool) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Shapes of every tensor and the names of the floating-point ones (the weights a merge combines), from one read
    of the headers."""
    with ModelReader(model_dir, allow_pickle=allow_pickle) as r:
        return r.shapes, {name for name, info in r.infos.items() if info.dtype.is_floating_point}


def check_compatible(base_dir: str | os.PathLike, others: Mapping[str, str | os.PathLike], *,
                     vocab_policy: str = "error", allow_pickle: bool = False) -> dict[str, dict[str, int]]:
    """Every model must hold the base's tensor names with the base's shapes; else one clear error.

    A vocabulary mismatch (an expert with added tokens, a padded embedding: only the rows of the
    embedding/LM-head tensors differ) is an error naming the tensors, unless `vocab_policy` is
    "base": then the merge keeps the base's vocabulary. Returns {model: {tensor: its row count}} for
    the tensors whose rows must be aligned to the base's.
    """
    if vocab_policy not in VOCAB_POLICIES:
        raise LedmergeError(f"vocab_policy must be one of {list(VOCAB_POLICIES)}, got {vocab_policy!r}")
    base, base_float = _headers(base_dir, allow_pickle)
    aligned: dict[str, dict[str, int]] = {}
    for label, other_dir in others.items():
        if is_adapter(other_dir):  # the base's tensors by construction, once its targets fit the base
            try:
                check_adapter(other_dir, base_dir, base)
            except LedmergeError as exc:
                raise LedmergeError(f"model '{label}': {exc}") from None
            continue
        other, other_float = _headers(other_dir, allow_pickle)
        missing = sorted(set(base) - set(other))
        extra = sorted(set(other) - set(base))
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has extra tensors {extra[:3]}"
            tied = any("lm_head" in n for n in missing + extra)
            raise LedmergeError(
                f"model '{label}' ({other_dir}) {what} compared with the base ({base_dir}): experts must be fine-tuned "
                "from the same base architecture" + (" (one ties its input and output embeddings and the other does "
                                                     "not: tie_word_embeddings must agree)" if tied else ""))
        kinds = base_float ^ other_float
        if kinds:
            name = sorted(kinds)[0]
            raise LedmergeError(
                f"model '{label}' ({other_dir}) stores {name} as {'integers' if name in base_float else 'floats'} "
                f"where the base stores {'floats' if name in base_float else 'integers'}"
                f"{f' ({len(kinds)} tensors so)' if len(kinds) > 1 else ''}: a quantized checkpoint is not a set of "
                "weights to merge; dequantize it (load it and save_pretrained in bfloat16 or float32) first")
        vocab = {_vocab_size(Path(base_dir)), _vocab_size(Path(other_dir))} - {None}
        rows: dict[str, int] = {}
        for name, shape in base.items():
            got = other[name]
            if got == shape:
                continue
            only_rows = len(got) == len(shape) >= 1 and got[1:] == shape[1:]
            if only_rows and (got[0] in vocab or _VOCAB_NAME.search(name)):
                rows[name] = got[0]
                continue
            raise LedmergeError(
                f"model '{label}' ({other_dir}) has {name} of shape {list(got)} but the base has {list(shape)}: "
                "experts must share the base's architecture")
        if rows and vocab_policy == "error":
            shown = ", ".join(f"{n} {[rows[n], *base[n][1:]]} vs base {list(base[n])}" for n in sorted(rows)[:2])
            raise LedmergeError(
                f"model '{label}' ({other_dir}) has a different vocabulary from the base ({shown}): set "
                "vocab_policy: base to merge into the base's vocabulary (rows of extra tokens are dropped), or "
                "merge experts that share the base's tokenizer")
        if rows:
            log.warning("model '%s': aligning %s to the base's vocabulary (vocab_policy: base)", label, sorted(rows))
            aligned[label] = rows
    return aligned


def align_rows(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """An expert's embedding-like tensor on the base's rows: extra token rows dropped, missing rows taken
    from the base (a zero task vector there)."""
    n = base.shape[0]
    if tensor.shape[0] >= n:
        return tensor[:n]
    return torch.cat([tensor, base[tensor.shape[0]:].to(tensor.dtype)])
