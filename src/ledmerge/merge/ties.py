"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

Its two steps are the shared building blocks: `topk_mask` (exact-count magnitude trim) and
`elect_disjoint_mean` (sign election + mean of the agreeing values), reused by DARE-TIES and LED.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from . import register
from .base import TaskVectorMethod, check_number, check_number_or_per_task, check_task_floats, per_task, task_weights


def topk_mask(x: Tensor, density: float) -> Tensor:
    """Bool mask of the k = ceil(density·n) largest |x|, exactly k even with tied magnitudes.

    Ties at the threshold go to the lowest flat indices: deterministic, and a tensor full of zeros
    still keeps only k entries (a plain `|x| >= threshold` would keep them all).
    """
    n = x.numel()
    # Exact decimal arithmetic: in floats 0.3 * 10 = 3.0000000000000004, whose ceil would keep 4.
    k = min(n, math.ceil(Fraction(repr(float(density))) * n))
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    mag = x.abs().flatten()
    threshold = mag.kthvalue(n - k + 1).values  # the k-th largest
    keep = mag > threshold
    at_threshold = (mag == threshold).nonzero().flatten()
    keep[at_threshold[: k - int(keep.sum())]] = True
    return keep.view_as(x)


def elect_disjoint_mean(deltas: dict[str, Tensor], weights: dict[str, float] | None = None) -> Tensor:
    """Per weight: elect the sign of Σ_t w_t δ_t, then average the w_t δ_t that agree with it.

    The mean divides by the summed weights of the agreeing tasks (all 1: a plain mean over them),
    zeros never count as agreeing, and a zero sum elects no sign (the weight keeps the base value).
    """
    tasks = sorted(deltas)
    stacked = torch.stack([deltas[t] for t in tasks])
    w = torch.tensor(task_weights(weights, tasks), dtype=torch.float32, device=stacked.device)
    w = w.view(-1, *([1] * (stacked.dim() - 1)))
    stacked = stacked * w
    sign = stacked.sum(0).sign()
    agree = (stacked.sign() == sign) & (stacked != 0)
    total = (stacked * agree).sum(0)
    divisor = (w * agree).sum(0)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


@register
@dataclass
class Ties(TaskVectorMethod):
    name = "ties"
    density: float | dict[str, float] = 0.2  # fraction of each τ_t kept (TIES paper: top 20%), or per task
    scale: float = 1.0                       # λ
    weights: dict[str, float] | None = None  # per-task w_t (> 0) in the weighted disjoint mean

    def __post_init__(self):
        self.density = check_number_or_per_task(self.name, "density", self.density, 0, 1, lo_open=True)
        self.scale = check_number(self.name, "scale", self.scale)
        self.weights = check_task_floats(self.name, "weights", self.weights, 0, lo_open=True)

    def merge_deltas(self, deltas, ctx):
        trimmed = {t: d * topk_mask(d, per_task(self.density, t)) for t, d in deltas.items()}
        return elect_disjoint_mean(trimmed, self.weights) * self.scale
