"""A private single-node SLURM cluster on this machine, for tests (Debian's slurmctld, slurmd, munge).

Everything lives in one temporary directory: a munge key and socket, slurm.conf and gres.conf, state,
spool and logs. The daemons run in the foreground as children of the test process on free ports, so
nothing system-wide is touched and `stop()` ends exactly what `start()` began. Commands find the cluster
through SLURM_CONF, which sbatch exports to the batch script (`--export=ALL`). Snakemake's jobstep
plugin, though, runs the job's `srun` with every SLURM_* variable but a few removed, SLURM_CONF
included (a real cluster's srun reads /etc/slurm/slurm.conf). So `env` also puts first on PATH an
`srun` wrapper that sets SLURM_CONF and calls the real one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun", "scontrol")


def missing_tools() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One node (this host) with `cpus` CPUs, `memory_mb` of memory and `gpus` generic resources `gpu`, in
    partition `debug`. The node is taken to have what it is configured with (SlurmdParameters=config_overrides)
    and memory is not a consumable (CR_Core), so jobs asking for more memory than this machine has still run."""

    partition = "debug"

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 256000, gpus: int = 1):
        self.root = Path(root)
        self.cpus, self.memory_mb, self.gpus = cpus, memory_mb, gpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict:
        """The environment of every SLURM command (and, through sbatch, of every job)."""
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=f"{self.root / 'bin'}{os.pathsep}{os.environ['PATH']}")

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        (r / "bin").mkdir(exist_ok=True)
        srun = r / "bin" / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {_tool("srun")} "$@"\n')
        srun.chmod(0o755)
        self.munge_socket = r / "munge" / "munge.socket"
        ctld_port, slurmd_port = _free_port(), _free_port()
        self.conf.write_text(f"""\
ClusterName=ledmerge-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
SchedulerParameters=sched_interval=1
MpiDefault=none
LaunchParameters=use_interactive_step
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # Slurm drops a file-less gpu GRES, so the "GPUs" are character devices (one file per GPU, as Slurm
        # wants): schedulable, never opened.
        if self.gpus > len(FAKE_GPU_FILES):
            raise ValueError(f"at most {len(FAKE_GPU_FILES)} pretend GPUs")
        (r / "gres.conf").write_text("".join(f"NodeName={self.node} Name=gpu File={f}\n"
                                             for f in FAKE_GPU_FILES[:self.gpus]))

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen([_tool(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._write_config()
        key = self.root / "munge" / "munge.key"
        subprocess.run([_tool("mungekey"), "--create", f"--keyfile={key}"], check=True, timeout=30,
                       capture_output=True)
        os.chmod(key, 0o600)
        self._spawn("munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                    f"--log-file={self.root}/log/munged.log", f"--pid-file={self.root}/munge/munged.pid",
                    f"--seed-file={self.root}/munge/munged.seed")
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", "-D", "-c", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.node)
        self._wait(self._node_idle, timeout, "the node did not become idle")
        return self

    def _node_idle(self) -> bool:
        proc = subprocess.run([_tool("sinfo"), "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                              text=True, timeout=10)
        return proc.returncode == 0 and proc.stdout.strip().startswith("idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited early:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted((self.root / "log").glob("*")) if p.is_file())

    def stop(self) -> None:
        """Cancel every job, then end the daemons this object started (slurmd first, munged last)."""
        if self.procs:
            subprocess.run([_tool("scancel"), "--user", str(os.getuid())] if shutil.which("scancel") else ["true"],
                           env=self.env, capture_output=True, timeout=30)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
