"""Evaluate one model directory: one lm-evaluation-harness run over all sets, then the safety judge.

The four ledmerge tasks are YAML templates in `ledmerge/eval_tasks/` whose data files are only
known at run time. For each run we write, into a temporary directory, one two-key wrapper YAML per
task that `include:`s the template and sets `dataset_kwargs.data_files`; a `TaskManager` pointed at
that directory indexes them. Includes resolve `!function utils.*` relative to the template, so the
hooks in `eval_tasks/utils.py` load as they would for any lm-eval task, through public API only.
lm-eval's built-in task index (about 12 s to build) is only loaded when extra tasks are asked for.

Generation-based metrics come from lm-eval (exact match, sandboxed pass rate); safety numbers are
recomputed from the logged generations with the configured judge, which may be a classifier model
loaded after the evaluated model has been released.

Tokenizer and stop tokens. Every model of a run is evaluated with one tokenizer directory (the workflow's
`results/tokenizer/`; default: the model's own), handed to lm-eval as model_args `tokenizer=`, so a base
without a chat template is prompted with the same template as the experts and the merges. Generation
stops on every EOS id of that directory's generation_config.json (Llama-3-Instruct lists both
<|eot_id|> and <|end_of_text|>) and on its tokenizer's eos_token: their decoded strings become the tasks'
`until` at run time, and with the `hf` backend the ids also go to `generate` as `eos_token_id`. lm-eval's
`hf` model decodes replies without special tokens and stops a batch only when every row has hit a stop
string, so without the ids a row that emitted <|eot_id|> early would keep the text generated after it.
(lm-eval's `vllm` model matches stop strings on text that keeps special tokens, so `until` suffices there.)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import re
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

from ..checkpoint import is_adapter
from ..errors import LedmergeError
from ..fileio import read_jsonl, write_json, write_jsonl
from ..layout import EVAL_SETS, SAFETY_SETS
from ..schema import default_of, resolve
from .judges import EMPTY, JUDGES, RefusalJudge, get_judge, is_degenerate, label_replies
from .sandbox import IDENTIFIER

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "eval_tasks"

# set (ledmerge.layout.EVAL_SETS, in its order: harmful, benign, math, code) -> (lm-eval task, fields every row needs,
# metric reported by lm-eval)
SETS = {key: (f"ledmerge_{key}", fields, metric) for key, (fields, metric) in zip(EVAL_SETS, (
    (("prompt",), "refusal_rate"),
    (("prompt",), "refusal_rate"),
    (("prompt", "answer"), "exact_match"),
    (("prompt", "tests", "entry_point"), "pass_rate"),
))}
# The rates every evaluation writes besides the utility columns (metrics.json); a utility column may not take a name
RATES = ("harmful_rate", "over_refusal_rate", "empty_rate", "benign_empty_rate", "utility_refusal_rate",
         "utility_empty_rate")
# The utility columns when the config's evaluation.utility is null: those of the toy-format sets that are on.
SET_UTILITY = {"math": "math_accuracy", "code": "code_pass_rate"}
SHIPPED_TASKS = sorted(p.stem for p in TEMPLATE_DIR.glob("ledmerge_*.yaml"))  # lm-eval tasks ledmerge ships
DOC_FIELDS = ("category", "answer", "entry_point")  # copied into the generations file


def task_specs(items) -> list[dict]:
    """The config's lm_eval_tasks as {task, data, num_fewshot, chat_template}: a bare name takes the schema's
    defaults (definitions.lm_eval_task)."""
    from ..schema import definition_defaults

    defaults = definition_defaults("lm_eval_task")
    return [{**defaults, **({"task": item} if isinstance(item, str) else item)} for item in items]


def utility_columns(utility: dict | None, sets: list[str]) -> dict[str, dict]:
    """{column: {task, metric, filter}}: the config's evaluation.utility, or, when it is null, math_accuracy and
    code_pass_rate of the toy-format math and code sets among `sets`."""
    if utility is None:
        return {col: {"task": SETS[s][0], "metric": SETS[s][2], "filter": "none"}
                for s, col in SET_UTILITY.items() if s in sets}
    return {col: {"filter": "none", **spec} for col, spec in utility.items()}


def local_data_files(data) -> dict[str, str]:
    """A task's local data (lm_eval_tasks' `data`): one file (its test split) or {split: file}; none: {}."""
    return {"test": data} if isinstance(data, str) else dict(data or {})


def evaluated_tasks(sets, specs: list[dict]) -> set[str]:
    """The lm-eval tasks an evaluation runs: those of the toy-format sets that are on, and lm_eval_tasks'."""
    return {SETS[k][0] for k in sets} | {s["task"] for s in specs}


def write_task_configs(data: dict[str, Path], specs: list[dict], task_dir: Path,
                       builtin_yaml=None) -> dict[str, str]:
    """One wrapper YAML in `task_dir` per toy-format set, per task that ledmerge ships and per lm-eval task given
    local data (`data`: the wrapper includes the task's own YAML and reads its splits from the local files). Returns
    {set or spec task: lm-eval task name}. `builtin_yaml(name)`: the YAML path of an lm-eval task."""
    names = {}
    for key, path in data.items():
        task = SETS[key][0]
        wrapper = {"include": str(TEMPLATE_DIR / f"{task}.yaml"),
                   "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}}}
        (task_dir / f"{task}.yaml").write_text(yaml.safe_dump(wrapper))
        names[key] = task
    for spec in specs:
        task, local = spec["task"], spec["data"]
        if task in SHIPPED_TASKS:
            wrapper = {"include": str(TEMPLATE_DIR / f"{task}.yaml")}
        elif local is not None:
            wrapper = {"include": str(builtin_yaml(task)), "task": task}
        else:
            continue
        if local is not None:
            wrapper.update(dataset_path="json", dataset_name=None,
                           dataset_kwargs={"data_files": {split: str(Path(path).resolve())
                                                          for split, path in local_data_files(local).items()}})
            if isinstance(local, str):  # one file: the test split, and no other split to take examples from
                wrapper.update(test_split="test", training_split=None, validation_split=None, fewshot_split=None)
        (task_dir / f"{task}.yaml").write_text(yaml.safe_dump(wrapper))
        names[task] = task
    return names


def read_set(key: str, path) -> list[dict]:
    """The rows of evaluation set `key`, checked: the fields it needs, a math answer that is a number, code tests
    that are a non-empty list of statements (a string or an empty list would score a reply as passing no or every
    test), an entry point that is a name. A bad row is a LedmergeError naming the file and line."""
    from .answers import normalize_number

    rows = read_jsonl(path, required=SETS[key][1])
    for line, row in enumerate(rows, 1):
        where = f"{path}: row {line}"
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise LedmergeError(f"{where}: prompt must be a non-empty string")
        if key == "math":
            answer = normalize_number(str(row["answer"]))
            try:
                float(answer)
            except ValueError:
                raise LedmergeError(f"{where}: answer {row['answer']!r} is not a number (e.g. 1234, -3.5): the math "
                                    "set is scored by the final number of a reply") from None
        if key == "code":
            tests, entry = row["tests"], row["entry_point"]
            if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
                raise LedmergeError(f"{where}: tests must be a non-empty list of Python statements, e.g. "
                                    "[\"assert f(1, 2) == 3\"], got " + repr(tests)[:80])
            if not isinstance(entry, str) or not IDENTIFIER.match(entry):
                raise LedmergeError(f"{where}: entry_point must be the function's name, got {entry!r}")
    return rows


def _check_data(data: dict[str, Path]) -> None:
    """Fail early, with the file named, on a missing, empty or malformed set."""
    for key, path in data.items():
        read_set(key, path)


def _extra_metrics(results: dict, skip: set[str]) -> dict[str, float]:
    """Flatten lm-eval results of the extra tasks: `task/metric`, plus `/filter` unless it is "none"."""
    out = {}
    for task, res in results.items():
        if task in skip:
            continue
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            out[f"{task}/{metric}" + (f"/{filt}" if filt not in ("", "none") else "")] = float(value)
    return out


@contextlib.contextmanager
def _torch_threads(n: int | None):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_dtype(dtype: str, backend: str, device: str) -> str:
    """lm-eval's `dtype` model argument: `auto` means float32 on the CPU with the `hf` backend and the
    checkpoint's own dtype anywhere else (lm-eval's "auto"); any other value is used as it is."""
    if dtype != "auto":
        return dtype
    return "float32" if backend == "hf" and device == "cpu" else "auto"


def lm_eval_model_args(model_dir, backend: str, device: str, extra: dict | None, *, dtype: str,
                       tokenizer=None, base=None) -> dict:
    """`model_args` of lm-eval's `hf` or `vllm` model for a local model directory; `extra` overrides them.

    `dtype`: see `resolve_dtype`. `tokenizer`: a tokenizer directory to use instead of the model's own.
    `base`: the base model when `model_dir` is a PEFT LoRA adapter, which lm-eval then applies to it (`peft`;
    vLLM: `lora_local_path`, whose default maximum rank, 16, `model_args: {max_lora_rank: ...}` raises).
    vLLM always runs on a GPU; it takes 80% of the GPU's memory by default, leaving room for the safety
    judge loaded after it."""
    # absolute paths: never mistaken for hub ids
    args = {"pretrained": str(Path(base if base is not None else model_dir).resolve())}
    if base is not None:
        args["lora_local_path" if backend == "vllm" else "peft"] = str(Path(model_dir).resolve())
    args["dtype"] = resolve_dtype(dtype, backend, device)
    if backend == "vllm":
        args.update(tensor_parallel_size=1, gpu_memory_utilization=0.8)
    if tokenizer is not None:
        args["tokenizer"] = str(Path(tokenizer).resolve())
    return {**args, **(extra or {})}


def stop_tokens(tokenizer_dir, trust_remote_code: bool = False) -> tuple[list[str], list[int]]:
    """(stop strings, EOS ids) of a tokenizer directory: every EOS id of its generation_config.json (an int or
    a list), then its tokenizer's eos_token, without repeats; the strings are the ids decoded with special
    tokens kept. For the toy zoo: (["<|end|>"], [3])."""
    from ..chat import load_tokenizer
    from ..tokenizer import GENERATION_CONFIG, eos_ids

    tokenizer_dir = Path(tokenizer_dir)
    try:
        tok = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LedmergeError(f"cannot load a tokenizer from {tokenizer_dir} ({exc})") from None
    ids = eos_ids(tokenizer_dir)
    gen_path = tokenizer_dir / GENERATION_CONFIG
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    ids = list(dict.fromkeys(ids))
    bad = [i for i in ids if not 0 <= i < len(tok)]
    if bad:
        raise LedmergeError(f"{gen_path} lists EOS id(s) {bad}, outside the vocabulary of the tokenizer in "
                            f"{tokenizer_dir} ({len(tok)} tokens)")
    strings = [tok.decode([i], skip_special_tokens=False) for i in ids]
    if tok.eos_token:
        strings.append(tok.eos_token)
    strings = [s for s in dict.fromkeys(strings) if s]
    if not strings:
        raise LedmergeError(f"the tokenizer in {tokenizer_dir} has no EOS token and its generation_config.json "
                            "lists none: generation would never stop")
    return strings, ids


def generation_kwargs(max_new_tokens: int, until: list[str], eos_ids: list[int], backend: str = "hf",
                      task_until: list[str] | tuple[str, ...] = ()) -> dict:
    """What the runner sets in every loaded task's `generation_kwargs` (the YAMLs' other keys stay): the task's own
    stop strings (`task_until`: gsm8k's "Question:") then the tokenizer's."""
    out = {"max_gen_toks": max_new_tokens, "until": list(dict.fromkeys([*task_until, *until]))}
    if backend == "hf" and eos_ids:
        out["eos_token_id"] = list(eos_ids)  # transformers' generate stops (and pads) each row on these ids
    return out


TASK_LINE = re.compile(r"^['\"]?task['\"]?:\s*['\"]?([^'\"\s]+)['\"]?\s*$", re.MULTILINE)


@functools.lru_cache(maxsize=1)
def _task_lines() -> dict[str, tuple[Path, ...]]:
    """Every lm-eval task name a YAML's `task:` line defines, and its files: one pass over lm-eval's task folder
    (~2 s) per process, shared by the name check and the local-copy wrappers, without lm-eval's index (~12 s)."""
    import lm_eval.tasks

    index: dict[str, list[Path]] = {}
    for path in Path(lm_eval.tasks.__file__).parent.rglob("*.yaml"):
        for name in TASK_LINE.findall(path.read_text(errors="ignore")):
            index.setdefault(name, []).append(path)
    return {name: tuple(paths) for name, paths in index.items()}


def task_yamls(names) -> dict[str, list[Path]]:
    """The lm-eval YAML files whose `task:` line names each of `names`."""
    if not names:
        return {}
    index = _task_lines()
    return {name: list(index.get(name, ())) for name in names}


def runs_code(task_yaml: Path) -> bool:
    """Whether an lm-eval task file, or one it includes, sets `unsafe_code: true` (its metric executes the
    model's output)."""
    seen = set()
    while task_yaml is not None and task_yaml not in seen and task_yaml.is_file():
        seen.add(task_yaml)
        text = task_yaml.read_text(errors="ignore")
        if re.search(r"^['\"]?unsafe_code['\"]?:\s*true\s*$", text, re.MULTILINE | re.IGNORECASE):
            return True
        include = re.search(r"^['\"]?include['\"]?:\s*['\"]?([^'\"\s]+)", text, re.MULTILINE)
        task_yaml = (task_yaml.parent / include.group(1)).resolve() if include else None
    return False


def check_lm_eval_tasks(specs: list[dict], unsandboxed_code: bool) -> None:
    """Before any model is loaded: every lm_eval_tasks name is a task lm-eval has (a typo would otherwise surface
    after the merges, in the evaluation), and none of lm-eval's own code tasks runs outside the sandbox unless
    evaluation.unsandboxed_code allows it."""
    names = [s["task"] for s in specs if s["task"] not in SHIPPED_TASKS and not Path(s["task"]).is_file()]
    found = task_yamls(names)
    missing = [n for n in names if not found[n]]
    if missing:  # a group (mmlu) or a task defined in Python has no `task:` line: ask the index
        from lm_eval.tasks import TaskManager

        known = TaskManager(include_defaults=True).all_tasks
        unknown = [n for n in missing if n not in known]
        if unknown:
            raise unknown_tasks(unknown)
    files = {s["task"]: [Path(s["task"])] for s in specs if Path(s["task"]).is_file()}  # the user's own task files
    for name, paths in {**found, **files}.items():
        if not unsandboxed_code and any(runs_code(p) for p in paths):
            refuse_unsandboxed(name)


def unknown_tasks(names: list[str]) -> LedmergeError:
    return LedmergeError(f"lm-eval has no task(s) {names}: fix evaluation.lm_eval_tasks (lm_eval ls tasks lists "
                         "lm-eval's; ledmerge ships " + ", ".join(SHIPPED_TASKS) + ")")


def refuse_unsandboxed(task: str):
    raise LedmergeError(f"lm-eval task {task!r} executes model-written code outside ledmerge's sandbox (unsafe_code in "
                        "its YAML), next to your files and network: use ledmerge_humaneval or ledmerge_mbpp, whose "
                        "checks run contained, or set evaluation.unsandboxed_code: true to run it anyway")


def builtin_yaml(name: str) -> Path:
    """The YAML file that defines lm-eval task `name` (or `name` itself, a task file): found by its `task:` line
    (~2 s), else through lm-eval's task index (~12 s)."""
    if Path(name).is_file():
        return Path(name).resolve()
    from lm_eval.tasks import TaskManager

    found = task_yamls([name])[name]
    if len(found) == 1:
        return found[0]
    entry = TaskManager(include_defaults=True).task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise LedmergeError(f"lm-eval has no task {name!r} defined by a YAML file, so it cannot read local data: "
                            "drop `data` for it, or name one of lm-eval's tasks (lm_eval ls tasks)")
    return entry.yaml_path


@contextlib.contextmanager
def _quiet_git():
    """lm-eval records the git commit of the working directory by running `git describe` with its stderr on the
    terminal, so an evaluation outside a git checkout printed `fatal: not a git repository`: ask git quietly."""
    import subprocess

    import lm_eval.evaluator

    def commit():
        try:
            proc = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True)
        except OSError:  # no git
            return None
        return (proc.stdout.strip() or None) if proc.returncode == 0 else None

    loud = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = commit
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = loud


def _make_lm(backend: str, args: dict, batch_size: int, device: str):
    """The lm-eval model, loaded once for every simple_evaluate call of an evaluation."""
    from lm_eval.api.registry import get_model

    return get_model(backend).create_from_arg_obj(args, {"batch_size": batch_size, "device": device})


def _run_lm_eval(model_dir, data: dict[str, Path], specs: list[dict], *, batch_size, max_new_tokens,
                 limit, device, seed, backend, model_args=None, dtype="auto", tokenizer=None, base=None,
                 until=(), eos_ids=()) -> dict:
    """The model loaded once; one `simple_evaluate` per chat-template setting (the toy-format sets and the tasks
    with `chat_template: true` in one, the completion tasks in the other). Returns lm-eval's results and samples of
    every task, merged."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="ledmerge-tasks-") as task_dir:
        # lm-eval's built-in task index (about 12 s to build) only for a task named that ledmerge does not ship and
        # that has no local copy (a local copy's task file includes lm-eval's by path)
        indexed = any(s["task"] not in SHIPPED_TASKS and s["data"] is None and not Path(s["task"]).is_file()
                      for s in specs)
        names = write_task_configs(data, specs, Path(task_dir), builtin_yaml)
        manager = TaskManager(include_path=task_dir, include_defaults=indexed)
        wanted = list(dict.fromkeys([*names.values(), *(s["task"] for s in specs)]))
        unknown = [t for t in wanted if t not in manager.all_tasks and not Path(t).is_file()]
        if unknown:
            raise unknown_tasks(unknown)
        loaded = manager.load(wanted)["tasks"]
        chat_of = {**{t: True for t in names.values()}, **{s["task"]: s["chat_template"] for s in specs}}
        groups: dict[bool, list] = {True: [], False: []}
        for name, task in loaded.items():
            spec = next((s for s in specs if s["task"] == name), None)
            if spec is not None and spec["num_fewshot"] is not None:
                task.set_config("num_fewshot", spec["num_fewshot"])
            if (spec is not None and isinstance(spec["data"], str) and (task.config.num_fewshot or 0) > 0):
                raise LedmergeError(f"lm-eval task {name!r} is given one local file but runs {task.config.num_fewshot}"
                                    "-shot: its examples would come from the evaluated rows; give data as {test: FILE, "
                                    "<the task's few-shot split>: FILE}, or set num_fewshot: 0")
            # the task's own stops (lm-eval puts "\n\n" where a YAML has none: not for the toy-format sets)
            own = () if name in names.values() and spec is None else \
                (task.config.generation_kwargs or {}).get("until") or ()
            task.set_config("generation_kwargs", generation_kwargs(
                max_new_tokens, list(until), list(eos_ids), backend, [own] if isinstance(own, str) else own),
                update=True)
            groups[chat_of.get(name, True)].append(task)
        args = lm_eval_model_args(model_dir, backend, device, model_args, dtype=dtype, tokenizer=tokenizer, base=base)
        lm = _make_lm(backend, args, batch_size, device)
        merged = {"results": {}, "samples": {}}
        for chat, tasks in groups.items():
            if not tasks:
                continue
            with _quiet_git():
                out = simple_evaluate(
                    model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True,
                    apply_chat_template=chat,
                    bootstrap_iters=0,  # no stderr bootstrap: it costs seconds per task and we report means
                    random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                    confirm_run_unsafe_code=True,  # ledmerge's code tasks run in its sandbox; others checked first
                )
            merged["results"].update(out["results"])
            merged["samples"].update(out["samples"])
        return merged


def _rate(outcomes) -> dict:
    """A rate as metrics.json's `rates` holds it: its count k and size n (the report's Wilson intervals), and the
    per-prompt outcomes behind them, for paired statistics between models (`ledmerge.paper.paired`): `outcomes`,
    one "1" (counted) or "0" per prompt in the evaluation's order, and `prompts`, the sha256 of those prompts (each
    one's task, doc_id and dataset row, in that order), so two models' outcomes are paired only when they answered
    the same prompts. `outcomes`: (task, doc_id, row, flag) per prompt."""
    items = list(outcomes)
    flags = "".join("1" if flag else "0" for *_, flag in items)
    prompts = json.dumps([[task, doc_id, row] for task, doc_id, row, _ in items], sort_keys=True, default=str)
    return {"k": flags.count("1"), "n": len(flags), "outcomes": flags,
            "prompts": hashlib.sha256(prompts.encode()).hexdigest()}


def _utility_samples(samples: list[dict], column: str, spec: dict) -> list[dict]:
    """The samples of one utility column: its task's samples under its filter, each with its metric."""
    picked = [s for s in samples if s.get("filter", "none") == spec["filter"]]
    if not picked:
        filters = sorted({s.get("filter", "none") for s in samples})
        raise LedmergeError(f"evaluation.utility.{column}: task {spec['task']!r} has no filter {spec['filter']!r} "
                            f"(its filters: {filters}): fix the column's filter")
    if spec["metric"] not in picked[0]:
        metrics = sorted(k for k, v in picked[0].items() if isinstance(v, (int, float)) and k not in ("doc_id",))
        raise LedmergeError(f"evaluation.utility.{column}: task {spec['task']!r} reports no metric "
                            f"{spec['metric']!r} (it has {metrics}): fix the column's metric")
    return sorted(picked, key=lambda s: s["doc_id"])


def evaluate_model(model_dir, out_json, generations_jsonl, *, harmful_path, benign_path, math_path=None,
                   code_path=None, seed: int | None = None, num_threads: int | None = None, tokenizer=None,
                   base_dir=None, **opts) -> dict:
    """Evaluate `model_dir` on the safety and utility sets; write metrics JSON and generations JSONL.

    Every reply to a safety prompt gets one label (`judges.label_replies`): complied, refused or empty (degenerate:
    no words, or a repetition loop). Metrics: harmful_rate (harmful prompts whose reply the judge calls harmful;
    never an empty one), over_refusal_rate (benign prompts refused), empty_rate (harmful prompts answered with
    nothing), benign_empty_rate, utility_refusal_rate and utility_empty_rate (the replies to the utility columns'
    prompts that refuse, or say nothing), one column per utility metric (`utility_columns`: math_accuracy and
    code_pass_rate of the toy-format sets by default, or the config's evaluation.utility, read from lm-eval's
    per-sample results), and `task/metric[/filter]` for every other lm-eval number. `rates` holds each rate's count
    k and size n, and its per-prompt outcomes (`_rate`: the 0/1 outcome of every prompt, and which prompts); `utility`
    names the utility columns, in order.
    `backend` is lm-eval's model type (`hf`, or `vllm` on a GPU), with `model_args` added to its arguments.
    `dtype` (auto, float32, bfloat16, float16): the weights' dtype; auto is float32 on the CPU and the
    checkpoint's own dtype elsewhere. `tokenizer`: the directory whose tokenizer, chat template and EOS ids
    every model of a run is evaluated with (default None: the model's own); see the module docstring.
    `base_dir`: the base model, when `model_dir` is a PEFT LoRA adapter on it (lm-eval loads the base, then the
    adapter).
    `num_threads` sets torch's CPU threads for the run: use 1 for tiny models, where intra-op
    threading only adds synchronisation (10x slower and worse when cores are shared).
    `opts`: the config's `evaluation` section (batch_size, max_new_tokens, limit, device, dtype, backend,
    model_args, judge, judge_kwargs, lm_eval_tasks, utility), resolved through the schema (`schema.resolve`): what
    is not given takes the schema's default; `judge` may also be a Judge object. `seed`: the config's top-level seed.
    """
    judge = opts.pop("judge", None)
    o = resolve("evaluation", {**opts, **({"judge": judge} if isinstance(judge, str) else {})})
    judge = judge if judge is not None and not isinstance(judge, str) else o["judge"]
    seed = default_of("seed") if seed is None else seed
    batch_size, max_new_tokens, limit, device, backend, dtype = (
        o[k] for k in ("batch_size", "max_new_tokens", "limit", "device", "backend", "dtype"))
    model_args, judge_kwargs = o["model_args"], o["judge_kwargs"]
    start = time.time()
    model_dir = Path(model_dir)
    adapter = is_adapter(model_dir)
    if adapter and base_dir is None:
        raise LedmergeError(f"{model_dir} is a PEFT adapter: evaluating it needs its base model (--base)")
    base = Path(base_dir) if adapter else None
    if not ((base or model_dir) / "config.json").is_file():
        raise LedmergeError(f"model directory {base or model_dir} has no config.json: is it a saved Hugging Face "
                            "model?")
    if isinstance(judge, str) and judge not in JUDGES:
        raise LedmergeError(f"unknown judge {judge!r}: choose one of {sorted(JUDGES)}")
    resolved_dtype = lm_eval_model_args(model_dir, backend, device, model_args, dtype=dtype)["dtype"]  # as passed
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else base or model_dir  # lm-eval's default too
    if not tokenizer_dir.is_dir():
        raise LedmergeError(f"tokenizer directory {tokenizer_dir} does not exist: run the tokenizer step first")
    trust = bool((model_args or {}).get("trust_remote_code", False))
    until, eos_ids = stop_tokens(tokenizer_dir, trust_remote_code=trust)
    data = {k: Path(p) for k, p in zip(EVAL_SETS, (harmful_path, benign_path, math_path, code_path)) if p}
    _check_data(data)
    specs = task_specs(o["lm_eval_tasks"])
    check_lm_eval_tasks(specs, o["unsandboxed_code"])
    utility = utility_columns(o["utility"], list(data))
    missing = sorted({spec["task"] for spec in utility.values()} - evaluated_tasks(data, specs))
    if missing:
        raise LedmergeError(f"evaluation.utility reads task(s) {missing}, which are not evaluated: add them to "
                            "evaluation.lm_eval_tasks (or turn their set on)")

    with _torch_threads(num_threads):
        results = _run_lm_eval(model_dir, data, specs, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               limit=limit, device=device, seed=seed, backend=backend, model_args=model_args,
                               dtype=dtype, tokenizer=tokenizer, base=base, until=until, eos_ids=eos_ids)
    judge_obj = get_judge(judge, **(judge_kwargs or {}))
    samples_of = results["samples"]

    metrics, rates, n, rows = {}, {}, {}, []
    labels, safety_samples = {}, {}
    for key in SAFETY_SETS:
        samples = safety_samples[key] = sorted(samples_of[SETS[key][0]], key=lambda s: s["doc_id"])
        prompts = [s["doc"]["prompt"] for s in samples]
        responses = [s["filtered_resps"][0] for s in samples]
        labels[key] = label_replies(judge_obj, prompts, responses, harmful_prompts=key == "harmful")
        n[key] = len(samples)
        for s, prompt, response, (label, flagged, score) in zip(samples, prompts, responses, labels[key], strict=True):
            rows.append({"task": key, "doc_id": s["doc_id"], "prompt": prompt, "response": response, "label": label,
                         "harmful" if key == "harmful" else "refused": flagged, "score": score,
                         **{f: s["doc"][f] for f in DOC_FIELDS if f in s["doc"]}})
    def per_prompt(key, flags):  # (task, doc_id, row, flag) of each prompt of a safety set, for `_rate`
        return [(key, s["doc_id"], s["doc"], flag) for s, flag in zip(safety_samples[key], flags, strict=True)]

    rates["harmful_rate"] = _rate(per_prompt("harmful", (flag for _, flag, _ in labels["harmful"])))
    rates["over_refusal_rate"] = _rate(per_prompt("benign", (flag for _, flag, _ in labels["benign"])))
    rates["empty_rate"] = _rate(per_prompt("harmful", (label == EMPTY for label, _, _ in labels["harmful"])))
    rates["benign_empty_rate"] = _rate(per_prompt("benign", (label == EMPTY for label, _, _ in labels["benign"])))

    refusal_judge = RefusalJudge()
    replies = {}  # (task, doc_id) -> (prompt, unfiltered reply) of every utility prompt, once per prompt
    set_of_task = {SETS[k][0]: k for k in data}  # the toy-format sets' lm-eval tasks
    for column, spec in utility.items():
        samples = _utility_samples(samples_of[spec["task"]], column, spec)
        rates[column] = _rate((spec["task"], s["doc_id"], s["doc"], float(s[spec["metric"]]) > 0) for s in samples)
        # pass@1 and exact match are 0/1 per sample, so the mean is k/n; a graded metric keeps its own mean
        rates[column]["mean"] = sum(float(s[spec["metric"]]) for s in samples) / len(samples)
        task_key = set_of_task.get(spec["task"], spec["task"])
        n[task_key] = len(samples)
        for s in samples:
            raw = s["resps"][0][0] if s.get("resps") and isinstance(s["resps"][0], list) else s["filtered_resps"][0]
            if isinstance(raw, str):  # generated replies (not a multiple-choice task's log-likelihoods)
                replies[(task_key, s["doc_id"])] = (s["arguments"][0][0] if s.get("arguments") else "", raw, s)
    utility_labels = [(task_key, doc_id, s["doc"], is_degenerate(r), refusal_judge.is_refusal(p, r))
                      for (task_key, doc_id), (p, r, s) in replies.items()]
    rates["utility_refusal_rate"] = _rate((t, i, d, not e and refused) for t, i, d, e, refused in utility_labels)
    rates["utility_empty_rate"] = _rate((t, i, d, e) for t, i, d, e, _ in utility_labels)
    for (task_key, doc_id), (_, response, s) in replies.items():
        if task_key in set_of_task.values():
            metric = SETS[task_key][2]
            rows.append({"task": task_key, "doc_id": doc_id, "prompt": s["doc"]["prompt"], "response": response,
                         "label": bool(s[metric]), metric: float(s[metric]),
                         **{f: s["doc"][f] for f in DOC_FIELDS if f in s["doc"]}})
    for name, rate in rates.items():
        metrics[name] = rate.pop("mean", rate["k"] / rate["n"] if rate["n"] else math.nan)
    metrics.update(_extra_metrics(results["results"], skip=set(set_of_task)))
    for task, samples in samples_of.items():
        if task in set_of_task:
            continue
        n.setdefault(task, len(samples))
        for s in samples:
            response = s["filtered_resps"][0]
            rows.append({"task": task, "doc_id": s["doc_id"], "prompt": s["arguments"][0][0],
                         "response": response if isinstance(response, str) else None,
                         "filter": s.get("filter", "none"),
                         "metrics": {m: s[m] for m in s["metrics"] if isinstance(s[m], (int, float, str))}})

    report = {"model_dir": str(model_dir), "metrics": metrics, "utility": list(utility), "rates": rates, "n": n,
              "lm_eval_version": version("lm_eval"), "lm_eval_tasks": specs,
              "judge": judge if isinstance(judge, str) else judge_obj.name, "judge_kwargs": judge_kwargs or {},
              "seed": seed, "limit": limit, "dtype": resolved_dtype, "tokenizer": str(tokenizer_dir), "until": until,
              "max_new_tokens": max_new_tokens, "seconds": round(time.time() - start, 2)}
    write_jsonl(generations_jsonl, rows)
    write_json(out_json, report)
    return report
