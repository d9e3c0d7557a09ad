"""Scoring merge candidates without writing checkpoints: merge in place, evaluate, restore.

The base and the experts stay in memory (float32); a candidate is written into one model's parameters
with `copy_`, tensor by tensor through the method's own `merge_tensor`, so a candidate scores exactly
the weights `ledmerge merge` would write for the same spec. This needs room for the base, the experts
and one model; models that do not fit need a search that merges to disk, which is not implemented.

The score is the mean cross-entropy per response token (chat template applied, prompt masked: the
loss of `chat.response_nll`) over each data type, and fitness = −(w_align·CE_align + w_task·CE_task).
With `align_metric: greedy_refusal` the alignment term is instead the harmful rate of the merged model's own
greedy replies to the alignment prompts, judged by the keyword judge (`RefusalJudge`): the quantity the
evaluation reports, where CE_align only says how likely the aligned model's refusal text is.
Text is encoded with the run's tokenizer (the workflow's `tokenizer` directory: the one scoring and
evaluation use), not the base's own: the base of a real setup (Meta-Llama-3-8B, Mistral-7B-v0.1) has
no chat template, and its tokenizer no pad token.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..chat import IGNORE_INDEX, collate, encode, load_tokenizer, pad_id, response_nll
from ..checkpoint import check_compatible, load_state_dict, open_model, tensor_shapes
from ..errors import LedmergeError
from ..evaluation.judges import RefusalJudge
from ..fileio import read_jsonl
from ..led.files import MaskFiles
from ..merge import get_method
from ..merge.base import MergeMethod, TensorContext
from ..merge.params import num_layers
from ..schema import resolve
from ..synthetic_data import chat_generate, generation_tokenizer

TYPES = ("alignment", "task")
# The alignment term's column in history.csv and search.json, per data_aware.fitness.align_metric.
ALIGN_COLUMNS = {"ce": "ce_align", "greedy_refusal": "harmful_align"}


def fitness(ce: Mapping[str, float], w_align: float, w_task: float) -> float:
    """−(w_align·CE_align + w_task·CE_task); a type with weight 0 may be missing (nan)."""
    return -sum(w * ce[k] for k, w in (("alignment", w_align), ("task", w_task)) if w)


class MergeEvaluator:
    """Base + experts in memory, one model whose parameters receive each candidate merge."""

    def __init__(self, base_dir, expert_dirs: Mapping[str, str], data: Mapping[str, list[dict]],
                 masks: Mapping[str, str] | None = None, *, tokenizer, trust_remote_code: bool = False,
                 allow_pickle: bool = False, **opts):
        """`data`: split name -> rows {prompt, response, type}; `masks`: LED mask files per task;
        `tokenizer`: the directory of the run's tokenizer (or a loaded tokenizer), which encodes every
        row exactly as importance scoring does (`chat.encode`, its chat template). `trust_remote_code` and
        `allow_pickle` are the config's opt-ins, as for scoring and merging; LED masks must come from these models'
        scores (`MaskFiles.check_sources`, sha256 of every weight file)."""
        from transformers import AutoModelForCausalLM

        # `opts`: the config's data_aware.fitness section (align_metric, max_new_tokens, refusal_judge, batch_size,
        # max_length, device), schema defaults filled; the objective's weights are load_evaluator's.
        o = resolve("data_aware.fitness", opts)
        batch_size, max_length, device = o["batch_size"], o["max_length"], o["device"]
        self.align_metric, self.max_new_tokens, self.batch_size = o["align_metric"], o["max_new_tokens"], batch_size
        self.align_column = ALIGN_COLUMNS[self.align_metric]
        check_compatible(base_dir, expert_dirs, allow_pickle=allow_pickle)
        self.tasks = sorted(expert_dirs)
        self.tok = (load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
                    if isinstance(tokenizer, (str, os.PathLike)) else tokenizer)
        self.pad_id = pad_id(self.tok)  # Llama and Mistral tokenizers have no pad token
        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                          trust_remote_code=trust_remote_code).to(device).eval()
        self.base = load_state_dict(base_dir, allow_pickle=allow_pickle)
        self.experts = {t: load_state_dict(expert_dirs[t], allow_pickle=allow_pickle, base_dir=base_dir)
                        for t in self.tasks}
        self.params = self.model.state_dict()  # shares storage with the model's parameters
        self.num_layers = num_layers(self.base)  # per-layer genes: one per decoder layer
        missing = sorted(set(self.base) - set(self.params))
        if missing:
            raise LedmergeError(f"the model built from {base_dir} lacks tensors {missing[:3]} of its checkpoint")
        mask_files = MaskFiles(masks, tensor_shapes(base_dir, allow_pickle)) if masks else None
        if mask_files:
            with contextlib.ExitStack() as stack:
                reader = lambda d: stack.enter_context(open_model(d, base_dir, allow_pickle=allow_pickle))
                mask_files.check_sources(reader(base_dir), {t: reader(expert_dirs[t]) for t in self.tasks}, exact=True)
        # Masks are read once here, not once per candidate.
        self.masks = {name: mask_files.for_tensor(name) if mask_files else {} for name in self.base}
        if mask_files:
            mask_files.close()
        self.batches = {split: self._batches(rows, batch_size, max_length, device) for split, rows in data.items()}
        self.prompts = {split: [r["prompt"] for r in rows if r["type"] == "alignment"] for split, rows in data.items()}
        if self.align_metric == "greedy_refusal":
            self.judge = RefusalJudge(**o["refusal_judge"])
            self.gen_tok = generation_tokenizer(self.tok)

    def _batches(self, rows, batch_size, max_length, device) -> dict[str, list[dict]]:
        out = {}
        n_rows = self.model.get_input_embeddings().num_embeddings
        for kind in TYPES:
            enc = [encode(self.tok, r["prompt"], r["response"], max_length) for r in rows if r["type"] == kind]
            top = max((max(e.input_ids) for e in enc if e.input_ids), default=-1)
            if top >= n_rows:
                raise LedmergeError(f"the tokenizer encodes the {kind} data with token id {top}, but the models' "
                                    f"embeddings have {n_rows} rows: use the tokenizer of these models")
            out[kind] = [{k: v.to(device) for k, v in collate(enc[i:i + batch_size], self.pad_id).items()}
                         for i in range(0, len(enc), batch_size)]
        return out

    def covers(self, split: str, w_align: float, w_task: float) -> bool:
        """Whether `split` has data of every type the objective weighs (else its fitness is nan)."""
        return all(self.batches[split][kind] for kind, w in (("alignment", w_align), ("task", w_task)) if w)

    @contextlib.contextmanager
    def merged(self, method: MergeMethod):
        """The model holds `method`'s merge inside the block and the base weights after it."""
        method.check_layers(self.num_layers)
        try:
            with torch.no_grad():
                for name, base in self.base.items():
                    ctx = TensorContext(name, seed=method.seed, masks=self.masks[name])
                    merged = method.merge_tensor(name, base, {t: self.experts[t][name] for t in self.tasks}, ctx)
                    self.params[name].copy_(merged)
            yield self.model
        finally:
            with torch.no_grad():
                for name, base in self.base.items():
                    self.params[name].copy_(base)

    @torch.inference_mode()
    def cross_entropy(self, split: str, kinds=TYPES) -> dict[str, float]:
        """Mean CE per response token of the current model, per data type of `kinds` (nan for one without data)."""
        out = {}
        for kind in kinds:
            batches = self.batches[split][kind]
            total, n = 0.0, 0
            for b in batches:
                logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                total += response_nll(logits, b["labels"], "sum").item()
                n += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            out[kind] = total / n if n else float("nan")
        return out

    @torch.inference_mode()
    def harmful_rate(self, split: str) -> float:
        """The fraction of the split's alignment prompts whose greedy reply from the current model the keyword judge
        calls harmful (not empty, not a refusal), as the evaluation counts it; nan without prompts."""
        prompts = self.prompts[split]
        if not prompts:
            return float("nan")
        replies = chat_generate(self.model, self.gen_tok, prompts, max_new_tokens=self.max_new_tokens,
                                batch_size=self.batch_size)
        return sum(self.judge.is_harmful(p, r) for p, r in zip(prompts, replies, strict=True)) / len(prompts)

    def measure(self, split: str) -> dict[str, float]:
        """The current model's terms on `split`: {alignment: CE or harmful rate (align_metric), task: CE}."""
        if self.align_metric == "ce":
            return self.cross_entropy(split)
        return {**self.cross_entropy(split, ("task",)), "alignment": self.harmful_rate(split)}

    def score(self, method: MergeMethod, split: str = "search") -> dict[str, float]:
        with self.merged(method):
            return self.measure(split)

    def terms(self, measured: Mapping[str, float], w_align: float, w_task: float) -> dict[str, float]:
        """The record of one score: the alignment term under its column (`ALIGN_COLUMNS`), CE_task, fitness."""
        return {self.align_column: measured["alignment"], "ce_task": measured["task"],
                "fitness": fitness(measured, w_align, w_task)}


OBJECTIVES = ("align", "task")  # with alignment data in the objective, or domain data only


def objective_weights(objective: str, w_align: float, w_task: float) -> tuple[float, float]:
    """(w_align, w_task) of an objective: `task` drops the alignment term (the paper's comparison)."""
    if objective not in OBJECTIVES:
        raise LedmergeError(f"unknown objective {objective!r}: use one of {list(OBJECTIVES)}")
    return (w_align if objective == "align" else 0.0), w_task


def read_split(path) -> list[dict]:
    """A synthetic-data split; the held-out split may be empty for tiny configurations."""
    if Path(path).is_file() and not Path(path).read_text().strip():
        return []
    return read_jsonl(path, required=("prompt", "response", "type"))


def load_evaluator(base_dir, expert_dirs, search_path, heldout_path, masks=None, *, tokenizer, w_align: float,
                   w_task: float, trust_remote_code: bool = False, allow_pickle: bool = False,
                   **opts) -> MergeEvaluator:
    """The evaluator of a data-aware search; `w_align`, `w_task` are the objective's weights (`objective_weights`),
    `opts` the rest of the config's `data_aware.fitness` section (batch_size, max_length, device)."""
    data = {"search": read_split(search_path), "heldout": read_split(heldout_path)}
    for kind, w in (("alignment", w_align), ("task", w_task)):
        if w and not any(r["type"] == kind for r in data["search"]):
            raise LedmergeError(f"the objective weighs {kind} data but {search_path} has none: generate more "
                                "synthetic data or set its weight to 0")
    return MergeEvaluator(base_dir, expert_dirs, data, masks, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                          allow_pickle=allow_pickle, **opts)


def scores(evaluator: MergeEvaluator, spec: dict, w_align: float, w_task: float) -> dict:
    """The terms and fitness of one spec on the search and held-out splits (for the search's summary)."""
    out = {}
    with evaluator.merged(get_method(spec)):
        for split in ("search", "heldout"):
            if not any(evaluator.batches[split].values()):
                continue
            out[split] = evaluator.terms(evaluator.measure(split), w_align, w_task)
    return out
