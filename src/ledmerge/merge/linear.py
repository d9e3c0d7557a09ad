"""Linear merge / model soup (Wortsman et al. 2022): θ = Σ_t w_t θ_t, the no-base baseline."""

from __future__ import annotations

from ..errors import LedmergeError
from .base import MergeMethod
from .numerics import weighted_sum
from .params import Param, task_weights


class Linear(MergeMethod):
    """Linear merge (model soup): the weighted average of the experts; the base is not used."""

    name = "linear"
    PARAMS = (
        Param("weights", "task_numbers", None, "per-expert w_t; unlisted experts get 1.0"),
        Param("normalize", "bool", True, "divide by Σ w_t (a proper average)"),
    )
    weights: dict[str, float] | None
    normalize: bool

    def check_inputs(self, tasks, masks):
        super().check_inputs(tasks, masks)
        if self.normalize and abs(sum(task_weights(self.weights, tasks))) < 1e-8:
            raise LedmergeError("merge method 'linear': the weights sum to 0, so they cannot be normalised: "
                                "change the weights or set normalize: false")

    def merge_elements(self, base, experts, ctx):
        out = weighted_sum(experts, self.weights)
        if self.normalize:
            out /= sum(task_weights(self.weights, experts))
        return out
