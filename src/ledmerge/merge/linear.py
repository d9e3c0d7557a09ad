"""Linear merge / model soup (Wortsman et al. 2022): θ = Σ_t w_t θ_t, the no-base baseline."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LedmergeError
from . import register
from .base import MergeMethod, check_bool, check_task_floats, task_weights
from .task_arithmetic import weighted_sum


@register
@dataclass
class Linear(MergeMethod):
    name = "linear"
    weights: dict[str, float] | None = None  # per-expert w_t; unlisted experts get 1.0
    normalize: bool = True                   # divide by Σ w_t (a proper average)

    def __post_init__(self):
        self.weights = check_task_floats(self.name, "weights", self.weights)
        self.normalize = check_bool(self.name, "normalize", self.normalize)

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
