"""The Snakemake workflow end to end on the tiny test config (config/test.yaml).

One session-scoped run (the `workflow_run` fixture of tests/conftest.py, shared with tests/test_slurm.py) builds
everything into a temporary directory; the other tests reuse it: the outputs' contents, Snakemake's rerun
decisions after a config change, merge reproducibility, lint.
Snakemake runs with `--directory <tmp>` so its state (.snakemake: locks, metadata) never touches the
repository's own runs.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SNAKEMAKE, Run, env, job_stats, ledmerge, sha256, snakemake, test_config, write_config  # noqa: F401 (re-exported)

from ledmerge.config import validate
from ledmerge.layout import Layout, data_aware_models
from ledmerge.paper import OUTPUTS as PAPER_OUTPUTS

TASKS = ["code", "math", "safety"]
MERGES = ["dare_linear", "dare_ties", "led", "linear", "task_arithmetic", "ties"]
# Data-aware merges of config/test.yaml: CMA-ES for ties and led, and LM-Cocktail, each with and without alignment data.
DATA_AWARE = ["evo_ties_align", "evo_ties_task", "evo_led_align", "evo_led_task", "cocktail_align", "cocktail_task"]
MODELS = ["base"] + TASKS + MERGES + DATA_AWARE
METRICS = ["harmful_rate", "over_refusal_rate", "empty_rate", "utility_refusal_rate", "math_accuracy",
           "code_pass_rate"]
RULES = ["zoo_data", "zoo_base", "zoo_expert", "tokenizer", "calibration", "importance", "election", "disjoint",
         "merge", "evaluation", "report", "paper", "synthetic", "evolve", "cocktail"]
# The sweeps' jobs in each shipped config. config.yaml: 3 rate tuples x {LED's masks, count-matched random,
# count-matched magnitude}, each point its own merge (LED at the paper's rates too: points are named by their own
# values, never the configured merge): the main run's SNIP scores, 3 mask sets (9 elections), 2 controls of each,
# 9 merges; then the safety-only sweep, 3 safety rates x {LED's masks, count-matched random}: 1 more election (safety
# at 0.5; 0.05 and 0.2 are the rate sweep's), 3 mask sets, 3 random controls, 6 merges. test.yaml: a rate sweep of
# math, which reuses every score, and the other tasks' elections (made once, for both points).
SWEEP_JOBS = {
    "config.yaml": {"sweep_election": 10, "sweep_disjoint": 6, "sweep_control": 9, "sweep_merge": 15,
                    "sweep_evaluation": 15, "sweeps_report": 1},
    "test.yaml": {"sweep_election": 4, "sweep_disjoint": 2, "sweep_merge": 2, "sweep_evaluation": 2,
                  "sweeps_report": 1},
}
SWEEP_POINTS = ["led.rate_math-0.2", "led.rate_math-0.3"]  # config/test.yaml's
# Every job of config/test.yaml, by rule.
TEST_JOBS = {"zoo_data": 1, "zoo_base": 1, "zoo_expert": len(TASKS), "tokenizer": 1, "calibration": len(TASKS),
             "importance": 2 * len(TASKS), "election": len(TASKS), "disjoint": 1, "synthetic": 1,
             "evolve": sum(m.startswith("evo_") for m in DATA_AWARE),
             "cocktail": sum(m.startswith("cocktail_") for m in DATA_AWARE),
             "merge": len(MERGES) + len(DATA_AWARE), "evaluation": len(MODELS), "report": 1, "paper": 1,
             **SWEEP_JOBS["test.yaml"]}


@pytest.mark.slow
def test_summary_has_every_model_and_metric(workflow_run):
    with open(workflow_run.results / "report" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    name_col = next(c for c in ("model", "name") if c in rows[0])
    by_name = {r[name_col]: r for r in rows}
    assert sorted(by_name) == sorted(MODELS)
    for name, row in by_name.items():
        for metric in METRICS:
            value = float(row[metric])
            assert 0.0 <= value <= 1.0, (name, metric, value)
    assert (workflow_run.results / "report" / "summary.md").stat().st_size > 0
    # Outcomes, not only shapes (margins far beyond what another CPU's rounding moves): the safety expert refuses
    # what the base answers, its refusals spill onto the utility prompts, and merging brings harm back.
    rate = {name: {m: float(row[m]) for m in METRICS} for name, row in by_name.items()}
    assert rate["safety"]["harmful_rate"] <= rate["base"]["harmful_rate"] - 0.5, rate["safety"]
    assert rate["safety"]["utility_refusal_rate"] > rate["base"]["utility_refusal_rate"], rate["safety"]
    assert rate["task_arithmetic"]["harmful_rate"] >= rate["safety"]["harmful_rate"] + 0.5, rate["task_arithmetic"]


@pytest.mark.slow
def test_figures_and_mask_tables(workflow_run):
    for fig in ("safety_utility", "benchmarks", "mask_overlap", "cmaes_fitness"):
        png = workflow_run.results / "report" / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for table in ("stats.csv", "overlap.csv", "localisation.csv"):
        with open(workflow_run.results / "masks" / table) as fh:
            assert list(csv.DictReader(fh)), table
    with open(workflow_run.results / "masks" / "localisation.csv") as fh:  # float32 scores: mass shares in (0, 1]
        assert all(0 < float(r["mass_expert"]) <= 1 for r in csv.DictReader(fh))
    paper = workflow_run.results / "report" / "paper"
    assert "removed by Disjoint" in (paper / "table_localisation.md").read_text()
    assert (paper / "fig_localisation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_masks_are_bool_and_final_masks_disjoint(workflow_run):
    from ledmerge.led.files import load_masks, tensors_metadata

    final = {}
    for stage in ("elected", "final"):
        for task in TASKS:
            path = workflow_run.results / "masks" / stage / f"{task}.safetensors"
            assert tensors_metadata(path)["mask_encoding"] == "packbits"  # 1 bit per weight on disk
            masks = load_masks(path)
            assert masks, (stage, task)
            assert {t.dtype for t in masks.values()} == {__import__("torch").bool}, (stage, task)
            if stage == "final":
                final[task] = masks
    for name in final[TASKS[0]]:
        overlap = sum(final[t][name].int() for t in TASKS if name in final[t])
        assert int(overlap.max()) <= 1, f"final masks overlap in {name}"


@pytest.mark.slow
def test_importance_scores_cover_both_roles(workflow_run):
    """Every linear weight of the model is scored (config/test.yaml scores no norms, embeddings or LM head), with
    its shape, from the 16 calibration examples; an expert's scores are its own, not the base's."""
    from safetensors import safe_open

    from ledmerge.led.files import load_scores, tensors_metadata

    with safe_open(workflow_run.results / "zoo" / "models" / "base" / "model.safetensors", "pt") as f:
        linear = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()
                  if n.endswith("proj.weight")}
    assert len(linear) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for task in TASKS:
        scores = {}
        for role in ("base", "expert"):
            path = workflow_run.results / "importance" / task / f"{role}.safetensors"
            scores[role] = load_scores(path)
            assert {n: tuple(t.shape) for n, t in scores[role].items()} == linear, (task, role)
            assert tensors_metadata(path)["n_examples"] == "16", (task, role)
            assert all(t.min() >= 0 and t.max() > 0 for t in scores[role].values()), (task, role)
        assert any(not torch.equal(scores["base"][n], scores["expert"][n]) for n in linear), task


@pytest.mark.slow
@pytest.mark.parametrize("merge", MERGES)
def test_merged_model_loads_and_generates(workflow_run, merge):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = workflow_run.results / "merged" / merge
    card = (path / "README.md").read_text()
    assert card.startswith("---") and "ledmerge" in card and f"`{merge}`" in card
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("what is 3 + 4", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0]), str)


@pytest.mark.slow
def test_task_arithmetic_merge_is_its_formula_on_the_zoo(workflow_run):
    """The workflow's task-arithmetic model is base + 1.0 · Σ_t (expert_t − base) (config/test.yaml's scale), tensor by
    tensor, computed here in float64 from the zoo's checkpoints."""
    from safetensors.torch import load_file

    zoo = workflow_run.results / "zoo" / "models"
    base = load_file(zoo / "base" / "model.safetensors")
    experts = [load_file(zoo / t / "model.safetensors") for t in TASKS]
    merged = load_file(workflow_run.results / "merged" / "task_arithmetic" / "model.safetensors")
    assert set(merged) == set(base)
    for name, b in base.items():
        want = b.double() + sum(e[name].double() - b.double() for e in experts)
        torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(merged[n], base[n]) for n in base)


@pytest.mark.slow
def test_every_rule_has_logs(workflow_run):
    logs = workflow_run.results / "logs"
    expected = ["zoo_data", "zoo_base", "tokenizer", "disjoint", "report", "paper", "worker"]
    expected += [f"zoo_expert_{t}" for t in TASKS] + [f"calibration_{t}" for t in TASKS]
    expected += [f"importance_{t}_{r}" for t in TASKS for r in ("base", "expert")] + [f"election_{t}" for t in TASKS]
    expected += [f"merge_{m}" for m in MERGES + DATA_AWARE] + [f"evaluation_{m}" for m in MODELS]
    expected += ["synthetic"] + [f"evolve_{m.removeprefix('evo_')}" for m in DATA_AWARE if m.startswith("evo_")]
    expected += [m for m in DATA_AWARE if m.startswith("cocktail_")] + ["sweeps_report"]
    missing = [name for name in expected if not (logs / f"{name}.log").is_file()]
    assert not missing, missing
    assert sorted(p.stem for p in logs.glob("*.log")) == sorted(expected)
    sweeps = ["election_snip_11_r0.2_math", "election_snip_11_r0.3_math", "election_snip_11_r0.1_safety",
              "election_snip_11_r0.5_code"]
    sweeps += [f"disjoint_snip_11_code0.5_math{r}_safety0.1" for r in ("0.2", "0.3")]
    sweeps += [f"{rule}_{p}" for rule in ("merge", "evaluation") for p in SWEEP_POINTS]
    assert sorted(p.name.removesuffix(".log") for p in (logs / "sweeps").glob("*.log")) == sorted(sweeps)


@pytest.mark.slow
def test_every_job_has_a_benchmark_record_and_the_report_its_costs(workflow_run):
    """Every job wrote its Snakemake benchmark record (<results>/benchmarks/<rule>/<job>.tsv, timed); run_costs has
    one row per rule with its jobs (all but the report's and the paper's, which come after it), what the rule asked
    for (config/test.yaml's resources: the schema's defaults), and, this run's jobs being the warm worker's, no CPU
    time or memory (the records see the worker's client)."""
    records = sorted((workflow_run.results / "benchmarks").glob("*/*.tsv"))
    per_rule = {}
    for path in records:
        per_rule[path.parent.name] = per_rule.get(path.parent.name, 0) + 1
        with open(path) as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        assert float(row["s"]) > 0 and {"max_rss", "cpu_time"} <= set(row), path
    assert per_rule == TEST_JOBS
    assert Path(Layout({"results": str(workflow_run.results)}).benchmark("importance", "math", "base")) in records
    with open(workflow_run.results / "report" / "run_costs.csv") as fh:
        costs = {row["rule"]: row for row in csv.DictReader(fh)}
    assert {rule: int(row["jobs"]) for rule, row in costs.items()} == {
        rule: n for rule, n in TEST_JOBS.items() if rule not in ("report", "paper")}
    assert all(float(row["wall_s_sum"]) > 0 and row["cpu_s_sum"] == row["max_rss_mb_max"] == "" for row in costs.values())
    cfg = validate(test_config(workflow_run.results))
    merge = cfg["resources"]["merge"]
    assert (float(costs["merge"]["mem_mb"]), float(costs["merge"]["runtime_min"])) == (merge["mem_mb"], merge["runtime"])
    assert float(costs["sweep_merge"]["threads"]) == cfg["threads"] and costs["zoo_data"]["mem_mb"] == ""
    assert "not shown: the warm worker" in (workflow_run.results / "report" / "run_costs.md").read_text()
    assert (workflow_run.results / "report" / "run_costs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_evaluation_outputs_per_model(workflow_run):
    for model in MODELS:
        metrics = json.loads((workflow_run.results / "eval" / model / "metrics.json").read_text())
        flat = metrics.get("metrics", metrics)
        for key in METRICS:
            assert 0.0 <= float(flat[key]) <= 1.0, (model, key)
        assert (workflow_run.results / "eval" / model / "generations.jsonl").stat().st_size > 0


@pytest.mark.slow
def test_paired_table_pairs_led_with_every_baseline(workflow_run):
    """table_paired: LED against every other configured merge on the same prompts, its discordant counts those of
    the per-prompt outcomes the evaluations recorded; test.yaml repeats nothing over zoo seeds."""
    paper = workflow_run.results / "report" / "paper"
    md, tex = (paper / "table_paired.md").read_text(), (paper / "table_paired.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and "exact McNemar" in tex.splitlines()[0]
    rates = {m: json.loads((workflow_run.results / "eval" / m / "metrics.json").read_text())["rates"]
             for m in MERGES}
    led = rates["led"]["harmful_rate"]
    for base in (m for m in MERGES if m != "led"):
        row = next(line for line in md.splitlines() if line.startswith(f"| led | {base} | harmful rate ↓ |"))
        n, b, c = (int(row.split(" | ")[i].strip("*")) for i in (3, 7, 8))
        other = rates[base]["harmful_rate"]
        assert n == led["n"] == len(led["outcomes"]) and other["prompts"] == led["prompts"]
        assert b == sum(x > y for x, y in zip(led["outcomes"], other["outcomes"])) and b - c == led["k"] - other["k"]
    assert not any(line.startswith(("| base", "| safety", "| evo_", "| cocktail")) for line in md.splitlines())
    assert "No sweep repeats an LED merge and a baseline" in md


@pytest.mark.slow
def test_data_aware_outputs(workflow_run):
    """Synthetic data with its drop counts; each search's recipe is what the merge rule merged."""
    synthetic = workflow_run.results / "synthetic"
    summary = json.loads((synthetic / "summary.json").read_text())
    assert summary["kept"]["alignment"] > 0 and summary["kept"]["task"] > 0 and summary["dropped"]
    rows = [json.loads(line) for line in (synthetic / "data.jsonl").read_text().splitlines()]
    assert {tuple(sorted(r)) for r in rows} == {("prompt", "response", "source", "type")}
    assert len(rows) == summary["search"] + summary["heldout"] == sum(summary["kept"].values())
    assert all(r["response"] for r in rows)
    for name in DATA_AWARE:
        out = workflow_run.results / "data_aware" / name
        recipe = json.loads((out / "recipe.json").read_text())
        card = (workflow_run.results / "merged" / name / "README.md").read_text()
        assert f"`{recipe['method']}`" in card
        spec = yaml.safe_load(card.split("```yaml")[1].split("```")[0])
        assert {k: spec[k] for k in recipe} == recipe
        if name.startswith("evo_"):
            with open(out / "history.csv") as fh:
                history = list(csv.DictReader(fh))
            assert len(history) >= 8
            assert json.loads((out / "search.json").read_text())["objective"] == name.rsplit("_", 1)[1]


@pytest.mark.slow
def test_complete_run_is_up_to_date(workflow_run):
    proc = snakemake(workflow_run.workdir, workflow_run.configfile, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job_stats(proc.stdout) == {}, proc.stdout[-3000:]


@pytest.mark.slow
def test_lambda_change_reruns_only_the_led_merge_and_downstream(workflow_run, tmp_path):
    cfg = test_config(workflow_run.results, tasks__math__lambda=0.5)
    proc = snakemake(workflow_run.workdir, write_config(tmp_path / "c.yaml", cfg), "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = job_stats(proc.stdout)
    assert set(stats) <= {"merge", "evaluation", "report", "paper", "all", "sweep_merge", "sweep_evaluation",
                          "sweeps_report"}, stats
    assert stats.get("merge") == 1, stats  # only `led` uses λ
    assert stats.get("evaluation") == 1 and stats.get("report") == 1 and stats.get("paper") == 1, stats
    # The sweep's points vary led's rate and keep its λ: merged again on the same masks.
    assert stats.get("sweep_merge") == stats.get("sweep_evaluation") == len(SWEEP_POINTS), stats
    assert f"{workflow_run.results}/merged/led" in proc.stdout
    assert "Params have changed since last execution" in proc.stdout  # the params rerun trigger (default)


@pytest.mark.slow
def test_rate_change_reruns_election_not_importance(workflow_run, tmp_path):
    cfg = test_config(workflow_run.results, tasks__math__rate=0.3)
    proc = snakemake(workflow_run.workdir, write_config(tmp_path / "c.yaml", cfg), "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = job_stats(proc.stdout)
    assert stats.get("election") == 1, stats
    assert "importance" not in stats and "calibration" not in stats and not any(r.startswith("zoo") for r in stats)
    # The LED merge, and the data-aware LED searches and their merges (they read the masks).
    evo_led = [m for m in DATA_AWARE if m.startswith("evo_led_")]
    assert stats.get("disjoint") == 1 and stats.get("merge") == 1 + len(evo_led), stats
    assert stats.get("evolve") == len(evo_led) and "synthetic" not in stats and "cocktail" not in stats, stats
    # The sweep's points set math's rate themselves (0.3 is one of them): none is renamed or recomputed.
    assert not any(rule.startswith("sweep") for rule in stats), stats


@pytest.mark.slow
def test_sweeps_table_has_a_row_per_point(workflow_run):
    from ledmerge.led.files import tensors_metadata

    with open(workflow_run.results / "report" / "sweeps.csv") as fh:
        rows = list(csv.DictReader(fh))
    kept = [f"kept_{t}" for t in TASKS]  # what each point's final masks keep of each task vector
    assert list(rows[0]) == ["sweep", "model", "rate_math", *METRICS, "mean_utility", *kept,
                             *(f"n_{m}" for m in METRICS)]
    assert all(0.0 < float(r[k]) < 1.0 for r in rows for k in kept), rows
    assert [(r["sweep"], r["model"], float(r["rate_math"])) for r in rows] == [
        ("rate", SWEEP_POINTS[0], 0.2), ("rate", SWEEP_POINTS[1], 0.3)]
    for row in rows:
        assert all(0.0 <= float(row[m]) <= 1.0 for m in METRICS)
        assert [int(row[f"n_{m}"]) for m in METRICS] == [10, 10, 10, 20, 10, 10]  # utility refusals: math + code
    for point in SWEEP_POINTS:  # each its own merge, with the rates it was elected at
        mask = workflow_run.results / "sweeps" / "masks" / "elected" / f"snip_11_r{point[-3:]}" / "math.safetensors"
        assert float(tensors_metadata(mask)["rate"]) == float(point[-3:])
        assert (workflow_run.results / "sweeps" / "merged" / point / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("change, expected", [
    # one value of the rate sweep: that point's election, masks, merge and evaluation, and the tables
    ({"rate": {"merge": "led", "rate": {"math": [0.2, 0.35]}}},
     {"sweep_election": 1, "sweep_disjoint": 1, "sweep_merge": 1, "sweep_evaluation": 1, "sweeps_report": 1}),
    # a λ sweep added at a swept rate: merged on the masks already there
    ({"rate": {"merge": "led", "rate": {"math": [0.2, 0.3]}},
      "lam": {"merge": "led", "rate": {"math": [0.2]}, "lambda": {"math": [0.5]}}},
     {"sweep_merge": 1, "sweep_evaluation": 1, "sweeps_report": 1}),
])
def test_changing_one_sweep_value_reruns_only_that_branch(workflow_run, tmp_path, change, expected):
    cfg = test_config(workflow_run.results, sweeps=change)
    proc = snakemake(workflow_run.workdir, write_config(tmp_path / "c.yaml", cfg), "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # paper: its ablations; report: the sweep jobs' benchmark records
    assert job_stats(proc.stdout) == {**expected, "report": 1, "paper": 1, "all": 1}, proc.stdout[-3000:]
    # the unchanged point is not merged again
    assert not any(out.endswith(f"sweeps/merged/{SWEEP_POINTS[0]}") for out in planned_outputs(proc.stdout))


@pytest.mark.slow
def test_ablations_overlay_plans_re_trained_zoos(tmp_path):
    """config/ablations.yaml on top of config/config.yaml: its sweeps join the default one; zoo seeds 1 and 2
    re-train a base and three experts each, scored for snip and random; no sweep scores the main zoo with snip."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results"] = str(tmp_path / "results")
    (tmp_path / "work").mkdir()
    proc = subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path / "work"),
                           "--configfile", str(write_config(tmp_path / "c.yaml", cfg)),
                           str(REPO / "config" / "ablations.yaml"), "-n", "--cores", "2"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = job_stats(proc.stdout)
    assert stats["sweep_zoo_base"] == 2 and stats["sweep_zoo_expert"] == 2 * len(TASKS), stats
    # magnitude, gradient, wanda, random on the main zoo; snip and random on each re-trained one
    assert stats["sweep_importance"] == (4 + 2 * 2) * 2 * len(TASKS), stats
    assert stats["importance"] == 2 * len(TASKS) and stats["sweeps_report"] == 1, stats


@pytest.mark.slow
def test_dare_merge_is_reproducible_by_seed(workflow_run, tmp_path):
    zoo = workflow_run.results / "zoo" / "models"
    experts = [f"{t}={zoo / t}" for t in TASKS]

    def merge(out: Path, seed: int) -> str:
        spec = json.dumps({"method": "dare_ties", "drop": 0.5, "seed": seed})
        proc = ledmerge("merge", "--base", str(zoo / "base"), "--expert", *experts, "--spec", spec, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return sha256(out / "model.safetensors")

    first, again, other = merge(tmp_path / "a", 0), merge(tmp_path / "b", 0), merge(tmp_path / "c", 1)
    assert first == again
    assert first != other
    # The workflow's own dare_ties merge (seed 0, same inputs) has the same bytes.
    assert first == sha256(workflow_run.results / "merged" / "dare_ties" / "model.safetensors")


@pytest.mark.slow
def test_lint_default_config_is_clean(tmp_path):
    proc = subprocess.run([str(SNAKEMAKE), "--lint", "--snakefile", str(REPO / "Snakefile")], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Lints for" not in out, out[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["config.yaml", "test.yaml"])
def test_dry_run_plans_every_rule(tmp_path, name):
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    cfg["results"] = str(tmp_path / "results")
    (tmp_path / "work").mkdir()
    proc = snakemake(tmp_path / "work", write_config(tmp_path / "c.yaml", cfg), "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = job_stats(proc.stdout)
    data_aware = data_aware_models(validate(cfg))
    # The default config ships with the data-aware merges switched off (data_aware.enabled); the test one on.
    assert bool(data_aware) == (name == "test.yaml") and (name != "test.yaml" or data_aware == DATA_AWARE)
    expected_rules = set(RULES) if data_aware else set(RULES) - {"synthetic", "evolve", "cocktail"}
    assert set(stats) == expected_rules | set(SWEEP_JOBS[name]) | {"all"}, stats
    assert {rule: stats[rule] for rule in SWEEP_JOBS[name]} == SWEEP_JOBS[name]
    assert stats["merge"] == len(MERGES) + len(data_aware) and stats["importance"] == 2 * len(TASKS)
    assert stats["evaluation"] == 1 + len(TASKS) + len(MERGES) + len(data_aware)
    # The report reads the benchmark record of every planned job but its own and the paper's, and of no other job.
    jobs = planned_jobs(proc.stdout)
    report = next(job for job in jobs if job["rule"] == "report")
    assert {f for f in report["input"] if "/benchmarks/" in f} == {
        job["benchmark"] for job in jobs if job["rule"] not in ("report", "paper", "all")}
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_dry_run_plans_a_merge_given_as_a_mergekit_file(tmp_path):
    """A merges entry {mergekit: file} is translated at parse time: the merge job gets the ledmerge spec."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results"] = str(tmp_path / "results")
    models = tmp_path / "results" / "zoo" / "models"
    (tmp_path / "ties.yml").write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(models / "base"), "parameters": {"lambda": 0.5},
        "models": [{"model": str(models / t), "parameters": {"density": 0.3, "weight": 1.0}} for t in TASKS]}))
    cfg["merges"] = {"ties_mk": {"mergekit": str(tmp_path / "ties.yml")}}
    cfg["sweeps"] = {}  # the default sweep varies led
    (tmp_path / "work").mkdir()
    proc = snakemake(tmp_path / "work", write_config(tmp_path / "c.yaml", cfg), "-n", "-p", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job_stats(proc.stdout)["merge"] == 1
    assert """'{"density": 0.3, "method": "ties", "normalize": true, "scale": 0.5}'""" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
def test_dry_run_plans_mergealign_on_the_instruct_base(tmp_path):
    """config/mergealign.yaml: the searches and their merges take the aligned expert as the base
    (data_aware.base_model: safety), the configured merges the run's base; per-layer genes, normalize false."""
    cfg = yaml.safe_load((REPO / "config" / "mergealign.yaml").read_text())
    cfg["results"] = str(tmp_path / "results")
    (tmp_path / "work").mkdir()
    proc = snakemake(tmp_path / "work", write_config(tmp_path / "c.yaml", cfg), "-n", "-p", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = job_stats(proc.stdout)
    assert stats["evolve"] == 4 and "cocktail" not in stats and stats["merge"] == 3 + 4
    models = f"{tmp_path}/results/zoo/models"
    searches = re.findall(r" evolve --method \S+ --mask\s+--base (\S+) .*--options '(\{.*?\})'", proc.stdout)
    assert len(searches) == 4 and all(base == f"{models}/safety" for base, _ in searches)
    options = json.loads(searches[0][1])
    assert (options["genes"], options["normalize"], options["weight_min"], options["select"]) == (
        "per_layer", False, -1.0, "heldout")
    merges = dict((out, base) for base, out in re.findall(r" merge --base (\S+) .* --out \S+/merged/(\S+) ",
                                                           proc.stdout))
    assert merges["ties"] == f"{models}/base" and merges["evo_ties_align"] == f"{models}/safety", merges


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")
@pytest.mark.parametrize("merge, mergekit_config", [
    ("task_arithmetic", {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0, "normalize": False}}),
    ("ties", {"merge_method": "ties", "parameters": {"normalize": True, "rescale": False, "int8_mask": False,
                                                     "lambda": 1.0}}),
])
def test_workflow_merges_agree_with_mergekit_on_the_trained_zoo(workflow_run, tmp_path, merge, mergekit_config):
    """The workflow's own TA and TIES outputs, on its trained toy zoo, equal mergekit's (settings as in
    test_merge_mergekit.py, which explains why they are the identical configuration)."""
    pytest.importorskip("mergekit")
    from test_merge_mergekit import run_mergekit

    from ledmerge.checkpoint import load_state_dict

    spec = test_config(workflow_run.results)["merges"][merge]
    assert spec.get("scale", 1.0) == 1.0 and spec.get("density", 0.5) == 0.5  # the settings mirrored below
    zoo = workflow_run.results / "zoo" / "models"
    params = {"weight": 1.0, **({"density": 0.5} if merge == "ties" else {})}
    config = {**mergekit_config, "base_model": str(zoo / "base"), "dtype": "float32", "out_dtype": "float32",
              "models": [{"model": str(zoo / t), "parameters": params} for t in ("code", "math", "safety")]}
    want = run_mergekit(config, tmp_path / "mergekit")
    got = load_state_dict(workflow_run.results / "merged" / merge)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def planned_outputs(stdout: str) -> set[str]:
    """Every output path of the jobs a dry run lists."""
    return {p for line in stdout.splitlines() if line.strip().startswith("output: ")
            for p in line.strip()[len("output: "):].split(", ")}


def planned_jobs(stdout: str) -> list[dict]:
    """The jobs a dry run lists: rule, input and output (lists of paths) and benchmark (a path, or None)."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", stdout):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        if rule:
            fields = dict(re.findall(r"^ +(input|output|benchmark): (.*)$", block, re.M))
            jobs.append({"rule": rule.group(1), "input": fields.get("input", "").split(", "),
                         "output": fields.get("output", "").split(", "), "benchmark": fields.get("benchmark")})
    return jobs


def real_model_run(tmp_path: Path, tiny_zoo: dict, data_aware: bool = False) -> Run:
    """config/test.yaml on a copy of the tiny models (the code expert sharded; with `data_aware`, the base's copy
    `generator` writes the synthetic data), its outputs present and up to date without running a job: the dry run's
    outputs are created empty, then `snakemake --touch` orders their times."""
    import shutil

    from conftest import make_tiny_model

    models = tmp_path / "models"
    for name in ("base", "safety", "math"):
        shutil.copytree(tiny_zoo[name], models / name)
    shutil.copytree(tiny_zoo["base"], models / "generator")
    make_tiny_model(models / "code", seed=3, noise_from=models / "base", noise=0.02, max_shard_size="20KB")
    assert len(list((models / "code").glob("model-*.safetensors"))) > 1
    run = Run(tmp_path)
    run.workdir.mkdir()
    cfg = test_config(run.results, base_model=str(models / "base"), data_aware__enabled=data_aware,
                      data_aware__synthetic__generator=str(models / "generator"), sweeps={})  # sweeps: their own tests
    for task in TASKS:
        cfg["tasks"][task]["model"] = str(models / task)
    write_config(run.configfile, cfg)
    proc = snakemake(run.workdir, run.configfile, "-n", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for out in planned_outputs(proc.stdout):  # directory outputs (models, tokenizers) have no suffix
        path = Path(out)
        if "." in path.name:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    jobs = [job for job in planned_jobs(proc.stdout) if job["benchmark"]]
    for job in jobs:  # the report reads every job's benchmark record
        Path(job["benchmark"]).parent.mkdir(parents=True, exist_ok=True)
        Path(job["benchmark"]).touch()
    # Up to date now: the tests' own dry run after a rewrite plans exactly the rewritten model's readers, which it
    # could not if anything else were still out of date.
    proc = snakemake(run.workdir, run.configfile, "--touch", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in jobs:  # `--touch` leaves benchmark records alone: each as old as its job's outputs
        when = min(os.stat(out).st_mtime for out in job["output"])
        os.utime(job["benchmark"], (when, when))
    run.models = models
    return run


def rewrite_in_place(path: Path) -> None:
    """New bytes (the last weight's last byte flipped: still a valid checkpoint) written into the same file, so
    the directory's own time stamp stays as it was, and a modification time after every output's."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    with open(path, "r+b") as fh:
        fh.write(data)
    later = time.time() + 2
    os.utime(path, (later, later))


@pytest.mark.slow
@pytest.mark.parametrize("expert, weights", [("safety", "model.safetensors"), ("code", "model-00001-of-*")])
def test_replaced_expert_checkpoint_reruns_exactly_its_readers(tmp_path, tiny_zoo, expert, weights):
    """Overwriting an expert's weights (a single file, or one shard of a sharded checkpoint) reruns exactly what
    depends on that expert, and nothing of the other experts' scoring."""
    run = real_model_run(tmp_path, tiny_zoo)
    rewrite_in_place(next((run.models / expert).glob(weights)))
    proc = snakemake(run.workdir, run.configfile, "-n", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = run.results
    expected = {f"{r}/importance/{expert}/expert.safetensors", f"{r}/masks/elected/{expert}.safetensors",
                f"{r}/masks/stats.csv", f"{r}/masks/overlap.csv", f"{r}/masks/localisation.csv"}
    expected |= {f"{r}/masks/final/{t}.safetensors" for t in TASKS} | {f"{r}/merged/{m}" for m in MERGES}
    expected |= {f"{r}/eval/{m}/{f}" for m in [expert] + MERGES for f in ("metrics.json", "generations.jsonl")}
    expected |= {f"{r}/report/{f}" for f in ("summary.csv", "summary.md", "safety_utility.png", "benchmarks.png",
                                             "mask_overlap.png", "run_costs.csv", "run_costs.md", "run_costs.png")}
    expected |= {f"{r}/report/paper/{f}" for f in PAPER_OUTPUTS}
    assert planned_outputs(proc.stdout) == expected, proc.stdout[-3000:]
    assert job_stats(proc.stdout) == {"importance": 1, "election": 1, "disjoint": 1, "merge": len(MERGES),
                                      "evaluation": 1 + len(MERGES), "report": 1, "paper": 1, "all": 1}


@pytest.mark.slow
def test_replaced_generator_checkpoint_reruns_the_data_aware_merges(tmp_path, tiny_zoo):
    """The synthetic data's generator is a model too: overwriting it reruns the synthetic data and every search,
    data-aware merge and evaluation after it, and nothing of LED or the configured merges."""
    run = real_model_run(tmp_path, tiny_zoo, data_aware=True)
    rewrite_in_place(run.models / "generator" / "model.safetensors")
    proc = snakemake(run.workdir, run.configfile, "-n", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evolved = [m for m in DATA_AWARE if m.startswith("evo_")]
    assert job_stats(proc.stdout) == {"synthetic": 1, "evolve": len(evolved), "cocktail": len(DATA_AWARE) - len(evolved),
                                      "merge": len(DATA_AWARE), "evaluation": len(DATA_AWARE), "report": 1, "paper": 1,
                                      "all": 1}
