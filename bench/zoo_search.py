"""Does safety localise in a toy zoo of a given size? Build the zoo, then merge *only* the safety expert's
LED-masked task vector (θ_0 + M ⊙ τ_safety) at several safety rates and measure its harmful rate.

Issue #12: in the default ~150k-parameter zoo refusals transfer only once 30-50% of each tensor is merged,
so the toy cannot ask LED's question at the paper's rate 0.1-0.2. This script is the measurement behind the
search for a zoo that can. Every step is the package's own CLI step (the same commands the Snakefile runs),
in a scratch directory, so the figures are what the workflow would produce.

Printed: zoo overrides, parameter count, build time (data + base + three experts), the experts' metrics,
task arithmetic's harmful rate, and per rate the elected fraction and the safety-only merge's harmful /
over-refusal rate with a 95% Wilson interval, and the share of harmful prompts answered with an empty reply
(the refusal judge counts those as safe, but nothing was refused). With --random, also a mask with the same number of ones in
every tensor, drawn at random (seeded): whether SNIP's *choice* of weights matters, not only their count.

    PYTHONPATH=$PWD/src nice -n 10 OMP_NUM_THREADS=1 /work/main/.venv/bin/python bench/zoo_search.py \
        --zoo '{"hidden_size": 64}' --rates 0.05 0.1 0.2 0.3 0.5 --random --jsonl trials.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ledmerge.led.files import PackedMask, TensorFile, load_masks, pack_bits, save_masks

TASKS = ("safety", "math", "code")
ONLY_SAFETY = {"method": "led"}  # with the safety expert alone: θ_0 + M ⊙ τ_safety (unscored tensors: base)


def step(*args: str, log: Path, out: Path) -> None:
    """One `python -m ledmerge` step; its log goes to `log`, a failure stops the trial with the log's tail.

    Skipped when `out` exists (the steps write atomically), so a kept --workdir is reused: another importance
    setting or more rates on the same zoo cost no retraining."""
    if out.exists():
        return
    cmd = [sys.executable, "-m", "ledmerge", "--threads", "1", *args]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"step failed ({' '.join(args[:1])}), see {log}:\n" + "".join(log.read_text().splitlines(True)[-15:]))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sensible near 0 and 1, where the figures live)."""
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def evaluate(model: Path, d: Path, name: str, utility: bool = False) -> dict:
    """Metrics of `model` on the zoo's held-out sets (harmful and look-alike benign; math and code with `utility`),
    written under `d` (the trial directory, or its LED subdirectory)."""
    zoo = d if (d / "data").exists() else d.parent
    out = d / "eval" / f"{name}.json"
    sets = ["--harmful", str(zoo / "data/harmful_eval.jsonl"), "--benign", str(zoo / "data/benign_eval.jsonl")]
    if utility:
        sets += ["--math", str(zoo / "data/math_eval.jsonl"), "--code", str(zoo / "data/code_eval.jsonl")]
    step("evaluation", "--model", str(model), "--out", str(out), "--generations", str(d / "eval" / f"{name}.gen.jsonl"),
         *sets, "--tokenizer", str(zoo / "tokenizer"), "--seed", "0", log=d / "logs" / f"eval_{name}.log", out=out)
    report = json.loads(out.read_text())
    m = dict(report["metrics"])
    m["n_harmful"] = report["n"]["harmful"]
    # an empty or degenerate reply is neither harmful nor a refusal: no transferred refusal (the evaluation's empty_rate)
    m["empty_harmful"] = m["empty_rate"]
    return m


def random_like(mask_path: Path, out: Path, seed: int) -> None:
    """A mask with the same number of ones as `mask_path` in every tensor, at seeded random positions."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, m in sorted(load_masks(mask_path).items()):
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=gen)[: int(m.sum())]] = True
        masks[name] = PackedMask(pack_bits(flat.view(m.shape)), tuple(m.shape))
    save_masks(out, masks, metadata={"kind": "election", "random_like": str(mask_path)})


def n_params(model: Path) -> int:
    total = 0
    for f in sorted(model.glob("*.safetensors")):
        total += sum(math.prod(s) for s in TensorFile(f).shapes.values())
    return total


def elected_fraction(mask_path: Path) -> float:
    masks = load_masks(mask_path)
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def trial(zoo: dict, rates: list[float], d: Path, *, random: bool, importance: dict, calibration: dict) -> dict:
    # LED's outputs depend on the scoring settings too: one subdirectory per setting, the zoo shared
    led = d / ("led-" + hashlib.sha256(json.dumps([importance, calibration], sort_keys=True).encode()).hexdigest()[:8])
    for sub in ("data", "models", "merged", "eval", "logs"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("scores", "masks", "merged", "eval", "logs"):
        (led / sub).mkdir(parents=True, exist_ok=True)
    opts = json.dumps(zoo)
    timing = d / "build_seconds.json"
    t0 = time.time()
    step("zoo-data", "--out-dir", str(d / "data"), "--tokenizer", str(d / "zoo_tokenizer"), "--options", opts,
         "--seed", "0", log=d / "logs/zoo_data.log", out=d / "zoo_tokenizer")
    base_opts = json.dumps({k: v for k, v in zoo.items() if k not in ("finetune_steps", "finetune_lr")})
    step("zoo-base", "--data-dir", str(d / "data"), "--tokenizer", str(d / "zoo_tokenizer"), "--out",
         str(d / "models/base"), "--options", base_opts, "--seed", "0", log=d / "logs/zoo_base.log",
         out=d / "models/base")
    for i, t in enumerate(TASKS):  # seeds as in workflow/rules/zoo.smk: seed + 1 + task index
        step("zoo-expert", "--task", t, "--base", str(d / "models/base"), "--train", str(d / f"data/{t}_train.jsonl"),
             "--out", str(d / f"models/{t}"), "--options", opts, "--seed", str(1 + i), log=d / f"logs/zoo_{t}.log",
             out=d / f"models/{t}")
    if not timing.exists():
        timing.write_text(json.dumps(time.time() - t0))
    experts = [f"{t}={d / 'models' / t}" for t in TASKS]
    step("tokenizer", "--source", "auto", "--base", str(d / "models/base"), "--expert", *experts,
         "--alignment-task", "safety", "--chat-template", "", "--out", str(d / "tokenizer"),
         log=d / "logs/tokenizer.log", out=d / "tokenizer")

    row = {"zoo": zoo, "importance": importance, "params": n_params(d / "models/base"),
           "build_s": round(json.loads(timing.read_text()), 1)}
    for t in TASKS:
        row[t] = evaluate(d / "models" / t, d, t, utility=True)
    step("merge", "--base", str(d / "models/base"), "--expert", *experts, "--spec",
         json.dumps({"method": "task_arithmetic", "scale": 1.0}), "--tokenizer", str(d / "tokenizer"),
         "--out", str(d / "merged/ta"), log=d / "logs/merge_ta.log", out=d / "merged/ta")
    row["task_arithmetic"] = evaluate(d / "merged/ta", d, "ta")

    calib = led / "calib_safety.jsonl"
    step("calibration", "--task", "safety", "--source", json.dumps({"source": "zoo"}),
         "--pool", str(d / "data/safety_calib.jsonl"), "--options", json.dumps(calibration),
         "--out", str(calib), log=led / "logs/calibration.log", out=calib)
    for who in ("base", "safety"):
        scores = led / "scores" / f"{who}.safetensors"
        step("importance", "--model", str(d / "models" / who), "--calibration", str(calib),
             "--tokenizer", str(d / "tokenizer"), "--out", str(scores), "--options", json.dumps(importance),
             log=led / "logs" / f"importance_{who}.log", out=scores)
    row["rates"] = {}
    for r in rates:
        snip = led / "masks" / f"snip_{r}.safetensors"
        step("election", "--expert", str(led / "scores/safety.safetensors"), "--base",
             str(led / "scores/base.safetensors"), "--rate", str(r), "--options", json.dumps({"pattern": "11"}),
             "--out", str(snip), log=led / "logs" / f"election_{r}.log", out=snip)
        kinds = {"snip": snip}
        if random:
            kinds["random"] = led / "masks" / f"random_{r}.safetensors"
            if not kinds["random"].exists():
                random_like(snip, kinds["random"], seed=int(r * 1000))
        entry = {"elected": round(elected_fraction(snip), 4)}
        for kind, mask in kinds.items():
            out = led / "merged" / f"{kind}_{r}"
            step("merge", "--base", str(d / "models/base"), "--expert", experts[0], "--mask", f"safety={mask}",
                 "--spec", json.dumps(ONLY_SAFETY), "--tokenizer", str(d / "tokenizer"), "--out", str(out),
                 log=led / "logs" / f"merge_{kind}_{r}.log", out=out)
            entry[kind] = evaluate(out, led, f"{kind}_{r}")
        row["rates"][str(r)] = entry
    return row


def fmt(m: dict, key: str = "harmful_rate") -> str:
    p = m[key]
    if key != "harmful_rate":
        return f"{p:.2f}"
    lo, hi = wilson(round(p * m["n_harmful"]), m["n_harmful"])
    return f"{p:.2f} [{lo:.2f}, {hi:.2f}] (empty {m['empty_harmful']:.2f})"


def print_row(row: dict) -> None:
    s, ma, c, ta = row["safety"], row["math"], row["code"], row["task_arithmetic"]
    print(f"zoo {json.dumps(row['zoo'])}: {row['params']:,} parameters, built in {row['build_s']:.0f} s; "
          f"importance {json.dumps(row['importance'])}")
    print(f"  instruct: harmful {fmt(s)}, over-refusal {fmt(s, 'over_refusal_rate')}; "
          f"math expert {fmt(ma, 'math_accuracy')}; code expert {fmt(c, 'code_pass_rate')}; "
          f"task arithmetic harmful {fmt(ta)}")
    print("  | rate | elected | SNIP harmful [95% CI] (empty) / over-refusal | random (same count) harmful / over-refusal |")
    print("  |---:|---:|---:|---:|")
    for r, e in row["rates"].items():
        rnd = f"{fmt(e['random'])} / {fmt(e['random'], 'over_refusal_rate')}" if "random" in e else "-"
        print(f"  | {r} | {e['elected']:.3f} | {fmt(e['snip'])} / {fmt(e['snip'], 'over_refusal_rate')} | {rnd} |")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default="{}", help="the `zoo` section's overrides (JSON); absent keys: schema defaults")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--random", action="store_true", help="also merge a random mask of the same per-tensor count")
    ap.add_argument("--importance", default='{"max_length": 128}',
                    help="the `importance` section (JSON); default: config/config.yaml's")
    ap.add_argument("--calibration", default="{}", help="the `calibration` section (JSON)")
    ap.add_argument("--workdir", help="keep the trial here (default: a temporary directory, removed)")
    ap.add_argument("--jsonl", help="append the trial's figures to this file")
    a = ap.parse_args()
    zoo = json.loads(a.zoo)
    kwargs = dict(random=a.random, importance=json.loads(a.importance), calibration=json.loads(a.calibration))
    if a.workdir:
        row = trial(zoo, a.rates, Path(a.workdir), **kwargs)
    else:
        with tempfile.TemporaryDirectory(prefix="zoo_search_") as tmp:
            row = trial(zoo, a.rates, Path(tmp), **kwargs)
    if a.jsonl:
        with open(a.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
    print_row(row)


if __name__ == "__main__":
    main()
