"""SafeMERGE (Djuhera et al. 2025): per weight matrix, fall back to the aligned model where the merge's update has
left the safety subspace.

For each 2-D tensor, ΔW = θ_merged − θ_0 and the safety vector V = θ_aligned − θ_unaligned give the projection
C = V Vᵀ / ‖V‖_F and the similarity ρ = ⟨ΔW, CΔW⟩_F / (‖ΔW‖_F ‖CΔW‖_F). Where ρ < τ the layer becomes
(1 − β) θ_merged + β θ_aligned (β = `blend`, 1: the aligned model's layer); elsewhere it stays as merged, bit for
bit. A post-step (`PostStep`), so it follows any method, LED included.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SAFETY_PAIR, PostStep
from .params import Param


def projected_cosine(delta: Tensor, v: Tensor) -> float | None:
    """ρ = cos(ΔW, CΔW) with C = V Vᵀ / ‖V‖_F, in [0, 1] (C is positive semi-definite); None where it says nothing:
    no update (ΔW = 0) or no safety subspace (V = 0). An update orthogonal to V's columns has CΔW = 0: ρ = 0.

    C is never formed for a tall V (out > in, e.g. an embedding): C ΔW = V (Vᵀ ΔW) / ‖V‖_F costs out·in² there,
    and (V Vᵀ) ΔW costs out²·in otherwise, so the Gram matrix is min(out, in)² at most."""
    v_norm, d_norm = torch.linalg.matrix_norm(v), torch.linalg.matrix_norm(delta)
    if v_norm == 0 or d_norm == 0:
        return None
    projected = v @ (v.T @ delta) if v.shape[0] > v.shape[1] else (v @ v.T) @ delta
    projected /= v_norm
    p_norm = torch.linalg.matrix_norm(projected)
    if p_norm == 0:
        return 0.0
    return float((delta * projected).sum() / (d_norm * p_norm))


class SafeMerge(PostStep):
    """SafeMERGE, after any merge method: each weight matrix whose update leaves the safety subspace (similarity
    below `threshold`) takes the aligned model's layer, or a blend with it."""

    name = "safemerge"
    PARAMS = (
        Param("threshold", "number", 0.5, "τ: a weight matrix whose similarity ρ = cos(ΔW, CΔW) is below it is "
              "replaced (ρ is in [0, 1]; 0 replaces nothing)", lo=0, hi=1),
        Param("blend", "number", 1.0, "β: a replaced layer becomes (1 − β)·merged + β·aligned; 1 takes the aligned "
              "model's layer", lo=0, hi=1, lo_open=True),
        *SAFETY_PAIR,
    )
    threshold: float
    blend: float

    def apply(self, merged, models, ctx):
        if merged.dim() != 2:  # the test is per weight matrix: norms and biases stay as merged
            return merged
        rho = projected_cosine(merged - models["base"], self.safety_vector(models))
        replaced = rho is not None and rho < self.threshold
        ctx.report[self.name] = {"similarity": rho, "replaced": replaced}
        if not replaced:
            return merged
        return torch.lerp(merged, models[self.aligned].float(), self.blend)  # weight 1 gives the aligned bits

    def card_lines(self, records):
        replaced = sorted(n for n, r in records.items() if r["replaced"])
        similarity = lambda r: "—" if r["similarity"] is None else f"{r['similarity']:.4f}"
        rows = [f"| `{n}` | {similarity(r)} | {'yes' if r['replaced'] else 'no'} |" for n, r in sorted(records.items())]
        return [f"{len(replaced)} of {len(records)} weight matrices had a similarity below τ = {self.threshold} and "
                f"were replaced by {self.blend:g} × the aligned model's (`{self.aligned}`) layer"
                + ("" if self.blend == 1 else f" + {1 - self.blend:g} × the merged one") + ". A similarity of — "
                "means no update or no safety vector in that tensor (kept).", "",
                "| tensor | similarity ρ | replaced |", "|---|---:|---|", *rows, ""]
