"""Our baselines agree with mergekit 0.1.5, the reference implementation, configured identically.

Configuration notes (what makes the two compute the same thing):
- task_arithmetic: mergekit's default normalize is false, so θ_0 + lambda·Σ w_t τ_t is ours with
  scale = lambda and the same per-task weights.
- ties: mergekit divides by the summed weights of the agreeing models (`normalize: true`, its default),
  which with our weights is our weighted disjoint mean; `rescale: false` (its default for ties).
  Its trim keeps int(density·n) entries where we keep ceil(density·n): density 0.5 on the tiny zoo's
  even-sized tensors makes both exact. It elects + on a zero sum where we elect nothing: a zero sum
  does not occur with these random floats.
- linear: the experts only, normalised.
- breadcrumbs / breadcrumbs_ties: mergekit keeps int(density·n) entries after dropping the int(gamma·n)
  largest; we round both up (TIES' count), so density 0.75 and gamma 0.0625 on tensors whose sizes are
  multiples of 16 make both exact. breadcrumbs_ties needs `normalize: true` (mergekit's default for it is a
  sum of the agreeing values; ours is TIES' disjoint mean). `rescale` is the same L1-norm match in both.
- della / della_linear: the drops are random, and mergekit draws them with torch.bernoulli from the
  global RNG where we draw seeded uniforms per (seed, tensor, task); that is the one deliberate difference.
  Everything else is compared exactly by making both draws deterministic: mergekit's bernoulli(p) becomes
  p > 0.5 and our uniforms become 0.5 (keep when 0.5 < p), so both keep exactly the entries whose keep
  probability exceeds 1/2. That checks the per-row magnitude ranking, the probabilities, the L1 rescale and
  the combination. With density 1 neither drops anything. `test_della_keep_probabilities_match_mergekit`
  compares the probabilities themselves.
- slerp: mergekit's endpoints are base_model and the one other model, ours the base and the one expert.
  We sum the norms and the cosine in float64, mergekit in float32; the coefficients agree to ~1e-7.
- dare_linear / dare_ties are not compared: mergekit draws its drops from torch's global RNG, and its
  `rescale` matches the L1 norm of the task vector instead of dividing by (1 - p), so only the
  distribution could agree, and our own tests check that against the formula.
"""

from __future__ import annotations

import pytest
import torch

from ledmerge.checkpoint import load_state_dict
from ledmerge.merge import merge_models

mergekit = pytest.importorskip("mergekit")
pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

TASKS = ("safety", "math", "code")
WEIGHTS = {"safety": 1.0, "math": 0.5, "code": 2.0}


def run_mergekit(config: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(device="cpu", quiet=True, copy_tokenizer=False, write_model_card=False))
    return load_state_dict(out)


@pytest.mark.parametrize("ours, theirs", [
    ({"method": "task_arithmetic", "scale": 0.8, "weights": WEIGHTS},
     {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.8, "normalize": False}}),
    ({"method": "ties", "density": 0.5, "scale": 1.0},
     {"merge_method": "ties", "parameters": {"normalize": True, "rescale": False, "int8_mask": False, "lambda": 1.0},
      "unit_weights": True}),
    ({"method": "ties", "density": 0.5, "scale": 0.7, "weights": WEIGHTS},
     {"merge_method": "ties", "parameters": {"normalize": True, "rescale": False, "int8_mask": False, "lambda": 0.7}}),
    ({"method": "linear", "weights": WEIGHTS},
     {"merge_method": "linear", "parameters": {"normalize": True}, "no_base": True}),
    ({"method": "breadcrumbs", "density": 0.75, "gamma": 0.0625, "scale": 0.8, "weights": WEIGHTS},
     {"merge_method": "breadcrumbs", "parameters": {"lambda": 0.8, "normalize": False, "rescale": False}}),
    ({"method": "breadcrumbs", "density": 0.5, "gamma": 0.125, "rescale": True, "weights": WEIGHTS},
     {"merge_method": "breadcrumbs", "parameters": {"normalize": False, "rescale": True}}),
    ({"method": "breadcrumbs_ties", "density": 0.75, "gamma": 0.0625, "scale": 0.7, "weights": WEIGHTS},
     {"merge_method": "breadcrumbs_ties", "parameters": {"lambda": 0.7, "normalize": True, "rescale": False,
                                                          "int8_mask": False}}),
    ({"method": "della", "density": 1.0, "scale": 0.7, "weights": WEIGHTS},
     {"merge_method": "della", "parameters": {"lambda": 0.7, "normalize": True, "rescale": True,
                                              "int8_mask": False}}),
    ({"method": "della", "density": 0.45, "epsilon": 0.1, "scale": 0.7, "weights": WEIGHTS},
     {"merge_method": "della", "parameters": {"lambda": 0.7, "normalize": True, "rescale": True,
                                              "int8_mask": False}, "threshold_draws": True}),
    ({"method": "della_linear", "density": 0.45, "epsilon": 0.1, "scale": 0.8, "weights": WEIGHTS},
     {"merge_method": "della_linear", "parameters": {"lambda": 0.8, "normalize": False, "rescale": True},
      "threshold_draws": True}),
], ids=["task_arithmetic", "ties", "ties-weighted", "linear", "breadcrumbs", "breadcrumbs-rescale",
        "breadcrumbs_ties", "della-density-1", "della-threshold-draws", "della_linear-threshold-draws"])
def test_agrees_with_mergekit(tiny_zoo, tmp_path, monkeypatch, ours, theirs):
    weights = {t: 1.0 for t in TASKS} if theirs.pop("unit_weights", False) else WEIGHTS
    if theirs.pop("threshold_draws", False):
        monkeypatch.setattr(torch, "bernoulli", lambda p, *args, **kw: (p > 0.5).to(p.dtype))  # mergekit's
        monkeypatch.setattr(torch, "rand", lambda size, *args, generator=None, **kw: torch.full(tuple(size), 0.5))
    models = []
    for t in TASKS:
        params = {"weight": weights[t], **{k: ours[k] for k in ("density", "gamma", "epsilon") if k in ours}}
        models.append({"model": str(tiny_zoo[t]), "parameters": params})
    config = {**theirs, "models": models, "dtype": "float32", "out_dtype": "float32"}
    if not config.pop("no_base", False):
        config["base_model"] = str(tiny_zoo["base"])
    want = run_mergekit(config, tmp_path / "mergekit")

    merge_models(tiny_zoo["base"], {t: tiny_zoo[t] for t in TASKS}, ours, tmp_path / "ours")
    got = load_state_dict(tmp_path / "ours")
    assert got.keys() == want.keys()
    base = load_state_dict(tiny_zoo["base"])
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(got[name], base[name]), name  # the comparison is not vacuous


def test_slerp_agrees_with_mergekit(tiny_zoo, tmp_path):
    config = {"merge_method": "slerp", "base_model": str(tiny_zoo["base"]), "parameters": {"t": 0.3},
              "models": [{"model": str(tiny_zoo["base"])}, {"model": str(tiny_zoo["math"])}],
              "dtype": "float32", "out_dtype": "float32"}
    want = run_mergekit(config, tmp_path / "mergekit")
    merge_models(tiny_zoo["base"], {"math": tiny_zoo["math"]}, {"method": "slerp", "t": 0.3}, tmp_path / "ours")
    got = load_state_dict(tmp_path / "ours")
    assert got.keys() == want.keys()
    base, expert = load_state_dict(tiny_zoo["base"]), load_state_dict(tiny_zoo["math"])
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(got[name], base[name]), name
    lerp = base["model.norm.weight"] * 0.7 + expert["model.norm.weight"] * 0.3  # norms start at 1: colinear
    torch.testing.assert_close(got["model.norm.weight"], lerp, rtol=0, atol=1e-6)
    name = "model.layers.0.mlp.up_proj.weight"  # random init: far from colinear, so off the line
    assert (got[name] - (base[name] * 0.7 + expert[name] * 0.3)).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(7, 33), (50,)])
def test_della_keep_probabilities_match_mergekit(monkeypatch, shape):
    """mergekit's MagPrune probabilities (what it hands torch.bernoulli) equal ours, bit for bit."""
    from mergekit.sparsify import della_magprune

    from ledmerge.merge.della import keep_probabilities

    seen = []
    monkeypatch.setattr(torch, "bernoulli", lambda p, *args, **kw: (seen.append(p.clone()), torch.ones_like(p))[1])
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    della_magprune(delta, density=0.4, epsilon=0.25)
    assert torch.equal(seen[0].reshape(shape), keep_probabilities(delta.abs(), 0.4, 0.25))


@pytest.mark.parametrize("spec, tasks", [
    ({"method": "task_arithmetic", "scale": 0.8, "weights": WEIGHTS}, TASKS),
    ({"method": "ties", "density": 0.5, "scale": 0.7, "weights": WEIGHTS}, TASKS),
    ({"method": "slerp", "t": 0.3}, ("math",)),
], ids=["task_arithmetic", "ties", "slerp"])
def test_mergekit_runs_the_exported_config_to_our_merge(tiny_zoo, tmp_path, spec, tasks):
    """The mergekit_config.yml a merge writes, run by mergekit as it is, gives our merged weights."""
    import yaml

    from ledmerge.merge.mergekit_io import FILE_NAME

    merge_models(tiny_zoo["base"], {t: tiny_zoo[t] for t in tasks}, spec, tmp_path / "ours")
    exported = yaml.safe_load((tmp_path / "ours" / FILE_NAME).read_text())
    assert "mergekit_config.yml" in (tmp_path / "ours" / "README.md").read_text()
    want = run_mergekit(exported, tmp_path / "mergekit")
    got = load_state_dict(tmp_path / "ours")
    assert got.keys() == want.keys()
    base = load_state_dict(tiny_zoo["base"])
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(got[name], base[name]), name
