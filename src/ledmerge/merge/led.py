"""LED-Merging, merge step: θ = θ_0 + Σ_t λ_t (M_t ⊙ τ_t) with the disjoint masks M_t of the election.

The masks only decide *which* entries of each task vector survive (`sparsify.LedMasks`); how the survivors are
combined is the task-vector merge's (`task_vectors`): `combine` names the preset whose sparsification and consensus
follow the masks (sum = task arithmetic, or TIES / DARE-TIES), so LED adds no arithmetic of its own. λ_t scales task
t's masked vector before it is combined; it is not a TIES weight, because after Disjoint at most one task is non-zero
per weight and TIES' weighted mean would divide λ_t back out (λ = {a: 0.5, c: 0.25} would merge both at 1), so the
consensus runs unweighted. Tensors the location step did not score have no mask and follow `unscored`: keep the base
(`base`) or take plain task arithmetic (`task_arithmetic`).
"""

from __future__ import annotations

import torch

from ..errors import LedmergeError
from .consensus import CONSENSUS
from .params import Param, check_task_keys
from .sparsify import Dare, LedMasks, Magnitude, NoSparsify
from .task_vectors import TaskVectorMethod

# combine -> (the sparsification after the masks, the consensus): the pairs of task_arithmetic, ties and dare_ties
COMBINE = {"sum": (NoSparsify, "sum"), "ties": (Magnitude, "ties"), "dare_ties": (Dare, "ties")}
UNSET = {"density": 1.0}  # unset density under combine: ties keeps all the masks kept (not TIES' 0.2)


class Led(TaskVectorMethod):
    """LED-Merging: each task vector restricted to its disjoint mask M_t, scaled by λ_t, then combined."""

    name = "led"
    uses_masks = True
    PARAMS = (
        *LedMasks.PARAMS,
        Param("unscored", "choice", "base", "tensors without masks (not scored): keep the base, or take plain task "
              "arithmetic", choices=("base", "task_arithmetic")),
        Param("combine", "choice", "sum", "how the masked task vectors are combined: summed, or by TIES / DARE-TIES",
              choices=tuple(COMBINE)),
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
        kind, consensus = COMBINE[self.combine]
        own = {p.name for p in self.PARAMS}
        values = {}
        for p in kind.parameters():  # LED's value; unset: `UNSET`'s, else the kind's default (DARE's rescale: true)
            value = getattr(self, p.name) if p.name in own else None
            values[p.name] = UNSET.get(p.name, p.default) if value is None else value
            if p.name in own:
                setattr(self, p.name, values[p.name])  # the recipe records what the merge uses
        self.sparsifier = LedMasks(self.name, kind(self.name, **values), lambdas=self.lambdas)
        self.consensus = CONSENSUS[consensus]

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

    def merge_deltas(self, deltas, ctx):
        scored = sorted(t for t in deltas if ctx.masks.get(t) is not None)
        if not scored:
            if self.unscored == "task_arithmetic":
                return CONSENSUS["sum"].combine(deltas, self.lambdas) * self.scale
            return torch.zeros_like(next(iter(deltas.values())))  # keep θ_0
        if len(scored) != len(deltas):
            raise LedmergeError(f"tensor {ctx.name} has a mask for task(s) {scored} but not for "
                                f"{sorted(set(deltas) - set(scored))}: score all tasks with the same settings")
        return super().merge_deltas(deltas, ctx)
