"""LED-Merging, merge step: θ = θ_0 + Σ_t λ_t (M_t ⊙ τ_t) with the disjoint masks M_t of the election.

The masks only decide *which* entries of each task vector survive; how the survivors are combined is
delegated to an existing task-vector method (`combine`: sum = task arithmetic, or TIES / DARE-TIES),
so LED adds no arithmetic of its own. λ_t scales task t's masked vector before it is combined; it is not a
TIES weight, because after Disjoint at most one task is non-zero per weight and TIES' weighted mean would
divide λ_t back out (λ = {a: 0.5, c: 0.25} would merge both at 1). Tensors the location step did not score have no mask and follow
`unscored`: keep the base (`base`) or take plain task arithmetic (`task_arithmetic`).
"""

from __future__ import annotations

import torch

from ..errors import LedmergeError
from .base import Param, TaskVectorMethod, check_task_keys, task_weights
from .dare import DareTies
from .task_arithmetic import TaskArithmetic
from .ties import Ties


class Led(TaskVectorMethod):
    """LED-Merging: each task vector restricted to its disjoint mask M_t, scaled by λ_t, then combined."""

    name = "led"
    uses_masks = True
    PARAMS = (
        Param("lambdas", "task_numbers", None, "per-task λ_t scaling M_t ⊙ τ_t; unlisted tasks get 1.0 (paper "
              "default)"),
        Param("unscored", "choice", "base", "tensors without masks (not scored): keep the base, or take plain task "
              "arithmetic", choices=("base", "task_arithmetic")),
        Param("combine", "choice", "sum", "how the masked task vectors are combined: summed, or by TIES / DARE-TIES",
              choices=("sum", "ties", "dare_ties")),
        Param("scale", "number", 1.0, "global λ on top of λ_t"),
        Param("density", "number", None, "combine: ties only; unset: 1.0 (the masks already sparsify)",
              lo=0, hi=1, lo_open=True, optional=True),
        Param("drop", "number", None, "combine: dare_ties only; unset: dare_ties' default",
              lo=0, hi=1, hi_open=True, optional=True),
        Param("seed", "int", 0, "combine: dare_ties only: seed of the random drops"),
    )
    lambdas: dict[str, float] | None
    unscored: str
    combine: str
    scale: float
    density: float | None
    drop: float | None
    seed: int

    def __post_init__(self):
        self.check_params("unscored", "combine", "lambdas", "scale", "seed")
        for key, needs in (("density", "ties"), ("drop", "dare_ties")):
            if getattr(self, key) is not None and self.combine != needs:
                raise LedmergeError(f"merge method 'led': {key} only applies with combine: {needs}, "
                                    f"not combine: {self.combine}: remove it or change combine")
        self.check_params("density", "drop")
        # The combiners see λ_t·(M_t ⊙ τ_t) (`_scaled`), so they are built unweighted.
        if self.combine == "ties":
            self.combiner = Ties(density=1.0 if self.density is None else self.density, scale=self.scale)
            self.density = self.combiner.density
        elif self.combine == "dare_ties":
            self.combiner = DareTies(**({} if self.drop is None else {"drop": self.drop}), seed=self.seed,
                                     scale=self.scale)
            self.drop = self.combiner.drop
        else:
            self.combiner = TaskArithmetic(scale=self.scale)
        self.plain = TaskArithmetic(scale=self.scale, weights=self.lambdas)

    def check_inputs(self, tasks, masks):
        super().check_inputs(tasks, masks)
        if self.lambdas:
            check_task_keys(self.name, "lambdas", self.lambdas, tasks)
        masks = masks or {}
        missing = sorted(set(tasks) - set(masks))
        if missing:
            raise LedmergeError(f"merge method 'led' has no mask for task(s) {missing}: run the election step "
                                "for every expert and pass its mask file")
        extra = sorted(set(masks) - set(tasks))
        if extra:
            raise LedmergeError(f"merge method 'led' got masks for task(s) {extra} that are not among the experts "
                                f"{sorted(tasks)}: fix the task names")

    def select(self, base, experts, ctx):
        """TIES / DARE-TIES choose among the *masked* task vectors; a plain sum chooses nothing."""
        if self.combine == "sum" or any(ctx.masks.get(t) is None for t in experts):
            return {}
        return super().select(base, experts, ctx)

    def select_delta(self, task, delta, ctx):
        return self.combiner.select_delta(task, delta.mul_(ctx.masks[task]), ctx)

    def merge_deltas(self, deltas, ctx):
        masks = {t: ctx.masks.get(t) for t in deltas}
        scored = sorted(t for t, m in masks.items() if m is not None)
        if not scored:
            if self.unscored == "task_arithmetic":
                return self.plain.merge_deltas(deltas, ctx)
            return torch.zeros_like(next(iter(deltas.values())))  # keep θ_0
        if len(scored) != len(deltas):
            raise LedmergeError(f"tensor {ctx.name} has a mask for task(s) {scored} but not for "
                                f"{sorted(set(deltas) - set(scored))}: score all tasks with the same settings")
        lam = dict(zip(sorted(deltas), task_weights(self.lambdas, sorted(deltas))))
        return self.combiner.merge_deltas({t: d * masks[t] * lam[t] for t, d in deltas.items()}, ctx)
