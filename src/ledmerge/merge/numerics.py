"""Sums whose bits the methods share: `weighted_sum` over tasks in a fixed order, and `sum64`, a whole-tensor
reduction in float64 that is the same on any machine."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .params import task_weights

SUM_CHUNK = 1 << 20  # elements summed at a time by `sum64`: 8 MiB of float64 scratch


def weighted_sum(tensors: dict[str, Tensor], weights: Mapping[str, float] | None = None) -> Tensor:
    """Σ_t w_t x_t, summed in task-name order so the bits do not depend on dict order (unlisted tasks: w_t = 1)."""
    tasks = sorted(tensors)
    out = None
    for t, w in zip(tasks, task_weights(weights, tasks)):
        out = tensors[t] * w if out is None else out.add_(tensors[t], alpha=w)
    return out


def sum64(a: Tensor, b: Tensor | None = None) -> float:
    """Σ a (or Σ a·b) over a whole tensor, in float64, a slice at a time, the slices added in order. A float32
    sum's last bits depend on how torch splits it across threads; a float64 sum's differences lie far below
    float32's precision, so the float32 results computed from it are the same on any machine. Slicing bounds
    the scratch on embedding-sized tensors."""
    a = a.reshape(-1)
    b = None if b is None else b.reshape(-1)
    total = 0.0
    for start in range(0, a.numel(), SUM_CHUNK):
        part = a[start:start + SUM_CHUNK].double()
        if b is not None:
            part *= b[start:start + SUM_CHUNK]
        total += float(part.sum())
    return total
