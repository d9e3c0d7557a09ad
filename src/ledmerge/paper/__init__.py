"""What goes into a paper: booktabs tables (LaTeX and Markdown twins) and print-ready figures (PDF and PNG).

Inputs: the report's summary.csv (one row per model), each model's metrics.json (the evaluation sets' sizes, for
95% Wilson intervals), the mask CSVs, and optionally sweeps.csv (one row per sweep point: `sweep`, `model`, the
swept parameters, the metrics and the set sizes `n_<set>`). The set of files written is fixed (`OUTPUTS`), so the
workflow rule's outputs are static: an ablation no sweep covers gets a placeholder saying so.

Intervals: a single run's rate carries its Wilson interval; points repeated over several zoo seeds (`zoo_seed`)
are shown as mean ± sample standard deviation over the seeds instead, since the seed is then the larger source of
variation. Mean utility is a mean of rates on different sets, so it has no Wilson interval of its own.

The paired table compares LED with each baseline merge prompt by prompt (`paired`: discordant counts, exact McNemar
p, paired bootstrap interval of the difference) and, where the sweeps repeat both over zoo seeds, by seed (mean
difference with its t interval).

The package holds what a paper contains (the tables, figures and metrics named below: light, so the workflow can
name the paper step's outputs without importing matplotlib); `build` makes them.
"""

from ..layout import AXES, ZOO_SEED, axis_prefix

# (column, short label, direction): the LED paper's layout, safety metrics then utility metrics. The utility
# columns are the run's (summary.csv's, between the safety columns and mean_utility): `build.metrics_of`.
SAFETY = [("harmful_rate", "harmful rate", "min"), ("over_refusal_rate", "over-refusal rate", "min"),
          ("empty_rate", "empty replies", "min"), ("utility_refusal_rate", "utility refusals", "min")]
MEAN_UTILITY = ("mean_utility", "mean utility", "max")
UTILITY_LABELS = {"math_accuracy": "math accuracy", "code_pass_rate": "code pass rate"}
ARROW = {"min": ("↓", r"$\downarrow$"), "max": ("↑", r"$\uparrow$")}
SEED = ZOO_SEED
# Ablation tables: the sweep parameters each one is about (a prefix ends with "_": rate_safety, lambda_math, ...;
# the sweep axes and their columns are ledmerge.layout's). `seed`: the sweeps repeated over zoo seeds (LED and the
# baselines alike), each point as mean ± sd over the seeds.
ABLATIONS = {"rate": (axis_prefix("rate"),), "pattern": ("pattern",), "location": ("location",),
             "control": ("control",),
             "lambda": (axis_prefix("lambda"),), "sparsity": ("density", "drop"), "seed": (SEED,)}
PARAM_PREFIXES = tuple(axis_prefix(a) for a in AXES if a != ZOO_SEED)  # the swept parameters besides the seed
# table_localisation / fig_localisation: the main run's masks/localisation.csv, per task and module type.
# LED against each baseline merge on the same prompts (`paired`: exact McNemar, paired bootstrap; across zoo seeds,
# t intervals), from the merges' per-prompt outcomes in metrics.json and sweeps.csv
PAIRED_TABLE = "table_paired"
TABLES = ["table_main", *(f"table_ablation_{a}" for a in ABLATIONS), "table_localisation", PAIRED_TABLE]
FIGURES = ["fig_safety_utility", "fig_rate_sweep", "fig_location_ablation", "fig_mask_overlap", "fig_localisation",
           "fig_safety_only"]
OUTPUTS = [f"{t}.{e}" for t in TABLES for e in ("tex", "md")] + [f"{f}.{e}" for f in FIGURES for e in ("pdf", "png")]
NO_SWEEP = "no sweep configured"
