"""SafeMERGE (Djuhera et al. 2025): per weight matrix, fall back to the aligned model where the merge's update has
left the safety subspace.

The paper fine-tunes the aligned (instruct) model on a task and tests that fine-tune's update, ΔW = θ_f − θ_aligned
(a LoRA update on top of the aligned model), against the safety subspace C = V Vᵀ / ‖V‖_F of the safety vector
V = θ_aligned − θ_unaligned. Here the merge plays θ_f, so for each 2-D tensor

    ΔW = θ_merged − θ_aligned,   ρ = ⟨ΔW, CΔW⟩_F / (‖ΔW‖_F ‖CΔW‖_F).

ΔW is what the merge added to the aligned model: on task arithmetic with the aligned expert at weight 1 (λ = 1)
it is exactly the other experts' task vectors, the merge without the aligned task. The update from the base,
θ_merged − θ_0, would hold V itself, which lies in C's range by construction and inflates ρ whatever the other
experts do (on the default experiment it replaced none of 16 matrices). "The merge rerun without the aligned
task" is not what a post-step can compute: TIES' election and LED's masks let the aligned task change the
others' entries, and a post-step sees the merged tensor and the models, not the method. θ_merged − θ_aligned
needs only those, tensor by tensor, and is the paper's ΔW whatever the method did with V (a trimmed or scaled
share of V shows up as the part of V the merge did not keep). With `aligned: base` it is the update from the base.

C is positive semi-definite, so ρ is blind to ΔW's sign: a merge that gives back part of V (λ < 1, a trimmed V)
has a −V share in ΔW, which counts as inside the subspace. Where ρ < τ the layer becomes
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
    # ⟨ΔW, CΔW⟩ = ‖VᵀΔW‖²_F / ‖V‖_F ≥ 0 exactly; in float32 an update (nearly) orthogonal to V leaves a CΔW of
    # rounding error, whose cosine with ΔW can come out a few hundredths either side of 0: clamped into [0, 1]
    return min(1.0, max(0.0, float((delta * projected).sum() / (d_norm * p_norm))))


class SafeMerge(PostStep):
    """SafeMERGE, after any merge method: each weight matrix whose update from the aligned model leaves the safety
    subspace (similarity below `threshold`) takes the aligned model's layer, or a blend with it."""

    name = "safemerge"
    PARAMS = (
        Param("threshold", "number", 0.5, "τ: a weight matrix whose similarity ρ = cos(ΔW, CΔW) of its update from the "
              "aligned model, ΔW = θ_merged − θ_aligned, is below it is replaced (ρ is in [0, 1]; 0 replaces "
              "nothing)", lo=0, hi=1),
        Param("blend", "number", 1.0, "β: a replaced layer becomes (1 − β)·merged + β·aligned; 1 takes the aligned "
              "model's layer", lo=0, hi=1, lo_open=True),
        *SAFETY_PAIR,
    )
    threshold: float
    blend: float

    def apply(self, merged, models, ctx):
        if merged.dim() != 2:  # the test is per weight matrix: norms and biases stay as merged
            return merged
        aligned = models[self.aligned].float()
        update = merged - aligned  # ΔW = θ_merged − θ_aligned: what the merge added to the aligned model
        rho = projected_cosine(update, self.safety_vector(models))
        replaced = rho is not None and rho < self.threshold
        ctx.report[self.name] = {"similarity": rho, "replaced": replaced,
                                 "update_norm": float(torch.linalg.matrix_norm(update))}
        if not replaced:
            return merged
        return torch.lerp(merged, aligned, self.blend)  # weight 1 gives the aligned bits

    def card_lines(self, records):
        replaced = sorted(n for n, r in records.items() if r["replaced"])
        similarity = lambda r: "—" if r["similarity"] is None else f"{r['similarity']:.4f}"
        rows = [f"| `{n}` | {similarity(r)} | {'yes' if r['replaced'] else 'no'} |" for n, r in sorted(records.items())]
        return [f"The similarity ρ = cos(ΔW, CΔW) is that of the merge's update from the aligned model, ΔW = "
                f"θ_merged − θ_{self.aligned}, with the safety subspace C of V = θ_{self.aligned} − θ_{self.unaligned}. "
                f"{len(replaced)} of {len(records)} weight matrices had a similarity below τ = {self.threshold} and "
                f"were replaced by {self.blend:g} × the aligned model's (`{self.aligned}`) layer"
                + ("" if self.blend == 1 else f" + {1 - self.blend:g} × the merged one") + ". A similarity of — "
                "means no update (the merged layer is the aligned one) or no safety vector in that tensor (kept).", "",
                "| tensor | similarity ρ | replaced |", "|---|---:|---|", *rows, ""]
