"""Election and Disjoint: importance scores -> boolean masks (see docs/methods.md).

Election:  E_t = TopR_r(I(θ_t; X_t)) ∧ TopR_r(I(θ_0; X_t))   (pattern "11")
Disjoint:  M_t = E_t ∧ ¬(∪_{j≠t} E_j)

TopR keeps exactly ⌈r·n⌉ entries of each tensor, found by a k-th value threshold (`kth_largest`, a
radix select) with ties at the threshold broken by lowest flat index. An exact count matters: thresholding
"score >= t" elects a whole tensor when most scores tie at 0 (sparse embedding gradients). In the election,
an entry whose score is 0 (no gradient reached it, or its weight is 0) is never elected: TopR there keeps
the ⌈r·n⌉ largest *positive* scores, or all of them when fewer are positive (`top_r_positive`). Otherwise
every task would fill its count with the same arbitrary band of untouched token rows at the lowest
indices. The election records which tensors were capped so (`zero_capped`), and the mask statistics show it.

Mask files hold 1 bit per weight (`save_masks`/`load_masks`, the only writer and reader): each mask is
flattened and packed 8 entries per byte, first entry in the most significant bit (numpy.packbits order),
zero-padded, stored as a 1-d uint8 tensor under the checkpoint tensor name; the shapes are JSON in the
metadata (`mask_shapes`), with `mask_encoding: packbits`. Files of plain bool tensors (older ledmerge) are
still read. Score files are read with `importance.load_scores` (rank16 codes or float32).

Provenance: an elected mask records where its scores came from (the `expert_*` and `base_*` metadata of
`ledmerge.provenance`: model directory, weight files with sizes and sha256, calibration set and its sha256);
Disjoint copies them into the final masks and refuses elections on scores of different base models.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import torch

from .checkpoint import _open, save_tensors, tensors_metadata
from .errors import LedmergeError
from .fileio import write_text
from .options import allowed
from .importance import load_scores
from .provenance import recorded_files, sources_metadata

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def top_k_count(n: int, rate: float) -> int:
    """⌈rate·n⌉ computed on the decimal value of `rate`, so 0.07·100 is 7, not ceil(7.000000000000001) = 8."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0 < rate <= 1):
        raise LedmergeError(f"rate must be a number in (0, 1], got {rate!r}")
    return math.ceil(Fraction(repr(float(rate))) * n)


def top_r_mask(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """Bool mask of the ⌈rate·n⌉ largest entries; ties at the cut-off go to the lowest flat indices."""
    n = scores.numel()
    k = top_k_count(n, rate)
    if not scores.is_floating_point():
        raise LedmergeError(f"scores must be floating point, got {scores.dtype}")
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    threshold, n_above, tied = kth_largest(flat, k)
    mask = flat > threshold
    mask[tied[: k - n_above]] = True  # `tied` is sorted: the lowest flat indices win
    return mask.view(scores.shape)


def top_r_positive(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """TopR among the entries with a positive score: the ⌈rate·n⌉ largest, or every positive entry when fewer
    are positive. A score of 0 says nothing about importance, so it is never elected."""
    positive = scores > 0
    if int(positive.sum()) <= top_k_count(scores.numel(), rate):
        return positive
    return top_r_mask(scores, rate)  # the k largest are all positive


def kth_largest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The k-th largest entry of a flat float tensor, how many entries are strictly larger, and the
    sorted flat indices of the entries equal to it.

    A radix select on the float32 bit patterns, which order like the values when no entry is negative:
    one histogram of the top 16 bits finds the bucket holding the k-th largest, and only that bucket is
    searched. About 4x faster than `torch.kthvalue` on 10^8 entries, which matters for TIES trims and
    elections of 8B-parameter models. Negative entries fall back to `kthvalue`.
    """
    v = values if values.dtype == torch.float32 else values.float()
    # The top 16 bits of each float32, as int16 (no copy on little-endian machines).
    high = v.view(torch.int16)[1::2] if sys.byteorder == "little" else (v.view(torch.int32) >> 16)
    try:
        hist = _histogram(high)
    except RuntimeError:  # a negative entry (or -0.0): its top bits read as a negative number
        threshold = torch.kthvalue(v, v.numel() - k + 1).values
        return threshold, int((v > threshold).sum()), (v == threshold).nonzero().flatten()
    if int(hist[0x7F80:].sum()) and bool(torch.isnan(v).any()):
        raise LedmergeError("scores contain NaN: the scoring run diverged (try dtype float32)")
    at_or_above = hist.flip(0).cumsum(0).flip(0)  # [i]: entries whose top bits are >= i
    bucket = int((at_or_above >= k).nonzero()[-1])
    above = int(at_or_above[bucket + 1]) if bucket + 1 < hist.numel() else 0
    where = (high == bucket).nonzero().flatten()
    candidates = v[where]
    threshold = torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values
    return threshold, above + int((candidates > threshold).sum()), where[candidates == threshold]


@functools.lru_cache(maxsize=None)
def _histogram_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, "histogram")


def _histogram(high: torch.Tensor) -> torch.Tensor:
    """bincount of the top bits, over torch's threads (bincount itself runs on one)."""
    threads = torch.get_num_threads()
    if threads == 1 or high.numel() < 1 << 22:
        return torch.bincount(high, minlength=1 << 15)
    parts = high.tensor_split(threads)
    return sum(_histogram_pool(threads).map(lambda p: torch.bincount(p, minlength=1 << 15), parts))


def _check_pattern(pattern: str) -> str:
    """One of the schema's election patterns (election.pattern: the one list of allowed values)."""
    patterns = allowed("election.pattern")
    if pattern not in patterns:
        raise LedmergeError(f"election pattern must be two characters from '0', '1', 'x' (base, expert), one of "
                            f"{patterns} ('xx' would elect every weight), got {pattern!r}")
    return pattern


def _check_same(a: dict, b: dict, what_a: str, what_b: str) -> None:
    """Same tensor names and shapes, else an error naming the first offending tensor."""
    for name in sorted(set(a) ^ set(b)):
        where = what_a if name in a else what_b
        raise LedmergeError(f"tensor {name} is only in {where}: {what_a} and {what_b} must score the same tensors "
                            "(same model architecture and scoring options)")
    for name in a:
        if tuple(a[name].shape) != tuple(b[name].shape):
            raise LedmergeError(f"tensor {name} has shape {list(a[name].shape)} in {what_a} but "
                                f"{list(b[name].shape)} in {what_b}")


def elect_tensor(expert: torch.Tensor | None, base: torch.Tensor | None, rate: float, pattern: str) -> torch.Tensor:
    """One tensor's election. pattern[0] is the base, pattern[1] the expert: '1' = must be in that model's
    top-r (of its positive scores), '0' = must not be, 'x' = that model is ignored (its scores may be None)."""
    _check_pattern(pattern)
    mask = None
    for char, scores in zip(pattern, (base, expert)):
        if char == "x":
            continue
        top = top_r_positive(scores.float(), rate)
        cond = top if char == "1" else ~top
        mask = cond if mask is None else mask & cond
    return mask


def elect(expert_scores: dict, base_scores: dict | None, rate: float, pattern: str) -> dict[str, torch.Tensor]:
    """Election E_t for every tensor: name -> bool mask.

    `pattern` is two characters, the first for the base model θ_0 and the second for the expert θ_t:
    '1' = the weight must be in that model's top-r (by its scores on X_t), '0' = it must NOT be,
    'x' = that model is ignored. So "11" is LED (important to both), "x1" expert-only top-r,
    "01" important to the expert but not the base, "10" important to the base but not the expert.
    "xx" is refused. `base_scores` may be None when the pattern starts with 'x'.
    """
    _check_pattern(pattern)
    top_k_count(1, rate)  # validate the rate even for empty inputs
    if pattern[0] == "x":
        base_scores = None
    elif base_scores is None:
        raise LedmergeError(f"election pattern {pattern!r} uses the base model's scores but none were given")
    if base_scores is not None:
        _check_same(expert_scores, base_scores, "the expert scores", "the base scores")
    out = {}
    for name, scores in expert_scores.items():
        base = base_scores[name] if base_scores is not None else None
        try:
            out[name] = elect_tensor(scores, base, rate, pattern)
        except LedmergeError as exc:
            raise LedmergeError(f"{name}: {exc}") from None
    return out


def disjoint(elected: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """M_t = E_t ∧ ¬(∪_{j≠t} E_j): weights elected by two or more tasks are dropped from all of them.

    Computed from 'elected by >= 1' and 'elected by >= 2' masks, so the result cannot depend on task order.
    """
    if not elected:
        raise LedmergeError("disjoint needs at least one task")
    tasks = list(elected)
    first = elected[tasks[0]]
    for t in tasks[1:]:
        _check_same(first, elected[t], f"task '{tasks[0]}'", f"task '{t}'")
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    for name in first:
        once = torch.zeros(first[name].shape, dtype=torch.bool, device=first[name].device)
        twice = torch.zeros_like(once)
        for t in tasks:
            e = _as_bool(elected[t][name], f"task '{t}' tensor {name}")
            twice |= once & e
            once |= e
        for t in tasks:
            out[t][name] = elected[t][name] & ~twice
    return out


def _as_bool(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.bool:
        raise LedmergeError(f"{what} is {t.dtype}, not a bool mask: pass election masks, not scores")
    return t


def layer_and_module(name: str) -> tuple[int, str]:
    """`model.layers.3.self_attn.q_proj.weight` -> (3, 'q_proj'); no layer index -> -1."""
    m = _LAYER.search(name)
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
    return (int(m.group(1)) if m else -1), module


def mask_stats(elected: dict[str, dict[str, torch.Tensor]], final: dict[str, dict[str, torch.Tensor]]):
    """Rows for the CSV reports.

    per-tensor rows: task, tensor, layer, module, numel, elected, kept, elected_fraction, kept_fraction.
    overlap rows (each unordered pair of tasks, in the order given): task_a, task_b, tensor, layer, module,
    numel, overlap (elected by both), overlap_fraction (overlap / numel), jaccard (overlap / union; 0 when
    neither elects anything).
    """
    rows, overlap_rows = [], []
    for task, masks in elected.items():
        for name, e in masks.items():
            layer, module = layer_and_module(name)
            n = e.numel()
            n_e, n_k = int(e.sum()), int(final[task][name].sum())
            rows.append({"task": task, "tensor": name, "layer": layer, "module": module, "numel": n,
                         "elected": n_e, "kept": n_k, "elected_fraction": n_e / n if n else 0.0,
                         "kept_fraction": n_k / n if n else 0.0})
    for a, b in itertools.combinations(list(elected), 2):
        for name, ea in elected[a].items():
            eb = elected[b][name]
            layer, module = layer_and_module(name)
            n = ea.numel()
            both, union = int((ea & eb).sum()), int((ea | eb).sum())
            overlap_rows.append({"task_a": a, "task_b": b, "tensor": name, "layer": layer, "module": module,
                                 "numel": n, "overlap": both, "overlap_fraction": both / n if n else 0.0,
                                 "jaccard": both / union if union else 0.0})
    return rows, overlap_rows


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
            _as_bool(m, f"mask {name}")
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


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise LedmergeError(f"{path} does not exist: run the step that writes it first")
    return path


def mask_names_and_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every mask in a mask file, from its header alone (validated)."""
    path = _existing(path)
    with _open(path) as f:
        return _mask_header(f, path)[1]


def load_masks(path: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Masks of a mask file (all, or `names`) as bool tensors of their original shapes."""
    path = _existing(path)
    with _open(path) as f:
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
    with _open(_existing(path)) as f:
        return {k: v for k, v in (f.metadata() or {}).items() if k not in _RESERVED_META}


# ---- file level: what the workflow calls ----

def _file_shapes(path) -> dict[str, tuple[int, ...]]:
    path = _existing(path)
    with _open(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


class _Shape:  # lets _check_same compare headers without loading tensors
    def __init__(self, shape):
        self.shape = shape


def elect_files(expert_scores_path, base_scores_path, rate: float, pattern: str, out_path) -> dict:
    """Election from two score files (rank16 or float32) to one mask file, tensor by tensor to bound memory.

    Returns counts: {'numel', 'elected'}."""
    _check_pattern(pattern)
    top_k_count(1, rate)
    use_base = pattern[0] != "x"
    if use_base and base_scores_path is None:
        raise LedmergeError(f"election pattern {pattern!r} needs the base model's scores")
    expert_shapes = _file_shapes(expert_scores_path)
    if use_base:
        base_shapes = _file_shapes(base_scores_path)
        _check_same({k: _Shape(v) for k, v in expert_shapes.items()}, {k: _Shape(v) for k, v in base_shapes.items()},
                    str(expert_scores_path), str(base_scores_path))
        _check_same_tokens(expert_scores_path, base_scores_path)
    sources = sources_metadata("expert", tensors_metadata(expert_scores_path), expert_scores_path)
    if use_base:
        sources.update(sources_metadata("base", tensors_metadata(base_scores_path), base_scores_path))
    masks, numel, kept, capped = {}, 0, 0, []
    for name in sorted(expert_shapes):
        expert = load_scores(expert_scores_path, [name])[name]
        base = load_scores(base_scores_path, [name])[name] if use_base else None
        try:
            mask = elect_tensor(expert, base, rate, pattern)
        except LedmergeError as exc:
            raise LedmergeError(f"{name} in {expert_scores_path}: {exc}") from None
        k = top_k_count(mask.numel(), rate)
        if any(s is not None and int((s > 0).sum()) < k for c, s in zip(pattern, (base, expert)) if c != "x"):
            capped.append(name)
        numel += mask.numel()
        kept += int(mask.sum())
        masks[name] = PackedMask(pack_bits(mask), tuple(mask.shape))
        del mask, expert, base
    save_masks(out_path, masks, metadata={
        "kind": "election", "rate": repr(float(rate)), "pattern": pattern,
        "expert_scores": str(expert_scores_path), "base_scores": str(base_scores_path) if use_base else "",
        "zero_capped": json.dumps(capped), **sources,
    })
    return {"numel": numel, "elected": kept, "zero_capped": capped}


def _check_same_tokens(expert_scores_path, base_scores_path) -> None:
    """Base and expert of a task must be scored on the same token ids, or the intersection compares scores of
    different texts (a base without a chat template scored on plain text, the expert on its chat format)."""
    fingerprints = [tensors_metadata(p).get("tokens_sha256") for p in (expert_scores_path, base_scores_path)]
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        raise LedmergeError(f"{expert_scores_path} and {base_scores_path} were scored on different token ids "
                            "(another tokenizer, chat template, calibration set or max_length): rescore both with "
                            "the same tokenizer directory (ledmerge score --tokenizer)")


def _check_same_base(elected_paths: dict) -> None:
    """Every task's election must intersect with scores of the same base model (when the files say which)."""
    seen = {}
    for task, path in elected_paths.items():
        meta = mask_metadata(path)
        files = recorded_files(meta, "base", path)
        if files is not None:
            seen[task] = ({n: f["sha256"] for n, f in files.items()}, meta.get("base_scores", "?"))
    first, (want, first_scores) = next(iter(seen.items()), (None, (None, None)))
    for task, (files, scores) in seen.items():
        if files != want:
            raise LedmergeError(f"the elections of tasks '{first}' and '{task}' used scores of different base models "
                                f"({first_scores} and {scores}): rerun the importance and election steps")


def _write_csv(path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


STATS_COLUMNS = ["task", "tensor", "layer", "module", "numel", "elected", "kept", "elected_fraction", "kept_fraction",
                 "zero_capped"]
OVERLAP_COLUMNS = ["task_a", "task_b", "tensor", "layer", "module", "numel", "overlap", "overlap_fraction", "jaccard"]


def disjoint_files(elected_paths: dict, out_paths: dict, stats_csv, overlap_csv) -> None:
    """Disjoint over every task's election file; writes one mask file per task and the two CSVs.

    Tensor by tensor: only one tensor's masks (all tasks) are ever unpacked at once."""
    if set(elected_paths) != set(out_paths):
        raise LedmergeError(f"tasks of the election files {sorted(elected_paths)} and of the outputs "
                            f"{sorted(out_paths)} differ")
    if not elected_paths:
        raise LedmergeError("disjoint needs at least one task")
    tasks = list(elected_paths)
    headers = {t: mask_names_and_shapes(elected_paths[t]) for t in tasks}
    for t in tasks[1:]:
        _check_same({k: _Shape(v) for k, v in headers[tasks[0]].items()}, {k: _Shape(v) for k, v in headers[t].items()},
                    f"task '{tasks[0]}'", f"task '{t}'")
    # Tensors where a model had fewer positive scores than ⌈r·n⌉: the election kept fewer entries.
    zero_capped = {t: set(json.loads(mask_metadata(elected_paths[t]).get("zero_capped", "[]"))) for t in tasks}
    _check_same_base(elected_paths)
    final: dict[str, dict[str, PackedMask]] = {t: {} for t in tasks}
    rows: dict[str, list] = {t: [] for t in tasks}
    overlap_rows: dict[tuple, list] = {pair: [] for pair in itertools.combinations(tasks, 2)}
    for name in headers[tasks[0]]:
        elected = {t: {name: load_masks(elected_paths[t], [name])[name]} for t in tasks}
        kept = disjoint(elected)
        tensor_rows, tensor_overlap = mask_stats(elected, kept)
        for row in tensor_rows:
            row["zero_capped"] = name in zero_capped[row["task"]]
            rows[row["task"]].append(row)
        for row in tensor_overlap:
            overlap_rows[(row["task_a"], row["task_b"])].append(row)
        for t in tasks:
            final[t][name] = PackedMask(pack_bits(kept[t][name]), tuple(kept[t][name].shape))
        del elected, kept
    for task in tasks:
        meta = mask_metadata(elected_paths[task])
        save_masks(out_paths[task], final[task], metadata={
            "kind": "disjoint", "task": task, "tasks": ",".join(tasks), "rate": meta.get("rate", ""),
            "pattern": meta.get("pattern", ""), "elected": str(elected_paths[task]),
            **{k: v for k, v in meta.items() if k.startswith(("expert_", "base_"))},  # where the scores came from
        })
    _write_csv(stats_csv, [r for t in tasks for r in rows[t]], STATS_COLUMNS)
    _write_csv(overlap_csv, [r for pair in overlap_rows for r in overlap_rows[pair]], OVERLAP_COLUMNS)
