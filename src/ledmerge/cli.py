"""`ledmerge <step>`: one subcommand per workflow step, so Snakemake rules stay one-line shell calls.

Errors in the user's input are printed as one line (`ledmerge: error: ...`) with exit code 2; every
step writes its outputs atomically, so a failed step leaves nothing a rerun would trust.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import LedmergeError


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """`name=path` arguments to a dict."""
    out = {}
    for v in values or []:
        if "=" not in v:
            raise LedmergeError(f"{what} {v!r} must look like NAME=PATH")
        k, p = v.split("=", 1)
        out[k] = p
    return out


def _json(value: str, flag: str):
    """A JSON command-line argument; malformed JSON is a one-line user error, not a traceback."""
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise LedmergeError(f"{flag} is not valid JSON ({exc}): pass one JSON object") from None


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def cmd_check_config(a):
    from .config import load

    cfg = load(a.config)
    print(f"{a.config}: ok ({len(cfg['tasks'])} tasks, {len(cfg['merges'])} merges)")


def cmd_fetch_model(a):
    from .hub import fetch_model

    print(f"downloaded {a.repo}@{a.revision} to {fetch_model(a.repo, a.out, a.revision)}")


def cmd_fetch_dataset(a):
    from .hub import fetch_dataset

    n = fetch_dataset(_json(a.spec, "--spec"), a.out, _json(a.columns, "--columns"))
    print(f"wrote {n} rows to {a.out}")


def cmd_zoo_data(a):
    from .zoo.build import build_data

    build_data(a.out_dir, a.tokenizer, _json(a.params, "--params"), a.seed)


def cmd_zoo_base(a):
    from .zoo.build import build_base

    _threads(a.threads)
    print(json.dumps(build_base(a.data_dir, a.tokenizer, a.out, _json(a.params, "--params"), a.seed)))


def cmd_zoo_expert(a):
    from .zoo.build import build_expert

    _threads(a.threads)
    print(json.dumps(build_expert(a.base, a.train, a.out, _json(a.params, "--params"), a.seed, a.task)))


def cmd_calibrate(a):
    from .calibration import build_calibration

    n = build_calibration(a.task, _json(a.source, "--source"), a.size, a.seed, a.out, pool_path=a.pool)
    print(f"wrote {n} calibration examples for task '{a.task}' to {a.out}")


def cmd_tokenizer(a):
    from .tokenizer import build_tokenizer_dir

    record = build_tokenizer_dir(a.source, a.base, _pairs(a.expert, "--expert"), a.alignment_task, a.out,
                                 chat_template=a.chat_template, trust_remote_code=a.trust_remote_code)
    print(json.dumps({k: v for k, v in record.items() if k != "sha256"}))


def cmd_score(a):
    import inspect

    from .importance import score_model

    _threads(a.threads)
    options = _json(a.options, "--options")
    if not isinstance(options, dict):
        raise LedmergeError(f"--options must be a JSON object, got {a.options!r}")
    allowed = [k for k in inspect.signature(score_model).parameters
               if k not in ("model_dir", "calibration_path", "out_path", "tokenizer_dir")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise LedmergeError(f"unknown scoring option(s) {unknown}: the options are {allowed}")
    if a.trust_remote_code:
        options["trust_remote_code"] = True
    if a.allow_pickle:
        options["allow_pickle"] = True
    summary = score_model(a.model, a.calibration, a.out, tokenizer_dir=a.tokenizer, **options)
    print(json.dumps(summary))


def cmd_elect(a):
    from .masks import elect_files

    _threads(a.threads)
    print(json.dumps(elect_files(a.expert, a.base, a.rate, a.pattern, a.out)))


def cmd_disjoint(a):
    from .masks import disjoint_files

    _threads(a.threads)
    disjoint_files(_pairs(a.elected, "--elected"), _pairs(a.out, "--out"), a.stats, a.overlap)


def cmd_merge(a):
    from .merge import merge_models

    _threads(a.threads)
    spec = a.spec
    if spec.startswith("@"):  # a spec file, e.g. the recipe a data-aware search wrote
        try:
            spec = open(spec[1:]).read()
        except OSError as exc:
            raise LedmergeError(f"cannot read the merge spec file {spec[1:]} ({exc.strerror}): "
                                "run its search first") from None
    merge_models(a.base, _pairs(a.expert, "--expert"), _json(spec, "--spec"), a.out,
                 masks=_pairs(a.mask, "--mask") or None, device=a.device, shard_size=a.shard_size,
                 vocab_policy=a.vocab_policy, allow_pickle=a.allow_pickle, tokenizer_dir=a.tokenizer)


def cmd_synthesize(a):
    from .synth import HFGenerator, ToyGenerator, synthesize

    _threads(a.threads)
    o = _json(a.options, "--options")
    if o["harm_categories"] is None:  # the toy world's categories for the toy generator, else BeaverTails'
        from .synth import BEAVERTAILS_CATEGORIES
        from .zoo.data import HARMFUL_ACTIONS

        o["harm_categories"] = sorted(HARMFUL_ACTIONS) if o["generator"] == "zoo" else BEAVERTAILS_CATEGORIES
    if o["generator"] == "zoo":
        generator = ToyGenerator(o["seed"], o["malformed_fraction"])
    else:
        generator = HFGenerator(o["generator"], max_new_tokens=o["generator_max_new_tokens"],
                                temperature=o["temperature"], batch_size=o["batch_size"], seed=o["seed"],
                                device=o["device"], trust_remote_code=a.trust_remote_code)
    experts = _pairs(a.expert, "--expert")
    summary = synthesize(generator, a.aligned, a.alignment_task, experts, _pairs(a.calibration, "--calibration"),
                         a.out_dir, categories=o["harm_categories"], alignment_size=o["alignment_size"],
                         task_size=o["task_size"], exemplars=o["exemplars"], heldout_fraction=o["heldout_fraction"],
                         max_new_tokens=o["max_new_tokens"], batch_size=o["batch_size"], seed=o["seed"],
                         device=o["device"], trust_remote_code=a.trust_remote_code)
    print(json.dumps(summary))


def _evaluator(a, o):
    from .data_aware.fitness import load_evaluator, objective_weights

    w_align, w_task = objective_weights(a.objective, o["w_align"], o["w_task"])
    evaluator = load_evaluator(a.base, _pairs(a.expert, "--expert"), a.search, a.heldout,
                               _pairs(a.mask, "--mask") or None, tokenizer=a.tokenizer, w_align=w_align,
                               w_task=w_task, batch_size=o["batch_size"], max_length=o["max_length"],
                               device=o["device"], trust_remote_code=a.trust_remote_code, allow_pickle=a.allow_pickle)
    return evaluator, dict(objective=a.objective, w_align=w_align, w_task=w_task)


def cmd_evolve(a):
    from .data_aware.evolve import run_evolve

    _threads(a.threads)
    o = _json(a.options, "--options")
    evaluator, objective = _evaluator(a, o)
    summary = run_evolve(evaluator, a.method, a.out_dir, **objective, budget=o["budget"], sigma0=o["sigma0"],
                         seed=o["seed"], weight_max=o["weight_max"])
    print(json.dumps(summary["best"]))


def cmd_cocktail(a):
    from .data_aware.cocktail import run_cocktail

    _threads(a.threads)
    o = _json(a.options, "--options")
    evaluator, objective = _evaluator(a, o)
    print(json.dumps(run_cocktail(evaluator, a.out_dir, **objective, temperature=o["temperature"])["weights"]))


def cmd_evaluate(a):
    from .evaluation import evaluate_model

    opts = _json(a.options, "--options")
    result = evaluate_model(a.model, a.out, a.generations, num_threads=a.threads, **opts)
    print(json.dumps(result["metrics"]))


def cmd_report(a):
    from .report import build_report

    metrics, kinds = {}, {}
    for v in a.metrics:
        name, kind, path = (v.split("=", 2) + ["", ""])[:3]
        if not path:
            raise LedmergeError(f"--metrics {v!r} must look like NAME=KIND=PATH")
        metrics[name], kinds[name] = path, kind
    df = build_report(metrics, kinds, a.out_dir, mask_stats_csv=a.mask_stats, mask_overlap_csv=a.mask_overlap,
                      histories=_pairs(a.history, "--history") or None)
    print(df.to_string(index=False))


TRUST_HELP = "let transformers run the model repository's own Python code (off by default)"
PICKLE_HELP = "also read pickle (.bin) checkpoints; only for files you trust: unpickling can run code"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ledmerge", description=(
        "Safety-aware model merging (LED-Merging and baselines). Each subcommand is one step of the "
        "Snakemake workflow; run the whole chain with `snakemake --cores all` from the repository root."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--threads", type=int, default=int(os.environ.get("LEDMERGE_THREADS", 1)),
                   help="torch CPU threads (default 1: fastest for small models on shared cores)")
    sub = p.add_subparsers(dest="command", required=True, metavar="STEP")

    def add(name, func, help):
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add("check-config", cmd_check_config, "validate a workflow config file (schema, paths, checkpoints)")
    sp.add_argument("config")

    sp = add("fetch-model", cmd_fetch_model, "download a hub model's safetensors, configs and tokenizer")
    sp.add_argument("--repo", required=True); sp.add_argument("--revision", default="main"); sp.add_argument("--out", required=True)

    sp = add("fetch-dataset", cmd_fetch_dataset, "export a split of a Hugging Face dataset to JSONL")
    sp.add_argument("--spec", required=True, help="JSON {name, config_name, split}")
    sp.add_argument("--columns", required=True, help="JSON {output field: dataset column}"); sp.add_argument("--out", required=True)

    sp = add("zoo-data", cmd_zoo_data, "write the toy world's datasets and tokenizer")
    sp.add_argument("--out-dir", required=True); sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--params", required=True, help="JSON of the config's zoo section"); sp.add_argument("--seed", type=int, default=0)

    sp = add("zoo-base", cmd_zoo_base, "pretrain the toy base model")
    sp.add_argument("--data-dir", required=True); sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--out", required=True); sp.add_argument("--params", required=True); sp.add_argument("--seed", type=int, default=0)

    sp = add("zoo-expert", cmd_zoo_expert, "fine-tune one toy expert from the base")
    sp.add_argument("--task", required=True); sp.add_argument("--base", required=True); sp.add_argument("--train", required=True)
    sp.add_argument("--out", required=True); sp.add_argument("--params", required=True); sp.add_argument("--seed", type=int, default=0)

    sp = add("calibrate", cmd_calibrate, "sample a task's calibration set (prompt/response JSONL)")
    sp.add_argument("--task", required=True); sp.add_argument("--source", required=True, help="JSON calibration spec")
    sp.add_argument("--size", type=int, default=128); sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--pool", help="toy zoo calibration pool (source zoo)"); sp.add_argument("--out", required=True)

    sp = add("tokenizer", cmd_tokenizer, "the run's tokenizer, chat template and stop tokens, from one model")
    sp.add_argument("--source", default="auto", help="auto (the base if it has a chat template, else the aligned "
                    "expert), base, a task name, or a model directory")
    sp.add_argument("--base", required=True); sp.add_argument("--expert", nargs="*", metavar="TASK=DIR")
    sp.add_argument("--alignment-task", default="safety", help="the aligned (instruct) expert's task")
    sp.add_argument("--chat-template", help="a .jinja file replacing the source's chat template")
    sp.add_argument("--out", required=True)
    sp.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)

    sp = add("score", cmd_score, "SNIP importance scores |W| * sum|grad| of one model on one calibration set")
    sp.add_argument("--model", required=True); sp.add_argument("--calibration", required=True); sp.add_argument("--out", required=True)
    sp.add_argument("--options", default="{}", help="JSON of the config's scoring section")
    sp.add_argument("--tokenizer", help="encode with this tokenizer directory (`ledmerge tokenizer`), so base and "
                    "expert see the same token ids; default: the model's own")
    sp.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    sp.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)

    sp = add("elect", cmd_elect, "elected mask TopR(expert) and TopR(base) for one task")
    sp.add_argument("--expert", required=True); sp.add_argument("--base", required=True)
    sp.add_argument("--rate", type=float, required=True); sp.add_argument("--pattern", default="11"); sp.add_argument("--out", required=True)

    sp = add("disjoint", cmd_disjoint, "final masks: drop weights elected by more than one task; mask statistics")
    sp.add_argument("--elected", nargs="+", required=True, metavar="TASK=PATH")
    sp.add_argument("--out", nargs="+", required=True, metavar="TASK=PATH")
    sp.add_argument("--stats", required=True); sp.add_argument("--overlap", required=True)

    sp = add("merge", cmd_merge, "merge experts into the base with one method")
    sp.add_argument("--base", required=True); sp.add_argument("--expert", nargs="+", required=True, metavar="TASK=DIR")
    sp.add_argument("--mask", nargs="*", metavar="TASK=PATH")
    sp.add_argument("--spec", required=True, help="JSON merge spec, or @FILE holding one")
    sp.add_argument("--out", required=True)
    sp.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu (default) or cuda[:i]")
    sp.add_argument("--shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB (default 5GB)")
    sp.add_argument("--vocab-policy", default="error", choices=["error", "base"],
                    help="experts whose vocabulary differs from the base's: error (default), or base (merge "
                         "into the base's vocabulary, dropping extra token rows)")
    sp.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    sp.add_argument("--tokenizer", help="tokenizer directory (`ledmerge tokenizer`) whose tokenizer, chat template "
                    "and generation config the merged model gets; default: the base's")

    sp = add("synthesize", cmd_synthesize, "synthetic alignment and domain data for data-aware merging")
    sp.add_argument("--aligned", required=True, help="the aligned model (answers the harmful questions)")
    sp.add_argument("--alignment-task", required=True)
    sp.add_argument("--expert", nargs="+", required=True, metavar="TASK=DIR", help="domain experts")
    sp.add_argument("--calibration", nargs="+", required=True, metavar="TASK=PATH", help="exemplar questions")
    sp.add_argument("--options", required=True, help="JSON of the config's data_aware.synthetic section")
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)

    for name, func, help in (
            ("evolve", cmd_evolve, "CMA-ES search of a merge method's coefficients on synthetic data"),
            ("cocktail", cmd_cocktail, "LM-Cocktail weights from the experts' losses on synthetic data")):
        sp = add(name, func, help)
        sp.add_argument("--base", required=True); sp.add_argument("--expert", nargs="+", required=True, metavar="TASK=DIR")
        sp.add_argument("--mask", nargs="*", metavar="TASK=PATH", help="LED masks (method led)")
        sp.add_argument("--search", required=True); sp.add_argument("--heldout", required=True)
        sp.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="the run's tokenizer directory (chat template; the workflow's results/tokenizer)")
        sp.add_argument("--objective", choices=["align", "task"], required=True,
                        help="align: alignment and domain data; task: domain data only")
        sp.add_argument("--options", required=True, help="JSON search options (data_aware section)")
        sp.add_argument("--out-dir", required=True)
        sp.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
        sp.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
        if name == "evolve":
            sp.add_argument("--method", required=True)

    sp = add("evaluate", cmd_evaluate, "safety and utility evaluation of one model (lm-evaluation-harness)")
    sp.add_argument("--model", required=True); sp.add_argument("--out", required=True); sp.add_argument("--generations", required=True)
    sp.add_argument("--options", required=True, help="JSON keyword arguments of ledmerge.evaluation.evaluate_model")

    sp = add("report", cmd_report, "summary table and figures")
    sp.add_argument("--metrics", nargs="+", required=True, metavar="NAME=KIND=PATH")
    sp.add_argument("--mask-stats"); sp.add_argument("--mask-overlap"); sp.add_argument("--out-dir", required=True)
    sp.add_argument("--history", nargs="*", metavar="NAME=CSV", help="CMA-ES search histories (data-aware merges)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except LedmergeError as exc:
        print(f"ledmerge: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
