"""DARE (Yu et al. 2024): randomly drop task-vector entries and rescale the survivors, then combine.

`dare_linear` combines by task arithmetic, `dare_ties` by TIES sign election + disjoint mean (no
magnitude trim: the random drop is the sparsifier). Drops are seeded per (seed, tensor, task).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor

from .. import topk
from .base import Param, TaskVectorMethod, per_task
from .task_arithmetic import weighted_sum
from .ties import elect_disjoint_mean

log = logging.getLogger(__name__)


DARE_PARAMS = (
    Param("drop", "number_or_per_task", 0.9, "p, the probability of dropping each task-vector entry (DARE paper: 0.9 "
          "is harmless for SFT deltas), or one per task", lo=0, hi=1, hi_open=True),
    Param("seed", "int", 0, "seed of the random drops (drawn per seed, tensor and task)"),
    Param("scale", "number", 1.0, "λ, multiplies the merged task vector"),
    Param("weights", "task_numbers", None, "per-task w_t; unlisted tasks get 1.0"),
    Param("rescale", "bool", True, "scale the kept entries by 1/(1 − p); false is plain random pruning, not DARE"),
)


class _Dare(TaskVectorMethod):
    drop: float | dict[str, float]
    seed: int
    scale: float
    weights: dict[str, float] | None
    rescale: bool

    def __post_init__(self):
        self.check_params()
        if not self.rescale:
            log.warning("%s with rescale: false is random pruning, not DARE: the merged task vectors "
                        "shrink by a factor 1 - drop", self.name)

    def select_delta(self, task, delta, n, ctx):
        """Keep each entry with probability 1 - drop, whatever its value (`delta` is never computed). Drawn on the
        CPU generator whatever the device, so a CUDA merge drops the same entries; drawn slice by slice, which gives
        the same stream as one whole-tensor draw (torch's CPU generator fills a tensor in order) without holding
        n float32 numbers at once."""
        g, p = ctx.generator(task), per_task(self.drop, task)
        keep = torch.empty(n, dtype=torch.bool)
        for start in range(0, n, topk.SELECT_CHUNK):
            part = slice(start, min(start + topk.SELECT_CHUNK, n))
            keep[part] = torch.rand(part.stop - start, generator=g) >= p
        return keep

    def dropped(self, deltas: dict[str, Tensor], ctx) -> dict[str, Tensor]:
        """The kept entries, scaled by 1/(1-drop) to keep the task vector's expectation."""
        out = {}
        for t, d in deltas.items():
            kept = d * ctx.kept[t]
            out[t] = kept / (1 - per_task(self.drop, t)) if self.rescale else kept
        return out


class DareLinear(_Dare):
    """DARE with a linear combination: drop and rescale each task vector, then task arithmetic."""

    name = "dare_linear"
    PARAMS = DARE_PARAMS

    def merge_deltas(self, deltas, ctx):
        return weighted_sum(self.dropped(deltas, ctx), self.weights) * self.scale


class DareTies(_Dare):
    """DARE with TIES' sign election and disjoint mean: drop and rescale each task vector, then combine."""

    name = "dare_ties"
    PARAMS = tuple(dataclasses.replace(p, lo=0.0, lo_open=True, description="per-task w_t (> 0: the weighted "
                                       "disjoint mean divides by them); unlisted tasks get 1.0")
                   if p.name == "weights" else p for p in DARE_PARAMS)

    def merge_deltas(self, deltas, ctx):
        return elect_disjoint_mean(self.dropped(deltas, ctx), self.weights) * self.scale
