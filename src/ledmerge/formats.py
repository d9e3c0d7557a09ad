"""File formats of the pipeline's intermediate files: safetensors I/O, score files and mask files.

The one place that writes and reads them (models themselves are read and written by `ledmerge.checkpoint`).

Safetensors I/O: `save_tensors` (atomic), `open_tensors` (a `safe_open` handle, a corrupt file being one clear
error), `tensors_metadata`, `header_shapes`.

Score files (`save_scores`/`load_scores`, the only writer and reader): 2 bytes per weight, as a rank code
(`rank_code`, metadata `score_encoding: rank16`), or raw float32 scores (`score_encoding: float32`); the
encoding and why it keeps every TopR exact are described in `ledmerge.importance`.

Mask files (`save_masks`/`load_masks`, the only writer and reader) hold 1 bit per weight: each mask is
flattened and packed 8 entries per byte, first entry in the most significant bit (numpy.packbits order),
zero-padded, stored as a 1-d uint8 tensor under the checkpoint tensor name; the shapes are JSON in the
metadata (`mask_shapes`), with `mask_encoding: packbits`. Files of plain bool tensors (older ledmerge) are
still read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LedmergeError, corrupt_file
from .fileio import atomic_path
from .options import allowed

SCORE_ENCODINGS = tuple(allowed("importance.score_dtype"))  # the schema's list
RANK_LEVELS = 65536  # uint16 codes
RANK16_VERSION = "2"  # 2: code 0 is reserved for zero scores


# ---- safetensors files ----

def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (scores, masks), the same bytes for the same tensors and metadata."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """safetensors writes `__metadata__` in a hash order that changes from process to process; sort it so a
    rerun of the same step gives a byte-identical file (and the same sha256 in the model cards)."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        # Same keys and values in another order: the compact JSON has the same length, padding included.
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (n - len(text))
        if len(text) != n:
            raise AssertionError(f"safetensors header of {path} changed length when sorted")
        f.seek(8)
        f.write(text)


def open_tensors(path: str | os.PathLike):
    """A `safe_open` handle on a safetensors file (a context manager); a corrupt file is a LedmergeError."""
    path = Path(path)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise corrupt_file(path, str(exc)) from None


def tensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file ({} when it has none)."""
    with open_tensors(Path(path)) as f:
        return f.metadata() or {}


def existing_file(path: str | os.PathLike) -> Path:
    """`path` as a Path; an error saying which step writes it when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise LedmergeError(f"{path} does not exist: run the step that writes it first")
    return path


def header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a safetensors file, from its header alone."""
    path = existing_file(path)
    with open_tensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def as_bool_mask(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t` itself when it is a bool mask; else an error naming `what`."""
    if t.dtype != torch.bool:
        raise LedmergeError(f"{what} is {t.dtype}, not a bool mask: pass election masks, not scores")
    return t


# ---- score files ----

def rank_code(scores: torch.Tensor) -> torch.Tensor:
    """The rank16 code of one tensor's scores (uint16, same shape, on the CPU); see `ledmerge.importance`.

    Computed on the scores' own device (a GPU sorts a large tensor much faster); higher code = higher score,
    and code 0 = a score of 0 (or below), which the election never elects."""
    if not scores.is_floating_point():
        raise LedmergeError(f"scores must be floating point, got {scores.dtype}")
    flat = scores.detach().reshape(-1)
    if torch.isnan(flat).any():
        raise LedmergeError("scores contain NaN: the scoring run diverged (try dtype float32)")
    n, dev = flat.numel(), flat.device
    m = int((flat > 0).sum())  # positive scores: codes 1..L-1; the rest: 0
    # position p -> flat index, the positive scores first, highest first; ties: lowest index first. Non-negative
    # float32 values order like their bit patterns, and a stable ascending sort of int32 keys (a radix sort) is
    # ~3x faster than a descending float sort: the keys are the negated bits of the positive scores, 0 for the rest,
    # whose order does not matter (code 0).
    if flat.dtype == torch.float32:
        order = torch.argsort(torch.where(flat > 0, flat.view(torch.int32), 0).neg_(), stable=True)
    else:
        order = torch.argsort(flat, descending=True, stable=True)
    levels = RANK_LEVELS - 1
    code = torch.zeros(n, dtype=torch.int32, device=dev)
    if m <= levels:
        code[:m] = torch.arange(m, 0, -1, dtype=torch.int32, device=dev)  # m-p
    else:  # 1 + floor((m-1-p)·levels/m), bin by bin in int32: bin c holds q = m-1-p in [ceil(c·m/levels), ceil((c+1)·m/levels))
        c = torch.arange(levels + 1, dtype=torch.int64, device=dev)
        starts = (c * m + levels - 1) // levels
        code[:m] = torch.repeat_interleave(torch.arange(levels, 0, -1, dtype=torch.int32, device=dev),
                                           (starts[1:] - starts[:-1]).flip(0), output_size=m)
    out = torch.empty(n, dtype=torch.int32, device=dev)
    out[order] = code
    del order, code
    return out.cpu().to(torch.uint16).view(scores.shape)


def save_scores(path: str | os.PathLike, scores: Mapping[str, torch.Tensor], metadata: dict | None = None, *,
                encoding: str = "rank16") -> None:
    """Write importance scores (name -> float tensor), atomically: rank16 codes (2 bytes/weight) or float32.

    With encoding "rank16", uint16 tensors are taken as codes already (from `compute_scores(encoding="rank16")`).
    `metadata` values are stored as strings; `score_encoding` is set here."""
    if encoding not in SCORE_ENCODINGS:
        raise LedmergeError(f"score encoding must be one of {SCORE_ENCODINGS}, got {encoding!r}")
    out = {}
    for name, t in scores.items():
        if encoding == "rank16":
            out[name] = t.cpu() if t.dtype == torch.uint16 else rank_code(t)
        elif t.is_floating_point():
            out[name] = t.detach().float().cpu()
        else:
            raise LedmergeError(f"scores of {name} are {t.dtype}: float32 score files need floating-point scores")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["score_encoding"] = encoding
    if encoding == "rank16":
        meta["rank16_version"] = RANK16_VERSION
    save_tensors(path, out, metadata=meta)


def load_scores(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Scores of a score file as float32 tensors, higher = more important: decoded rank16 codes (order-
    preserving, exact) or the raw float scores of float32 files (also legacy files without metadata)."""
    path = existing_file(path)
    with open_tensors(path) as f:
        meta = f.metadata() or {}
        encoding = meta.get("score_encoding", "float32")
        if encoding not in SCORE_ENCODINGS:
            raise LedmergeError(f"{path} has unknown score encoding {encoding!r}: re-create it with this ledmerge")
        if encoding == "rank16" and meta.get("rank16_version") != RANK16_VERSION:
            raise LedmergeError(f"{path} was written by an older ledmerge, whose rank codes do not mark zero scores: "
                                "delete it and rerun the scoring step")
        available = set(f.keys())
        out = {}
        for name in (list(f.keys()) if names is None else list(names)):
            if name not in available:
                raise LedmergeError(f"{path} has no scores for tensor {name}: re-create it")
            t = f.get_tensor(name)
            if (t.dtype != torch.uint16) if encoding == "rank16" else not t.is_floating_point():
                raise LedmergeError(f"tensor {name} of {path} is {t.dtype}, not {encoding} scores: "
                                    "pass importance score files (the scoring step's outputs)")
            out[name] = t.float()
    return out


# ---- mask files: 1 bit per weight ----

MASK_ENCODING = "packbits"
_RESERVED_META = ("mask_encoding", "mask_shapes")


class PackedMask(NamedTuple):
    """A mask already packed by `pack_bits` (what `save_masks` stores), with its original shape."""

    bits: torch.Tensor
    shape: tuple[int, ...]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> 1-d uint8 tensor of ⌈n/8⌉ bytes, 8 entries per byte, first entry in the most significant
    bit (numpy.packbits order), zero-padded. Vectorised: 8 shift-or passes over n/8 bytes."""
    if mask.dtype != torch.bool:
        raise LedmergeError(f"a mask must be bool, got {mask.dtype}")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    rows = flat.view(torch.uint8).view(-1, 8)
    out = rows[:, 0] << 7
    for i in range(1, 8):
        out |= rows[:, i] << (7 - i)
    return out


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of `pack_bits`: a bool tensor of `shape`."""
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (n + 7) // 8:
        raise LedmergeError(f"packed mask is {bits.dtype} {list(bits.shape)}, expected uint8 [{(n + 7) // 8}] "
                            f"for shape {list(shape)}")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    unpacked = ((bits.unsqueeze(1) >> shifts) & 1).view(torch.bool).reshape(-1)
    return unpacked[:n].view(shape)


def save_masks(path: str | os.PathLike, masks: Mapping[str, torch.Tensor | PackedMask],
               metadata: dict | None = None) -> None:
    """Write masks (name -> bool tensor, or a `PackedMask`) at 1 bit per weight, atomically.
    `metadata` values are stored as strings; `mask_encoding` and `mask_shapes` are set here."""
    packed, shapes = {}, {}
    for name, m in masks.items():
        if not isinstance(m, PackedMask):
            as_bool_mask(m, f"mask {name}")
            m = PackedMask(pack_bits(m), tuple(m.shape))
        packed[name] = m.bits.cpu()
        shapes[name] = [int(d) for d in m.shape]
    meta = {str(k): str(v) for k, v in (metadata or {}).items() if k not in _RESERVED_META}
    meta["mask_encoding"] = MASK_ENCODING
    meta["mask_shapes"] = json.dumps(shapes, sort_keys=True, separators=(",", ":"))
    save_tensors(path, packed, metadata=meta)


def _mask_header(f, path) -> tuple[bool, dict[str, tuple[int, ...]]]:
    """(packed?, name -> mask shape) of an open mask file, validated against the stored tensors."""
    meta = f.metadata() or {}
    encoding = meta.get("mask_encoding")
    if encoding is None:  # older files: one bool tensor per mask
        out = {}
        for name in f.keys():
            sl = f.get_slice(name)
            if sl.get_dtype() != "BOOL":
                raise LedmergeError(f"{path} tensor {name} is {sl.get_dtype()}, not a bool mask: "
                                    "pass election masks, not scores")
            out[name] = tuple(sl.get_shape())
        return False, out
    if encoding != MASK_ENCODING:
        raise LedmergeError(f"{path} has unknown mask encoding {encoding!r}: rebuild the masks")
    try:
        shapes = json.loads(meta["mask_shapes"])
        if not isinstance(shapes, dict):
            raise ValueError("not an object")
        shapes = {k: tuple(v) for k, v in shapes.items()}
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for v in shapes.values() for d in v):
            raise ValueError("a dimension is not a non-negative integer")
    except (KeyError, TypeError, ValueError) as exc:
        raise LedmergeError(f"{path} has corrupt mask_shapes metadata ({exc}): rebuild the masks") from None
    keys = list(f.keys())
    if set(keys) != set(shapes):
        odd = sorted(set(keys) ^ set(shapes))
        raise LedmergeError(f"{path}: the mask_shapes metadata and the stored tensors disagree on {odd[:3]}: "
                            "rebuild the masks")
    for name in keys:
        sl = f.get_slice(name)
        want = (math.prod(shapes[name]) + 7) // 8
        if sl.get_dtype() != "U8" or list(sl.get_shape()) != [want]:
            raise LedmergeError(f"mask {name} in {path} is {sl.get_dtype()} {sl.get_shape()}, but shape "
                                f"{list(shapes[name])} packs into U8 [{want}]: rebuild the masks")
    return True, {name: shapes[name] for name in keys}


def mask_names_and_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every mask in a mask file, from its header alone (validated)."""
    path = existing_file(path)
    with open_tensors(path) as f:
        return _mask_header(f, path)[1]


def load_masks(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Masks of a mask file (all, or `names`) as bool tensors of their original shapes."""
    path = existing_file(path)
    with open_tensors(path) as f:
        packed, shapes = _mask_header(f, path)
        out = {}
        for name in (list(shapes) if names is None else list(names)):
            if name not in shapes:
                raise LedmergeError(f"{path} has no mask for tensor {name}: rebuild the masks for these models")
            t = f.get_tensor(name)
            out[name] = unpack_bits(t, shapes[name]) if packed else t
    return out


def mask_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a mask file, without the encoding's own keys."""
    with open_tensors(existing_file(path)) as f:
        return {k: v for k, v in (f.metadata() or {}).items() if k not in _RESERVED_META}
