"""Prompt/response pairs to token ids with the loss on response tokens only.

Shared by fine-tuning (the toy zoo), importance scoring and every loss the package computes, so all
of them mask the prompt the same way. The prompt is rendered with the tokenizer's own chat template
when it has one; the response mask is found by tokenizing the rendered prompt and the rendered
conversation and checking that one is a prefix of the other, which makes no assumption about BOS
tokens or about the first response token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def render(tokenizer, prompt: str, response: str | None = None) -> str:
    """The text the model sees: chat template if the tokenizer has one, else `prompt\\n response<eos>`."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if response is None:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(messages, tokenize=False)
    bos = tokenizer.bos_token or ""
    if response is None:
        return f"{bos}{prompt}\n"
    return f"{bos}{prompt}\n{response}{tokenizer.eos_token or ''}"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def encode(tokenizer, prompt: str, response: str, max_length: int | None = None) -> Encoded:
    prompt_text = render(tokenizer, prompt)
    full_text = render(tokenizer, prompt, response)
    if not full_text.startswith(prompt_text):
        raise ValueError("chat template renders the prompt differently with and without a response")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    n_prompt = len(prompt_ids)
    if full_ids[:n_prompt] != prompt_ids:
        # Merged tokens across the boundary: find the longest common prefix instead.
        n_prompt = next((i for i, (a, b) in enumerate(zip(full_ids, prompt_ids)) if a != b), min(len(full_ids), n_prompt))
    if max_length is not None and len(full_ids) > max_length:
        full_ids = full_ids[:max_length]  # keep the prompt; truncate the response end
    labels = [IGNORE_INDEX] * min(n_prompt, len(full_ids)) + full_ids[n_prompt:]
    return Encoded(full_ids, labels)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label IGNORE_INDEX."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def response_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Causal-LM cross-entropy over response tokens: −log p(response | prompt).

    `reduction`: "sum" (a total over the batch), "mean" (per response token) or "none" (per example sums).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view_as(shift_labels)
    if reduction == "none":
        return tok.sum(dim=1)
    if reduction == "sum":
        return tok.sum()
    return tok.sum() / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)


def load_tokenizer(path, trust_remote_code: bool = False):
    """The tokenizer every step of a run encodes with (the workflow's `tokenizer` directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def pad_id(tokenizer) -> int:
    """The id to pad batches with: the pad token, else the (first) EOS token, else 0.

    Llama and Mistral tokenizers have no pad token; padded positions are masked out of attention and
    loss by `collate`, so which id fills them does not change a result."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos if eos is not None else 0
