"""Breadcrumbs, DELLA and SLERP against their formulas on hand-made tensors, their spec checks, and the streaming
driver on them (tests/test_merge_mergekit.py compares them with mergekit)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import topk_mask

from ledmerge.checkpoint import load_state_dict
from ledmerge.errors import LedmergeError
from ledmerge.merge import get_method, merge_models
from ledmerge.merge.base import TensorContext
from ledmerge.merge.consensus import elect_disjoint_mean
from ledmerge.merge.slerp import slerp_coefficients
from ledmerge.merge.sparsify import keep_probabilities

T = torch.tensor


def merge(spec, base, experts, name="w"):
    ctx = TensorContext(name, seed=spec.get("seed", 0))
    return get_method(spec).merge_tensor(name, base, experts, ctx)


# --- Breadcrumbs -------------------------------------------------------------------------------

def test_breadcrumbs_keeps_the_band_after_the_outliers():
    base = torch.zeros(10)
    tau = T([0.1, -0.9, 0.3, 1.0, -0.5, 0.2, 0.8, -0.4, 0.6, 0.7])  # |τ| ranks: 1.0, .9, .8, .7, .6, .5, .4, ...
    got = merge({"method": "breadcrumbs", "density": 0.5, "gamma": 0.2}, base, {"a": tau})
    band = T([0, 0, 0, 0, 1, 0, 1, 1, 1, 1], dtype=torch.bool)  # the 5 after the 2 largest: .8 .7 .6 .5 .4
    want = torch.where(band, tau, 0.0)
    assert torch.equal(got, want)
    # equal magnitudes: the lowest index ranks first, as in TIES' trim
    got = merge({"method": "breadcrumbs", "density": 0.5, "gamma": 0.25}, torch.zeros(4), {"a": T([1.0, -1.0, 1.0, 1.0])})
    assert torch.equal(got, T([0.0, -1.0, 1.0, 0.0]))


def test_breadcrumbs_combines_like_task_arithmetic_and_ties():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g)
    taus = {t: torch.randn(64, generator=g) for t in "abc"}
    experts = {t: base + tau for t, tau in taus.items()}
    weights = {"a": 2.0, "b": 0.5}

    def band(tau):  # 48 kept after the 4 largest
        return topk_mask(tau, 52 / 64) & ~topk_mask(tau, 4 / 64)

    spec = {"density": 0.75, "gamma": 0.0625, "scale": 0.8, "weights": weights}
    got = merge({"method": "breadcrumbs", **spec}, base, experts)
    want = base + 0.8 * sum(weights.get(t, 1.0) * taus[t] * band(taus[t]) for t in taus)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got = merge({"method": "breadcrumbs_ties", **spec}, base, experts)
    want = base + 0.8 * elect_disjoint_mean({t: taus[t] * band(taus[t]) for t in taus}, weights)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # gamma 0 is TIES' trim
    ties = merge({"method": "ties", "density": 0.3}, base, experts)
    assert torch.equal(merge({"method": "breadcrumbs_ties", "density": 0.3, "gamma": 0.0}, base, experts), ties)


def test_breadcrumbs_rescale_keeps_the_l1_norm():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(200, generator=g)
    got = merge({"method": "breadcrumbs", "density": 0.3, "gamma": 0.05, "rescale": True}, torch.zeros(200), {"a": tau})
    assert int((got != 0).sum()) == 60
    torch.testing.assert_close(got.abs().sum(), tau.abs().sum(), rtol=1e-6, atol=0)
    plain = merge({"method": "breadcrumbs", "density": 0.3, "gamma": 0.05}, torch.zeros(200), {"a": tau})
    torch.testing.assert_close(got, plain * (tau.abs().sum() / plain.abs().sum()), rtol=1e-6, atol=0)


def test_breadcrumbs_small_tensor_drops_fewer_outliers():
    """density 0.5 and gamma 0.5 of 3 entries round up to 2 + 2: the band keeps its 2, one outlier goes."""
    got = merge({"method": "breadcrumbs", "density": 0.5, "gamma": 0.5}, torch.zeros(3), {"a": T([3.0, 1.0, 2.0])})
    assert torch.equal(got, T([0.0, 1.0, 2.0]))


# --- DELLA -------------------------------------------------------------------------------------

def test_della_keep_probabilities_formula():
    mags = T([[0.3, 0.1, 0.5, 0.2, 0.4], [5.0, 4.0, 3.0, 2.0, 1.0]])
    got = keep_probabilities(mags, 0.5, 0.2)
    rank = T([[2, 0, 4, 1, 3], [4, 3, 2, 1, 0]], dtype=torch.float32)  # per row, smallest first
    torch.testing.assert_close(got, 0.3 + 0.4 * rank / 4, rtol=0, atol=1e-7)
    # a 1-D tensor is one row; equal magnitudes rank by position; one-entry rows keep `density`
    torch.testing.assert_close(keep_probabilities(T([1.0, 1.0, 1.0]), 0.5, 0.2), T([0.3, 0.5, 0.7]), rtol=0, atol=1e-7)
    torch.testing.assert_close(keep_probabilities(T([[2.0], [1.0]]), 0.5, 0.2), T([[0.5], [0.5]]))


def test_della_drops_by_rank_with_the_mean_density():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(400, 500, generator=g)
    ctx = TensorContext("w", seed=3)
    method = get_method({"method": "della_linear", "density": 0.4, "epsilon": 0.3, "seed": 3})
    ctx.kept = method.select(torch.zeros(400, 500), {"a": tau}, ctx)
    keep = ctx.kept["a"]
    assert abs(keep.float().mean().item() - 0.4) < 0.005
    order = tau.abs().argsort(dim=1)
    smallest, largest = keep.gather(1, order[:, :50]), keep.gather(1, order[:, -50:])
    assert abs(smallest.float().mean().item() - 0.13) < 0.02 and abs(largest.float().mean().item() - 0.67) < 0.02
    # the survivors carry the whole task vector's L1 norm
    got = method.merge_elements(torch.zeros(400, 500), {"a": tau}, ctx)
    assert torch.equal(got != 0, keep)
    torch.testing.assert_close(got.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
    plain = get_method({"method": "della_linear", "density": 0.4, "epsilon": 0.3, "seed": 3, "rescale": False})
    assert torch.equal(plain.merge_tensor("w", torch.zeros(400, 500), {"a": tau}, TensorContext("w", seed=3)),
                       tau * keep)


def test_della_is_seeded_per_tensor_and_task():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(32, 32, generator=g)
    experts = {t: base + torch.randn(32, 32, generator=g) for t in "ab"}
    spec = {"method": "della", "density": 0.5, "seed": 1}
    first = merge(spec, base, experts)
    assert torch.equal(first, merge(spec, base, experts))
    assert torch.equal(first, merge(spec, base, dict(reversed(list(experts.items())))))
    assert not torch.equal(first, merge({**spec, "seed": 2}, base, experts))
    assert not torch.equal(first, merge(spec, base, experts, name="other"))


def test_della_combines_like_ties_and_task_arithmetic():
    """With density 1 nothing is dropped: della is TIES without the trim, della_linear task arithmetic."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=g)
    experts = {t: base + torch.randn(50, generator=g) for t in "abc"}
    weights = {"a": 2.0, "c": 0.5}
    got = merge({"method": "della", "density": 1.0, "scale": 0.7, "weights": weights}, base, experts)
    assert torch.equal(got, merge({"method": "ties", "density": 1.0, "scale": 0.7, "weights": weights}, base, experts))
    got = merge({"method": "della_linear", "density": 1.0, "weights": weights}, base, experts)
    assert torch.equal(got, merge({"method": "task_arithmetic", "weights": weights}, base, experts))


# --- SLERP -------------------------------------------------------------------------------------

def test_slerp_formula():
    base, expert = T([2.0, 0.0]), T([0.0, 2.0])  # orthogonal: Ω = π/2
    for t in (0.0, 0.25, 0.5, 1.0):
        got = merge({"method": "slerp", "t": t}, base, {"x": expert})
        torch.testing.assert_close(got, T([2 * math.cos(t * math.pi / 2), 2 * math.sin(t * math.pi / 2)]))
    # the general formula, on 2-D tensors whose angle is neither 0 nor π/2
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    omega = math.acos(float((a * b).sum() / (a.norm() * b.norm())))
    want = (math.sin(0.3 * omega) * a + math.sin(0.7 * omega) * b) / math.sin(omega)
    torch.testing.assert_close(merge({"method": "slerp", "t": 0.7}, a, {"x": b}), want)


def test_slerp_falls_back_to_linear():
    a = T([1.0, 2.0, 3.0])
    for b in (a * 3 + 1e-4, -2 * a, torch.zeros(3)):  # colinear, antipodal, no direction
        assert slerp_coefficients(a, b, 0.3) == (0.7, 0.3)
        torch.testing.assert_close(merge({"method": "slerp", "t": 0.3}, a, {"x": b}), 0.7 * a + 0.3 * b)
    assert slerp_coefficients(a, T([1.0, 2.0, -3.0]), 0.3) != (0.7, 0.3)


def test_slerp_needs_exactly_one_expert(tiny_zoo, tmp_path):
    experts = {t: tiny_zoo[t] for t in ("safety", "math")}
    with pytest.raises(LedmergeError, match=r"^merge method 'slerp' interpolates the base and one expert, got 2 "
                                            r"experts \['math', 'safety'\]: use a config with one task") as info:
        merge_models(tiny_zoo["base"], experts, {"method": "slerp"}, tmp_path / "o")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


def test_slerp_config_with_one_task_is_valid(tmp_path):
    """The workflow merges every task, so SLERP's config has one: the base and that task are the endpoints."""
    from ledmerge.config import check, validate

    cfg = {"tasks": {"safety": {"model": "zoo", "calibration": {"source": "zoo"}, "rate": 0.1}},
           "merges": {"slerp": {"method": "slerp", "t": 0.3}}, "results": str(tmp_path / "results")}
    validate(cfg)
    check(cfg)


# --- specs and the driver ----------------------------------------------------------------------

@pytest.mark.parametrize("spec, match", [
    ({"method": "breadcrumbs", "density": 0.995}, r"density \+ gamma must be at most 1 .*: lower one of them"),
    ({"method": "breadcrumbs_ties", "density": {"a": 0.5, "b": 0.95}, "gamma": 0.1}, "density 0.95 and gamma 0.1"),
    ({"method": "breadcrumbs", "gamma": 1.0}, "gamma"),
    ({"method": "breadcrumbs", "density": 0.0}, "density"),
    ({"method": "breadcrumbs_ties", "weights": {"a": 0.0}}, "weights"),
    ({"method": "della", "density": 0.9}, r"density ± epsilon must lie inside \(0, 1\), got density 0.9 and "
                                          r"epsilon 0.15: lower epsilon below 0.1"),
    ({"method": "della_linear", "density": 0.1, "epsilon": 0.1}, "lower epsilon below 0.1"),
    ({"method": "della", "epsilon": -0.1}, "epsilon"),
    ({"method": "della", "rescale": "l1"}, "rescale"),
    ({"method": "slerp", "t": 1.5}, "'slerp': t must be"),
    ({"method": "slerp", "weights": {"a": 1.0}}, r"has no parameter\(s\) \['weights'\]"),
])
def test_bad_specs(spec, match):
    with pytest.raises(LedmergeError, match=match) as info:
        get_method(spec)
    assert "\n" not in str(info.value)


def test_per_task_density_must_cover_every_task():
    with pytest.raises(LedmergeError, match=r"density has no value for task\(s\) \['b'\]"):
        get_method({"method": "della", "density": {"a": 0.5}}).check_inputs(["a", "b"], None)


def test_streamed_slerp_equals_whole_tensor_merge(tiny_zoo, tmp_path, monkeypatch):
    """SLERP's coefficients come from the whole tensor even when the driver feeds it 37-element chunks
    (tests/test_checkpoint.py checks the task-vector methods the same way)."""
    import ledmerge.merge.driver as merge_driver

    monkeypatch.setattr(merge_driver, "CHUNK", 37)
    merge_models(tiny_zoo["base"], {"math": tiny_zoo["math"]}, {"method": "slerp", "t": 0.4}, tmp_path / "m")
    got, base, expert = (load_state_dict(d) for d in (tmp_path / "m", tiny_zoo["base"], tiny_zoo["math"]))
    method = get_method({"method": "slerp", "t": 0.4})
    for name, b in base.items():
        assert torch.equal(got[name], method.merge_tensor(name, b, {"math": expert[name]}, TensorContext(name))), name
