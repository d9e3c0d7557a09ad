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
