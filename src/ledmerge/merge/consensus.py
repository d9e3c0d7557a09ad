"""Consensus: how a task-vector merge combines the sparsified task vectors, by name in `CONSENSUS`.

- `sum`: the weighted sum Σ_t w_t τ_t (task arithmetic, and the `_linear` presets).
- `ties`: TIES' sign election and disjoint mean (Yadav et al. 2023, `elect_disjoint_mean`): per weight, the sign of
  Σ_t w_t τ_t, then the weighted mean of the w_t τ_t that agree with it, or with `normalize: false` (mergekit's
  setting of that name) their sum: then the weights scale the update, not only the sign vote.

Each declares its parameters (`params`): the per-task `weights` first, then its own switches. The disjoint mean
divides by the weights, so with `normalize` they must be > 0 (`check`); the sum takes any sign.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LedmergeError
from .numerics import weighted_sum
from .params import Param, each_value, task_weights


def elect_disjoint_mean(deltas: dict[str, Tensor], weights: Mapping[str, float] | None = None, *,
                        normalize: bool = True) -> Tensor:
    """Per weight: elect the sign of Σ_t w_t δ_t, then average the w_t δ_t that agree with it.

    The mean divides by the summed weights of the agreeing tasks (all 1: a plain mean over them); without
    `normalize` it is their sum. Zeros never count as agreeing, and a zero sum elects no sign (the weight keeps
    the base value).
    """
    tasks = sorted(deltas)
    stacked = torch.stack([deltas[t] for t in tasks])
    if weights:
        w = torch.tensor(task_weights(weights, tasks), dtype=torch.float32, device=stacked.device)
        w = w.view(-1, *([1] * (stacked.dim() - 1)))
        stacked = stacked * w
    agree = (stacked * stacked.sum(0).sign_()) > 0  # shares the sum's sign: a zero sum elects nothing, zeros never agree
    total = (stacked * agree).sum(0)
    if not normalize:
        return total
    if not weights:
        return total.div_(agree.sum(0, dtype=torch.float32).clamp_(min=1))  # counts are exact in float32
    divisor = (w * agree).sum(0)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


@dataclass(frozen=True)
class Consensus:
    """One way to combine: `combine(task vectors, weights, **options)`, and its parameters' declarations (`params`:
    `weights`, then the options `combine` takes by keyword)."""

    name: str
    combine: Callable[..., Tensor]
    params: tuple[Param, ...]

    @property
    def options(self) -> tuple[Param, ...]:
        """The parameters besides `weights`."""
        return self.params[1:]

    def check(self, method: str, weights: Mapping | None, **options) -> None:
        """The weighted disjoint mean divides by the weights: with `normalize` they must be > 0."""
        if options.get("normalize") and weights and any(v <= 0 for v in each_value(weights)):
            raise LedmergeError(f"merge method '{method}': weights must be > 0 with normalize: true (the disjoint "
                                f"mean divides by them), got {dict(weights)!r}: raise them or set normalize: false")


WEIGHTS_HELP = "per-task w_t, or per task one per decoder layer then one for the other tensors; unlisted tasks get 1.0"
CONSENSUS: dict[str, Consensus] = {c.name: c for c in (
    Consensus("sum", weighted_sum, (Param("weights", "task_numbers", None, WEIGHTS_HELP, per_layer=True),)),
    Consensus("ties", elect_disjoint_mean, (
        Param("weights", "task_numbers", None, WEIGHTS_HELP + " (> 0 with normalize: the weighted disjoint mean "
              "divides by them)", per_layer=True),
        Param("normalize", "bool", True, "divide by the summed weights of the agreeing tasks (TIES' disjoint mean, "
              "mergekit's default for ties); false: their weighted sum, as mergekit's normalize: false"))),
)}
