"""Tables and figures of a paper (`build_paper`), from the run's reports; `ledmerge.paper` names them."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.text  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402

from ..errors import LedmergeError  # noqa: E402
from ..fileio import write_text  # noqa: E402
from ..summary import KINDS, load_counts, metric_columns, plot_mask_overlap, rate_interval, save_figure  # noqa: E402
from . import (  # noqa: E402
    ABLATIONS,
    ARROW,
    MEAN_UTILITY,
    NO_SWEEP,
    OUTPUTS,
    PAIRED_TABLE,
    PARAM_PREFIXES,
    SAFETY,
    SEED,
    UTILITY_LABELS,
)
from .paired import LEVEL, RESAMPLES, across_seeds, per_prompt  # noqa: E402

# Embedding TrueType fonts in PDFs (pdf.fonttype 42) makes fontTools log every glyph subset at INFO.
logging.getLogger("fontTools").setLevel(logging.WARNING)

# Okabe & Ito's palette: distinguishable under the common colour-vision deficiencies, and in greyscale by marker.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
KIND_STYLE = {"base": dict(marker="s", color="#000000"), "expert": dict(marker="^", color="#0072B2"),
              "merge": dict(marker="o", color="#D55E00"), "data-aware": dict(marker="D", color="#009E73")}
COLUMN_WIDTH, FULL_WIDTH = 3.4, 7.0  # inches: one and two columns of a two-column paper
STYLE = {
    "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"], "font.size": 8, "axes.titlesize": 8,
    "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7,
    "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False, "axes.linewidth": 0.6,
    "axes.grid": True, "grid.alpha": 0.25, "grid.linewidth": 0.5, "lines.linewidth": 1.2, "lines.markersize": 4,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE), "pdf.fonttype": 42, "ps.fonttype": 42,
    "savefig.dpi": 300,
}


# ---------------------------------------------------------------- data

def metrics_of(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(column, label, direction) of a summary or sweeps table's metrics: the safety columns, the run's utility
    columns, mean utility."""
    utility = metric_columns(df)[1]
    return [*SAFETY, *((c, UTILITY_LABELS.get(c, c.replace("_", " ")), "max") for c in utility), MEAN_UTILITY]


def param_columns(df: pd.DataFrame) -> list[str]:
    """The swept-parameter columns of sweeps.csv, in the contract's order."""
    return [c for p in PARAM_PREFIXES for c in df.columns if c == p or (p.endswith("_") and c.startswith(p))]


def load_sweeps(path) -> pd.DataFrame:
    """sweeps.csv, or an empty frame when there is none (no path, or a file without rows)."""
    if path is None:
        return pd.DataFrame()
    path = Path(path)
    if not path.is_file():
        raise LedmergeError(f"sweeps table {path} does not exist: run the sweeps first, or leave --sweeps out")
    if path.stat().st_size == 0:
        return pd.DataFrame()
    df = pd.read_csv(path)
    if df.empty:
        return df
    need = ["sweep", *(m for m, _, _ in SAFETY), MEAN_UTILITY[0], *(f"n_{m}" for m, _, _ in SAFETY)]
    missing = [c for c in need if c not in df]
    if missing:
        raise LedmergeError(f"{path} lacks column(s) {missing}: it must be the sweeps' long table (docs/results.md)")
    return df


def aggregate(df: pd.DataFrame, keys: list[str], metrics: list[tuple[str, str, str]]) -> pd.DataFrame:
    """One row per distinct `keys`: each metric's value and its spread (`<m>_lo`, `<m>_hi`).

    A group of one row gets the Wilson interval of its counts; a larger group (the same point under several zoo
    seeds) gets mean ± sample standard deviation, and `seeds` says how many rows it averages.
    """
    rows = []
    groups = df.groupby(keys, sort=False, dropna=False) if keys else [((), df)]
    for key, g in groups:
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["seeds"] = len(g)
        row.update({c: float(g[c].mean()) for c in g.columns if c.startswith(KEPT)})  # mean over seeds
        for m, _, _ in metrics:
            values = g[m].astype(float)
            if len(g) == 1:
                value = float(values.iloc[0])
                n = float(g[f"n_{m}"].iloc[0]) if f"n_{m}" in g else math.nan
                lo, hi = rate_interval(value, n)
            else:
                value, sd = float(values.mean()), float(values.std(ddof=1))
                lo, hi = value - sd, value + sd
            row.update({m: value, f"{m}_lo": lo, f"{m}_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def main_rows(summary: pd.DataFrame, counts: pd.DataFrame) -> pd.DataFrame:
    """The summary's models with the sizes of their evaluation sets."""
    missing = sorted(set(summary["model"]) - set(counts["model"]))
    if missing:
        raise LedmergeError(f"no metrics.json given for model(s) {missing} of the summary: pass each as --metrics")
    return summary.merge(counts, on="model", how="left")


KEPT = "kept_"  # sweeps.csv's kept_<task>: the fraction of the task vector a point's final masks keep


def ablation_rows(sweeps: pd.DataFrame, ablation: str) -> pd.DataFrame:
    """The sweep points of the sweeps that vary one of `ablation`'s parameters (the zoo seed too: `seed`), seeds
    averaged."""
    if sweeps.empty:
        return pd.DataFrame()
    params = param_columns(sweeps)
    cols = [c for c in [*params, SEED] if c in sweeps.columns and c.startswith(ABLATIONS[ablation])]
    varied = [name for name, g in sweeps.groupby("sweep", sort=False)
              if any(g[c].nunique(dropna=True) > 1 for c in cols)]
    rows = sweeps[sweeps["sweep"].isin(varied)]
    if rows.empty:
        return pd.DataFrame()
    keys = ["sweep", *(c for c in params if c != SEED and rows[c].notna().any())]
    return aggregate(rows, keys, metrics_of(sweeps))


# ---------------------------------------------------------------- tables

def latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(a, b)
    return text


def best_mask(values: pd.Series, direction: str, digits: int) -> pd.Series:
    """Which rows are best in a column (ties all best, but a column where all rows tie has no best), compared as
    printed so equal-looking cells agree."""
    shown = values.astype(float).round(digits)
    if shown.notna().sum() == 0 or (len(shown) > 1 and shown.nunique(dropna=False) == 1):
        return pd.Series(False, index=values.index)
    target = shown.min() if direction == "min" else shown.max()
    return shown == target


def _cell(row, m: str, bold: bool, digits: int, latex: bool) -> str:
    value, lo, hi = row[m], row[f"{m}_lo"], row[f"{m}_hi"]
    if pd.isna(value):
        return "--" if latex else "–"
    v = f"{value:.{digits}f}"
    v = (rf"\textbf{{{v}}}" if latex else f"**{v}**") if bold else v
    if pd.isna(lo):
        return v
    if row.get("seeds", 1) > 1:
        sd = (hi - lo) / 2
        return rf"{v} $\pm$ {sd:.{digits}f}" if latex else f"{v} ± {sd:.{digits}f}"
    return rf"{v} {{\scriptsize [{lo:.{digits}f}, {hi:.{digits}f}]}}" if latex else f"{v} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _key_text(value, latex: bool) -> str:
    if isinstance(value, float):
        text = "–" if math.isnan(value) else f"{value:g}"
    else:
        text = str(value)
    return latex_escape(text) if latex else text


def param_label(col: str, latex: bool = False) -> str:
    """rate_safety -> "rate (safety)", lambda_math -> "λ (math)", kept_math -> "kept (math)"."""
    for prefix, name in (("rate_", "rate"), ("lambda_", r"$\lambda$" if latex else "λ"), (KEPT, "kept")):
        if col.startswith(prefix):
            task = col.removeprefix(prefix)
            return f"{name} ({latex_escape(task) if latex else task})"
    return latex_escape(col) if latex else col


def render_table(rows: pd.DataFrame, keys: list[tuple[str, str]], metrics: list[tuple[str, str, str]],
                 group: str | None = None, note: str = "", digits: int = 3,
                 bold_rows: pd.Series | None = None) -> tuple[str, str]:
    """A booktabs tabular and its Markdown twin: key columns, then safety and utility metrics.

    The best value of each metric column is bold, per `group` (each sweep) when given, among `bold_rows` only when
    given (the main table compares merges, not the experts they come from)."""
    candidates = bold_rows if bold_rows is not None else pd.Series(True, index=rows.index)
    bold = pd.DataFrame(False, index=rows.index, columns=[m for m, _, _ in metrics])
    parts = rows.groupby(group, sort=False).groups.values() if group else [rows.index]
    for idx in parts:
        idx = [i for i in idx if candidates.loc[i]]
        for m, _, d in metrics:
            bold.loc[idx, m] = best_mask(rows.loc[idx, m], d, digits)

    k = len(keys)
    head = [label for _, label in keys]
    tex = [f"% {note}" if note else "%", r"\begin{tabular}{" + "l" * k + "r" * len(metrics) + "}", r"\toprule",
           " & " * k + rf"\multicolumn{{{len(SAFETY)}}}{{c}}{{Safety}} & "
           rf"\multicolumn{{{len(metrics) - len(SAFETY)}}}{{c}}{{Utility}} \\",
           rf"\cmidrule(lr){{{k + 1}-{k + len(SAFETY)}}}\cmidrule(lr){{{k + len(SAFETY) + 1}-{k + len(metrics)}}}",
           " & ".join([*(param_label(c, True).capitalize() for c, _ in keys),
                       *(f"{label.capitalize()} {ARROW[d][1]}" for _, label, d in metrics)]) + r" \\",
           r"\midrule"]
    md = ["| " + " | ".join([*head, *(f"{label} {ARROW[d][0]}" for _, label, d in metrics)]) + " |",
          "| " + " | ".join(["---"] * k + ["---:"] * len(metrics)) + " |"]
    previous = None
    for i, row in rows.iterrows():
        if group and previous is not None and row[group] != previous:
            tex.append(r"\midrule")
        previous = row[group] if group else None
        cells_tex = [_key_text(row[c], True) for c, _ in keys]
        cells_md = [_key_text(row[c], False) for c, _ in keys]
        for m, _, _ in metrics:
            cells_tex.append(_cell(row, m, bold.loc[i, m], digits, True))
            cells_md.append(_cell(row, m, bold.loc[i, m], digits, False))
        tex.append(" & ".join(cells_tex) + r" \\")
        md.append("| " + " | ".join(cells_md) + " |")
    tex += [r"\bottomrule", r"\end{tabular}"]
    md_text = "\n".join(md) + "\n" + (f"\n{note}\n" if note else "")
    return "\n".join(tex) + "\n", md_text


def placeholder_table(what: str) -> tuple[str, str]:
    text = f"{NO_SWEEP}: no sweep varies {what}"
    return (f"% {text}\n\\begin{{tabular}}{{l}}\n\\toprule\n{latex_escape(text)} \\\\\n\\bottomrule\n"
            "\\end{tabular}\n", f"*{text.capitalize()}.*\n")


INTERVAL_NOTE = ("Rates are fractions of the evaluation set's prompts; [low, high] is the 95% Wilson score "
                 "interval; mean ± sd is the mean and sample standard deviation over zoo seeds.")


def main_table(summary: pd.DataFrame, counts: pd.DataFrame, digits: int = 3) -> tuple[str, str]:
    """Rows: models (base, experts, then merges); bold: the best merge per column."""
    rows = main_rows(summary, counts)
    metrics = metrics_of(summary)
    agg = aggregate(rows.assign(_row=range(len(rows))), ["_row"], metrics).drop(columns="_row")
    agg.insert(0, "model", rows["model"].values)
    agg.insert(1, "kind", rows["kind"].values)
    merged = agg["kind"].isin(["merge", "data-aware"])
    note = INTERVAL_NOTE + (" Bold: the best merge per column." if merged.any() else " Bold: best per column.")
    return render_table(agg, [("model", "model"), ("kind", "kind")], metrics, group=None, note=note, digits=digits,
                        bold_rows=merged if merged.any() else None)


def ablation_table(sweeps: pd.DataFrame, ablation: str, digits: int = 3) -> tuple[str, str]:
    rows = ablation_rows(sweeps, ablation)
    if rows.empty:
        return placeholder_table(" or ".join(p.rstrip("_") for p in ABLATIONS[ablation]))
    kept = [c for c in rows.columns if c.startswith(KEPT) and rows[c].notna().any()]
    rows[kept] = rows[kept].round(digits + 1)
    keys = [("sweep", "sweep")] + [(c, param_label(c)) for c in param_columns(rows)] + \
        [(c, param_label(c)) for c in kept]  # counts differ across patterns and locations
    note = INTERVAL_NOTE + " Bold: the best point of each sweep per column."
    return render_table(rows.reset_index(drop=True), keys, metrics_of(sweeps), group="sweep", note=note,
                        digits=digits)


def _signed(value: float, digits: int) -> str:
    """A difference with its sign (+0.154, −0.020); zero as 0.000."""
    text = f"{value:+.{digits}f}"
    return f"{0:.{digits}f}" if float(text) == 0 else text


def _p_text(p: float) -> str:
    return "–" if pd.isna(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def _paired_cells(row, labels: dict, digits: int, latex: bool) -> list[str]:
    """LED, baseline, metric, n, the two rates, Δ [lo, hi], b, c, p; Δ and p bold where p < 0.05."""
    def num(v, fmt):
        return ("--" if latex else "–") if pd.isna(v) else fmt(v)

    def signed(v):
        text = _signed(v, digits)
        return text.replace("-", "$-$") if latex else text

    bold = pd.notna(row["p"]) and row["p"] < 0.05
    diff = num(row["diff"], signed)
    p = _p_text(row["p"]).replace("–", "--" if latex else "–").replace("<", "$<$" if latex else "<")
    if bold:
        diff, p = (rf"\textbf{{{diff}}}", rf"\textbf{{{p}}}") if latex else (f"**{diff}**", f"**{p}**")
    if pd.notna(row["lo"]):
        lo, hi = signed(row["lo"]), signed(row["hi"])
        diff += rf" {{\scriptsize [{lo}, {hi}]}}" if latex else f" [{lo}, {hi}]"
    label, direction = labels.get(row["metric"], (row["metric"].replace("_", " "), None))
    metric = f"{label} {ARROW[direction][1 if latex else 0]}" if direction else label
    keys = [row["led"], row["baseline"]]
    return [*(latex_escape(k) if latex else k for k in keys), metric, num(row["n"], lambda v: f"{int(v)}"),
            num(row["led_rate"], lambda v: f"{v:.{digits}f}"), num(row["baseline_rate"], lambda v: f"{v:.{digits}f}"),
            diff, num(row["b"], lambda v: f"{int(v)}"), num(row["c"], lambda v: f"{int(v)}"), p]


PAIRED_NOTE = ("Δ: LED's rate minus the baseline's. Same prompts, one run: n prompts, both models' 0/1 outcome on each; "
               "b: prompts counted for LED and not for the baseline, c: the reverse (the discordant pairs), Δ = (b − c)/n; "
               "[low, high]: 95% paired bootstrap percentile interval ({resamples:,} resamples of the prompts, seed "
               "{seed}); p: two-sided exact McNemar test on the b + c discordant prompts. Across zoo seeds: n zoo seeds "
               "the sweeps repeat both merges on; Δ: the mean of the per-seed differences, [low, high] its 95% t "
               "interval, p: the paired t test (– where the differences are all equal). Bold: p < 0.05.")


def paired_table(prompt_rows: pd.DataFrame, seed_rows: pd.DataFrame, labels: dict, *, seed: int,
                 resamples: int = RESAMPLES, empty_prompts: str = "", empty_seeds: str = "",
                 digits: int = 3) -> tuple[str, str]:
    """The paired table: LED against each baseline merge, per metric, on the same prompts (one run) and across zoo
    seeds (`ledmerge.paper.paired`). `labels`: metric -> (label, direction); `empty_*`: what a panel without rows
    says."""
    note = PAIRED_NOTE.format(resamples=resamples, seed=seed)
    panels = [(f"Same prompts, one run (seed {seed})", prompt_rows, empty_prompts),
              ("Across zoo seeds", seed_rows, empty_seeds)]
    cols = 10
    tex = [f"% {note}", r"\begin{tabular}{lllrrrrrrr}", r"\toprule",
           r" & & & & \multicolumn{2}{c}{Rate} & & \multicolumn{2}{c}{Discordant} & \\",
           r"\cmidrule(lr){5-6}\cmidrule(lr){8-9}",
           r"LED & Baseline & Metric & $n$ & LED & Baseline & $\Delta$ (LED $-$ baseline) & LED & Baseline & $p$ \\"]
    md_head = ["| LED | baseline | metric | n | LED rate | baseline rate | Δ (LED − baseline) [95%] | b (LED only) "
               "| c (baseline only) | p |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    md = []
    for title, rows, empty in panels:
        tex += [r"\midrule", rf"\multicolumn{{{cols}}}{{l}}{{\emph{{{latex_escape(title)}}}}} \\"]
        md.append(f"**{title}**\n")
        if rows.empty:
            tex.append(rf"\multicolumn{{{cols}}}{{l}}{{{latex_escape(empty)}}} \\")
            md.append(f"*{empty[:1].upper() + empty[1:]}.*\n")
            continue
        previous = None
        lines = list(md_head)
        for _, row in rows.iterrows():
            if previous is not None and (row["led"], row["baseline"]) != previous:
                tex.append(r"\addlinespace")
            previous = (row["led"], row["baseline"])
            tex.append(" & ".join(_paired_cells(row, labels, digits, True)) + r" \\")
            lines.append("| " + " | ".join(_paired_cells(row, labels, digits, False)) + " |")
        md.append("\n".join(lines) + "\n")
    tex += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(tex) + "\n", "\n".join(md) + f"\n{note}\n"


def paired_from_files(summary: pd.DataFrame, metrics_paths: dict, sweeps: pd.DataFrame, led: list[str], seed: int,
                      resamples: int = RESAMPLES, digits: int = 3) -> tuple[str, str]:
    """The paired table from the run's files: LED merges `led` against every other merge of the summary (kind
    merge) on each metric whose per-prompt outcomes both metrics.json hold; and the sweeps' zoo-seed repeats."""
    unknown = [m for m in led if m not in set(summary["model"])]
    if unknown:
        raise LedmergeError(f"LED merge(s) {unknown} are not models of the summary: name configured merges (--led)")
    baselines = [m for m, k in zip(summary["model"], summary["kind"]) if k == "merge" and m not in led]
    reports = {}
    for name in [*led, *baselines]:
        if name not in metrics_paths:
            raise LedmergeError(f"no metrics.json given for model {name!r}: pass it as --metrics {name}=PATH")
        reports[name] = json.loads(Path(metrics_paths[name]).read_text())
    metrics = [m for m, _, _ in metrics_of(summary) if m != MEAN_UTILITY[0]]
    prompts, missing = per_prompt(reports, led, baselines, metrics, seed, resamples, LEVEL)
    if not led or not baselines:
        empty = "no LED merge and baseline merge to pair" + ("" if led else " (no LED merge named)")
    else:
        empty = ("no per-prompt outcomes in the merges' metrics.json (evaluated before they were recorded): rerun "
                 "their evaluations")
    seed_metrics = metrics_of(sweeps) if not sweeps.empty else []
    seeds = across_seeds(sweeps, led, [*param_columns(sweeps), SEED] if not sweeps.empty else [],
                         [m for m, _, _ in seed_metrics], LEVEL)
    labels = {m: (label, d) for m, label, d in [*metrics_of(summary), *seed_metrics]}
    tex, md = paired_table(prompts, seeds, labels, seed=seed, resamples=resamples, empty_prompts=empty,
                           empty_seeds="no sweep repeats an LED merge and a baseline over two or more zoo seeds",
                           digits=digits)
    if missing and not prompts.empty:  # some metrics lack outcomes (an evaluation older than them)
        gap = f"Left out, for want of per-prompt outcomes in metrics.json: {', '.join(missing)}."
        tex, md = tex.replace("\n", f" {gap}\n", 1), md.rstrip("\n") + f" {gap}\n"
    return tex, md


# ---------------------------------------------------------------- figures

def _boxes_overlap(a, b, pad: float = 1.0) -> bool:
    return not (a.x1 + pad <= b.x0 or b.x1 + pad <= a.x0 or a.y1 + pad <= b.y0 or b.y1 + pad <= a.y0)


def label_box(text, renderer):
    """The box of an annotation's text alone (an Annotation's own extent also covers its leader line)."""
    text.update_positions(renderer)  # an annotation not drawn yet has no position in pixels
    return matplotlib.text.Text.get_window_extent(text, renderer)


# Offsets (in points) tried for a label, nearest first, in a fixed order: the placement is deterministic.
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
_RADII = [4, 8, 13, 19, 26, 34, 44, 56]


def place_labels(ax, xs, ys, labels, fontsize: float = 7) -> list:
    """Annotate each point with its label where the label's box overlaps no earlier label and no marker.

    Greedy and deterministic: labels are placed in input order, each at the first free offset of a fixed list
    (nearer first); a label moved beyond the nearest ring gets a thin leader line. Labels that still find no
    free spot within the figure keep the farthest offset tried, so the caller's test catches a crowded plot."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    marker_r = 3.5 * fig.dpi / 72
    markers = []
    for x, y in zip(xs, ys):
        px, py = to_px((x, y))
        markers.append(matplotlib.transforms.Bbox([[px - marker_r, py - marker_r], [px + marker_r, py + marker_r]]))
    frame = fig.bbox
    placed, texts = [], []
    for x, y, label in zip(xs, ys, labels):
        text = None
        for r in _RADII:
            for dx, dy in _DIRECTIONS:
                norm = math.hypot(dx, dy)
                off = (dx * r / norm, dy * r / norm)
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                if text is not None:
                    text.remove()
                text = ax.annotate(label, (x, y), xytext=off, textcoords="offset points", ha=ha, va=va,
                                   fontsize=fontsize, annotation_clip=False,
                                   arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5", shrinkA=0, shrinkB=2)
                                   if r > _RADII[0] else None)
                box = label_box(text, renderer)
                inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1)
                if inside and not any(_boxes_overlap(box, b) for b in placed + markers):
                    break
            else:
                continue
            break
        placed.append(label_box(text, renderer))
        texts.append(text)
    return texts


def safety_utility_figure(summary: pd.DataFrame, counts: pd.DataFrame):
    """Harmful rate (with its Wilson interval) against mean utility, every model labelled; top left is best."""
    rows = main_rows(summary, counts)
    rows = rows[rows["harmful_rate"].notna() & rows["mean_utility"].notna()].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.9))
    for kind in KINDS:
        sub = rows[rows["kind"] == kind]
        if sub.empty:
            continue
        iv = [rate_interval(r, n) for r, n in zip(sub["harmful_rate"], sub["n_harmful_rate"].astype(float))]
        err = [[max(0.0, r - lo) if not math.isnan(lo) else 0.0 for r, (lo, _) in zip(sub["harmful_rate"], iv)],
               [max(0.0, hi - r) if not math.isnan(hi) else 0.0 for r, (_, hi) in zip(sub["harmful_rate"], iv)]]
        style = KIND_STYLE[kind]
        ax.errorbar(sub["harmful_rate"], sub["mean_utility"], xerr=err, fmt="none", ecolor=style["color"],
                    elinewidth=0.6, alpha=0.5, zorder=2)
        ax.scatter(sub["harmful_rate"], sub["mean_utility"], s=22, label=kind, zorder=3, edgecolor="white",
                   linewidth=0.4, **style)
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xlabel="harmful rate ↓", ylabel="mean utility ↑")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(KINDS), handletextpad=0.2,
              columnspacing=0.8, borderaxespad=0.2)
    texts = place_labels(ax, rows["harmful_rate"].tolist(), rows["mean_utility"].tolist(), rows["model"].tolist())
    return fig, texts


def placeholder_figure(text: str, width: float = COLUMN_WIDTH):
    fig, ax = plt.subplots(figsize=(width, 1.2))
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    return fig


def _errorbars(rows: pd.DataFrame, m: str):
    lo, hi = rows[f"{m}_lo"].astype(float), rows[f"{m}_hi"].astype(float)
    v = rows[m].astype(float)
    return [(v - lo).clip(lower=0).fillna(0), (hi - v).clip(lower=0).fillna(0)]


def rate_sweep_figure(sweeps: pd.DataFrame):
    """Harmful rate and mean utility against the safety task's rate, one line per location method.

    Points of one method at one rate (seeds, or other parameters the sweeps also vary) are averaged, ± their sd."""
    rows = ablation_rows(sweeps, "rate")
    if rows.empty or "rate_safety" not in rows or rows["rate_safety"].nunique() < 2:
        return placeholder_figure(f"{NO_SWEEP}: no sweep varies rate_safety", FULL_WIDTH)
    raw = sweeps[sweeps["sweep"].isin(rows["sweep"].unique()) & sweeps["rate_safety"].notna()]
    # one line per location method and control (count-matched random, magnitude: `control`)
    by = [c for c in ("location", "control") if c in raw and raw[c].notna().any()]
    label = raw[by].astype(str).agg(" / ".join, axis=1) if by else "–"
    raw = raw.assign(location=label)
    points = aggregate(raw, ["location", "rate_safety"], metrics_of(sweeps)).sort_values(["location", "rate_safety"],
                                                                                       kind="stable")
    fig, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.4), sharex=True)
    for ax, (m, label, d) in zip(axes, [SAFETY[0], MEAN_UTILITY]):
        for i, (loc, g) in enumerate(points.groupby("location", sort=True)):
            ax.errorbar(g["rate_safety"], g[m], yerr=_errorbars(g, m), marker="os^Dv<>p"[i % 8], capsize=2,
                        color=PALETTE[i % len(PALETTE)], label=loc, elinewidth=0.6)
        ax.set(xlabel="safety rate (fraction of weights located)", ylabel=f"{label} {ARROW[d][0]}", ylim=(-0.05, 1.05))
    if by:
        axes[1].legend(title=" / ".join(by), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def location_ablation_figure(sweeps: pd.DataFrame):
    """Grouped bars: each metric for each location method (points of one method averaged)."""
    rows = ablation_rows(sweeps, "location")
    if rows.empty:
        return placeholder_figure(f"{NO_SWEEP}: no sweep varies location", FULL_WIDTH)
    raw = sweeps[sweeps["sweep"].isin(rows["sweep"].unique()) & sweeps["location"].notna()]
    metrics = metrics_of(sweeps)
    points = aggregate(raw, ["location"], metrics).sort_values("location", kind="stable").reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(FULL_WIDTH, 2.4))
    width = 0.8 / len(points)
    for i, row in points.iterrows():
        xs = [j + (i - (len(points) - 1) / 2) * width for j in range(len(metrics))]
        values = [row[m] for m, _, _ in metrics]
        err = [[max(0.0, row[m] - row[f"{m}_lo"]) if pd.notna(row[f"{m}_lo"]) else 0.0 for m, _, _ in metrics],
               [max(0.0, row[f"{m}_hi"] - row[m]) if pd.notna(row[f"{m}_hi"]) else 0.0 for m, _, _ in metrics]]
        ax.bar(xs, values, width=width * 0.92, yerr=err, capsize=1.5, color=PALETTE[i % len(PALETTE)],
               error_kw=dict(elinewidth=0.6), label=row["location"])
    ax.set_xticks(range(len(metrics)), [f"{label} {ARROW[d][0]}" for _, label, d in metrics])
    ax.set(ylim=(0, 1.05), ylabel="fraction of prompts")
    ax.grid(axis="x", visible=False)
    ax.legend(title="location method", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def safety_only_rows(sweeps: pd.DataFrame) -> pd.DataFrame:
    """Sweep points that merge the safety task vector alone (every other task's λ 0, `rate_safety` swept): the
    direct test of how much of it refusals need (config/ablations.yaml's `safety_only`)."""
    others = [c for c in sweeps.columns if c.startswith("lambda_") and c != "lambda_safety"]
    if sweeps.empty or not others or "rate_safety" not in sweeps:
        return sweeps.iloc[0:0]
    alone = sweeps[others].astype(float).eq(0).all(axis=1) & sweeps["rate_safety"].notna()
    return sweeps[alone]


def safety_only_figure(sweeps: pd.DataFrame):
    """Harmful rate of θ_0 + M ⊙ τ_safety against the safety rate, one line per location / control."""
    raw = safety_only_rows(sweeps)
    if raw.empty or raw["rate_safety"].nunique() < 2:
        return placeholder_figure(f"{NO_SWEEP}: no sweep merges the safety task vector alone over rate_safety",
                                  COLUMN_WIDTH)
    by = [c for c in ("location", "control") if c in raw and raw[c].notna().any()]
    raw = raw.assign(line=raw[by].astype(str).agg(" / ".join, axis=1) if by else "LED")
    points = aggregate(raw, ["line", "rate_safety"], metrics_of(sweeps)).sort_values(["line", "rate_safety"],
                                                                                   kind="stable")
    m, label, d = SAFETY[0]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.4))
    for i, (line, g) in enumerate(points.groupby("line", sort=True)):
        ax.errorbar(g["rate_safety"], g[m], yerr=_errorbars(g, m), marker="os^Dv<>p"[i % 8], capsize=2,
                    color=PALETTE[i % len(PALETTE)], label=line, elinewidth=0.6)
    ax.set(xlabel="safety rate r", ylabel=f"{label} {ARROW[d][0]}", ylim=(-0.05, 1.05), xscale="log")
    rates = sorted(points["rate_safety"].unique())  # one labelled tick per swept rate, none in between
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(rates))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{r:g}" for r in rates]))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(title=" / ".join(by) or None, fontsize=6)
    return fig


# ---------------------------------------------------------------- localisation

MODULE_TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOCALISATION = [("mass_expert", "expert mass in top-r"), ("mass_base", "base mass in top-r"),
                ("overlap_share", "top-r overlap"), ("chance", "chance"), ("removed_share", "removed by Disjoint"),
                ("kept_fraction", "final fraction")]
LOCALISATION_NOTE = ("Per task and module type, over the main run's scored tensors (masks/localisation.csv). "
                     "Mass in top-r: the share of the summed importance score in the tensor's top-r (mean over "
                     "tensors; r if scores were even, 1 if the top-r held all of it; empty for rank16 scores). "
                     "Top-r overlap: |TopR(base) ∩ TopR(expert)| / |TopR(expert)|; chance: what independent top-r "
                     "sets would give (|TopR(base)| / n, about r). Removed by Disjoint: the share of the task's "
                     "election that other tasks also elected. Final fraction: the final mask's share of the weights.")


def localisation_rows(path) -> pd.DataFrame:
    """masks/localisation.csv aggregated per task and module type (attention q/k/v/o, MLP gate/up/down; other
    modules under their own name): counts pooled over the tensors, mass shares averaged."""
    df = pd.read_csv(path)
    if df.empty:
        return df
    df["module"] = df["module"].astype(str)
    df["removed"] = df["elected"] - df["kept"]
    order = {m: i for i, m in enumerate(MODULE_TYPES)}
    rows = []
    for (task, module), g in df.groupby(["task", "module"], sort=False):
        top_e, top_b = g["top_expert"].sum(min_count=1), g["top_base"].sum(min_count=1)
        rows.append({"task": task, "module": module, "rate": g["rate"].iloc[0], "tensors": len(g),
                     "mass_expert": g["mass_expert"].mean(), "mass_base": g["mass_base"].mean(),
                     "overlap_share": g["overlap"].sum(min_count=1) / top_e if top_e else float("nan"),
                     "chance": top_b / g["numel"].sum() if pd.notna(top_b) else float("nan"),
                     "removed_share": g["removed"].sum() / g["elected"].sum() if g["elected"].sum() else float("nan"),
                     "kept_fraction": g["kept"].sum() / g["numel"].sum()})
    out = pd.DataFrame(rows)
    tasks = list(dict.fromkeys(df["task"]))
    return out.sort_values(["task", "module"], key=lambda c: c.map(
        (lambda t: tasks.index(t)) if c.name == "task" else (lambda m: order.get(m, len(order)))),
        kind="stable").reset_index(drop=True)


def localisation_table(path, digits: int = 3) -> tuple[str, str]:
    if path is None or not Path(path).is_file():
        return placeholder_table("the localisation statistics (no masks/localisation.csv)")
    rows = localisation_rows(path)
    head = ["task", "module", "rate", *(label for _, label in LOCALISATION)]

    def cell(v, latex):
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.{digits}f}"
        return latex_escape(str(v)) if latex else str(v)

    tex = [f"% {LOCALISATION_NOTE}", r"\begin{tabular}{ll" + "r" * (len(head) - 2) + "}", r"\toprule",
           " & ".join(latex_escape(h).capitalize() for h in head) + r" \\", r"\midrule"]
    md = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |"]
    previous = None
    for _, row in rows.iterrows():
        if previous is not None and row["task"] != previous:
            tex.append(r"\midrule")
        previous = row["task"]
        values = [row["task"], row["module"], row["rate"], *(row[c] for c, _ in LOCALISATION)]
        tex.append(" & ".join(cell(v, True) for v in values) + r" \\")
        md.append("| " + " | ".join(cell(v, False) for v in values) + " |")
    tex += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(tex) + "\n", "\n".join(md) + f"\n\n{LOCALISATION_NOTE}\n"


def localisation_figure(path):
    """Per module type, one bar per task: the base/expert top-r overlap against chance, and the share of the
    election that Disjoint removed."""
    if path is None or not Path(path).is_file():
        return placeholder_figure("no localisation statistics (masks/localisation.csv)", FULL_WIDTH)
    rows = localisation_rows(path)
    modules = list(dict.fromkeys(rows["module"]))
    tasks = list(dict.fromkeys(rows["task"]))
    fig, axes = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.4), sharex=True)
    width = 0.8 / max(1, len(tasks))
    for ax, (col, label) in zip(axes, [("overlap_share", "top-r overlap (base ∩ expert)"),
                                        ("removed_share", "share removed by Disjoint")]):
        for i, task in enumerate(tasks):
            g = rows[rows["task"] == task].set_index("module").reindex(modules)
            xs = [j + (i - (len(tasks) - 1) / 2) * width for j in range(len(modules))]
            ax.bar(xs, g[col].fillna(0), width=width * 0.92, color=PALETTE[i % len(PALETTE)], label=task)
            if col == "overlap_share":  # chance: independent top-r sets
                ax.scatter(xs, g["chance"], marker="_", color="black", s=40, zorder=3,
                           label="chance" if i == 0 else None)
        ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right")
        ax.set(ylim=(0, 1.05), ylabel=label)
        ax.grid(axis="x", visible=False)
    axes[1].legend(title="task", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[0].legend(handles=[h for h in axes[0].get_legend_handles_labels()[0][-1:]], labels=["chance"],
                   loc="upper right")
    return fig


# ---------------------------------------------------------------- all of it

def build_paper(summary_csv, metrics_paths: dict[str, str | Path], mask_stats_csv, mask_overlap_csv, out_dir,
                sweeps_csv=None, digits: int = 3, localisation_csv=None, led: list[str] | None = None,
                seed: int = 0, resamples: int = RESAMPLES) -> list[Path]:
    """Write every file of `OUTPUTS` into `out_dir` (existing files replaced atomically); returns their paths.

    `led`: the LED merges, each compared in the paired table with every other merge; `seed` (the config's) seeds its
    bootstrap of `resamples` resamples."""
    summary_csv = Path(summary_csv)
    if not summary_csv.is_file():
        raise LedmergeError(f"summary table {summary_csv} does not exist: run the report step first")
    summary = pd.read_csv(summary_csv)
    missing = [c for c in ("model", "kind", *(m for m, _, _ in SAFETY), MEAN_UTILITY[0]) if c not in summary]
    if missing:
        raise LedmergeError(f"{summary_csv} lacks column(s) {missing}: is it the report's summary.csv?")
    counts = load_counts(metrics_paths)
    sweeps = load_sweeps(sweeps_csv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tables = {"table_main": main_table(summary, counts, digits)}
    tables.update({f"table_ablation_{a}": ablation_table(sweeps, a, digits) for a in ABLATIONS})
    tables["table_localisation"] = localisation_table(localisation_csv, digits)
    tables[PAIRED_TABLE] = paired_from_files(summary, metrics_paths, sweeps, led or [], seed, resamples, digits)
    for name, (tex, md) in tables.items():
        write_text(out_dir / f"{name}.tex", tex)
        write_text(out_dir / f"{name}.md", md)
    with plt.rc_context(STYLE):
        save_figure(safety_utility_figure(summary, counts)[0], out_dir, "fig_safety_utility")
        save_figure(rate_sweep_figure(sweeps), out_dir, "fig_rate_sweep")
        save_figure(location_ablation_figure(sweeps), out_dir, "fig_location_ablation")
        plot_mask_overlap(mask_stats_csv, mask_overlap_csv, out_dir, name="fig_mask_overlap",
                          figsize=(FULL_WIDTH, 2.6))
        save_figure(localisation_figure(localisation_csv), out_dir, "fig_localisation")
        save_figure(safety_only_figure(sweeps), out_dir, "fig_safety_only")
    return [out_dir / name for name in OUTPUTS]
