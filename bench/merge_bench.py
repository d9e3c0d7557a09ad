#!/usr/bin/env python3
"""Merge benchmark: ledmerge vs mergekit on random-weight Llama checkpoints, cold page cache.

One run, for each model size: build a base and N experts as sharded bf16 safetensors (streamed, no
transformers model is instantiated), then time and measure the peak RSS of, each in its own process,

  * the I/O floor: reading every tensor of the input models once;
  * `python -m ledmerge merge` with task_arithmetic, ties, dare_ties and led (random 10 % masks);
  * `mergekit-yaml` with task_arithmetic and ties configured to compute the same thing,

compare ledmerge's and mergekit's outputs in bf16 ulps, and print/write one Markdown table per size.
See bench/README.md; e.g. `.venv/bin/python bench/merge_bench.py --sizes tiny`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import synth_ckpt as sc  # noqa: E402

GB, GiB = 1e9, 2**30
ALL_METHODS = ("task_arithmetic", "ties", "dare_ties", "led")
MERGEKIT_METHODS = ("task_arithmetic", "ties")


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Page cache

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
    res = "" if res0 is None else f"; resident after DONTNEED {res0 / 2**20:.1f} MiB, after a read {res1 / 2**20:.1f} MiB (fincore)"
    return (f"reading the base's {size / GB:.2f} GB after fadvise(DONTNEED): {cold:.2f} s ({size / GB / cold:.2f} GB/s); "
            f"again, cached: {warm:.2f} s ({size / GB / warm:.2f} GB/s){res}")


# ---------------------------------------------------------------------------------------------
# One measured process

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


# ---------------------------------------------------------------------------------------------
# Output comparison

def ties_explained(base, experts, density: float):
    """Where ledmerge's and mergekit's TIES may legitimately differ, computed from the inputs alone:

    * an expert's |delta| equals its trim threshold (the k-th largest): which of the tied entries are
      kept is up to each tool (ledmerge: lowest flat indices; mergekit: torch.argsort's order);
    * the elected sum of the trimmed deltas is exactly 0 with nonzero entries: ledmerge elects no
      sign (keeps the base), mergekit elects +. bf16 deltas are discrete, so both happen often.
    Returns two bool tensors (tie, zero_sum) shaped like the base."""
    import torch

    b = base.float()
    tie = torch.zeros(b.shape, dtype=torch.bool)
    kept = []
    for e in experts:
        d = e.float() - b
        n = d.numel()
        k = min(n, math.ceil(Fraction(repr(float(density))) * n))
        mag = d.abs().reshape(-1)
        if k >= n:
            kept.append(d)
            continue
        thr = mag.kthvalue(n - k + 1).values
        at = mag == thr
        tie |= at.view(b.shape)
        keep = mag > thr
        keep[at.nonzero().flatten()[: k - int(keep.sum())]] = True  # ledmerge's rule: lowest indices
        kept.append(d * keep.view(b.shape))
    st = torch.stack(kept)
    zero_sum = (st.sum(0) == 0) & (st != 0).any(0)
    return tie, zero_sum


def compare(a_dir, b_dir, base_dir, experts=None, density=None) -> dict:
    """Max |a - b| in bf16 ulps of max(|a|, |b|), over every tensor; elements that differ; the fraction of
    a's elements that differ from the base (the comparison is not vacuous). With `experts` and
    `density` (TIES), also how many differing elements `ties_explained` does not account for."""
    import torch

    from ledmerge.checkpoint import ModelReader

    worst, differ, changed, total, worst_name = 0.0, 0, 0, 0, ""
    at_tie = at_zero = unexplained = 0
    dtypes = set()
    with contextlib.ExitStack() as stack:
        ra, rb, r0 = (stack.enter_context(ModelReader(d)) for d in (a_dir, b_dir, base_dir))
        rex = [stack.enter_context(ModelReader(d)) for d in (experts or [])]
        na, nb = set(ra.names), set(rb.names)
        if na != nb:
            return {"error": f"tensor names differ: only in ledmerge {sorted(na - nb)[:3]}, "
                             f"only in mergekit {sorted(nb - na)[:3]}"}
        for name in sorted(na):
            ta, tb, t0 = ra.read(name), rb.read(name), r0.read(name)
            dtypes.add((str(ta.dtype).removeprefix("torch."), str(tb.dtype).removeprefix("torch.")))
            if ta.shape != tb.shape:
                return {"error": f"{name}: shape {list(ta.shape)} vs {list(tb.shape)}"}
            a, b = ta.float(), tb.float()
            big = torch.maximum(a.abs(), b.abs())
            _, e = torch.frexp(big)  # big = m·2^e, m in [0.5, 1): bf16 ulp = 2^(e-1-7)
            ulp = torch.ldexp(torch.ones_like(big), (e - 8).clamp(min=-133))
            d = (a - b).abs()
            m = float((d / ulp).max()) if d.numel() else 0.0
            if m > worst:
                worst, worst_name = m, name
            nz = d != 0
            differ += int(nz.sum())
            changed += int((ta != t0).sum())
            total += d.numel()
            if rex and bool(nz.any()):
                tie, zero = ties_explained(t0, [r.read(name) for r in rex], density)
                at_tie += int((nz & tie).sum())
                at_zero += int((nz & zero & ~tie).sum())
                unexplained += int((nz & ~tie & ~zero).sum())
    out = {"max_ulp": worst, "worst_tensor": worst_name, "differ": differ, "elements": total,
           "changed_vs_base": changed / total, "dtypes": sorted(dtypes)}
    if rex:
        out.update(at_tie=at_tie, at_zero_sum=at_zero, unexplained=unexplained)
    return out


# ---------------------------------------------------------------------------------------------
# Commands

def ledmerge_cmd(method: str, base: Path, experts: dict[str, Path], masks: dict[str, Path], out: Path, a) -> list[str]:
    spec = {"task_arithmetic": {"method": "task_arithmetic", "scale": 1.0},
            "ties": {"method": "ties", "density": a.density, "scale": 1.0},
            "dare_ties": {"method": "dare_ties", "drop": a.drop, "seed": 0, "scale": 1.0},
            "led": {"method": "led"}}[method]
    cmd = [sys.executable, "-m", "ledmerge", "--threads", str(a.threads), "merge", "--base", str(base),
           "--expert", *[f"{t}={d}" for t, d in experts.items()], "--spec", json.dumps(spec), "--out", str(out)]
    if method == "led":
        cmd[cmd.index("--spec"):cmd.index("--spec")] = ["--mask", *[f"{t}={masks[t]}" for t in experts]]
    return cmd


def mergekit_config(method: str, base: Path, experts: dict[str, Path], a) -> dict:
    """mergekit settings that compute what ledmerge computes (tests/test_merge_mergekit.py):
    TA: normalize false (θ0 + λ Σ w τ); TIES: normalize true (disjoint mean), rescale false, lambda 1."""
    if method == "task_arithmetic":
        params, per_model = {"lambda": 1.0, "normalize": False}, {"weight": 1.0}
    else:
        params = {"lambda": 1.0, "normalize": True, "rescale": False, "int8_mask": False}
        per_model = {"weight": 1.0, "density": a.density}
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(d), "parameters": dict(per_model)} for d in experts.values()],
            "parameters": params, "dtype": "float32", "out_dtype": a.dtype}


def mergekit_cmd(config_path: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).parent / "mergekit-yaml"
    exe = str(exe) if exe.exists() else (shutil.which("mergekit-yaml") or "mergekit-yaml")
    # No tokenizer exists to copy (without this flag mergekit tries AutoTokenizer on the base and logs
    # an error). Everything else is mergekit's default: CPU, default torch threads, 5B-per-shard output.
    return [exe, str(config_path), str(out), "--no-copy-tokenizer"]


def child_env(a) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


# ---------------------------------------------------------------------------------------------
# Planning

def parse_sizes(text: str, default_experts: int) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        preset, _, n = item.partition(":")
        if preset not in sc.PRESETS:
            raise SystemExit(f"merge_bench: unknown size {preset!r}: choose from {sorted(sc.PRESETS)}")
        n = int(n) if n else default_experts
        if n < 1:
            raise SystemExit(f"merge_bench: {item}: need at least one expert")
        out.append((preset, n))
    if not out:
        raise SystemExit("merge_bench: --sizes is empty")
    return out


def disk_need(spec: sc.CheckpointSpec, info: dict, methods, mergekit: bool, root: Path) -> int:
    """Bytes a size needs on disk: the models (unless already there), the masks, two merged outputs at
    once (ledmerge's and mergekit's, kept until compared), plus a 10 % / 2 GB margin."""
    models = 0 if sc.existing(spec, root / "models") else (1 + spec.experts) * info["model_bytes"]
    masks = spec.experts * info["mask_elems"] // 8 if "led" in methods else 0  # 1 bit per weight
    outputs = (2 if mergekit else 1) * info["model_bytes"]
    need = models + masks + outputs
    return int(need + max(2 * GB, 0.1 * need))


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


# ---------------------------------------------------------------------------------------------

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


def run_size(preset: str, n_experts: int, root: Path, a, env, notes: list[str]) -> list[dict]:
    models = root / "models"
    base = models / "base"
    experts = {f"e{i}": models / f"e{i}" for i in range(1, n_experts + 1)}
    masks = {t: root / "masks" / f"{t}.safetensors" for t in experts}
    outs, logs = root / "out", root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model_files = [p for d in [base, *experts.values()] for p in sc_files(d)]
    rows: list[dict] = []

    def prepare(inputs, keep=()):
        """Delete earlier outputs (except those kept for a comparison), then set up the page cache."""
        outs.mkdir(parents=True, exist_ok=True)
        for d in outs.iterdir():
            if d not in keep:
                shutil.rmtree(d) if d.is_dir() else d.unlink()
        os.sync()
        for d in keep:  # kept on disk, but not in memory
            drop_cache(sc_files(d))
        if a.cache == "cold":
            drop_cache(inputs)
        else:
            read_through(inputs)

    def case(label, cmd, inputs, keep=()):
        prepare(inputs, keep)
        slug = label.replace(" ", "_").replace("/", "_")
        log(f"  [{preset}:{n_experts}] {label} ...")
        r = {"case": label, **measure(cmd, env, logs / f"{slug}.log", int(a.max_rss_gb * GiB))}
        r["ok"] = r["rc"] == 0 and not r["killed"]
        status = "ok" if r["ok"] else ("KILLED (RSS limit)" if r["killed"] else f"FAILED exit {r['rc']}")
        log(f"      {status}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / GiB:.2f} GiB "
            f"(anon {r['peak_anon'] / GiB:.2f} GiB, helper processes {r['helper_processes']})")
        if not r["ok"]:
            tail = Path(r["log"]).read_text(errors="replace").splitlines()[-5:]
            log("      log tail: " + "\n                ".join(tail))
        rows.append(r)
        return r

    # Fixed start-up cost inside every row: interpreter, imports (warm: the libraries stay cached).
    startup = {}
    for label, cmd in (("python + import torch, safetensors", [sys.executable, "-c", "import torch, safetensors"]),
                       ("mergekit-yaml --help", [mergekit_cmd(Path("x"), Path("y"))[0], "--help"])):
        if label.startswith("mergekit") and (a.no_mergekit or not any(m in MERGEKIT_METHODS for m in a.methods)):
            continue
        r = measure(cmd, env, logs / "startup.log", int(a.max_rss_gb * GiB))
        startup[label] = r["seconds"] if r["rc"] == 0 else float("nan")
    notes.append("start-up included in every row: " + "; ".join(f"{k}: {v:.1f} s" for k, v in startup.items()))

    floor = case("I/O floor", [sys.executable, str(HERE / "read_floor.py"), str(base), *map(str, experts.values())],
                 model_files)
    if floor["ok"]:
        last = Path(floor["log"]).read_text().strip().splitlines()[-1]
        try:
            notes.append(f"I/O floor reader: {json.loads(last)['reader']}")
        except (json.JSONDecodeError, KeyError):
            pass

    for method in a.methods:
        inputs = model_files + ([str(p) for p in masks.values()] if method == "led" else [])
        ours_out = outs / f"ledmerge-{method}"
        ours = case(f"ledmerge {method}", ledmerge_cmd(method, base, experts, masks, ours_out, a), inputs)
        if method not in MERGEKIT_METHODS or a.no_mergekit:
            continue
        cfg_path = root / f"mergekit-{method}.yml"
        import yaml
        cfg_path.write_text(yaml.safe_dump(mergekit_config(method, base, experts, a), sort_keys=False))
        theirs_out = outs / f"mergekit-{method}"
        theirs = case(f"mergekit {method}", mergekit_cmd(cfg_path, theirs_out), inputs,
                      keep=[ours_out] if ours["ok"] else [])
        if ours["ok"] and theirs["ok"]:
            ours["speedup"] = theirs["seconds"] / ours["seconds"]
            log(f"      comparing the outputs of ledmerge and mergekit {method} ...")
            ours["cmp"] = compare(ours_out, theirs_out, base,
                                  *((list(experts.values()), a.density) if method == "ties" else ()))
            c = ours["cmp"]
            if "error" in c:
                ours["cmp_note"] = "outputs differ in structure"
                notes.append(f"{method}: {c['error']}")
                log(f"      {c['error']}")
            else:
                pct = 100 * c["differ"] / c["elements"]
                msg = (f"{method}: ledmerge vs mergekit: max {c['max_ulp']:g} bf16 ulp"
                       + (f" (in {c['worst_tensor']})" if c["worst_tensor"] else "")
                       + f"; {c['differ']:,} of {c['elements']:,} elements differ ({pct:.2g} %)")
                if "unexplained" in c:
                    msg += (f": {c['at_tie']:,} where an expert's |delta| ties with its trim threshold, "
                            f"{c['at_zero_sum']:,} where the elected sum is exactly 0, {c['unexplained']:,} otherwise")
                msg += (f"; {100 * c['changed_vs_base']:.1f} % of the merged elements differ from the base; "
                        f"output dtypes (ledmerge, mergekit) {c['dtypes']}")
                log("      " + msg)
                notes.append(msg)
                if method == "ties":
                    notes.append("ties: the two tools differ by design at entries whose |delta| ties with the trim "
                                 "threshold (ledmerge keeps the lowest indices, mergekit torch.argsort's order) and "
                                 "where the trimmed deltas sum to exactly 0 (ledmerge elects no sign, mergekit +); "
                                 "bf16 deltas are discrete, so both are common. Any other difference is counted "
                                 "as unexplained (expected: 0)")
    if outs.exists():
        shutil.rmtree(outs)
    return rows


def sc_files(model_dir: Path) -> list[str]:
    from ledmerge.checkpoint import weight_files
    return [str(p) for p in weight_files(model_dir)]


def main(argv=None) -> int:
    import psutil

    p = argparse.ArgumentParser(
        prog="merge_bench.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sizes: " + "; ".join(f"{k} = LlamaConfig({', '.join(f'{kk}={vv}' for kk, vv in v.items())})"
                                     for k, v in sc.PRESETS.items())
        + ". Untied embeddings, bf16. Examples:\n"
          "  merge_bench.py --sizes tiny                      # a quick check (seconds)\n"
          "  merge_bench.py --sizes 1b:3,3b:2                 # base+3 experts at 1.1B; base+2 at 3.0B\n"
          "  merge_bench.py --sizes 1b,3b --experts 2 --methods task_arithmetic,ties")
    p.add_argument("--sizes", default="tiny",
                   help="comma list of sizes, each optionally SIZE:N for N experts (default: tiny)")
    p.add_argument("--experts", type=int, default=2, help="experts per size without :N (default 2)")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma list from {','.join(ALL_METHODS)} (default: all)")
    p.add_argument("--no-mergekit", action="store_true", help="skip the mergekit runs and the comparison")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="cold: evict inputs from the page cache before each case (default); warm: read them first")
    p.add_argument("--workdir", type=Path, default=HERE / "work", help="where checkpoints go (default bench/work)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (a later run with the same settings reuses them)")
    p.add_argument("--out-md", type=Path, default=HERE / "results.md", help="Markdown report (default bench/results.md)")
    p.add_argument("--shard-gb", type=float, default=2.0, help="input shard size in GB (default 2)")
    p.add_argument("--dtype", choices=tuple(sc.DTYPES), default="bfloat16",
                   help="checkpoint dtype (default bfloat16; float32 checks TIES equality without bf16 ties)")
    p.add_argument("--delta", type=float, default=0.02,
                   help="expert delta scale relative to the typical weight (default 0.02; see synth_ckpt.py)")
    p.add_argument("--density", type=float, default=0.5,
                   help="TIES density (default 0.5: mergekit keeps int(d·n), ledmerge ceil(d·n); equal for even n)")
    p.add_argument("--drop", type=float, default=0.9, help="DARE-TIES drop rate (default 0.9)")
    p.add_argument("--mask-density", type=float, default=0.1, help="fraction of True in the random LED masks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="OMP_NUM_THREADS of every case and ledmerge's --threads (default: all CPUs)")
    p.add_argument("--max-rss-gb", type=float, default=round(0.85 * psutil.virtual_memory().total / GiB, 1),
                   help="kill a case whose process tree passes this RSS (default 85%% of RAM)")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = sorted(set(a.methods) - set(ALL_METHODS))
    if bad:
        p.error(f"unknown method(s) {bad}: choose from {list(ALL_METHODS)}")
    entries = parse_sizes(a.sizes, a.experts)

    # One set of checkpoints per size, with as many experts as the largest entry of that size needs.
    presets: dict[str, int] = {}
    for preset, n in entries:
        presets[preset] = max(presets.get(preset, 0), n)
    specs = {pr: sc.CheckpointSpec(pr, n, seed=a.seed, delta_rel=a.delta, shard_bytes=int(a.shard_gb * GB),
                                   dtype=a.dtype)
             for pr, n in presets.items()}
    infos = {pr: sc.estimate(s) for pr, s in specs.items()}
    a.workdir = a.workdir.resolve()
    a.workdir.mkdir(parents=True, exist_ok=True)
    needs = {pr: disk_need(specs[pr], infos[pr], a.methods, not a.no_mergekit, a.workdir / pr) for pr in presets}
    need = sum(needs.values()) if a.keep else max(needs.values())
    free = shutil.disk_usage(a.workdir).free
    for pr, info in infos.items():
        log(f"{pr}: {info['params'] / 1e9:.3f}B parameters, {fmt_bytes(info['model_bytes'])} per model "
            f"(largest tensor {info['largest'] / 1e6:.1f}M), base + {presets[pr]} experts; needs up to "
            f"{fmt_bytes(needs[pr])} of disk")
    if need > free:
        try:
            a.workdir.rmdir()  # only if empty (it was made just above)
        except OSError:
            pass
        log(f"merge_bench: not enough disk in {a.workdir}: the run needs about {fmt_bytes(need)} "
            f"(models, masks, two merged outputs and a margin{', all sizes kept' if a.keep else ''}) but only "
            f"{fmt_bytes(free)} is free: free space, pick --workdir on a larger disk, or run fewer/smaller sizes")
        return 2

    env = child_env(a)
    header = ["# Merge benchmark", "", *machine_info(a), ""]
    sections: list[str] = []

    def write_md():
        a.out_md.parent.mkdir(parents=True, exist_ok=True)
        a.out_md.write_text("\n".join(header + sections) + "\n")

    created: list[Path] = []
    try:
        for preset in presets:
            spec, info, root = specs[preset], infos[preset], a.workdir / preset
            free = shutil.disk_usage(a.workdir).free
            if needs[preset] > free:
                log(f"merge_bench: {preset} needs about {fmt_bytes(needs[preset])} of disk but only "
                    f"{fmt_bytes(free)} is free now: skipping it")
                sections += [f"## {preset}", "", f"Skipped: not enough disk ({fmt_bytes(free)} free).", ""]
                continue
            created.append(root)
            gen_note = "reused from an earlier --keep run"
            if not sc.existing(spec, root / "models"):
                if (root / "models").exists():
                    shutil.rmtree(root / "models")
                log(f"{preset}: generating base + {spec.experts} experts in {root / 'models'}")
                t0 = time.perf_counter()
                sc.generate(spec, root / "models", log=lambda m: log(m))
                gen_note = f"generated in {time.perf_counter() - t0:.0f} s"
            if "led" in a.methods:
                if (root / "masks").exists():
                    shutil.rmtree(root / "masks")
                sc.write_masks(spec, root / "masks", density=a.mask_density, log=lambda m: log(m))
            disk = sum(os.path.getsize(f) for f in sc_files(root / "models" / "base"))
            nshards = len(sc_files(root / "models" / "base"))
            log(f"{preset}: {info['params']:,} parameters, {fmt_bytes(disk)} of safetensors per model "
                f"({nshards} shard{'s' if nshards > 1 else ''}), {gen_note}")
            check = cache_check(sc_files(root / "models" / "base"))
            log(f"{preset}: page-cache check: {check}")
            for p_, n in entries:
                if p_ != preset:
                    continue
                notes: list[str] = []
                rows = run_size(preset, n, root, a, env, notes)
                title = (f"## {preset}: base + {n} experts ({info['params'] / 1e9:.3f}B parameters each, "
                         f"{fmt_bytes(disk)} per model in {nshards} shard{'s' if nshards > 1 else ''})")
                body = [title, "", *table(rows), "",
                        f"- page-cache check: {check}",
                        f"- checkpoints {gen_note}; expert delta scale {a.delta}, TIES density {a.density}, "
                        f"DARE drop {a.drop}, LED masks {a.mask_density:.0%} of the linear weights",
                        *[f"- {x}" for x in notes],
                        "- peak RSS: the larger of GNU time's %M and the polled sum over the process tree; "
                        "anon RSS leaves out file-backed (mmapped safetensors) pages",
                        "- helper processes seen: " + (", ".join(f"{r['case']}: {r['helper_processes']}" for r in rows
                                                            if r.get("helper_processes")) or "none"),
                        ""]
                sections.extend(body)
                write_md()
                log("\n".join([title, "", *table(rows), ""]))
            if not a.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not a.keep:
            for root in created:
                shutil.rmtree(root, ignore_errors=True)
            try:
                a.workdir.rmdir()  # only if empty
            except OSError:
                pass
    write_md()
    log(f"wrote {a.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
