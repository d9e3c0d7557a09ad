"""Fused CPU kernels (numba) for the passes TIES makes over every entry of its task vectors.

With torch ops each pass over a tensor is several: convert the bf16 inputs, subtract, take the absolute value,
then histogram, compare or combine, each reading and writing whole temporaries; on 2 cores TIES' trim of three
1.1B-parameter experts took 36 s (docs/benchmarks.md). Here a pass reads the inputs once and does the rest in
registers:

- `top_k_abs_delta_mask`: the trim, the k largest |τ| = |θ_t − θ_0|, with the same radix select on the float32 bit
  patterns as `topk.top_k_mask_chunks` and ties at the threshold to the lowest flat indices;
- `ties_elements`: TIES' sign election and disjoint mean of one chunk, task by task in vectorised loops.

Both give the same bits as the torch ops (`tests/test_kernels.py`), and on any x86-64 CPU (`portable_numerics`):
only IEEE float32 subtractions, products, quotients and comparisons, each entry's in a fixed order, no fast-math
(so no fused multiply-adds), integer histograms; vectorising for the host's width reorders nothing. Compiled once
per machine (numba's cache next to this file, else in its user-wide cache; a cache built on another CPU is
recompiled) and released from the GIL, so several run at once in a merge's thread pool. Imported only by the
merges that use them (`merge.sparsify.FUSED_FROM`).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, types
from numba.extending import intrinsic, overload

from .errors import nan_scores
from .topk import bucket_of_kth

HIGH_BINS = 1 << 15  # top 16 bits of a non-negative float32 (its sign bit is 0)
LOW_BINS = 1 << 16
NAN_FROM = np.uint32(0x7F800001)  # bit patterns above +inf are NaN


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_f32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))
    return types.uint32(types.float32), codegen


def _value(x, i):
    """Entry i of an input as float32: bf16 arrives as its uint16 bit pattern (numpy has no bf16)."""


@overload(_value, inline="always")
def _value_of(x, i):
    if x.dtype == types.uint16:
        return lambda x, i: _f32_from_bits(np.uint32(x[i]) << np.uint32(16))
    return lambda x, i: x[i]


@njit(inline="always")
def _abs_bits(e, b, i):
    """Bit pattern of |e[i] − b[i]| computed in float32, as torch computes `(e.float() - b.float()).abs()`."""
    return _bits_of_f32(_value(e, i) - _value(b, i)) & np.uint32(0x7FFFFFFF)


@njit(nogil=True, cache=True)
def _high_histogram(e, b, hist):
    """Histogram of the top 16 bits; whether any entry is NaN."""
    nan = False
    for i in range(e.size):
        bits = _abs_bits(e, b, i)
        hist[bits >> np.uint32(16)] += 1
        nan |= bits >= NAN_FROM
    return nan


@njit(nogil=True, cache=True)
def _low_histogram(e, b, bucket, low):
    """Histogram of the low 16 bits of the entries in `bucket` (branch-free: the others count in a spare bin)."""
    outside = np.uint32(low.size - 1)  # a spare last bin counts the others
    for i in range(e.size):
        bits = _abs_bits(e, b, i)
        low[(bits & np.uint32(0xFFFF)) if (bits >> np.uint32(16)) == bucket else outside] += 1


@njit(nogil=True, cache=True)
def _mark_above(e, b, threshold, mask):
    for i in range(e.size):  # no branch and no loop-carried state: vectorised
        mask[i] = _abs_bits(e, b, i) > threshold


@njit(nogil=True, cache=True)
def _mark_ties(e, b, threshold, wanted, mask):
    """The first `wanted` entries equal to the threshold, in flat order."""
    for i in range(e.size):
        if wanted == 0:
            break
        if _abs_bits(e, b, i) == threshold:
            mask[i] = True
            wanted -= 1


def supports(expert: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether `top_k_abs_delta_mask` takes these inputs: CPU, contiguous, both bf16 or both float32."""
    return (expert.device.type == base.device.type == "cpu" and expert.dtype == base.dtype
            and expert.dtype in (torch.bfloat16, torch.float32) and expert.is_contiguous() and base.is_contiguous()
            and expert.shape == base.shape)


def top_k_abs_delta_mask(expert: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask of the k largest |expert − base| (float32), ties at the threshold to the lowest flat indices:
    `topk.top_k_mask_chunks(lambda part: (expert - base)[part].abs(), n, k)` in three fused passes."""
    n = base.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    bf16 = base.dtype == torch.bfloat16
    as_array = (lambda t: t.reshape(-1).view(torch.uint16).numpy()) if bf16 else (lambda t: t.reshape(-1).numpy())
    e, b = as_array(expert), as_array(base)
    hist = np.zeros(HIGH_BINS, dtype=np.int64)
    if _high_histogram(e, b, hist):
        raise nan_scores()
    bucket, above = bucket_of_kth(torch.from_numpy(hist), k)
    low = np.zeros(LOW_BINS + 1, dtype=np.int64)
    _low_histogram(e, b, np.uint32(bucket), low)
    rest, more = bucket_of_kth(torch.from_numpy(low[:LOW_BINS]), k - above)
    threshold, mask = np.uint32(bucket << 16 | rest), torch.empty(n, dtype=torch.bool)
    _mark_above(e, b, threshold, mask.numpy())
    _mark_ties(e, b, threshold, k - above - more, mask.numpy())
    return mask


@njit(nogil=True, cache=True)
def _ties_elements(base, experts, kept, mul, div, weights, normalize, scale, out):
    """x_t = w_t · apply(e_t − b), the trimmed or dropped task-vector entry, rescaled and weighted in the order of
    torch's ops in `Sparsifier.apply`, `dare_rescaled` and `elect_disjoint_mean` (a bool mask multiplies as 0.0/1.0;
    a factor, divisor or weight not applied is 1.0, which changes no bit). Task by task over the whole chunk, so
    every loop is branch-free and vectorised; x_t is computed twice rather than stored."""
    one = np.float32(1.0)
    n, tasks = base.size, experts.shape[0]
    total = np.zeros(n, np.float32)
    for t in range(tasks):  # Σ_t x_t, in task order from +0 as torch's sum(0)
        m, d, w = mul[t], div[t], weights[t]  # locals: the compiler cannot tell that the stores leave them alone
        for i in range(n):
            x = (experts[t, i] - base[i]) * np.float32(kept[t, i])
            total[i] = total[i] + ((x * m) / d) * w
    agreeing = np.zeros(n, np.float32)
    divisor = np.zeros(n, np.float32)  # with weights 1.0: the count of agreeing tasks
    for t in range(tasks):
        m, d, w = mul[t], div[t], weights[t]
        for i in range(n):
            x = ((((experts[t, i] - base[i]) * np.float32(kept[t, i])) * m) / d) * w
            s = total[i]
            agree = np.float32(((x > 0) & (s > 0)) | ((x < 0) & (s < 0)))  # x · sign(Σ) > 0
            agreeing[i] = agreeing[i] + x * agree
            divisor[i] = divisor[i] + w * agree
    for i in range(n):
        merged = agreeing[i] / (divisor[i] if divisor[i] != 0 else one) if normalize else agreeing[i]
        out[i] = base[i] + merged * scale


def ties_elements(base: torch.Tensor, experts: list[torch.Tensor], kept: list[torch.Tensor | None],
                  mul: list[float | None], div: list[float | None], weights: list[float] | None, normalize: bool,
                  scale: float) -> torch.Tensor:
    """TIES' consensus of one flat float32 chunk in one pass: base + λ · (disjoint mean of the w_t · x_t that agree
    with the sign of their sum), x_t the task vector times its kept mask (`kept`), times `mul` or divided by `div`
    (a rescale); the same bits as `TaskVectorMethod.merge_elements` with the torch ops (tests/test_kernels.py)."""
    f32, shape, base = np.float32, base.shape, base.reshape(-1).contiguous()
    everything = torch.ones_like(base, dtype=torch.bool)
    out = torch.empty(base.numel(), dtype=torch.float32)
    _ties_elements(base.numpy(), torch.stack([e.reshape(-1) for e in experts]).numpy(),
                   torch.stack([everything if k is None else k.reshape(-1) for k in kept]).numpy(),
                   np.array([1.0 if m is None else m for m in mul], dtype=f32),
                   np.array([1.0 if d is None else d for d in div], dtype=f32),
                   np.array(weights or [1.0] * len(experts), dtype=f32), normalize, f32(scale), out.numpy())
    return out.view(shape)
