"""portable_numerics: the toy zoo and a merge built on two simulated CPUs give the same sha256 with the pins
(ledmerge.portable) and different ones without.

Two machines are simulated on one: the second asks torch for its AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, the
level of the AMD EPYC of the issue) and MKL for its AVX2 code (MKL_ENABLE_INSTRUCTIONS=AVX2, which the pins leave
alone: MKL's CNR branch is what makes it irrelevant), the first runs with the CPU's own choice. Each machine runs the
zoo's steps (zoo-data, zoo-base, two experts) and a TIES merge of them in one process, with the CLI the workflow
calls, at sizes smaller than config/test.yaml's; the pinned runs get the environment the workflow sets
(`portable.environment`, as workflow/rules/common.smk applies it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import REPO, env

from ledmerge.portable import PINS, environment

ZOO = {"hidden_size": 16, "intermediate_size": 32, "layers": 1, "heads": 2, "pretrain_steps": 40,
       "finetune_steps": 20, "batch_size": 8, "pretrain_size": 300, "train_size": 80, "calib_pool_size": 8,
       "eval_size": 4}
TASKS = ("safety", "math")
OTHER_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

# One process per machine: the steps as the workflow runs them (`ledmerge <step>`), one torch import.
DRIVER = """
import hashlib, json, sys
from pathlib import Path
from ledmerge.cli import main
from ledmerge.portable import in_effect
out, zoo, tasks = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
def run(*args):
    code = main(["--threads", "1", *args])
    assert code in (0, None), (args, code)
run("zoo-data", "--out-dir", str(out / "data"), "--tokenizer", str(out / "tokenizer"), "--options", zoo, "--seed", "0")
run("zoo-base", "--data-dir", str(out / "data"), "--tokenizer", str(out / "tokenizer"), "--out", str(out / "base"),
    "--options", zoo, "--seed", "0")
for i, t in enumerate(tasks):
    run("zoo-expert", "--task", t, "--base", str(out / "base"), "--train", str(out / "data" / f"{t}_train.jsonl"),
        "--out", str(out / t), "--options", zoo, "--seed", str(1 + i))
run("merge", "--base", str(out / "base"), "--expert", *[f"{t}={out / t}" for t in tasks],
    "--spec", '{"method": "ties", "density": 0.5}', "--out", str(out / "ties"))
sha = {d: hashlib.sha256((out / d / "model.safetensors").read_bytes()).hexdigest() for d in ["base", *tasks, "ties"]}
print("RESULT " + json.dumps({"sha256": sha, "numerics": in_effect()}))
"""


def build(out: Path, machine: dict, pinned: bool) -> dict:
    """Run the driver in a fresh process on a simulated machine; {"sha256": {model: digest}, "numerics": ...}."""
    run_env = {k: v for k, v in env().items() if k not in PINS}  # the test's own shell must not decide
    run_env.update(machine)
    run_env.update(environment({"portable_numerics": pinned}))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(out), json.dumps(ZOO), ",".join(TASKS)], cwd=REPO,
                          env=run_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.integration
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="simulates an AVX2 machine on an AVX2 or AVX-512 x86-64 CPU")
def test_zoo_and_merge_bits_do_not_depend_on_the_cpu(tmp_path):
    runs = {(pinned, name): (tmp_path / f"{'pinned' if pinned else 'free'}-{name}", machine)
            for pinned in (True, False) for name, machine in (("own", {}), ("other", OTHER_MACHINE))}
    with ThreadPoolExecutor(2) as pool:  # two processes at a time, one torch thread each
        results = dict(zip(runs, pool.map(lambda key: build(runs[key][0], runs[key][1], key[0]), runs)))
    pinned_own, pinned_other = results[True, "own"], results[True, "other"]
    free_own, free_other = results[False, "own"], results[False, "other"]
    # the simulation took: unpinned, the two machines computed with different torch kernels
    assert free_other["numerics"]["cpu_capability"] == "AVX2"
    assert pinned_own["numerics"]["cpu_capability"] == pinned_other["numerics"]["cpu_capability"] == "DEFAULT"
    assert pinned_own["sha256"] == pinned_other["sha256"]  # with the pins: the same bits, model by model
    differ = [m for m in free_own["sha256"] if free_own["sha256"][m] != free_other["sha256"][m]]
    if torch.backends.cpu.get_cpu_capability() == "AVX512":  # on an AVX2 CPU only MKL's choice differs
        assert differ == list(free_own["sha256"]), differ  # without them: every model differs
    else:
        assert differ, "the two simulated machines gave the same bits unpinned: the test simulates nothing"


def test_pins_name_values_every_x86_64_cpu_has():
    """The pins choose each library's portable level, never one an older CPU lacks (which would crash it)."""
    assert environment({"portable_numerics": False}) == {}
    pins = environment({"portable_numerics": True})
    assert pins["ATEN_CPU_CAPABILITY"] == "default" and pins["MKL_CBWR"] == "COMPATIBLE"
    assert set(pins) == set(PINS)


def test_the_warm_worker_never_serves_a_job_with_other_pins():
    """The worker imported torch with its own pins: a job whose environment names other values (or none) must run
    in a fresh process (worker._fallback_reason compares these variables)."""
    from ledmerge.worker import _import_time_env

    for name in [*PINS, "MKL_ENABLE_INSTRUCTIONS"]:
        assert _import_time_env({name: "x", "HOME": "/"}) == {name: "x"}, name
    # the thread counts Snakemake sets per job are not among them: the steps set torch's threads themselves
    threads = {f"{lib}_NUM_THREADS": "1" for lib in ("OMP", "MKL", "OPENBLAS", "VECLIB_MAXIMUM", "NUMEXPR")}
    assert _import_time_env(threads) == {}
