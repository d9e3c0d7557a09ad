"""The default workflow's wall time with and without the warm worker, and what start-up costs.

    .venv/bin/python bench/workflow_bench.py            # ~10 min on 2 cores: two full default runs
    .venv/bin/python bench/workflow_bench.py --configfile config/test.yaml

Each variant runs `snakemake --cores N` on the config in a fresh directory (`LEDMERGE_WORKER=off`: every job a
fresh `python -m ledmerge` process, as before the worker; then with the worker). Printed per variant: wall time,
CPU time of the whole process tree, the number of jobs, and the sha256 of every merged model.safetensors and of
summary.csv, which must agree between the variants. The start-up share is measured apart: the CPU time of
`python -c "import ledmerge.cli, torch, transformers, lm_eval.evaluator, lm_eval.models.huggingface"`, the
imports every evaluation job pays in a fresh process.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = "import ledmerge.cli, torch, transformers, lm_eval.evaluator, lm_eval.models.huggingface"


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], env: dict, cwd: Path | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall and CPU seconds of `cmd` and everything it started (children are waited for, so RUSAGE_CHILDREN counts
    them)."""
    cpu0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - t0, children_cpu() - cpu0, proc


def digests(results: Path) -> dict[str, str]:
    files = sorted(results.glob("merged/*/*.safetensors")) + [results / "report" / "summary.csv"]
    return {str(f.relative_to(results)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configfile", default="config/config.yaml")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    args = p.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    wall, cpu, _ = run([sys.executable, "-c", IMPORTS], env)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"imports of one evaluation job in a fresh process: {cpu:.1f} s CPU ({wall:.1f} s wall)\n")

    rows, hashes = [], {}
    for name, worker in (("fresh process per job", "off"), ("warm worker", None)):
        workdir = Path(tempfile.mkdtemp(prefix="ledmerge-wfbench-"))
        run_env = {k: v for k, v in env.items() if k != "LEDMERGE_WORKER"}
        if worker:
            run_env["LEDMERGE_WORKER"] = worker
        cmd = [sys.executable, "-m", "snakemake", "--cores", str(args.cores), "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(REPO / args.configfile)]
        wall, cpu, proc = run(cmd, run_env, cwd=REPO)
        if proc.returncode != 0:
            print(proc.stderr[-4000:])
            raise SystemExit(f"{name}: snakemake failed ({proc.returncode}); run dir {workdir}")
        jobs = proc.stderr.count("Finished jobid")
        results = workdir / "results"
        hashes[name] = digests(results)
        rows.append((name, wall, cpu, jobs))
        print(f"{name}: {wall:.0f} s wall, {cpu:.0f} s CPU, {jobs} jobs", flush=True)
        if not args.keep:
            shutil.rmtree(workdir)
    (a, ha), (b, hb) = hashes.items()
    same = ha == hb and len(ha) > 1
    print("\n| variant | wall (s) | CPU (s) | jobs |\n|---|---|---|---|")
    for name, wall, cpu, jobs in rows:
        print(f"| {name} | {wall:.0f} | {cpu:.0f} | {jobs} |")
    cut = 1 - rows[1][1] / rows[0][1]
    print(f"\nwall time cut by the worker: {100 * cut:.0f}%; outputs ({len(ha)} files) "
          f"{'identical' if same else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
