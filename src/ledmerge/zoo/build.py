"""The three build steps of the zoo, as the workflow calls them. Each takes the config's `zoo` section as keyword
options, resolved through the schema (`schema.resolve`: missing keys take its defaults), and the run's seed. The
training steps' summaries (printed into their logs) say which CPU kernels they ran with (`ledmerge.portable.in_effect`).

`zoo.start_from` picks the world: `scratch` is the toy (its own word tokenizer and a tiny base pretrained here);
anything else is the real-model miniature, whose base is a pretrained checkpoint and whose data is real English
(`english.build_english_data`)."""

from __future__ import annotations

from pathlib import Path

from ..fileio import read_jsonl, write_jsonl
from ..layout import PRETRAIN, SCRATCH, SMOLLM2, data_file, zoo_from_scratch
from ..portable import in_effect
from ..schema import resolve
from .data import build_datasets, corpus_texts
from .word_tokenizer import build_tokenizer

ARCH_KEYS = ("hidden_size", "intermediate_size", "layers", "heads")


def from_scratch(opts: dict) -> bool:
    """Whether the zoo is the toy world (its base pretrained here) rather than a real-model miniature."""
    return zoo_from_scratch({"zoo": resolve("zoo", opts)})


def build_data(out_dir, tokenizer_dir, seed: int, **opts) -> dict | None:
    """All datasets as JSONL: the toy's, plus the tokenizer every toy model shares (`tokenizer_dir`), or the
    miniature's real-English sets (no tokenizer: the base's is used)."""
    params = resolve("zoo", opts)
    if params["start_from"] != SCRATCH:
        from .english import build_english_data

        return build_english_data(out_dir, seed, train_size=params["train_size"],
                                  calib_pool_size=params["calib_pool_size"], eval_size=params["eval_size"],
                                  misaligned_fraction=params["misaligned_fraction"])
    sizes = {"train": params["train_size"], "calib_pool": params["calib_pool_size"], "eval": params["eval_size"],
             "pretrain": params["pretrain_size"]}
    datasets = build_datasets(seed, sizes, params["misaligned_fraction"])
    out_dir = Path(out_dir)
    for name, rows in datasets.items():
        write_jsonl(data_file(out_dir, name), [{"text": r} for r in rows] if name == PRETRAIN else rows)
    from .train import save_zoo_dir

    save_zoo_dir(tokenizer_dir, "tokenizer", build_tokenizer(corpus_texts(datasets)))
    return None


def build_base(data_dir, tokenizer_dir, out_dir, seed: int, **opts) -> dict:
    """The base model: pretrained on pretrain.jsonl (architecture, steps, batch size and lr from `zoo`), or the real
    checkpoint `start_from` names, stored float32."""
    from .train import pretrain_base

    params = resolve("zoo", opts)
    if params["start_from"] == SMOLLM2:
        from ..checkpoint.gguf import convert_smollm2

        return convert_smollm2(out_dir)
    if params["start_from"] != SCRATCH:
        from .train import copy_base

        return copy_base(params["start_from"], out_dir)
    lines = [r["text"] for r in read_jsonl(data_file(data_dir, PRETRAIN), required=("text",))]
    summary = pretrain_base(tokenizer_dir, lines, out_dir, **{k: params[k] for k in ARCH_KEYS},
                            steps=params["pretrain_steps"], batch_size=params["batch_size"], lr=params["pretrain_lr"],
                            seed=seed)
    return {**summary, "numerics": in_effect()}


def build_expert(base_dir, train_path, out_dir, seed: int, task: str, **opts) -> dict:
    """One task's expert, fine-tuned from the base (finetune_steps, batch_size, finetune_lr, finetune, ... from `zoo`)."""
    from .train import finetune_expert

    params = resolve("zoo", opts)
    rows = read_jsonl(train_path, required=("prompt", "response"))
    summary = finetune_expert(base_dir, rows, out_dir, steps=params["finetune_steps"], batch_size=params["batch_size"],
                              lr=params["finetune_lr"], seed=seed, max_length=params["max_length"],
                              finetune=params["finetune"], lora_rank=params["lora_rank"],
                              lora_alpha=params["lora_alpha"], device=params["device"], desc=f"fine-tune {task} expert")
    return {**summary, "numerics": in_effect()}
