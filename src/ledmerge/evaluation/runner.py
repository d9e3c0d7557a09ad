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
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

from ..checkpoint import is_adapter
from ..errors import LedmergeError
from ..fileio import read_jsonl, write_json, write_jsonl
from ..options import default_of, resolve
from .judges import JUDGES, get_judge

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "eval_tasks"

# set -> (lm-eval task, fields every row needs, metric reported by lm-eval, what a True label means)
SETS = {
    "harmful": ("ledmerge_harmful", ("prompt",), "refusal_rate", "harmful"),
    "benign": ("ledmerge_benign", ("prompt",), "refusal_rate", "refused"),
    "math": ("ledmerge_math", ("prompt", "answer"), "exact_match", "correct"),
    "code": ("ledmerge_code", ("prompt", "tests", "entry_point"), "pass_rate", "passed"),
}
METRIC_NAMES = {"harmful": "harmful_rate", "benign": "over_refusal_rate", "math": "math_accuracy",
                "code": "code_pass_rate"}
DOC_FIELDS = ("category", "answer", "entry_point")  # copied into the generations file


def write_task_configs(data: dict[str, Path], task_dir: Path) -> dict[str, str]:
    """One wrapper YAML per set in `task_dir`; returns {set: lm-eval task name}."""
    names = {}
    for key, path in data.items():
        task = SETS[key][0]
        wrapper = {"include": str(TEMPLATE_DIR / f"{task}.yaml"),
                   "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}}}
        (task_dir / f"{task}.yaml").write_text(yaml.safe_dump(wrapper))
        names[key] = task
    return names


def _check_data(data: dict[str, Path]) -> None:
    """Fail early, with the file named, on a missing, empty or malformed set (read_jsonl raises)."""
    for key, path in data.items():
        read_jsonl(path, required=SETS[key][1])


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


def generation_kwargs(max_new_tokens: int, until: list[str], eos_ids: list[int], backend: str = "hf") -> dict:
    """What the runner sets in every ledmerge task's `generation_kwargs` (the YAMLs' other keys stay)."""
    out = {"max_gen_toks": max_new_tokens, "until": list(until)}
    if backend == "hf" and eos_ids:
        out["eos_token_id"] = list(eos_ids)  # transformers' generate stops (and pads) each row on these ids
    return out


def _run_lm_eval(model_dir, data: dict[str, Path], extra: tuple[str, ...], *, batch_size, max_new_tokens,
                 limit, device, seed, backend, model_args=None, dtype="auto", tokenizer=None, base=None,
                 until=(), eos_ids=()) -> dict:
    """The single `simple_evaluate` call: model loaded once, every set and extra task in one pass."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="ledmerge-tasks-") as task_dir:
        names = write_task_configs(data, Path(task_dir))
        # Extra tasks given as YAML paths load without lm-eval's built-in index; names need it.
        manager = TaskManager(include_path=task_dir, include_defaults=any(not Path(t).is_file() for t in extra))
        tasks = manager.load(list(names.values()))["tasks"]
        missing = set(names.values()) - set(tasks)
        if missing:
            raise LedmergeError(f"lm-eval did not load task(s) {sorted(missing)} from {TEMPLATE_DIR}")
        gen_kwargs = generation_kwargs(max_new_tokens, list(until), list(eos_ids), backend)
        for task in tasks.values():
            task.set_config("generation_kwargs", gen_kwargs, update=True)
        args = lm_eval_model_args(model_dir, backend, device, model_args, dtype=dtype, tokenizer=tokenizer, base=base)
        return simple_evaluate(
            model=backend, model_args=args, tasks=[*tasks.values(), *extra], task_manager=manager,
            batch_size=batch_size, device=device, limit=limit, log_samples=True, apply_chat_template=True,
            bootstrap_iters=0,  # no stderr bootstrap: it costs seconds per task and we report means
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            confirm_run_unsafe_code=True,  # ours runs in the sandbox; extra code tasks were asked for by name
        )


def evaluate_model(model_dir, out_json, generations_jsonl, *, harmful_path, benign_path, math_path=None,
                   code_path=None, seed: int | None = None, num_threads: int | None = None, tokenizer=None,
                   base_dir=None, **opts) -> dict:
    """Evaluate `model_dir` on the safety and utility sets; write metrics JSON and generations JSONL.

    Metrics: harmful_rate (harmful prompts whose reply the judge calls harmful), over_refusal_rate
    (benign prompts refused), math_accuracy, code_pass_rate, and `task/metric` for each extra task
    (an lm-eval task or group name, or the path of a task YAML).
    `backend` is lm-eval's model type (`hf`, or `vllm` on a GPU), with `model_args` added to its arguments.
    `dtype` (auto, float32, bfloat16, float16): the weights' dtype; auto is float32 on the CPU and the
    checkpoint's own dtype elsewhere. `tokenizer`: the directory whose tokenizer, chat template and EOS ids
    every model of a run is evaluated with (default None: the model's own); see the module docstring.
    `base_dir`: the base model, when `model_dir` is a PEFT LoRA adapter on it (lm-eval loads the base, then the
    adapter).
    `num_threads` sets torch's CPU threads for the run: use 1 for tiny models, where intra-op
    threading only adds synchronisation (10x slower and worse when cores are shared).
    `opts`: the config's `evaluation` section (batch_size, max_new_tokens, limit, device, dtype, backend,
    model_args, judge, judge_kwargs, lm_eval_tasks), resolved through the schema (`options.resolve`): what is
    not given takes the schema's default; `judge` may also be a Judge object. `seed`: the config's top-level seed.
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
    data = {k: Path(p) for k, p in
            {"harmful": harmful_path, "benign": benign_path, "math": math_path, "code": code_path}.items() if p}
    _check_data(data)
    extra = tuple(o["lm_eval_tasks"])
    names = {k: SETS[k][0] for k in data}

    with _torch_threads(num_threads):
        results = _run_lm_eval(model_dir, data, extra, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               limit=limit, device=device, seed=seed, backend=backend, model_args=model_args,
                               dtype=dtype, tokenizer=tokenizer, base=base, until=until, eos_ids=eos_ids)
    judge_obj = get_judge(judge, **(judge_kwargs or {}))

    metrics, n, rows = {}, {}, []
    for key, task in names.items():
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        prompts = [s["doc"]["prompt"] for s in samples]
        responses = [s["filtered_resps"][0] for s in samples]
        _, _, lm_metric, label_name = SETS[key]
        if key == "harmful":
            judged = judge_obj.judge_harmful(prompts, responses)
        elif key == "benign":
            judged = judge_obj.judge_refusal(prompts, responses)
        else:
            judged = [(bool(s[lm_metric]), float(s[lm_metric])) for s in samples]
        metrics[METRIC_NAMES[key]] = sum(label for label, _ in judged) / len(judged)
        n[key] = len(samples)
        for s, prompt, response, (label, score) in zip(samples, prompts, responses, judged, strict=True):
            rows.append({"task": key, "doc_id": s["doc_id"], "prompt": prompt, "response": response,
                         "label": bool(label), "label_name": label_name, "score": score,
                         **{f: s["doc"][f] for f in DOC_FIELDS if f in s["doc"]}})
    metrics.update(_extra_metrics(results["results"], skip=set(names.values())))
    for task, samples in results["samples"].items():
        if task in names.values():
            continue
        n[task] = len(samples)
        for s in samples:
            response = s["filtered_resps"][0]
            rows.append({"task": task, "doc_id": s["doc_id"], "prompt": s["arguments"][0][0],
                         "response": response if isinstance(response, str) else None,
                         "metrics": {m: s[m] for m in s["metrics"] if isinstance(s[m], (int, float, str))}})

    report = {"model_dir": str(model_dir), "metrics": metrics, "n": n, "lm_eval_version": version("lm_eval"),
              "judge": judge if isinstance(judge, str) else judge_obj.name, "judge_kwargs": judge_kwargs or {},
              "seed": seed, "limit": limit, "dtype": resolved_dtype, "tokenizer": str(tokenizer_dir), "until": until,
              "max_new_tokens": max_new_tokens, "seconds": round(time.time() - start, 2)}
    write_jsonl(generations_jsonl, rows)
    write_json(out_json, report)
    return report
