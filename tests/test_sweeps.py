"""Sweeps: expansion of the config's `sweeps` into points and their cached branches (ledmerge.sweeps), its config
errors, and the long table results/report/sweeps.csv (report.sweeps_table). The workflow side (the jobs a sweep
plans, and what a changed sweep value reruns) is in tests/test_workflow.py."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import yaml

from ledmerge.config import check, validate
from ledmerge.errors import LedmergeError
from ledmerge.layout import AXES, PER_TASK, Layout
from ledmerge.schema import schema
from ledmerge.summary import sweeps_table
from ledmerge.sweeps import branches, expand, swept_columns

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
MAIN = {"safety": 0.1, "math": 0.4, "code": 0.5}


def config(**sweeps) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    cfg["sweeps"] = sweeps
    return validate(cfg)


def test_rate_sweep_reuses_the_scores_and_the_unchanged_elections():
    points = expand(config(r={"merge": "led", "rate": {"math": [0.2, 0.4]}}))
    # 0.4 is the configured led's rate: that point is still named by its own value, and merged as its own
    assert [p.name for p in points] == ["led.rate_math-0.2", "led.rate_math-0.4"]
    p = points[0]
    assert p.scores is None  # the main run's scores
    assert p.elections == {"code": "snip_11_r0.5", "math": "snip_11_r0.2", "safety": "snip_11_r0.1"}
    assert p.masks == "snip_11_code0.5_math0.2_safety0.1"
    assert points[1].elections == {t: f"snip_11_r{r}" for t, r in MAIN.items()}  # the sweeps' own, never the main's
    assert points[1].masks == "snip_11_code0.5_math0.4_safety0.1"
    assert p.values["rate_math"] == 0.2 and p.values["rate_safety"] == 0.1
    # the other tasks' elections are shared by both points: computed once
    assert sorted(branches(points).elections) == [("snip_11_r0.1", "safety"), ("snip_11_r0.2", "math"),
                                                  ("snip_11_r0.4", "math"), ("snip_11_r0.5", "code")]


def test_rate_tuples_times_locations():
    rates = [{"safety": 0.05, "math": 0.2, "code": 0.25}, MAIN]
    points = expand(config(rl={"merge": "led", "location": ["snip", "random_shared_draws"], "rate": rates}))
    assert [p.name for p in points] == [  # every value the sweep sets, snip too; tasks in sorted order
        "led.location-snip.rate_code-0.25.rate_math-0.2.rate_safety-0.05",
        "led.location-snip.rate_code-0.5.rate_math-0.4.rate_safety-0.1",
        "led.location-random_shared_draws.rate_code-0.25.rate_math-0.2.rate_safety-0.05",
        "led.location-random_shared_draws.rate_code-0.5.rate_math-0.4.rate_safety-0.1"]
    assert [p.scores for p in points] == [None, None, "random_shared_draws", "random_shared_draws"]  # one new score set
    assert points[3].elections == {t: f"random_shared_draws_11_r{r}" for t, r in MAIN.items()}


def test_rate_grid_is_the_product_over_the_tasks():
    points = expand(config(g={"merge": "led", "rate": {"math": [0.2, 0.3], "code": [0.25, 0.5]}}))
    assert [(p.values["rate_code"], p.values["rate_math"]) for p in points] == [
        (0.25, 0.2), (0.25, 0.3), (0.5, 0.2), (0.5, 0.3)]


def test_lambda_sweep_reuses_the_masks_and_changes_only_the_spec():
    points = expand(config(lam={"merge": "led", "lambda": [{"math": 0.5}, {"math": 0.5, "code": 2}]}))
    assert [p.name for p in points] == ["led.lambda_math-0.5", "led.lambda_code-2.0.lambda_math-0.5"]
    assert all(p.masks == "snip_11_code0.5_math0.4_safety0.1" and p.scores is None for p in points)  # one mask set
    assert points[1].spec["lambdas"] == {"safety": 1.0, "math": 0.5, "code": 2.0}


def test_pattern_sweep_reuses_the_scores():
    points = expand(config(p={"merge": "led", "pattern": ["11", "x1"]}))
    assert points[1].name == "led.pattern-x1" and points[1].scores is None
    assert points[1].masks == "snip_x1_code0.5_math0.4_safety0.1"


def test_baseline_sweeps_vary_the_spec_without_masks():
    points = expand(config(d={"merge": "ties", "density": [0.2, 0.5]}, p={"merge": "dare_ties", "drop": [0.3]}))
    assert [p.name for p in points] == ["ties.density-0.2", "ties.density-0.5", "dare_ties.drop-0.3"]
    assert points[0].spec == {"method": "ties", "density": 0.2, "scale": 1.0}
    assert not points[0].uses_masks and points[0].masks is None
    assert "location" not in points[0].values and points[0].values["density"] == 0.2


def test_zoo_seeds_branch_everything_but_the_configured_seed():
    points = expand(config(z={"merge": "led", "zoo_seed": [0, 1]}))
    assert [p.name for p in points] == ["led.zoo_seed-0", "led.zoo_seed-1"]
    assert points[0].zoo_seed is None and points[0].scores is None  # the config's seed: the main zoo and scores
    seeded = points[1]
    assert seeded.zoo_seed == 1 and seeded.scores == "snip_seed1"
    assert seeded.elections == {t: f"snip_seed1_11_r{r}" for t, r in MAIN.items()}


def test_shared_points_and_columns():
    cfg = config(a={"merge": "led", "rate": {"math": [0.2]}}, b={"merge": "led", "location": ["random_shared_draws"],
                                                                 "rate": [{"math": 0.2}]})
    a, b = expand(cfg)
    assert a.name == "led.rate_math-0.2" and b.name == "led.location-random_shared_draws.rate_math-0.2"
    assert swept_columns(cfg) == ["location", "rate_math"]
    # a sweep that sets the same values (here as a tuple rather than a grid) shares the point: one merge
    cfg = config(a={"merge": "led", "rate": {"math": [0.2]}}, c={"merge": "led", "rate": [{"math": 0.2}]})
    points = expand(cfg)
    assert [p.name for p in points] == ["led.rate_math-0.2"] * 2 and list(branches(points).points) == [a.name]


def test_ablations_overlay_expands():
    cfg = copy.deepcopy(DEFAULT)
    cfg["sweeps"].update(yaml.safe_load((REPO / "config" / "ablations.yaml").read_text())["sweeps"])
    check(validate(cfg))
    points = expand(cfg)
    assert {p.sweep for p in points} >= {"rate_control", "location", "zoo_seed_led", "ties_density"}
    names = {p.name for p in points}
    assert len(names) == len(points) and not names & set(cfg["merges"])  # no point is a configured merge
    assert {p.name for p in points if p.sweep == "location"} == {
        f"led.location-{m}" for m in ("snip", "magnitude", "gradient", "wanda", "random_shared_draws")}


def _pinned(cfg: dict) -> dict:
    """Each point's name with every path of its own: merge, evaluation, and its scores, elections and masks."""
    paths = Layout(cfg)
    tasks = sorted(cfg["tasks"])
    return {p.name: {"merged": paths.point_dir(p.name), "metrics": paths.point_eval(p.name, "metrics.json"),
                     "scores": [paths.branch_scores(p.scores, t, r) for t in tasks for r in ("base", "expert")]
                     if p.uses_masks else [],
                     "elected": [paths.branch_elected(p.elections[t], t) for t in tasks] if p.uses_masks else [],
                     "masks": [paths.branch_mask(p.masks, t) for t in tasks] if p.uses_masks else [],
                     "spec": p.spec, "values": p.values}
            for p in expand(cfg)}


def test_changing_the_configured_merge_renames_no_point():
    """A point is named by its own values, not the configured merge's: raising tasks.code.rate (0.5 -> 0.45, the
    configured led's rate that the default sweep's middle tuple also sets) renames no point and moves none of its
    paths, so nothing of it is recomputed. Points that take the code rate from the config (the ablations' location
    and λ sweeps) keep their names and merge directories; only the masks they are merged on follow the new rate."""
    before = copy.deepcopy(DEFAULT)
    before["sweeps"].update(yaml.safe_load((REPO / "config" / "ablations.yaml").read_text())["sweeps"])
    after = copy.deepcopy(before)
    after["tasks"]["code"]["rate"] = 0.45
    old, new = _pinned(validate(before)), _pinned(validate(after))
    assert list(old) == list(new)  # the same names, in the same order
    assert "led.control-none.rate_code-0.5.rate_math-0.4.rate_safety-0.1" in old  # once equal to led, now not
    assert {n: (p["merged"], p["metrics"]) for n, p in old.items()} == \
        {n: (p["merged"], p["metrics"]) for n, p in new.items()}
    sets_rates = [p.name for p in expand(validate(copy.deepcopy(before))) if p.sweep == "rate_control"]
    assert len(sets_rates) == 9 and all(old[n] == new[n] for n in sets_rates)  # every path, the spec, the values
    inherits = "led.lambda_safety-0.5"  # merged on masks at the configured rates: its content changes, not its name
    assert old[inherits]["masks"] != new[inherits]["masks"] and new[inherits]["values"]["rate_code"] == 0.45


def test_the_schema_has_the_layout_axes():
    """The sweep axes are ledmerge.layout's; the schema's sweep definition lists the same, in the same order."""
    sweep = schema()["definitions"]["sweep"]["properties"]
    assert list(sweep) == ["merge", *AXES]
    assert [a for a in AXES if sweep[a].get("$ref") == "#/definitions/per_task_sweep"] == list(PER_TASK)


@pytest.mark.parametrize("sweep, key", [
    ({"merge": "led", "rates": [0.1]}, "sweeps.bad': Additional properties are not allowed ('rates'"),  # schema
    ({"merge": "led", "location": ["snap"]}, "sweeps.bad.location"),
    ({"merge": "fancy", "rate": {"math": [0.2]}}, "sweeps.bad.merge"),
    ({"merge": "led"}, "sweeps.bad"),
    ({"merge": "ties", "rate": {"math": [0.2]}}, "sweeps.bad.rate"),
    ({"merge": "led", "rate": {"maths": [0.2]}}, "sweeps.bad.rate"),
    ({"merge": "led", "rate": {"math": [1.5]}}, "sweeps.bad.rate"),
    ({"merge": "ties", "density": [2.0]}, "sweeps.bad"),
    ({"merge": "led", "drop": [0.3]}, "sweeps.bad"),  # drop needs combine dare_ties
])
def test_bad_sweeps_are_one_line_errors(sweep, key):
    cfg = copy.deepcopy(DEFAULT)
    cfg["sweeps"] = {"bad": sweep}
    with pytest.raises(LedmergeError) as info:
        validate(cfg)
        check(cfg)
    assert key in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_swept_wanda_cannot_score_norms():
    cfg = config(w={"merge": "led", "location": ["wanda"]})
    cfg["importance"]["include_norms"] = True
    with pytest.raises(LedmergeError, match="sweeps.w.location.*include_norms"):
        check(cfg)


def _metrics(path: Path, harmful: float, n: dict, utility=("math_accuracy", "code_pass_rate")) -> str:
    """A metrics.json as the evaluation writes it: each rate with its count and size."""
    values = {"harmful_rate": harmful, "over_refusal_rate": 0.0, "empty_rate": 0.0, "utility_refusal_rate": 0.0,
              **dict(zip(utility, (0.5, 0.25)))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": values, "utility": list(utility),
                                "rates": {m: {"k": round(v * n[m]), "n": n[m]} for m, v in values.items()}}))
    return str(path)


N = {"harmful_rate": 52, "over_refusal_rate": 58, "empty_rate": 52, "utility_refusal_rate": 120,
     "math_accuracy": 60, "code_pass_rate": 60}


def test_sweeps_table_columns_and_counts(tmp_path):
    points = [
        {"sweep": "r", "model": "led.rate_math-0.2", "values": {"rate_math": 0.2, "location": "snip", "x": 1},
         "metrics": _metrics(tmp_path / "a" / "metrics.json", 0.75, N)},
        {"sweep": "r", "model": "led", "values": {"rate_math": 0.4, "location": "snip"},
         "metrics": _metrics(tmp_path / "b" / "metrics.json", 1.0, {**N, "code_pass_rate": 0})},
    ]
    out = tmp_path / "report" / "sweeps.csv"
    sweeps_table(points, ["location", "rate_math"], out)
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    rates = ["harmful_rate", "over_refusal_rate", "empty_rate", "utility_refusal_rate", "math_accuracy",
             "code_pass_rate"]
    assert list(rows[0]) == ["sweep", "model", "location", "rate_math", *rates, "mean_utility",
                             *(f"n_{m}" for m in rates)]
    assert rows[0]["model"] == "led.rate_math-0.2" and float(rows[0]["harmful_rate"]) == 0.75
    assert float(rows[0]["mean_utility"]) == 0.375 and rows[0]["n_harmful_rate"] == "52"
    assert rows[1]["n_code_pass_rate"] == "0" and rows[0]["n_utility_refusal_rate"] == "120"


def test_sweeps_table_takes_the_evaluations_utility_columns(tmp_path):
    """A config's own utility columns (lm-eval tasks) are the table's, averaged into mean_utility."""
    utility = ("gsm8k_accuracy", "humaneval_pass_rate")
    n = {**N, "gsm8k_accuracy": 10, "humaneval_pass_rate": 8}
    point = {"sweep": "r", "model": "led", "values": {}, "metrics": _metrics(tmp_path / "m.json", 0.5, n, utility)}
    df = sweeps_table([point], [], tmp_path / "sweeps.csv")
    assert list(df.columns[df.columns.get_loc("utility_refusal_rate") + 1:df.columns.get_loc("mean_utility")]) == \
        list(utility)
    assert df["mean_utility"].iloc[0] == 0.375 and df["n_humaneval_pass_rate"].iloc[0] == 8
    assert "math_accuracy" not in df


def test_sweeps_table_refuses_a_missing_metrics_file(tmp_path):
    points = [{"sweep": "r", "model": "led", "values": {}, "metrics": _metrics(tmp_path / "a.json", 0.75, N)}]
    out = tmp_path / "sweeps.csv"
    with pytest.raises(LedmergeError, match="run its evaluation first"):
        sweeps_table([{**points[0], "metrics": str(tmp_path / "none.json")}], [], out)


def test_sweeps_table_shows_what_each_points_masks_keep(tmp_path):
    """Patterns and locations elect very different counts: each LED point's kept fraction per task sits beside its
    metrics (from its masks' stats.csv), and the ablation tables show it beside every row."""
    from ledmerge.paper.build import ablation_table

    stats = tmp_path / "stats.csv"
    stats.write_text("task,tensor,numel,elected,kept\nmath,a,100,10,4\nmath,b,300,30,8\nsafety,a,100,5,5\n")
    points = [
        {"sweep": "p", "model": "led.pattern-11", "values": {"pattern": "11"}, "mask_stats": str(stats),
         "metrics": _metrics(tmp_path / "a" / "metrics.json", 0.75, N)},
        {"sweep": "p", "model": "led.pattern-x1", "values": {"pattern": "x1"}, "mask_stats": None,
         "metrics": _metrics(tmp_path / "b" / "metrics.json", 1.0, N)},
    ]
    df = sweeps_table(points, ["pattern"], tmp_path / "sweeps.csv")
    assert df["kept_math"].iloc[0] == 0.03 and df["kept_safety"].iloc[0] == 0.05  # (4 + 8) / 400, 5 / 100
    assert df["kept_math"].isna().iloc[1]
    for text in ablation_table(df, "pattern"):  # Markdown and LaTeX
        assert "kept (math)" in text.lower() and "0.03" in text, text
