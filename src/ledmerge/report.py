"""Summary table and figures of a workflow run: metrics of every model, and what the masks elected.

Inputs are the per-model metrics JSONs of `ledmerge.evaluation.evaluate_model` and, optionally, the
mask CSVs of `ledmerge.masks` (per-tensor stats and pairwise overlaps). Outputs, all written
atomically into `out_dir`: summary.csv, summary.md (with each rate's 95% Wilson interval), and each figure as
PNG (200 dpi) and PDF. The paper's tables and figures (ledmerge.paper) build on these.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .errors import LedmergeError  # noqa: E402
from .fileio import atomic_path, write_text  # noqa: E402

KINDS = ("base", "expert", "merge", "data-aware")
MAIN_METRICS = ("harmful_rate", "over_refusal_rate", "math_accuracy", "code_pass_rate")
UTILITY_METRICS = ("math_accuracy", "code_pass_rate")
LABELS = {
    "harmful_rate": "harmful rate (↓)",
    "over_refusal_rate": "over-refusal rate (↓)",
    "math_accuracy": "math accuracy (↑)",
    "code_pass_rate": "code pass rate (↑)",
    "mean_utility": "mean utility: math & code (↑)",
}
# The evaluation set each rate is counted on (metrics.json's `n`), for its confidence interval.
RATE_SETS = {"harmful_rate": "harmful", "over_refusal_rate": "benign", "math_accuracy": "math",
             "code_pass_rate": "code"}
KIND_STYLE = {"base": dict(marker="s", color="#555555"), "expert": dict(marker="^", color="#1f77b4"),
              "merge": dict(marker="o", color="#d62728"), "data-aware": dict(marker="D", color="#2ca02c")}

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8,
                     "axes.spines.top": False, "axes.spines.right": False})


def load_summary(metrics_paths: dict[str, str | Path], model_kinds: dict[str, str]) -> pd.DataFrame:
    """One row per model: model, kind, the main metrics, mean_utility, then any other metric (sorted)."""
    rows = []
    for model, path in metrics_paths.items():
        kind = model_kinds.get(model)
        if kind not in KINDS:
            raise LedmergeError(f"model {model!r} has kind {kind!r}: give one of {list(KINDS)} in model_kinds")
        path = Path(path)
        if not path.is_file():
            raise LedmergeError(f"metrics file {path} of model {model!r} does not exist: run its evaluation first")
        metrics = json.loads(path.read_text())["metrics"]
        rows.append({"model": model, "kind": kind, **metrics})
    if not rows:
        raise LedmergeError("no models to report: metrics_paths is empty")
    df = _with_mean_utility(pd.DataFrame(rows))
    others = sorted(c for c in df.columns if c not in ("model", "kind", *MAIN_METRICS, "mean_utility"))
    df["_order"] = df["kind"].map(KINDS.index)
    df = df.sort_values("_order", kind="stable").drop(columns="_order")
    return df[["model", "kind", *MAIN_METRICS, "mean_utility", *others]].reset_index(drop=True)


def _with_mean_utility(df: pd.DataFrame) -> pd.DataFrame:
    """The main metrics (NaN where absent) and mean_utility: the mean of the utility metrics that some row has,
    so a set switched off in the whole run does not count as 0."""
    for col in MAIN_METRICS:
        if col not in df:
            df[col] = math.nan
    present = [c for c in UTILITY_METRICS if df[c].notna().any()]
    df["mean_utility"] = df[present].mean(axis=1) if present else math.nan
    return df


# The evaluation sets behind each metric: metrics.json's `n` as sweeps.csv columns.
COUNTS = {"harmful": "n_harmful", "benign": "n_benign", "math": "n_math", "code": "n_code"}


def sweeps_table(points: list[dict], columns: list[str], out_csv) -> pd.DataFrame:
    """results/report/sweeps.csv: one row per sweep point, long format (a point in two sweeps is two rows).

    `points`: {"sweep", "model" (the point's merge name), "values" (column -> value), "metrics" (its
    metrics.json)}; `columns`: the swept parameters, in order. Columns: sweep, model, `columns`, the main metrics
    and mean_utility as in summary.csv, then n_harmful, n_benign, n_math, n_code (the prompts each rate is over,
    empty for a set that is off) so intervals can be computed from the table alone."""
    rows = []
    for p in points:
        path = Path(p["metrics"])
        if not path.is_file():
            raise LedmergeError(f"metrics file {path} of sweep point {p['model']!r} does not exist: run its "
                                "evaluation first")
        report = json.loads(path.read_text())
        rows.append({"sweep": p["sweep"], "model": p["model"], **{c: p["values"].get(c) for c in columns},
                     **{m: report["metrics"].get(m, math.nan) for m in MAIN_METRICS},
                     **{col: report.get("n", {}).get(key) for key, col in COUNTS.items()}})
    if not rows:
        raise LedmergeError("no sweep points to tabulate: the config's sweeps section is empty")
    df = _with_mean_utility(pd.DataFrame(rows))
    df = df[["sweep", "model", *columns, *MAIN_METRICS, "mean_utility", *COUNTS.values()]]
    df = df.astype({col: "Int64" for col in COUNTS.values()})
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return df


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n: unlike the normal approximation it stays inside [0, 1]
    and is not degenerate at 0 or n, which the toy's rates often are."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def load_counts(metrics_paths: dict[str, str | Path]) -> pd.DataFrame:
    """Per model, the size of each evaluation set (n_harmful, n_benign, n_math, n_code; missing: NaN)."""
    rows = []
    for model, path in metrics_paths.items():
        path = Path(path)
        if not path.is_file():
            raise LedmergeError(f"metrics file {path} of model {model!r} does not exist: run its evaluation first")
        n = json.loads(path.read_text()).get("n", {})
        rows.append({"model": model, **{f"n_{s}": n.get(s, math.nan) for s in RATE_SETS.values()}})
    return pd.DataFrame(rows, columns=["model", *(f"n_{s}" for s in RATE_SETS.values())])


def rate_interval(rate: float, n: float) -> tuple[float, float]:
    """95% Wilson interval of a rate measured on n prompts (the count is rate·n rounded); NaN when unknown."""
    if math.isnan(rate) or math.isnan(n) or n <= 0:
        return math.nan, math.nan
    return wilson(round(rate * n), int(n))


def intervals_markdown(df: pd.DataFrame, counts: pd.DataFrame, digits: int = 3) -> str:
    """The summary's rates with their 95% Wilson intervals, `rate [low, high]`, as a markdown table."""
    n = counts.set_index("model")
    out = df[["model", "kind"]].copy()
    for metric, s in RATE_SETS.items():
        cells = []
        for model, rate in zip(df["model"], df[metric].astype(float)):
            lo, hi = rate_interval(rate, float(n.loc[model, f"n_{s}"]) if model in n.index else math.nan)
            cells.append("–" if math.isnan(rate) else f"{rate:.{digits}f}" if math.isnan(lo)
                         else f"{rate:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]")
        out[metric] = cells
    return to_markdown(out, digits)


def to_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table; numbers rounded, missing values as an en dash."""
    def cell(v):
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    header = [LABELS.get(c, c) for c in df.columns]
    align = ["---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def save_figure(fig, out_dir: Path, name: str) -> None:
    """PNG for screens and `snakemake --report`, PDF for print; each replaced atomically, then the figure closed."""
    for ext, kw in (("png", {"dpi": 200}), ("pdf", {})):
        with atomic_path(out_dir / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, bbox_inches="tight", **kw)
    plt.close(fig)


def plot_safety_utility(df: pd.DataFrame, out_dir: Path) -> None:
    """Harmful rate against mean utility, one labelled point per model: top left is best."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for kind in KINDS:
        sub = df[(df["kind"] == kind) & df["harmful_rate"].notna() & df["mean_utility"].notna()]
        if len(sub):
            ax.scatter(sub["harmful_rate"], sub["mean_utility"], s=55, label=kind, zorder=3,
                       edgecolor="white", linewidth=0.6, **KIND_STYLE[kind])
        for row in sub.itertuples(index=False):
            ax.annotate(row.model, (row.harmful_rate, row.mean_utility), xytext=(4, 4),
                        textcoords="offset points", fontsize=8)
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xlabel=LABELS["harmful_rate"], ylabel=LABELS["mean_utility"],
           title="Safety vs utility")
    ax.text(0.02, 0.98, "↖ better", transform=ax.transAxes, ha="left", va="top", fontsize=8, color="0.4")
    ax.grid(alpha=0.3)
    ax.legend(title="model kind", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save_figure(fig, out_dir, "safety_utility")


def plot_benchmarks(df: pd.DataFrame, out_dir: Path) -> None:
    """Grouped bars: one group per benchmark with a bar per model (all metrics are fractions in [0, 1])."""
    metrics = [c for c in df.columns if c not in ("model", "kind", "mean_utility") and df[c].notna().any()]
    n_models = len(df)
    width = 0.8 / n_models
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + 0.35 * n_models * len(metrics)), 3.8))
    colors = plt.get_cmap("tab20" if n_models > 10 else "tab10").colors
    for i, row in enumerate(df.itertuples(index=False)):
        values = df.loc[i, metrics].astype(float)  # a missing value draws no bar
        xs = [j + (i - (n_models - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, values, width=width * 0.95, color=colors[i % len(colors)],
               hatch={"base": "..", "expert": "//", "merge": "", "data-aware": "xx"}[row.kind], edgecolor="white",
               linewidth=0.3, label=f"{row.model} ({row.kind})")
    ax.set_xticks(range(len(metrics)), [LABELS.get(m, m) for m in metrics], rotation=15, ha="right")
    top = max(1.05, 1.05 * df[metrics].max().max())  # extra lm-eval metrics need not be fractions
    ax.set(ylim=(0, top), ylabel="fraction of prompts", title="Benchmarks per model")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save_figure(fig, out_dir, "benchmarks")


def _per_layer(df: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """numel-weighted mean of a per-tensor fraction, per layer (tensors outside blocks, layer -1, dropped)."""
    df = df.assign(layer=pd.to_numeric(df["layer"], errors="coerce"))
    df = df[df["layer"] >= 0].assign(_w=lambda d: d[value] * d["numel"])
    g = df.groupby([*keys, "layer"], sort=True)[["_w", "numel"]].sum()
    return (g["_w"] / g["numel"]).rename(value).reset_index()


def _read_csv(path, columns) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise LedmergeError(f"mask CSV {path} does not exist: run the masks step first")
    df = pd.read_csv(path)
    missing = [c for c in columns if c not in df]
    if missing:
        raise LedmergeError(f"{path} lacks column(s) {missing}: is it the right masks CSV?")
    return df


def plot_mask_overlap(mask_stats_csv, mask_overlap_csv, out_dir: Path, name: str = "mask_overlap",
                      figsize: tuple[float, float] = (10, 3.8)) -> None:
    """Per layer: pairwise overlap of the tasks' elected masks, and the fraction each task keeps.

    Colours come from the active style's colour cycle, so the paper's style (ledmerge.paper) restyles it."""
    stats = _read_csv(mask_stats_csv, ["task", "layer", "numel", "elected_fraction", "kept_fraction"])
    overlap = _read_csv(mask_overlap_csv, ["task_a", "task_b", "layer", "numel", "overlap_fraction"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=figsize, sharex=True)
    overlap = overlap.assign(pair=overlap["task_a"] + " ∧ " + overlap["task_b"])
    pairs = _per_layer(overlap, ["pair"], "overlap_fraction")
    for pair, sub in pairs.groupby("pair", sort=False):
        ax1.plot(sub["layer"], sub["overlap_fraction"], marker="o", ms=3, label=pair)
    ax1.set(xlabel="layer (block index)", ylabel="overlap (fraction of weights)",
            title="Elected by both tasks (dropped)")
    elected, kept = _per_layer(stats, ["task"], "elected_fraction"), _per_layer(stats, ["task"], "kept_fraction")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, task in enumerate(kept["task"].unique()):
        c = colors[i % len(colors)]
        k, e = kept[kept["task"] == task], elected[elected["task"] == task]
        ax2.plot(k["layer"], k["kept_fraction"], marker="o", ms=3, color=c, label=f"{task} kept")
        ax2.plot(e["layer"], e["elected_fraction"], ls="--", color=c, alpha=0.6, label=f"{task} elected")
    ax2.set(xlabel="layer (block index)", ylabel="fraction of weights", title="Kept after the disjoint step")
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        ax.xaxis.get_major_locator().set_params(integer=True)
    save_figure(fig, out_dir, name)


def plot_cmaes_fitness(histories: dict[str, str | Path], out_dir: Path) -> None:
    """CMA-ES fitness per evaluation (dots) and best so far (line), one panel per objective.

    `histories` maps evo_<method>_<objective> to its history.csv; the objectives have different
    fitness scales (task leaves out the alignment term), hence separate panels.
    """
    runs = {}
    for name, path in histories.items():
        df = _read_csv(path, ["evaluation", "fitness"])
        method, _, objective = name.removeprefix("evo_").rpartition("_")
        runs.setdefault(objective, []).append((method, df))
    titles = {"align": "alignment + domain data", "task": "domain data only"}
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (objective, items) in zip(axes[0], sorted(runs.items())):
        for i, (method, df) in enumerate(sorted(items, key=lambda x: x[0])):
            c = colors[i % len(colors)]
            ax.scatter(df["evaluation"], df["fitness"], s=8, color=c, alpha=0.35, linewidth=0)
            ax.plot(df["evaluation"], df["fitness"].cummax(), color=c, label=method)
        ax.set(xlabel="evaluation", ylabel="fitness −(w_align·CE_align + w_task·CE_task)",
               title=f"CMA-ES: {titles.get(objective, objective)}")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, title="best so far")
    save_figure(fig, out_dir, "cmaes_fitness")


def build_report(metrics_paths: dict[str, str | Path], model_kinds: dict[str, str], out_dir,
                 mask_stats_csv=None, mask_overlap_csv=None,
                 histories: dict[str, str | Path] | None = None) -> pd.DataFrame:
    """Write summary.csv, summary.md and the figures into `out_dir`; returns the summary table."""
    if (mask_stats_csv is None) != (mask_overlap_csv is None):
        raise LedmergeError("give both mask_stats_csv and mask_overlap_csv, or neither")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = load_summary(metrics_paths, model_kinds)
    with atomic_path(out_dir / "summary.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    intervals = intervals_markdown(df, load_counts(metrics_paths))
    write_text(out_dir / "summary.md", "# Results\n\n" + to_markdown(df) + "\n## 95% Wilson intervals\n\n"
               "Each rate with its 95% Wilson score interval over the evaluation set's prompts.\n\n" + intervals)
    plot_safety_utility(df, out_dir)
    plot_benchmarks(df, out_dir)
    if mask_stats_csv is not None:
        plot_mask_overlap(mask_stats_csv, mask_overlap_csv, out_dir)
    if histories:
        plot_cmaes_fitness(histories, out_dir)
    return df
