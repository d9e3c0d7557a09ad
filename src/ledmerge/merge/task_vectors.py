"""The task-vector merge, one method for the family: θ = θ_0 + λ · consensus({sparsify(τ_t)}) with τ_t = θ_t − θ_0.

As mergekit's generalized task arithmetic, a method is a sparsification (`sparsify`: none, magnitude, dare,
breadcrumbs, della) and a consensus (`consensus`: sum or ties); `preset` builds one, and the registry names the
familiar ones (task_arithmetic is none + sum, ties magnitude + ties, dare_linear dare + sum, ...). LED (`led`) puts
its masks in front of the sparsification and picks the pair with its `combine`.

A merge is split as the driver streams it (`MergeMethod`): `select` runs the sparsification's choice on each whole
task vector, `merge_elements` applies it and combines, elementwise.
"""

from __future__ import annotations

from typing import ClassVar

from .base import MergeMethod
from .consensus import CONSENSUS, Consensus
from .params import Param, task_weights
from .sparsify import FUSED_FROM, SPARSIFIERS, DeltaChunks, Sparsifier

SCALE = Param("scale", "number", 1.0, "λ, multiplies the merged task vector")


class TaskVectorMethod(MergeMethod):
    """θ = θ_0 + λ · consensus({sparsify(τ_t)}): `sparsifier` keeps and rescales the entries of each task vector,
    `consensus` combines them with the per-task `weights`, λ is `scale`. A preset names the pair in `SPARSIFY` and
    `CONSENSUS` (`preset`); LED builds its own."""

    SPARSIFY: ClassVar[type[Sparsifier]]
    CONSENSUS: ClassVar[Consensus]
    scale: float
    weights: dict[str, float] | None = None
    sparsifier: Sparsifier
    consensus: Consensus

    def __post_init__(self):
        self.check_params()
        self.sparsifier = self.SPARSIFY(self.name, **{p.name: getattr(self, p.name) for p in self.SPARSIFY.parameters()})
        self.consensus = self.CONSENSUS
        self.consensus.check(self.name, self.weights, **self.consensus_options())

    def consensus_options(self) -> dict:
        """The consensus' own parameters (`Consensus.options`: TIES' normalize); a method that does not declare one
        (LED) takes its default."""
        return {p.name: getattr(self, p.name, p.default) for p in self.consensus.options}

    def select(self, base, experts, ctx):
        """Each task's choice, the tasks side by side when the driver lends its pool (`ctx.pool`): one here, the
        others there."""
        if not self.sparsifier.selects:
            return {}
        tasks = sorted(experts)
        choose = lambda t: self.sparsifier.select(t, DeltaChunks(experts[t], base), base.numel(), ctx)
        others = [ctx.pool.submit(choose, t) for t in tasks[1:]] if ctx.pool is not None else []
        chosen = [choose(tasks[0]), *(f.result() for f in others)] if others else [choose(t) for t in tasks]
        return {t: keep.to(base.device).view(base.shape) for t, keep in zip(tasks, chosen) if keep is not None}

    def merge_elements(self, base, experts, ctx):
        fused = self.fused_elements(base, experts, ctx)
        if fused is not None:
            return fused
        return base + self.merge_deltas({t: e - base for t, e in experts.items()}, ctx)

    def fused_elements(self, base, experts, ctx):
        """TIES' consensus on the CPU in one fused pass (`ledmerge.kernels.ties_elements`, the same bits), or None
        where it does not apply (another consensus or sparsification step, a GPU)."""
        if self.consensus.name != "ties" or base.device.type != "cpu" or base.numel() < FUSED_FROM:
            return None
        tasks = sorted(experts)
        terms = [self.sparsifier.apply_terms(t, ctx) for t in tasks]
        if any(term is None for term in terms):
            return None
        from .. import kernels

        kept, mul, div = zip(*terms)
        return kernels.ties_elements(base, [experts[t] for t in tasks], list(kept), list(mul), list(div),
                                     task_weights(self.weights, tasks) if self.weights else None,
                                     self.consensus_options()["normalize"], self.scale)

    def merge_deltas(self, deltas, ctx):
        """λ · consensus of the task vectors `deltas` (elementwise, given what `select` chose)."""
        sparse = {t: self.sparsifier.apply(t, d, ctx) for t, d in deltas.items()}
        return self.consensus.combine(sparse, self.weights, **self.consensus_options()) * self.scale


def preset(name: str, sparsify: str, consensus: str, doc: str) -> type[TaskVectorMethod]:
    """The task-vector method `name`: the sparsification `sparsify` (a key of `SPARSIFIERS`) and the consensus
    `consensus` (of `CONSENSUS`); `doc` is its docstring (the reference docs and the README's method table show it).
    Its parameters are the sparsification's, λ (`scale`), the consensus' (`weights`, then TIES' `normalize`), then
    the sparsification's rescale switch, if any."""
    kind, combination = SPARSIFIERS[sparsify], CONSENSUS[consensus]
    return type(name, (TaskVectorMethod,), {
        "__doc__": doc, "__module__": __name__, "name": name, "SPARSIFY": kind, "CONSENSUS": combination,
        "PARAMS": (*kind.PARAMS, SCALE, *combination.params, *kind.RESCALE)})
