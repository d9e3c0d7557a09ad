"""Merge methods against their formulas on hand-made tensors, and the driver on the tiny zoo."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import topk_mask, true_sha256

from ledmerge.checkpoint import load_state_dict
from ledmerge.errors import LedmergeError
from ledmerge.led.files import save_masks
from ledmerge.merge import METHODS, get_method, merge_models
from ledmerge.merge.base import TensorContext
from ledmerge.merge.consensus import elect_disjoint_mean

T = torch.tensor


def dare(delta, drop, generator, rescale=True):
    """The DARE formula, restated: drop each entry with probability `drop`, rescale survivors by 1/(1-drop)."""
    keep = torch.rand(delta.shape, generator=generator) >= drop
    return delta * keep / (1 - drop) if rescale else delta * keep


def merge(spec, base, experts, name="w", masks=None):
    ctx = TensorContext(name, seed=spec.get("seed", 0), masks=masks or {})
    return get_method(spec).merge_tensor(name, base, experts, ctx)


@pytest.fixture
def toy():
    """A base and three experts on 6 weights, with hand-checkable task vectors."""
    base = T([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    taus = {"a": T([1.0, -2.0, 3.0, 0.0, 0.5, -0.5]),
            "b": T([2.0, 1.0, -1.0, 0.0, -4.0, 0.25]),
            "c": T([-1.0, 2.0, -1.0, 0.0, 1.0, 0.0])}
    return base, {t: base + tau for t, tau in taus.items()}, taus


# --- baselines ---------------------------------------------------------------------------------

def test_registry_has_all_methods():
    assert set(METHODS) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "led", "breadcrumbs",
                            "breadcrumbs_ties", "della", "della_linear", "slerp"}


def test_linear(toy):
    base, experts, _ = toy
    e = experts
    got = merge({"method": "linear", "weights": {"a": 1.0, "b": 3.0}}, base, e)  # c gets 1.0
    torch.testing.assert_close(got, (e["a"] + 3 * e["b"] + e["c"]) / 5, rtol=0, atol=1e-6)
    got = merge({"method": "linear", "normalize": False, "weights": {"a": 0.5}}, base, e)
    torch.testing.assert_close(got, 0.5 * e["a"] + e["b"] + e["c"], rtol=0, atol=1e-6)


def test_task_arithmetic(toy):
    base, experts, taus = toy
    got = merge({"method": "task_arithmetic", "scale": 0.5, "weights": {"a": 2.0, "c": -1.0}}, base, experts)
    torch.testing.assert_close(got, base + 0.5 * (2 * taus["a"] + taus["b"] - taus["c"]), rtol=0, atol=1e-6)


def test_topk_mask_exact_count_with_ties():
    x = T([0.0, 0.0, 0.0, 0.0, -1.0, 1.0, 1.0, 2.0])
    assert topk_mask(x, 0.3).tolist() == [False] * 4 + [True, True, False, True]  # ceil(2.4) = 3, lowest index wins
    assert topk_mask(x, 0.5).sum() == 4
    assert topk_mask(torch.zeros(8), 0.25).tolist() == [True, True] + [False] * 6  # zeros do not all pass
    assert topk_mask(torch.arange(10.0), 0.3).sum() == 3  # not ceil(3.0000000000000004) = 4
    assert topk_mask(torch.arange(10.0), 0.31).sum() == 4
    assert topk_mask(T([[-3.0, 1.0], [2.0, 0.5]]), 0.5).tolist() == [[True, False], [True, False]]
    assert topk_mask(torch.randn(7), 1.0).all()


def test_sign_election_and_disjoint_mean():
    d = {"a": T([1.0, -2.0, 3.0, 0.0, 1.0, -1.0]),
         "b": T([2.0, 1.0, -1.0, 0.0, -1.0, -3.0]),
         "c": T([-1.0, 2.0, -1.0, 0.0, 0.0, 0.0])}
    # sums: 2, 1, 1, 0, 0, -4 -> elected +, +, +, none, none, -
    assert elect_disjoint_mean(d).tolist() == [1.5, 1.5, 3.0, 0.0, 0.0, -2.0]
    # weighted: mean of w*d over agreeing entries, divided by their summed weights (mergekit's convention)
    w = {"a": 2.0, "b": 1.0, "c": 1.0}
    torch.testing.assert_close(elect_disjoint_mean(d, w), T([4 / 3, -4 / 2, 6 / 2, 0.0, 2 / 2, -5 / 3]))


def test_ties_formula(toy):
    base, experts, taus = toy
    got = merge({"method": "ties", "density": 0.5, "scale": 0.8}, base, experts)
    # top 3 of 6 by magnitude per task; tied magnitudes go to the lowest index
    trimmed = {"a": T([1.0, -2.0, 3.0, 0.0, 0.0, 0.0]),
               "b": T([2.0, 1.0, 0.0, 0.0, -4.0, 0.0]),
               "c": T([-1.0, 2.0, -1.0, 0.0, 0.0, 0.0])}
    for t, tau in taus.items():
        assert torch.equal(tau * topk_mask(tau, 0.5), trimmed[t])
    torch.testing.assert_close(got, base + 0.8 * elect_disjoint_mean(trimmed), rtol=0, atol=1e-6)
    # by hand: sums 2, 1, 2, 0, -4, 0 -> [mean(1, 2), mean(1, 2), 3, 0, -4, 0]
    torch.testing.assert_close(got, base + 0.8 * T([1.5, 1.5, 3.0, 0.0, -4.0, 0.0]), rtol=0, atol=1e-6)


def test_ties_density_one_is_election_only(toy):
    base, experts, taus = toy
    got = merge({"method": "ties", "density": 1.0}, base, experts)
    torch.testing.assert_close(got, base + elect_disjoint_mean(taus), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drop_fraction_and_rescale(method):
    """The product's DARE on one task vector of 200k entries all 2.0 over a zero base (so the merge is the dropped,
    rescaled task vector): each entry kept with probability 1 - p = 0.7 (kept fraction within 0.005, 5 binomial
    standard deviations, also in each half: the drops are spread, not a block), survivors exactly 2/(1 - p)
    (rtol 1e-6), mean within 0.02 of 2 (unbiased), drop 0 the identity, `rescale: false` the same drops unscaled.
    With two tasks the drops are independent: both kept on 0.49 of the entries, neither on 0.09 (within 0.005)."""
    delta = torch.full((200_000,), 2.0)
    base = torch.zeros_like(delta)
    out = merge({"method": method, "drop": 0.3, "seed": 1}, base, {"a": base + delta})
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # 5 sigma at n = 200k
    for half in kept.chunk(2):
        assert abs(half.float().mean().item() - 0.7) < 0.007  # 5 sigma at n = 100k
    torch.testing.assert_close(out[kept], torch.full((int(kept.sum()),), 2.0 / 0.7), rtol=1e-6, atol=0)
    assert abs(out.mean().item() - 2.0) < 0.02  # unbiased: E[out] = delta
    assert torch.equal(merge({"method": method, "drop": 0.0, "seed": 1}, base, {"a": base + delta}), delta)
    plain = merge({"method": method, "drop": 0.3, "seed": 1, "rescale": False}, base, {"a": base + delta})
    assert torch.equal(plain != 0, kept) and torch.all(plain[kept] == 2.0)

    both = merge({"method": "dare_linear", "drop": 0.3, "seed": 1}, base, {"a": base + delta, "b": base + delta})
    assert abs((both == 0).float().mean().item() - 0.09) < 0.005
    assert abs(torch.isclose(both, torch.tensor(4.0 / 0.7)).float().mean().item() - 0.49) < 0.005


def test_dare_seeding():
    ctx = lambda name, seed=0: TensorContext(name, seed=seed)
    draw = lambda c, task="a": torch.rand(1000, generator=c.generator(task))
    assert torch.equal(draw(ctx("w")), draw(ctx("w")))
    assert not torch.equal(draw(ctx("w")), draw(ctx("w", seed=1)))
    assert not torch.equal(draw(ctx("w")), draw(ctx("v")))
    assert not torch.equal(draw(ctx("w"), "a"), draw(ctx("w"), "b"))

    base = torch.zeros(5000)
    experts = {"a": torch.randn(5000), "b": torch.randn(5000)}
    for method in ("dare_linear", "dare_ties"):
        one = merge({"method": method, "drop": 0.5, "seed": 3}, base, experts)
        assert torch.equal(one, merge({"method": method, "drop": 0.5, "seed": 3}, base, experts))
        assert not torch.equal(one, merge({"method": method, "drop": 0.5, "seed": 4}, base, experts))
        assert torch.equal(one, merge({"method": method, "drop": 0.5, "seed": 3}, base, dict(reversed(experts.items()))))


def test_dare_formulas(toy):
    base, experts, taus = toy
    ctx = TensorContext("w", seed=7)
    dropped = {t: dare(tau, 0.4, ctx.generator(t)) for t, tau in taus.items()}
    spec = {"method": "dare_linear", "drop": 0.4, "seed": 7, "scale": 0.5, "weights": {"b": 2.0}}
    got = merge(spec, base, experts)
    torch.testing.assert_close(got, base + 0.5 * (dropped["a"] + 2 * dropped["b"] + dropped["c"]), rtol=0, atol=1e-6)
    got = merge({"method": "dare_ties", "drop": 0.4, "seed": 7}, base, experts)
    torch.testing.assert_close(got, base + elect_disjoint_mean(dropped), rtol=0, atol=1e-6)
    # drop 0 is task arithmetic
    torch.testing.assert_close(merge({"method": "dare_linear", "drop": 0.0}, base, experts),
                               merge({"method": "task_arithmetic"}, base, experts), rtol=0, atol=0)


def test_dare_without_rescale_warns(caplog):
    with caplog.at_level(logging.WARNING):
        get_method({"method": "dare_ties", "drop": 0.5, "rescale": False})
    assert "not DARE" in caplog.text


# --- LED ---------------------------------------------------------------------------------------

@pytest.fixture
def led_masks():
    return {"a": T([1, 0, 0, 0, 1, 0]).bool(), "b": T([0, 1, 0, 0, 0, 1]).bool(), "c": T([0, 0, 1, 0, 0, 0]).bool()}


def test_led_formula(toy, led_masks):
    base, experts, taus = toy
    lam = {"a": 1.0, "b": 0.5, "c": 2.0}
    got = merge({"method": "led", "lambdas": lam}, base, experts, masks=led_masks)
    want = base + sum(lam[t] * led_masks[t] * taus[t] for t in taus)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got[3] == base[3]  # elected by no task: keeps the base value exactly
    # default λ_t = 1
    got = merge({"method": "led", "lambdas": {"b": 0.5}}, base, experts, masks=led_masks)
    torch.testing.assert_close(got, base + taus["a"] * led_masks["a"] + 0.5 * taus["b"] * led_masks["b"]
                               + taus["c"] * led_masks["c"], rtol=0, atol=1e-6)


def test_led_task_order_does_not_matter(toy):
    base, experts, _ = toy
    masks = {t: torch.ones(6, dtype=torch.bool) for t in experts}  # overlapping masks: sums in some order
    for combine in ("sum", "ties", "dare_ties"):
        spec = {"method": "led", "combine": combine, "lambdas": {"a": 0.3, "b": 0.7, "c": 1.1}}
        one = merge(spec, base, experts, masks=masks)
        rev = merge(spec, base, dict(reversed(experts.items())), masks=dict(reversed(masks.items())))
        assert torch.equal(one, rev), combine


def test_led_unscored(toy):
    base, experts, taus = toy
    none = {t: None for t in experts}
    assert torch.equal(merge({"method": "led"}, base, experts, masks=none), base)
    got = merge({"method": "led", "unscored": "task_arithmetic", "lambdas": {"a": 2.0}}, base, experts, masks=none)
    torch.testing.assert_close(got, base + 2 * taus["a"] + taus["b"] + taus["c"], rtol=0, atol=1e-6)
    with pytest.raises(LedmergeError, match="score all tasks"):
        merge({"method": "led"}, base, experts, masks={"a": torch.ones(6, dtype=torch.bool), "b": None, "c": None})


def test_led_combiners_reuse_ties_and_dare(toy, led_masks):
    base, experts, taus = toy
    masked = {t: taus[t] * led_masks[t] for t in taus}
    # disjoint masks: nothing to elect, the ties combiner with density 1 is the plain sum
    torch.testing.assert_close(merge({"method": "led", "combine": "ties"}, base, experts, masks=led_masks),
                               merge({"method": "led"}, base, experts, masks=led_masks), rtol=0, atol=0)
    got = merge({"method": "led", "combine": "ties", "density": 0.5, "scale": 0.5}, base, experts, masks=led_masks)
    trimmed = {t: m * topk_mask(m, 0.5) for t, m in masked.items()}
    torch.testing.assert_close(got, base + 0.5 * elect_disjoint_mean(trimmed), rtol=0, atol=1e-6)
    got = merge({"method": "led", "combine": "dare_ties", "drop": 0.5, "seed": 2}, base, experts, masks=led_masks)
    ctx = TensorContext("w", seed=2)
    dropped = {t: dare(m, 0.5, ctx.generator(t)) for t, m in masked.items()}
    torch.testing.assert_close(got, base + elect_disjoint_mean(dropped), rtol=0, atol=1e-6)


def test_led_lambdas_act_with_every_combiner(toy, led_masks):
    """After Disjoint at most one task is non-zero per weight: λ_t must scale it, also under TIES and DARE-TIES
    (a weighted disjoint mean would divide λ_t back out: λ = {a: 0.5, c: 0.25} merged both at 1)."""
    base, experts, taus = toy
    lam = {"a": 0.5, "b": 1.0, "c": 0.25}
    want = base + sum(lam[t] * led_masks[t] * taus[t] for t in taus)
    for combine in ("sum", "ties"):
        got = merge({"method": "led", "combine": combine, "lambdas": lam}, base, experts, masks=led_masks)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    got = merge({"method": "led", "combine": "dare_ties", "drop": 0.5, "seed": 2, "lambdas": lam}, base, experts,
                masks=led_masks)
    ctx = TensorContext("w", seed=2)
    dropped = {t: dare(taus[t] * led_masks[t], 0.5, ctx.generator(t)) for t in taus}
    torch.testing.assert_close(got, base + sum(lam[t] * dropped[t] for t in taus), rtol=0, atol=1e-6)


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, match", [
    ({"method": "nope"}, "unknown merge method"),
    ({"density": 0.5}, "no 'method'"),
    ({"method": "ties", "density": 0.0}, "density"),
    ({"method": "ties", "density": 1.5}, "density"),
    ({"method": "ties", "density": "half"}, "density"),
    ({"method": "ties", "densty": 0.5}, "densty"),
    ({"method": "ties", "weights": {"a": 0.0}}, "weights"),
    ({"method": "dare_ties", "drop": 1.0}, "drop"),
    ({"method": "dare_linear", "drop": -0.1}, "drop"),
    ({"method": "dare_linear", "seed": "x"}, "seed"),
    ({"method": "dare_linear", "rescale": "no"}, "rescale"),
    ({"method": "task_arithmetic", "scale": True}, "scale"),
    ({"method": "task_arithmetic", "weights": [1, 2]}, "weights"),
    ({"method": "linear", "normalize": 1}, "normalize"),
    ({"method": "led", "combine": "mean"}, "combine"),
    ({"method": "led", "unscored": "zero"}, "unscored"),
    ({"method": "led", "density": 0.5}, "only applies with combine: ties"),
    ({"method": "led", "combine": "ties", "drop": 0.5}, "only applies with combine: dare_ties"),
    ({"method": "led", "combine": "ties", "density": 2}, "'led': density"),
    ({"method": "led", "combine": "dare_ties", "drop": 1}, "'led': drop"),
    ({"method": "led", "combine": "ties", "lambdas": {"a": "high"}}, "lambdas"),
])
def test_bad_specs(spec, match):
    with pytest.raises(LedmergeError, match=match):
        get_method(spec)


def test_spec_tasks_checked(tiny_zoo, tmp_path):
    experts = {t: tiny_zoo[t] for t in ("safety", "math")}
    with pytest.raises(LedmergeError, match=r"'led' has no mask for task\(s\) \['math'\]"):
        merge_models(tiny_zoo["base"], experts, {"method": "led"}, tmp_path / "o", masks={"safety": tmp_path / "m"})
    with pytest.raises(LedmergeError, match="not among the experts"):
        merge_models(tiny_zoo["base"], experts, {"method": "task_arithmetic", "weights": {"code": 1.0}}, tmp_path / "o")
    with pytest.raises(LedmergeError, match="sum to 0"):
        merge_models(tiny_zoo["base"], experts, {"method": "linear", "weights": {"safety": 1, "math": -1}},
                     tmp_path / "o")
    with pytest.raises(LedmergeError, match="does not exist"):
        merge_models(tiny_zoo["base"], experts, {"method": "led"}, tmp_path / "o",
                     masks={"safety": tmp_path / "m1", "math": tmp_path / "m2"})
    assert not (tmp_path / "o").exists()


# --- driver on the tiny zoo --------------------------------------------------------------------

def _linear_names(sd):
    return [n for n, v in sd.items() if v.dim() == 2 and "embed" not in n and "lm_head" not in n]


def test_merge_models_led_end_to_end(tiny_zoo, tmp_path):
    tasks = ("safety", "math", "code")
    base = load_state_dict(tiny_zoo["base"])
    experts = {t: load_state_dict(tiny_zoo[t]) for t in tasks}
    g = torch.Generator().manual_seed(0)
    owner = {n: torch.randint(0, 4, base[n].shape, generator=g) for n in _linear_names(base)}  # 3: nobody
    masks = {}
    for i, t in enumerate(tasks):
        save_masks(tmp_path / f"{t}.safetensors", {n: o == i for n, o in owner.items()})
        masks[t] = tmp_path / f"{t}.safetensors"
    lam = {"safety": 1.0, "math": 0.5, "code": 2.0}
    out = tmp_path / "merged"
    merge_models(tiny_zoo["base"], {t: tiny_zoo[t] for t in tasks}, {"method": "led", "lambdas": lam}, out, masks=masks)

    merged = load_state_dict(out)
    assert merged.keys() == base.keys()
    for n, b in base.items():
        if n in owner:
            want = b + sum(lam[t] * (owner[n] == i) * (experts[t][n] - b) for i, t in enumerate(tasks))
            torch.testing.assert_close(merged[n], want, rtol=0, atol=1e-6)
            assert torch.equal(merged[n][owner[n] == 3], b[owner[n] == 3])
        else:
            assert torch.equal(merged[n], b), n  # unscored: base

    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "- ledmerge" in card and "library_name: transformers" in card
    assert "method: led" in card and "math: 0.5" in card and "mask `code`" in card

    # a wrong-shaped mask is caught before any work
    save_masks(tmp_path / "bad.safetensors", {_linear_names(base)[0]: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(LedmergeError, match=r"shape \[3\], expected .*rebuild the masks"):
        merge_models(tiny_zoo["base"], {"safety": tiny_zoo["safety"]}, {"method": "led"}, tmp_path / "o2",
                     masks={"safety": tmp_path / "bad.safetensors"})


def test_merged_model_loads_and_generates(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ties"
    merge_models(tiny_zoo["base"], {t: tiny_zoo[t] for t in ("safety", "math", "code")},
                 {"method": "ties", "density": 0.5}, out)
    card = (out / "README.md").read_text()
    assert "method: ties" in card and "density: 0.5" in card
    assert true_sha256(tiny_zoo["math"] / "model.safetensors") in card
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("what is 3 + 4", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 4


# --- start-up -----------------------------------------------------------------------------------------------------

HEAVY = ("transformers", "lm_eval", "datasets", "pandas", "matplotlib")


def test_merge_step_imports_only_what_it_needs(tiny_zoo, tmp_path):
    """`ledmerge merge` (task arithmetic and TIES, with a tokenizer directory) and its --help import torch but none
    of the evaluation and report stack: each costs seconds of start-up per merge job (docs/benchmarks.md)."""
    import json
    import subprocess
    import sys

    experts = [f"{t}={tiny_zoo[t]}" for t in ("safety", "math", "code")]
    runs = [["--threads", "1", "merge", "--base", str(tiny_zoo["base"]), "--expert", *experts, "--spec",
             json.dumps(spec), "--out", str(tmp_path / spec["method"]), "--tokenizer", str(tiny_zoo["base"])]
            for spec in ({"method": "task_arithmetic"}, {"method": "ties", "density": 0.5})]
    script = ("import contextlib, io, json, sys\n"
              "from ledmerge.cli import main\n"
              f"for argv in {runs!r}:\n"
              "    with contextlib.redirect_stdout(io.StringIO()):\n"
              "        assert main(argv) == 0, argv\n"
              "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
              "    main(['merge', '--help'])\n"
              f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
              "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported, torch_loaded = proc.stdout.splitlines()[-2:]
    assert json.loads(imported) == [], f"the merge step imported {imported}"
    assert torch_loaded == "True"  # the check saw the merge run
    assert (tmp_path / "ties" / "model.safetensors").is_file()
