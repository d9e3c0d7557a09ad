"""Random-weight Llama checkpoints written straight to safetensors, one tensor at a time.

Nothing is instantiated through transformers except on the `meta` device (no memory), which gives the
exact tensor names and shapes a real `LlamaForCausalLM` checkpoint has. Every tensor is drawn from a
generator seeded by (seed, model, tensor name), so the files do not depend on visiting order, and the
shards are streamed: the header is computed from the shapes first, then the bytes follow tensor by
tensor. Peak memory is a few copies of the largest tensor, whatever the model size.

Experts are base + delta with delta = rel · typ · z · exp(u), z, u ~ N(0, 1) (heavy tailed, like
fine-tuning updates; typ = 0.02 for matrices, 1 for norm gains), added in float32 and rounded to bf16:
deltas below half a bf16 ulp of the weight vanish, so the task vectors are sparse-ish the way real
bf16 fine-tunes are (rel = 0.02: ~13 % of the deltas are 0, the median is ~5 ulps of the weight). A
relative delta of 1e-3 would round to zero almost everywhere in bf16, whose spacing is 2^-8..2^-7
relative.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# name -> LlamaConfig keyword arguments. "1b" is TinyLlama-1.1B's shape; "3b" keeps hidden size,
# intermediate size and vocabulary (so the largest tensor is the same) and only adds layers.
_BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
            num_key_value_heads=4)
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=16000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4),          # 28.0M parameters
    "1b": dict(_BIG, num_hidden_layers=22),                                # 1.100B
    "3b": dict(_BIG, num_hidden_layers=65),                                # 2.994B
    "1b2": dict(_BIG, num_hidden_layers=2),  # 0.222B: 1b's widths and largest tensors, for quick iterations
    # Llama-3-8B's widths (vocabulary 128256, untied LM head) with 2 of its 32 layers: its largest tensors,
    # the 525M-entry embedding and LM head, on a small disk.
    "llama3": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                   num_key_value_heads=8, num_hidden_layers=2),                    # 1.486B
}
WEIGHT_STD = 0.02  # typical magnitude of a linear/embedding weight (HF initializer_range)


DTYPES = {"bfloat16": (torch.bfloat16, "BF16", torch.int16), "float32": (torch.float32, "F32", torch.int32)}


def llama_config(preset: str, dtype: str = "bfloat16"):
    from transformers import LlamaConfig

    kw = dict(PRESETS[preset], tie_word_embeddings=False, max_position_embeddings=2048, rms_norm_eps=1e-5,
              initializer_range=WEIGHT_STD, architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2,
              dtype=dtype)
    return LlamaConfig(**kw)


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the checkpoint, in transformers' state_dict order (meta device)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_shards(specs, shard_bytes: int, elem_size: int = 2) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in order, as transformers does: a new shard when the next tensor would overflow."""
    shards, cur, size = [], [], 0
    for name, shape in specs:
        b = numel(shape) * elem_size
        if cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += b
    if cur:
        shards.append(cur)
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def safetensors_header(tensors, dtype: str = "BF16", elem_size: int = 2) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding `tensors` back to back, in order."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        end = off + numel(shape) * elem_size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, end]}
        off = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _gen(seed: int, model: str, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}\0{model}\0{name}".encode()))


def is_norm(name: str, shape) -> bool:
    return len(shape) == 1


def base_tensor(seed: int, name: str, shape, dtype=torch.bfloat16) -> torch.Tensor:
    g = _gen(seed, "base", name)
    x = torch.randn(shape, generator=g)
    if is_norm(name, shape):
        x.mul_(0.05).add_(1.0)  # RMSNorm gains scattered around 1
    else:
        x.mul_(WEIGHT_STD)
    return x.to(dtype)


def expert_tensor(base: torch.Tensor, seed: int, expert: str, name: str, rel: float) -> torch.Tensor:
    g = _gen(seed, expert, name)
    typ = 1.0 if is_norm(name, base.shape) else WEIGHT_STD
    z = torch.randn(base.shape, generator=g)
    u = torch.randn(base.shape, generator=g)
    z.mul_(u.exp_()).mul_(rel * typ).add_(base)  # base (bf16, exact in f32) + heavy-tailed delta
    return z.to(base.dtype)


def _write(fh, t: torch.Tensor) -> None:
    as_int = DTYPES[str(t.dtype).removeprefix("torch.")][2]  # numpy has no bf16: write the raw bits
    fh.write(memoryview(t.contiguous().view(as_int).numpy()).cast("B"))


@dataclass
class CheckpointSpec:
    preset: str
    experts: int
    seed: int = 0
    delta_rel: float = 0.02
    shard_bytes: int = 2_000_000_000
    dtype: str = "bfloat16"  # or "float32" (no rounding: TIES then has no magnitude ties, no zero sums)
    version: int = 1  # bump when the generator changes, so stale files are not reused

    def model_names(self) -> list[str]:
        return ["base"] + [f"e{i}" for i in range(1, self.experts + 1)]


def estimate(spec: CheckpointSpec) -> dict:
    cfg = llama_config(spec.preset, spec.dtype)
    specs = tensor_specs(cfg)
    params = sum(numel(s) for _, s in specs)
    mask_elems = sum(numel(s) for n, s in specs if is_masked(n, s))
    elem = torch.empty(0, dtype=DTYPES[spec.dtype][0]).element_size()
    return {"config": cfg, "specs": specs, "params": params, "model_bytes": elem * params, "elem_size": elem,
            "mask_elems": mask_elems, "largest": max(numel(s) for _, s in specs)}


def is_masked(name: str, shape) -> bool:
    """LED scores the linear layers only (ledmerge's defaults leave out norms, embeddings, LM head)."""
    return len(shape) == 2 and ".layers." in name


def generate(spec: CheckpointSpec, root: Path, log=print) -> dict[str, Path]:
    """Write base + experts under root/<model>/ (config.json, generation_config.json, weights, index)."""
    from transformers import GenerationConfig

    info = estimate(spec)
    cfg, specs = info["config"], info["specs"]
    models = spec.model_names()
    dirs = {m: root / m for m in models}
    torch_dtype, st_dtype, _ = DTYPES[spec.dtype]
    shards = plan_shards(specs, spec.shard_bytes, info["elem_size"])
    files = shard_names(len(shards))
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        cfg.to_json_file(d / "config.json")
        GenerationConfig(bos_token_id=1, eos_token_id=2).to_json_file(d / "generation_config.json")
        if len(shards) > 1:
            weight_map = {name: fname for fname, shard in zip(files, shards) for name, _ in shard}
            index = {"metadata": {"total_size": info["model_bytes"]}, "weight_map": weight_map}
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for fname, shard in zip(files, shards):
        handles = {m: open(dirs[m] / fname, "wb") for m in models}
        try:
            header = safetensors_header(shard, st_dtype, info["elem_size"])
            for fh in handles.values():
                fh.write(header)
            for name, shape in shard:
                base = base_tensor(spec.seed, name, shape, torch_dtype)
                _write(handles["base"], base)
                for m in models[1:]:
                    _write(handles[m], expert_tensor(base, spec.seed, m, name, spec.delta_rel))
        finally:
            for fh in handles.values():
                fh.flush()
                os.fsync(fh.fileno())  # clean pages: the benchmark can then drop them from the cache
                fh.close()
        log(f"  wrote {fname} ({len(shard)} tensors) for {len(models)} models")
    stamp = json.dumps(asdict(spec), sort_keys=True)
    for d in dirs.values():
        (d / "bench_spec.json").write_text(stamp + "\n")
    return dirs


def existing(spec: CheckpointSpec, root: Path) -> bool:
    """True when root already holds these exact models (a --keep run): reuse instead of regenerating."""
    want = json.dumps(asdict(spec), sort_keys=True)
    for m in spec.model_names():
        stamp = root / m / "bench_spec.json"
        if not stamp.is_file() or stamp.read_text().strip() != want:
            return False
    return True


def write_masks(spec: CheckpointSpec, root: Path, density: float = 0.1, log=print) -> dict[str, Path]:
    """One random bool mask file per expert (linear weights only, `density` True), seeded per tensor."""
    from ledmerge.led.files import save_masks

    specs = estimate(spec)["specs"]
    out = {}
    root.mkdir(parents=True, exist_ok=True)
    for m in spec.model_names()[1:]:
        masks = {}
        for name, shape in specs:
            if is_masked(name, shape):
                g = _gen(spec.seed, f"mask-{m}", name)
                masks[name] = torch.rand(shape, generator=g) < density
        path = root / f"{m}.safetensors"
        save_masks(path, masks)
        del masks
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        out[m] = path
    log(f"  masks: {len(out)} files written (1 bit per weight)")
    return out
