"""LED's files: the score and mask file formats, their readers and writers, and where their scores came from.

The one place that writes and reads them (models themselves are read and written by `ledmerge.checkpoint`).

Safetensors I/O: `save_tensors` (atomic), `open_tensors` (a `safe_open` handle, a corrupt file being one clear
error), `tensors_metadata`.

Readers: `ScoreFile(path)` and `MaskFile(path)` open a file once, parse its header and metadata once, and serve
its tensors by name (`names`, `shapes`, `metadata`, `get(name)`, `load(names)`); context managers (`close`).
`TensorFile`, their base, does the same for any safetensors file.
Whoever asks a file more than one thing (its shapes, its metadata, then every tensor) holds one reader: the
safetensors header, which lists every tensor (a mask file's metadata also every mask's shape), is parsed per
open, so opening a file once per tensor costs time quadratic in its tensor count (bench/mask_read_bench.py).
`load_scores`, `load_masks` and `tensors_metadata` are one-shot conveniences (one reader, one question).

Score files (`save_scores`/`ScoreFile`, the only writer and reader): 2 bytes per weight, as a rank code
(`rank_code`, metadata `score_encoding: rank16`), or raw float32 scores (`score_encoding: float32`); the
encoding and why it keeps every TopR exact are described in `ledmerge.led.location`.

Mask files (`save_masks`/`MaskFile`, the only writer and reader) hold 1 bit per weight: each mask is
flattened and packed 8 entries per byte, first entry in the most significant bit (numpy.packbits order),
zero-padded, stored as a 1-d uint8 tensor under the checkpoint tensor name; the shapes are JSON in the
metadata (`mask_shapes`), with `mask_encoding: packbits`. Files of plain bool tensors (older ledmerge) are
still read.

Provenance: which models and calibration data a score or mask file came from, so masks of other models are
refused. A score file records the weight files of the model it scored (`weights_fingerprint`: file name ->
bytes and sha256) and the sha256 of its calibration set. The election copies the expert's and the base's
records into the elected mask (keys `expert_*`, `base_*`, `sources_metadata`), Disjoint copies them into the
final masks, and the merge compares them with the models it merges (`MaskFiles`, the merge's LED masks): file
names and sizes before any work, sha256 (which the merge computes while reading) before its output is renamed
into place (`MaskFiles.check_sources`). Files written by an older ledmerge carry no record: they are used with
a warning.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..checkpoint import weight_files
from ..errors import LedmergeError, corrupt_file, nan_scores
from ..fileio import atomic_path, file_sha256
from ..schema import allowed

log = logging.getLogger(__name__)

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


def existing_file(path: str | os.PathLike) -> Path:
    """`path` as a Path; an error saying which step writes it when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise LedmergeError(f"{path} does not exist: run the step that writes it first")
    return path


class TensorFile:
    """One safetensors file, opened once: its header and metadata are parsed once, its tensors read by name.

    `names` (sorted, as safetensors lists them), `metadata` ({} when it has none), `shapes` (name -> shape, from
    the header alone), `get(name)`, `load(names)`. A context manager; `close` releases the mapping. The readers
    of score and mask files (`ScoreFile`, `MaskFile`) add their formats' checks and decoding."""

    def __init__(self, path: str | os.PathLike):
        self.path = existing_file(path)
        self._f = open_tensors(self.path)
        self.metadata: dict[str, str] = self._f.metadata() or {}
        self.names: list[str] = list(self._f.keys())

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of what `get(name)` returns, in `names` order."""
        return {k: tuple(self._f.get_slice(k).get_shape()) for k in self.names}

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def get(self, name: str) -> Tensor:
        """One tensor as stored."""
        return self._f.get_tensor(name)

    def load(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """`get` of every tensor (in `names` order), or of `names`."""
        return {name: self.get(name) for name in (list(self.names) if names is None else list(names))}

    def close(self) -> None:
        self._f.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file ({} when it has none)."""
    with TensorFile(path) as f:
        return f.metadata


def as_bool_mask(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t` itself when it is a bool mask; else an error naming `what`."""
    if t.dtype != torch.bool:
        raise LedmergeError(f"{what} is {t.dtype}, not a bool mask: pass election masks, not scores")
    return t


# ---- score files ----

def rank_code(scores: torch.Tensor) -> torch.Tensor:
    """The rank16 code of one tensor's scores (uint16, same shape, on the CPU); see `ledmerge.led.location`.

    Computed on the scores' own device (a GPU sorts a large tensor much faster); higher code = higher score,
    and code 0 = a score of 0 (or below), which the election never elects."""
    if not scores.is_floating_point():
        raise LedmergeError(f"scores must be floating point, got {scores.dtype}")
    flat = scores.detach().reshape(-1)
    if torch.isnan(flat).any():
        raise nan_scores()
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


class ScoreFile(TensorFile):
    """A score file (`save_scores`), opened once: `get(name)` is the tensor's scores as float32, higher = more
    important: decoded rank16 codes (order-preserving, exact) or the raw float scores of float32 files (also
    legacy files without metadata). The encoding is checked on the first read (`encoding`)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._available = set(self.names)

    @functools.cached_property
    def encoding(self) -> str:
        """rank16 or float32; an error for an unknown encoding or an older rank16 version."""
        encoding = self.metadata.get("score_encoding", "float32")
        if encoding not in SCORE_ENCODINGS:
            raise LedmergeError(f"{self.path} has unknown score encoding {encoding!r}: re-create it with this ledmerge")
        if encoding == "rank16" and self.metadata.get("rank16_version") != RANK16_VERSION:
            raise LedmergeError(f"{self.path} was written by an older ledmerge, whose rank codes do not mark zero "
                                "scores: delete it and rerun the scoring step")
        return encoding

    def get(self, name: str) -> Tensor:
        encoding = self.encoding
        if name not in self._available:
            raise LedmergeError(f"{self.path} has no scores for tensor {name}: re-create it")
        t = self._f.get_tensor(name)
        if (t.dtype != torch.uint16) if encoding == "rank16" else not t.is_floating_point():
            raise LedmergeError(f"tensor {name} of {self.path} is {t.dtype}, not {encoding} scores: "
                                "pass importance score files (the scoring step's outputs)")
        return t.float()

    def load(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        self.encoding  # noqa: B018 - checked even when no tensor is asked for
        return super().load(names)


def load_scores(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Scores of a score file (all, or `names`) as float32 tensors (`ScoreFile.get`)."""
    with ScoreFile(path) as f:
        return f.load(names)


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


class MaskFile(TensorFile):
    """A mask file (`save_masks`), opened once; its header is validated here, once. `shapes` are the masks' own
    shapes, `get(name)` a bool tensor of that shape, `user_metadata` the metadata without the encoding's keys."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        try:
            self.packed, self.shapes = _mask_header(self._f, self.path)
        except BaseException:
            self.close()
            raise

    @property
    def user_metadata(self) -> dict[str, str]:
        """The metadata a mask file records (what `save_masks` was given), without `mask_encoding`/`mask_shapes`."""
        return {k: v for k, v in self.metadata.items() if k not in _RESERVED_META}

    def get(self, name: str) -> Tensor:
        if name not in self.shapes:
            raise LedmergeError(f"{self.path} has no mask for tensor {name}: rebuild the masks for these models")
        t = self._f.get_tensor(name)
        return unpack_bits(t, self.shapes[name]) if self.packed else t

    def load(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        return {name: self.get(name) for name in (list(self.shapes) if names is None else list(names))}


def load_masks(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Masks of a mask file (all, or `names`) as bool tensors of their original shapes."""
    with MaskFile(path) as f:
        return f.load(names)


# ---- provenance: which models and calibration data scores and masks came from ----

MODEL_FILES = "model_files"  # score file metadata: JSON {file name: {"bytes": n, "sha256": hex}}
# What a score file records about its sources, and the election copies under an expert_/base_ prefix.
SOURCE_KEYS = ("model_dir", MODEL_FILES, "calibration", "calibration_sha256")


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


# ---- the merge's LED masks ----

class MaskFiles:
    """LED masks of a merge: one mask file (`save_masks`, 1 bit per weight) per task, keyed by checkpoint
    tensor name.

    Each file is opened once (`MaskFile`) and its header checked against the models' shapes up front; tensors
    are read one at a time (`for_tensor`), so masks never all sit in memory. A context manager (`close`)."""

    def __init__(self, paths: Mapping[str, os.PathLike], shapes: Mapping[str, tuple[int, ...]]):
        self.paths = dict(paths)
        self.files: dict[str, MaskFile] = {}
        self._warned: set[tuple] = set()
        try:
            for task, path in self.paths.items():
                if not os.path.isfile(path):
                    raise LedmergeError(f"mask file {path} for task '{task}' does not exist: run the election step "
                                        "first")
                try:
                    self.files[task] = MaskFile(path)
                except LedmergeError:
                    raise
                except Exception as exc:
                    raise LedmergeError(f"cannot read mask file {path} ({exc}): re-create it") from None
                for name, shape in self.files[task].shapes.items():
                    if name not in shapes:
                        raise LedmergeError(f"mask file {path} has tensor {name}, which the models lack: "
                                            "the masks were built for another architecture; rebuild them")
                    if tuple(shape) != tuple(shapes[name]):
                        raise LedmergeError(f"mask {name} in {path} has shape {list(shape)}, expected "
                                            f"{list(shapes[name])}: rebuild the masks for these models")
        except BaseException:
            self.close()
            raise

    def check_sources(self, base, experts: Mapping[str, object], *, exact: bool = False) -> None:
        """Refuse masks computed from other models than `base` and `experts` (`ModelReader`s, by task): the weight
        files each mask records (`recorded_files`) must have the same names and sizes, and with `exact` the
        same sha256 (`ModelReader.sha256s`). Masks without a record (older ledmerge) are used with a warning."""
        for task, path in sorted(self.paths.items()):
            if task not in experts:
                continue
            meta = self.files[task].user_metadata
            for role, reader in (("expert", experts[task]), ("base", base)):
                files = recorded_files(meta, role, path)
                if files is None:
                    unused = role == "base" and meta.get("pattern", "").startswith("x")  # elected without the base
                    if not unused and (path, role) not in self._warned:
                        self._warned.add((path, role))
                        log.warning("mask file %s does not record which %s model its scores came from (an older "
                                    "ledmerge wrote it): it is used unchecked; rerun the importance, election and "
                                    "disjoint steps to have it checked", path, role)
                    continue
                _check_files(path, task, role, meta, files, reader, exact)

    def for_tensor(self, name: str) -> dict[str, Tensor | None]:
        """Task -> the mask of tensor `name` (None where that task's file has none: the tensor was not scored)."""
        return {task: (f.get(name) if name in f.shapes else None) for task, f in self.files.items()}

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_files(path, task: str, role: str, meta: Mapping[str, str], files: Mapping[str, dict], reader,
                 exact: bool) -> None:
    """One model's recorded weight files against the model being merged; one-line error on a mismatch."""
    actual = {str(p.relative_to(reader.model_dir)): p for p in reader.files()}
    which = f"'{task}' expert" if role == "expert" else "base model"
    where = f"{meta.get(f'{role}_scores', '?')} of {meta.get(f'{role}_model_dir', '?')}"
    fix = "rerun the importance, election and disjoint steps"
    if set(actual) != set(files):
        raise LedmergeError(f"{path} was computed from another {which} (scores {where}, weight files "
                            f"{sorted(files)[:3]}; {reader.model_dir} has {sorted(actual)[:3]}): {fix}")
    for name, p in sorted(actual.items()):
        size = p.stat().st_size
        if size != files[name]["bytes"]:
            raise LedmergeError(f"{path} was computed from another {which} (scores {where}: {name} of "
                                f"{files[name]['bytes']} bytes; {p} has {size}): {fix}")
    if exact:
        digests = {str(p.relative_to(reader.model_dir)): h for p, h in reader.sha256s().items()}
        for name in sorted(files):
            if digests[name] != files[name]["sha256"]:
                raise LedmergeError(f"{path} was computed from another {which} (scores {where}: {name} sha256 "
                                    f"{files[name]['sha256'][:16]}...; {actual[name]} has {digests[name][:16]}...): {fix}")
