"""The CLI on bad input: exit code 2, exactly one `ledmerge: error:` line on stderr, no output left behind.

Most cases call the CLI in this process (`ledmerge.cli.main`, what `python -m ledmerge` runs: ~3 s of Python
start-up saved per case); one case per kind of outcome (success, an error of a step, an argument error, the
usage message, --help) runs `python -m ledmerge` as a subprocess, as the workflow's rules do, so the exit
status and streams of the real process are checked too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ledmerge.cli import build_parser, main
from ledmerge.led.files import save_scores

REPO = Path(__file__).resolve().parents[1]


def ledmerge_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m ledmerge ARGS` as a subprocess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "ledmerge", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def ledmerge(*args: str) -> subprocess.CompletedProcess:
    """`ledmerge.cli.main(ARGS)` in this process (what `python -m ledmerge` calls, then exits with its return
    value), its exit status, stdout and stderr as a subprocess's would be. An exception other than the
    SystemExit of argparse propagates: the test fails with its traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["ledmerge", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if "ledmerge: error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("ledmerge: error: "), lines[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), out
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    assert not leftovers, leftovers


def write_scores(path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    save_scores(path, {"model.layers.0.mlp.up_proj.weight": torch.rand(64, 32, generator=g),
                       "model.layers.0.mlp.down_proj.weight": torch.rand(32, 64, generator=g)})
    return path


@pytest.fixture
def scores(tmp_path) -> dict[str, Path]:
    return {"expert": write_scores(tmp_path / "expert.safetensors", 0),
            "base": write_scores(tmp_path / "base.safetensors", 1)}


def test_elect_works_on_good_scores(tmp_path, scores):
    out = tmp_path / "out" / "mask.safetensors"
    proc = ledmerge_process("election", "--expert", scores["expert"], "--base", scores["base"], "--rate", "0.5",
                            "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_elect_corrupt_score_file(tmp_path, scores, damage):
    data = scores["expert"].read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(300), "empty": b""}[damage])
    out = tmp_path / "out" / "mask.safetensors"
    proc = ledmerge("election", "--expert", bad, "--base", scores["base"], "--rate", "0.5", "--out", out)
    assert_one_error(proc, str(bad))
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_elect_missing_score_file(tmp_path, scores):
    out = tmp_path / "mask.safetensors"
    proc = ledmerge_process("election", "--expert", tmp_path / "nope.safetensors", "--base", scores["base"],
                            "--rate", "0.5", "--out", out)
    assert_one_error(proc, "nope.safetensors", "does not exist")
    assert_nothing_written(out)


def test_elect_bad_rate(tmp_path, scores):
    out = tmp_path / "mask.safetensors"
    proc = ledmerge("election", "--expert", scores["expert"], "--base", scores["base"], "--rate", "1.5", "--out", out)
    assert_one_error(proc, "rate")
    assert_nothing_written(out)


def merge_args(zoo: dict, out: Path, spec: dict | None = None, **override) -> list:
    dirs = dict(zoo, **override)
    return ["merge", "--base", dirs["base"], "--expert", *(f"{t}={dirs[t]}" for t in ("safety", "math", "code")),
            "--spec", json.dumps(spec or {"method": "task_arithmetic"}), "--out", out]


def test_merge_missing_model_dir(tmp_path, tiny_zoo):
    out = tmp_path / "merged"
    proc = ledmerge(*merge_args(tiny_zoo, out, math=tmp_path / "no_such_expert"))
    assert_one_error(proc, "no_such_expert", "does not exist")
    assert_nothing_written(out)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` and its bytes: what a refused merge must leave as it was."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_merge_refuses_a_folder_it_did_not_write(tmp_path, tiny_zoo):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("three years of work")
    proc = ledmerge(*merge_args(tiny_zoo, notes))
    assert_one_error(proc, str(notes), "--force")
    assert tree(notes) == {"thesis.tex": b"three years of work"}
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]  # no temporary left beside it


def test_merge_refuses_a_file_as_output(tmp_path, tiny_zoo):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert_one_error(ledmerge(*merge_args(tiny_zoo, notes)), "is a file")
    assert notes.read_text() == "keep me"


def test_merge_force_replaces_the_folder(tmp_path, tiny_zoo):
    out = tmp_path / "old"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    proc = ledmerge(*merge_args(tiny_zoo, out), "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "stale.txt").exists() and (out / "ledmerge_merge.json").is_file()


def test_merge_replaces_its_own_earlier_output_and_an_empty_folder(tmp_path, tiny_zoo):
    out = tmp_path / "merged"
    out.mkdir()  # empty: nothing to lose
    assert ledmerge(*merge_args(tiny_zoo, out)).returncode == 0
    first = tree(out)
    proc = ledmerge(*merge_args(tiny_zoo, out, spec={"method": "ties", "density": 0.5}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "ledmerge_merge.json").read_text())["recipe"]["method"] == "ties"
    assert tree(out).keys() == first.keys()


@pytest.mark.parametrize("where", ["base", "inside_base", "parent_of_expert"])
def test_merge_output_on_an_input_is_refused_even_with_force(tmp_path, tiny_zoo, where):
    import shutil

    root = tmp_path / "models"
    zoo = {t: shutil.copytree(d, root / t) for t, d in tiny_zoo.items()}
    out = {"base": zoo["base"], "inside_base": zoo["base"] / "merged", "parent_of_expert": root}[where]
    before = tree(root)
    proc = ledmerge(*merge_args(zoo, out), "--force")
    assert_one_error(proc, "input")
    assert tree(root) == before


def test_merge_output_current_directory_is_refused(tmp_path, tiny_zoo, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("mine")
    monkeypatch.chdir(work)
    for args in ((), ("--force",)):
        assert_one_error(ledmerge(*merge_args(tiny_zoo, Path(".")), *args), "current directory")
    assert tree(work) == {"notes.md": b"mine"}


def test_merge_output_symlink_is_refused(tmp_path, tiny_zoo):
    real = tmp_path / "real"
    real.mkdir()
    (real / "mine.txt").write_text("mine")
    (tmp_path / "link").symlink_to(real)
    for args in ((), ("--force",)):
        assert_one_error(ledmerge(*merge_args(tiny_zoo, tmp_path / "link"), *args), "symbolic link")
    assert tree(real) == {"mine.txt": b"mine"}


def test_tokenizer_refuses_a_folder_it_did_not_write(tmp_path, tiny_zoo):
    notes = tmp_path / "tok"
    notes.mkdir()
    (notes / "a.txt").write_text("mine")
    proc = ledmerge("tokenizer", "--source", "base", "--base", tiny_zoo["base"], "--alignment-task", "safety",
                    "--out", notes)
    assert_one_error(proc, "--force")
    assert tree(notes) == {"a.txt": b"mine"}


def test_merge_missing_base_dir(tmp_path, tiny_zoo):
    out = tmp_path / "merged"
    proc = ledmerge(*merge_args(tiny_zoo, out, base=tmp_path / "no_such_base"))
    assert_one_error(proc, "no_such_base")
    assert_nothing_written(out)


def test_merge_pickle_only_model_says_how_to_convert(tmp_path, tiny_zoo):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    state = load_file(str(Path(tiny_zoo["code"]) / "model.safetensors"))
    torch.save(state, pickled / "pytorch_model.bin")
    (pickled / "config.json").write_text((Path(tiny_zoo["code"]) / "config.json").read_text())
    out = tmp_path / "merged"
    proc = ledmerge(*merge_args(tiny_zoo, out, code=pickled))
    line = assert_one_error(proc, str(pickled), "pickle")
    assert "save_pretrained" in line and "allow_pickle: true" in line, line
    assert_nothing_written(out)


def test_merge_bad_spec(tmp_path, tiny_zoo):
    out = tmp_path / "merged"
    proc = ledmerge(*merge_args(tiny_zoo, out, spec={"method": "ties", "density": 2}))
    assert_one_error(proc, "density")
    assert_nothing_written(out)


def test_merge_spec_not_json(tmp_path, tiny_zoo):
    out = tmp_path / "merged"
    args = merge_args(tiny_zoo, out)
    args[args.index("--spec") + 1] = "{method: ties"
    proc = ledmerge_process(*args)
    assert_one_error(proc, "--spec")
    assert_nothing_written(out)


def test_merge_expert_without_name(tmp_path, tiny_zoo):
    out = tmp_path / "merged"
    proc = ledmerge("merge", "--base", tiny_zoo["base"], "--expert", tiny_zoo["math"], "--spec",
                    '{"method": "linear"}', "--out", out)
    assert_one_error(proc, "NAME=PATH")
    assert_nothing_written(out)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_score_empty_calibration(tmp_path, tiny_zoo, content):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(content)
    out = tmp_path / "scores.safetensors"
    proc = ledmerge("importance", "--model", tiny_zoo["base"], "--calibration", calib, "--out", out)
    assert_one_error(proc, str(calib), "empty")
    assert_nothing_written(out)


def test_score_malformed_calibration(tmp_path, tiny_zoo):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"prompt": "hi", "response": "ok"}\n{"prompt": "broken"\n')
    out = tmp_path / "scores.safetensors"
    proc = ledmerge("importance", "--model", tiny_zoo["base"], "--calibration", calib, "--out", out)
    assert_one_error(proc, f"{calib}:2")
    assert_nothing_written(out)


def test_check_config_bad_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tasks: {math: {model: zoo, calibration: {source: zoo}, rate: 0}}\nmerges: {l: {method: linear}}\n")
    proc = ledmerge("check-config", cfg)
    assert_one_error(proc, "tasks.math.rate")


def test_check_config_shipped_configs():
    for name in ("config.yaml", "test.yaml"):
        proc = ledmerge("check-config", REPO / "config" / name)
        assert proc.returncode == 0, proc.stderr
        assert "ok" in proc.stdout


SUBCOMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


def test_subcommands_are_the_workflow_steps():
    assert set(SUBCOMMANDS) >= {"zoo-data", "zoo-base", "zoo-expert", "calibration", "importance", "election", "disjoint",
                                "merge", "evaluation", "report", "check-config"}


@pytest.mark.parametrize("args", [["--help"]] + [[cmd, "--help"] for cmd in SUBCOMMANDS], ids=lambda a: a[0])
def test_help_exits_zero(args):
    proc = (ledmerge_process if args == ["--help"] else ledmerge)(*args)
    assert proc.returncode == 0, proc.stderr
    assert "usage: ledmerge" in proc.stdout


def test_no_subcommand_is_a_usage_error():
    proc = ledmerge_process()
    assert proc.returncode == 2
    assert "usage: ledmerge" in proc.stderr


def test_ctrl_c_is_reported_as_an_interruption(tmp_path, tiny_zoo):
    """SIGINT in the middle of a step: one line saying it was interrupted, exit 130 (128 + SIGINT), no traceback,
    nothing half-written."""
    import signal
    import time

    out, inside = tmp_path / "merged", tmp_path / "inside-the-step"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", "import time, sys, pathlib; from ledmerge.cli import main; "
                             "import ledmerge.merge as d; real = d.merge_models; "
                             f"d.merge_models = lambda *a, **k: (pathlib.Path({str(inside)!r}).touch(), time.sleep(60), "
                             "real(*a, **k)); sys.exit(main(sys.argv[1:]))", *map(str, merge_args(tiny_zoo, out))],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240  # past the imports, inside the step (however loaded the machine is)
    while not inside.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert inside.exists(), "the step never started"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "ledmerge: interrupted: merge stopped" in err and "Traceback" not in err, err[-2000:]
    assert_nothing_written(out)


def test_merge_refuses_an_expert_with_integer_weights(tmp_path, tiny_zoo):
    """A quantized (integer) tensor where the base has floats was merged as if it held weights: now one line,
    before anything is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    quantized = shutil.copytree(tiny_zoo["code"], tmp_path / "int8_code")
    state = load_file(str(quantized / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    state[name] = (state[name] * 100).round().to(torch.int8)
    save_file(state, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "merged"
    assert_one_error(ledmerge(*merge_args(tiny_zoo, out, code=quantized)), name, "integers", "dequantize")
    assert_nothing_written(out)


def test_every_option_has_help_text():
    """Every argument of every step, positional or optional, says in --help what it is."""
    import argparse

    def missing(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from missing(sub, [*prefix, name])
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                yield " ".join([*prefix, "/".join(action.option_strings) or action.dest])

    offenders = list(missing(build_parser(), ["ledmerge"]))
    assert not offenders, f"{len(offenders)} option(s) without help text: {offenders}"
