"""One LED chain checked by hand, through the files and the CLI: score files written here (hand-chosen values with
ties and zero scores, rank16 and float32) -> `ledmerge election` -> `ledmerge disjoint` -> `ledmerge merge` with λ,
compared with the merged tensor computed in this file from the definitions alone (no product code: a plain sort
for TopR, Python sets for Disjoint, the LED formula θ_0 + Σ_t λ_t M_t ⊙ (θ_t − θ_0) for the merge)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load_file
from test_cli_errors import ledmerge

from ledmerge.led.files import save_scores

TENSOR = "model.layers.0.mlp.down_proj.weight"  # shape [16, 32] in the tiny models
RATES = {"math": 0.25, "code": 0.5}
LAMBDAS = {"math": 0.5, "code": 2.0}


def top_r(scores: list[float], rate: float) -> set[int]:
    """The definition: among the positive scores, the ⌈r·n⌉ largest (value descending, then lowest index); every
    positive one when fewer are positive; a zero score is never elected."""
    k = math.ceil(Fraction(repr(rate)) * len(scores))
    positive = [i for i, s in enumerate(scores) if s > 0]
    return set(sorted(positive, key=lambda i: (-scores[i], i))[:k])


def hand_scores(n: int, seed: int, zeros: int) -> list[float]:
    """Scores with a deliberate structure: a block of `zeros` zero scores, and many ties (39 values over the
    entries), so every cut-off falls inside a run of equal values."""
    g = torch.Generator().manual_seed(seed)
    values = [float(v) for v in torch.randint(1, 40, (n,), generator=g)]
    for i in range(seed * 37 % n, seed * 37 % n + zeros):
        values[i % n] = 0.0
    return values


@pytest.mark.integration  # CLI steps in this process, a few seconds
def test_led_chain_through_the_files_equals_the_hand_computed_merge(tmp_path, tiny_zoo):
    base = load_file(str(tiny_zoo["base"] / "model.safetensors"))
    experts = {t: load_file(str(tiny_zoo[t] / "model.safetensors")) for t in RATES}
    shape = base[TENSOR].shape
    n = shape.numel()
    scores = {}
    for i, task in enumerate(RATES):
        for j, role in enumerate(("base", "expert")):
            # the code task's base has fewer positive scores than its rate elects: every positive one, no zero
            values = hand_scores(n, seed=1 + 2 * i + j, zeros=300 if (task, role) == ("code", "base") else 60)
            scores[task, role] = values
            save_scores(tmp_path / f"{task}_{role}.safetensors", {TENSOR: torch.tensor(values).reshape(shape)},
                        encoding="rank16" if task == "math" else "float32")

    for task, rate in RATES.items():
        proc = ledmerge("election", "--expert", tmp_path / f"{task}_expert.safetensors", "--base",
                        tmp_path / f"{task}_base.safetensors", "--rate", rate, "--out", tmp_path / f"elected_{task}")
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = ledmerge("disjoint", "--elected", *(f"{t}={tmp_path / f'elected_{t}'}" for t in RATES),
                    "--out", *(f"{t}={tmp_path / f'final_{t}'}" for t in RATES),
                    "--stats", tmp_path / "stats.csv", "--overlap", tmp_path / "overlap.csv")
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec = {"method": "led", "lambdas": LAMBDAS, "unscored": "base"}
    proc = ledmerge("merge", "--base", tiny_zoo["base"], "--expert", *(f"{t}={tiny_zoo[t]}" for t in RATES),
                    "--mask", *(f"{t}={tmp_path / f'final_{t}'}" for t in RATES), "--spec", json.dumps(spec),
                    "--out", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))

    # By hand: Election (pattern 11), Disjoint, then the LED merge of the one scored tensor.
    elected = {t: top_r(scores[t, "base"], r) & top_r(scores[t, "expert"], r) for t, r in RATES.items()}
    final = {t: elected[t] - set().union(*(elected[u] for u in RATES if u != t)) for t in RATES}
    assert all(final.values()) and elected["math"] & elected["code"]  # the case exercises both steps
    assert sum(v > 0 for v in scores["code", "base"]) < math.ceil(RATES["code"] * n)  # and the zero-score rule
    b = base[TENSOR].double().reshape(-1)
    expected = b.clone()
    for t in RATES:
        tau = experts[t][TENSOR].double().reshape(-1) - b
        for i in final[t]:
            expected[i] += LAMBDAS[t] * tau[i]
    expected = expected.to(base[TENSOR].dtype).reshape(shape)
    torch.testing.assert_close(merged[TENSOR], expected, rtol=0, atol=1e-6)
    untouched = [i for i in range(n) if not any(i in final[t] for t in RATES)]
    assert torch.equal(merged[TENSOR].reshape(-1)[untouched], base[TENSOR].reshape(-1)[untouched])
    for name in base:  # unscored tensors keep the base (unscored: base)
        if name != TENSOR:
            assert torch.equal(merged[name], base[name]), name
