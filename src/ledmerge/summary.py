"""Summary table and figures of a workflow run: metrics of every model, and what the masks elected.

Inputs are the per-model metrics JSONs of `ledmerge.evaluation.evaluate_model` and, optionally, the
mask CSVs of `ledmerge.led.election` (per-tensor stats and pairwise overlaps). Outputs, all written
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
from .layout import EVAL_SETS, parse_data_aware  # noqa: E402
from .paper import SAFETY  # noqa: E402

KINDS = ("base", "expert", "merge", "data-aware")
# Safety columns of every table, in order (ledmerge.paper.SAFETY: harmful replies, refused benign prompts, empty
# replies to harmful prompts, refused utility prompts): a merge that says nothing or refuses everything cannot look
# safe and useful.
SAFETY_METRICS = tuple(m for m, _, _ in SAFETY)
# The utility columns of a run are the evaluation's (metrics.json's `utility`; the toy's by default); these are the
# toy's, which metrics.json files written before `utility` existed hold.
TOY_UTILITY = ("math_accuracy", "code_pass_rate")
LABELS = {
    "harmful_rate": "harmful rate (↓)",
    "over_refusal_rate": "over-refusal rate (↓)",
    "empty_rate": "empty-reply rate (↓)",
    "utility_refusal_rate": "utility refusal rate (↓)",
    "math_accuracy": "math accuracy (↑)",
    "code_pass_rate": "code pass rate (↑)",
    "mean_utility": "mean utility (↑)",
}
# metrics.json files written before `rates` existed: the evaluation set of each rate (its `n`), in EVAL_SETS' order.
LEGACY_SETS = dict(zip(("harmful_rate", "over_refusal_rate", "math_accuracy", "code_pass_rate"), EVAL_SETS))
KIND_STYLE = {"base": dict(marker="s", color="#555555"), "expert": dict(marker="^", color="#1f77b4"),
              "merge": dict(marker="o", color="#d62728"), "data-aware": dict(marker="D", color="#2ca02c")}

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8,
                     "axes.spines.top": False, "axes.spines.right": False})


def _read_metrics(path, whose: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LedmergeError(f"metrics file {path} of {whose} does not exist: run its evaluation first")
    return json.loads(path.read_text())


def utility_of(report: dict) -> list[str]:
    """A metrics.json's utility columns, in order."""
    return report.get("utility", [c for c in TOY_UTILITY if c in report["metrics"]])


def metric_columns(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(safety, utility) columns of a summary or sweeps table: the utility columns stand between the safety columns
    and mean_utility (the tables' contract)."""
    cols = list(df.columns)
    end = cols.index("mean_utility")
    start = max(cols.index(m) for m in SAFETY_METRICS) + 1
    return list(SAFETY_METRICS), cols[start:end]


def _ordered(reports: list[dict], rows: list[dict], keys: list[str]) -> pd.DataFrame:
    """`keys`, the safety columns, the utility columns (in the evaluations' order), mean_utility (their mean), then
    the other metrics sorted."""
    utility = list(dict.fromkeys(c for r in reports for c in utility_of(r)))
    df = pd.DataFrame(rows)
    for col in [*SAFETY_METRICS, *utility]:
        if col not in df:
            df[col] = math.nan
    df["mean_utility"] = df[utility].mean(axis=1) if utility else math.nan
    main = [*keys, *SAFETY_METRICS, *utility, "mean_utility"]
    return df[[*main, *sorted(c for c in df.columns if c not in main)]]


def load_summary(metrics_paths: dict[str, str | Path], model_kinds: dict[str, str]) -> pd.DataFrame:
    """One row per model: model, kind, the safety metrics, the utility metrics and mean_utility, then any other
    metric (sorted)."""
    rows, reports = [], []
    for model, path in metrics_paths.items():
        kind = model_kinds.get(model)
        if kind not in KINDS:
            raise LedmergeError(f"model {model!r} has kind {kind!r}: give one of {list(KINDS)} in model_kinds")
        reports.append(_read_metrics(path, f"model {model!r}"))
        rows.append({"model": model, "kind": kind, **reports[-1]["metrics"]})
    if not rows:
        raise LedmergeError("no models to report: metrics_paths is empty")
    df = _ordered(reports, rows, ["model", "kind"])
    df = df.assign(_order=df["kind"].map(KINDS.index)).sort_values("_order", kind="stable").drop(columns="_order")
    return df.reset_index(drop=True)


def counts_of(report: dict) -> dict[str, float]:
    """Each rate's number of prompts (`rates`; older files: the size of its evaluation set)."""
    if "rates" in report:
        return {m: r["n"] for m, r in report["rates"].items()}
    n = report.get("n", {})
    return {m: n[s] for m, s in LEGACY_SETS.items() if s in n}


def sweeps_table(points: list[dict], columns: list[str], out_csv) -> pd.DataFrame:
    """results/report/sweeps.csv: one row per sweep point, long format (a point in two sweeps is two rows).

    `points`: {"sweep", "model" (the point's merge name), "values" (column -> value), "metrics" (its
    metrics.json), "mask_stats" (an LED point's masks/stats.csv, or None)}; `columns`: the swept parameters, in
    order. Columns: sweep, model, `columns`, kept_<task> (the fraction of each task vector an LED point's final masks
    keep, so ablations that elect different counts show them), the safety and utility metrics and mean_utility as
    in summary.csv, then n_<metric> for each of them (the prompts each rate is over, empty when unknown) so
    intervals can be computed from the table alone."""
    rows, reports = [], []
    for p in points:
        reports.append(_read_metrics(p["metrics"], f"sweep point {p['model']!r}"))
        main = [*SAFETY_METRICS, *utility_of(reports[-1])]
        rows.append({"sweep": p["sweep"], "model": p["model"], **{c: p["values"].get(c) for c in columns},
                     **kept_fractions(p.get("mask_stats")),
                     **{m: reports[-1]["metrics"].get(m, math.nan) for m in main},
                     **{f"n_{m}": n for m, n in counts_of(reports[-1]).items() if m in main}})
    if not rows:
        raise LedmergeError("no sweep points to tabulate: the config's sweeps section is empty")
    df = _ordered(reports, rows, ["sweep", "model", *columns])
    counts = [f"n_{m}" for m in sum(metric_columns(df), [])]
    for c in counts:
        if c not in df:
            df[c] = pd.NA
    df = df[[*(c for c in df.columns if c not in counts), *counts]].astype({c: "Int64" for c in counts})
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return df


def kept_fractions(mask_stats) -> dict[str, float]:
    """kept_<task>: the share of each task vector's entries that a point's final masks keep (its stats.csv)."""
    if not mask_stats:
        return {}
    stats = pd.read_csv(mask_stats).groupby("task")[["kept", "numel"]].sum()
    return {f"kept_{task}": round(float(r.kept / r.numel), 6) for task, r in stats.iterrows()}


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
    """Per model, the number of prompts behind each rate, as n_<metric> columns (missing: NaN)."""
    rows = [{"model": model, **{f"n_{m}": n for m, n in counts_of(_read_metrics(path, f"model {model!r}")).items()}}
            for model, path in metrics_paths.items()]
    return pd.DataFrame(rows).reindex(columns=["model", *dict.fromkeys(c for r in rows for c in r if c != "model")])


def rate_interval(rate: float, n: float) -> tuple[float, float]:
    """95% Wilson interval of a rate measured on n prompts (the count is rate·n rounded); NaN when unknown."""
    if math.isnan(rate) or math.isnan(n) or n <= 0:
        return math.nan, math.nan
    return wilson(round(rate * n), int(n))


def intervals_markdown(df: pd.DataFrame, counts: pd.DataFrame, digits: int = 3) -> str:
    """The summary's rates with their 95% Wilson intervals, `rate [low, high]`, as a markdown table."""
    n = counts.set_index("model")
    out = df[["model", "kind"]].copy()
    safety, utility = metric_columns(df)
    for metric in [*safety, *utility]:
        cells = []
        for model, rate in zip(df["model"], df[metric].astype(float)):
            size = float(n.loc[model, f"n_{metric}"]) if model in n.index and f"n_{metric}" in n else math.nan
            lo, hi = rate_interval(rate, size)
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
        _, method, objective = parse_data_aware(name)
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
