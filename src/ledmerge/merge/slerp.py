"""SLERP: spherical linear interpolation between the base and one expert, per tensor.

Each tensor of the two models is one vector; the merge moves along the great-circle arc between their
directions, θ = sin((1 − t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1 with cos Ω the cosine between them, so the
midpoint of two far-apart models is not shrunk toward zero as the linear average is. As mergekit does, the
endpoints are the base (t = 0) and the one other model (t = 1): to interpolate two fine-tunes, make one of
them the config's `base_model` and the other its only task. The two coefficients need the whole tensor
(`select`); the interpolation itself is elementwise.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..errors import LedmergeError
from .base import MergeMethod
from .numerics import sum64
from .params import Param

# Above this |cos Ω| the vectors are (anti)colinear: sin Ω is too small to divide by, and the arc is a line.
COLINEAR = 0.9995
ZERO_NORM = 1e-8  # a tensor with a smaller L2 norm has no direction


def slerp_coefficients(a: Tensor, b: Tensor, t: float) -> tuple[float, float]:
    """(c_a, c_b) with slerp(a, b; t) = c_a·a + c_b·b, for tensors of one shape (any float dtype)."""
    norm_a, norm_b = math.sqrt(sum64(a, a)), math.sqrt(sum64(b, b))
    if norm_a <= ZERO_NORM or norm_b <= ZERO_NORM:
        return 1 - t, t
    cos = min(1.0, max(-1.0, sum64(a, b) / (norm_a * norm_b)))
    if abs(cos) > COLINEAR:
        return 1 - t, t
    omega = math.acos(cos)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


class Slerp(MergeMethod):
    """SLERP: spherical interpolation, tensor by tensor, from the base (t = 0) to the one expert (t = 1), so the
    config has exactly one task; linear where the two tensors are (anti)colinear or one is zero."""

    name = "slerp"
    PARAMS = (
        Param("t", "number", 0.5, "position between the base (0) and the expert (1)", lo=0, hi=1),
    )
    t: float

    def check_inputs(self, tasks, masks):
        super().check_inputs(tasks, masks)
        if len(tasks) != 1:
            raise LedmergeError(f"merge method 'slerp' interpolates the base and one expert, got {len(tasks)} "
                                f"experts {sorted(tasks)}: use a config with one task (the other endpoint is "
                                "base_model), or another method")

    def select(self, base, experts, ctx):
        (expert,) = experts.values()
        ctx.scales["base"], ctx.scales["expert"] = slerp_coefficients(base, expert, self.t)
        return {}

    def merge_elements(self, base, experts, ctx):
        (expert,) = experts.values()
        return base * ctx.scales["base"] + expert * ctx.scales["expert"]
