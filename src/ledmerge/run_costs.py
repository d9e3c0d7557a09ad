"""What a run cost, rule by rule: every job's Snakemake benchmark record, summed up per rule beside what the rule
asked for.

Every rule that runs a job has a `benchmark:` record, <results>/benchmarks/<rule>/<job>.tsv (`Layout.benchmark`):
one TSV row Snakemake 9 writes when the job ends, with columns s (wall seconds), h:m:s, max_rss, max_vms, max_uss,
max_pss (MB), io_in, io_out (MB), mean_load and cpu_time (user + system seconds). Memory and CPU are sampled from
the job's process tree (every 0.5 s for its first ~15 s, then every 30 s): a peak between two samples is missed,
and the CPU time is the processes' total at the last sample, so up to 30 s of a long job's end are not in it;
`NA` means the job ended before its first sample. Wall time is exact.

The warm worker of local runs (`ledmerge.worker`) runs a job's step in a process forked from itself, outside the
job's process tree: such a record's CPU time and memory are the client's, not the step's. The report is told
(`warm_worker`) and leaves them out rather than show them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .errors import LedmergeError
from .fileio import atomic_path, write_text
from .layout import benchmark_rule
from .summary import plt, save_figure, to_markdown

# Per rule: over its jobs, wall and CPU seconds summed, averaged and at their largest; the peak memory averaged and at
# its largest (peaks of different jobs do not add up); then what the rule asked for, and the largest use against it.
COLUMNS = ["rule", "jobs", "wall_s_sum", "wall_s_mean", "wall_s_max", "cpu_s_sum", "cpu_s_mean", "cpu_s_max",
           "max_rss_mb_mean", "max_rss_mb_max", "threads", "mem_mb", "runtime_min", "rss_of_mem_mb",
           "wall_of_runtime"]
MEASURED = ("s", "cpu_time", "max_rss")  # the columns of a record this table reads


def read_benchmark(path) -> dict[str, float]:
    """A job's record: {s, cpu_time, max_rss}, NaN where Snakemake wrote NA; the mean over rows when the rule
    repeats its benchmark."""
    path = Path(path)
    if not path.is_file():
        raise LedmergeError(f"benchmark record {path} does not exist: run its job first (Snakemake writes it when "
                            "the job ends)")
    df = pd.read_csv(path, sep="\t", na_values=["NA", "-"])
    missing = [c for c in MEASURED if c not in df]
    if missing or df.empty:
        raise LedmergeError(f"{path} is not a Snakemake benchmark record (no row, or no column {missing}): rerun "
                            "its job")
    return {c: float(pd.to_numeric(df[c], errors="coerce").mean()) for c in MEASURED}


def run_costs(benchmarks, requested: dict[str, dict] | None = None, warm_worker: bool = False) -> pd.DataFrame:
    """One row per rule (COLUMNS), in the order of the rules' first records in `benchmarks` (each job's record:
    `Layout.benchmark` paths, the rule read from the path); `requested`: {rule: {threads, mem_mb, runtime (minutes)}}
    as the rules ask for them (absent: unknown). With `warm_worker` the CPU time and memory are left out (NaN)."""
    jobs = [{"rule": benchmark_rule(p), **read_benchmark(p)} for p in benchmarks]
    if not jobs:
        raise LedmergeError("no benchmark records to summarise: give each job's record (<results>/benchmarks/...)")
    df = pd.DataFrame(jobs)
    if warm_worker:
        df[["cpu_time", "max_rss"]] = math.nan
    g = df.groupby("rule", sort=False)
    out = pd.DataFrame({"jobs": g.size()})
    for name, col, stats in (("wall_s", "s", ("sum", "mean", "max")), ("cpu_s", "cpu_time", ("sum", "mean", "max")),
                             ("max_rss_mb", "max_rss", ("mean", "max"))):
        for stat in stats:  # min_count: a rule with no measured job is NaN, not 0
            out[f"{name}_{stat}"] = g[col].sum(min_count=1) if stat == "sum" else g[col].agg(stat)
    asked = {rule: (requested or {}).get(rule, {}) for rule in out.index}
    out["threads"] = [asked[r].get("threads", math.nan) for r in out.index]
    out["mem_mb"] = [asked[r].get("mem_mb", math.nan) for r in out.index]
    out["runtime_min"] = [asked[r].get("runtime", math.nan) for r in out.index]
    out["rss_of_mem_mb"] = out["max_rss_mb_max"] / out["mem_mb"]
    out["wall_of_runtime"] = out["wall_s_max"] / (60 * out["runtime_min"])
    return out.reset_index()[COLUMNS]


def costs_markdown(df: pd.DataFrame, warm_worker: bool = False) -> str:
    note = ("Wall time, CPU time and peak memory (max_rss) of each rule's jobs, from Snakemake's benchmark records "
            "(`<results>/benchmarks/<rule>/`), beside what the rule asked for (threads, mem_mb, runtime in minutes: "
            "its `threads:` and the config's `resources` section; – where it sets none and Snakemake's defaults "
            "apply). rss_of_mem_mb is the largest peak over mem_mb, wall_of_runtime the longest job over runtime: "
            "near 1 or above, the request is too small. The report's and the paper's own jobs come after this table "
            "and are not in it.")
    if warm_worker:
        note += (" CPU time and memory are not shown: the warm worker ran the steps outside the jobs' process trees, "
                 "where Snakemake does not see them (`LEDMERGE_WORKER=off snakemake ...` measures them, as does a "
                 "cluster run).")
    counts = {c: df[c].map(lambda v: "–" if pd.isna(v) else f"{v:g}") for c in ("threads", "mem_mb", "runtime_min")}
    return "# Run costs\n\n" + note + "\n\n" + to_markdown(df.assign(**counts), digits=2)


def plot_run_costs(df: pd.DataFrame, out_dir: Path) -> None:
    """Per rule, one panel each (log scale: rules differ by orders of magnitude): wall time, CPU time and peak memory
    per job (hollow: the mean, filled: the largest job), the request as a cross (runtime, mem_mb)."""
    panels = (("wall_s", "wall time per job (s)", "runtime_min", 60), ("cpu_s", "CPU time per job (s)", None, 1),
              ("max_rss_mb", "peak memory per job (MB)", "mem_mb", 1))
    ys = list(range(len(df)))
    fig, axes = plt.subplots(1, 3, figsize=(12, 1.2 + 0.3 * len(df)), sharey=True)
    for ax, (name, label, request, scale) in zip(axes, panels):
        ax.plot(df[f"{name}_mean"], ys, "o", mfc="none", color="#08519c", ms=5, label="mean job")
        ax.plot(df[f"{name}_max"], ys, "o", color="#08519c", ms=3, label="largest job")
        if request:
            ax.plot(df[request] * scale, ys, "x", color="#d62728", ms=6, label="requested")
        if (df[f"{name}_max"] > 0).any():
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(ys, df["rule"])
    axes[0].set_ylim(len(df) - 0.5, -0.5)
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    save_figure(fig, out_dir, "run_costs")


def build_run_costs(benchmarks, out_dir, requested: dict[str, dict] | None = None,
                    warm_worker: bool = False) -> pd.DataFrame:
    """run_costs.csv, run_costs.md and run_costs.png (and .pdf) in `out_dir`; returns the table."""
    df = run_costs(benchmarks, requested, warm_worker)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "run_costs.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_text(out_dir / "run_costs.md", costs_markdown(df, warm_worker))
    plot_run_costs(df, out_dir)
    return df
