"""The safety post-steps, RESTA and SafeMERGE, against their formulas on hand-made tensors; the driver and the CLI
recording what they did; their spec checks."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from ledmerge.checkpoint import load_state_dict
from ledmerge.cli import main
from ledmerge.config import check, validate
from ledmerge.errors import LedmergeError
from ledmerge.merge import get_method
from ledmerge.merge.base import TensorContext
from ledmerge.merge.driver import SUMMARY_FILE
from ledmerge.merge.safemerge import projected_cosine
from ledmerge.specs import merge_spec

REPO = Path(__file__).resolve().parents[1]
T = torch.tensor


def merge(spec, base, experts, name="w", masks=None):
    ctx = TensorContext(name, seed=spec.get("seed", 0), masks=masks or {})
    return get_method(spec).merge_tensor(name, base, experts, ctx), ctx


@pytest.fixture
def models():
    """A base, an aligned expert `s` and a domain expert `m` on a 2x3 matrix of exactly representable values."""
    base = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    return base, {"s": base + T([[1.0, -2.0, 0.5], [0.0, 4.0, -1.0]]), "m": base + T([[2.0, 1.0, -1.0], [3.0, 0.0, 0.25]])}


# --- RESTA -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [{"method": "task_arithmetic"}, {"method": "ties", "density": 0.5},
                                  {"method": "linear"}, {"method": "dare_linear", "drop": 0.5, "seed": 3}])
def test_resta_adds_exactly_gamma_times_the_safety_vector(models, spec):
    base, experts = models
    plain, _ = merge(spec, base, experts)
    got, _ = merge({**spec, "resta": {"gamma": 0.5, "aligned": "s"}}, base, experts)
    assert torch.equal(got, plain + 0.5 * (experts["s"] - base))  # halves and quarters: no rounding
    got, _ = merge({**spec, "resta": {"gamma": 2.0, "aligned": "s", "unaligned": "m"}}, base, experts)
    assert torch.equal(got, plain + 2.0 * (experts["s"] - experts["m"]))


def test_resta_follows_led(models):
    base, experts = models
    masks = {"s": T([[True, False, False], [False, True, False]]), "m": T([[False, True, False], [False, False, True]])}
    spec = {"method": "led", "lambdas": {"s": 1.0, "m": 0.5}}
    plain, _ = merge(spec, base, experts, masks=masks)
    got, _ = merge({**spec, "resta": {"gamma": 0.25, "aligned": "s"}}, base, experts, masks=masks)
    assert torch.equal(got, plain + 0.25 * (experts["s"] - base))
    assert not torch.equal(got, plain)


def test_resta_drop_is_dare_seeded_and_reproducible():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=g)
    experts = {"s": base + torch.randn(64, 32, generator=g), "m": base + torch.randn(64, 32, generator=g)}
    spec = {"method": "task_arithmetic", "resta": {"gamma": 0.5, "drop": 0.75, "seed": 7, "aligned": "s"}}
    got, _ = merge(spec, base, experts, name="layer.w")
    again, _ = merge(spec, base, experts, name="layer.w")
    assert torch.equal(got, again)
    # the formula, restated: DARE's keep draw from the generator of (seed, tensor, "resta"), rescale by 1/(1-p)
    keep = torch.rand(base.shape, generator=TensorContext("layer.w", seed=7).generator("resta")) >= 0.75
    v = experts["s"] - base
    want = merge({"method": "task_arithmetic"}, base, experts, name="layer.w")[0] + 0.5 * (v * keep / 0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert 0.65 < 1 - keep.float().mean() < 0.85  # about 3/4 of V dropped
    other, _ = merge({**spec, "resta": {**spec["resta"], "seed": 8}}, base, experts, name="layer.w")
    assert not torch.equal(other, got)
    # its drops are its own: the method's seed does not move them
    a, _ = merge({"method": "dare_linear", "drop": 0.5, "seed": 1, "resta": spec["resta"]}, base, experts, "layer.w")
    b, _ = merge({"method": "dare_linear", "drop": 0.5, "seed": 2, "resta": spec["resta"]}, base, experts, "layer.w")
    da, _ = merge({"method": "dare_linear", "drop": 0.5, "seed": 1}, base, experts, "layer.w")
    db, _ = merge({"method": "dare_linear", "drop": 0.5, "seed": 2}, base, experts, "layer.w")
    torch.testing.assert_close(a - da, b - db, rtol=0, atol=1e-5)


# --- SafeMERGE ---------------------------------------------------------------------------------

def restated_similarity(delta: torch.Tensor, v: torch.Tensor) -> float:
    """cos(ΔW, CΔW) with C = V Vᵀ / ‖V‖_F formed explicitly, in float64."""
    delta, v = delta.double(), v.double()
    c = v @ v.T / v.norm()
    cd = c @ delta
    return 0.0 if cd.norm() == 0 else float((delta * cd).sum() / (delta.norm() * cd.norm()))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)])  # tall (V (Vᵀ ΔW)), wide and square ((V Vᵀ) ΔW)
def test_projected_cosine_is_the_formula(shape):
    g = torch.Generator().manual_seed(sum(shape))
    delta, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    assert projected_cosine(delta, v) == pytest.approx(restated_similarity(delta, v), abs=1e-5)
    rank1 = torch.outer(v[:, 0], v[0])  # V Vᵀ V = ‖u‖²‖w‖² V for V = u wᵀ: ρ(V, V) = 1
    assert projected_cosine(rank1, rank1) == pytest.approx(1.0, abs=1e-5)
    assert projected_cosine(torch.zeros(shape), v) is None and projected_cosine(delta, torch.zeros(shape)) is None


def test_projected_cosine_hand_checked():
    v = T([[2.0, 0.0], [0.0, 0.0]])  # C = V Vᵀ / ‖V‖ = diag(2, 0): keeps the first row
    assert projected_cosine(T([[3.0, 0.0], [0.0, 4.0]]), v) == pytest.approx(3 / 5)  # ‖row 0‖ / ‖ΔW‖
    assert projected_cosine(T([[0.0, 0.0], [1.0, 1.0]]), v) == 0.0  # orthogonal: CΔW = 0


def test_safemerge_replaces_exactly_the_layers_below_threshold():
    base = torch.zeros(2, 2)
    safe = {"s": T([[1.0, 0.5], [0.0, 0.0]])}  # V = its first row: C keeps row 0
    cases = {  # expert m's update -> its similarity with the task-arithmetic merge of s and m
        "inside": T([[0.0, 3.0], [0.0, 0.0]]), "mostly_out": T([[1.0, 0.0], [0.0, 9.0]]), "out": T([[0.0, 0.0], [2.0, 1.0]])}
    spec = {"method": "task_arithmetic", "safemerge": {"threshold": 0.5, "aligned": "s"}}
    for name, update in cases.items():
        experts = {**safe, "m": base + update}
        plain, _ = merge({"method": "task_arithmetic"}, base, experts, name)
        got, ctx = merge(spec, base, experts, name)
        rho = restated_similarity(plain - safe["s"], safe["s"] - base)  # ΔW = θ_merged − θ_aligned: m's update
        record = ctx.report["safemerge"]
        assert record["similarity"] == pytest.approx(rho, abs=1e-6)
        assert record["update_norm"] == pytest.approx(float(update.norm()))
        assert record["replaced"] == (rho < 0.5)
        assert torch.equal(got, safe["s"] if rho < 0.5 else plain), name  # bit for bit either way
    assert [merge(spec, base, {**safe, "m": base + u}, n)[1].report["safemerge"]["replaced"]
            for n, u in cases.items()] == [False, True, True]


def test_safemerge_measures_the_update_from_the_aligned_model_by_hand():
    """ΔW = θ_merged − θ_aligned, not θ_merged − θ_0, worked out by hand on a 2×2 task arithmetic merge."""
    base = T([[1.0, 1.0], [1.0, 1.0]])
    experts = {"s": base + T([[2.0, 0.0], [0.0, 0.0]]),  # V = 2·e₁e₁ᵀ: C = V Vᵀ / ‖V‖ = diag(2, 0)
               "m": base + T([[3.0, 0.0], [0.0, 4.0]])}
    spec = {"method": "task_arithmetic", "safemerge": {"threshold": 0.7, "aligned": "s"}}
    got, ctx = merge(spec, base, experts)
    # ΔW = m's update [[3, 0], [0, 4]]: CΔW = [[6, 0], [0, 0]], ⟨ΔW, CΔW⟩ = 18, ‖ΔW‖ = 5, ‖CΔW‖ = 6: ρ = 18/30 = 0.6
    assert ctx.report["safemerge"] == {"similarity": pytest.approx(0.6), "replaced": True, "update_norm": 5.0}
    assert torch.equal(got, experts["s"])
    # the update from the base, [[5, 0], [0, 4]], holds V: 50 / (√41 · 10) = 0.781 ≥ 0.7 would have kept the layer
    assert projected_cosine(T([[5.0, 0.0], [0.0, 4.0]]), T([[2.0, 0.0], [0.0, 0.0]])) == pytest.approx(5 / 41 ** 0.5)
    # a merge weight other than 1 leaves a share of V in ΔW: 0.5·(V + τ_m) − V = [[-0.5, 0], [0, 2]], ρ = 0.5/√4.25
    got, ctx = merge({**spec, "weights": {"s": 0.5, "m": 0.5}}, base, experts)
    assert ctx.report["safemerge"]["similarity"] == pytest.approx(0.5 / 4.25 ** 0.5)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10, 10)])
def test_safemerge_replaces_an_update_orthogonal_to_v_and_keeps_one_inside_it(shape):
    """The merge's update from the aligned model, built orthogonal to V's column space (CΔW = 0, ρ = 0: replaced at
    τ = 0.5), or inside it (ΔW = V·A: kept)."""
    g = torch.Generator().manual_seed(sum(shape))
    out, k = shape[0], 3
    q = torch.linalg.qr(torch.randn(out, out, generator=g)).Q  # an orthonormal basis of the output space
    v = q[:, :k] @ torch.randn(k, shape[1], generator=g)  # rank 3: its columns span q's first 3 columns
    base = torch.randn(shape, generator=g)
    spec = {"method": "task_arithmetic", "safemerge": {"threshold": 0.5, "aligned": "s"}}
    orthogonal = q[:, k:] @ torch.randn(out - k, shape[1], generator=g)  # Vᵀ ΔW = 0
    inside = v @ torch.randn(shape[1], shape[1], generator=g)
    for update, replaced in ((orthogonal, True), (inside, False)):
        experts = {"s": base + v, "m": base + update}
        plain, _ = merge({"method": "task_arithmetic"}, base, experts)
        got, ctx = merge(spec, base, experts)
        record = ctx.report["safemerge"]
        assert record["replaced"] is replaced
        # ΔW is recovered as merged − aligned in float32 and CΔW of an orthogonal one is rounding error: a
        # similarity of a few hundredths instead of 0 (restated in float64: 1e-7)
        assert record["similarity"] == pytest.approx(restated_similarity(plain - experts["s"], v), abs=0.1)
        assert torch.equal(got, experts["s"] if replaced else plain)
    assert restated_similarity(orthogonal, v) == pytest.approx(0.0, abs=1e-6)
    assert restated_similarity(inside, v) > 0.5


def test_safemerge_no_longer_counts_the_aligned_experts_own_task_vector():
    """The bias the update from the base had: merged = base + V + small noise orthogonal to V. θ_merged − θ_0 is
    almost V, so its similarity was about 1 and the layer kept; θ_merged − θ_aligned is the noise alone: replaced."""
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q
    v = q[:, :4] @ torch.randn(4, 16, generator=g)  # rank 4
    noise = q[:, 4:] @ torch.randn(12, 16, generator=g)
    noise *= 0.1 * v.norm() / noise.norm()  # a tenth of V's norm, orthogonal to V's columns
    base = torch.randn(16, 16, generator=g)
    experts = {"s": base + v, "m": base + noise}
    plain, _ = merge({"method": "task_arithmetic"}, base, experts)
    torch.testing.assert_close(plain, base + v + noise)
    assert restated_similarity(plain - base, v) > 0.9  # the old measure: kept at τ = 0.5
    got, ctx = merge({"method": "task_arithmetic", "safemerge": {"threshold": 0.5, "aligned": "s"}}, base, experts)
    assert restated_similarity(plain - experts["s"], v) == pytest.approx(0.0, abs=1e-3)  # the new measure
    assert ctx.report["safemerge"]["similarity"] == pytest.approx(0.0, abs=0.1)  # float32 rounding, see above
    assert ctx.report["safemerge"]["replaced"] and torch.equal(got, experts["s"])


def test_safemerge_blend_vectors_and_unset_cases():
    base = torch.zeros(2, 2)
    experts = {"s": T([[1.0, 0.0], [0.0, 0.0]]), "m": T([[0.0, 0.0], [0.0, 2.0]])}
    spec = {"method": "task_arithmetic", "safemerge": {"threshold": 0.9, "blend": 0.25, "aligned": "s"}}
    plain, _ = merge({"method": "task_arithmetic"}, base, experts)
    got, ctx = merge(spec, base, experts)
    assert ctx.report["safemerge"]["replaced"]
    torch.testing.assert_close(got, 0.75 * plain + 0.25 * experts["s"], rtol=0, atol=1e-7)
    # a norm (1-D) is not a weight matrix: kept, no record
    got, ctx = merge(spec, torch.zeros(3), {"s": torch.ones(3), "m": -torch.ones(3)})
    assert torch.equal(got, merge({"method": "task_arithmetic"}, torch.zeros(3), {"s": torch.ones(3),
                                                                                   "m": -torch.ones(3)})[0])
    assert ctx.report == {}
    # no update (the other expert adds nothing: the merge is the aligned model) -> similarity None, kept
    got, ctx = merge(spec, base, {"s": experts["s"], "m": base})
    assert ctx.report["safemerge"] == {"similarity": None, "replaced": False, "update_norm": 0.0}
    assert torch.equal(got, experts["s"])
    # a merge that gives V back (here: to the base) has ΔW = −V, inside the subspace: ρ is blind to the sign, kept
    got, ctx = merge(spec, base, {"s": experts["s"], "m": -experts["s"]})
    assert ctx.report["safemerge"]["similarity"] == pytest.approx(1.0) and torch.equal(got, base)


def test_safemerge_replaces_layers_of_the_tiny_zoo(tiny_zoo, tmp_path):
    """Task arithmetic of the tiny zoo's three noise experts with SafeMERGE at its default τ = 0.5. The update from
    the base (which holds V) is above τ in all 16 matrices, so that measure replaced none; the update from the
    aligned model is lower in every matrix, and the matrices it puts below τ are replaced by the safety expert's."""
    tasks = ("safety", "math", "code")
    spec = {"method": "task_arithmetic", "safemerge": {"aligned": "safety"}}
    rc, stdout = run_cli("merge", "--base", tiny_zoo["base"], "--expert", *[f"{t}={tiny_zoo[t]}" for t in tasks],
                         "--spec", json.dumps(spec), "--out", tmp_path / "ta_safemerge")
    assert rc == 0
    records = json.loads(stdout)["post_steps"]["safemerge"]
    base, experts = load_state_dict(tiny_zoo["base"]), {t: load_state_dict(tiny_zoo[t]) for t in tasks}
    got = load_state_dict(tmp_path / "ta_safemerge")
    assert set(records) == {n for n, w in base.items() if w.dim() == 2} and len(records) == 16
    old, new = {}, {}
    for n in records:
        merged = base[n] + sum(experts[t][n] - base[n] for t in tasks)
        v = experts["safety"][n] - base[n]
        old[n], new[n] = restated_similarity(merged - base[n], v), restated_similarity(merged - experts["safety"][n], v)
        assert records[n]["similarity"] == pytest.approx(new[n], abs=1e-4)
        assert records[n]["replaced"] == (new[n] < 0.5)
        if records[n]["replaced"]:
            assert torch.equal(got[n], experts["safety"][n].to(got[n].dtype)), n
        else:
            torch.testing.assert_close(got[n], merged.to(got[n].dtype), rtol=0, atol=1e-6)
    assert all(new[n] < old[n] for n in records)
    assert min(old.values()) >= 0.5  # the update from the base: none replaced
    replaced = sorted(n for n, r in records.items() if r["replaced"])
    assert replaced == ["model.embed_tokens.weight"]  # 1 of 16 at τ = 0.5 (ρ 0.49; 0.64 from the base)
    # at τ = 0.6 the update from the aligned model replaces 6 of 16, the one from the base still none
    assert sum(r < 0.6 for r in new.values()) == 6 and min(old.values()) > 0.6


def test_both_steps_run_safemerge_then_resta(models):
    base, experts = models
    spec = {"method": "task_arithmetic", "safemerge": {"threshold": 1.0, "aligned": "s"},  # replaces any layer
            "resta": {"gamma": 0.5, "aligned": "s"}}
    got, ctx = merge(spec, base, experts)
    assert ctx.report["safemerge"]["replaced"]
    assert torch.equal(got, experts["s"] + 0.5 * (experts["s"] - base))
    assert list(get_method(spec).recipe())[-2:] == ["safemerge", "resta"]


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, match", [
    ({"method": "ties", "resta": 0.5}, r"'ties': resta must map its parameters"),
    ({"method": "ties", "resta": {"gama": 0.5}}, r"resta has no parameter\(s\) \['gama'\]"),
    ({"method": "ties", "resta": {"drop": 1.0}}, r"resta\.drop must be a number in \[0, 1\)"),
    ({"method": "ties", "resta": {"gamma": "half"}}, r"resta\.gamma"),
    ({"method": "ties", "resta": {"seed": 1.5}}, r"resta\.seed must be an integer"),
    ({"method": "led", "safemerge": {"threshold": 1.5}}, r"'led': safemerge\.threshold"),
    ({"method": "led", "safemerge": {"blend": 0}}, r"safemerge\.blend"),
    ({"method": "led", "safemerge": {"aligned": 3}}, r"safemerge\.aligned must be a model name"),
    ({"method": "ties", "restaa": {}}, r"no parameter\(s\) \['restaa'\].*post-steps \['safemerge', 'resta'\]"),
])
def test_bad_post_step_specs(spec, match):
    with pytest.raises(LedmergeError, match=match):
        get_method(spec)


def test_post_step_models_checked():
    check_inputs = lambda resta: get_method({"method": "ties", "resta": resta}).check_inputs(["math", "safety"], None)
    with pytest.raises(LedmergeError, match=r"resta\.aligned is not set: .*\['base', 'math', 'safety'\]"):
        check_inputs({})
    with pytest.raises(LedmergeError, match=r"resta\.unaligned names 'pretrained', which this merge does not read"):
        check_inputs({"aligned": "safety", "unaligned": "pretrained"})
    with pytest.raises(LedmergeError, match="safety vector is zero"):
        check_inputs({"aligned": "math", "unaligned": "math"})
    check_inputs({"aligned": "safety"})
    check_inputs({"aligned": "safety", "unaligned": "math"})
    with pytest.raises(LedmergeError, match=r"'led': safemerge\.aligned names 'code'"):  # LED checks them too
        get_method({"method": "led", "safemerge": {"aligned": "code"}}).check_inputs(["math"], {"math": ""})


def test_config_fills_aligned_from_alignment_task_and_checks_names():
    cfg = validate(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    cfg["merges"]["ties_resta"] = {"method": "ties", "resta": {"gamma": 0.5}}
    cfg["merges"]["led_safemerge"] = {"method": "led", "safemerge": {"unaligned": "math"}}
    check(cfg)
    assert merge_spec(cfg, "ties_resta")["resta"]["aligned"] == cfg["alignment_task"] == "safety"
    assert merge_spec(cfg, "led_safemerge")["safemerge"] == {"unaligned": "math", "aligned": "safety"}
    assert "aligned" not in cfg["merges"]["ties_resta"]["resta"]  # the config itself is left as written
    bad = copy.deepcopy(cfg)
    bad["merges"]["ties_resta"]["resta"]["unaligned"] = "nope"
    with pytest.raises(LedmergeError, match=r"config error at 'merges\.ties_resta': .*resta\.unaligned names 'nope'"):
        check(bad)


# --- driver and CLI ----------------------------------------------------------------------------

def run_cli(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in args])
    return rc, out.getvalue()


def test_cli_merge_records_replaced_layers(tiny_zoo, tmp_path):
    tasks = ("safety", "math", "code")
    expert_args = [f"{t}={tiny_zoo[t]}" for t in tasks]
    merge_cli = lambda spec, out: run_cli("merge", "--base", tiny_zoo["base"], "--expert", *expert_args,
                                          "--spec", json.dumps(spec), "--out", tmp_path / out)
    ties = {"method": "ties", "density": 0.5}
    assert merge_cli(ties, "plain")[0] == 0
    rc, stdout = merge_cli({**ties, "safemerge": {"threshold": 0.0, "aligned": "safety"}}, "probe")
    assert rc == 0
    rho = {n: r["similarity"] for n, r in json.loads(stdout)["post_steps"]["safemerge"].items()}
    tau = sorted(rho.values())[len(rho) // 2]  # the median: about half the matrices fall below it
    spec = {**ties, "safemerge": {"threshold": tau, "aligned": "safety"}, "resta": {"gamma": 0.5, "drop": 0.5}}
    with pytest.raises(LedmergeError, match=r"resta\.aligned is not set"):  # the CLI gets no alignment_task
        get_method(spec).check_inputs(list(tasks), None)
    spec["resta"]["aligned"] = "safety"
    rc, stdout = merge_cli(spec, "safe")
    assert rc == 0
    summary = json.loads(stdout)
    assert summary == json.loads((tmp_path / "safe" / SUMMARY_FILE).read_text())
    assert summary["recipe"]["safemerge"]["threshold"] == tau and summary["recipe"]["resta"]["drop"] == 0.5
    records = summary["post_steps"]["safemerge"]
    replaced = sorted(n for n, r in records.items() if r["replaced"])
    assert replaced == sorted(n for n, r in rho.items() if r < tau) and 0 < len(replaced) < len(records)

    base, experts = load_state_dict(tiny_zoo["base"]), {t: load_state_dict(tiny_zoo[t]) for t in tasks}
    safety = experts["safety"]
    plain, got = load_state_dict(tmp_path / "plain"), load_state_dict(tmp_path / "safe")
    assert set(records) == {n for n, w in base.items() if w.dim() == 2}
    method = get_method(spec)
    for n in base:  # the streamed merge equals the formula on whole tensors: safe layer or plain, then + γ·V'
        want = (safety[n] if n in replaced else plain[n]).clone()
        v = safety[n] - base[n]
        keep = torch.rand(v.shape, generator=TensorContext(n, seed=0).generator("resta")) >= 0.5
        torch.testing.assert_close(got[n], want + 0.5 * (v * keep / 0.5), rtol=0, atol=1e-6)
        whole = method.merge_tensor(n, base[n], {t: experts[t][n] for t in tasks}, TensorContext(n, seed=method.seed))
        assert torch.equal(got[n], whole.to(got[n].dtype)), n

    card = (tmp_path / "safe" / "README.md").read_text()
    assert "## Post-step `safemerge`" in card and f"{len(replaced)} of {len(records)} weight matrices" in card
    for n in records:
        assert f"| `{n}` | {rho[n]:.4f} | {'yes' if n in replaced else 'no'} |" in card
    assert "resta:\n  gamma: 0.5\n  drop: 0.5" in card  # the recipe
