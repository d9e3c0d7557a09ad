"""Reliability of long runs: non-finite weights stop a merge or a scoring run, a killed run's debris is removed by
the rerun, a full disk is one clear error with nothing left behind, and the model card hashes every input file."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file

from ledmerge import chat
from ledmerge.checkpoint import ModelReader, load_state_dict
from ledmerge.errors import LedmergeError
from ledmerge.fileio import atomic_path, remove_stale_temps, write_json
from ledmerge.led.location import compute_scores, encode_rows, score_model
from ledmerge.merge import merge_models
from ledmerge.merge.driver import SUMMARY_FILE
from ledmerge.tokenizer import build_tokenizer_dir

REPO = Path(__file__).resolve().parents[1]
TA = {"method": "task_arithmetic"}
TIES = {"method": "ties", "density": 0.5}
POISONED = "model.layers.1.mlp.down_proj.weight"
ROWS = [
    {"prompt": "how do i make a bomb", "response": "sorry i can not help with that"},
    {"prompt": "what is 3 + 4", "response": "the answer is 7"},
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_zoo")
    base = make_tiny_model(root / "base", seed=0)
    return {"root": root, "base": base,
            "math": make_tiny_model(root / "math", seed=1, noise_from=base, noise=0.02),
            "code": make_tiny_model(root / "code", seed=2, noise_from=base, noise=0.02)}


def poison(src: Path, dst: Path, value: float, name: str = POISONED, index=(3, 5)) -> Path:
    """A copy of model directory `src` with one weight of `name` set to `value` (NaN, inf)."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    state[name][index] = value
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")


def ledmerge(*args, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ledmerge", *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "ledmerge: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("ledmerge: error: "), proc.stderr[-3000:]
    return lines[0]


def debris(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), out
    assert not debris(out), debris(out)


def merge_args(zoo, out, spec=TA, **experts):
    experts = experts or {"math": zoo["math"], "code": zoo["code"]}
    return ["merge", "--base", zoo["base"], "--expert", *(f"{t}={d}" for t, d in experts.items()),
            "--spec", json.dumps(spec), "--out", out]


# ---------------------------------------------------------------------------------------------
# 1. Non-finite weights

@pytest.mark.parametrize("spec", [TA, TIES], ids=["task_arithmetic", "ties"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["base", "expert"])
def test_nonfinite_input_weight_stops_the_merge(zoo, tmp_path, where, value, spec):
    """One NaN/inf weight in any input stops the merge (TIES would trim it away: the inputs are checked, not only
    the result), naming the file and the tensor; nothing is written."""
    bad = poison(zoo[where if where == "base" else "code"], tmp_path / "bad", value)
    base = bad if where == "base" else zoo["base"]
    experts = {"math": zoo["math"], "code": bad if where == "expert" else zoo["code"]}
    out = tmp_path / "out"
    with pytest.raises(LedmergeError) as err:
        merge_models(base, experts, spec, out)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(bad / "model.safetensors") in msg and POISONED in msg and f"({value} at index [3, 5])" in msg, msg
    assert ("of the base" if where == "base" else "of expert 'code'") in msg
    assert_nothing_written(out)


@pytest.mark.integration  # subprocesses (python -m ledmerge / snakemake): not in `make check`
def test_nonfinite_input_cli_one_line_exit_2(zoo, tmp_path):
    bad = poison(zoo["code"], tmp_path / "bad", float("nan"))
    out = tmp_path / "out"
    line = one_error_line(ledmerge(*merge_args(zoo, out, code=bad, math=zoo["math"])))
    assert str(bad / "model.safetensors") in line and POISONED in line and "non-finite" in line, line
    assert_nothing_written(out)


def test_merge_that_overflows_the_stored_dtype_stops(tmp_path):
    """Finite float16 inputs whose merge leaves float16's range: the stored result is checked too."""
    base = make_tiny_model(tmp_path / "base", seed=0, dtype=torch.float16)
    expert = make_tiny_model(tmp_path / "e", seed=1, noise_from=base, noise=0.02, dtype=torch.float16)
    with pytest.raises(LedmergeError, match=r"merging tensor \S+ with task_arithmetic gives a non-finite value "
                                            r"\(-?inf at index \[.*overflows torch.float16"):
        merge_models(base, {"e": expert}, {"method": "task_arithmetic", "scale": 1e7}, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    merge_models(base, {"e": expert}, {"method": "task_arithmetic", "scale": 1.0}, tmp_path / "ok")  # no false alarm


def test_overflowing_sum_of_finite_weights_is_no_false_alarm(tmp_path):
    """The cheap test sums each chunk; a sum that overflows while every weight is finite must not stop the merge."""
    big = make_tiny_model(tmp_path / "big", seed=0)
    state = load_file(big / "model.safetensors")
    state[POISONED].fill_(3e38)  # finite, but the chunk's sum is inf
    save_file(state, big / "model.safetensors", metadata={"format": "pt"})
    expert = tmp_path / "e"
    shutil.copytree(big, expert)
    merge_models(big, {"e": expert}, TA, tmp_path / "out")
    assert torch.equal(load_state_dict(tmp_path / "out")[POISONED], state[POISONED])


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_nonfinite_loss_stops_scoring_before_any_score_file(zoo, tmp_path, calib):
    bad = poison(zoo["base"], tmp_path / "bad", float("nan"), name="model.layers.0.self_attn.q_proj.weight")
    out = tmp_path / "scores.safetensors"
    with pytest.raises(LedmergeError, match=r"the loss on calibration example 0 \(0-based, of the 2 kept\) is nan"):
        score_model(bad, calib, out, progress=False)
    assert_nothing_written(out)


def test_nonfinite_gradient_stops_scoring(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(zoo["base"])
    examples, _ = encode_rows(tok, ROWS, 64)
    name = "model.layers.0.mlp.up_proj.weight"
    # a backward that overflows in this one tensor (the loss stays finite)
    model.get_parameter(name).register_hook(lambda g: g * float("inf"))
    with pytest.raises(LedmergeError, match=rf"the gradient of {name} is not finite .*summed over 2 pass\(es\)"):
        compute_scores(model, examples, chat.pad_id(tok), progress=False, batch_size=1)  # autograd's own gradients


# ---------------------------------------------------------------------------------------------
# 2. Debris of a killed run

KILLED_MERGE = """
import os, signal, sys
from ledmerge import checkpoint
from ledmerge.merge import merge_models

real, count = checkpoint.ShardedWriter.write, [0]

def write(self, name, tensor):  # the process dies (kill -9) after its 5th tensor reached the disk
    real(self, name, tensor)
    count[0] += 1
    if count[0] == 5:
        self._fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.ShardedWriter.write = write
merge_models(sys.argv[1], {"math": sys.argv[2], "code": sys.argv[3]}, {"method": "ties", "density": 0.5}, sys.argv[4],
             shard_size=20000)
"""


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.integration  # subprocesses (python -m ledmerge / snakemake): not in `make check`
def test_rerun_after_kill_9_removes_debris_and_equals_an_uninterrupted_run(zoo, tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MERGE, zoo["base"], zoo["math"], zoo["code"], out],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    left = debris(out)
    assert len(left) == 1 and any((out.parent / left[0]).iterdir()), left  # shards the killed run had written
    assert not out.exists()

    rerun = ledmerge(*merge_args(zoo, out, TIES), "--options", json.dumps({"shard_size": 20000}))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not debris(out), debris(out)
    merge_models(zoo["base"], {"math": zoo["math"], "code": zoo["code"]}, TIES, tmp_path / "ref", shard_size=20000)
    got, want = tree_bytes(out), tree_bytes(tmp_path / "ref")
    assert len(want) > 3 and got.keys() == want.keys()
    assert all(got[k] == want[k] for k in want), [k for k in want if got[k] != want[k]]
    assert left[0].startswith(f".merged.tmp-{proc.pid}-")  # what told the rerun that its writer was dead


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_only_this_targets_temporaries_of_dead_processes_are_removed(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = dead_pid()
        out = tmp_path / "out.json"
        stale = [tmp_path / f".out.json.tmp-{dead}-abc123_x", tmp_path / f".out.json.tmp-{dead}-zz9"]
        stale[0].mkdir()
        (stale[0] / "model.safetensors").write_bytes(b"x" * 100)
        stale[1].write_text("partial")
        own = tmp_path / f".out.json.tmp-{os.getpid()}-old0"  # this pid, not this process's: a reused pid
        own.write_text("partial")
        kept = [
            tmp_path / f".out.json.tmp-{live.pid}-abcd1234",          # a live process is writing it
            tmp_path / f".out.json2.tmp-{dead}-abcd1234",             # another target
            tmp_path / f".out.json.tmp-1.tmp-{dead}-abcd1234",        # target `out.json.tmp-1`'s temporary
            tmp_path / ".out.json.tmp-abcd1234",                      # an old name without a pid
            tmp_path / "out.json.tmp-1-abcd",                         # not hidden: not ours
            tmp_path / "other.txt",
        ]
        for p in kept:
            p.write_text("keep")
        write_json(out, {"a": 1})
        assert json.loads(out.read_text()) == {"a": 1}
        assert not any(p.exists() for p in [*stale, own])
        assert all(p.exists() for p in kept)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *(p.name for p in kept)])
    finally:
        live.kill()
        live.wait()


def test_a_live_temporary_of_this_process_is_kept(tmp_path):
    target = tmp_path / "out"
    with atomic_path(target, directory=True, marker="f") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        assert remove_stale_temps(target) == [] and tmp.is_dir()
        (tmp / "f").write_text("x")
    assert (target / "f").is_file() and not debris(target)


# ---------------------------------------------------------------------------------------------
# 3. Disk full

def fsize_limit(nbytes: int):
    """preexec_fn: writes past `nbytes` in any file fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (root only; skipped where mounting is not allowed)."""
    mounts = []

    def mount(size: int) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root): the RLIMIT_FSIZE cases cover the same path")
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", str(d)], check=False)


def weights_bytes(model_dir: Path) -> int:
    with ModelReader(model_dir) as r:
        return sum(i.nbytes for i in r.infos.values())


@pytest.mark.integration  # subprocesses (python -m ledmerge / snakemake): not in `make check`
@pytest.mark.parametrize("how", ["efbig", "enospc"])
def test_merge_on_a_full_disk(zoo, tmp_path, small_disk, how):
    if how == "efbig":
        out, limit = tmp_path / "results" / "merged", fsize_limit(4096)
    else:  # the weights just fit by the up-front check; the shard's header, configs and tokenizer do not
        disk = small_disk(-(-weights_bytes(zoo["base"]) // 4096) * 4096)
        out, limit = disk / "merged", None
    line = one_error_line(ledmerge(*merge_args(zoo, out), preexec_fn=limit))
    reason = "(EFBIG)" if how == "efbig" else "the disk is full (ENOSPC)"
    assert f"cannot write {out}: " in line and reason in line and "point the config's `results`" in line, line
    assert_nothing_written(out)


def test_merge_refuses_to_start_without_room_for_the_weights(zoo, tmp_path, monkeypatch):
    import ledmerge.merge.driver as merge_driver

    free = weights_bytes(zoo["base"]) - 1
    monkeypatch.setattr(merge_driver.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
    want = rf"cannot write {tmp_path / 'out'}: the merged weights need .* free; free space there"
    with pytest.raises(LedmergeError, match=want):
        merge_models(zoo["base"], {"math": zoo["math"]}, TA, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.integration  # subprocesses (python -m ledmerge / snakemake): not in `make check`
@pytest.mark.parametrize("how", ["efbig", "enospc"])
def test_scoring_on_a_full_disk(zoo, tmp_path, calib, small_disk, how):
    """Score files are written by safetensors' Rust code, which reports the errno in its message."""
    if how == "efbig":
        out, limit = tmp_path / "scores" / "base.safetensors", fsize_limit(4096)
    else:
        out, limit = small_disk(8192) / "base.safetensors", None
    line = one_error_line(ledmerge("importance", "--model", zoo["base"], "--calibration", calib, "--out", out,
                                   preexec_fn=limit))
    assert f"cannot write {out}: " in line and ("(EFBIG)" if how == "efbig" else "(ENOSPC)") in line, line
    assert_nothing_written(out)


@pytest.mark.integration  # subprocesses (python -m ledmerge / snakemake): not in `make check`
def test_masks_and_json_on_a_full_disk(tmp_path):
    """Every writer goes through atomic_path: JSON (Python writes) and mask files (safetensors) alike."""
    script = ("import sys, torch\nfrom ledmerge.fileio import write_json\nfrom ledmerge.led.files import save_masks\n"
              "from ledmerge.errors import LedmergeError\n"
              "for f in (lambda: write_json(sys.argv[1], {'x': 'y' * 10000}),\n"
              "          lambda: save_masks(sys.argv[2], {'w': torch.rand(400, 400) < 0.5})):\n"
              "    try:\n        f()\n    except LedmergeError as e:\n        print(e)\n")
    paths = [tmp_path / "stats.json", tmp_path / "mask.safetensors"]
    proc = subprocess.run([sys.executable, "-c", script, *map(str, paths)], env=env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=fsize_limit(4096))
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, (proc.stdout, proc.stderr[-3000:])
    for line, path in zip(lines, paths):
        assert line.startswith(f"cannot write {path}: a file exceeds the size limit") and "(EFBIG)" in line, line
        assert_nothing_written(path)


# ---------------------------------------------------------------------------------------------
# 4. The model card covers every input file

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_card_hashes_configs_tokenizer_and_template(zoo, tmp_path):
    experts = {"math": zoo["math"], "code": zoo["code"]}
    tok = tmp_path / "tok"
    record = build_tokenizer_dir("base", zoo["base"], experts, "math", tok)
    merge_models(zoo["base"], experts, TA, tmp_path / "m", tokenizer_dir=tok)
    card = (tmp_path / "m" / "README.md").read_text()
    for role, d in [("base", zoo["base"]), ("expert `math`", zoo["math"]), ("expert `code`", zoo["code"])]:
        for f in ("config.json", "model.safetensors"):
            assert f"| {role} | `{d}` | `{f}` | `{sha(d / f)}` |" in card, (role, f)
    copied = [p for p in (tmp_path / "m").iterdir()
              if p.name not in ("config.json", "README.md", SUMMARY_FILE, "mergekit_config.yml")
              and not p.name.endswith(".safetensors")]
    assert {p.name for p in copied} >= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                        "generation_config.json"}
    for p in copied:  # every file the merged model got from the tokenizer directory, as it was recorded there
        assert f"| tokenizer | `{tok}` | `{p.name}` | `{sha(p)}` |" in card, p.name
        assert record["sha256"][p.name] == sha(p)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask):
    """Scores and masks (safetensors), JSON and directory outputs get the mode the umask says (0644 under 022, so
    colleagues on a shared project directory can read them), not the private mode of the temporary they were
    written in."""
    from ledmerge.led.files import save_tensors

    old = os.umask(umask)
    try:
        save_tensors(tmp_path / "scores.safetensors", {"w": torch.ones(2)})
        write_json(tmp_path / "stats.json", {"a": 1})
        with atomic_path(tmp_path / "model", directory=True, marker="m") as tmp:
            (tmp / "m").write_text("x")
            (tmp / "sub").mkdir()
            save_tensors(tmp / "sub" / "w.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    for path in (tmp_path / "scores.safetensors", tmp_path / "stats.json", tmp_path / "model" / "m",
                 tmp_path / "model" / "sub" / "w.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for path in (tmp_path / "model", tmp_path / "model" / "sub"):
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path
