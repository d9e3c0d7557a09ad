"""One definition of each option (issue #11): the schema. These tests fail when another layer disagrees with it."""

from __future__ import annotations

import argparse
import copy
import inspect
import io
import re
import tokenize
from pathlib import Path

import pytest
import yaml

from ledmerge import schema
from ledmerge.config import check, validate
from ledmerge.errors import LedmergeError
from ledmerge.specs import merge_spec

REPO = Path(__file__).resolve().parents[1]


def test_docs_configuration_is_generated_from_the_schema():
    """docs/configuration.md == `ledmerge config-reference` (regenerate with `make docs`)."""
    from ledmerge.cli import configuration_reference

    assert (REPO / "docs" / "configuration.md").read_text() == configuration_reference()


def test_readme_method_table_is_generated():
    """README.md's method table == the one generated from the registry (regenerate with `make docs`)."""
    from ledmerge.cli import readme_with_methods
    from ledmerge.merge.registry import METHODS

    readme = (REPO / "README.md").read_text()
    assert readme == readme_with_methods(readme)
    assert all(f"| `{name}` |" in readme for name in METHODS)


def _leaves(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    else:
        yield path, node


def test_default_config_holds_only_values_that_differ_from_the_schema():
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    defaults = validate({"tasks": copy.deepcopy(raw["tasks"]), "merges": copy.deepcopy(raw["merges"])})
    # base_model: zoo is said once, on purpose; sweeps, like tasks and merges, are named entries (no defaults)
    for key in set(raw) - {"tasks", "merges", "base_model", "sweeps"}:
        for path, value in _leaves(raw[key], key):
            node = defaults
            for part in path.split("."):
                node = node[part]
            assert value != node, f"config/config.yaml sets {path}: {value!r}, the schema default: drop it"
    for name, task in raw["tasks"].items():
        assert "lambda" not in task or task["lambda"] != schema.section("tasks")["additionalProperties"][
            "properties"]["lambda"]["default"], name


# step function -> the config section whose keys it takes
STEP_FUNCTIONS = {
    "ledmerge.led.location:score_model": "importance",
    "ledmerge.evaluation.runner:evaluate_model": "evaluation",
    "ledmerge.merge:merge_models": "merge",
    "ledmerge.led.election:elect": "election",
    "ledmerge.led.election:elect_tensor": "election",
    "ledmerge.led.election:elect_files": "election",
    "ledmerge.synthetic_data:synthesize": "data_aware.synthetic",
    "ledmerge.synthetic_data:run_synthetic": "data_aware.synthetic",
    "ledmerge.synthetic_data:HFGenerator.__init__": "data_aware.synthetic",
    "ledmerge.synthetic_data:ToyGenerator.__init__": "data_aware.synthetic",
    "ledmerge.synthetic_data:EnglishGenerator.__init__": "data_aware.synthetic",
    "ledmerge.data_aware.evolve:evolve": "data_aware.evolve",
    "ledmerge.data_aware.cocktail:cocktail": "data_aware.cocktail",
    "ledmerge.data_aware.cocktail:run_cocktail": "data_aware.cocktail",
    "ledmerge.data_aware.fitness:load_evaluator": "data_aware.fitness",
    "ledmerge.data_aware.fitness:MergeEvaluator.__init__": "data_aware.fitness",
    "ledmerge.calibration:build_calibration": "calibration",
}


@pytest.mark.parametrize("target", sorted(STEP_FUNCTIONS))
def test_step_functions_do_not_restate_schema_defaults(target):
    import importlib

    module, _, attr = target.partition(":")
    func = importlib.import_module(module)
    for part in attr.split("."):
        func = getattr(func, part)
    keys = set(schema.section(STEP_FUNCTIONS[target])["properties"])
    restated = [name for name, p in inspect.signature(func).parameters.items()
                if name in keys and p.default is not inspect.Parameter.empty]
    assert not restated, f"{target} has defaults for {restated}: take them from the schema (schema.resolve)"


def test_judges_do_not_restate_schema_defaults():
    """The judges' options (evaluation.judge_kwargs) are definitions.<judge>_judge: judges.py states none of their
    defaults, neither as a keyword default nor as a preset's value."""
    from ledmerge.evaluation import judges

    for func, definition in ((judges.RefusalJudge.__init__, "refusal_judge"), (judges.ModelJudge.__init__, "model_judge"),
                             (judges.JUDGES["harmbench"], "harmbench_judge")):
        keys = set(schema.definition_defaults(definition))
        restated = [name for name, p in inspect.signature(func).parameters.items()
                    if name in keys and p.default is not inspect.Parameter.empty]
        assert not restated, f"{func.__qualname__} has defaults for {restated}: take them from the schema"
    text = Path(judges.__file__).read_text()
    literals = set(_string_literals(text))
    assert not literals & {'"Yes"', '"No"', '"unsafe"', '"safe"'}, "judges.py writes a judge's answers again"
    assert not re.search(r"(max_new_tokens|batch_size|window|max_response_tokens)\s*[:=]\s*\d", text)


def test_cli_has_no_defaults():
    from ledmerge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for step, sp in sub.choices.items():
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.default in (None, False), f"ledmerge {step} {action.option_strings}: default {action.default!r}"
    threads = next(a for a in parser._actions if a.dest == "threads")
    assert threads.default is None  # resolved at run time: $LEDMERGE_THREADS, else the schema's `threads`


def test_steps_are_named_as_rules_and_sections():
    from ledmerge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"calibration", "importance", "election", "disjoint", "merge", "evaluation", "synthetic", "evolve",
            "cocktail", "tokenizer", "report", "paper", "config-reference"} <= set(sub.choices)
    assert not {"calibrate", "score", "elect", "evaluate", "synthesize"} & set(sub.choices)
    rules = set(re.findall(r"^rule (\w+):", "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk")),
                           re.M))
    assert {"calibration", "importance", "election", "disjoint", "merge", "evaluation", "synthetic", "evolve",
            "cocktail", "tokenizer", "report", "paper"} <= rules


def _string_literals(text: str) -> list[str]:
    return [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.STRING]


def _code_files():
    return [p for d in ("src", "workflow") for p in (REPO / d).rglob("*") if p.suffix in (".py", ".smk")] + \
        [REPO / "Snakefile"]


def test_traced_defaults_are_written_once():
    """The literal defaults of shard_size, pattern and max_new_tokens appear in src/ + workflow/ only in the schema."""
    full = schema.schema()
    assert "5GB" in yaml.safe_dump(full) and schema.default_of("election.pattern") == "11"
    for path in _code_files():
        text = path.read_text()
        literals = _string_literals(text) if path.suffix == ".py" else re.findall(r"\"[^\"\n]*\"|'[^'\n]*'", text)
        for literal in ('"5GB"', "'5GB'", '"11"', "'11'"):
            assert literal not in literals, f"{path.relative_to(REPO)} writes the default {literal} again"
        # evaluation.max_new_tokens (40; the runner and the task YAMLs used to say 48)
        assert not re.search(r"max_new_tokens\s*[:=]\s*(40|48)\b|max_gen_toks\s*:\s*\d+", text), path
    for path in (REPO / "src" / "ledmerge" / "eval_tasks").glob("*.yaml"):
        gen = yaml.safe_load(path.read_text().replace("!function", "")).get("generation_kwargs", {})
        # the length and the tokenizer's stops come from the run; a task may stop on its own text (a closing fence)
        assert "max_gen_toks" not in gen and not any("<|" in u or "</s>" in u for u in gen.get("until", [])), path


def test_checked_led_spec_is_the_spec_the_merge_job_runs():
    """check() validates merge_spec(); the merge rule passes merge_spec() as --spec: one function, one object."""
    cfg = validate(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    cfg["tasks"]["code"]["lambda"] = 0.3
    cfg["merges"]["led"]["lambdas"] = {"math": 0.5}  # partial: the others fall back to tasks.<t>.lambda
    seen = []
    import ledmerge.merge as merge_pkg

    real = merge_pkg.get_method
    merge_pkg.get_method = lambda spec: (seen.append(copy.deepcopy(dict(spec))), real(spec))[1]
    try:
        check(cfg)
    finally:
        merge_pkg.get_method = real
    runs = merge_spec(cfg, "led")
    assert runs["lambdas"] == {"code": 0.3, "math": 0.5, "safety": 1.0}
    assert runs in seen
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert "as_json(merge_spec(config, name))" in common  # the merge rule's --spec


def test_resolve_fills_defaults_and_rejects_unknown_keys():
    o = schema.resolve("importance", {"max_length": 64})
    assert o["max_length"] == 64 and o["batch_size"] == schema.defaults("importance")["batch_size"]
    with pytest.raises(LedmergeError, match=r"importance\.max_lenght.*|allowed keys: .*max_length"):
        schema.resolve("importance", {"max_lenght": 64})
    with pytest.raises(LedmergeError, match=r"'importance\.max_length'"):
        schema.resolve("importance", {"max_length": 1})
    assert schema.allowed("election.pattern") == ["11", "x1", "01", "10", "1x", "00", "0x", "x0"]
    assert schema.section("data_aware.synthetic")["properties"]["generator"]["default"] == "zoo"


def test_cli_unknown_option_is_one_line(capsys):
    from ledmerge.cli import main

    rc = main(["election", "--expert", "e", "--base", "b", "--rate", "0.1", "--out", "o",
               "--options", '{"patern": "11"}'])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "allowed keys: pattern" in err
