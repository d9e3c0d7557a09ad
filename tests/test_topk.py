"""The chunked exact top-k (`top_k_mask_chunks`) against a sort, and merges that select in chunks against
whole-tensor selections: same masks, same bits."""

from __future__ import annotations

import pytest
import torch
from conftest import topk_mask

from ledmerge import topk
from ledmerge.merge import get_method
from ledmerge.merge.base import TensorContext
from ledmerge.topk import top_k_count, top_k_mask_chunks, top_r_mask


def by_sort(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest, ties to the lowest flat indices, by a stable descending sort: the rule stated plainly."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return mask


def cases():
    g = torch.Generator().manual_seed(0)
    bf16 = lambda n: (torch.randn(n, generator=g) * 0.02).bfloat16().float()
    return {
        "random": torch.randn(400, generator=g).abs(),
        "bf16 deltas (many ties)": (bf16(400) - bf16(400)).abs(),
        "few values": torch.randint(0, 4, (397,), generator=g).float(),
        "all equal": torch.full((300,), 0.5),
        "all zero": torch.zeros(300),
        "tiny and huge": torch.tensor([0.0, 1e-45, 3e38, float("inf"), 1e-45, 2.0] * 50),
    }


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("rate", [1e-3, 0.01, 0.3, 0.5, 0.77, 0.999])
def test_chunked_top_k_equals_a_stable_sort(name, rate):
    scores = cases()[name]
    n = scores.numel()
    k = top_k_count(n, rate)
    want = by_sort(scores, k)
    for chunk in (5, 64, n - 1, None):
        got = top_k_mask_chunks(lambda part: scores[part].clone(), n, k, chunk)
        assert torch.equal(got, want), (name, rate, chunk)
        assert int(got.sum()) == k
    assert torch.equal(top_r_mask(scores, rate), want)


def test_chunked_top_k_reads_each_chunk_in_flat_order():
    seen = []
    scores = torch.arange(10.0)
    top_k_mask_chunks(lambda part: (seen.append(part.start), scores[part].clone())[1], 10, 3, 4)
    assert seen == [0, 4, 8] * 2  # two passes (three when the bucket is larger than a chunk), each in flat order


def test_chunked_top_k_refuses_nan():
    scores = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    with pytest.raises(Exception, match="NaN"):
        top_k_mask_chunks(lambda part: scores[part].clone(), 4, 2, 2)


def test_negative_scores_fall_back_to_a_sort():
    s = torch.tensor([-1.0, -0.0, 3.0, -1.0, 0.0, -5.0, -1.0])
    for rate in (0.2, 0.5, 0.7):
        assert torch.equal(top_r_mask(s, rate), by_sort(s, top_k_count(7, rate)))



def tie_heavy_tensors() -> dict[str, torch.Tensor]:
    """Task vectors as the trim sees them, with many equal magnitudes and zeros: few levels of either sign, signed
    zeros, bf16 differences, a 2-D shape, sizes from 1 to above a 4096-entry boundary."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for n in (1, 2, 3, 7, 10, 64, 100, 257, 1000, 4099):
        levels = int(torch.randint(1, 5, (1,), generator=g))
        out[f"{n} entries, {2 * levels + 1} levels"] = torch.randint(-levels, levels + 1, (n,), generator=g) * 0.25
    bf16 = lambda n: (torch.randn(n, generator=g) * 0.02).bfloat16()
    out["bf16 differences"] = bf16(600) - bf16(600)
    out["signed zeros and ties"] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 0.0, 2.0, -2.0, -0.0] * 30)
    out["all zero"] = torch.zeros(50)
    out["13 x 11, mostly zero"] = torch.randint(-1, 2, (13, 11), generator=g) * (torch.rand(13, 11, generator=g) < 0.3)
    return {name: t if t.is_floating_point() else t.float() for name, t in out.items()}


DENSITIES = [1e-3, 0.01, 0.07, 0.1, 0.2, 0.3, 0.31, 1 / 3, 0.5, 0.77, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("density", DENSITIES + [float(d) for d in torch.rand(5, generator=torch.Generator().manual_seed(3))])
def test_top_r_mask_equals_the_plain_sort_reference(density):
    """The product's TopR (radix select, whole and chunked) against the tests' reference (`conftest.topk_mask`: a
    stable sort of |x| and ⌈density·n⌉ on the decimal density): same count, same entries, ties to the lowest index."""
    for name, x in tie_heavy_tensors().items():
        want = topk_mask(x, density)
        scores = x.abs().float().reshape(-1)
        n = scores.numel()
        assert top_k_count(n, density) == int(want.sum()), (name, density, "count")
        got = top_r_mask(x.abs(), density)
        assert got.shape == x.shape and torch.equal(got, want), (name, density, (got != want).nonzero().flatten())
        chunk = max(2, n // 5)  # several slices; with this many ties the threshold's bucket often outgrows one
        got = top_k_mask_chunks(lambda part, s=scores: s[part].clone(), n, int(want.sum()), chunk)
        assert torch.equal(got, want.reshape(-1)), (name, density, chunk)


@pytest.mark.parametrize("spec", [
    {"method": "ties", "density": 0.3},
    {"method": "ties", "density": {"a": 0.01, "b": 0.99, "c": 0.5}},
    {"method": "dare_ties", "drop": 0.9, "seed": 2},
    {"method": "dare_linear", "drop": {"a": 0.1, "b": 0.5, "c": 0.99}, "seed": 0},
    {"method": "led", "combine": "ties", "density": 0.4},
    {"method": "led", "combine": "dare_ties", "drop": 0.5},
])
def test_chunked_selection_equals_whole_tensor_selection(spec, monkeypatch):
    """Every method's `select` in slices of 7 entries keeps what a whole-tensor TopR / DARE draw keeps."""
    g = torch.Generator().manual_seed(1)
    shape = (13, 11)
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    experts = {t: (base.float() + torch.randn(shape, generator=g) * 0.01).bfloat16() for t in "abc"}
    masks = {t: torch.rand(shape, generator=g) < 0.6 for t in "abc"}
    method = get_method(spec)
    ctx = lambda: TensorContext("w", seed=getattr(method, "seed", 0), masks=dict(masks))
    monkeypatch.setattr(topk, "SELECT_CHUNK", 7)
    kept = method.select(base, experts, ctx())
    for t in "abc":
        delta = experts[t].float() - base.float()
        if spec["method"] == "led":
            delta = delta * masks[t]
        if "density" in spec:
            density = spec["density"][t] if isinstance(spec["density"], dict) else spec["density"]
            want = by_sort(delta.abs(), top_k_count(delta.numel(), density)).view(shape)
        else:
            drop = spec["drop"][t] if isinstance(spec["drop"], dict) else spec["drop"]
            want = torch.rand(shape, generator=ctx().generator(t)) >= drop  # one whole-tensor draw
        assert kept[t].dtype == torch.bool and torch.equal(kept[t], want), t
    monkeypatch.setattr(topk, "SELECT_CHUNK", 1 << 22)
    whole = method.merge_tensor("w", base.float(), {t: e.float() for t, e in experts.items()}, ctx())
    monkeypatch.setattr(topk, "SELECT_CHUNK", 7)
    chunked = method.merge_tensor("w", base.float(), {t: e.float() for t, e in experts.items()}, ctx())
    assert torch.equal(whole, chunked)
