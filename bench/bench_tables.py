"""Reporting the benchmark: the machine and versions it ran on, and one Markdown table per size."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from measure import GB, GiB

REPO = Path(__file__).resolve().parent.parent


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB"


def machine_info(a) -> list[str]:
    import psutil
    import safetensors
    import torch
    import transformers

    try:
        from importlib.metadata import version
        mk = version("mergekit")
    except Exception:
        mk = "not installed"
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{shlex.join([Path(sys.executable).name] + sys.argv)}`",
        f"- machine: {os.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total / GiB:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- versions: torch {torch.__version__} ({torch.get_num_threads()} threads by default), "
        f"transformers {transformers.__version__}, safetensors {safetensors.__version__}, mergekit {mk}, "
        f"ledmerge at {git.stdout.strip() or '?'}",
        f"- merges run with OMP_NUM_THREADS={a.threads} (ledmerge `--threads {a.threads}`); page cache: {a.cache}"
        + (" (inputs evicted with posix_fadvise(DONTNEED) before every case)" if a.cache == "cold"
           else " (inputs read once before every case)"),
    ]


def table(rows: list[dict]) -> list[str]:
    head = ["case", "seconds", "peak RSS (GiB)", "peak anon RSS (GiB)", "x I/O floor", "x faster than mergekit",
            "max bf16 ULP diff vs mergekit", "elements differing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    floor = next((r for r in rows if r["case"] == "I/O floor" and r.get("ok")), None)
    for r in rows:
        if not r.get("ok"):
            why = "killed: RSS over the limit" if r.get("killed") else f"failed (exit {r.get('rc')})"
            cells = [r["case"], why, f"{r['peak_rss'] / GiB:.2f}" if "peak_rss" in r else "", "", "", "", "", ""]
        else:
            x_floor = f"{r['seconds'] / floor['seconds']:.2f}" if floor and r is not floor else ""
            cells = [r["case"], f"{r['seconds']:.1f}", f"{r['peak_rss'] / GiB:.2f}", f"{r['peak_anon'] / GiB:.2f}",
                     x_floor, f"{r['speedup']:.2f}" if r.get("speedup") else "",
                     f"{r['cmp']['max_ulp']:g}" if r.get("cmp") and "max_ulp" in r["cmp"] else r.get("cmp_note", ""),
                     _differ_cell(r.get("cmp"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _differ_cell(c) -> str:
    if not c or "differ" not in c:
        return ""
    cell = f"{c['differ']:,} ({100 * c['differ'] / c['elements']:.2g} %)"
    if "unexplained" in c:
        cell += f", {c['unexplained']:,} unexplained"
    return cell
