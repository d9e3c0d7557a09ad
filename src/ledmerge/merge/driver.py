"""The merge driver: `merge_models` applies a merge spec to a base and its experts, tensor by tensor.

It reads every input through `ledmerge.checkpoint.ModelReader` (one tensor at a time, read ahead by a thread; a
LoRA adapter expert through `AdapterReader`, which adds its `scale·B·A` to the base's tensor as it is read),
checks LED masks against the models they were computed from, stops on non-finite values, and writes the merged
model with `ShardedWriter`, then its config, tokenizer files, model card (`card.model_card`) and, for the methods
mergekit shares, the equivalent mergekit configuration (`mergekit_io.to_mergekit`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import AdapterReader, ModelReader, ShardedWriter, TensorSlices, align_rows, check_compatible, open_model
from ..errors import LedmergeError
from ..fileio import atomic_path, check_not_input, check_replaceable
from ..led.files import MaskFiles
from ..schema import resolve
from ..tokenizer import check_tokenizer_dir, copy_tokenizer_files
from .base import TensorContext
from .card import CONFIG_FILES, TOKENIZER_INPUTS, config_sha256s, model_card
from .mergekit_io import FILE_NAME as MERGEKIT_FILE
from .mergekit_io import floating_dtype, to_mergekit
from .params import num_layers
from .registry import get_method

log = logging.getLogger(__name__)

CHUNK = 1 << 18  # elements per elementwise step on the CPU (1 MiB in float32)
# Tensors from this many entries on (embeddings and LM heads of large vocabularies: Mistral's 131M, Llama-3's 525M)
# are read a slab at a time (`TensorSlices`) rather than whole, so a merge does not hold every input's copy at once.
SLICED = 1 << 26
SLAB = 1 << 22  # entries of every input read at a time from a sliced tensor (8 MiB per bf16 input)
MMAP_FROM = 1 << 26  # bytes from which a buffer has its own mapping (`keep_freed_buffers`)
KEEP_FREED = 1 << 28  # bytes of freed memory glibc may keep for reuse
SUMMARY_FILE = "ledmerge_merge.json"  # the recipe and what each post-step did per tensor (also the CLI's stdout)


def merge_device(device: str) -> torch.device:
    """The device merges compute on: cpu (default), or cuda[:i] when one is present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LedmergeError(f"merge device {device!r} is not a device: use cpu or cuda (cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LedmergeError(f"merge device {device!r} asked for, but torch sees no CUDA device here: use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise LedmergeError(f"merge device {device!r} is not supported: use cpu or cuda")
    return dev


def merge_models(base_dir: str | os.PathLike, expert_dirs: Mapping[str, str | os.PathLike], spec: Mapping,
                 out_dir: str | os.PathLike, masks: Mapping[str, str | os.PathLike] | None = None, *,
                 allow_pickle: bool = False, tokenizer_dir: str | os.PathLike | None = None,
                 progress: bool | None = None, force: bool = False, **opts) -> dict:
    """Merge the experts into the base with `spec`; write a sharded HF model directory (atomic) with a model card
    and, where mergekit has the method, `mergekit_config.yml`. Returns the merge's summary (also written to
    `SUMMARY_FILE` in it): the full recipe, and per post-step and tensor what the step did (SafeMERGE: the
    similarity and whether the layer was replaced).

    config.json comes from the base; tokenizer files, chat template and generation config (stop tokens) from
    `tokenizer_dir` (the workflow's `tokenizer` directory, see `ledmerge.tokenizer`), by default the base.

    Streams: one tensor of every input is in memory at a time (plus the next one, read ahead by a
    thread while the current one is merged), cast to float32 for the arithmetic and written back in
    the base's stored dtype, so peak memory is a small multiple of the largest tensor, whatever the
    model's size. Tensors of `SLICED` entries or more (the embeddings and LM heads of large vocabularies) are read
    a slab at a time instead, several times for the methods whose selection makes passes over the task vectors:
    their memory is the merged tensor and the selection's masks, not a copy per input.

    An existing `out_dir` is replaced only when it is an earlier merge (it holds `SUMMARY_FILE`) or empty, or with
    `force`; one that is, holds or lies inside an input is always refused (`fileio.check_not_input`).

    `opts`: the config's `merge` section (device, shard_size, vocab_policy), resolved through the schema
    (`schema.resolve`): what is not given takes the schema's default.
    """
    o = resolve("merge", opts)
    device, shard_size, vocab_policy = o["device"], o["shard_size"], o["vocab_policy"]
    method = get_method(spec)
    if not expert_dirs:
        raise LedmergeError("no expert models to merge: list at least one expert in the config")
    tasks = sorted(expert_dirs)
    method.check_inputs(tasks, masks)
    check_replaceable(out_dir, SUMMARY_FILE, force=force)
    check_not_input(out_dir, [base_dir, *expert_dirs.values(), *(masks or {}).values(), tokenizer_dir])
    if tokenizer_dir is not None:
        check_tokenizer_dir(tokenizer_dir)
    dev = merge_device(device)
    aligned = check_compatible(base_dir, expert_dirs, vocab_policy=vocab_policy, allow_pickle=allow_pickle)
    log.info("merging %s into %s with %s on %s", tasks, base_dir, method.recipe(), dev)

    with contextlib.ExitStack() as stack:
        open_reader = lambda d: stack.enter_context(open_model(d, base_dir, allow_pickle=allow_pickle, hash_files=True))
        base = open_reader(base_dir)
        method.check_layers(num_layers(base.names))
        experts = {t: open_reader(expert_dirs[t]) for t in tasks}
        mask_files = stack.enter_context(MaskFiles(masks, base.shapes)) if masks and method.uses_masks else None
        check_mask_sources(mask_files, base, experts)
        out = stack.enter_context(atomic_path(out_dir, directory=True, marker=SUMMARY_FILE, force=force))
        writer = ShardedWriter(out, [(n, base.infos[n].dtype, base.infos[n].shape) for n in base.names], shard_size)
        stack.callback(writer.abort)  # a failed merge closes its shard before the directory is removed
        check_free_space(out_dir, out, writer.total_size)

        def check_finite(name: str, start: int, b: torch.Tensor, inputs, merged: torch.Tensor | None) -> None:
            """Stop on a non-finite value in the float32 inputs or the stored result of one tensor (or flat chunk
            of it from `start`), naming the file and the tensor."""
            tensors = [b, *(inputs[t] for t in tasks), *([merged] if merged is not None else [])]
            found = first_nonfinite(tensors)
            if found is None:
                return
            k, i = found
            value = float(tensors[k].reshape(-1)[i])
            where = f"{value} at index {unravel(start + i, base.infos[name].shape)}"
            if k <= len(tasks):
                role, reader = ("the base", base) if k == 0 else (f"expert '{tasks[k - 1]}'", experts[tasks[k - 1]])
                raise LedmergeError(f"tensor {name} of {role} in {reader.source(name)} holds a non-finite value "
                                    f"({where}): the checkpoint is broken (a diverged fine-tune or a bad conversion); "
                                    "fix or re-download it, or leave that model out")
            raise LedmergeError(f"merging tensor {name} with {method.name} gives a non-finite value ({where}) from "
                                f"finite inputs (it overflows {base.infos[name].dtype}): lower the weights/lambda of "
                                f"the merge spec; nothing was written to {out_dir}")

        readers = [base, *experts.values()]

        def sliced(name: str) -> bool:
            """Whether tensor `name` is read a slab at a time: a large float tensor of safetensors inputs merged on
            the CPU without post-steps (which need whole tensors) or rows aligned to the base."""
            info = base.infos[name]
            return (dev.type == "cpu" and not method.post and info.dtype.is_floating_point
                    and math.prod(info.shape) >= SLICED and not any(name in rows for rows in aligned.values())
                    and all(type(r) is ModelReader and r.infos[name].begin >= 0 for r in readers))

        def load(name: str):
            """One tensor of every input, in its stored dtype (or, `sliced`, its `TensorSlices`), and its LED masks
            (run in the read-ahead thread)."""
            masks_of = mask_files.for_tensor(name) if mask_files else {}
            if sliced(name):
                return base.slices(name), {t: experts[t].slices(name) for t in tasks}, masks_of
            b = base.read(name)
            inputs = {t: experts[t].read(name) for t in tasks}
            for t in tasks:
                if name in aligned.get(t, ()):
                    inputs[t] = align_rows(inputs[t], b)
            base.wait_hashed()  # the merged result may overwrite b
            return b, inputs, masks_of

        def merge_one(name: str, b: torch.Tensor, inputs, tensor_masks, busy: bool) -> Callable[[], torch.Tensor]:
            """Start merging one tensor; returns what waits for its result. `busy`: the pool is still merging the
            previous tensor's chunks (see `merge_floats`)."""
            if not b.is_floating_point():  # integer buffers are copied from the base
                return lambda: b
            ctx = TensorContext(name, seed=method.seed, masks=tensor_masks)
            result = merge_floats(name, b, inputs, ctx, busy)

            def finish() -> torch.Tensor:
                merged = result()
                for step, record in ctx.report.items():
                    reports.setdefault(step, {})[name] = record
                return merged
            return finish

        def merge_floats(name: str, b: torch.Tensor, inputs, ctx: TensorContext, busy: bool) -> Callable[[], torch.Tensor]:
            """The common case, whole tensors on the CPU without post-steps, is pipelined: the whole-tensor choices
            (`select`) run while the pool still merges the previous tensor's chunks (one task's here, the others'
            queued on the pool, all single-threaded), and this tensor's chunks are queued behind them, so the cores
            never wait for one phase to end. The other cases are merged before returning."""
            layer_method = method.for_tensor(name)  # per-layer values: those of the tensor's layer
            if dev.type != "cpu":  # one whole tensor per kernel on a GPU
                ctx, b, inputs = ctx.to(dev), b.to(dev), {t: e.to(dev) for t, e in inputs.items()}
                fb, fe = b.float(), {t: e.float() for t, e in inputs.items()}
                try:
                    merged = layer_method.merge_tensor(name, fb, fe, ctx).to(b.dtype)
                except Exception:  # e.g. TIES' ranking refuses NaN: name the input that holds it
                    check_finite(name, 0, fb, fe, None)
                    raise
                check_finite(name, 0, fb, fe, merged)
                merged = merged.cpu()
                return lambda: merged
            # Whole-tensor choices (TIES, DARE): one task here, the others on the pool, single-threaded; a sliced
            # tensor's, one task at a time on torch's own threads unless the pool is busy.
            ctx.pool = None if isinstance(b, TensorSlices) else pool
            torch.set_num_threads(1 if busy or ctx.pool is not None else workers)
            try:
                ctx.kept = layer_method.select(b, inputs, ctx)
            except Exception:  # e.g. TIES' ranking refuses NaN: name the input that holds it
                for start, slab_b, slab_in in slabs(b, inputs):
                    check_finite(name, start, slab_b, slab_in, None)
                raise
            finally:
                torch.set_num_threads(1)
            # Without post-steps each chunk's result overwrites the base chunk it came from (copied to float32 just
            # before): no second tensor of the output's size (1 GB for an 8B model's LM head). Post-steps need the
            # whole float32 result before it is rounded to the stored dtype. A sliced tensor has no base copy in
            # memory to overwrite: its output is new (and post-steps never slice).
            if isinstance(b, TensorSlices):
                out = torch.empty(b.shape, dtype=b.dtype)
            else:
                out = torch.empty_like(b, dtype=torch.float32) if method.post else b
            flat_out = out.view(-1)

            def merge_chunk(start: int, slab_b: torch.Tensor, slab_in, offset: int) -> None:
                """Entries offset.. of the slab from `start`, in cache-sized pieces: each op stays in L2/L3."""
                part = slice(offset, offset + CHUNK)
                fb = slab_b[part].to(torch.float32, copy=True)  # a copy even of float32: the result may go there
                where = slice(start + offset, start + offset + fb.numel())  # a slab's last chunk may be shorter
                fe = {t: e[part].float() for t, e in slab_in.items()}
                flat_out[where] = layer_method.merge_elements(fb, fe, ctx.chunk(where))
                check_finite(name, start + offset, fb, fe, flat_out[where])  # all still in cache: one more read

            if not method.post and not isinstance(b, TensorSlices):
                flat_b, flat_in = b.reshape(-1), {t: e.reshape(-1) for t, e in inputs.items()}
                chunks = [pool.submit(merge_chunk, 0, flat_b, flat_in, offset) for offset in range(0, flat_b.numel(), CHUNK)]

                def result() -> torch.Tensor:
                    for c in chunks:
                        c.result()
                    return out
                return result
            for start, slab_b, slab_in in slabs(b, inputs):
                for _ in pool.map(functools.partial(merge_chunk, start, slab_b, slab_in), range(0, slab_b.numel(), CHUNK)):
                    pass
            if not method.post:
                return lambda: out
            torch.set_num_threads(workers)  # whole-tensor steps (SafeMERGE's products): torch's own threads
            try:
                merged = layer_method.finish(out, b, inputs, ctx).to(b.dtype)
            finally:
                torch.set_num_threads(1)
            check_finite(name, 0, b.reshape(-1), {t: e.reshape(-1) for t, e in inputs.items()}, merged.reshape(-1))
            return lambda: merged

        def slabs(b, inputs):
            """(start, base, {task: expert}) flat slabs of one tensor in order: views of whole tensors, or slabs
            read from `TensorSlices` (in file order, so the inputs' sha256 is fed as they are read)."""
            if not isinstance(b, TensorSlices):
                yield 0, b.reshape(-1), {t: e.reshape(-1) for t, e in inputs.items()}
                return
            for start in range(0, b.numel(), SLAB):
                part = slice(start, start + SLAB)
                yield start, b[part], {t: e[part] for t, e in inputs.items()}

        reports: dict[str, dict[str, dict]] = {}  # post-step -> tensor -> what it did (ctx.report)
        bar = tqdm(total=writer.total_size, desc=f"merge ({method.name})", unit="B", unit_scale=True, disable=progress is False)
        # The torch threads become a pool of Python threads, each running single-threaded torch ops on its own
        # chunk or task: no fork/join of OpenMP threads for every small op, and reads and writes overlap.
        workers = torch.get_num_threads()
        stack.callback(torch.set_num_threads, workers)
        torch.set_num_threads(1)
        pool = stack.enter_context(ThreadPoolExecutor(workers, "merge"))
        with bar, ThreadPoolExecutor(1, "read") as reader, ThreadPoolExecutor(1, "write") as writer_thread:
            order = writer.order
            ahead = reader.submit(load, order[0])
            written = pending = None  # pending: (name, result) of the tensor whose chunks the pool is merging

            def write_pending() -> None:
                nonlocal written
                name, result = pending
                merged = result()
                if written is not None:
                    written.result()  # at most one tensor waits for the disk
                written = writer_thread.submit(writer.write, name, merged)
                bar.update(merged.numel() * merged.element_size())

            for i, name in enumerate(order):
                loaded = ahead.result()
                if i + 1 < len(order):
                    ahead = reader.submit(load, order[i + 1])
                result = merge_one(name, *loaded, busy=pending is not None)
                del loaded
                if pending is not None:
                    write_pending()
                pending = name, result
            write_pending()
            if written is not None:
                written.result()
        writer.close()
        check_mask_sources(mask_files, base, experts, exact=True)  # before the output is renamed into place
        tokenizer = copy_tokenizer_files(tokenizer_dir or base_dir, out)
        write_model_config(Path(base_dir) / "config.json", out)
        hashes = {"base": base.sha256s(), **{f"expert `{t}`": experts[t].sha256s() for t in tasks}}
        for role, d in (("base", base_dir), *((f"expert `{t}`", expert_dirs[t]) for t in tasks)):
            hashes[role].update(config_sha256s(d, CONFIG_FILES))
        hashes["tokenizer"] = config_sha256s(tokenizer_dir or base_dir, TOKENIZER_INPUTS)
        # Rows aligned by index (vocab_policy base) have no mergekit setting: no equivalent then.
        exported = None if aligned else to_mergekit(method, base_dir, {t: expert_dirs[t] for t in tasks},
                                                     floating_dtype(base.infos))
        if exported is not None:
            (out / MERGEKIT_FILE).write_text(exported)
        (out / "README.md").write_text(model_card(method, base_dir, expert_dirs, hashes,
                                                  masks if mask_files else None, vocab_policy if aligned else None,
                                                  tokenizer, tokenizer_dir=tokenizer_dir or base_dir, reports=reports,
                                                  mergekit=exported is not None))
        summary = {"recipe": method.recipe(), "post_steps": reports}
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote merged model to %s (%d shard(s))", out_dir, len(writer.files))
    return summary


def keep_freed_buffers() -> None:
    """Let glibc keep the memory a merge frees for the next tensors instead of returning it to the kernel after each
    one. A merge streams tensors of the same few sizes, and under glibc's defaults every one of them is a fresh
    mapping: ~3 page faults per KiB read, a third of a 135M merge's time (merge_bench, startup_bench). Tensors of
    `MMAP_FROM` bytes or more still get their own mapping, returned when freed, so the memory kept is bounded by what
    the merge held at its peak. Process-wide, hence called by the `merge` step (its own process, also under the
    warm worker), not by `merge_models`; elsewhere than glibc it does nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, MMAP_FROM)
    mallopt(M_TRIM_THRESHOLD, KEEP_FREED)
    # One arena for all threads: a thread's own arena is made of 64 MiB heaps that glibc unmaps whenever one is
    # free, whatever the trim threshold, and buffers read in one thread are freed in another.
    mallopt(M_ARENA_MAX, 1)


def check_mask_sources(mask_files: MaskFiles | None, base: ModelReader,
                       experts: Mapping[str, ModelReader | AdapterReader], *,
                       exact: bool = False) -> None:
    """LED masks must come from the scores of these very models: weight file names and sizes up front, their
    sha256 (hashed while the merge read them) at the end; see `MaskFiles.check_sources`."""
    if mask_files is not None:
        mask_files.check_sources(base, experts, exact=exact)


def first_nonfinite(tensors: list[torch.Tensor]) -> tuple[int, int] | None:
    """(which tensor, flat index) of the first non-finite value, or None. The test is one float32 sum of each
    (NaN or inf anywhere makes the total non-finite); only then does the exact elementwise search run, which also
    turns a finite total's overflow into the false alarm it is. bfloat16 is summed as it is (float32's range, and
    half the bytes to read); float16 and narrower in float32, whose range a sum of them cannot leave."""
    total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for t in tensors:
        total += t.sum() if t.dtype in (torch.float32, torch.bfloat16, torch.float64) else t.sum(dtype=torch.float32)
    if math.isfinite(total.item()):
        return None
    for k, t in enumerate(tensors):
        bad = torch.isfinite(t.reshape(-1)).logical_not_().nonzero()
        if len(bad):
            return k, int(bad[0])
    return None


def unravel(flat: int, shape: tuple[int, ...]) -> list[int]:
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return index[::-1]


def check_free_space(out_dir, tmp: Path, needed: int) -> None:
    """Refuse to start a merge whose weights cannot fit on the output's disk (a file system that reports no free
    space at all is not trusted: the writes then tell)."""
    free = shutil.disk_usage(tmp).free
    size = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n} bytes"
    if 0 < free < needed:
        raise LedmergeError(f"cannot write {out_dir}: the merged weights need {size(needed)} but its disk has "
                            f"{size(free)} free; free space there or point the config's `results` at a larger disk, "
                            "then rerun")


def write_model_config(base_config: Path, out: Path) -> None:
    """The base's config.json, with the special-token ids of the generation config just copied in: a merged model
    whose template comes from the instruct expert must not say it stops on the base's EOS."""
    shutil.copy2(base_config, out / "config.json")
    for code in base_config.parent.glob("*.py"):  # a trust_remote_code model: the code its config names
        shutil.copy2(code, out / code.name)
    gen_path = out / "generation_config.json"
    if not gen_path.is_file():
        return
    cfg, gen = json.loads((out / "config.json").read_text()), json.loads(gen_path.read_text())
    ids = {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen and gen[k] != cfg.get(k)}
    if ids:
        (out / "config.json").write_text(json.dumps({**cfg, **ids}, indent=2, sort_keys=True) + "\n")
