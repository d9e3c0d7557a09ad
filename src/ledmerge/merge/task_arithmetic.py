"""Task Arithmetic (Ilharco et al. 2023): θ = θ_0 + λ Σ_t w_t τ_t, the simplest task-vector merge."""

from __future__ import annotations

from torch import Tensor

from .base import Param, TaskVectorMethod, task_weights


def weighted_sum(tensors: dict[str, Tensor], weights: dict[str, float] | None = None) -> Tensor:
    """Σ_t w_t x_t, summed in task-name order so the bits do not depend on dict order."""
    tasks = sorted(tensors)
    out = None
    for t, w in zip(tasks, task_weights(weights, tasks)):
        out = tensors[t] * w if out is None else out.add_(tensors[t], alpha=w)
    return out


class TaskArithmetic(TaskVectorMethod):
    """Task arithmetic: the base plus the weighted sum of the task vectors τ_t = θ_t − θ_0."""

    name = "task_arithmetic"
    PARAMS = (
        Param("scale", "number", 1.0, "λ, multiplies the summed task vectors"),
        Param("weights", "task_numbers", None, "per-task w_t; unlisted tasks get 1.0"),
    )
    scale: float
    weights: dict[str, float] | None

    def merge_deltas(self, deltas, ctx):
        return weighted_sum(deltas, self.weights) * self.scale
