"""Comparing two merged models tensor by tensor (ledmerge's and mergekit's), in bf16 ulps, and which differences
TIES' tie-breaking and zero-sum sign election explain."""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction


def ties_explained(base, experts, density: float):
    """Where ledmerge's and mergekit's TIES may legitimately differ, computed from the inputs alone:

    * an expert's |delta| equals its trim threshold (the k-th largest): which of the tied entries are
      kept is up to each tool (ledmerge: lowest flat indices; mergekit: torch.argsort's order);
    * the elected sum of the trimmed deltas is exactly 0 with nonzero entries: ledmerge elects no
      sign (keeps the base), mergekit elects +. bf16 deltas are discrete, so both happen often.
    Returns two bool tensors (tie, zero_sum) shaped like the base."""
    import torch

    b = base.float()
    tie = torch.zeros(b.shape, dtype=torch.bool)
    kept = []
    for e in experts:
        d = e.float() - b
        n = d.numel()
        k = min(n, math.ceil(Fraction(repr(float(density))) * n))
        mag = d.abs().reshape(-1)
        if k >= n:
            kept.append(d)
            continue
        thr = mag.kthvalue(n - k + 1).values
        at = mag == thr
        tie |= at.view(b.shape)
        keep = mag > thr
        keep[at.nonzero().flatten()[: k - int(keep.sum())]] = True  # ledmerge's rule: lowest indices
        kept.append(d * keep.view(b.shape))
    st = torch.stack(kept)
    zero_sum = (st.sum(0) == 0) & (st != 0).any(0)
    return tie, zero_sum


def compare(a_dir, b_dir, base_dir, experts=None, density=None) -> dict:
    """Max |a - b| in bf16 ulps of max(|a|, |b|), over every tensor; elements that differ; the fraction of
    a's elements that differ from the base (the comparison is not vacuous). With `experts` and
    `density` (TIES), also how many differing elements `ties_explained` does not account for."""
    import torch

    from ledmerge.checkpoint import ModelReader

    worst, differ, changed, total, worst_name = 0.0, 0, 0, 0, ""
    at_tie = at_zero = unexplained = 0
    dtypes = set()
    with contextlib.ExitStack() as stack:
        ra, rb, r0 = (stack.enter_context(ModelReader(d)) for d in (a_dir, b_dir, base_dir))
        rex = [stack.enter_context(ModelReader(d)) for d in (experts or [])]
        na, nb = set(ra.names), set(rb.names)
        if na != nb:
            return {"error": f"tensor names differ: only in ledmerge {sorted(na - nb)[:3]}, "
                             f"only in mergekit {sorted(nb - na)[:3]}"}
        for name in sorted(na):
            ta, tb, t0 = ra.read(name), rb.read(name), r0.read(name)
            dtypes.add((str(ta.dtype).removeprefix("torch."), str(tb.dtype).removeprefix("torch.")))
            if ta.shape != tb.shape:
                return {"error": f"{name}: shape {list(ta.shape)} vs {list(tb.shape)}"}
            a, b = ta.float(), tb.float()
            big = torch.maximum(a.abs(), b.abs())
            _, e = torch.frexp(big)  # big = m·2^e, m in [0.5, 1): bf16 ulp = 2^(e-1-7)
            ulp = torch.ldexp(torch.ones_like(big), (e - 8).clamp(min=-133))
            d = (a - b).abs()
            m = float((d / ulp).max()) if d.numel() else 0.0
            if m > worst:
                worst, worst_name = m, name
            nz = d != 0
            differ += int(nz.sum())
            changed += int((ta != t0).sum())
            total += d.numel()
            if rex and bool(nz.any()):
                tie, zero = ties_explained(t0, [r.read(name) for r in rex], density)
                at_tie += int((nz & tie).sum())
                at_zero += int((nz & zero & ~tie).sum())
                unexplained += int((nz & ~tie & ~zero).sum())
    out = {"max_ulp": worst, "worst_tensor": worst_name, "differ": differ, "elements": total,
           "changed_vs_base": changed / total, "dtypes": sorted(dtypes)}
    if rex:
        out.update(at_tie=at_tie, at_zero_sum=at_zero, unexplained=unexplained)
    return out
