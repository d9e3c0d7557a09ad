"""Golden merges: `ledmerge merge` on a pinned setting (tiny seeded float32 models, every task-vector preset and LED
with each of its combiners) must give the same bits as when the constants below were recorded. The other merge tests
check formulas with tolerances or against a reference computed the same way; this one notices any change of the bits
a merge writes: summation order, a dtype round trip, the TopR tie rule, DARE's draws.

The sha256 is over the tensors (name, dtype, shape and bytes, in sorted name order), not over the files, so the model
card, the summary, safetensors metadata and the sharding may change freely. Same machine, same bits is the project's
promise; across CPU architectures it is not (docs/results.md, "Reproducibility"), so a mismatch on another machine may
be legitimate. The inputs are drawn as integers (exact on every machine) and scaled by single float32 operations, so
that they, at least, are the same everywhere."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ledmerge.cli import main
from ledmerge.led.files import save_masks

# A one-layer Llama's tensor names and shapes (small: the merges take milliseconds).
SHAPES = {
    "model.embed_tokens.weight": (32, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.k_proj.weight": (16, 16),
    "model.layers.0.self_attn.v_proj.weight": (16, 16),
    "model.layers.0.self_attn.o_proj.weight": (16, 16),
    "model.layers.0.post_attention_layernorm.weight": (16,),
    "model.layers.0.mlp.gate_proj.weight": (24, 16),
    "model.layers.0.mlp.up_proj.weight": (24, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 24),
    "model.norm.weight": (16,),
    "lm_head.weight": (32, 16),
}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
          "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "tie_word_embeddings": False, "torch_dtype": "float32"}
TASKS = ("safety", "math", "code")

# The pinned setting and the sha256 of what each merge writes. Recorded with torch 2.13.0+cpu on x86-64 (Intel Xeon,
# AVX-512); the same there with ATEN_CPU_CAPABILITY=default, avx2 and avx512, and with 1 or 4 threads. The presets
# after dare_ties were recorded the same way, before the task-vector methods were rebuilt as one engine.
GOLDEN = {
    "task_arithmetic": ({"method": "task_arithmetic", "scale": 0.7, "weights": {"math": 0.5}},
                        "7e32a82c162ea77bc9f184c6346bca1fecc0f165161973f638c4d6ba8a82c65b"),
    "ties": ({"method": "ties", "density": 0.3},
             "e81917c0f61cc03cfe5a95b35e340dc4e5c377da2903ab2ac80e076cdab34e12"),
    "dare_ties": ({"method": "dare_ties", "drop": 0.3, "seed": 1234},
                  "520b880a80b7702e00522d9619f0a173e9a961c856b0b0567920e5986ba056e3"),
    "dare_linear": ({"method": "dare_linear", "drop": 0.3, "seed": 1234, "scale": 0.8, "weights": {"math": 0.5}},
                    "1383292daf222d8b183834fb05b84cdc6ca403d4b31ae322d59c30eaa34a012b"),
    "breadcrumbs": ({"method": "breadcrumbs", "density": 0.6, "gamma": 0.1, "rescale": True},
                    "7f7c86726ddd3b44ce8b8b051cb218830608059ee0d5cbef46f3cdb5dea0f6cd"),
    "breadcrumbs_ties": ({"method": "breadcrumbs_ties", "density": 0.6, "gamma": 0.1, "weights": {"code": 2.0}},
                         "2177d7087bc38fdc5b88281417acfbf18292327a2e9c9796912b2d30d26c3dd8"),
    "della": ({"method": "della", "density": 0.6, "epsilon": 0.2, "seed": 1234},
              "48d3827cb4d020c342ab8b432059ac664d8164e5c95506c23f0c5120d8c02a58"),
    "della_linear": ({"method": "della_linear", "density": 0.6, "epsilon": 0.2, "seed": 1234, "scale": 0.8,
                      "weights": {"math": 0.5}},
                     "c918623c2a37190e1c8e74254032a79a3beb4e9e38775b313befad27ead37384"),
    # LED with the masks of `mask_files` (the linear weights only: the other tensors follow `unscored`)
    "led": ({"method": "led", "lambdas": {"math": 0.5, "code": 2.0}, "unscored": "task_arithmetic"},
            "72db047ebe5c543c9173b3102ef23341d50fb48078b8112a8d0e385dafe42335"),
    "led_ties": ({"method": "led", "combine": "ties", "density": 0.5, "lambdas": {"math": 0.5}},
                 "7b620de5cc9b35a1020a3ab0fd4cd4bd2696108a2faba442707bf328b89404b7"),
    "led_dare_ties": ({"method": "led", "combine": "dare_ties", "drop": 0.3, "seed": 1234, "scale": 0.8},
                      "979f0ce946963f83fd0d4c698695ed3578dd8da78fa7419747d48d64fa01e39e"),
}


def draw(seed: int, scale: float) -> dict[str, torch.Tensor]:
    """Seeded float32 tensors: integers in [-64, 64] (many ties in magnitude, some zeros) times `scale`."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randint(-64, 65, shape, generator=g).float() * scale for name, shape in SHAPES.items()}


def save_model(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base (seed 0) and three experts, each base + its own seeded delta of about 1% of the base's scale."""
    root = tmp_path_factory.mktemp("golden")
    base = draw(0, 1 / 64)
    dirs = {"base": save_model(root / "base", base)}
    for seed, task in enumerate(TASKS, start=1):
        delta = draw(seed, 0.01 / 64)
        dirs[task] = save_model(root / task, {name: base[name] + delta[name] for name in SHAPES})
    return dirs


@pytest.fixture(scope="module")
def mask_files(tmp_path_factory) -> dict[str, Path]:
    """LED masks of the linear weights (the projections, as LED's location step scores them): each weight drawn to
    one task or none (seed 4), so the masks are disjoint; the embeddings, norms and LM head have none."""
    root = tmp_path_factory.mktemp("golden_masks")
    g = torch.Generator().manual_seed(4)
    owner = {name: torch.randint(0, len(TASKS) + 1, shape, generator=g)
             for name, shape in SHAPES.items() if "proj" in name}
    paths = {}
    for i, task in enumerate(TASKS, start=1):
        paths[task] = root / f"{task}.safetensors"
        save_masks(paths[task], {name: who == i for name, who in owner.items()})
    return paths


def tensors_sha256(out: Path) -> str:
    """sha256 over every tensor of the model directory, in sorted name order: name, dtype, shape, then its bytes."""
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    assert sorted(tensors) == sorted(SHAPES), f"the merged model's tensors: {sorted(tensors)}"
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        assert t.dtype == torch.float32 and tuple(t.shape) == SHAPES[name], (name, t.dtype, t.shape)
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("method", list(GOLDEN))
def test_merge_bits_are_pinned(models, mask_files, tmp_path, one_thread, method):
    spec, want = GOLDEN[method]
    out = tmp_path / method
    masks = ["--mask", *(f"{t}={mask_files[t]}" for t in TASKS)] if spec["method"] == "led" else []
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["--threads", "1", "merge", "--base", str(models["base"]),
                     "--expert", *(f"{t}={models[t]}" for t in TASKS), "--spec", json.dumps(spec), *masks,
                     "--out", str(out)])
    assert code == 0, stderr.getvalue()[-3000:]
    got = tensors_sha256(out)
    assert got == want, (
        f"the bits of the merged weights changed: `ledmerge merge` with {json.dumps(spec)} on the pinned tiny models "
        f"now writes tensors with sha256 {got}, not the recorded {want}. On the machine (CPU architecture, torch "
        "build) that recorded it this means the merge's arithmetic, selection or seeding changed: find the change "
        "and, if it is intended, record the new hash here. On another CPU architecture a difference may be "
        "legitimate: torch's vector kernels round differently there (docs/results.md, 'Reproducibility').")
