"""DARE (Yu et al. 2024): randomly drop task-vector entries and rescale the survivors, then combine.

`dare_linear` combines by task arithmetic, `dare_ties` by TIES sign election + disjoint mean (no
magnitude trim: the random drop is the sparsifier). Drops are seeded per (seed, tensor, task).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .. import topk
from .base import DROP_SEED, SCALE, WEIGHTS, Param, TaskVectorMethod, per_task
from .task_arithmetic import weighted_sum
from .ties import elect_disjoint_mean, with_mean_weights

log = logging.getLogger(__name__)


def dare_keep(n: int, drop: float, generator: torch.Generator) -> Tensor:
    """A flat bool mask keeping each of n entries with probability 1 - drop. Drawn on the CPU generator whatever the
    device, so a CUDA merge drops the same entries; drawn slice by slice, which gives the same stream as one
    whole-tensor draw (torch's CPU generator fills a tensor in order) without holding n float32 numbers at once."""
    keep = torch.empty(n, dtype=torch.bool)
    for start in range(0, n, topk.SELECT_CHUNK):
        part = slice(start, min(start + topk.SELECT_CHUNK, n))
        keep[part] = torch.rand(part.stop - start, generator=generator) >= drop
    return keep


def dare_rescaled(delta: Tensor, keep: Tensor, drop: float, rescale: bool = True) -> Tensor:
    """The kept entries of `delta`, scaled by 1/(1-drop) to keep its expectation (unless not `rescale`)."""
    kept = delta * keep
    return kept / (1 - drop) if rescale else kept


DARE_PARAMS = (
    Param("drop", "number_or_per_task", 0.9, "p, the probability of dropping each task-vector entry (DARE paper: 0.9 "
          "is harmless for SFT deltas), or one per task", lo=0, hi=1, hi_open=True),
    DROP_SEED,
    SCALE,
    WEIGHTS,
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
        """The drops ignore the values: `delta` is never computed."""
        return dare_keep(n, per_task(self.drop, task), ctx.generator(task))

    def dropped(self, deltas: dict[str, Tensor], ctx) -> dict[str, Tensor]:
        return {t: dare_rescaled(d, ctx.kept[t], per_task(self.drop, t), self.rescale) for t, d in deltas.items()}


class DareLinear(_Dare):
    """DARE with a linear combination: drop and rescale each task vector, then task arithmetic."""

    name = "dare_linear"
    PARAMS = DARE_PARAMS

    def merge_deltas(self, deltas, ctx):
        return weighted_sum(self.dropped(deltas, ctx), self.weights) * self.scale


class DareTies(_Dare):
    """DARE with TIES' sign election and disjoint mean: drop and rescale each task vector, then combine."""

    name = "dare_ties"
    PARAMS = with_mean_weights(DARE_PARAMS)

    def merge_deltas(self, deltas, ctx):
        return elect_disjoint_mean(self.dropped(deltas, ctx), self.weights) * self.scale
