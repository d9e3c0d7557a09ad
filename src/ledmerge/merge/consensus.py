"""Consensus: how a task-vector merge combines the sparsified task vectors, by name in `CONSENSUS`.

- `sum`: the weighted sum Σ_t w_t τ_t (task arithmetic, and the `_linear` presets).
- `ties`: TIES' sign election and disjoint mean (Yadav et al. 2023, `elect_disjoint_mean`): per weight, the sign of
  Σ_t w_t τ_t, then the weighted mean of the w_t τ_t that agree with it.

Each declares its per-task `weights`; the disjoint mean divides by them, so its must be > 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .numerics import weighted_sum
from .params import Param, task_weights


def elect_disjoint_mean(deltas: dict[str, Tensor], weights: Mapping[str, float] | None = None) -> Tensor:
    """Per weight: elect the sign of Σ_t w_t δ_t, then average the w_t δ_t that agree with it.

    The mean divides by the summed weights of the agreeing tasks (all 1: a plain mean over them),
    zeros never count as agreeing, and a zero sum elects no sign (the weight keeps the base value).
    """
    tasks = sorted(deltas)
    stacked = torch.stack([deltas[t] for t in tasks])
    if weights:
        w = torch.tensor(task_weights(weights, tasks), dtype=torch.float32, device=stacked.device)
        w = w.view(-1, *([1] * (stacked.dim() - 1)))
        stacked = stacked * w
    agree = (stacked * stacked.sum(0).sign_()) > 0  # shares the sum's sign: a zero sum elects nothing, zeros never agree
    total = (stacked * agree).sum(0)
    if not weights:
        return total.div_(agree.sum(0, dtype=torch.float32).clamp_(min=1))  # counts are exact in float32
    divisor = (w * agree).sum(0)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


@dataclass(frozen=True)
class Consensus:
    """One way to combine: `combine(task vectors, weights)`, and its `weights` parameter's declaration."""

    name: str
    combine: Callable[[dict[str, Tensor], Mapping[str, float] | None], Tensor]
    weights: Param


CONSENSUS: dict[str, Consensus] = {c.name: c for c in (
    Consensus("sum", weighted_sum, Param("weights", "task_numbers", None, "per-task w_t; unlisted tasks get 1.0")),
    Consensus("ties", elect_disjoint_mean,
              Param("weights", "task_numbers", None, "per-task w_t (> 0: the weighted disjoint mean divides by them); "
                    "unlisted tasks get 1.0", lo=0, lo_open=True)),
)}
