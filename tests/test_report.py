"""The report: summary table from hand-made metric JSONs, figures from hand-made mask CSVs."""

import json

import pandas as pd
import pytest

from ledmerge.errors import LedmergeError
from ledmerge.summary import build_report, wilson

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = {
    "base": ("base", {"harmful_rate": 0.9, "over_refusal_rate": 0.0, "math_accuracy": 0.1, "code_pass_rate": 0.0}),
    "safety": ("expert", {"harmful_rate": 0.05, "over_refusal_rate": 0.2, "math_accuracy": 0.1, "code_pass_rate": 0.1}),
    "math": ("expert", {"harmful_rate": 0.8, "over_refusal_rate": 0.0, "math_accuracy": 0.9, "code_pass_rate": 0.1}),
    "led": ("merge", {"harmful_rate": 0.1, "over_refusal_rate": 0.1, "math_accuracy": 0.8, "code_pass_rate": 0.6,
                      "gsm8k/exact_match": 0.5}),
}


def _metrics(tmp_path):
    paths = {}
    for name, (_, metrics) in MODELS.items():
        paths[name] = tmp_path / f"{name}.json"
        n = {"harmful": 50, "benign": 40, "math": 20, "code": 20} if name != "base" else {}
        paths[name].write_text(json.dumps({"model_dir": name, "metrics": metrics, "n": n}))
    return paths, {name: kind for name, (kind, _) in MODELS.items()}


def _mask_csvs(tmp_path):
    stats, overlap = [], []
    for layer in range(3):
        for module, numel in (("q_proj", 256), ("up_proj", 512)):
            tensor = f"model.layers.{layer}.mlp.{module}.weight"
            for task, frac in (("safety", 0.1), ("math", 0.4)):
                stats.append({"task": task, "tensor": tensor, "layer": layer, "module": module, "numel": numel,
                              "elected": int(frac * numel), "kept": int(frac * numel * 0.8),
                              "elected_fraction": frac, "kept_fraction": frac * 0.8})
            overlap.append({"task_a": "safety", "task_b": "math", "tensor": tensor, "layer": layer, "module": module,
                            "numel": numel, "overlap": 10, "overlap_fraction": 10 / numel, "jaccard": 0.05})
    stats.append({"task": "safety", "tensor": "model.embed_tokens.weight", "layer": -1, "module": "embed_tokens",
                  "numel": 1000, "elected": 0, "kept": 0, "elected_fraction": 0.0, "kept_fraction": 0.0})
    pd.DataFrame(stats).to_csv(tmp_path / "stats.csv", index=False)
    pd.DataFrame(overlap).to_csv(tmp_path / "overlap.csv", index=False)
    return tmp_path / "stats.csv", tmp_path / "overlap.csv"


def test_report_tables_and_figures(tmp_path):
    paths, kinds = _metrics(tmp_path)
    stats, overlap = _mask_csvs(tmp_path)
    out = tmp_path / "report"
    build_report(paths, kinds, out, mask_stats_csv=stats, mask_overlap_csv=overlap)

    df = pd.read_csv(out / "summary.csv")
    # these metrics.json files predate the empty and utility-refusal rates: their columns are there, empty
    assert list(df.columns[:9]) == ["model", "kind", "harmful_rate", "over_refusal_rate", "empty_rate",
                                    "utility_refusal_rate", "math_accuracy", "code_pass_rate", "mean_utility"]
    assert df["empty_rate"].isna().all()
    assert "gsm8k/exact_match" in df.columns
    assert list(df["model"]) == ["base", "safety", "math", "led"]  # base, experts, merges
    led = df.set_index("model").loc["led"]
    assert led["mean_utility"] == pytest.approx(0.7) and led["kind"] == "merge"
    assert pd.isna(df.set_index("model").loc["base", "gsm8k/exact_match"])

    text = (out / "summary.md").read_text()
    main, intervals = text.split("## 95% Wilson intervals")
    table = [line for line in main.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4 and "harmful rate (↓)" in table[0]
    assert "| led | merge | 0.100 |" in "\n".join(table) and "–" in "\n".join(table)
    lo, hi = wilson(5, 50)  # led: harmful rate 0.1 of 50 prompts
    assert f"| led | merge | 0.100 [{lo:.3f}, {hi:.3f}] |" in intervals
    assert "| base | base | 0.900 | 0.000 | – | – |" in intervals  # no set sizes: the rate alone

    for name in ("safety_utility", "benchmarks", "mask_overlap"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000, name
        assert (out / f"{name}.pdf").stat().st_size > 1000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_report_without_masks_and_errors(tmp_path):
    paths, kinds = _metrics(tmp_path)
    build_report(paths, kinds, tmp_path / "r")
    assert (tmp_path / "r" / "safety_utility.png").exists() and not (tmp_path / "r" / "mask_overlap.png").exists()
    with pytest.raises(LedmergeError, match="kind"):
        build_report(paths, {**kinds, "led": "soup"}, tmp_path / "r2")
    with pytest.raises(LedmergeError, match="does not exist"):
        build_report({**paths, "x": tmp_path / "nope.json"}, {**kinds, "x": "merge"}, tmp_path / "r3")
    with pytest.raises(LedmergeError, match="both"):
        build_report(paths, kinds, tmp_path / "r4", mask_stats_csv=tmp_path / "stats.csv")


# Snakemake 9's benchmark TSV (snakemake.benchmark.BenchmarkRecord): one header line, one row per job run.
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(root, rule: str, job: str, s: float, rss, cpu) -> str:
    path = root / "benchmarks" / rule / f"{job}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BENCH_HEADER + f"{s}\t0:00:{int(s):02d}\t{rss}\t900.00\t{rss}\t{rss}\t1.00\t2.00\t90.00\t{cpu}\n")
    return str(path)


def test_run_costs_per_rule_beside_the_request(tmp_path):
    """Per rule: wall and CPU summed, averaged, largest; peak memory averaged and largest; the request beside it
    (runtime in minutes); a job that ended before its first sample (NA) counts for wall time only."""
    from ledmerge.run_costs import build_run_costs

    records = [_bench(tmp_path, "merge", "led", 10.0, 400.0, 8.0), _bench(tmp_path, "merge", "ties", 30.0, 600.0, 24.0),
               _bench(tmp_path, "tokenizer", "tokenizer", 0.5, "NA", "NA"),
               _bench(tmp_path, "evaluation", "base", 120.0, 2000.0, 100.0)]
    requested = {"merge": {"threads": 2, "mem_mb": 1000, "runtime": 60}, "evaluation": {"threads": 1, "runtime": 1},
                 "tokenizer": {"threads": 1}}
    df = build_run_costs(records, tmp_path / "report", requested).set_index("rule")
    assert list(df.index) == ["merge", "tokenizer", "evaluation"]  # first record's order
    merge = df.loc["merge"]
    assert (merge["jobs"], merge["wall_s_sum"], merge["wall_s_mean"], merge["wall_s_max"]) == (2, 40.0, 20.0, 30.0)
    assert (merge["cpu_s_sum"], merge["cpu_s_max"], merge["max_rss_mb_mean"], merge["max_rss_mb_max"]) == (
        32.0, 24.0, 500.0, 600.0)
    assert (merge["threads"], merge["mem_mb"], merge["runtime_min"]) == (2, 1000, 60)
    assert merge["rss_of_mem_mb"] == pytest.approx(0.6) and merge["wall_of_runtime"] == pytest.approx(30 / 3600)
    assert df.loc["evaluation", "wall_of_runtime"] == 2.0 and pd.isna(df.loc["evaluation", "mem_mb"])  # over time
    tok = df.loc["tokenizer"]
    assert tok["wall_s_sum"] == 0.5 and pd.isna(tok["cpu_s_sum"]) and pd.isna(tok["max_rss_mb_max"])
    out = tmp_path / "report"
    assert pd.read_csv(out / "run_costs.csv").set_index("rule").loc["merge", "wall_s_sum"] == 40.0
    table = [line for line in (out / "run_costs.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and table[2].startswith("| merge | 2 | 40.00 |")
    assert (out / "run_costs.png").read_bytes().startswith(PNG_MAGIC)

    # The warm worker: the records see its client, so CPU time and memory are left out, wall time kept.
    warm = build_run_costs(records, tmp_path / "warm", requested, warm_worker=True).set_index("rule")
    assert warm["cpu_s_sum"].isna().all() and warm["max_rss_mb_max"].isna().all()
    assert warm.loc["merge", "wall_s_sum"] == 40.0
    assert "not shown: the warm worker" in (tmp_path / "warm" / "run_costs.md").read_text()


def test_run_costs_refuses_bad_records(tmp_path):
    from ledmerge.run_costs import run_costs

    with pytest.raises(LedmergeError, match="does not exist"):
        run_costs([tmp_path / "benchmarks" / "merge" / "led.tsv"])
    bad = tmp_path / "benchmarks" / "merge" / "x.tsv"
    bad.parent.mkdir(parents=True)
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(LedmergeError, match="not a Snakemake benchmark record"):
        run_costs([bad])
    with pytest.raises(LedmergeError, match="no benchmark records"):
        run_costs([])
