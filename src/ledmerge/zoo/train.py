"""Pretraining the toy base, and fine-tuning experts from a base (the toy's or a real checkpoint), deterministically.

Experts start from the base and train briefly with a small learning rate, like real instruction or
domain fine-tunes, so their task vectors stay small enough for merging to be meaningful. They are saved in float32
whatever the base's dtype: a bfloat16 copy would round most of a small fine-tuning update away.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..chat import IGNORE_INDEX, collate, encode, response_nll
from ..fileio import atomic_path

log = logging.getLogger(__name__)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(model, batches, steps: int, lr: float, desc: str, loss_fn) -> list[float]:
    trained = [p for p in model.parameters() if p.requires_grad]  # all of them, or the LoRA adapters
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup=max(1, steps // 20))
        batch = batches(step)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = loss_fn(logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return losses


MARKER = "ledmerge_zoo.json"  # in every toy-zoo directory: what it is, and proof to a rerun that ledmerge wrote it


def save_zoo_dir(out_dir: str | Path, what: str, *objects) -> None:
    """Write `objects` (a model, a tokenizer: anything with save_pretrained) into one toy-zoo directory, atomically."""
    with atomic_path(out_dir, directory=True, marker=MARKER) as tmp:
        for obj in objects:
            obj.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"toy_zoo": what}) + "\n")


def pretrain_base(tokenizer_dir: str | Path, lines: list[str], out_dir: str | Path, *, hidden_size: int,
                  layers: int, heads: int, intermediate_size: int, steps: int, batch_size: int, lr: float,
                  seed: int) -> dict:
    """Next-token pretraining on plain lines (every token is a target)."""
    _seed_all(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-5,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    encoded = [tok(f"{tok.bos_token} {line} {tok.eos_token}", add_special_tokens=False)["input_ids"] for line in lines]
    rng = random.Random(seed)

    def batches(_step):
        rows = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        enc = [_Plain(r) for r in rows]
        return collate(enc, tok.pad_token_id)

    start = time.time()
    losses = _train(model, batches, steps, lr, "pretrain base", lambda lg, lb: response_nll(lg, lb, "mean"))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    save_zoo_dir(out_dir, "base model", model, tok)
    return {"final_loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": time.time() - start,
            "parameters": sum(p.numel() for p in model.parameters())}


def copy_base(source: str | Path, out_dir: str | Path) -> dict:
    """A user's pretrained model as the zoo's base, in float32 (see the module's docstring), with its tokenizer."""
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    save_zoo_dir(out_dir, f"base model copied from {source}", model, tok)
    return {"source": str(source), "parameters": sum(p.numel() for p in model.parameters())}


class _Plain:
    """A plain-text example: every token after the first is a target."""

    def __init__(self, ids: list[int]):
        self.input_ids = ids
        self.labels = [IGNORE_INDEX] + ids[1:]


# The decoder's linear layers (Llama, Mistral, Qwen names): LoRA adapts these, as LoRA fine-tunes of the experts do.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def finetune_expert(base_dir: str | Path, rows: list[dict], out_dir: str | Path, *, steps: int, batch_size: int,
                    lr: float, seed: int, max_length: int, finetune: str = "full", lora_rank: int = 16,
                    lora_alpha: float = 32, device: str = "cpu", desc: str = "fine-tune") -> dict:
    """Fine-tuning in chat format with the loss on response tokens only: every weight (`full`) or LoRA adapters
    merged into the weights when saved (`lora`), so either way the expert is a full model directory."""
    _seed_all(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS))
    length = min(max_length, model.config.max_position_embeddings)
    encoded = [encode(tok, r["prompt"], r["response"], max_length=length) for r in rows]
    rng = random.Random(seed)

    def batches(_step):
        batch = collate([encoded[rng.randrange(len(encoded))] for _ in range(batch_size)], tok.pad_token_id)
        return {k: v.to(device) for k, v in batch.items()}

    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.time()
    losses = _train(model, batches, steps, lr, desc, lambda lg, lb: response_nll(lg, lb, "mean"))
    if finetune == "lora":
        model = model.merge_and_unload()
    save_zoo_dir(out_dir, desc, model.to("cpu"), tok)
    return {"final_loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": time.time() - start, "finetune": finetune,
            "trained_parameters": trained}
