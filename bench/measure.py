"""Measuring one benchmark case: the page cache (evict, fill, check) and a process tree's time and peak RSS."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

GB, GiB = 1e9, 2**30


# ---- page cache ----

def drop_cache(paths) -> None:
    """Evict the files from the page cache (written back first: dirty pages cannot be dropped)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(paths) -> int:
    """Read the files once, discarding the bytes (fills the page cache)."""
    buf, total = bytearray(64 << 20), 0
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def resident_bytes(paths) -> int | None:
    """Bytes of the files in the page cache, from util-linux fincore (None if it is missing)."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "-b", "-n", "-r", "-o", "RES", *map(str, paths)], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return sum(int(x) for x in out.stdout.split())


def cache_check(paths) -> str:
    """Does fadvise(DONTNEED) make reads cold here? Time a read after dropping, then a second one."""
    size = sum(os.path.getsize(p) for p in paths)
    drop_cache(paths)
    res0 = resident_bytes(paths)
    t0 = time.perf_counter()
    read_through(paths)
    cold = time.perf_counter() - t0
    res1 = resident_bytes(paths)
    t0 = time.perf_counter()
    read_through(paths)
    warm = time.perf_counter() - t0
    drop_cache(paths)
    res = "" if res0 is None else (f"; resident after DONTNEED {res0 / 2**20:.1f} MiB, "
                                   f"after a read {res1 / 2**20:.1f} MiB (fincore)")
    return (f"reading the base's {size / GB:.2f} GB after fadvise(DONTNEED): {cold:.2f} s ({size / GB / cold:.2f} GB/s); "
            f"again, cached: {warm:.2f} s ({size / GB / warm:.2f} GB/s){res}")


# ---- one measured process ----

def _proc_mem(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes from /proc/<pid>/status; (0, 0) if it is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, anon


def measure(cmd: list[str], env: dict, log_path: Path, max_rss: int, poll: float = 0.05) -> dict:
    """Run cmd under GNU time in its own process group; poll the whole process tree's RSS.

    Peak RSS is the larger of GNU time's %M (the largest single process, exact) and the polled sum over
    the tree (catches helper processes). The tree is killed if its RSS passes `max_rss`.
    """
    import psutil

    time_out = log_path.with_suffix(".time")
    gnu_time = Path("/usr/bin/time")
    full = ([str(gnu_time), "-f", "%e %M", "-o", str(time_out)] if gnu_time.exists() else []) + cmd
    state = {"peak": 0, "anon": 0, "procs": 0, "killed": False}
    with open(log_path, "w") as logf:
        logf.write("$ " + shlex.join(cmd) + "\n")
        logf.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        done = threading.Event()

        def watch():
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    kids = root.children(recursive=True)
                except psutil.Error:
                    kids = []
                pids = [proc.pid] + [k.pid for k in kids]
                rss = anon = 0
                for pid in pids:
                    r, a = _proc_mem(pid)
                    rss, anon = rss + r, anon + a
                state["peak"] = max(state["peak"], rss)
                state["anon"] = max(state["anon"], anon)
                state["procs"] = max(state["procs"], len(kids))
                if rss > max_rss and not state["killed"]:
                    state["killed"] = True
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                done.wait(poll)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        done.set()
        th.join()
    time_rss = 0
    if time_out.is_file():
        parts = time_out.read_text().split()
        try:
            time_rss = int(parts[-1]) * 1024  # the last line; GNU time prefixes a note if the child was signalled
        except (IndexError, ValueError):
            pass
    # With GNU time in front, the command is its child: `procs` counts time's child too.
    helpers = max(0, state["procs"] - (1 if gnu_time.exists() else 0))
    return {"seconds": seconds, "rc": rc, "killed": state["killed"], "peak_rss": max(time_rss, state["peak"]),
            "peak_rss_gnu_time": time_rss, "peak_rss_polled": state["peak"], "peak_anon": state["anon"],
            "helper_processes": helpers, "log": str(log_path)}
