"""Our baselines agree with mergekit 0.1.5, the reference implementation, configured identically.

Configuration notes (what makes the two compute the same thing):
- task_arithmetic: mergekit's default normalize is false, so θ_0 + lambda·Σ w_t τ_t is ours with
  scale = lambda and the same per-task weights.
- ties: mergekit divides by the summed weights of the agreeing models (`normalize: true`, its default),
  which with our weights is our weighted disjoint mean; `rescale: false` (its default for ties). With
  `normalize: false` on both sides it is the sum of the agreeing weighted task vectors, where weights may be
  negative (a negative weight flips its task vector before the sign election, in both).
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
- dare_linear / dare_ties: mergekit draws its drops with torch.bernoulli from torch's global RNG, and its
  `rescale` matches the L1 norm of the sparsified task vector instead of dividing by (1 - p). So mergekit runs
  with `rescale: false`, our 1/(1 - p) folded into its weights (dare_linear) or lambda (dare_ties, one p), and
  the draws are compared twice: exactly, by replaying our recorded draws as mergekit's bernoulli draws
  (`test_dare_agrees_with_mergekit_on_the_same_draws`), and in distribution, each side drawing its own over
  many seeds (`test_dare_draws_match_mergekit_in_distribution`). dare_ties is mergekit's with `normalize: true`.
"""

from __future__ import annotations

import pytest
import torch

from ledmerge.checkpoint import load_state_dict
from ledmerge.merge import get_method, merge_models

mergekit = pytest.importorskip("mergekit")
pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

TASKS = ("safety", "math", "code")
WEIGHTS = {"safety": 1.0, "math": 0.5, "code": 2.0}
SIGNED = {"safety": 1.0, "math": -0.5, "code": 2.0}  # a negative weight: only without normalize (MergeAlign's search)


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
    ({"method": "ties", "density": 0.5, "scale": 0.7, "weights": WEIGHTS, "normalize": False},
     {"merge_method": "ties", "parameters": {"normalize": False, "rescale": False, "int8_mask": False, "lambda": 0.7}}),
    ({"method": "ties", "density": 0.5, "weights": SIGNED, "normalize": False},
     {"merge_method": "ties", "parameters": {"normalize": False, "rescale": False, "int8_mask": False},
      "signed_weights": True}),
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
], ids=["task_arithmetic", "ties", "ties-weighted", "ties-unnormalised", "ties-unnormalised-negative", "linear",
        "breadcrumbs", "breadcrumbs-rescale",
        "breadcrumbs_ties", "della-density-1", "della-threshold-draws", "della_linear-threshold-draws"])
def test_agrees_with_mergekit(tiny_zoo, tmp_path, monkeypatch, ours, theirs):
    weights = {t: 1.0 for t in TASKS} if theirs.pop("unit_weights", False) else WEIGHTS
    weights = SIGNED if theirs.pop("signed_weights", False) else weights
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

    from ledmerge.merge.sparsify import keep_probabilities

    seen = []
    monkeypatch.setattr(torch, "bernoulli", lambda p, *args, **kw: (seen.append(p.clone()), torch.ones_like(p))[1])
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    della_magprune(delta, density=0.4, epsilon=0.25)
    assert torch.equal(seen[0].reshape(shape), keep_probabilities(delta.abs(), 0.4, 0.25))


@pytest.mark.parametrize("spec, tasks", [
    ({"method": "task_arithmetic", "scale": 0.8, "weights": WEIGHTS}, TASKS),
    ({"method": "ties", "density": 0.5, "scale": 0.7, "weights": WEIGHTS}, TASKS),
    ({"method": "dare_ties", "drop": 0.0, "weights": SIGNED, "normalize": False}, TASKS),
    ({"method": "slerp", "t": 0.3}, ("math",)),
], ids=["task_arithmetic", "ties", "dare_ties-unnormalised", "slerp"])
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


# --- DARE -------------------------------------------------------------------------------------------

DROPS = {"safety": 0.3, "math": 0.6, "code": 0.9}  # none 0.5: a keep probability of p instead of 1 - p shows


def _dare_case(method, drop, rescale, scale, theirs):
    """Our spec, and mergekit's parameters and per-task weights computing the same merge from the same draws."""
    ours = {"method": method, "drop": drop, "seed": 5, "scale": scale, "weights": WEIGHTS, "rescale": rescale,
            **({"normalize": theirs["normalize"]} if method == "dare_ties" else {})}
    drops = {t: drop[t] if isinstance(drop, dict) else drop for t in TASKS}
    if rescale and method == "dare_linear":  # 1/(1 - p_t) is a per-task weight of the plain sum
        weights = {t: WEIGHTS[t] / (1 - drops[t]) for t in TASKS}
    else:  # (dare_ties: one p, and 1/(1 - p) cancels in the mean's divisor: it goes into lambda below)
        weights = dict(WEIGHTS)
    lam = scale
    if rescale and method == "dare_ties":
        assert not isinstance(drop, dict), "a per-task 1/(1 - p_t) has no mergekit equivalent in dare_ties"
        lam = scale / (1 - drop)
    params = {"lambda": lam, "rescale": False, "int8_mask": False, **theirs}
    return ours, drops, params, weights


@pytest.mark.parametrize("method, drop, rescale, scale, theirs", [
    ("dare_linear", DROPS, True, 0.8, {"normalize": False}),
    ("dare_linear", DROPS, False, 0.8, {"normalize": False}),
    ("dare_ties", 0.6, True, 0.7, {"normalize": True}),
    ("dare_ties", DROPS, False, 0.7, {"normalize": True}),
    ("dare_ties", 0.6, True, 0.7, {"normalize": False}),
], ids=["dare_linear", "dare_linear-no-rescale", "dare_ties", "dare_ties-no-rescale", "dare_ties-unnormalised"])
def test_dare_agrees_with_mergekit_on_the_same_draws(tiny_zoo, tmp_path, monkeypatch, method, drop, rescale, scale,
                                                     theirs):
    """Our DARE equals mergekit's when mergekit's random source is made to draw what ours drew.

    How the draws are made identical: our merge runs first, and every keep mask it draws is recorded per
    (tensor, task) (a spy around `sparsify.Dare.select` that returns the product's own mask unchanged). mergekit
    then runs its unmodified DARE code, except that `torch.bernoulli`, its only random source, hands back the
    recorded mask of the tensor and task it is sparsifying. Each replay checks that mergekit asked for
    Bernoulli(1 - drop_t) (so `density` = 1 - `drop` is the mapping), every recorded draw is replayed exactly
    once, and the recorded draws are plausible Bernoulli(1 - drop_t) samples (kept fraction within 5 binomial
    standard deviations over the model). `test_dare_draws_match_mergekit_in_distribution` compares the draws
    themselves with mergekit's own.

    Deliberate differences, and how the configurations bridge them:
    - rescale: ours divides the kept entries by 1 - drop_t (the DARE paper); mergekit's `rescale: true`
      matches the L1 norm of each sparsified task vector instead (a random factor, ≈ 1/(1 - p) only on large
      tensors), which has no equivalent here. So mergekit runs with `rescale: false`, and our exact
      1/(1 - drop_t) goes into its weights (dare_linear: θ_0 + λ Σ w_t/(1-p_t) m_t τ_t is ours) or, for
      dare_ties with one drop for every task, into lambda (the weighted disjoint mean divides by the summed
      weights, so a per-task factor there would cancel; one uniform factor passes through the mean and the
      sign election unchanged). With `rescale: false` on both sides nothing is folded.
    - dare_ties: ours is TIES' weighted disjoint mean, mergekit's with `normalize: true` (its default for
      dare_ties is false: the sum of the agreeing w_t τ_t). A zero sum elects + in mergekit and nothing in ours;
      where every task dropped an entry both keep the base's value, and an exact zero sum of kept random floats
      does not occur.
    - the draws: mergekit draws from torch's global generator, ours per (seed, tensor, task).
    Tolerance: atol 1e-6, rtol 0 (float32 rounding of the different operation order).
    """
    from mergekit.merge_methods import GeneralizedTaskArithmeticMerge

    from ledmerge.merge.sparsify import Dare

    ours, drops, params, weights = _dare_case(method, drop, rescale, scale, theirs)

    draws = {}  # (tensor name, task) -> the keep mask our merge drew
    real_select = Dare.select

    def record(self, task, delta, n, ctx):
        keep = real_select(self, task, delta, n, ctx)
        draws[ctx.name, task] = keep.clone()
        return keep

    monkeypatch.setattr(Dare, "select", record)
    merge_models(tiny_zoo["base"], {t: tiny_zoo[t] for t in TASKS}, ours, tmp_path / "ours")
    got = load_state_dict(tmp_path / "ours")
    assert len(draws) == len(got) * len(TASKS)

    task_of = {str(tiny_zoo[t]): t for t in TASKS}
    queue, replayed = [], set()
    real_group = GeneralizedTaskArithmeticMerge.merge_group

    def note_group(self, group, /, **kw):  # mergekit sparsifies the group's non-base inputs in this order
        assert not queue
        queue.extend((group.metadata.name, task_of[str(e.id)]) for e in group.non_base)
        return real_group(self, group, **kw)

    def replay(p, *args, **kw):
        key = queue.pop(0)
        assert torch.equal(p, torch.full_like(p, 1 - drops[key[1]])), key  # mergekit's keep probability is ours
        assert key not in replayed, key
        replayed.add(key)
        return draws[key].reshape(p.shape).to(p.dtype)

    monkeypatch.setattr(GeneralizedTaskArithmeticMerge, "merge_group", note_group)
    monkeypatch.setattr(torch, "bernoulli", replay)
    models = [{"model": str(tiny_zoo[t]), "parameters": {"weight": weights[t], "density": 1 - drops[t]}}
              for t in TASKS]
    want = run_mergekit({"merge_method": method, "base_model": str(tiny_zoo["base"]), "models": models,
                         "parameters": params, "dtype": "float32", "out_dtype": "float32"}, tmp_path / "mergekit")
    assert replayed == set(draws) and not queue

    for t in TASKS:  # the replayed draws are plausible draws of the Bernoulli(1 - p) mergekit asked for
        n = sum(draws[k].numel() for k in draws if k[1] == t)
        kept = sum(int(draws[k].sum()) for k in draws if k[1] == t)
        q = 1 - drops[t]
        assert abs(kept / n - q) < 5 * (q * (1 - q) / n) ** 0.5, (t, kept / n, q)

    assert got.keys() == want.keys()
    base = load_state_dict(tiny_zoo["base"])
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(got[name], base[name]), name  # the comparison is not vacuous


@pytest.mark.parametrize("method, drop", [("dare_linear", DROPS), ("dare_ties", 0.6)])
def test_dare_draws_match_mergekit_in_distribution(monkeypatch, method, drop):
    """With each side drawing its own drops (mergekit: torch.bernoulli on the global generator, seeded 0..S-1;
    ours: per (seed, tensor, task), seeds 0..S-1), the merged tensors have the same distribution over S = 400
    seeds, on a 6x8 tensor with three experts (safety's and math's task vectors share their signs, code's are
    random and smaller). Configured as in `test_dare_agrees_with_mergekit_on_the_same_draws` (our 1/(1 - p)
    rescale folded into mergekit's weights or lambda, mergekit `rescale: false`). Seeded, so deterministic.

    Asserted, each between ours and mergekit's empirical values:
    - per task, the fraction of entries kept: |difference| < 5 standard errors of a difference of two
      proportions (n = 48·400 each; about 0.025 at p = 0.6);
    - per entry, the mean merged value: every two-sample z = Δmean / sqrt(var_ours/S + var_theirs/S) below 5;
    - per entry, the spread: the mean over the 48 entries of log(var_ours / var_theirs) within ±0.1 (its
      standard error is about 0.1/sqrt(48) ≈ 0.015): correlated drops across tasks, or a wrong rescale, show here.
    """
    from mergekit.merge_methods import merge_tensors

    from ledmerge.merge.base import TensorContext

    seeds = 400
    ours, drops, params, weights = _dare_case(method, drop, True, 0.8,
                                              {"normalize": method == "dare_ties"})
    g = torch.Generator().manual_seed(11)
    base = torch.randn(6, 8, generator=g)
    sign = torch.randn(6, 8, generator=g).sign()  # safety and math agree in sign everywhere, code at random: the
    deltas = {t: sign * (0.5 + torch.randn(6, 8, generator=g).abs()) for t in ("safety", "math")}  # drops' correlation
    deltas["code"] = 0.3 * torch.randn(6, 8, generator=g)  # across tasks then moves the spread; the signs split
    experts = {t: base + deltas[t] for t in TASKS}
    tensors = [base, *(experts[t] for t in TASKS)]
    theirs_params = {**params, "weight": [weights[t] for t in TASKS], "density": [1 - drops[t] for t in TASKS]}

    kept_theirs = []
    real_bernoulli = torch.bernoulli

    def counted(p, *args, **kw):
        out = real_bernoulli(p, *args, **kw)
        kept_theirs.append(out.clone())
        return out

    monkeypatch.setattr(torch, "bernoulli", counted)
    mine, theirs = [], []
    kept_ours = {t: 0 for t in TASKS}
    for seed in range(seeds):
        ctx = TensorContext("w", seed=seed)
        mine.append(get_method({**ours, "seed": seed}).merge_tensor("w", base, experts, ctx))
        for t in TASKS:
            kept_ours[t] += int(ctx.kept[t].sum())
        torch.manual_seed(seed)
        theirs.append(merge_tensors(tensors, method, parameters=theirs_params, ids=("base", *TASKS),
                                    base_index=0, name="w", dtype=torch.float32))
    assert len(kept_theirs) == seeds * len(TASKS)

    n = seeds * base.numel()
    for i, t in enumerate(TASKS):  # mergekit sparsifies the experts in the order given
        q = 1 - drops[t]
        ours_frac = kept_ours[t] / n
        theirs_frac = sum(float(m.sum()) for m in kept_theirs[i::len(TASKS)]) / n
        assert abs(ours_frac - theirs_frac) < 5 * (2 * q * (1 - q) / n) ** 0.5, (t, ours_frac, theirs_frac, q)

    mine, theirs = torch.stack(mine).double(), torch.stack(theirs).double()
    var_mine, var_theirs = mine.var(0), theirs.var(0)
    z = (mine.mean(0) - theirs.mean(0)) / ((var_mine + var_theirs) / seeds).sqrt()
    assert z.abs().max() < 5, z.abs().max()
    log_ratio = (var_mine / var_theirs).log().mean()
    assert abs(log_ratio) < 0.1, log_ratio
