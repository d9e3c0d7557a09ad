"""RESTA (Bhardwaj et al. 2024, "Language Models are Homer Simpson!"): add a safety vector back after the merge.

θ = θ_merged + γ · V with V = θ_aligned − θ_unaligned, optionally sparsified by DARE first (drop each entry of V
with probability p, rescale the survivors by 1/(1 − p)), with DARE's own drop code and a generator seeded per
(seed, tensor). A post-step (`PostStep`), so it follows any method, LED included.
"""

from __future__ import annotations

from .base import SAFETY_PAIR, PostStep
from .params import Param
from .sparsify import dare_keep, dare_rescaled


class Resta(PostStep):
    """RESTA, after any merge method: add γ times the safety vector V = θ_aligned − θ_unaligned (optionally
    DARE-sparsified) to every merged tensor."""

    name = "resta"
    PARAMS = (
        Param("gamma", "number", 0.5, "γ, the weight of the safety vector added to the merged model"),
        Param("drop", "number", 0.0, "p, DARE's drop probability on V (survivors scaled by 1/(1 − p)); 0: all of V",
              lo=0, hi=1, hi_open=True),
        Param("seed", "int", 0, "seed of the drops (drawn per seed and tensor)"),
        *SAFETY_PAIR,
    )
    gamma: float
    drop: float
    seed: int

    def apply(self, merged, models, ctx):
        v = self.safety_vector(models)
        if self.drop > 0:
            keep = dare_keep(v.numel(), self.drop, ctx.generator(self.name, self.seed))
            v = dare_rescaled(v, keep.to(v.device).view(v.shape), self.drop)
        return merged.add(v, alpha=self.gamma)
