"""Sparsification: which entries of each task vector τ_t = θ_t − θ_0 a task-vector merge keeps, and how it rescales
the survivors, before the consensus (`consensus`) combines them. One small class per kind, by name in `SPARSIFIERS`:

- `none`: every entry (task arithmetic).
- `magnitude`: TIES' trim (Yadav et al. 2023): the ⌈density·n⌉ largest |τ_t|, by LED's TopR
  (`ledmerge.topk.top_r_mask`, computed slice by slice by `top_k_mask_chunks`; ties at the threshold go to the lowest
  flat indices).
- `dare`: DARE (Yu et al. 2024): drop each entry with probability p, divide the survivors by 1 − p.
- `breadcrumbs`: Model Breadcrumbs (Davari & Belilovsky 2024): a band of the magnitudes, without the outliers above
  it and the noise below it.
- `della`: DELLA (Deep et al. 2024): DARE's random drop with keep chances ranked by magnitude (MagPrune).

`LedMasks` (LED-Merging) restricts each task vector to its disjoint mask M_t first and scales it by λ_t, then hands
it to one of these, as LED's `combine` says.

A kind declares its parameters with `Param`s: `PARAMS` come first among a method's parameters, `RESCALE` (its rescale
switch) after λ and the consensus' weights (`task_vectors.preset`). The method checks each value against its
declaration; the kind checks how they go together (`check`). A merge calls `select` once per task and tensor, on the
whole tensor (the survivors as a flat bool mask, or None: all; a number the rescale needs from the whole tensor goes
into `ctx.scales[task]`), and `apply` elementwise, on flat chunks when the driver streams. Random drops are seeded per
(seed, tensor, task) by `ctx.generator`, and drawn on the CPU generator whatever the device, so a CUDA merge drops the
same entries.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import ClassVar

import torch
from torch import Tensor

from .. import topk
from ..errors import LedmergeError
from ..topk import top_k_count, top_k_mask, top_k_mask_chunks
from .base import TensorContext
from .numerics import sum64
from .params import Param, each_value, per_task

log = logging.getLogger(__name__)

SEED = Param("seed", "int", 0, "seed of the random drops (drawn per seed, tensor and task)")
# Entries from which a tensor (or a chunk of one) is worth `ledmerge.kernels`: numba's import and the kernels' loading
# cost ~0.4 s per process, once; the toy zoo's tensors never pay it.
FUSED_FROM = 1 << 16
RANK_BLOCK = 1 << 22  # entries DELLA ranks at once: bounds the sort's int64 scratch on embedding-sized tensors


class DeltaChunks:
    """One tensor's task vector τ = expert − base, read on demand: `delta(part)` is a fresh float32 copy of the flat
    slice `part` (the callee may overwrite it), `delta.whole()` the whole task vector in its shape."""

    def __init__(self, expert: Tensor, base: Tensor):
        self.shape, self._expert, self._base = base.shape, expert.reshape(-1), base.reshape(-1)
        self._mask = None

    def __call__(self, part: slice) -> Tensor:
        delta = self._expert[part].to(torch.float32, copy=True).sub_(self._base[part].float())
        return delta if self._mask is None else delta.mul_(self._mask[part])

    def whole(self) -> Tensor:
        return self(slice(None)).view(self.shape)

    def abs_slice(self, part: slice) -> Tensor:
        """|τ| of the flat slice `part`, float32 (a fresh tensor)."""
        return self(part).abs_()

    def top_k_abs(self, k: int) -> Tensor:
        """Flat bool mask of the k largest |τ| (ties at the threshold to the lowest flat indices): fused passes over
        the inputs (`ledmerge.kernels`) for whole bf16 or float32 CPU tensors, else `top_k_mask_chunks` over slices."""
        n = math.prod(self.shape)
        if (self._mask is None and isinstance(self._expert, Tensor) and isinstance(self._base, Tensor)
                and n >= FUSED_FROM):
            from .. import kernels

            if kernels.supports(self._expert, self._base):
                return kernels.top_k_abs_delta_mask(self._expert, self._base, k)
        return top_k_mask_chunks(self.abs_slice, n, k)

    def masked(self, mask: Tensor) -> DeltaChunks:
        """The task vector times a bool mask of its shape (M_t ⊙ τ_t), read the same way."""
        out = copy.copy(self)
        out._mask = mask.reshape(-1)
        return out


class Sparsifier:
    """One kind of sparsification, holding its parameters' values (checked by the method that declares them, which
    `method` names in errors)."""

    name: ClassVar[str]
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    RESCALE: ClassVar[tuple[Param, ...]] = ()
    selects = True  # False: `select` always keeps everything, and the method skips it

    def __init__(self, method: str, **values):
        assert set(values) == {p.name for p in self.parameters()}, (type(self).__name__, sorted(values))
        self.method = method
        for key, value in values.items():
            setattr(self, key, value)
        self.check()

    @classmethod
    def parameters(cls) -> tuple[Param, ...]:
        return (*cls.PARAMS, *cls.RESCALE)

    @classmethod
    def default(cls, key: str):
        return next(p.default for p in cls.parameters() if p.name == key)

    def check(self) -> None:
        """Refuse values that are each allowed but not together (one-line LedmergeError naming the method)."""

    def select(self, task: str, delta: DeltaChunks, n: int, ctx: TensorContext) -> Tensor | None:
        """The entries of the n-entry task vector that survive (a flat bool mask), or None: all of them.

        The task vector comes in flat slices, `delta(part)`, so no whole-tensor float32 copy is ever needed (an 8B
        model's LM head is 525M entries); `delta.whole()` is all of it at once, for kinds that need it (DELLA's
        per-row ranks). A rescale of the survivors goes into `ctx.scales[task]`."""
        return None

    def apply(self, task: str, delta: Tensor, ctx: TensorContext) -> Tensor:
        """The task vector restricted to the entries `select` kept, times the rescale it chose, if any (elementwise:
        `delta` may be a flat chunk, `ctx` its `chunk`)."""
        kept = delta * ctx.kept[task] if task in ctx.kept else delta
        return kept * ctx.scales[task] if task in ctx.scales else kept

    def apply_terms(self, task: str, ctx: TensorContext) -> tuple[Tensor | None, float | None, float | None] | None:
        """What `apply` does, as (kept mask, factor, divisor), each None when not applied, for a fused kernel
        (`ledmerge.kernels.ties_elements`); None when `apply` is not that (a subclass' own)."""
        if type(self).apply is not Sparsifier.apply:
            return None
        return ctx.kept.get(task), ctx.scales.get(task), None


class NoSparsify(Sparsifier):
    """Every entry of every task vector."""

    name = "none"
    selects = False


class Magnitude(Sparsifier):
    """TIES' trim: the largest-magnitude entries of each task vector."""

    name = "magnitude"
    PARAMS = (
        Param("density", "number_or_per_task", 0.2, "fraction of each task vector τ_t kept, by magnitude (TIES "
              "paper: top 20%), or one per task", lo=0, hi=1, lo_open=True, per_layer=True),
    )
    density: float | dict[str, float]

    def select(self, task, delta, n, ctx):
        k = top_k_count(n, per_task(self.density, task))
        return None if k >= n else delta.top_k_abs(k)


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


class Dare(Sparsifier):
    """DARE: drop each entry at random, divide the survivors by 1 − p. The drops ignore the values."""

    name = "dare"
    PARAMS = (
        Param("drop", "number_or_per_task", 0.9, "p, the probability of dropping each task-vector entry (DARE paper: "
              "0.9 is harmless for SFT deltas), or one per task", lo=0, hi=1, hi_open=True, per_layer=True),
        SEED,
    )
    RESCALE = (Param("rescale", "bool", True, "scale the kept entries by 1/(1 − p); false is plain random pruning, "
                     "not DARE"),)
    drop: float | dict[str, float]
    rescale: bool

    def check(self):
        if not self.rescale:
            log.warning("%s with rescale: false is random pruning, not DARE: the merged task vectors "
                        "shrink by a factor 1 - drop", self.method)

    def select(self, task, delta, n, ctx):
        """`delta` is never computed."""
        return dare_keep(n, per_task(self.drop, task), ctx.generator(task))

    def apply(self, task, delta, ctx):
        return dare_rescaled(delta, ctx.kept[task], per_task(self.drop, task), self.rescale)

    def apply_terms(self, task, ctx):
        return ctx.kept[task], None, (1 - per_task(self.drop, task)) if self.rescale else None


def l1_rescale(magnitudes: Tensor, keep: Tensor, ctx: TensorContext, task: str) -> None:
    """Record in `ctx.scales[task]` the factor that gives the kept entries the L1 norm of the whole task vector
    (`magnitudes` = |τ_t|): mergekit's `rescale`, one number per tensor, so the chunks need no per-entry
    probabilities. Below 1e-7 either norm is noise and nothing is rescaled, as mergekit does."""
    before, after = sum64(magnitudes), sum64(magnitudes, keep)
    if before >= 1e-7 and after >= 1e-7:
        ctx.scales[task] = before / after


class Breadcrumbs(Sparsifier):
    """Model Breadcrumbs: per tensor, rank |τ_t| and keep the band after the `gamma` fraction of largest entries,
    `density` of the tensor long. The largest entries are outliers that one task pushes far and that collide with the
    other tasks; the smallest are noise. The ranking is TIES' exact-count, lowest-index-first order
    (`ledmerge.topk.top_k_mask`), so the band is two masks of it."""

    name = "breadcrumbs"
    PARAMS = (
        Param("density", "number_or_per_task", 0.9, "fraction of each task vector τ_t kept: the ⌈density·n⌉ entries "
              "that follow the dropped outliers by magnitude; or one per task", lo=0, hi=1, lo_open=True),
        Param("gamma", "number", 0.01, "fraction of the largest-magnitude entries of τ_t dropped first, ⌈gamma·n⌉ "
              "(0: none, which is TIES' trim); density + gamma must be at most 1", lo=0, hi=1, hi_open=True),
    )
    RESCALE = (Param("rescale", "bool", False, "scale each kept band to the L1 norm of its whole task vector "
                     "(mergekit's rescale)"),)
    density: float | dict[str, float]
    gamma: float
    rescale: bool

    def check(self):
        for density in each_value(self.density):
            if density + self.gamma > 1:
                raise LedmergeError(f"merge method '{self.method}': density + gamma must be at most 1 (the kept band "
                                    f"follows the dropped outliers), got density {density} and gamma {self.gamma}: "
                                    "lower one of them")

    def select(self, task, delta, n, ctx):
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


def keep_probabilities(magnitudes: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's p_r for every entry of `magnitudes` (float32, its shape), ranked within rows (the first axis; the rest
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


class Della(Sparsifier):
    """DELLA: within each row of a task vector (a 1-D tensor is one row), the entries are ranked by |τ_t|, smallest
    first, and the entry of rank r of n is kept with probability p_r = (density − ε) + 2ε · r / (n − 1) (see
    `keep_probabilities`): the smallest keeps density − ε, the largest density + ε, and the row keeps `density` on
    average. The survivors are rescaled to the L1 norm of the whole task vector (mergekit's rescale: one number per
    tensor, where the paper divides each survivor by its own p_r)."""

    name = "della"
    PARAMS = (
        Param("density", "number_or_per_task", 0.5, "mean fraction of each task vector τ_t kept (1: nothing dropped), "
              "or one per task", lo=0, hi=1, lo_open=True),
        Param("epsilon", "number", 0.15, "ε, half the spread of the keep probabilities over a row, from density − ε "
              "(smallest |τ|) to density + ε (largest); both ends must lie inside (0, 1)", lo=0, hi=1, hi_open=True),
        SEED,
    )
    RESCALE = (Param("rescale", "bool", True, "scale the survivors of each task vector to its L1 norm (mergekit's "
                     "rescale); false leaves them shrunk by about the density"),)
    density: float | dict[str, float]
    epsilon: float
    rescale: bool

    def check(self):
        for density in each_value(self.density):
            if density < 1 and not (0 < density - self.epsilon and density + self.epsilon < 1):
                raise LedmergeError(f"merge method '{self.method}': the keep probabilities density ± epsilon must lie "
                                    f"inside (0, 1), got density {density} and epsilon {self.epsilon}: lower epsilon "
                                    f"below {min(density, 1 - density):g}")

    def select(self, task, delta, n, ctx):
        """Keep each entry with its ranked probability."""
        density = per_task(self.density, task)
        if density >= 1:
            return None
        magnitudes = delta.whole().abs_()  # whole: the ranks are per row
        uniform = torch.rand(delta.shape, generator=ctx.generator(task)).to(magnitudes.device)
        keep = uniform < keep_probabilities(magnitudes, density, self.epsilon)
        if self.rescale:
            l1_rescale(magnitudes, keep, ctx, task)
        return keep


SPARSIFIERS: dict[str, type[Sparsifier]] = {cls.name: cls for cls in (NoSparsify, Magnitude, Dare, Breadcrumbs, Della)}


class LedMasks(Sparsifier):
    """LED-Merging's masks: each task vector restricted to its disjoint mask M_t (`ctx.masks`, from the election
    step) and scaled by λ_t, then sparsified by `then` (one of `SPARSIFIERS`, choosing among the masked entries). A
    tensor without masks (None) selects nothing here: the method decides what it becomes."""

    name = "led"
    PARAMS = (
        Param("lambdas", "task_numbers", None, "per-task λ_t scaling M_t ⊙ τ_t; unlisted tasks get 1.0 (paper "
              "default)", per_layer=True),
    )
    lambdas: dict[str, float] | None

    def __init__(self, method: str, then: Sparsifier, **values):
        self.then = then
        super().__init__(method, **values)

    @property
    def selects(self) -> bool:
        return self.then.selects

    def select(self, task, delta, n, ctx):
        mask = ctx.masks.get(task)
        return None if mask is None else self.then.select(task, delta.masked(mask), n, ctx)

    def apply(self, task, delta, ctx):
        return self.then.apply(task, delta * ctx.masks[task] * (self.lambdas or {}).get(task, 1.0), ctx)
