"""Paired statistics of LED against the baselines (ledmerge.paper.paired) and the paired table: exact McNemar, the
paired bootstrap and Student's t against hand computations, and table_paired from hand-made per-prompt files."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from ledmerge.errors import LedmergeError
from ledmerge.evaluation.runner import _rate
from ledmerge.paper import OUTPUTS, PAIRED_TABLE
from ledmerge.paper.build import build_paper
from ledmerge.paper.paired import (
    across_seeds,
    bootstrap_difference,
    discordant,
    mcnemar_exact,
    outcomes_of,
    per_prompt,
    t_interval,
    t_quantile,
    t_sf2,
)

# ---------------------------------------------------------------- McNemar

@pytest.mark.parametrize("b, c, p", [
    (1, 9, 2 * (1 + 10) / 2 ** 10),   # 2·Σ_{k≤1} C(10,k)/2^10 = 0.0215
    (9, 1, 2 * (1 + 10) / 2 ** 10),   # symmetric
    (0, 6, 2 / 2 ** 6),               # 0.03125
    (0, 5, 2 / 2 ** 5),               # 0.0625: five one-sided pairs are not enough at 5%
    (2, 8, 2 * (1 + 10 + 45) / 2 ** 10),
    (5, 5, 1.0),                      # 2·P(X ≤ 5) > 1: capped
    (0, 0, 1.0),                      # no discordant pair: no evidence
    (0, 1, 1.0),
])
def test_mcnemar_exact_hand_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, abs=1e-15)


def test_mcnemar_1_9_is_0_0215_and_bad_counts():
    assert round(mcnemar_exact(1, 9), 4) == 0.0215
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_discordant_counts():
    led = [1, 1, 0, 0, 1, 0]
    base = [1, 0, 1, 0, 0, 0]
    assert discordant(led, base) == (2, 1)
    with pytest.raises(ValueError, match="differ in length"):
        discordant([1, 0], [1])


# ---------------------------------------------------------------- the bootstrap

def test_bootstrap_identical_pairs_give_a_zero_width_interval():
    assert bootstrap_difference(0, 0, 50, seed=0) == (0.0, 0.0)
    assert bootstrap_difference(10, 0, 10, seed=3) == (1.0, 1.0)  # every pair LED-only: every resample too


def test_bootstrap_is_seeded_and_covers_the_estimate():
    a = bootstrap_difference(3, 12, 60, seed=0)
    assert a == bootstrap_difference(3, 12, 60, seed=0)  # same seed, same bits
    lo, hi = a
    assert lo < (3 - 12) / 60 < hi and hi <= 0.0 + 1e-12  # 12 against 3 discordant: the interval stays below 0
    assert all(math.isnan(v) for v in bootstrap_difference(0, 0, 0, seed=0))  # no prompts: no interval
    with pytest.raises(ValueError):
        bootstrap_difference(40, 30, 60, seed=0)


def test_bootstrap_matches_the_prompt_index_bootstrap():
    """The multinomial shortcut has the distribution of resampling prompt indices: same mean and spread as an
    explicit index bootstrap of the same pairs (and the normal approximation's width)."""
    n, b, c = 80, 14, 6
    led = np.array([1] * b + [0] * c + [1] * 20 + [0] * (n - b - c - 20))
    base = np.array([0] * b + [1] * c + [1] * 20 + [0] * (n - b - c - 20))
    rng = np.random.default_rng(7)
    idx = rng.integers(0, n, size=(20_000, n))
    explicit = (led[idx].mean(1) - base[idx].mean(1))
    lo, hi = bootstrap_difference(b, c, n, seed=0, resamples=20_000)
    e_lo, e_hi = np.quantile(explicit, [0.025, 0.975])
    assert lo == pytest.approx(e_lo, abs=1.5 / n) and hi == pytest.approx(e_hi, abs=1.5 / n)
    d = (b - c) / n
    se = math.sqrt(((b + c) / n - d * d) / n)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)


# ---------------------------------------------------------------- Student's t

@pytest.mark.parametrize("df, q", [
    (1, math.tan(math.pi * 0.475)),          # Cauchy: 12.7062
    (2, 0.95 / math.sqrt(2 * 0.975 * 0.025)),  # df 2: (2p − 1)/√(2p(1 − p)) = 4.3027
    (4, 2.7764451),                          # tables
    (10, 2.2281389),
    (30, 2.0422725),
])
def test_t_quantile_hand_values(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, rel=1e-7)
    assert t_quantile(0.025, df) == pytest.approx(-q, rel=1e-7)
    assert t_sf2(q, df) == pytest.approx(0.05, rel=1e-6)


def test_t_matches_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 12, 60):
        for q in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9)
        for t in (0.1, 1.0, 3.0, 20.0):
            assert t_sf2(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9, abs=1e-15)


def test_t_interval_hand_values():
    mean, lo, hi, p = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, m 3, df 2
    half = 4.302652729749464 / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    t = 2.0 / (1 / math.sqrt(3))
    assert p == pytest.approx(1 - t / math.sqrt(t * t + 2))  # df 2: P(|T| ≥ t) = 1 − t/√(t² + 2) = 0.0742
    assert math.isnan(t_interval([0.4])[1])  # one seed: no interval
    mean, lo, hi, p = t_interval([0.2, 0.2, 0.2])
    assert lo == hi == mean == pytest.approx(0.2) and math.isnan(p)  # equal differences: zero width, no test


# ---------------------------------------------------------------- from per-prompt files

def _report(rates: dict[str, str], prompts: str = "same") -> dict:
    """metrics.json as the evaluation writes it: rates with their 0/1 outcomes and the hash of their prompts."""
    return {"metrics": {m: f.count("1") / len(f) for m, f in rates.items()},
            "rates": {m: {"k": f.count("1"), "n": len(f), "outcomes": f, "prompts": f"{prompts}-{m}"}
                      for m, f in rates.items()}}


def test_rate_records_outcomes_that_pair():
    rows = [("harmful", i, {"prompt": f"p{i}"}, flag) for i, flag in enumerate([True, False, True])]
    rate = _rate(rows)
    assert (rate["k"], rate["n"], rate["outcomes"]) == (2, 3, "101")
    flags, prompts = outcomes_of({"rates": {"harmful_rate": rate}}, "harmful_rate")
    assert flags.tolist() == [True, False, True] and prompts == rate["prompts"] == _rate(rows)["prompts"]
    other = _rate([("harmful", i, {"prompt": f"q{i}"}, f) for i, (*_, f) in enumerate(rows)])
    assert other["prompts"] != rate["prompts"]  # other prompts, other hash
    assert outcomes_of({"rates": {"harmful_rate": {"k": 1, "n": 3}}}, "harmful_rate") is None  # older files


def test_per_prompt_rows_by_hand():
    # harmful: LED refuses 9 that task arithmetic answers, answers 1 it refuses: b = 1, c = 9 of 20
    led = _report({"harmful_rate": "1" * 5 + "1" + "0" * 9 + "0" * 5, "math_accuracy": "1100"})
    ta = _report({"harmful_rate": "1" * 5 + "0" + "1" * 9 + "0" * 5, "math_accuracy": "1010"})
    rows, missing = per_prompt({"led": led, "ta": ta}, ["led"], ["ta"],
                               ["harmful_rate", "math_accuracy", "code_pass_rate"], seed=0)
    assert missing == ["code_pass_rate"]
    harm = rows.set_index("metric").loc["harmful_rate"]
    assert (harm["b"], harm["c"], harm["n"]) == (1, 9, 20)
    assert harm["led_rate"] == 6 / 20 and harm["baseline_rate"] == 14 / 20 and harm["diff"] == -8 / 20
    assert harm["p"] == pytest.approx(0.021484375)
    assert harm["lo"] < -0.4 < harm["hi"] < 0
    math_row = rows.set_index("metric").loc["math_accuracy"]
    assert (math_row["b"], math_row["c"], math_row["diff"], math_row["p"]) == (1, 1, 0.0, 1.0)
    ta["rates"]["math_accuracy"]["prompts"] = "other"
    with pytest.raises(LedmergeError, match="different prompts"):
        per_prompt({"led": led, "ta": ta}, ["led"], ["ta"], ["math_accuracy"], seed=0)


def _seed_sweeps(led_harm=(0.3, 0.5, 0.9), ta_harm=(0.8, 0.9, 0.7)):
    rows = []
    for loc in ("snip", "random"):
        for s, h in enumerate(led_harm):
            rows.append({"sweep": "zoo_seed_led", "model": f"led.location-{loc}.zoo_seed-{s}", "location": loc,
                         "zoo_seed": s, "harmful_rate": h + (0.05 if loc == "random" else 0), "mean_utility": 0.3})
    for s, h in enumerate(ta_harm):
        rows.append({"sweep": "zoo_seed_task_arithmetic", "model": f"task_arithmetic.zoo_seed-{s}",
                     "zoo_seed": s, "harmful_rate": h, "mean_utility": 0.4 + 0.1 * s})
    rows.append({"sweep": "rate", "model": "led.rate_math-0.2", "location": "snip", "zoo_seed": 0,
                 "harmful_rate": 0.1, "mean_utility": 0.1})  # one seed: not a seed sweep
    return pd.DataFrame(rows)


def test_across_seeds_by_hand():
    rows = across_seeds(_seed_sweeps(), ["led"], ["location", "zoo_seed"], ["harmful_rate", "mean_utility"])
    assert sorted(set(rows["led"])) == ["led (location random)", "led (location snip)"]
    assert set(rows["baseline"]) == {"task_arithmetic"}
    snip = rows[(rows["led"] == "led (location snip)")].set_index("metric")
    d = np.array([0.3 - 0.8, 0.5 - 0.9, 0.9 - 0.7])  # −0.5, −0.4, +0.2
    half = 4.302652729749464 * d.std(ddof=1) / math.sqrt(3)
    assert snip.loc["harmful_rate", "n"] == 3
    assert snip.loc["harmful_rate", ["diff", "lo", "hi"]].tolist() == pytest.approx(
        [d.mean(), d.mean() - half, d.mean() + half])
    assert math.isnan(snip.loc["harmful_rate", "b"])
    du = np.array([0.3 - 0.4, 0.3 - 0.5, 0.3 - 0.6])
    assert snip.loc["mean_utility", "diff"] == pytest.approx(du.mean())
    assert across_seeds(pd.DataFrame(), ["led"], [], ["harmful_rate"]).empty
    assert across_seeds(_seed_sweeps(), [], ["location", "zoo_seed"], ["harmful_rate"]).empty  # no LED merge


# ---------------------------------------------------------------- the table

SAFETY = ["harmful_rate", "over_refusal_rate", "empty_rate", "utility_refusal_rate"]


def _run(tmp_path, led_harm: str, ta_harm: str):
    """A summary and metrics.json files of a base, an expert and three merges (led, task_arithmetic, ties)."""
    other = {"over_refusal_rate": "0" * 10, "empty_rate": "0" * 20, "utility_refusal_rate": "0" * 8,
             "math_accuracy": "1100", "code_pass_rate": "1010"}
    harm = {"base": "1" * 20, "safety": "0" * 20, "led": led_harm, "task_arithmetic": ta_harm, "ties": ta_harm}
    kinds = {"base": "base", "safety": "expert", "led": "merge", "task_arithmetic": "merge", "ties": "merge"}
    paths, rows = {}, []
    for name, h in harm.items():
        report = _report({"harmful_rate": h, **other})
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(report))
        rows.append({"model": name, "kind": kinds[name], **report["metrics"],
                     "mean_utility": (report["metrics"]["math_accuracy"] + report["metrics"]["code_pass_rate"]) / 2})
    summary = pd.DataFrame(rows)[["model", "kind", *SAFETY, "math_accuracy", "code_pass_rate", "mean_utility"]]
    summary.to_csv(tmp_path / "summary.csv", index=False)
    pd.DataFrame([{"task": "safety", "layer": 0, "numel": 10, "elected_fraction": 0.1, "kept_fraction": 0.1}]).to_csv(
        tmp_path / "stats.csv", index=False)
    pd.DataFrame([{"task_a": "safety", "task_b": "math", "layer": 0, "numel": 10, "overlap_fraction": 0.0}]).to_csv(
        tmp_path / "overlap.csv", index=False)
    return paths


def _build(tmp_path, paths, **kw):
    out = tmp_path / "paper"
    build_paper(tmp_path / "summary.csv", paths, tmp_path / "stats.csv", tmp_path / "overlap.csv", out, **kw)
    return (out / f"{PAIRED_TABLE}.tex").read_text(), (out / f"{PAIRED_TABLE}.md").read_text()


def test_paired_table_from_hand_made_files(tmp_path):
    paths = _run(tmp_path, "1" * 6 + "0" * 14, "1" * 5 + "0" + "1" * 9 + "0" * 5)  # b = 1, c = 9
    sweeps = _seed_sweeps().assign(over_refusal_rate=0.0, empty_rate=0.0, utility_refusal_rate=0.0,
                                   **{f"n_{m}": 20 for m in SAFETY})
    sweeps.to_csv(tmp_path / "sweeps.csv", index=False)
    tex, md = _build(tmp_path, paths, led=["led"], seed=0, sweeps_csv=tmp_path / "sweeps.csv")
    assert f"{PAIRED_TABLE}.tex" in OUTPUTS and f"{PAIRED_TABLE}.md" in OUTPUTS
    lines = tex.splitlines()
    assert lines[0].startswith("% ") and "exact McNemar" in lines[0]
    assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
    assert r"\begin{tabular}{lllrrrrrrr}" in tex and r"\hline" not in tex
    harm = [line.split(" & ") for line in lines if line.startswith(r"led & task\_arithmetic & harmful rate")]
    assert len(harm) == 1
    cells = harm[0]
    assert cells[3:6] == ["20", "0.300", "0.700"] and cells[7:9] == ["1", "9"]
    lo, hi = bootstrap_difference(1, 9, 20, seed=0)
    assert cells[6] == rf"\textbf{{-0.400}} {{\scriptsize [{lo:+.3f}, {hi:+.3f}]}}".replace("-", "$-$")
    assert cells[9] == r"\textbf{0.021} \\"  # p = 0.0215 < 0.05: bold
    # every baseline merge is paired, experts and the base are not; metrics without a 0/1 per prompt (mean utility)
    # only across seeds
    pairs = {tuple(line.split(" & ")[:2]) for line in lines if line.startswith("led & ")}
    assert pairs == {("led", r"task\_arithmetic"), ("led", "ties")}
    same = [line for line in lines if line.startswith(r"led & ties & over-refusal")]
    assert same and " & 0 & 0 & 1.000" in same[0] and r"\textbf" not in same[0]  # no discordant pair: p = 1
    md_harm = [line for line in md.splitlines() if line.startswith("| led | task_arithmetic | harmful rate ↓")]
    assert md_harm and f"| **-0.400** [{lo:+.3f}, {hi:+.3f}] |" in md_harm[0] and "| **0.021** |" in md_harm[0]
    # the seed panel: LED (snip and random) against task arithmetic over three zoo seeds, with t intervals
    assert "Across zoo seeds" in md and "| led (location snip) | task_arithmetic | harmful rate ↓ | 3 |" in md
    assert "| led (location snip) | task_arithmetic | mean utility ↑ | 3 |" in md
    # same inputs, same bytes
    again = _build(tmp_path, paths, led=["led"], seed=0, sweeps_csv=tmp_path / "sweeps.csv")
    assert again == (tex, md)
    assert "seed 1)" in _build(tmp_path, paths, led=["led"], seed=1, sweeps_csv=tmp_path / "sweeps.csv")[1]


def test_paired_table_placeholders_and_errors(tmp_path):
    paths = _run(tmp_path, "1" * 20, "1" * 20)
    tex, md = _build(tmp_path, paths)  # no LED merge named
    assert "no LED merge named" in md and "No sweep repeats an LED merge" in md and r"\bottomrule" in tex
    tex, md = _build(tmp_path, paths, led=["led"])
    assert "| led | ties | harmful rate ↓ | 20 | 1.000 | 1.000 | 0.000 [0.000, 0.000] | 0 | 0 | 1.000 |" in md
    with pytest.raises(LedmergeError, match="not models of the summary"):
        _build(tmp_path, paths, led=["nope"])
    # metrics.json files from before per-prompt outcomes: the table says so instead of failing
    for path in paths.values():
        report = json.loads(path.read_text())
        for rate in report["rates"].values():
            del rate["outcomes"]
        path.write_text(json.dumps(report))
    tex, md = _build(tmp_path, paths, led=["led"])
    assert "No per-prompt outcomes" in md and "rerun their evaluations" in tex
