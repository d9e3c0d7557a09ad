"""Location: SNIP importance scores I(θ; X) = |W| ⊙ Σ_x |∂L(x)/∂W| (see docs/methods.md), and the ablations'
other location methods (`location`, `location_score`).

L(x) = −log p(response | prompt) over the response tokens only, summed (or averaged: `loss_reduction`),
the prompt rendered with the run's chat template (`ledmerge.tokenizer`: the same token ids for the base and
the expert) and masked by `ledmerge.chat.encode`.

How it is computed, and why:
- One forward/backward per (micro-)batch for the whole model, never per layer: every parameter's
  gradient comes out of the same backward pass, so re-running the data once per layer (as the released
  LED code does) only multiplies the cost.
- `granularity="example"` (default, the paper's definition): |grad| is the absolute per-example gradient.
  With batch_size 1 each example is its own pass. With batch_size > 1 a micro-batch shares one forward and
  backward, and `ledmerge.led.per_example` rebuilds each example's gradient module by module inside the backward
  (a linear's is Σ_positions gᵀx over the example's real positions; embeddings, tied embedding/LM head and
  norms likewise), never computing the summed weight gradients. Same sums up to float32 rounding: padding
  changes the order of some sums in the attention backward, so near-ties at a mask's cut-off can swap.
  Models it cannot split that way (see `per_example.NotBatchable`) fall back to one example per pass, with
  a warning. Per-sample gradients via torch.func.vmap were rejected: they hold batch_size copies of every
  gradient.
- `granularity="batch"`: micro-batches of `batch_size` examples; |Σ_{x∈batch} ∂L(x)/∂W| is accumulated.
  Faster, but opposite-signed contributions inside a batch cancel, so scores are (slightly) lower.
- One example per pass, and granularity "batch": a post-accumulate-grad hook on every scored parameter adds
  |grad| into a float32 accumulator as soon as autograd has produced it and then drops the gradient, so no
  second copy of the gradients is held and bf16 models do not lose small contributions across examples.
  Unscored parameters are frozen. The batched per-example path sums into the same float32 accumulators.
- |W| is the model's own (possibly bf16) weight cast to float32.

Pass count. N calibration examples cost ⌈N/batch_size⌉ forward+backward passes in all, each pass scoring
every tensor of every layer at once. The released LED code scores layer by layer, re-running all calibration
samples once per layer: N×L passes for L layers, 32x the passes for an 8B model (Llama-3-8B has L = 32
decoder layers; 128 examples at batch size 1: 128 passes against 4,096). `score_model` reports both
(`n_forward_backward`, `reference_passes` = N×L).

Real checkpoints:
- `device_map` ("auto", "balanced", {module: device}, ...) is handed to `from_pretrained` (accelerate) to
  spread a model over the GPUs of a node; each accumulator lives on its own parameter's device and only the
  finished scores move to the CPU. Weights offloaded to CPU/disk (meta parameters) have no gradient and are
  refused: give the job more GPUs or set `max_memory`.
- `autocast="bf16"`: the forward runs under torch.autocast(bfloat16) on every device type the model uses;
  the loss (`chat.response_nll`) and the accumulators stay float32.
- `gradient_checkpointing`: every decoder layer's forward is wrapped in non-reentrant
  torch.utils.checkpoint while the model stays in eval mode. transformers' own
  `gradient_checkpointing_enable()` is not used: its layers checkpoint only when `self.training` is set
  (transformers 5.x, `GradientCheckpointingLayer`), so `model.eval()` silently turns it off, and training
  mode would turn dropout on. Same sums (recomputation is deterministic in eval mode), less memory.
- `trust_remote_code` is off unless the config turns it on.
- Progress: a tqdm bar over the passes.

Score files: 2 bytes per weight, as a rank code (`ledmerge.led.files.save_scores`/`ScoreFile`, the only writer and reader).
TopR depends only on the order of the scores inside a tensor, so files store that order, not the values.
Per tensor, entries with a score of 0 get code 0 (the election never elects them, `topk.top_r_positive`);
the m positive entries are ranked by score descending, ties by lowest flat index (the rule of
`topk.top_r_mask`), and position p (0 = best) gets code m−p when m ≤ 65535 (unique codes: every TopR equals
the float32 one exactly), else 1 + ⌊(m−1−p)·65535/m⌋ (equal-count bins of at most ⌈m/65535⌉ consecutive
ranks: TopR on the codes can differ from the float32 TopR only inside the bin holding the cut-off, so in at
most ⌈m/65535⌉ entries per tensor whatever the score distribution, and it still keeps exactly ⌈r·n⌉ entries).
bf16 was rejected: with 8 significant bits it merges all scores within one bf16 step (0.4–0.8% wide) into
one tied value, and the ties at the cut-off are then broken by index instead of by score: an error that
grows with how crowded the scores are around the cut-off, with no bound in entries. Codes are stored as
uint16 (metadata `score_encoding: rank16`) and read back as float32 (exact), higher = more important.
`score_dtype="float32"` writes the raw scores instead (debugging; 4 bytes per weight).
Location methods (`importance.location`), all ranked and stored alike, so the election and everything after it
are the same code whatever located the weights:
- `snip` (default, the paper's): |W| ⊙ Σ_x |∂L(x)/∂W|.
- `gradient`: Σ_x |∂L(x)/∂W| alone (what SNIP multiplies by |W|).
- `magnitude`: |W| alone; no calibration pass (the data is still encoded, for the token fingerprint).
- `wanda`: |W_ij| · ‖X_j‖₂, the norm of input feature j over every non-padding calibration token, from forward
  pre-hooks on the scored linear layers; forward passes only (no backward). Norms and embeddings are not inputs
  of a linear layer, so they cannot be scored this way (refused before any pass).
- `random_shared_draws` (formerly `random`): uniform scores in (0, 1] drawn on the CPU per tensor from
  sha256(seed, key, tensor name): the random-mask control that the released LED code calls (`_random_prune_core`).
  The workflow's key is the task (not the role), so a task's base and expert get the same scores, TopR of both
  coincide and pattern `11` elects exactly ⌈r·n⌉ random weights per tensor, far more than SNIP's intersection at
  the same rate; no calibration pass. The count-matched controls are `ledmerge.led.controls`.
The metadata records where the scores came from: the model's weight files (`model_files`: name -> bytes and
sha256, see `ledmerge.led.files`) and the calibration set (`calibration_sha256`); masks carry them on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import chat
from ..checkpoint import check_adapter, is_adapter, tensor_shapes
from ..errors import LedmergeError
from ..fileio import file_sha256, read_jsonl
from ..schema import resolve
from .files import MODEL_FILES, rank_code, save_scores, weights_fingerprint
from .per_example import NotBatchable, PerExampleTaps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# What each location method reads besides the weights: the summed |grad| ("grad"), the summed squared inputs of
# each linear layer ("act"), or nothing (no calibration pass).
LOCATION_NEEDS = {"snip": "grad", "gradient": "grad", "magnitude": None, "wanda": "act", "random_shared_draws": None}


# ---- location methods ----

def check_location(location: str, *, include_norms: bool = False, include_embeddings: bool = False,
                   random_seed: int | None = None, random_key: str | None = None) -> None:
    """Refuse, before any model is loaded, what a location method cannot score."""
    if location not in LOCATION_NEEDS:
        raise LedmergeError(f"unknown location method {location!r}: use one of {list(LOCATION_NEEDS)}")
    if location == "wanda" and (include_norms or include_embeddings):
        key = "include_norms" if include_norms else "include_embeddings"
        raise LedmergeError(f"location wanda scores only linear layers (|W| times the norm of their inputs): set "
                            f"importance.{key} to false, or use another location method")
    if location == "random_shared_draws" and (random_seed is None or random_key is None):
        raise LedmergeError("location random_shared_draws needs a seed and a key (the workflow passes the config seed and the "
                            "task): give --seed and --key")


def random_generator(seed: int, key: str, name: str) -> torch.Generator:
    """A CPU generator per (seed, key, tensor): the same draws whatever the device, order or other tensors."""
    digest = hashlib.sha256(json.dumps([seed, key, name]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def location_score(location: str, weight: torch.Tensor, *, grad_sum: torch.Tensor | None = None,
                   act_sq_sum: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The float32 score of one weight tensor, on its device, from what the calibration passes accumulated:
    `grad_sum` = Σ_x |∂L(x)/∂W| (snip, gradient; updated in place so no second copy is held), `act_sq_sum` =
    Σ x_j² per input feature j of the layer (wanda), `generator` (random). Higher = more important; 0 is never
    elected."""
    w = weight.detach().float().abs()
    if location == "snip":
        return grad_sum.mul_(w)
    if location == "gradient":
        return grad_sum
    if location == "magnitude":
        return w
    if location == "wanda":  # |W_ij| · ‖X_j‖₂: one norm per input column, broadcast over the output rows
        return w.mul_(act_sq_sum.to(w.device).sqrt())
    if location == "random_shared_draws":  # (0, 1]: no draw is 0, so every weight can be elected
        return torch.rand(weight.shape, generator=generator).neg_().add_(1).to(weight.device)
    raise LedmergeError(f"unknown location method {location!r}: use one of {list(LOCATION_NEEDS)}")


@contextlib.contextmanager
def _input_sq_sums(model: nn.Module, params: dict[str, nn.Parameter], sums: dict, attention: dict):
    """Σ x_j² over the non-padding tokens (attention["mask"], set per pass) of every input feature of each scored
    linear layer, into `sums` (name -> float32 on the layer's device): forward pre-hooks, removed on exit."""
    names = {id(p): name for name, p in params.items()}
    sums.clear()
    handles = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in names and names[id(module.weight)] not in sums:
            buf = sums[names[id(module.weight)]] = torch.zeros(module.in_features, dtype=torch.float32,
                                                               device=module.weight.device)

            def hook(_module, args, _buf=buf):
                x = args[0].detach().float()
                keep = attention["mask"].to(device=x.device, dtype=x.dtype).reshape(*x.shape[:-1], 1)
                _buf.add_(x.square().mul_(keep).reshape(-1, x.shape[-1]).sum(0))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---- scoring ----

def scored_parameters(model: nn.Module, *, include_norms: bool = False, include_embeddings: bool = False,
                      include_lm_head: bool = False) -> tuple[dict[str, nn.Parameter], dict[int, list[str]]]:
    """What gets scored: every nn.Linear weight except the LM head, plus the optional norms, input
    embeddings and LM head. Returns (name -> parameter, id(parameter) -> all its names); a tied
    embedding/LM head is one parameter, listed once."""
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    chosen: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not out_emb:
            chosen.append(module.weight)
        elif include_norms and "norm" in type(module).__name__.lower():
            chosen.extend(p for p in module.parameters(recurse=False))
    if include_embeddings and in_emb is not None:
        chosen.append(in_emb.weight)
    if include_lm_head and out_emb is not None:
        chosen.append(out_emb.weight)
    ids = {id(p) for p in chosen}
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in ids:
            names.setdefault(id(p), []).append(name)
    unique = {id(p): p for p in chosen}
    return {names[i][0]: p for i, p in unique.items()}, names


def _checkpoint_names(params: dict[str, nn.Parameter], aliases: dict[int, list[str]],
                      shapes: dict[str, tuple[int, ...]] | None) -> dict[str, nn.Parameter]:
    """Rename parameters to the names the checkpoint stores them under (a tied weight is stored once)."""
    if shapes is None:
        return params
    out = {}
    for name, p in params.items():
        hit = [n for n in aliases[id(p)] if n in shapes]
        if not hit:
            raise LedmergeError(
                f"parameter {name} is not in the checkpoint under that name (nor any alias {aliases[id(p)]}): "
                "ledmerge needs models whose state-dict names match their safetensors names")
        if tuple(shapes[hit[0]]) != tuple(p.shape):
            raise LedmergeError(f"{hit[0]} has shape {list(shapes[hit[0]])} in the checkpoint but {list(p.shape)} "
                                "in the loaded model: the checkpoint and its config disagree")
        out[hit[0]] = p
    return out


def encode_rows(tokenizer, rows: list[dict], max_length: int) -> tuple[list[chat.Encoded], int]:
    """Encode calibration rows; rows with no response token left after truncation are dropped (counted)."""
    kept, skipped = [], 0
    for row in rows:
        enc = chat.encode(tokenizer, row["prompt"], row["response"], max_length)
        # Position 0 is never a target (labels shift by one), so it cannot count as a response token.
        if any(t != chat.IGNORE_INDEX for t in enc.labels[1:]):
            kept.append(enc)
        else:
            skipped += 1
    return kept, skipped


def _checkpoint_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to checkpoint: transformers' GradientCheckpointingLayer modules, else the children of
    the longest ModuleList of same-typed blocks (models loaded with trust_remote_code)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()
    layers = [m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        lists = [list(m) for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
                 and len({type(c) for c in m}) == 1]
        layers = max(lists, key=len, default=[])
    if not layers:
        raise LedmergeError(f"gradient checkpointing: {type(model).__name__} has no repeated layers to checkpoint; "
                            "set importance.gradient_checkpointing to false")
    return layers


@contextlib.contextmanager
def _checkpointed(layers: list[nn.Module]):
    """Wrap each layer's forward (instance attribute, so accelerate's device hooks stay inside) in
    non-reentrant torch.utils.checkpoint; restored on exit."""
    from torch.utils.checkpoint import checkpoint

    saved = []
    try:
        for layer in layers:
            own = "forward" in vars(layer)
            inner = layer.forward

            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            saved.append((layer, own, inner))
            layer.forward = forward
        yield
    finally:
        for layer, own, inner in saved:
            if own:
                layer.forward = inner
            else:
                del layer.forward


def _autocast(device_types: set[str], mode: str):
    stack = contextlib.ExitStack()
    if mode == "bf16":
        for dt in sorted(device_types):
            stack.enter_context(torch.autocast(device_type=dt, dtype=torch.bfloat16))
    return stack


def compute_scores(model: nn.Module, examples: list[chat.Encoded], pad_id: int, *,
                   checkpoint_shapes: dict | None = None, progress: bool = True, random_seed: int | None = None,
                   random_key: str | None = None, **opts) -> tuple[dict[str, torch.Tensor], dict]:
    """Scores for an in-memory model (on one device or spread by a device_map): name -> tensor on the CPU
    (uint16 rank16 codes, computed on each tensor's device, or float32 scores with score_dtype="float32"),
    plus counts. `opts`: the config's `importance` section (location, batch_size, granularity, include_*,
    autocast, gradient_checkpointing, score_dtype, loss_reduction; schema defaults for the rest; the loading keys
    dtype, device, device_map and max_length are score_model's); `random_seed` and `random_key` seed location
    random. The model is put in eval mode and its unscored parameters frozen (requires_grad is restored
    afterwards)."""
    o = resolve("importance", opts)
    location, batch_size, granularity, autocast, encoding, loss_reduction = (
        o[k] for k in ("location", "batch_size", "granularity", "autocast", "score_dtype", "loss_reduction"))
    include_norms, include_embeddings, include_lm_head, gradient_checkpointing = (
        o[k] for k in ("include_norms", "include_embeddings", "include_lm_head", "gradient_checkpointing"))
    check_location(location, include_norms=include_norms, include_embeddings=include_embeddings,
                   random_seed=random_seed, random_key=random_key)
    needs = LOCATION_NEEDS[location]
    if not examples:
        raise LedmergeError("no calibration example has a response token left: raise max_length or check the data")
    offloaded = sorted({n for n, p in model.named_parameters() if p.device.type == "meta"})
    if offloaded:
        raise LedmergeError(f"{len(offloaded)} parameters (e.g. {offloaded[0]}) are offloaded to CPU or disk (meta "
                            "device) and get no gradient: give the scoring job more GPUs or set max_memory")
    params, aliases = scored_parameters(model, include_norms=include_norms, include_embeddings=include_embeddings,
                                        include_lm_head=include_lm_head)
    params = _checkpoint_names(params, aliases, checkpoint_shapes)
    emb = model.get_input_embeddings()
    device = emb.weight.device if emb is not None else next(model.parameters()).device  # where input ids go
    device_types = {p.device.type for p in model.parameters()}
    layers = _checkpoint_layers(model) if gradient_checkpointing else []

    # float32 sums on each parameter's own device (several GPUs with a device_map)
    acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()} \
        if needs == "grad" else {}

    def autocast_ctx():  # a fresh context per use
        return _autocast(device_types, autocast)

    def make_hook(buf):
        def hook(p):
            buf.add_(p.grad.abs_())  # abs in place (exact in any dtype), then promoted into the fp32 sum
            p.grad = None
        return hook

    def run(taps: PerExampleTaps | None) -> tuple[int, int]:
        """All passes; returns (response tokens, passes). `taps`: per-example sums inside micro-batches."""
        step = 1 if granularity == "example" and taps is None else batch_size
        batches = [examples[i:i + step] for i in range(0, len(examples), step)] if needs else []
        n_tokens = 0
        with contextlib.ExitStack() as stack:
            for p in model.parameters():  # taps need no parameter gradient at all
                p.requires_grad_(taps is None and id(p) in scored_ids)
                p.grad = None
            if taps is None:
                for name in acc:
                    stack.callback(params[name].register_post_accumulate_grad_hook(make_hook(acc[name])).remove)
            else:
                stack.enter_context(taps)
            if needs == "act":
                stack.enter_context(_input_sq_sums(model, params, act, attention))
            stack.enter_context(_checkpointed(layers))
            for i, batch in enumerate(tqdm(batches, desc="importance", unit="pass", disable=not progress)):
                inputs = {k: v.to(device) for k, v in chat.collate(batch, pad_id).items()}
                labels = inputs.pop("labels")
                attention["mask"] = inputs["attention_mask"]
                lengths = taps.batch([len(e.input_ids) for e in batch]) if taps else contextlib.nullcontext()
                with autocast_ctx(), lengths:
                    logits = model(**inputs, use_cache=False).logits
                labels = labels.to(logits.device)
                if taps is None:  # the pass's loss
                    losses = chat.response_nll(logits, labels, reduction=loss_reduction).view(1)  # float32
                else:  # one loss per example, each reduced on its own
                    losses = chat.response_nll(logits, labels, reduction="none")
                    if loss_reduction == "mean":
                        losses = losses / (labels[:, 1:] != chat.IGNORE_INDEX).sum(dim=1).clamp(min=1)
                bad = (~torch.isfinite(losses.detach())).nonzero()
                if len(bad):  # before backward: one NaN would spread into every score
                    which = f"example {i * step + int(bad[0, 0])}" if len(losses) == len(batch) else \
                        f"examples {i * step}..{i * step + len(batch) - 1} (one batch)"
                    raise LedmergeError(
                        f"the loss on calibration {which} (0-based, of the {len(examples)} kept) is "
                        f"{float(losses.detach()[int(bad[0, 0])])}: the model's weights hold NaN/inf or its dtype "
                        "overflows; check the checkpoint, or score in dtype float32 without autocast")
                if needs == "grad":
                    losses.sum().backward()  # hooks (or taps) consume and free every scored gradient
                n_tokens += int((labels[:, 1:] != chat.IGNORE_INDEX).sum())
                del logits, losses
        return n_tokens, len(batches)

    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    scored_ids = {id(p) for p in params.values()} if needs == "grad" else set()
    act, attention = {}, {}  # wanda's sums of squared inputs; the pass's attention mask
    model.eval()  # no dropout: deterministic scores
    try:
        taps = None
        if needs == "grad" and granularity == "example" and batch_size > 1 and len(examples) > 1:
            try:
                taps = PerExampleTaps(model, params, acc, autocast=autocast_ctx)
            except NotBatchable as exc:
                warnings.warn(f"importance: one example per pass ({exc})", stacklevel=2)
        try:
            n_tokens, n_passes = run(taps)
        except NotBatchable as exc:  # seen in a forward, before that pass's backward: restart exactly
            warnings.warn(f"importance: one example per pass ({exc})", stacklevel=2)
            for a in acc.values():
                a.zero_()
            n_tokens, n_passes = run(None)
    finally:
        for p in model.parameters():
            p.requires_grad_(saved_flags[id(p)])
            p.grad = None
    scores = {}
    with torch.no_grad():
        for name, a in acc.items():  # all checked before any is ranked
            if not torch.isfinite(a.sum()):  # a sum of |grad| >= 0 is inf or NaN iff an entry is (or it overflows)
                bad = a[~torch.isfinite(a)]
                if len(bad):
                    raise LedmergeError(
                        f"the gradient of {name} is not finite ({float(bad[0])} in {len(bad)} entries, summed over "
                        f"{n_passes} pass(es)), so its scores would be meaningless: a float16/bfloat16 backward "
                        "overflowed or the checkpoint is broken; score in dtype float32 without autocast")
        for name in params:  # one tensor at a time, freeing its accumulator
            s = location_score(location, params[name], grad_sum=acc.pop(name, None), act_sq_sum=act.pop(name, None),
                               generator=random_generator(random_seed, random_key, name) if location == "random_shared_draws"
                               else None)
            if not torch.isfinite(s.sum()) and not torch.isfinite(s).all():
                raise LedmergeError(f"the weights of {name} hold NaN/inf, so its scores are not finite: the checkpoint "
                                    "is broken; fix or re-download it")
            scores[name] = rank_code(s) if encoding == "rank16" else s.cpu()
            del s
    return scores, {"n_examples": len(examples), "n_response_tokens": n_tokens, "n_forward_backward": n_passes}


def _num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text_cfg, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else 1


def tokens_sha256(examples: list[chat.Encoded]) -> str:
    """A fingerprint of the exact token ids and response masks a model was scored on."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()


def score_model(model_dir, calibration_path, out_path, *, tokenizer_dir=None, base_dir=None,
                trust_remote_code: bool = False, allow_pickle: bool = False, progress: bool = True,
                random_seed: int | None = None, random_key: str | None = None, **opts) -> dict:
    """Score a Hugging Face model directory on a calibration JSONL ({prompt, response, ...} rows) and write the
    scores, keyed by the checkpoint's tensor names, to `out_path` (safetensors, atomic) with `save_scores`:
    rank16 codes by default, raw float32 with score_dtype="float32".

    The text is encoded with `tokenizer_dir` (the run's tokenizer and chat template, `ledmerge.tokenizer`;
    default: the model's own), so the base and the expert of a task are scored on the same token ids; the
    score file records their fingerprint (`tokens_sha256`) and the election checks that both files agree.
    `loss_reduction`: "sum" over response tokens (default), or "mean" per response token of each pass, the
    Hugging Face loss the released LED code differentiates.

    `location` (the importance section's) picks the location method; location random_shared_draws draws from `random_seed`
    and `random_key` (the workflow: the config seed and the task).

    `device_map` (e.g. "auto") spreads the model over the node's GPUs and makes `device` unused.
    `allow_pickle` also scores pickle (.bin) checkpoints. The score file records the model's weight files
    (`files.weights_fingerprint`, hashed in a thread while the model loads and is scored) and the
    calibration set's sha256, so a merge can refuse masks computed from other models.

    A PEFT LoRA adapter (`model_dir` holding adapter_config.json) is scored as the model it makes with the base at
    `base_dir`: peft's `merge_and_unload()` on the loaded base, so its scores carry the base checkpoint's tensor
    names, as the election and the merge expect; its provenance is the adapter's own files."""
    from transformers import AutoModelForCausalLM

    o = resolve("importance", opts)  # the schema's defaults and allowed values (options.py)
    max_length, dtype, device, device_map, score_dtype = (
        o[k] for k in ("max_length", "dtype", "device", "device_map", "score_dtype"))
    check_location(o["location"], include_norms=o["include_norms"], include_embeddings=o["include_embeddings"],
                   random_seed=random_seed, random_key=random_key)
    t0 = time.perf_counter()
    model_dir, calibration_path = Path(model_dir), Path(calibration_path)
    rows = read_jsonl(calibration_path, required=("prompt", "response"))
    adapter = is_adapter(model_dir)
    if adapter and base_dir is None:
        raise LedmergeError(f"{model_dir} is a PEFT adapter: scoring it needs its base model (--base)")
    shapes = tensor_shapes(base_dir if adapter else model_dir, allow_pickle)  # a clear error if not a model
    if adapter:
        check_adapter(model_dir, base_dir, shapes)  # before loading: targets the base lacks are one line
    torch.manual_seed(0)
    tokenizer = chat.load_tokenizer(tokenizer_dir or model_dir, trust_remote_code=trust_remote_code)
    examples, skipped = encode_rows(tokenizer, rows, max_length)
    if skipped:
        warnings.warn(f"{skipped} of {len(rows)} calibration examples in {calibration_path} have no response token "
                      f"within max_length={max_length} and were skipped", stacklevel=2)
    if not examples:
        raise LedmergeError(f"no example of {calibration_path} has a response token within max_length={max_length}: "
                            "raise max_length or shorten the prompts")
    hasher = ThreadPoolExecutor(1, "fingerprint")  # hashing first also pulls the files into the page cache
    fingerprint = hasher.submit(weights_fingerprint, model_dir, allow_pickle)
    hasher.shutdown(wait=False)
    where = f"device_map={device_map!r}" if device_map is not None else device
    load_dir = base_dir if adapter else model_dir
    try:
        if device_map is not None:  # accelerate places the layers; no .to() afterwards
            model = AutoModelForCausalLM.from_pretrained(load_dir, dtype=DTYPES[dtype], device_map=device_map,
                                                         trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(load_dir, dtype=DTYPES[dtype],
                                                         trust_remote_code=trust_remote_code).to(device)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
    except (RuntimeError, AssertionError, ValueError) as exc:  # e.g. a CUDA device that is not there
        fix = ": set trust_remote_code: true if you trust its code" if "custom code" in str(exc) else ""
        raise LedmergeError(f"cannot load {model_dir} on {where} ({' '.join(str(exc).split())}){fix}") from None
    scores, summary = compute_scores(model, examples, chat.pad_id(tokenizer), checkpoint_shapes=shapes,
                                     progress=progress, random_seed=random_seed, random_key=random_key, **o)
    n_layers = _num_layers(model)
    del model
    # What was computed, from the resolved options; where it ran (device, device_map) does not change the scores.
    options = {k: v for k, v in o.items() if k not in ("device", "device_map")}
    if o["location"] == "random_shared_draws":
        options.update(random_seed=random_seed, random_key=random_key)
    save_scores(out_path, scores, encoding=score_dtype, metadata={
        "kind": "importance", "model_dir": str(model_dir), "calibration": str(calibration_path),
        "calibration_sha256": file_sha256(calibration_path),
        MODEL_FILES: json.dumps(fingerprint.result(), sort_keys=True), "options": json.dumps(options, sort_keys=True),
        "tokenizer_dir": str(tokenizer_dir or model_dir), "tokens_sha256": tokens_sha256(examples),
        "n_examples": summary["n_examples"], "n_skipped": skipped, "n_response_tokens": summary["n_response_tokens"],
        "n_forward_backward": summary["n_forward_backward"],
    })
    summary["n_skipped"] = skipped
    summary["n_layers"] = n_layers
    summary["reference_passes"] = summary["n_examples"] * n_layers  # the released code's per-layer loop
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
