"""Reading LED's mask and score files tensor by tensor: one reader per file against one open per tensor.

The merge reads each task's final masks one tensor at a time, and the election each score file likewise. A
safetensors header lists every tensor (a mask file's metadata also holds every mask's shape as JSON), so a reader
that opens the file per tensor parses the whole header again for every tensor: quadratic in the tensor count
(Llama-2-70B has 723 tensors, 560 of them linear weights; a mixture-of-experts model with dozens of experts per
layer has thousands). This writes the final masks of a model with --tensors
tensors (small random bool masks at r = --rate, realistic Llama names and aspect ratios, one file per task,
`ledmerge.led.files.save_masks`) and one rank16 score file of the same tensors, then times reading every tensor:

- `MaskFile` / `ScoreFile` (`ledmerge.led.files`): open once, parse and validate the header once, `get(name)`
  per tensor; for the masks also `MaskFiles.for_tensor` over all tasks, what the merge calls per tensor;
- one open per tensor, as before the readers: `load_masks(path, [name])` / `load_scores(path, [name])` per
  tensor (each call one reader: header parsed and, for masks, validated, then one tensor), which is what
  `MaskFiles.for_tensor` and the election did per tensor;
- bare `safe_open` + `get_tensor` per tensor: the header parse alone, without ledmerge's checks (a floor for
  any one-open-per-tensor reader).

Each case runs --repeat times; the best wall time is printed (files are in the page cache: they were just
written). Every way must return the same tensors (checked). Prints Markdown tables.

    PYTHONPATH=src .venv/bin/python bench/mask_read_bench.py               # 2,000 tensors, 3 tasks
    PYTHONPATH=src .venv/bin/python bench/mask_read_bench.py --tensors 500 --tasks 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from ledmerge.led.files import (
    MaskFile,
    MaskFiles,
    ScoreFile,
    load_masks,
    load_scores,
    save_masks,
    save_scores,
    unpack_bits,
)

HERE = Path(__file__).resolve().parent
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def tensor_shapes(n: int, hidden: int) -> dict[str, tuple[int, int]]:
    """`n` Llama linear weights, 7 per decoder layer, with Llama's aspect ratios at hidden size `hidden`."""
    kv, inter = hidden // 4, hidden * 11 // 4
    shape = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
             "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    names = [f"model.layers.{i // 7}.{MODULES[i % 7]}.weight" for i in range(n)]
    return {name: shape[name.split(".")[-2]] for name in names}


def best(fn, repeat: int) -> tuple[object, float]:
    out, times = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times)


def mask_cases(paths: dict[str, Path], shapes: dict) -> dict[str, object]:
    names = list(shapes)

    def reader():
        out = {}
        for task, path in paths.items():
            with MaskFile(path) as f:
                out[task] = {name: f.get(name) for name in names}
        return out

    def merge_reader():
        with MaskFiles(paths, shapes) as masks:
            per_tensor = {name: masks.for_tensor(name) for name in names}
        return {task: {name: per_tensor[name][task] for name in names} for task in paths}

    def per_tensor():
        return {task: {name: load_masks(path, [name])[name] for name in names} for task, path in paths.items()}

    def bare():
        out = {}
        for task, path in paths.items():
            out[task] = {}
            for name in names:
                with safe_open(str(path), framework="pt") as f:
                    out[task][name] = unpack_bits(f.get_tensor(name), shapes[name])
        return out

    return {"`MaskFile`: one open per file, `get` per tensor": reader,
            "`MaskFiles.for_tensor` (the merge's reads)": merge_reader,
            "`load_masks(path, [name])` per tensor (one open per tensor)": per_tensor,
            "bare `safe_open` + `get_tensor` per tensor": bare}


def score_cases(path: Path, shapes: dict) -> dict[str, object]:
    names = list(shapes)

    def reader():
        with ScoreFile(path) as f:
            return {name: f.get(name) for name in names}

    def per_tensor():
        return {name: load_scores(path, [name])[name] for name in names}

    def bare():
        out = {}
        for name in names:
            with safe_open(str(path), framework="pt") as f:
                out[name] = f.get_tensor(name).float()
        return out

    return {"`ScoreFile`: one open per file, `get` per tensor": reader,
            "`load_scores(path, [name])` per tensor (one open per tensor)": per_tensor,
            "bare `safe_open` + `get_tensor` per tensor": bare}


def run_table(title: str, cases: dict, n_reads: int, repeat: int) -> None:
    print(f"\n{title}\n")
    print("| case | tensor reads | best wall s | µs per tensor | x one reader |")
    print("|---|---|---|---|---|")
    first_time, reference = None, None
    for name, fn in cases.items():
        got, wall = best(fn, repeat)
        if reference is None:
            reference, first_time = got, wall
        else:
            assert_same(reference, got, name)
        print(f"| {name} | {n_reads} | {wall:.3f} | {wall / n_reads * 1e6:.0f} | {wall / first_time:.1f} |", flush=True)


def assert_same(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same(a[k], b[k], what)
    else:
        assert a.dtype == b.dtype and torch.equal(a, b), what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=2000, help="tensors per file (default 2000)")
    ap.add_argument("--tasks", type=int, default=3, help="final mask files, one per task (default 3)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the masks' shapes (default 64)")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    workdir = Path(tempfile.mkdtemp(prefix="mask_read_", dir=args.workdir))
    try:
        shapes = tensor_shapes(args.tensors, args.hidden)
        g = torch.Generator().manual_seed(0)
        paths = {}
        for t in range(args.tasks):
            paths[f"task{t}"] = workdir / f"final_task{t}.safetensors"
            save_masks(paths[f"task{t}"], {n: torch.rand(s, generator=g) < args.rate for n, s in shapes.items()},
                       metadata={"kind": "disjoint", "task": f"task{t}", "rate": repr(args.rate)})
        scores = workdir / "scores.safetensors"
        save_scores(scores, {n: torch.rand(s, generator=g) for n, s in shapes.items()}, metadata={"kind": "importance"})

        numel = sum(a * b for a, b in shapes.values())
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}, torch {torch.__version__}")
        print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
        print(f"{args.tensors} tensors ({numel / 1e6:.2f}M weights) per file; mask files: {args.tasks} x "
              f"{paths['task0'].stat().st_size / 1e6:.2f} MB; score file: {scores.stat().st_size / 1e6:.2f} MB; best of "
              f"{args.repeat}")
        run_table(f"Final masks: read every tensor of {args.tasks} mask file(s)", mask_cases(paths, shapes),
                  args.tensors * args.tasks, args.repeat)
        run_table("Scores: read every tensor of one rank16 score file", score_cases(scores, shapes), args.tensors,
                  args.repeat)
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
