"""Model Breadcrumbs (Davari & Belilovsky 2024): sparsify each task vector to a band of its magnitudes.

The largest entries of a task vector are outliers that one task pushes far and that collide with the other
tasks; the smallest are noise. Breadcrumbs drops both: per tensor it ranks |τ_t| and keeps the band after
the `gamma` fraction of largest entries, `density` of the tensor long. The ranking is TIES' exact-count,
lowest-index-first order (`ledmerge.topk.top_k_mask`), so the band is two masks of it. `breadcrumbs` then
sums the bands (task arithmetic), `breadcrumbs_ties` elects a sign and averages them (TIES).
"""

from __future__ import annotations

from ..errors import LedmergeError
from ..topk import top_k_count, top_k_mask
from .base import SCALE, WEIGHTS, Param, TaskVectorMethod, each_value, l1_rescale, per_task
from .task_arithmetic import weighted_sum
from .ties import elect_disjoint_mean, with_mean_weights

BREADCRUMBS_PARAMS = (
    Param("density", "number_or_per_task", 0.9, "fraction of each task vector τ_t kept: the ⌈density·n⌉ entries "
          "that follow the dropped outliers by magnitude; or one per task", lo=0, hi=1, lo_open=True),
    Param("gamma", "number", 0.01, "fraction of the largest-magnitude entries of τ_t dropped first, ⌈gamma·n⌉ "
          "(0: none, which is TIES' trim); density + gamma must be at most 1", lo=0, hi=1, hi_open=True),
    SCALE,
    WEIGHTS,
    Param("rescale", "bool", False, "scale each kept band to the L1 norm of its whole task vector (mergekit's "
          "rescale)"),
)


class Breadcrumbs(TaskVectorMethod):
    """Model Breadcrumbs: drop the largest and the smallest entries of each task vector by magnitude, then
    task arithmetic on what is left."""

    name = "breadcrumbs"
    PARAMS = BREADCRUMBS_PARAMS
    density: float | dict[str, float]
    gamma: float
    scale: float
    weights: dict[str, float] | None
    rescale: bool

    def __post_init__(self):
        self.check_params()
        for density in each_value(self.density):
            if density + self.gamma > 1:
                raise LedmergeError(f"merge method '{self.name}': density + gamma must be at most 1 (the kept band "
                                    f"follows the dropped outliers), got density {density} and gamma {self.gamma}: "
                                    "lower one of them")

    def select_delta(self, task, delta, n, ctx):
        """The band: the ⌈density·n⌉ largest |τ| after the ⌈gamma·n⌉ largest. On a tensor too small for both
        rounded-up counts, fewer outliers are dropped so the band keeps its size."""
        magnitudes = delta.whole().abs_()  # whole: two top-k counts and the L1 sums (not bounded like TIES')
        band = top_k_count(n, per_task(self.density, task))
        outliers = min(top_k_count(n, self.gamma) if self.gamma > 0 else 0, n - band)
        if band == n:
            return None
        keep = top_k_mask(magnitudes, outliers + band)
        if outliers:
            keep &= ~top_k_mask(magnitudes, outliers)
        if self.rescale:
            l1_rescale(magnitudes, keep, ctx, task)
        return keep

    def merge_deltas(self, deltas, ctx):
        return weighted_sum(self.kept_deltas(deltas, ctx), self.weights) * self.scale


class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs with TIES' sign election and disjoint mean in place of the sum."""

    name = "breadcrumbs_ties"
    PARAMS = with_mean_weights(BREADCRUMBS_PARAMS)

    def merge_deltas(self, deltas, ctx):
        return elect_disjoint_mean(self.kept_deltas(deltas, ctx), self.weights) * self.scale
