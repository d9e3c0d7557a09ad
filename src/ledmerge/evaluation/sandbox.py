"""Run model-written code against its tests in a separate, resource-limited, isolated Python process.

Generated code is never executed in the evaluating process: a bad sample could loop forever, eat all memory,
delete files or corrupt interpreter state. Each check runs in a fresh `python -I -S` (isolated: no environment
variables, user site or site-packages) with rlimits on address space, CPU time, file size and core dumps, and a
wall-clock timeout that kills the child's whole process group. On a cluster that code runs next to the user's
checkpoints and credentials, so where the OS allows it (Linux with user namespaces and util-linux's `unshare`, the
default on current distributions) it also runs contained:

- in new user, mount, network and pid namespaces: no network (not even loopback), and when the timeout kills the
  namespace's first process every process in it dies;
- every mount read-only, the working directory a fresh 16 MiB tmpfs (writes go nowhere else, and cannot fill a
  disk), the user's home directory (and /home, /root) hidden under empty tmpfs;
- no new processes: RLIMIT_NPROC 0 for an ordinary user; for root, which that limit does not bind, a pids
  cgroup of at most PIDS_MAX processes where the cgroup file system is writable.

Where namespaces are not available the check still runs, with the rlimits, the throwaway directory and the
timeout only, and a warning says once per process what is not contained (docs/bad-input.md). This is containment
for the mistakes of a language model, not a security boundary against an adversary: for untrusted models use a
container or a VM as well.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
WORK_MB = 16  # size of the tmpfs the code runs in
PIDS_MAX = 8  # processes a root-run check may have at once (the namespace's first process and the interpreter)

# Run by the sandboxed interpreter itself, inside the namespaces, before the program (one process: no shell, no mount
# binaries): every mount read-only (sysfs and cgroups too: a user namespace of root is root to their files), a tmpfs
# as the working directory, the homes hidden under empty tmpfs with the interpreter's installation bound back at its
# own path when it lies in one, no new processes, then the program in a fresh namespace.
_SETUP = r"""
import ctypes, os, resource
libc = ctypes.CDLL(None, use_errno=True)
RDONLY, REMOUNT, BIND, REC = 1, 32, 4096, 16384
KEEP = {2: 2, 4: 4, 8: 8, 1024: 1024, 2048: 2048, 4096: 1 << 21}  # statvfs flag -> mount flag a remount must keep
def mount(src, target, fstype, flags, data=None):
    if libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                  data.encode() if data else None):
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), target)
def readonly(target):
    flags = os.statvfs(target).f_flag
    mount("none", target, None, REMOUNT | BIND | RDONLY | sum(v for k, v in KEEP.items() if flags & k))
env = os.environ
cwd, prefix, hide = env["SBX_CWD"], env["SBX_PREFIX"], env["SBX_HIDE"].split()
for target in sorted({line.split()[1].replace("\\040", " ") for line in open("/proc/self/mounts")}):
    try:
        readonly(target)
    except OSError:
        pass
mount("ledmerge-sandbox", cwd, "tmpfs", 0, "size=%sm,mode=0700" % env["SBX_MB"])
stash = None
if any(prefix == h or prefix.startswith(h.rstrip("/") + "/") for h in hide):
    stash = cwd + "/.python"
    os.mkdir(stash)
    mount(prefix, stash, None, BIND | REC)
for h in hide:
    mount("ledmerge-hidden", h, "tmpfs", 0, "size=64k,mode=0755")
    if stash and prefix.startswith(h.rstrip("/") + "/"):
        os.makedirs(prefix)
        mount(stash, prefix, None, BIND | REC)
        readonly(prefix)
    readonly(h)
os.chdir(cwd)
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
program = env["SBX_PROGRAM"]
for key in [k for k in env if k.startswith("SBX_")]:
    del env[key]
del ctypes, libc, mount, readonly, resource
exec(compile(program, "<generated>", "exec"), {"__name__": "__main__"})
"""


IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def build_program(code: str, tests: list[str], entry_point: str | None = None) -> str:
    """The script the child runs: the candidate code, a check that it defines `entry_point`, the tests."""
    lines = [code, ""]
    if entry_point and IDENTIFIER.match(entry_point):
        lines.append(f"assert callable({entry_point}), 'entry point is not callable'")
    lines.extend(tests)
    return "\n".join(lines) + "\n"


def compiles(program: str) -> bool:
    """Syntax check without executing anything; saves a process start for the many unparsable samples."""
    try:
        compile(program, "<generated>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
        return False
    return True


def _limit_resources(memory_mb: int, cpu_seconds: int, cgroup: Path | None = None):
    """Return a preexec_fn that applies the rlimits in the child between fork and exec (and joins `cgroup`)."""

    def apply():
        import resource

        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB per written file
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _hidden_dirs() -> list[str]:
    """The home directories the code must not read: the user's, /home and /root (those that exist)."""
    homes = {os.path.expanduser("~"), "/home", "/root"}
    return sorted(h for h in homes if os.path.isdir(h) and os.path.realpath(h) != "/")


def _interpreter() -> tuple[str, str]:
    """(installation prefix, interpreter path inside it) of the base Python (a venv's interpreter is a link)."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return prefix, os.path.relpath(exe, prefix)


def _isolated_command(program: str, cwd: str) -> tuple[list[str], dict]:
    prefix, exe = _interpreter()
    env = {"PATH": os.defpath, "HOME": cwd, "TMPDIR": cwd, "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8",
           "SBX_MB": str(WORK_MB), "SBX_CWD": cwd, "SBX_PREFIX": prefix, "SBX_HIDE": " ".join(_hidden_dirs()),
           "SBX_PROGRAM": program}
    cmd = [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--mount", "--net", "--pid", "--fork",
           "--kill-child", os.path.join(prefix, exe), "-I", "-S", "-c", _SETUP]
    return cmd, env


@contextlib.contextmanager
def _pids_cgroup():
    """For root, which RLIMIT_NPROC does not bind: a pids cgroup of at most PIDS_MAX processes (v2, or v1's pids
    hierarchy) for one check, removed afterwards; None where the cgroup file system cannot be written."""
    group = None
    if os.geteuid() == 0:
        for root, line in ((Path("/sys/fs/cgroup/pids"), "pids"), (Path("/sys/fs/cgroup"), "")):
            try:
                own = next(row.split(":", 2)[2] for row in Path("/proc/self/cgroup").read_text().splitlines()
                           if row.split(":", 2)[1] == line)
                parent = root / own.lstrip("/")
                if not (parent / "cgroup.procs").is_file():
                    continue
                candidate = Path(tempfile.mkdtemp(prefix="ledmerge-sandbox-", dir=parent))
                try:
                    (candidate / "pids.max").write_text(str(PIDS_MAX))
                except OSError:  # no pids controller there
                    candidate.rmdir()
                    continue
                group = candidate
                break
            except (OSError, StopIteration, IndexError):
                continue
    try:
        yield group
    finally:
        for _ in range(100 if group is not None else 0):  # killed processes leave the group as they exit
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.02)


@functools.cache
def isolation() -> str | None:
    """Why generated code cannot run in namespaces here (None: it can). Probed once per process."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        why = "no Linux user namespaces here (util-linux's unshare)"
    else:
        with tempfile.TemporaryDirectory(prefix="ledmerge-sandbox-") as cwd:
            cmd, env = _isolated_command("print('ok')", cwd)
            try:
                proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=30)
                why = None if proc.stdout.strip() == "ok" else f"unshare failed: {proc.stderr.strip()[-300:]}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                why = f"unshare failed: {exc}"
    if why:
        log.warning("generated code runs without isolation (%s): it has the rlimits, a throwaway directory and the "
                    "timeout, but could reach the network and read or write the user's files", why)
    return why


def run_tests(code: str, tests: list[str], entry_point: str | None = None, timeout: float = 5.0,
              memory_mb: int = 256) -> bool:
    """True iff `code` followed by every test (plain `assert` lines) exits cleanly within the limits."""
    program = build_program(code, list(tests), entry_point)
    if not compiles(program):
        return False
    with tempfile.TemporaryDirectory(prefix="ledmerge-sandbox-") as cwd, _pids_cgroup() as cgroup:
        if isolation() is None:
            cmd, env = _isolated_command(program, cwd)
        else:
            env = {"PATH": os.defpath, "HOME": cwd, "TMPDIR": cwd, "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
            cmd = ["prlimit", "--nproc=0", "--", sys.executable, "-I", "-S", "-c", program] \
                if shutil.which("prlimit") else [sys.executable, "-I", "-S", "-c", program]
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_limit_resources(memory_mb, math.ceil(timeout) + 1, cgroup))
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session; its pid namespace dies too
                proc.wait()
