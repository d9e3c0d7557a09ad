"""DELLA (Deep et al. 2024): DARE's random drop, with drop chances ranked by magnitude (MagPrune).

Within each row of a task vector (a 1-D tensor is one row), the entries are ranked by |τ_t|, smallest
first, and entry of rank r of n is kept with probability

    p_r = (density − ε) + 2ε · r / (n − 1)

so the smallest keeps density − ε, the largest density + ε, and the row keeps `density` on average. The
survivors are rescaled to the L1 norm of the whole task vector (mergekit's rescale: one number per tensor,
where the paper divides each survivor by its own p_r), then `della` combines them by TIES' sign election
and disjoint mean, `della_linear` by task arithmetic. Draws are seeded per (seed, tensor, task).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import LedmergeError
from .base import DROP_SEED, SCALE, WEIGHTS, Param, TaskVectorMethod, each_value, l1_rescale, per_task
from .task_arithmetic import weighted_sum
from .ties import elect_disjoint_mean, with_mean_weights

RANK_BLOCK = 1 << 22  # entries ranked at once: bounds the sort's int64 scratch on embedding-sized tensors


def keep_probabilities(magnitudes: Tensor, density: float, epsilon: float) -> Tensor:
    """p_r for every entry of `magnitudes` (float32, its shape), ranked within rows (the first axis; the rest
    flattened). Equal magnitudes are ranked by position, so the probabilities are a function of the values.
    A row of one entry has no order: it keeps `density`."""
    rows = magnitudes.reshape(magnitudes.shape[0] if magnitudes.dim() >= 2 else 1, -1)
    n = rows.shape[1]
    if n == 1:
        return torch.full_like(magnitudes, density, dtype=torch.float32)
    out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    step = max(1, RANK_BLOCK // n)
    for start in range(0, rows.shape[0], step):
        order = rows[start:start + step].argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
        out[start:start + step] = rank.to(torch.float32).div_(n - 1).mul_(2).mul_(epsilon).add_(density - epsilon)
    return out.view(magnitudes.shape)


DELLA_PARAMS = (
    Param("density", "number_or_per_task", 0.5, "mean fraction of each task vector τ_t kept (1: nothing dropped), "
          "or one per task", lo=0, hi=1, lo_open=True),
    Param("epsilon", "number", 0.15, "ε, half the spread of the keep probabilities over a row, from density − ε "
          "(smallest |τ|) to density + ε (largest); both ends must lie inside (0, 1)", lo=0, hi=1, hi_open=True),
    DROP_SEED,
    SCALE,
    WEIGHTS,
    Param("rescale", "bool", True, "scale the survivors of each task vector to its L1 norm (mergekit's rescale); "
          "false leaves them shrunk by about the density"),
)


class _Della(TaskVectorMethod):
    density: float | dict[str, float]
    epsilon: float
    seed: int
    scale: float
    weights: dict[str, float] | None
    rescale: bool

    def __post_init__(self):
        self.check_params()
        for density in each_value(self.density):
            if density < 1 and not (0 < density - self.epsilon and density + self.epsilon < 1):
                raise LedmergeError(f"merge method '{self.name}': the keep probabilities density ± epsilon must lie "
                                    f"inside (0, 1), got density {density} and epsilon {self.epsilon}: lower epsilon "
                                    f"below {min(density, 1 - density):g}")

    def select_delta(self, task, delta, n, ctx):
        """Keep each entry with its ranked probability. The uniforms are drawn on the CPU generator whatever
        the device, so a CUDA merge drops the same entries."""
        density = per_task(self.density, task)
        if density >= 1:
            return None
        magnitudes = delta.whole().abs_()  # whole: the ranks are per row
        uniform = torch.rand(delta.shape, generator=ctx.generator(task)).to(magnitudes.device)
        keep = uniform < keep_probabilities(magnitudes, density, self.epsilon)
        if self.rescale:
            l1_rescale(magnitudes, keep, ctx, task)
        return keep


class Della(_Della):
    """DELLA: magnitude-ranked random drops with rescale, then TIES' sign election and disjoint mean."""

    name = "della"
    PARAMS = with_mean_weights(DELLA_PARAMS)

    def merge_deltas(self, deltas, ctx):
        return elect_disjoint_mean(self.kept_deltas(deltas, ctx), self.weights) * self.scale


class DellaLinear(_Della):
    """DELLA with a linear combination: magnitude-ranked random drops with rescale, then task arithmetic."""

    name = "della_linear"
    PARAMS = DELLA_PARAMS

    def merge_deltas(self, deltas, ctx):
        return weighted_sum(self.kept_deltas(deltas, ctx), self.weights) * self.scale
