"""The warm worker (src/ledmerge/worker.py): a step run through it behaves as in a fresh process (output, exit
status, one-line errors), falls back to a fresh process when it must, and a cancelled job's child is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


worker_pids: dict[str, int] = {}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("worker") / "w.sock")
    log = open(Path(sock).with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "ledmerge.worker", sock], stdout=log, stderr=log,
                            start_new_session=True)
    for _ in range(600):
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    worker_pids[sock] = proc.pid
    yield sock
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def ledmerge(*args, env_extra=None, **kw):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ledmerge", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def test_step_through_the_worker_equals_a_fresh_process(worker, tmp_path):
    cfg = str(REPO / "config" / "config.yaml")
    fresh = ledmerge("check-config", cfg, env_extra={"LEDMERGE_WORKER": ""})
    warm = ledmerge("check-config", cfg, env_extra={"LEDMERGE_WORKER": worker})
    assert (warm.returncode, warm.stdout) == (fresh.returncode, fresh.stdout) == (0, fresh.stdout)
    bad = ledmerge("check-config", str(tmp_path / "missing.yaml"), env_extra={"LEDMERGE_WORKER": worker})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.yaml" in bad.stderr
    # The child runs in the client's working directory (the worker's is the repository): a relative path works.
    (tmp_path / "c.yaml").write_text(Path(cfg).read_text())
    rel = subprocess.run([sys.executable, "-m", "ledmerge", "check-config", "c.yaml"], cwd=tmp_path,
                         env={**os.environ, "LEDMERGE_WORKER": worker}, capture_output=True, text=True, timeout=600)
    assert rel.returncode == 0 and "c.yaml: ok" in rel.stdout, rel.stderr


def test_import_time_environment_change_falls_back(worker):
    out = ledmerge("check-config", str(REPO / "config" / "config.yaml"),
                   env_extra={"LEDMERGE_WORKER": worker, "HF_HUB_OFFLINE": "0" if os.environ.get("HF_HUB_OFFLINE") == "1"
                              else "1"})
    assert out.returncode == 0 and "ok" in out.stdout
    assert "check-config runs in a fresh process: import-time environment differs" in \
        Path(worker).with_suffix(".log").read_text()


def test_no_worker_socket_runs_in_a_fresh_process(tmp_path):
    out = ledmerge("check-config", str(REPO / "config" / "config.yaml"),
                   env_extra={"LEDMERGE_WORKER": str(tmp_path / "none.sock")})
    assert out.returncode == 0 and "ok" in out.stdout


def test_killed_client_kills_its_child(worker, tmp_path):
    """A job cancelled by Snakemake (SIGTERM to the client) must not leave its step running in the worker."""
    env = {**os.environ, "LEDMERGE_WORKER": worker}
    fifo = tmp_path / "config.yaml"  # reading a FIFO nobody writes to blocks: the step runs until killed
    os.mkfifo(fifo)
    client = subprocess.Popen([sys.executable, "-m", "ledmerge", "check-config", str(fifo)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3000):  # the worker may still be importing: the job waits in its backlog
        children = _worker_children(worker)
        if children:
            break
        time.sleep(0.1)
    client.send_signal(signal.SIGTERM)
    client.wait(timeout=30)
    for _ in range(100):
        if not (set(_worker_children(worker)) & set(children)):
            break
        time.sleep(0.1)
    assert children and not (set(_worker_children(worker)) & set(children)), children


def _worker_children(sock: str) -> list[int]:
    """Pids of the processes forked by the worker listening on `sock`."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == worker_pids[sock]:
            children.append(int(stat.parent.name))
    return children
