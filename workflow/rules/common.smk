# Rule glue shared by the rules: the run's paths (bound from ledmerge.layout, where every run name and path is
# written), the config's model lists, and the inputs and arguments of the jobs. Rules stay thin: each is one
# `ledmerge <step>` call, the step named as the config section it reads, passed as `--options` (section_json);
# flags are written in each shell command. Names and their parsing live in ledmerge.layout, the sweeps' points and
# branch tables in ledmerge.sweeps.
# Software: every job runs `python -m ledmerge` with the Python that runs Snakemake (`make env` installs both).
# The `conda:` directives (CONDA_ENV, kept for `snakemake --lint`) are not a working `--sdm conda` setup:
# envs/ledmerge.yaml lacks ledmerge itself (not on any conda channel; it must be pip-installed from this
# repository), and `snakemake --sdm conda -n` could not be tried here (no conda on this machine, no network).
import functools
import json
import os
import re
import sys
from pathlib import Path

from ledmerge.checkpoint import ADAPTER_CONFIG, INDEX, PICKLE_INDEX, is_adapter, weight_files
from ledmerge.layout import (
    DATASET_NAME,
    EVAL_SETS,
    OBJECTIVES,
    OFFLINE_BENCHMARKS,
    PRETRAIN,
    ZOO,
    ZOO_FINETUNE_KEYS,
    ZOO_TASKS,
    Layout,
    calibration_dataset,
    cocktail_name,
    data_aware_base,
    data_aware_models,
    eval_dataset,
    evolve_name,
    hub_dir,
    is_evolved,
    is_hub,
    model_dir,
    parse_data_aware,
    zoo_files,
    zoo_from_scratch,
    zoo_train,
    zoo_world,
)
from ledmerge.evaluation.runner import local_data_files, task_specs
from ledmerge.specs import merge_spec
from ledmerge.sweeps import branches as sweep_branches, expand as expand_sweeps, swept_columns
from ledmerge.paper import FIGURES as PAPER_FIGURES, TABLES as PAPER_TABLES
from ledmerge.portable import pin as pin_numerics
from ledmerge.tokenizer import GENERATION_CONFIG, TEMPLATE_FILE, TOKENIZER_FILES

PATHS = Layout(config)
R = PATHS.results
# Jobs call the package with the Python that runs Snakemake, which must import ledmerge anyway (the
# Snakefile checks the config with it). Set here for the jobs' shells (not read from the user's
# environment, so no `envvars:` is needed); every other value reaches a rule through its
# input/output/params, which keeps provenance tracking and `snakemake --lint` clean.
os.environ.update(LEDMERGE=f"{sys.executable} -m ledmerge")
# portable_numerics: the CPU kernels every job computes with, pinned here, at parse time, so that the jobs' shells
# and the warm worker (started in onstart, it imports torch once for all jobs) inherit them, and a cluster job's
# Snakemake, parsing this file again, sets them again (ledmerge.portable: the variables).
pin_numerics(config)
# Documents the software of every rule (see the note at the top).
CONDA_ENV = os.path.join(workflow.basedir, "envs", "ledmerge.yaml")
TASKS = sorted(config["tasks"])
MERGES = sorted(config["merges"])
# Data-aware merges (data_aware.smk): named evo_<method>_<objective> and cocktail_<objective> (ledmerge.layout).
DA = config["data_aware"]
DOMAIN_TASKS = [t for t in TASKS if t != config["alignment_task"]]
DATA_AWARE = data_aware_models(config)
DA_BASE = data_aware_base(config)  # the base of the data-aware searches and their merges (data_aware.base_model)
EVOLVED = [m for m in DATA_AWARE if is_evolved(m)]
MODELS = ["base"] + TASKS + MERGES + DATA_AWARE

# ---- the run's paths (ledmerge.layout.Layout: one definition each; with wildcards, the rules' patterns) ----
LOG, HUB, TOKENIZER, SYNTHETIC, REPORT = PATHS.logs, PATHS.hub, PATHS.tokenizer, PATHS.synthetic, PATHS.report
PAPER, SWEEPS_CSV, MASK_STATS, MASK_OVERLAP = PATHS.paper, PATHS.sweeps_csv, PATHS.mask_stats, PATHS.mask_overlap
MASK_LOCALISATION = PATHS.mask_localisation
calibration_file, scores_file, elected_mask, final_mask = (
    PATHS.calibration_file, PATHS.scores_file, PATHS.elected_mask, PATHS.final_mask)
merged_dir, search_dir, eval_file, eval_data = PATHS.merged_dir, PATHS.search_dir, PATHS.eval_file, PATHS.eval_set
# the lm-eval tasks' local data files, inputs of every evaluation (a named benchmark's is written by benchmark_data)
LM_EVAL_DATA = [f for spec in task_specs(config["evaluation"]["lm_eval_tasks"]) for f in local_data_files(spec["data"]).values()]
benchmark_file = PATHS.benchmark  # every rule's `benchmark:`, next to its `log:` (f"{LOG}/...")


def paper_sweeps(wildcards):
    """sweeps.csv when sweeps are configured; none: the paper's ablation tables and figures are placeholders."""
    return [SWEEPS_CSV] if config.get("sweeps") else []


def pairs(names, path):
    """`name=path` arguments (the CLI's TASK=PATH lists), one per name."""
    return " ".join(f"{n}={path(n)}" for n in names)


def section_json(path):
    """The config section at dotted `path` (importance, data_aware.synthetic, ...) as JSON: a step's `--options`."""
    node = config
    for part in path.split("."):
        node = node[part]
    return as_json(node)


# the zoo: the toy world pretrained here, or the real-model miniature (zoo.start_from)
ZOO_SCRATCH = zoo_from_scratch(config)


def zoo_base_inputs(wildcards):
    """The toy base is pretrained on the zoo's corpus with its tokenizer; a real base needs nothing of the workflow."""
    if not ZOO_SCRATCH:
        return {}
    return {"corpus": PATHS.zoo_data(PRETRAIN), "tokenizer": PATHS.zoo_tokenizer}


def expert_seed(seed, task):
    """Training seed of a toy expert, from the zoo's seed (the config's, or a swept zoo seed)."""
    return seed + 1 + (TASKS.index(task) if task in TASKS else 0)


def random_args(location, task):
    """`ledmerge importance --seed --key` for location random_shared_draws: the config seed and the task (not the role, so a
    task's base and expert get the same draws); nothing for the other methods, so the seed is no rerun trigger."""
    return f"--seed {config['seed']} --key {task}" if location == "random_shared_draws" else ""


def opt_in(key):
    """A top-level boolean opt-in (trust_remote_code, allow_pickle) as its CLI flag when set."""
    return f"--{key.replace('_', '-')}" if config[key] else ""

# Models the tokenizer may come from (auto looks at the base, then at the aligned expert).
TOKENIZER_CANDIDATES = {"auto": ["base", config["alignment_task"]], "base": ["base"]}.get(
    config["tokenizer_source"], [config["tokenizer_source"]] if config["tokenizer_source"] in TASKS else []
)


def tokenizer_inputs(wildcards):
    """The candidate source models (or the source directory), their tokenizer files, and the chat template file,
    if one is given."""
    inputs = {"base": model_path("base")}
    inputs.update({t: model_path(t) for t in TOKENIZER_CANDIDATES if t != "base"})
    inputs["tokenizer_files"] = model_inputs("base", *TOKENIZER_CANDIDATES, tokenizer=True)
    if not TOKENIZER_CANDIDATES:  # a directory
        inputs["source"] = config["tokenizer_source"]
        inputs["tokenizer_files"] += model_inputs(config["tokenizer_source"], tokenizer=True)
    if config["chat_template"] is not None:
        inputs["chat_template"] = config["chat_template"]
    return inputs


def hub_models():
    """Every model given as {hub: org/name} (base, experts, a model judge): local directory -> spec."""
    sources = [config["base_model"], config["evaluation"]["judge_kwargs"].get("model"), DA["base_model"]]
    sources += [config["tasks"][t]["model"] for t in TASKS]
    return {hub_dir(config, s): s for s in sources if is_hub(s)}


def datasets_to_fetch():
    """Hugging Face datasets the workflow exports to JSONL (PATHS.dataset): name -> (spec, {field: column})."""
    out = {}
    for t in TASKS:
        cal = config["tasks"][t]["calibration"]
        if cal["source"] == "hf":
            spec = {k: cal.get(k) for k in ("name", "config_name", "split")}
            out[calibration_dataset(t)] = (spec, {"prompt": cal["prompt_column"], "response": cal["response_column"]})
    for key in EVAL_SETS:
        source = config["evaluation"][key]
        if isinstance(source, dict):
            spec = {"name": source["hf"], "config_name": source["config_name"], "split": source["split"]}
            out[eval_dataset(key)] = (spec, {"prompt": source["prompt_column"], "category": source["category_column"]})
    return out


HUB_MODELS = hub_models()
DATASETS = datasets_to_fetch()


def rule_resources(rule, device="cpu"):
    """`resources.<rule>` of the config as Snakemake resources; GPUs default to 1 unless `device` is cpu."""
    res = {k: v for k, v in config["resources"].get(rule, {}).items() if k != "threads"}
    res.setdefault("gpu", 0 if device == "cpu" else 1)
    return res


def rule_threads(rule, default=None):
    """`resources.<rule>.threads`, else `default`, else the top-level `threads`."""
    return config["resources"].get(rule, {}).get("threads", default or config["threads"])


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def model_path(name):
    """Directory of any model the workflow evaluates: base, an expert, or a merge."""
    if name in config["merges"] or name in DATA_AWARE:
        return merged_dir(name)
    return model_dir(config, name)


def local_model_files(path, tokenizer=False):
    """The files a job reads from local model directory `path`: the weights (the index and every shard it lists,
    or model.safetensors; pickle files with allow_pickle) and config.json; with `tokenizer`, the tokenizer files,
    chat template and generation config instead (what the tokenizer rule reads)."""
    return list(_local_model_files(str(path), tokenizer))


@functools.lru_cache(maxsize=None)
def _local_model_files(path, tokenizer):
    d = Path(path)
    if tokenizer:
        names = TOKENIZER_FILES + (TEMPLATE_FILE, "chat_template.json", GENERATION_CONFIG, "config.json")
        return tuple(str(d / n) for n in names if (d / n).is_file())
    # File names only (the index's, for a sharded checkpoint): no weights or headers are read.
    files = weight_files(d, allow_pickle=config["allow_pickle"])
    index = INDEX if (d / INDEX).is_file() else PICKLE_INDEX if any(f.suffix == ".bin" for f in files) else None
    extra = [d / n for n in (index, "config.json", ADAPTER_CONFIG) if n is not None and (d / n).is_file()]
    return tuple(sorted({str(f) for f in files + extra}))


def model_inputs(*models, tokenizer=False):
    """What a job that reads `models` (names: base, a task, a merge; or directories: the synthetic data generator, a
    tokenizer_source directory) depends on besides their directories: the weight files and config.json of each local
    model directory (with `tokenizer`, its tokenizer files), so a checkpoint replaced in place reruns exactly the jobs
    that read it (Snakemake only sees a directory's own time stamp). Models the workflow builds (the toy zoo, hub
    downloads, merges: everything under `results`) are `directory()` outputs, whose files do not exist when the
    workflow is parsed: nothing more than the directory (nor for a missing directory, which Snakemake reports)."""
    files = []
    for model in models:
        path = model_path(model) if model in MODELS else model
        where = os.path.abspath(path)
        built = where in map(os.path.abspath, HUB_MODELS) or where.startswith(os.path.join(os.path.abspath(R), ""))
        if not built and os.path.isdir(path):
            files += local_model_files(path, tokenizer)
    return files


def on_base(name):
    """For an expert that is a PEFT LoRA adapter (one already on disk: an adapter the hub fetch brings in this run
    is known as one from the next run on), the base it needs: {"base": its directory, "base_weights": its files};
    else {}. Scoring and evaluating it load the base, then the adapter."""
    if name not in config["tasks"] or not is_adapter(model_path(name)):
        return {}
    return {"base": model_path("base"), "base_weights": model_inputs("base")}


def base_flag(name):
    """` --base <dir>` for an adapter expert (on_base), else ""."""
    return f" --base {model_path('base')}" if on_base(name) else ""


def model_kind(name):
    if name in DATA_AWARE:
        return "data-aware"
    return "base" if name == "base" else "merge" if name in config["merges"] else "expert"


def merge_method(name):
    """The merge method of a configured or data-aware merge (the one its name says: ledmerge.layout)."""
    if name in config["merges"]:
        return merge_spec(config, name)["method"]  # an entry may be a mergekit file
    return parse_data_aware(name)[1]


def merge_spec_arg(name):
    """`ledmerge merge --spec`: the config's spec as JSON (specs.merge_spec: the one check-config validated), or
    @recipe.json written by a data-aware search."""
    return as_json(merge_spec(config, name)) if name in config["merges"] else f"@{search_dir(name)}/recipe.json"


def importance_device():
    """What the importance jobs run on, for their GPU request: a device_map other than cpu means GPUs."""
    device_map = config["importance"].get("device_map")
    if device_map is None:
        return config["importance"]["device"]
    places = device_map.values() if isinstance(device_map, dict) else [device_map]
    return "cpu" if all(str(p) == "cpu" for p in places) else "cuda"


def merge_inputs(wildcards):
    """A merge's inputs; a data-aware merge's base is DA_BASE, the base its search merged onto."""
    base = DA_BASE if wildcards.merge in DATA_AWARE else model_path("base")
    inputs = {"base": base, "experts": [model_path(t) for t in TASKS], "tokenizer": TOKENIZER,
              "weights": model_inputs(base, *TASKS)}
    if wildcards.merge in DATA_AWARE:
        inputs["recipe"] = f"{search_dir(wildcards.merge)}/recipe.json"
    if merge_method(wildcards.merge) == "led":
        inputs["masks"] = [final_mask(t) for t in TASKS]
    return inputs


def judge_model():
    """The local directory of a model judge given as {hub: org/name}, else []."""
    model = config["evaluation"]["judge_kwargs"].get("model")
    return hub_dir(config, model) if is_hub(model) else []


def search_inputs(wildcards):
    """Inputs of a data-aware search (data_aware.smk): its base (DA_BASE) and the experts, synthetic data, LED masks
    for method led."""
    inputs = {"base": DA_BASE, "experts": [model_path(t) for t in TASKS], "weights": model_inputs(DA_BASE, *TASKS),
              "search": f"{SYNTHETIC}/search.jsonl", "heldout": f"{SYNTHETIC}/heldout.jsonl", "tokenizer": TOKENIZER}
    if wildcards.get("method") == "led":
        inputs["masks"] = [final_mask(t) for t in TASKS]
    return inputs


def led_masks(method):
    """`--mask` values of a job that merges with `method`: the final LED masks for led, else none."""
    return pairs(TASKS, final_mask) if method == "led" else ""


# ---- sweeps (sweeps.smk): points and branch tables (ledmerge.sweeps), their paths (ledmerge.layout) ----
SWEEP_POINTS = expand_sweeps(config)
# Each distinct point once (sweeps may share points), and each branch id -> the first point that needs it.
SWEEP = sweep_branches(SWEEP_POINTS)
branch_model, branch_scores, branch_elected, branch_mask = (
    PATHS.branch_model, PATHS.branch_scores, PATHS.branch_elected, PATHS.branch_mask)


def point_metrics(name):
    return PATHS.point_eval(name, "metrics.json")


def sweep_merge_inputs(wildcards):
    p = SWEEP.points[wildcards.point]
    inputs = {"base": branch_model(p.zoo_seed, "base"), "experts": [branch_model(p.zoo_seed, t) for t in TASKS],
              "tokenizer": TOKENIZER, "weights": [] if p.zoo_seed is not None else model_inputs("base", *TASKS)}
    if p.uses_masks:
        inputs["masks"] = [branch_mask(p.masks, t) for t in TASKS]
    return inputs


def sweep_control_inputs(wildcards):
    """A count-matched control's inputs: the final masks it matches; for magnitude, the models (|θ_t − θ_0|)."""
    p = SWEEP.controls[wildcards.branch]
    inputs = {"matched": [branch_mask(p.matched, t) for t in TASKS]}
    if p.values["control"] == "magnitude":
        inputs.update(base=branch_model(p.zoo_seed, "base"), experts=[branch_model(p.zoo_seed, t) for t in TASKS],
                      weights=[] if p.zoo_seed is not None else model_inputs("base", *TASKS))
    return inputs


def sweep_control_models(wildcards):
    """`ledmerge control` arguments: --seed (random: the config seed), or --base and --expert (magnitude)."""
    p = SWEEP.controls[wildcards.branch]
    if p.values["control"] == "random":
        return f"--seed {config['seed']}"
    experts = pairs(TASKS, lambda t: branch_model(p.zoo_seed, t))
    return f"--base {branch_model(p.zoo_seed, 'base')} --expert {experts}"


def point_mask_stats(p):
    """The mask statistics of an LED point (its final or control masks' stats.csv), None for other methods."""
    return PATHS.branch_mask_stats(p.masks) if p.uses_masks else None


def sweeps_points_json():
    """`ledmerge sweeps-report --points`: every point of every sweep with its metrics file and mask statistics."""
    return as_json({"columns": swept_columns(config), "points": [
        {"sweep": p.sweep, "model": p.name, "values": p.values, "metrics": point_metrics(p.name),
         "mask_stats": point_mask_stats(p)} for p in SWEEP_POINTS]})


# ---- run costs (report.smk): the benchmark record of every job the report summarises ----
def job_benchmarks():
    """Every job's `benchmark:` record (benchmark_file, the rules' own patterns filled in), for each job the
    workflow runs for this config, but the report's and the paper's: those come after the report (the paper reads
    its summary). The report lists them as inputs (Snakemake writes a job's record when it ends), so listing a job
    that the run does not have would add it: the dry runs of the shipped configs plan the same jobs with and
    without this list (tests/test_workflow.py checks a record per planned job)."""
    zoo_data = config["base_model"] == ZOO or any(config["tasks"][t]["calibration"]["source"] == ZOO for t in TASKS)
    zoo_data = zoo_data or any(config["evaluation"][k] == ZOO for k in EVAL_SETS)
    zoo_seeds = sorted({p.zoo_seed for p in SWEEP.points.values() if p.zoo_seed is not None})
    jobs = {
        "fetch_model": [[os.path.basename(d)] for d in HUB_MODELS],
        "fetch_dataset": [[name] for name in DATASETS],
        "benchmark_data": [[n] for n in OFFLINE_BENCHMARKS
                           if PATHS.dataset(n) in {eval_data(k) for k in EVAL_SETS} | set(LM_EVAL_DATA)],
        "zoo_data": [[]] if zoo_data else [],
        "zoo_base": [[]] if config["base_model"] == ZOO else [],
        "zoo_expert": [[t] for t in TASKS if config["tasks"][t]["model"] == ZOO],
        "tokenizer": [[]],
        "calibration": [[t] for t in TASKS],
        "importance": [[t, role] for t in TASKS for role in ("base", "expert")],
        "election": [[t] for t in TASKS],
        "disjoint": [[]],
        "synthetic": [[]] if DATA_AWARE else [],
        "evolve": [list(parse_data_aware(m)[1:]) for m in EVOLVED],
        "cocktail": [[parse_data_aware(m)[2]] for m in DATA_AWARE if not is_evolved(m)],
        "merge": [[m] for m in MERGES + DATA_AWARE],
        "evaluation": [[m] for m in MODELS],
        "sweep_zoo_base": [[str(s)] for s in zoo_seeds],
        "sweep_zoo_expert": [[str(s), t] for s in zoo_seeds for t in TASKS],
        "sweep_importance": [[b, t, role] for b in SWEEP.scores for t in TASKS for role in ("base", "expert")],
        "sweep_election": [[b, t] for b, t in SWEEP.elections],
        "sweep_disjoint": [[b] for b in SWEEP.masks],
        "sweep_control": [[b] for b in SWEEP.controls],
        "sweep_merge": [[p] for p in SWEEP.points],
        "sweep_evaluation": [[p] for p in SWEEP.points],
        "sweeps_report": [[]] if SWEEP_POINTS else [],
    }
    return [benchmark_file(rule, *w) for rule, values in jobs.items() for w in values]


def requested_resources():
    """`ledmerge report --requested`: what each rule's jobs ask for, read from the rules themselves (their `threads:`
    and rule_resources: the config's `resources` section; runtime in minutes, as Snakemake parses it), as JSON
    {rule: {threads, mem_mb, runtime}}; a key is absent where the rule sets none (Snakemake's defaults apply)."""
    asked = {}
    for r in workflow.rules:  # (not `rule`: `snakemake --lint` would take the loop for a rule)
        values = {key: r.resources[name].value for key, name in (("threads", "_cores"), ("mem_mb", "mem_mb"),
                                                                  ("runtime", "runtime")) if name in r.resources}
        asked[r.name] = {k: v for k, v in values.items() if isinstance(v, int)}
    return as_json(asked)
