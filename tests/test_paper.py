"""Paper outputs: Wilson intervals, booktabs tables with direction-aware bold, non-overlapping labels, and the fixed
set of files build_paper writes, from hand-made summary, metrics and sweep fixtures."""

import json
import re

import pandas as pd
import pytest

from ledmerge.errors import LedmergeError
from ledmerge.paper import OUTPUTS
from ledmerge.paper.build import STYLE, ablation_table, build_paper, label_box, main_table, safety_utility_figure
from ledmerge.summary import load_counts, wilson

N = {"harmful_rate": 52, "over_refusal_rate": 58, "empty_rate": 52, "utility_refusal_rate": 120,
     "math_accuracy": 60, "code_pass_rate": 60}
COUNTS = {f"n_{m}": n for m, n in N.items()}
SUMMARY = [  # model, kind, harmful, over-refusal, math, code
    ("base", "base", 1.0, 0.0, 0.0, 0.0),
    ("safety", "expert", 0.0, 0.0, 0.0, 0.0),
    ("math", "expert", 1.0, 0.0, 1.0, 0.0),
    ("led", "merge", 26 / 52, 3 / 58, 30 / 60, 24 / 60),
    ("ties", "merge", 40 / 52, 1 / 58, 36 / 60, 30 / 60),
]


@pytest.mark.parametrize("k, n, lo, hi", [
    (0, 10, 0.0, 0.2775),        # Wilson (1927) / Agresti & Coull (1998): 0 of 10
    (5, 10, 0.2366, 0.7634),
    (81, 263, 0.2553, 0.3662),   # Newcombe (1998), example (c)
    (10, 10, 0.7225, 1.0),
])
def test_wilson_known_values(k, n, lo, hi):
    assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_z_and_empty_set():
    narrow, wide = wilson(5, 10, z=1.0), wilson(5, 10, z=2.576)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    assert all(v != v for v in wilson(0, 0))  # NaN: no prompts, no interval


def _fixtures(tmp_path):
    rows = [dict(zip(["model", "kind", "harmful_rate", "over_refusal_rate", "math_accuracy", "code_pass_rate"], r))
            for r in SUMMARY]
    summary = pd.DataFrame(rows)
    summary.insert(4, "empty_rate", 0.0)
    summary.insert(5, "utility_refusal_rate", 0.0)
    summary = summary.assign(mean_utility=lambda d: (d["math_accuracy"] + d["code_pass_rate"]) / 2)
    summary.to_csv(tmp_path / "summary.csv", index=False)
    metrics = {}
    for row in rows:
        metrics[row["model"]] = tmp_path / f"{row['model']}.json"
        metrics[row["model"]].write_text(json.dumps({"metrics": {}, "rates": {m: {"k": 0, "n": n}
                                                                               for m, n in N.items()}}))
    stats = pd.DataFrame([{"task": t, "layer": layer, "numel": 100, "elected_fraction": 0.2, "kept_fraction": 0.1}
                          for t in ("safety", "math") for layer in range(2)])
    overlap = pd.DataFrame([{"task_a": "safety", "task_b": "math", "layer": layer, "numel": 100,
                             "overlap_fraction": 0.05} for layer in range(2)])
    stats.to_csv(tmp_path / "stats.csv", index=False)
    overlap.to_csv(tmp_path / "overlap.csv", index=False)
    return summary, metrics


def _sweeps():
    rows = []
    for seed in (0, 1):
        for loc in ("snip", "magnitude"):
            for rate in (0.1, 0.3, 0.5):
                harm = rate / 2 + (0.1 if loc == "magnitude" else 0) + seed * 0.02
                rows.append({"sweep": "rates", "model": f"led_{loc}_{rate}_{seed}", "location": loc,
                             "rate_safety": rate, "zoo_seed": seed, "harmful_rate": harm, "over_refusal_rate": 0.0,
                             "empty_rate": 0.0, "utility_refusal_rate": 0.0, "math_accuracy": 0.5,
                             "code_pass_rate": 0.4 - rate / 4, "mean_utility": 0.45 - rate / 8})
    for lam in (0.5, 1.0):
        rows.append({"sweep": "lambdas", "model": f"led_l{lam}", "lambda_math": lam, "zoo_seed": 0,
                     "harmful_rate": 0.5 * lam, "over_refusal_rate": 0.0, "empty_rate": 0.0,
                     "utility_refusal_rate": 0.0, "math_accuracy": 0.3 * lam,
                     "code_pass_rate": 0.2, "mean_utility": 0.1 + 0.15 * lam})
    df = pd.DataFrame(rows)
    return df.assign(**COUNTS)


def _body(tex):
    lines = tex.splitlines()
    return lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]


def test_main_table_booktabs_and_bold_best_merge(tmp_path):
    summary, metrics = _fixtures(tmp_path)
    tex, md = main_table(summary, load_counts(metrics))
    lines = tex.splitlines()
    assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
    assert r"\begin{tabular}{llrrrrrrr}" in tex and r"\hline" not in tex and "|" not in tex.split("\n", 2)[1]
    assert r"\multicolumn{4}{c}{Safety}" in tex and r"\multicolumn{3}{c}{Utility}" in tex
    rows = {line.split(" & ")[0]: line.split(" & ") for line in _body(tex)}
    assert list(rows) == ["base", "safety", "math", "led", "ties"]
    # ↓ columns: led has the lower harmful and... ties the lower over-refusal; ↑ columns: ties higher math and code.
    assert rows["led"][2].startswith(r"\textbf{0.500}") and not rows["ties"][2].startswith(r"\textbf")
    assert rows["ties"][3].startswith(r"\textbf{0.017}") and not rows["led"][3].startswith(r"\textbf")
    assert not any(rows[m][i].startswith(r"\textbf") for m in rows for i in (4, 5))  # empty, refusals: all tie
    assert all(rows["ties"][i].startswith(r"\textbf") for i in (6, 7, 8))
    # Experts are references, never bold even where they beat every merge (safety's harmful rate of 0).
    assert not any(r"\textbf" in c for name in ("base", "safety", "math") for c in rows[name])
    lo, hi = wilson(26, 52)
    assert f"[{lo:.3f}, {hi:.3f}]" in rows["led"][2]
    md_rows = [line for line in md.splitlines() if line.startswith("| led")]
    assert md_rows and md_rows[0].split(" | ")[2].startswith("**0.500** [") and "↓" in md and "↑" in md


def test_ablation_tables_seed_spread_and_placeholder():
    sweeps = _sweeps()
    tex, md = ablation_table(sweeps, "rate")
    body = _body(tex)
    assert len(body) == 6 and all(r"$\pm$" in line for line in body)  # 2 locations × 3 rates, 2 seeds each
    # Harmful rate ↓ is best for snip at rate 0.1, mean utility ↑ too.
    best = [line for line in body if line.split(" & ")[2] == "0.1" and "snip" in line]
    assert best and best[0].split(" & ")[3].startswith(r"\textbf") and best[0].split(" & ")[-1].startswith(r"\textbf")
    assert "± 0.014" in md  # sample std of 0.05 and 0.07
    tex, md = ablation_table(sweeps, "lambda")
    assert len(_body(tex)) == 2 and "λ (math)" in md and r"$\lambda$ (math)" in tex
    tex, md = ablation_table(sweeps, "pattern")
    assert "no sweep configured" in tex and r"\toprule" in tex and "No sweep configured" in md


def test_seed_table_holds_every_sweep_repeated_over_seeds():
    """LED and a baseline repeated over zoo seeds: one row per point, mean ± sd; a sweep on one seed is left out."""
    baseline = pd.DataFrame([{"sweep": "seeds_ta", "model": f"ta_{seed}", "zoo_seed": seed, "harmful_rate": h,
                              "over_refusal_rate": 0.0, "empty_rate": 0.0, "utility_refusal_rate": 0.0,
                              "math_accuracy": 0.5, "code_pass_rate": 0.4,
                              "mean_utility": 0.45} for seed, h in ((0, 0.7), (1, 0.9), (2, 0.8))])
    sweeps = pd.concat([_sweeps(), baseline.assign(**COUNTS)], ignore_index=True)
    tex, md = ablation_table(sweeps, "seed")
    rows = [line for line in _body(tex) if " & " in line]  # (a rule separates the sweeps)
    assert len(rows) == 6 + 1 and all(r"$\pm$" in line for line in rows)  # rates: 2 locations × 3 rates; seeds_ta
    assert not any("lambdas" in line for line in md.splitlines())  # one seed only
    ta = next(line for line in md.splitlines() if line.startswith("| seeds_ta"))
    assert "0.800** ± 0.100" in ta, ta  # mean and sample sd of 0.7, 0.9, 0.8


def test_safety_utility_labels_never_overlap(tmp_path):
    import matplotlib.pyplot as plt

    summary, metrics = _fixtures(tmp_path)
    # A crowded plane: twelve merges within a few hundredths of each other, plus the models above.
    crowd = pd.DataFrame([{"model": f"merge_{i}", "kind": "merge", "harmful_rate": 0.5 + 0.01 * (i % 4),
                           "over_refusal_rate": 0.0, "empty_rate": 0.0, "utility_refusal_rate": 0.0,
                           "math_accuracy": 0.5, "code_pass_rate": 0.5,
                           "mean_utility": 0.5 + 0.01 * (i // 4)} for i in range(12)])
    summary = pd.concat([summary, crowd], ignore_index=True)
    counts = pd.concat([load_counts(metrics), crowd[["model"]].assign(**COUNTS)])
    with plt.rc_context(STYLE):
        fig, texts = safety_utility_figure(summary, counts)
        fig.canvas.draw()
        boxes = [label_box(t, fig.canvas.get_renderer()) for t in texts]
    plt.close(fig)
    assert len(boxes) == len(summary)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


def test_build_paper_writes_every_output(tmp_path):
    summary, metrics = _fixtures(tmp_path)
    out = tmp_path / "paper"
    _sweeps().to_csv(tmp_path / "sweeps.csv", index=False)
    written = build_paper(tmp_path / "summary.csv", metrics, tmp_path / "stats.csv", tmp_path / "overlap.csv", out,
                          sweeps_csv=tmp_path / "sweeps.csv")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(OUTPUTS) == sorted(p.name for p in written)
    assert any("main" in n for n in names) and any("rate_sweep" in n for n in names)
    assert any("location_ablation" in n for n in names)
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" if name.endswith(".png") else data[:4] == b"%PDF" if \
            name.endswith(".pdf") else len(data) > 20, name
    assert "no sweep configured" not in (out / "table_ablation_location.tex").read_text()

    # Without sweeps (none configured, or an empty table): the same files, the ablations as placeholders.
    for sweeps in (None, tmp_path / "empty.csv"):
        (tmp_path / "empty.csv").write_text("")
        out2 = tmp_path / f"paper_{sweeps is None}"
        build_paper(tmp_path / "summary.csv", metrics, tmp_path / "stats.csv", tmp_path / "overlap.csv", out2,
                    sweeps_csv=sweeps)
        assert sorted(p.name for p in out2.iterdir()) == sorted(OUTPUTS)
        assert re.search("no sweep configured", (out2 / "table_ablation_rate.md").read_text(), re.I)


def test_build_paper_bad_input(tmp_path):
    summary, metrics = _fixtures(tmp_path)
    args = (tmp_path / "stats.csv", tmp_path / "overlap.csv", tmp_path / "p")
    with pytest.raises(LedmergeError, match="no metrics.json given for model"):
        build_paper(tmp_path / "summary.csv", {k: v for k, v in metrics.items() if k != "led"}, *args)
    pd.DataFrame({"sweep": ["a"], "harmful_rate": [0.1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(LedmergeError, match="lacks column"):
        build_paper(tmp_path / "summary.csv", metrics, *args, sweeps_csv=tmp_path / "bad.csv")
    with pytest.raises(LedmergeError, match="run the report step first"):
        build_paper(tmp_path / "nope.csv", metrics, *args)


def test_docs_result_tables_are_the_recorded_runs():
    """README.md's and docs/results.md's main tables are generated (make docs) from the recorded run in docs/run/,
    with the paper's own renderer: a typed or stale table fails here."""
    from pathlib import Path

    from ledmerge.paper.record import main_table_markdown, markers, with_main_table

    repo = Path(__file__).resolve().parents[1]
    record = repo / "docs" / "run"
    table = main_table_markdown(record)
    for doc in (repo / "README.md", repo / "docs" / "results.md"):
        text = doc.read_text()
        assert with_main_table(text, record) == text, f"{doc.name} is stale: run make docs"
        begin, end = markers(record)
        block = text.split(begin, 1)[1].split(end, 1)[0]
        assert block == table
    summary = pd.read_csv(record / "summary.csv")
    assert {"base", "led", "task_arithmetic"} <= set(summary["model"])
    for column in ("empty_rate", "utility_refusal_rate", "math_accuracy", "code_pass_rate"):
        assert summary[column].notna().all(), column
    # the recorded default run's outcomes: each expert beats the base on its own task, merging brings harm back
    rate = summary.set_index("model")
    assert rate.loc["math", "math_accuracy"] >= rate.loc["base", "math_accuracy"] + 0.5
    assert rate.loc["code", "code_pass_rate"] >= rate.loc["base", "code_pass_rate"] + 0.5
    assert rate.loc["safety", "harmful_rate"] <= rate.loc["base", "harmful_rate"] - 0.5
    assert rate.loc["task_arithmetic", "harmful_rate"] >= rate.loc["safety", "harmful_rate"] + 0.5


def test_docs_miniature_tables_are_its_recorded_run():
    """The real-model miniature's main table in README.md and docs/results.md is generated from its record
    (docs/run-miniature/, `make record-miniature`), like the default run's."""
    from pathlib import Path

    from ledmerge.paper.record import main_table_markdown, markers, with_main_table

    repo = Path(__file__).resolve().parents[1]
    record = repo / "docs" / "run-miniature"
    if not (record / "run.json").is_file():
        pytest.skip("no recorded miniature run")
    table = main_table_markdown(record)
    for doc in (repo / "README.md", repo / "docs" / "results.md"):
        text = doc.read_text()
        assert with_main_table(text, record) == text, f"{doc.name} is stale: run make docs"
        begin, end = markers(record)
        assert text.split(begin, 1)[1].split(end, 1)[0] == table
    summary = pd.read_csv(record / "summary.csv")
    assert {"base", "safety", "math", "code", "led", "task_arithmetic"} <= set(summary["model"])
    assert {"math_accuracy", "humaneval_pass_rate"} <= set(summary.columns)


def test_record_run_and_main_table_markers(tmp_path):
    from ledmerge.paper.record import markers, record_run, with_main_table

    summary, metrics = _fixtures(tmp_path)
    results = tmp_path / "results"
    (results / "report").mkdir(parents=True)
    summary.to_csv(results / "report" / "summary.csv", index=False)
    for model, path in metrics.items():
        (results / "eval" / model).mkdir(parents=True)
        (results / "eval" / model / "metrics.json").write_text(path.read_text())
    record = record_run(results, tmp_path / "record", "make run")
    assert json.loads((record / "run.json").read_text())["command"] == "make run"
    begin, end = markers(record)
    doc = f"intro\n{begin}old table\n{end}after\n"
    new = with_main_table(doc, record)
    assert new.startswith("intro\n") and new.endswith("after\n") and "old table" not in new and "| led | merge |" in new
    with pytest.raises(LedmergeError, match="no main-table markers"):
        with_main_table("no markers", record)
