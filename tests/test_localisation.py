"""Localisation statistics (ledmerge.led.election.localisation, localisation.csv) on hand-made scores."""

from __future__ import annotations

import csv

import pytest
import torch

from ledmerge.led.election import disjoint_files, elect_files, localisation
from ledmerge.led.files import save_scores


def test_mass_share_is_exact_on_a_hand_case():
    scores = torch.tensor([10.0, 5, 1, 1, 1, 1, 1, 0, 0, 0])
    loc = localisation(scores, scores, 0.2)  # top 2 of 10: 15 of 20
    assert loc["mass_expert"] == pytest.approx(0.75) and loc["mass_base"] == pytest.approx(0.75)
    assert loc["top_expert"] == 2 and loc["overlap"] == 2
    assert localisation(scores, None, 0.2, raw=False)["mass_expert"] is None  # rank codes: no mass
    assert localisation(scores, None, 0.2)["overlap"] is None  # pattern x1: no base


def test_overlap_of_a_constructed_case():
    n = 100
    expert = torch.zeros(n)
    expert[:10] = torch.arange(10, 0, -1).float()  # top 10% = positions 0-9
    base = torch.zeros(n)
    base[5:15] = 1.0  # top 10% = positions 5-14
    expert[10:] += 0.01
    base[base == 0] = 0.001
    loc = localisation(expert, base, 0.1)
    assert (loc["top_expert"], loc["top_base"], loc["overlap"]) == (10, 10, 5)


def test_overlap_of_independent_scores_is_r_squared_n():
    g = torch.Generator().manual_seed(0)
    n, r, trials = 10_000, 0.1, 20
    overlaps = [localisation(torch.rand(n, generator=g) + 1e-6, torch.rand(n, generator=g) + 1e-6, r)["overlap"]
                for _ in range(trials)]
    mean = sum(overlaps) / trials  # E = k²/n = r²·n = 100, sd of the mean ≈ 2
    assert mean == pytest.approx(r * r * n, rel=0.06)


def test_localisation_csv_from_election_and_disjoint(tmp_path):
    g = torch.Generator().manual_seed(1)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (16, 16), "model.layers.0.mlp.down_proj.weight": (16, 32)}
    elected = {}
    for task, rate in (("safety", 0.1), ("math", 0.4)):
        for role in ("expert", "base"):
            save_scores(tmp_path / f"{task}_{role}.safetensors",
                        {n: torch.rand(s, generator=g) + 1e-3 for n, s in shapes.items()}, encoding="float32")
        elected[task] = tmp_path / f"elected_{task}.safetensors"
        elect_files(tmp_path / f"{task}_expert.safetensors", tmp_path / f"{task}_base.safetensors", rate, "11",
                    elected[task])
    out = {t: tmp_path / f"final_{t}.safetensors" for t in elected}
    disjoint_files(elected, out, tmp_path / "stats.csv", tmp_path / "overlap.csv", tmp_path / "loc.csv")
    rows = list(csv.DictReader(open(tmp_path / "loc.csv")))
    stats = {(r["task"], r["tensor"]): r for r in csv.DictReader(open(tmp_path / "stats.csv"))}
    assert len(rows) == 4
    for r in rows:
        s = stats[r["task"], r["tensor"]]
        assert (r["elected"], r["kept"]) == (s["elected"], s["kept"])
        assert int(r["overlap"]) == int(r["elected"])  # pattern 11: the election is the overlap
        n, e, k = int(r["numel"]), int(r["elected"]), int(r["kept"])
        assert float(r["removed_share"]) == pytest.approx((e - k) / e)
        assert float(r["chance"]) == pytest.approx(int(r["top_base"]) / n)
        assert 0 < float(r["mass_expert"]) < 1

    from ledmerge.paper.build import localisation_rows, localisation_table

    agg = localisation_rows(tmp_path / "loc.csv")
    assert list(agg["module"][agg["task"] == "safety"]) == ["q_proj", "down_proj"]  # module types in layer order
    q = agg[(agg["task"] == "math") & (agg["module"] == "q_proj")].iloc[0]
    row = next(r for r in rows if r["task"] == "math" and "q_proj" in r["tensor"])
    assert q["overlap_share"] == pytest.approx(int(row["overlap"]) / int(row["top_expert"]))
    tex, md = localisation_table(tmp_path / "loc.csv")
    assert "q_proj" in md and "removed by Disjoint" in md and r"\toprule" in tex


def test_safety_only_figure_takes_the_points_with_the_other_lambdas_zero():
    import pandas as pd

    from ledmerge.paper.build import safety_only_figure, safety_only_rows

    rows = [{"sweep": "s", "model": f"m{i}", "control": c, "rate_safety": r, "lambda_math": lm, "lambda_code": 0.0,
             "harmful_rate": 0.5, "n_harmful": 10, "over_refusal_rate": 0.1, "n_benign": 10, "empty_rate": 0.0,
             "utility_refusal_rate": 0.0, "math_accuracy": 0.5, "n_math": 10, "mean_utility": 0.5} for i, (c, r, lm) in enumerate(
                 [("none", 0.1, 0.0), ("none", 0.3, 0.0), ("random", 0.1, 0.0), ("random", 0.3, 0.0),
                  ("none", 0.1, 1.0)])]
    df = pd.DataFrame(rows)
    assert list(safety_only_rows(df)["model"]) == ["m0", "m1", "m2", "m3"]
    assert safety_only_rows(df.drop(columns=["lambda_math", "lambda_code"])).empty
    assert safety_only_figure(df).axes[0].get_xlabel() == "safety rate r"  # a plot, not the placeholder
