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


def _options(a, path: str) -> dict:
    """`--options`: the config section `path` as a JSON object (or @FILE holding one), resolved through the schema:
    missing keys take the schema defaults, an unknown key or a bad value is a one-line error."""
    from .options import resolve

    return resolve(path, _json_arg(a.options, "--options"))


def _json_arg(value: str | None, flag: str):
    """A JSON argument given inline or as @FILE; absent: an empty object."""
    if value is None:
        return {}
    if value.startswith("@"):
        try:
            value = open(value[1:]).read()
        except OSError as exc:
            raise LedmergeError(f"cannot read {flag} file {value[1:]} ({exc.strerror})") from None
    return _json(value, flag)


def _num_threads(a) -> int:
    """--threads, else $LEDMERGE_THREADS, else the schema's top-level `threads`."""
    from .options import default_of

    if a.threads is not None:
        return a.threads
    env = os.environ.get("LEDMERGE_THREADS")
    return int(env) if env else default_of("threads")


def _threads(a) -> None:
    import torch

    torch.set_num_threads(_num_threads(a))


def cmd_check_config(a):
    from .config import load

    cfg = load(a.config)
    print(f"{a.config}: ok ({len(cfg['tasks'])} tasks, {len(cfg['merges'])} merges)")


def configuration_reference() -> str:
    """docs/configuration.md: the schema's keys, then each merge method's parameters (declared by the method)."""
    from .merge.registry import reference_markdown as merge_methods
    from .options import reference_markdown

    return reference_markdown().rstrip("\n") + "\n\n" + merge_methods().rstrip("\n") + "\n"


def cmd_config_reference(a):
    print(configuration_reference(), end="")


def cmd_fetch_model(a):
    from .hub import fetch_model

    print(f"downloaded {a.repo}@{a.revision} to {fetch_model(a.repo, a.out, a.revision)}")


def cmd_fetch_dataset(a):
    from .hub import fetch_dataset

    n = fetch_dataset(_json(a.spec, "--spec"), a.out, _json(a.columns, "--columns"))
    print(f"wrote {n} rows to {a.out}")


def cmd_zoo_data(a):
    from .zoo.build import build_data

    build_data(a.out_dir, a.tokenizer, a.seed, **_options(a, "zoo"))


def cmd_zoo_base(a):
    from .zoo.build import build_base

    _threads(a)
    print(json.dumps(build_base(a.data_dir, a.tokenizer, a.out, a.seed, **_options(a, "zoo"))))


def cmd_zoo_expert(a):
    from .zoo.build import build_expert

    _threads(a)
    print(json.dumps(build_expert(a.base, a.train, a.out, a.seed, a.task, **_options(a, "zoo"))))


def cmd_calibration(a):
    from .calibration import build_calibration

    o = _options(a, "calibration")
    n = build_calibration(a.task, _json(a.source, "--source"), o["size"], o["seed"], a.out, pool_path=a.pool)
    print(f"wrote {n} calibration examples for task '{a.task}' to {a.out}")


def cmd_tokenizer(a):
    from .tokenizer import build_tokenizer_dir

    record = build_tokenizer_dir(a.source, a.base, _pairs(a.expert, "--expert"), a.alignment_task, a.out,
                                 chat_template=a.chat_template or None, trust_remote_code=a.trust_remote_code)
    print(json.dumps({k: v for k, v in record.items() if k != "sha256"}))


def cmd_importance(a):
    from .importance import score_model

    _threads(a)
    summary = score_model(a.model, a.calibration, a.out, tokenizer_dir=a.tokenizer, base_dir=a.base,
                          **_options(a, "importance"), trust_remote_code=a.trust_remote_code,
                          allow_pickle=a.allow_pickle, random_seed=a.seed, random_key=a.key)
    print(json.dumps(summary))


def cmd_election(a):
    from .masks import elect_files

    _threads(a)
    o = _options(a, "election")
    print(json.dumps(elect_files(a.expert, a.base, a.rate, o["pattern"], a.out)))


def cmd_disjoint(a):
    from .masks import disjoint_files

    _threads(a)
    disjoint_files(_pairs(a.elected, "--elected"), _pairs(a.out, "--out"), a.stats, a.overlap)


def cmd_merge(a):
    from .merge import merge_models

    _threads(a)
    if a.spec.startswith("@") and not os.path.isfile(a.spec[1:]):  # the recipe a data-aware search writes
        raise LedmergeError(f"cannot read the merge spec file {a.spec[1:]}: run its search first")
    summary = merge_models(a.base, _pairs(a.expert, "--expert"), _json_arg(a.spec, "--spec"), a.out,
                           masks=_pairs(a.mask, "--mask") or None, **_options(a, "merge"), allow_pickle=a.allow_pickle,
                           tokenizer_dir=a.tokenizer)
    print(json.dumps(summary))


def cmd_synthetic(a):
    from .synth import run_synthetic

    _threads(a)
    summary = run_synthetic(a.aligned, a.alignment_task, _pairs(a.expert, "--expert"),
                            _pairs(a.calibration, "--calibration"), a.out_dir, **_options(a, "data_aware.synthetic"),
                            trust_remote_code=a.trust_remote_code)
    print(json.dumps(summary))


def _evaluator(a):
    from .data_aware.fitness import load_evaluator, objective_weights
    from .options import resolve

    o = resolve("data_aware.fitness", _json_arg(a.fitness, "--fitness"))
    w_align, w_task = objective_weights(a.objective, o.pop("w_align"), o.pop("w_task"))
    evaluator = load_evaluator(a.base, _pairs(a.expert, "--expert"), a.search, a.heldout,
                               _pairs(a.mask, "--mask") or None, tokenizer=a.tokenizer, w_align=w_align,
                               w_task=w_task, trust_remote_code=a.trust_remote_code, allow_pickle=a.allow_pickle, **o)
    return evaluator, dict(objective=a.objective, w_align=w_align, w_task=w_task)


def cmd_evolve(a):
    from .data_aware.evolve import run_evolve, search_options

    _threads(a)
    search = search_options(_json_arg(a.options, "--options"))
    evaluator, objective = _evaluator(a)
    summary = run_evolve(evaluator, a.method, a.out_dir, **objective, **search)
    print(json.dumps(summary["best"]))


def cmd_cocktail(a):
    from .data_aware.cocktail import run_cocktail

    _threads(a)
    o = _options(a, "data_aware.cocktail")
    evaluator, objective = _evaluator(a)
    print(json.dumps(run_cocktail(evaluator, a.out_dir, **objective, temperature=o["temperature"])["weights"]))


def cmd_evaluation(a):
    from .evaluation import evaluate_model
    from .evaluation.runner import SETS

    o = _options(a, "evaluation")
    for key in SETS:  # the sets' sources (zoo, a file, a prompt set) reach the job as files: --harmful ... --code
        o.pop(key, None)
    if a.judge_model:  # a model judge given as {hub: org/name}: its local download
        o["judge_kwargs"]["model"] = a.judge_model
    if a.trust_remote_code:
        o["model_args"]["trust_remote_code"] = True
        if "model" in o["judge_kwargs"]:  # a judge that loads a model
            o["judge_kwargs"]["trust_remote_code"] = True
    result = evaluate_model(a.model, a.out, a.generations, harmful_path=a.harmful, benign_path=a.benign,
                            math_path=a.math, code_path=a.code, seed=a.seed, tokenizer=a.tokenizer,
                            base_dir=a.base, num_threads=_num_threads(a), **o)
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


def cmd_sweeps_report(a):
    from .report import sweeps_table

    table = _json_arg(a.points, "--points")
    print(sweeps_table(table["points"], table["columns"], a.out).to_string(index=False))


def cmd_paper(a):
    from .paper import build_paper

    written = build_paper(a.summary, _pairs(a.metrics, "--metrics"), a.mask_stats, a.mask_overlap, a.out_dir,
                          sweeps_csv=a.sweeps)
    print("\n".join(str(p) for p in written))


TRUST_HELP = "let transformers run the model repository's own Python code (off by default)"
PICKLE_HELP = "also read pickle (.bin) checkpoints; only for files you trust: unpickling can run code"


def build_parser() -> argparse.ArgumentParser:
    """Steps are named as their rule and config section (rule = step = section). Paths and per-job values are
    flags; a step's config section is `--options` (schema defaults, listed in the step's --help). No option has a
    default here: the schema (src/ledmerge/schemas/config.schema.yaml) holds them all."""
    from .options import help_epilog

    p = argparse.ArgumentParser(prog="ledmerge", description=(
        "Safety-aware model merging (LED-Merging and baselines). Each subcommand is one step of the "
        "Snakemake workflow; run the whole chain with `snakemake --cores all` from the repository root."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: $LEDMERGE_THREADS, else the config "
                   "schema's top-level threads)")
    sub = p.add_subparsers(dest="command", required=True, metavar="STEP")

    def add(name, func, help, section=None):
        sp = sub.add_parser(name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=help_epilog(section) if section else None)
        sp.set_defaults(func=func)
        if section:
            sp.add_argument("--options", metavar="JSON", help=f"the config's `{section}` section as a JSON object, "
                            "or @FILE holding one; missing keys take the defaults listed below")
        return sp

    def opt_ins(sp, trust=True, pickle=True):
        if trust:
            sp.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
        if pickle:
            sp.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)

    sp = add("check-config", cmd_check_config, "validate a workflow config file (schema, paths, checkpoints)")
    sp.add_argument("config")

    add("config-reference", cmd_config_reference, "print the configuration reference (Markdown) generated from the "
        "schema: docs/configuration.md")

    sp = add("fetch-model", cmd_fetch_model, "download a hub model's safetensors, configs and tokenizer")
    sp.add_argument("--repo", required=True)
    sp.add_argument("--revision", required=True)
    sp.add_argument("--out", required=True)

    sp = add("fetch-dataset", cmd_fetch_dataset, "export a split of a Hugging Face dataset to JSONL")
    sp.add_argument("--spec", required=True, help="JSON {name, config_name, split}")
    sp.add_argument("--columns", required=True, help="JSON {output field: dataset column}")
    sp.add_argument("--out", required=True)

    sp = add("zoo-data", cmd_zoo_data, "write the toy world's datasets and tokenizer", "zoo")
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--seed", type=int, required=True, help="the config's top-level seed")

    sp = add("zoo-base", cmd_zoo_base, "pretrain the toy base model", "zoo")
    sp.add_argument("--data-dir", required=True)
    sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--seed", type=int, required=True)

    sp = add("zoo-expert", cmd_zoo_expert, "fine-tune one toy expert from the base", "zoo")
    sp.add_argument("--task", required=True)
    sp.add_argument("--base", required=True)
    sp.add_argument("--train", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--seed", type=int, required=True)

    sp = add("calibration", cmd_calibration, "sample a task's calibration set (prompt/response JSONL)", "calibration")
    sp.add_argument("--task", required=True)
    sp.add_argument("--source", required=True, help="JSON of the task's tasks.<name>.calibration spec")
    sp.add_argument("--pool", help="toy zoo calibration pool (source zoo)")
    sp.add_argument("--out", required=True)

    sp = add("tokenizer", cmd_tokenizer, "the run's tokenizer, chat template and stop tokens, from one model")
    sp.add_argument("--source", required=True, help="the config's tokenizer_source: auto (the base if it has a chat "
                    "template, else the aligned expert), base, a task name, or a model directory")
    sp.add_argument("--base", required=True)
    sp.add_argument("--expert", nargs="*", metavar="TASK=DIR")
    sp.add_argument("--alignment-task", required=True, help="the aligned (instruct) expert's task")
    sp.add_argument("--chat-template", nargs="?", help="a .jinja file replacing the source's chat template")
    sp.add_argument("--out", required=True)
    opt_ins(sp, pickle=False)

    sp = add("importance", cmd_importance, "importance scores (SNIP |W| * sum|grad|, or the `location` method) of "
             "one model on one calibration set", "importance")
    sp.add_argument("--model", required=True)
    sp.add_argument("--calibration", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--tokenizer", help="encode with this tokenizer directory (`ledmerge tokenizer`), so base and "
                    "expert see the same token ids; absent: the model's own")
    sp.add_argument("--seed", type=int, help="location random: the config seed")
    sp.add_argument("--key", help="location random: what else seeds the draws (the workflow: the task, so a task's "
                    "base and expert get the same scores)")
    sp.add_argument("--base", help="the base model, when --model is a PEFT LoRA adapter on it")
    opt_ins(sp)

    sp = add("election", cmd_election, "elected mask TopR(expert) and TopR(base) for one task", "election")
    sp.add_argument("--expert", required=True)
    sp.add_argument("--base", required=True)
    sp.add_argument("--rate", type=float, required=True, help="the task's tasks.<name>.rate")
    sp.add_argument("--out", required=True)

    sp = add("disjoint", cmd_disjoint, "final masks: drop weights elected by more than one task; mask statistics")
    sp.add_argument("--elected", nargs="+", required=True, metavar="TASK=PATH")
    sp.add_argument("--out", nargs="+", required=True, metavar="TASK=PATH")
    sp.add_argument("--stats", required=True)
    sp.add_argument("--overlap", required=True)

    sp = add("merge", cmd_merge, "merge experts into the base with one method", "merge")
    sp.add_argument("--base", required=True)
    sp.add_argument("--expert", nargs="+", required=True, metavar="TASK=DIR")
    sp.add_argument("--mask", nargs="*", metavar="TASK=PATH")
    sp.add_argument("--spec", required=True, help="JSON merge spec, or @FILE holding one")
    sp.add_argument("--out", required=True)
    sp.add_argument("--tokenizer", help="tokenizer directory (`ledmerge tokenizer`) whose tokenizer, chat template "
                    "and generation config the merged model gets; absent: the base's")
    opt_ins(sp, trust=False)

    sp = add("synthetic", cmd_synthetic, "synthetic alignment and domain data for data-aware merging",
             "data_aware.synthetic")
    sp.add_argument("--aligned", required=True, help="the aligned model (answers the harmful questions)")
    sp.add_argument("--alignment-task", required=True)
    sp.add_argument("--expert", nargs="+", required=True, metavar="TASK=DIR", help="domain experts")
    sp.add_argument("--calibration", nargs="+", required=True, metavar="TASK=PATH", help="exemplar questions")
    sp.add_argument("--out-dir", required=True)
    opt_ins(sp, pickle=False)

    for name, func, help in (
            ("evolve", cmd_evolve, "CMA-ES search of a merge method's coefficients on synthetic data"),
            ("cocktail", cmd_cocktail, "LM-Cocktail weights from the experts' losses on synthetic data")):
        sp = add(name, func, help, f"data_aware.{name}")
        sp.epilog += "\n\n" + help_epilog("data_aware.fitness").replace("--options", "--fitness")
        sp.add_argument("--fitness", metavar="JSON", help="the config's `data_aware.fitness` section as a JSON "
                        "object, or @FILE; missing keys take the defaults listed below")
        sp.add_argument("--base", required=True)
        sp.add_argument("--expert", nargs="+", required=True, metavar="TASK=DIR")
        sp.add_argument("--mask", nargs="*", metavar="TASK=PATH", help="LED masks (method led)")
        sp.add_argument("--search", required=True)
        sp.add_argument("--heldout", required=True)
        sp.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="the run's tokenizer directory (chat template; the workflow's results/tokenizer)")
        sp.add_argument("--objective", choices=["align", "task"], required=True,
                        help="align: alignment and domain data; task: domain data only")
        sp.add_argument("--out-dir", required=True)
        opt_ins(sp)
        if name == "evolve":
            sp.add_argument("--method", required=True)

    sp = add("evaluation", cmd_evaluation, "safety and utility evaluation of one model (lm-evaluation-harness)",
             "evaluation")
    sp.add_argument("--model", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--generations", required=True)
    sp.add_argument("--harmful", required=True, help="harmful prompts (JSONL)")
    sp.add_argument("--benign", required=True, help="benign prompts that look harmful (JSONL)")
    sp.add_argument("--math", nargs="?", help="math problems (JSONL); absent: not evaluated")
    sp.add_argument("--code", nargs="?", help="code tasks (JSONL); absent: not evaluated")
    sp.add_argument("--tokenizer", help="the run's tokenizer directory; absent: the model's own")
    sp.add_argument("--judge-model", nargs="?", metavar="DIR", help="local directory of a model judge given as {hub: org/name}")
    sp.add_argument("--seed", type=int, required=True, help="the config's top-level seed")
    sp.add_argument("--base", help="the base model, when --model is a PEFT LoRA adapter on it")
    opt_ins(sp, pickle=False)

    sp = add("report", cmd_report, "summary table and figures")
    sp.add_argument("--metrics", nargs="+", required=True, metavar="NAME=KIND=PATH")
    sp.add_argument("--mask-stats")
    sp.add_argument("--mask-overlap")
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--history", nargs="*", metavar="NAME=CSV", help="CMA-ES search histories (data-aware merges)")

    sp = add("sweeps-report", cmd_sweeps_report, "the long table of the sweeps: one row per point (sweeps.csv)")
    sp.add_argument("--points", required=True, help='JSON (inline or @FILE): {"columns": [swept parameters], '
                    '"points": [{"sweep", "model", "values": {column: value}, "metrics": metrics.json}]}')
    sp.add_argument("--out", required=True, help="the CSV to write")

    sp = add("paper", cmd_paper, "paper tables (LaTeX booktabs and Markdown) and print-ready figures (PDF and PNG)")
    sp.add_argument("--summary", required=True, help="the report's summary.csv")
    sp.add_argument("--metrics", nargs="+", required=True, metavar="NAME=PATH",
                    help="each summary model's metrics.json (evaluation set sizes, for the Wilson intervals)")
    sp.add_argument("--mask-stats", required=True)
    sp.add_argument("--mask-overlap", required=True)
    sp.add_argument("--sweeps", help="the sweeps' long table (sweeps.csv); absent: the ablations are placeholders")
    sp.add_argument("--out-dir", required=True)
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
