"""Config validation: schema + defaults (`validate`), semantic checks (`check`), and the Snakefile's gate.

A bad config must stop everything before any job runs, with one `ledmerge:` line naming the key.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import job_stats

from ledmerge.config import check, load, validate
from ledmerge.errors import LedmergeError
from ledmerge.specs import merge_spec

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def make_model(path: Path, hidden_size: int, seed: int = 0) -> Path:
    """Like conftest.make_tiny_model, with a chosen hidden size (an expert of another architecture)."""
    import torch
    from conftest import TINY_WORDS
    from transformers import LlamaConfig, LlamaForCausalLM

    from ledmerge.zoo.word_tokenizer import build_tokenizer

    tok = build_tokenizer([TINY_WORDS])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_expert(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("wide") / "wide", hidden_size=24)


def base_config(tmp_path: Path) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    cfg["results"] = str(tmp_path / "results")
    return cfg


def with_models(cfg: dict, zoo: dict) -> dict:
    """Point the base and experts at the tiny models on disk instead of the toy zoo."""
    cfg["base_model"] = str(zoo["base"])
    for task in cfg["tasks"]:
        cfg["tasks"][task]["model"] = str(zoo[task])
    if cfg.get("data_aware", {}).get("enabled"):  # real models need a real generator for the synthetic data
        cfg["data_aware"]["synthetic"]["generator"] = str(zoo["base"])
    # the toy's prompt sets named explicitly (their default only for the toy models)
    cfg["evaluation"] = {**{k: "zoo" for k in ("harmful", "benign", "math", "code")}, **cfg.get("evaluation", {})}
    return cfg


# Each case: (id, function changing the config, substring the one error line must contain).
def _rate(value):
    def change(cfg, tmp_path, zoo, wide):
        cfg["tasks"]["math"]["rate"] = value
    return change


def _unknown_method(cfg, tmp_path, zoo, wide):
    cfg["merges"]["fancy"] = {"method": "fancy_merge"}


def _bad_density(cfg, tmp_path, zoo, wide):
    cfg["merges"]["ties"]["density"] = 2


def _missing_model(cfg, tmp_path, zoo, wide):
    with_models(cfg, zoo)
    cfg["tasks"]["code"]["model"] = str(tmp_path / "no_such_model")


def _missing_base(cfg, tmp_path, zoo, wide):
    with_models(cfg, zoo)
    cfg["base_model"] = str(tmp_path / "no_such_base")


def _shape_mismatch(cfg, tmp_path, zoo, wide):
    with_models(cfg, zoo)
    cfg["tasks"]["math"]["model"] = str(wide)


def _empty_calibration(cfg, tmp_path, zoo, wide):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    cfg["tasks"]["safety"]["calibration"] = {"source": "jsonl", "path": str(path)}


def _unknown_top_level(cfg, tmp_path, zoo, wide):
    cfg["reslts"] = "typo"


def _sweep_bad_key(cfg, tmp_path, zoo, wide):
    cfg["sweeps"]["rate_control"]["rates"] = [{"math": 0.2}]  # `rate` misspelt


def _sweep_lambda_on_ties(cfg, tmp_path, zoo, wide):
    cfg["sweeps"]["rate_control"] = {"merge": "ties", "lambda": {"math": [0.5]}}


def _merge_named_like_task(cfg, tmp_path, zoo, wide):
    cfg["merges"]["math"] = {"method": "linear"}


def _merge_named_base(cfg, tmp_path, zoo, wide):
    cfg["merges"]["base"] = {"method": "linear"}


def _missing_eval_file(cfg, tmp_path, zoo, wide):
    cfg.setdefault("evaluation", {})["harmful"] = str(tmp_path / "nope.jsonl")


def _eval_rows(key, row):
    def change(cfg, tmp_path, zoo, wide):
        path = tmp_path / f"{key}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        cfg.setdefault("evaluation", {})[key] = str(path)
    return change


def _calibration_column_missing(cfg, tmp_path, zoo, wide):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"prompt": "what is 3 + 4", "response": "7"}) + "\n")
    cfg["tasks"]["safety"]["calibration"] = {"source": "jsonl", "path": str(path), "prompt_column": "question"}


def _led_lambdas_name_no_task(cfg, tmp_path, zoo, wide):
    cfg["merges"]["led"]["lambdas"] = {"maths": 0.5}


def _slerp_with_three_experts(cfg, tmp_path, zoo, wide):
    cfg["merges"]["slerp"] = {"method": "slerp", "t": 0.5}


def _della_epsilon_too_wide(cfg, tmp_path, zoo, wide):
    cfg["merges"]["della"] = {"method": "della", "density": 0.9, "epsilon": 0.15}


def _real_models_without_evaluation(cfg, tmp_path, zoo, wide):
    with_models(cfg, zoo)
    cfg.pop("evaluation", None)


def _real_models_without_math_set(cfg, tmp_path, zoo, wide):
    with_models(cfg, zoo)
    cfg["evaluation"] = {"harmful": "zoo", "benign": "zoo", "code": "zoo"}  # every set named but math


def _scored_vocab_with_vocab_policy_base(key):
    def change(cfg, tmp_path, zoo, wide):
        cfg.setdefault("importance", {})[key] = True
        cfg.setdefault("merge", {})["vocab_policy"] = "base"
    return change


def _mergekit_unknown_method(cfg, tmp_path, zoo, wide):
    (tmp_path / "mk.yml").write_text("merge_method: model_stock\nbase_model: results/zoo/models/base\n")
    cfg["merges"]["from_mergekit"] = {"mergekit": str(tmp_path / "mk.yml")}


def _evaluation(**changes):
    def change(cfg, tmp_path, zoo, wide):
        cfg.setdefault("evaluation", {}).update(changes)
    return change


CASES = [
    ("rate-zero", _rate(0), "tasks.math.rate"),
    ("rate-above-one", _rate(1.5), "tasks.math.rate"),
    ("unknown-method", _unknown_method, "merges.fancy"),
    ("ties-density-2", _bad_density, "merges.ties"),
    ("missing-expert-dir", _missing_model, "tasks.code.model"),
    ("missing-base-dir", _missing_base, "base_model"),
    ("expert-shape-mismatch", _shape_mismatch, "tasks.math.model"),
    ("empty-calibration", _empty_calibration, "tasks.safety.calibration"),
    ("unknown-top-level-key", _unknown_top_level, "reslts"),
    ("merge-named-like-task", _merge_named_like_task, "merges.math"),
    ("sweep-bad-key", _sweep_bad_key, "sweeps.rate_control"),
    ("sweep-lambda-on-ties", _sweep_lambda_on_ties, "sweeps.rate_control.lambda"),
    ("merge-named-base", _merge_named_base, "merges.base"),
    ("missing-eval-file", _missing_eval_file, "evaluation.harmful"),
    ("math-eval-without-answer", _eval_rows("math", {"prompt": "what is 3 + 4"}), "evaluation.math"),
    ("code-eval-without-tests", _eval_rows("code", {"prompt": "write f", "entry_point": "f"}), "evaluation.code"),
    ("harmful-eval-without-prompt", _eval_rows("harmful", {"text": "how do i make a bomb"}), "evaluation.harmful"),
    ("calibration-column-missing", _calibration_column_missing, "tasks.safety.calibration.path"),
    ("led-lambdas-name-no-task", _led_lambdas_name_no_task, "merges.led"),
    ("slerp-with-three-experts", _slerp_with_three_experts, "merges.slerp"),
    ("della-epsilon-too-wide", _della_epsilon_too_wide, "merges.della"),
    ("real-models-without-evaluation", _real_models_without_evaluation, "evaluation.harmful"),
    ("real-models-without-math-set", _real_models_without_math_set, "evaluation.math"),
    ("embeddings-with-vocab-policy-base", _scored_vocab_with_vocab_policy_base("include_embeddings"),
     "importance.include_embeddings"),
    ("lm-head-with-vocab-policy-base", _scored_vocab_with_vocab_policy_base("include_lm_head"),
     "importance.include_lm_head"),
    ("mergekit-unknown-method", _mergekit_unknown_method, "merges.from_mergekit': "),
    ("unknown-judge", _evaluation(judge="harmbnch"), "evaluation.judge"),
    ("judge-option-misspelt", _evaluation(judge="harmbench", judge_kwargs={"model": "m", "batch_szie": 4}),
     "evaluation.judge_kwargs': Additional properties are not allowed ('batch_szie' was unexpected)"),
    ("judge-option-of-another-judge", _evaluation(judge="refusal", judge_kwargs={"model": "m"}),
     "evaluation.judge_kwargs': Additional properties are not allowed ('model' was unexpected) (allowed keys: "
     "phrases, prefixes, window)"),
    ("model-judge-without-model", _evaluation(judge="llama_guard", judge_kwargs={"device": "cuda"}),
     "evaluation.judge_kwargs': 'model' is a required property"),
    ("judge-option-bad-value", _evaluation(judge="model", judge_kwargs={"model": "m", "dtype": "fp16"}),
     "evaluation.judge_kwargs.dtype"),
    ("utility-task-not-evaluated", _evaluation(utility={"gsm8k_accuracy": {"task": "gsm8k", "metric": "exact_match"}}),
     "evaluation.utility.gsm8k_accuracy"),
    ("utility-column-named-like-a-safety-metric",
     _evaluation(utility={"empty_rate": {"task": "ledmerge_math", "metric": "exact_match"}}), "evaluation.utility"),
    ("lm-eval-task-data-missing", _evaluation(lm_eval_tasks=[{"task": "gsm8k", "data": "/no/such/gsm8k.jsonl"}]),
     "evaluation.lm_eval_tasks.0.data"),
    ("lm-eval-task-unknown-key", _evaluation(lm_eval_tasks=[{"task": "gsm8k", "fewshot": 5}]),
     "evaluation.lm_eval_tasks.0"),
]
# The cases the Snakefile gate is also run on, one per layer of checks (each is a Snakemake start-up, ~3 s): the
# schema, checkpoints, data files, merge specs and sweeps. Every case of CASES goes through the same `validate` and
# `check` calls (test_bad_config_raises_naming_the_key), so one per layer shows the gate reports each as one line.
SNAKEFILE_CASES = ["unknown-top-level-key", "expert-shape-mismatch", "empty-calibration", "unknown-method",
                   "sweep-bad-key"]


def bad_config(case_id, tmp_path, zoo, wide) -> tuple[dict, str]:
    _, change, key = next(c for c in CASES if c[0] == case_id)
    cfg = base_config(tmp_path)
    change(cfg, tmp_path, zoo, wide)
    return cfg, key


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_bad_config_raises_naming_the_key(case_id, tmp_path, tiny_zoo, wide_expert):
    cfg, key = bad_config(case_id, tmp_path, tiny_zoo, wide_expert)
    with pytest.raises(LedmergeError) as info:
        validate(cfg)
        check(cfg)
    message = str(info.value)
    assert key in message, message
    assert "\n" not in message, message


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SNAKEFILE_CASES)
def test_snakefile_rejects_bad_config_before_any_job(case_id, tmp_path, tiny_zoo, wide_expert):
    cfg, key = bad_config(case_id, tmp_path, tiny_zoo, wide_expert)
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [str(SNAKEMAKE), "-n", "--cores", "1", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
         "--configfile", str(configfile)],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("ledmerge:")]
    assert len(lines) == 1, out[-3000:]
    assert key in lines[0], lines[0]
    assert "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "results").exists()


def test_defaults_are_filled(tmp_path):
    cfg = {"tasks": {"safety": {"model": "zoo", "calibration": {"source": "zoo"}, "rate": 0.1}},
           "merges": {"led": {"method": "led"}}}
    validate(cfg)
    assert cfg["importance"]["granularity"] == "example"
    assert cfg["importance"]["dtype"] == "float32"
    assert cfg["results"] == "results" and cfg["seed"] == 0 and cfg["threads"] == 1
    assert cfg["zoo"]["hidden_size"] == 64
    assert cfg["calibration"] == {"size": 128, "seed": 0}
    assert cfg["election"]["pattern"] == "11"
    assert cfg["evaluation"]["judge"] == "refusal" and cfg["evaluation"]["limit"] is None
    # The toy's prompt sets are the default for the toy models (a real-model config must name its sets).
    assert [cfg["evaluation"][k] for k in ("harmful", "benign", "math", "code")] == ["zoo"] * 4
    assert cfg["tasks"]["safety"]["lambda"] == 1.0
    assert cfg["tasks"]["safety"]["calibration"]["split"] == "train"
    check(cfg)
    assert merge_spec(cfg, "led")["lambdas"] == {"safety": 1.0}


def test_defaults_do_not_override_given_values():
    cfg = {"tasks": {"math": {"model": "zoo", "calibration": {"source": "zoo"}, "rate": 0.4, "lambda": 0.5}},
           "merges": {"led": {"method": "led", "lambdas": {"math": 2.0}}}, "importance": {"granularity": "batch"}}
    validate(cfg)
    assert cfg["importance"]["granularity"] == "batch" and cfg["importance"]["batch_size"] == 1
    assert cfg["tasks"]["math"]["lambda"] == 0.5
    assert merge_spec(cfg, "led")["lambdas"] == {"math": 2.0}


@pytest.mark.parametrize("name", ["config.yaml", "test.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load(REPO / "config" / name)
    assert sorted(cfg["tasks"]) == ["code", "math", "safety"]
    assert sorted(cfg["merges"]) == ["dare_linear", "dare_ties", "led", "linear", "task_arithmetic", "ties"]


def test_test_config_matches_default_tasks_and_merges():
    test = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    assert test["tasks"] == DEFAULT["tasks"]
    assert test["merges"] == DEFAULT["merges"]


def test_models_on_disk_pass(tmp_path, tiny_zoo):
    cfg = with_models(base_config(tmp_path), tiny_zoo)
    validate(cfg)
    check(cfg)


def test_load_reports_unreadable_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("tasks: [unclosed\n")
    with pytest.raises(LedmergeError, match="is not valid YAML"):
        load(path)


@pytest.mark.integration  # subprocesses (python -m ledmerge / snakemake): not in `make check`
def test_user_configfile_replaces_the_default_rather_than_merging(tmp_path):
    """A config with two tasks and one merge must plan exactly those, not the default's three tasks."""
    cfg = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    cfg["results"] = str(tmp_path / "results")
    cfg["tasks"] = {t: cfg["tasks"][t] for t in ("safety", "math")}
    cfg["merges"] = {"task_arithmetic": cfg["merges"]["task_arithmetic"]}
    cfg["sweeps"] = {}  # its sweep varies led
    cfg["data_aware"]["enabled"] = False  # only the configured merge
    path = tmp_path / "two_tasks.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # From the repository root, as users run it: that is where config/config.yaml would be picked up.
    proc = subprocess.run([str(SNAKEMAKE), "-n", "--configfile", str(path), "--cores", "1"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stats = job_stats(proc.stdout)
    assert stats["calibration"] == 2 and stats["zoo_expert"] == 2
    assert stats["merge"] == 1 and stats["evaluation"] == 4  # base, 2 experts, 1 merge
    assert "results/calibration/code.jsonl" not in proc.stdout


def test_check_validates_the_merge_spec_the_workflow_runs():
    """check-config and the merge job see one spec: merge_spec (the user's lambdas, else tasks.<t>.lambda)."""
    cfg = validate(copy.deepcopy(DEFAULT))
    cfg["tasks"]["code"]["lambda"] = 0.25
    cfg["merges"]["led"]["lambdas"] = {"math": 0.5}  # names a task: fine, the others get tasks.<t>.lambda
    check(cfg)
    assert merge_spec(cfg, "led")["lambdas"] == {"code": 0.25, "math": 0.5, "safety": 1.0}
    cfg["merges"]["led"]["lambdas"] = {"math": 0.5, "chemistry": 1.0}
    with pytest.raises(LedmergeError, match=r"merges\.led.*lambdas names task\(s\) \['chemistry'\]"):
        check(cfg)


def test_real_models_with_named_evaluation_sets_pass(tmp_path, tiny_zoo):
    """Naming the sets is the fix the error gives: files, null (off), or zoo explicitly."""
    cfg = with_models(base_config(tmp_path), tiny_zoo)
    rows = {"harmful": {"prompt": "how do i make a bomb"}, "benign": {"prompt": "how do i kill a python process"}}
    for key, row in rows.items():
        (tmp_path / f"{key}.jsonl").write_text(json.dumps(row) + "\n")
    cfg["evaluation"] = {"harmful": str(tmp_path / "harmful.jsonl"), "benign": str(tmp_path / "benign.jsonl"),
                         "math": None, "code": "zoo"}
    check(validate(cfg))
    assert cfg["evaluation"]["math"] is None and cfg["evaluation"]["code"] == "zoo"


def test_jsonl_calibration_columns_are_honoured(tmp_path):
    """prompt_column / response_column map a local JSONL's fields, in check-config and in the calibration job."""
    from ledmerge.calibration import build_calibration
    from ledmerge.fileio import read_jsonl

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}", "prompt": "unused"}) + "\n"
                            for i in range(4)))
    cfg = base_config(tmp_path)
    cfg["tasks"]["safety"]["calibration"] = {"source": "jsonl", "path": str(path), "prompt_column": "question",
                                             "response_column": "answer"}
    check(validate(cfg))
    out = tmp_path / "calib.jsonl"
    assert build_calibration("safety", cfg["tasks"]["safety"]["calibration"], 3, 0, out) == 3
    rows = read_jsonl(out)
    assert all(r["prompt"] == "q" + r["response"][1:] and r["task"] == "safety" for r in rows), rows


@pytest.mark.parametrize("change, needle", [
    (lambda cfg: [t.update(rate=1) for t in cfg["tasks"].values()], "every task's election rate is 1"),
    (lambda cfg: cfg["tasks"]["math"].update({"lambda": 1e30}), "beyond ±10"),
    (lambda cfg: cfg["merges"]["led"].update(lambdas={"code": -50}), "beyond ±10"),
])
def test_legal_but_unlikely_values_warn(change, needle, tmp_path, caplog):
    """Legal, so not an error, but almost surely a mistake: a warning before any job, and the config still passes."""
    cfg = validate(copy.deepcopy(DEFAULT))
    check(cfg)
    assert needle not in caplog.text  # the default config warns of nothing
    change(cfg)
    check(cfg)
    assert needle in caplog.text
