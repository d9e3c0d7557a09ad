#!/usr/bin/env python3
"""Merge benchmark: ledmerge vs mergekit on random-weight Llama checkpoints, cold page cache.

One run, for each model size: build a base and N experts as sharded bf16 safetensors (streamed, no
transformers model is instantiated), then time and measure the peak RSS of, each in its own process,

  * the I/O floor: reading every tensor of the input models once;
  * `python -m ledmerge merge` with task_arithmetic, ties, dare_ties and led (random 10 % masks);
  * `mergekit-yaml` with task_arithmetic and ties configured to compute the same thing,

compare ledmerge's and mergekit's outputs in bf16 ulps, and print/write one Markdown table per size. Cold means
the inputs evicted from the page cache and, for ledmerge, no sha256 of theirs remembered (an empty
LEDMERGE_HASH_CACHE per case): every case hashes its inputs for the model card, as a first merge does.
See bench/README.md; e.g. `.venv/bin/python bench/merge_bench.py --sizes tiny`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import random_checkpoints as sc  # noqa: E402
from bench_tables import fmt_bytes, machine_info, table  # noqa: E402
from compare import compare  # noqa: E402
from measure import GB, GiB, cache_check, drop_cache, measure, read_through  # noqa: E402

ALL_METHODS = ("task_arithmetic", "ties", "dare_ties", "led")
MERGEKIT_METHODS = ("task_arithmetic", "ties")


def log(msg: str = "") -> None:
    print(msg, flush=True)


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
        hashes = root / "hash-cache" / slug  # empty: no input's sha256 remembered from an earlier case (cold)
        shutil.rmtree(hashes, ignore_errors=True)
        case_env = {**env, "LEDMERGE_HASH_CACHE": str(hashes)}
        r = {"case": label, **measure(cmd, case_env, logs / f"{slug}.log", int(a.max_rss_gb * GiB))}
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
                   help="expert delta scale relative to the typical weight (default 0.02; see random_checkpoints.py)")
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
