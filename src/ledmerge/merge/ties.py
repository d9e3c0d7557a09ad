"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

Its two steps are the shared building blocks: the exact-count magnitude trim (`Ties.select_delta`: LED's TopR,
`ledmerge.topk.top_r_mask`, on |τ_t|, computed slice by slice by `top_k_mask_chunks`; ties at the threshold go
to the lowest flat indices) and
`elect_disjoint_mean` (sign election + mean of the agreeing values), reused by DARE-TIES and LED.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..topk import top_k_count, top_k_mask_chunks
from .base import SCALE, Param, TaskVectorMethod, per_task, task_weights


def elect_disjoint_mean(deltas: dict[str, Tensor], weights: dict[str, float] | None = None) -> Tensor:
    """Per weight: elect the sign of Σ_t w_t δ_t, then average the w_t δ_t that agree with it.

    The mean divides by the summed weights of the agreeing tasks (all 1: a plain mean over them),
    zeros never count as agreeing, and a zero sum elects no sign (the weight keeps the base value).
    """
    tasks = sorted(deltas)
    stacked = torch.stack([deltas[t] for t in tasks])
    if weights:
        w = torch.tensor(task_weights(weights, tasks), dtype=torch.float32, device=stacked.device)
        w = w.view(-1, *([1] * (stacked.dim() - 1)))
        stacked = stacked * w
    agree = (stacked * stacked.sum(0).sign_()) > 0  # shares the sum's sign: a zero sum elects nothing, zeros never agree
    total = (stacked * agree).sum(0)
    if not weights:
        return total.div_(agree.sum(0, dtype=torch.float32).clamp_(min=1))  # counts are exact in float32
    divisor = (w * agree).sum(0)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def with_mean_weights(params: tuple[Param, ...]) -> tuple[Param, ...]:
    """`params` with its `weights` made those of the weighted disjoint mean, which divides by them: > 0."""
    return tuple(dataclasses.replace(p, lo=0.0, lo_open=True, description="per-task w_t (> 0: the weighted "
                                     "disjoint mean divides by them); unlisted tasks get 1.0")
                 if p.name == "weights" else p for p in params)


class Ties(TaskVectorMethod):
    """TIES-Merging: keep the largest-magnitude entries of each task vector, elect a sign per weight, average
    the task vectors that agree with it."""

    name = "ties"
    PARAMS = (
        Param("density", "number_or_per_task", 0.2, "fraction of each task vector τ_t kept, by magnitude (TIES "
              "paper: top 20%), or one per task", lo=0, hi=1, lo_open=True),
        SCALE,
        Param("weights", "task_numbers", None, "per-task w_t in the weighted disjoint mean; unlisted tasks get 1.0",
              lo=0, lo_open=True),
    )
    density: float | dict[str, float]
    scale: float
    weights: dict[str, float] | None

    def select_delta(self, task, delta, n, ctx):
        density = per_task(self.density, task)
        k = top_k_count(n, density)
        return None if k >= n else top_k_mask_chunks(lambda part: delta(part).abs_(), n, k)

    def merge_deltas(self, deltas, ctx):
        return elect_disjoint_mean(self.kept_deltas(deltas, ctx), self.weights) * self.scale
