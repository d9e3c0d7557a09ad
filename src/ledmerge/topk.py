"""Top-k and TopR primitives: exact-count selection of the largest entries of a tensor.

TopR keeps exactly ⌈r·n⌉ entries of each tensor (`top_k_count`), found by a k-th value threshold
(`top_k_mask_chunks`, a radix select over histograms of the float32 bits, slice by slice) with ties at the
threshold broken by lowest flat index (`top_r_mask`). An exact count matters: thresholding "score >= t" elects a whole tensor
when most scores tie at 0 (sparse embedding gradients). `top_r_positive` is TopR among the positive entries
only, what the election uses (see `ledmerge.led.election`); TIES' magnitude trim uses `top_r_mask`.

A top-level module, not part of `ledmerge.led`: LED's election is one user, the merge methods are the others
(TIES' trim via `top_k_mask_chunks`, Breadcrumbs' band via `top_k_mask`, DARE's slices of `SELECT_CHUNK`
entries), and a merge method should not depend on LED's package for a selection primitive.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import torch

from .errors import LedmergeError, nan_scores

SELECT_CHUNK = 1 << 22  # entries per slice of a chunked selection (16 MiB of float32 scores)


def top_k_count(n: int, rate: float) -> int:
    """⌈rate·n⌉ computed on the decimal value of `rate`, so 0.07·100 is 7, not ceil(7.000000000000001) = 8."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0 < rate <= 1):
        raise LedmergeError(f"rate must be a number in (0, 1], got {rate!r}")
    return math.ceil(Fraction(repr(float(rate))) * n)


def top_r_mask(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """Bool mask of the ⌈rate·n⌉ largest entries; ties at the cut-off go to the lowest flat indices."""
    return top_k_mask(scores, top_k_count(scores.numel(), rate))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries; ties at the cut-off go to the lowest flat indices. The order is total
    (value, then index), so the k largest always contain the j largest for j < k: Breadcrumbs cuts a band out
    of it with two of these masks."""
    n = scores.numel()
    if not scores.is_floating_point():
        raise LedmergeError(f"scores must be floating point, got {scores.dtype}")
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    try:
        mask = top_k_mask_chunks(lambda part: flat[part], n, k, chunk=n)
    except NegativeScore:  # bit patterns no longer order like the values: sort instead
        threshold = torch.kthvalue(flat, n - k + 1).values
        mask = flat > threshold
        tied = (flat == threshold).nonzero().flatten()
        mask[tied[: k - int(mask.sum())]] = True  # `tied` is sorted: the lowest flat indices win
    return mask.view(scores.shape)


class NegativeScore(ValueError):
    """A score below 0 (or -0.0): the radix select's bit-pattern order does not hold."""


def top_k_mask_chunks(scores: Callable[[slice], torch.Tensor], n: int, k: int,
                      chunk: int | None = None) -> torch.Tensor:
    """Flat bool mask of the k largest of n non-negative float32 scores, computed from flat slices of them, so
    memory is the mask plus a few chunks whatever n is (a 128256 x 4096 LM head's |τ| would be 2 GB in float32).

    `scores(part)` returns the float32 scores of the flat slice `part` (`chunk` entries, default `SELECT_CHUNK`),
    computed afresh each time (e.g. |θ_t - θ_0| from bf16 weights), in flat order, two or three times per chunk. A
    radix select on the float32 bit patterns, which order like the values when no score is negative: a histogram
    of the top 16 bits finds the bucket holding the k-th largest score. When that bucket holds at most `chunk`
    entries, the second pass marks the scores in higher buckets and keeps the bucket's scores and indices, whose
    `kthvalue` is the threshold. Otherwise (bf16 task vectors can pile many equal scores into one bucket) a
    histogram of the low 16 bits of the bucket's scores finds the threshold's exact bits and how many tie with
    it, and a third pass marks the scores above it. Ties go to the lowest flat indices. About 4x faster than
    `torch.kthvalue` on 10^8 entries, which matters for TIES trims and elections of 8B models.
    """
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores(slice(0, 1)).device)
    chunk = chunk or SELECT_CHUNK
    parts = [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(parts) == 1:  # one slice: computed once, kept for the later passes (its memory is a slice's anyway)
        once = scores(parts[0])
        scores = lambda part: once
    hist = None
    for part in parts:
        v = scores(part)
        h = _histogram(_high_bits(v), 1 << 15)
        if int(h[0x7F80:].sum()) and bool(torch.isnan(v).any()):
            raise nan_scores()
        hist = h if hist is None else hist.add_(h)
    bucket, above = bucket_of_kth(hist, k)
    mask = torch.empty(n, dtype=torch.bool, device=hist.device)
    if int(hist[bucket]) <= chunk:  # the bucket's entries fit in a chunk's memory: keep them, one pass less
        where, values = [], []
        for part in parts:
            v = scores(part)
            high = _high_bits(v)
            torch.gt(high, bucket, out=mask[part])
            inside = (high == bucket).nonzero().flatten()
            where.append(inside + part.start)
            values.append(v[inside])
        where, values = torch.cat(where), torch.cat(values)  # in flat order
        threshold = torch.kthvalue(values, values.numel() - (k - above) + 1).values
        mask[where[values > threshold]] = True
        tied = where[values == threshold]
        mask[tied[: k - above - int((values > threshold).sum())]] = True
        return mask
    low = None
    for part in parts:
        bits = scores(part).view(torch.int32)
        h = _histogram(bits[_high_bits(bits) == bucket] & 0xFFFF, 1 << 16)
        low = h if low is None else low.add_(h)
    rest, more = bucket_of_kth(low, k - above)
    threshold = torch.tensor([bucket << 16 | rest], dtype=torch.int32).view(torch.float32).item()
    wanted = k - above - more  # tied entries kept, the lowest flat indices first
    for part in parts:
        v = scores(part)
        torch.gt(v, threshold, out=mask[part])
        if wanted:
            tied = (v == threshold).nonzero().flatten()[:wanted]
            mask[part][tied] = True
            wanted -= tied.numel()
    return mask


def _high_bits(v: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each float32 (or its int32 view), as int16 (no copy on little-endian machines)."""
    return v.view(torch.int16)[1::2] if sys.byteorder == "little" else (v.view(torch.int32) >> 16)


def bucket_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The histogram bin holding the k-th largest entry (bins ordered like the values) and how many entries lie
    in the bins above it."""
    at_or_above = hist.flip(0).cumsum(0).flip(0)  # [i]: entries in bins >= i
    bucket = int((at_or_above >= k).nonzero()[-1])
    return bucket, int(at_or_above[bucket + 1]) if bucket + 1 < hist.numel() else 0


def top_r_positive(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """TopR among the entries with a positive score: the ⌈rate·n⌉ largest, or every positive entry when fewer
    are positive. A score of 0 says nothing about importance, so it is never elected."""
    positive = scores > 0
    if int(positive.sum()) <= top_k_count(scores.numel(), rate):
        return positive
    return top_r_mask(scores, rate)  # the k largest are all positive


@functools.cache
def _histogram_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, "histogram")


def _histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """bincount of non-negative integers below `bins`, over torch's threads (bincount itself runs on one);
    NegativeScore on a negative one (the sign bit of a negative float)."""
    threads = torch.get_num_threads()
    try:
        if threads == 1 or values.numel() < 1 << 22 or values.device.type != "cpu":
            return torch.bincount(values, minlength=bins)
        parts = values.tensor_split(threads)
        return sum(_histogram_pool(threads).map(lambda p: torch.bincount(p, minlength=bins), parts))
    except RuntimeError as e:
        if values.numel() and int(values.min()) < 0:
            raise NegativeScore from e
        raise
