"""The workflow through `snakemake --profile slurm` on a real, private, single-node SLURM cluster.

The cluster (tests/slurm_cluster.py) is started from Debian's slurmctld, slurmd, slurm-client and munge
packages, which `.ci/run` installs when it runs as root; without them, or without root (the daemons need
it), the test is skipped. The test configuration runs with a copy of the repository's profile whose
placeholders point at the test cluster, with importance and evaluation jobs asking for one of the cluster's
two (pretend) GPUs (two, so that two such jobs run at once on its two CPUs). Every job must have been a
SLURM job that completed, and the outputs must equal those of a local run of the same configuration.

The local run is the session's `workflow_run` (tests/conftest.py; tests/test_workflow.py checks it), so the
test workflow runs once, not twice: the SLURM run starts from a copy of its outputs up to the elections of all tasks
but one (`CLUSTER_TASK`) and its calibration data, file times kept, so Snakemake finds them up to date. On the
cluster run that task's base and expert scoring, its election, the disjoint masks, the LED merge and its
evaluation: every rule kind from scoring to evaluation, in 6 jobs; the report and paper are local rules and run
beside Snakemake. The summary rows and merged weights must equal the local run's.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, env, job_stats, sha256, snakemake, snakemake_command, test_config, write_config
from slurm_cluster import SlurmCluster, missing_tools
from test_workflow import TASKS

from ledmerge.layout import Layout

MISSING = missing_tools()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM/munge not installed (missing {', '.join(MISSING)}): "
                                              "apt-get install slurmctld slurmd slurm-client munge (.ci/run does, as root)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starting slurmctld/slurmd needs root"),
]
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.")


def test_profile(path: Path, cluster: SlurmCluster) -> Path:
    """slurm/config.yaml with its placeholders filled for the test cluster (no accounts) and fast polling."""
    profile = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    profile["default-resources"].pop("slurm_account")
    profile["default-resources"]["slurm_partition"] = cluster.partition
    for resources in profile["set-resources"].values():
        resources["slurm_partition"] = cluster.partition
    # The plugin checks 5 s after a submission, then backs off by 10 s more each time nothing finished (5, 20, 45 s):
    # most of these jobs take 8-25 s, so 5 wastes less waiting than 1 (1, 12, 33 s).
    profile.update({"slurm-keep-successful-logs": True, "slurm-init-seconds-before-status-checks": 5,
                    "seconds-between-status-checks": 2, "latency-wait": 10, "retries": 0, "keep-going": False})
    path.mkdir()
    write_config(path / "config.yaml", profile)
    return path


test_profile.__test__ = False  # a helper, not a test


# The merge run on SLURM (of config/test.yaml's): LED, the one that reads every rule's outputs.
SLURM_MERGES = ["led"]
# The task whose scoring and election run on the cluster; the others' come from the local run.
CLUSTER_TASK = "code"
CLUSTER_JOBS = {"importance": 2, "election": 1, "disjoint": 1, "merge": len(SLURM_MERGES),
                "evaluation": len(SLURM_MERGES)}
LOCAL_JOBS = {"report": 1, "paper": 1, "all": 1}  # the workflow's local rules


def seed_results(reference: Path, results: Path) -> None:
    """Copy what the SLURM run does not redo from the reference run into `results`, file times kept (copy2, and
    copytree keeps the directories'), so the outputs are as old, relative to each other, as Snakemake wrote them:
    the zoo, the tokenizer, the calibration data, the evaluations of the base and experts, and every task's scores
    and elected mask but CLUSTER_TASK's, each with its job's benchmark record."""
    kept = [reference / p for p in ("zoo", "tokenizer", "calibration", "eval/base", *(f"eval/{t}" for t in TASKS))]
    for task in TASKS:
        if task != CLUSTER_TASK:
            kept += [reference / "importance" / task, reference / "masks" / "elected" / f"{task}.safetensors"]
    # and those jobs' benchmark records, which the report reads (without them, Snakemake would run the jobs again)
    bench = Layout({"results": str(reference)})
    kept += [Path(bench.benchmark(r)).parent for r in ("zoo_data", "zoo_base", "zoo_expert", "tokenizer", "calibration")]
    kept += [Path(bench.benchmark("evaluation", m)) for m in ("base", *TASKS)]
    for task in TASKS:
        if task != CLUSTER_TASK:
            kept += [Path(bench.benchmark("election", task))]
            kept += [Path(bench.benchmark("importance", task, role)) for role in ("base", "expert")]
    for source in kept:
        target = results / source.relative_to(reference)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, copy_function=shutil.copy2)
        else:
            shutil.copy2(source, target)


def outputs(results: Path, models: list[str]) -> dict:
    """What must agree between runs: the summary rows of `models` and the merged weights."""
    with open(results / "report" / "summary.csv") as fh:
        summary = {row["model"]: row for row in csv.DictReader(fh) if row["model"] in models}
    return {"summary": summary,
            **{m: sha256(results / "merged" / m / "model.safetensors") for m in models if m in SLURM_MERGES}}


class SlurmRun:
    """The SLURM run of the test configuration, started in the background from the reference run's outputs, so that
    the other tests of its xdist worker run while the cluster works: `workflow_run` (tests/conftest.py) starts it as
    soon as the local run exists, when this test is selected; the test waits for it (`finish`)."""

    def __init__(self, reference: Path, root: Path):
        # Same result-changing settings as the local run (config/test.yaml); only where the jobs run, what they ask
        # for and which merges are made differ. The data-aware and sweep jobs add nothing SLURM-specific: off.
        self.reference, self.root, self.workdir = reference, root, root / "slurm"
        self.workdir.mkdir(parents=True)
        merges = test_config(self.workdir / "results")["merges"]
        cfg = test_config(self.workdir / "results", data_aware__enabled=False, sweeps={},
                          merges={m: merges[m] for m in SLURM_MERGES}, resources={
            "importance": {"gpu": 1, "mem_mb": 8000, "runtime": "20m"},
            "evaluation": {"gpu": 1, "mem_mb": 8000, "runtime": "1h"}})
        self.configfile = write_config(root / "slurm.yaml", cfg)
        seed_results(reference, self.workdir / "results")
        self.cluster = SlurmCluster(root / "cluster", cpus=2, gpus=2).__enter__()
        self.profile = test_profile(root / "profile", self.cluster)
        self.out, self.err = root / "snakemake.out", root / "snakemake.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(snakemake_command(self.workdir, self.configfile, "--profile", str(self.profile)),
                                         cwd=REPO, env={**env(), **self.cluster.env}, stdout=out, stderr=err, text=True)

    def finish(self, timeout: int = 1200) -> tuple[int, str, str]:
        """Wait for the run: (exit code, stdout, stderr). The cluster stays up until `close`."""
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.out.read_text(), self.err.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.cluster.stop()


def start_slurm_run(reference: Path, root: Path) -> SlurmRun | None:
    """The background SLURM run, or None where the cluster cannot start (the test is skipped there)."""
    return None if MISSING or os.geteuid() != 0 else SlurmRun(reference, root)


def test_workflow_runs_on_a_slurm_cluster(workflow_run, tmp_path):
    run = workflow_run.slurm or SlurmRun(workflow_run.results, tmp_path)  # started already, unless run alone
    try:
        code, stdout, stderr = run.finish()
        assert code == 0, f"{stderr[-6000:]}\n{run.cluster.logs()}"
        # Resuming: the same command again finds nothing to do.
        again = snakemake(run.workdir, run.configfile, "--profile", str(run.profile), "-n",
                              extra_env=run.cluster.env, timeout=300)
        assert again.returncode == 0 and not job_stats(again.stdout), again.stdout[-3000:]
        ctld_log = (run.cluster.root / "log" / "slurmctld.log").read_text()
        log = stdout + stderr
        submitted = SUBMITTED.findall(log)
        jobs = {slurm_id: subprocess.run(["scontrol", "-o", "show", "job", slurm_id], env=run.cluster.env,
                                         capture_output=True, text=True, timeout=30).stdout
                for _, slurm_id, _ in submitted}
        killed = kill_a_running_merge_and_rerun(run)
    finally:
        run.close()

    stats = job_stats(log)
    assert stats == {**CLUSTER_JOBS, **LOCAL_JOBS}, stats  # the copied outputs are up to date: none of them reruns
    expected = sum(CLUSTER_JOBS.values())
    assert len(submitted) == expected, (stats, len(submitted))
    assert len({slurm_id for _, slurm_id, _ in submitted}) == expected
    for _, slurm_id, logfile in submitted:
        assert re.search(rf"_job_complete: JobId={slurm_id} WEXITSTATUS 0", ctld_log), slurm_id
        assert Path(logfile).is_file(), logfile
        wants_gpu = "/rule_importance/" in logfile or "/rule_evaluation/" in logfile
        assert bool(re.search(r"TresPerJob=gres:gpu:1\b", jobs[slurm_id])) == wants_gpu, (logfile, jobs[slurm_id])

    assert killed["state"] == "RUNNING" and killed["first_exit"] != 0 and killed["rerun_exit"] == 0, killed["log"]
    assert killed["debris"] == [], killed["debris"]
    models = ["base", *TASKS, *SLURM_MERGES]
    slurm, local = outputs(run.workdir / "results", models), outputs(workflow_run.results, models)
    assert sorted(slurm["summary"]) == sorted(models), slurm["summary"]
    assert slurm == local  # after the killed merge and the rerun too: bit-identical merged weights


def kill_a_running_merge_and_rerun(run: SlurmRun) -> dict:
    """A fault on the cluster: with the LED merge's output and what reads it removed, rerun the workflow, `scancel`
    the merge job while it runs, let that run fail, then rerun the same command. Returns what happened: the job's
    state when it was cancelled, both exit codes, and any temporary the killed job left that the rerun did not
    remove."""
    results = run.workdir / "results"
    for done in (f"merged/{SLURM_MERGES[0]}", f"eval/{SLURM_MERGES[0]}", "report"):  # the merge and what reads it
        shutil.rmtree(results / done)
    log = run.root / "fault.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(snakemake_command(run.workdir, run.configfile, "--profile", str(run.profile)),
                                cwd=REPO, env={**env(), **run.cluster.env}, stdout=out, stderr=subprocess.STDOUT,
                                text=True)
    state, deadline = None, time.time() + 300
    try:
        while state != "RUNNING" and time.time() < deadline and proc.poll() is None:
            merge = [jobid for _, jobid, path in SUBMITTED.findall(log.read_text()) if "/rule_merge/" in path]
            if merge:
                state = subprocess.run(["squeue", "-h", "-j", merge[0], "-o", "%T"], env=run.cluster.env,
                                       capture_output=True, text=True, timeout=30).stdout.strip()
                if state == "RUNNING":
                    subprocess.run(["scancel", merge[0]], env=run.cluster.env, check=True, timeout=30)
            time.sleep(0.2)
        first_exit = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rerun = snakemake(run.workdir, run.configfile, "--profile", str(run.profile), extra_env=run.cluster.env,
                      timeout=900)
    debris = sorted(str(p.relative_to(results)) for p in results.rglob(".*.tmp-*"))
    return {"state": state, "first_exit": first_exit, "rerun_exit": rerun.returncode, "debris": debris,
            "log": log.read_text()[-3000:] + rerun.stderr[-3000:]}
