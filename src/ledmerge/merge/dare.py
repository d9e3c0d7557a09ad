"""DARE (Yu et al. 2024): randomly drop task-vector entries and rescale the survivors, then combine.

`dare_linear` combines by task arithmetic, `dare_ties` by TIES sign election + disjoint mean (no
magnitude trim: the random drop is the sparsifier). Drops are seeded per (seed, tensor, task).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from . import register
from .base import (TaskVectorMethod, check_bool, check_int, check_number, check_number_or_per_task, check_task_floats,
                   per_task)
from .task_arithmetic import weighted_sum
from .ties import elect_disjoint_mean

log = logging.getLogger(__name__)


@dataclass
class _Dare(TaskVectorMethod):
    positive_weights: ClassVar[bool] = False
    drop: float | dict[str, float] = 0.9     # p (DARE paper: 0.9 is harmless for SFT deltas), or per task
    seed: int = 0
    scale: float = 1.0                       # λ
    weights: dict[str, float] | None = None  # per-task w_t
    rescale: bool = True                     # false is plain random pruning, not DARE

    def __post_init__(self):
        self.drop = check_number_or_per_task(self.name, "drop", self.drop, 0, 1, hi_open=True)
        self.seed = check_int(self.name, "seed", self.seed)
        self.scale = check_number(self.name, "scale", self.scale)
        lo = 0.0 if self.positive_weights else float("-inf")
        self.weights = check_task_floats(self.name, "weights", self.weights, lo, lo_open=self.positive_weights)
        self.rescale = check_bool(self.name, "rescale", self.rescale)
        if not self.rescale:
            log.warning("%s with rescale: false is random pruning, not DARE: the merged task vectors "
                        "shrink by a factor 1 - drop", self.name)

    def select(self, base, experts, ctx):
        return {t: self.select_delta(t, base, ctx) for t in sorted(experts)}  # drops ignore values: no task vector

    def select_delta(self, task, delta, ctx):
        """Keep each entry with probability 1 - drop. Drawn on the CPU generator whatever the device, so
        a CUDA merge drops the same entries."""
        return (torch.rand(delta.shape, generator=ctx.generator(task)) >= per_task(self.drop, task)).to(delta.device)

    def dropped(self, deltas: dict[str, Tensor], ctx) -> dict[str, Tensor]:
        """The kept entries, scaled by 1/(1-drop) to keep the task vector's expectation."""
        out = {}
        for t, d in deltas.items():
            kept = d * ctx.kept[t]
            out[t] = kept / (1 - per_task(self.drop, t)) if self.rescale else kept
        return out


@register
@dataclass
class DareLinear(_Dare):
    name = "dare_linear"

    def merge_deltas(self, deltas, ctx):
        return weighted_sum(self.dropped(deltas, ctx), self.weights) * self.scale


@register
@dataclass
class DareTies(_Dare):
    name = "dare_ties"
    positive_weights = True  # the weighted disjoint mean divides by them

    def merge_deltas(self, deltas, ctx):
        return elect_disjoint_mean(self.dropped(deltas, ctx), self.weights) * self.scale
