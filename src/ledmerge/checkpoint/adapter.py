"""PEFT LoRA adapters as experts: the expert is the base plus `scale·B·A`, formed tensor by tensor as it is read.

An adapter directory (`adapter_config.json` + `adapter_model.safetensors`) holds, under peft's names, the low-rank
factors of every tensor it adapts (`base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r]),
and whole copies of the modules it trained outright (`modules_to_save`: `base_model.model.<module>.weight`).
`AdapterReader` reads like `ModelReader` with the base's names, shapes and dtypes, so the merge driver, the masks
and the model card see the same tensors as for a full expert: an adapted tensor is `W + scale·B·A`, computed in
float32 and stored in the base's dtype, as the model peft's `merge_and_unload()` saves; only one tensor's factors
are in memory at a time, never the merged model.

`scale = lora_alpha / r` (`use_rslora`: `lora_alpha / √r`), with r the tensor's own rank (A's row count, which
`rank_pattern` sets) and lora_alpha from `alpha_pattern` by peft's rule (the first pattern matching the end of the
module name). `fan_in_fan_out` (weights stored [in, out], GPT-2's Conv1D) transposes `B·A`.
What is not a plain sum on the base's weights is refused before any work, with one line: other peft types (IA³,
LoHa, ...), DoRA (its magnitude vector rescales `W + ΔW`), LoRA on embeddings, LoRA biases, trainable tokens.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LedmergeError
from .model_files import ADAPTER_CONFIG, is_adapter
from .reader import ModelReader, TensorInfo, tensor_shapes

PREFIX = "base_model.model."  # what peft's state dict puts before the base model's module names
_FACTOR = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")


@dataclass(frozen=True)
class Lora:
    """How one base tensor is adapted: its factors' names in the adapter file, and B·A's scale."""
    a: str
    b: str
    scale: float
    fan_in_fan_out: bool


@dataclass(frozen=True)
class AdapterPlan:
    """Base tensor -> its LoRA (`lora`), or -> the adapter tensor that replaces it whole (`whole`)."""
    config: dict
    lora: dict[str, Lora]
    whole: dict[str, str]


def adapter_config(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LedmergeError(f"cannot read {path} ({exc}): re-save the adapter with peft's save_pretrained") from None
    if not isinstance(cfg, dict):
        raise LedmergeError(f"{path} is not a JSON object: re-save the adapter with peft's save_pretrained")
    return cfg


def plan_adapter(adapter_dir: str | os.PathLike, factors: dict[str, tuple[int, ...]],
                 base: dict[str, tuple[int, ...]]) -> AdapterPlan:
    """Match the adapter's tensors (`factors`: name -> shape) to the base's (`base`); one-line error for anything
    that is not a LoRA on a base tensor of the right shape or a whole base tensor."""
    d = Path(adapter_dir)
    cfg = adapter_config(d)
    bad = lambda what, fix: LedmergeError(f"adapter {d}: {what}: {fix}")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise bad(f"peft_type {kind!r} is not supported", "ledmerge merges LoRA adapters only; merge it into its "
                  "base with peft's merge_and_unload() and save that as the expert")
    for key, what in (("use_dora", "DoRA rescales W + B·A by a learned magnitude, which is not a task vector sum"),
                      ("lora_bias", "it trains LoRA biases"), ("target_parameters", "it adapts bare parameters"),
                      ("trainable_token_indices", "it trains token embeddings"),
                      ("layer_replication", "it replicates layers")):
        if cfg.get(key):
            raise bad(f"{key} is set ({what})", "merge it into its base with peft's merge_and_unload() and save that "
                      "as the expert")
    try:
        alpha = float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise bad("adapter_config.json lacks a valid lora_alpha", "re-save it with peft") from None
    rslora, fifo = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rank_pattern = cfg.get("rank_pattern") or {}
    pairs: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    for name in sorted(factors):
        inner = name[len(PREFIX):] if name.startswith(PREFIX) else name
        m = _FACTOR.fullmatch(inner)
        if m:
            pairs.setdefault(m["module"], {})[m["which"]] = name
        elif inner in base and "lora_" not in inner:  # modules_to_save: the base tensor, trained whole
            if factors[name] != base[inner]:
                raise bad(f"its {inner} has shape {list(factors[name])} but the base's has {list(base[inner])}",
                          "the adapter was trained on another model: use the base it was trained on")
            whole[inner] = name
        else:
            what = ("LoRA on an embedding" if "lora_embedding" in inner else "a DoRA magnitude" if "magnitude" in inner
                    else f"tensor {name}, which matches no tensor of the base")
            raise bad(f"it holds {what}", "an adapter of another base model, or a kind ledmerge does not merge: "
                      "check tasks.<t>.model, or merge it with peft's merge_and_unload() and save that as the expert")
    if not pairs and not whole:
        raise bad("it holds no LoRA tensors", "re-save it with peft's save_pretrained")
    lora: dict[str, Lora] = {}
    for module, ab in sorted(pairs.items()):
        target = f"{module}.weight"
        if set(ab) != {"A", "B"}:
            raise bad(f"{module} has lora_{next(iter(ab))} without its pair", "the adapter file is incomplete: "
                      "re-save it")
        if target not in base:
            raise bad(f"it adapts {target}, which the base does not have", "the adapter was trained on another "
                      "model: use the base it was trained on (its base_model_name_or_path)")
        a, b = factors[ab["A"]], factors[ab["B"]]
        shape = base[target]
        if len(a) == 2 and len(b) == 2 and a[0] != b[1]:
            raise bad(f"its lora_A for {target} has rank {a[0]} but its lora_B has rank {b[1]}", "the adapter file "
                      "is corrupt (peft cannot load it either): re-save it with peft's save_pretrained")
        rank_key = next((p for p in rank_pattern if re.match(rf"(.*\.)?({p})$", module)), None)
        rank = rank_pattern[rank_key] if rank_key is not None else cfg.get("r")
        if len(a) == 2 and isinstance(rank, int) and a[0] != rank:
            raise bad(f"its factors for {target} have rank {a[0]} but adapter_config.json says "
                      f"{f'rank_pattern {rank_key!r}: ' if rank_key is not None else 'r = '}{rank}", "the adapter "
                      "file and its config disagree (peft refuses to load it): re-save the adapter with peft")
        product = (b[0], a[-1]) if len(a) == 2 and len(b) == 2 else None
        if product is None or (product[::-1] if fifo else product) != shape:
            raise bad(f"its factors for {target} (lora_A {list(a)}, lora_B {list(b)}"
                      f"{', fan_in_fan_out' if fifo else ''}) do not make the base's shape {list(shape)}",
                      "the adapter was trained on another model: use the base it was trained on")
        r = a[0]  # the tensor's own rank (rank_pattern may set it; checked above)
        key = next((p for p in alpha_pattern if re.match(rf"(.*\.)?({p})$", module)), None)
        alpha_t = float(alpha_pattern[key]) if key is not None else alpha
        lora[target] = Lora(ab["A"], ab["B"], alpha_t / (math.sqrt(r) if rslora else r), fifo)
    return AdapterPlan(cfg, lora, whole)


def check_base_name(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, cfg: dict) -> None:
    """Refuse an adapter whose `base_model_name_or_path` plainly names another model than the base: a local
    directory with another architecture, or a hub id other than the one the base is known by (its ledmerge hub
    directory `org--name`, or the `_name_or_path` of its config.json). Anything else cannot be told and passes
    (the shape checks of `plan_adapter` still apply)."""
    named = cfg.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        return
    base_dir = Path(base_dir)
    refuse = lambda why: LedmergeError(
        f"adapter {adapter_dir} was trained on {named!r} ({why}) but the base is {base_dir}: set base_model to the "
        "model the adapter was trained on, or use an adapter of this base")
    local = Path(named)
    if local.is_dir():
        if local.resolve() == base_dir.resolve():
            return
        keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
        mine, theirs = _config(base_dir), _config(local)
        differ = [k for k in keys if k in mine and k in theirs and mine[k] != theirs[k]]
        if differ:
            raise refuse(f"a model whose {differ[0]} is {theirs[differ[0]]}, the base's {mine[differ[0]]}")
        return
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", named):
        return  # a path that is not here, or no hub id: cannot tell
    known = {n.lower() for n in (_config(base_dir).get("_name_or_path"),
                                 base_dir.name.replace("--", "/", 1) if "--" in base_dir.name else None)
             if isinstance(n, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", n)}
    if known and named.lower() not in known:
        raise refuse(f"the base is {sorted(known)[0]}")


def _config(model_dir: Path) -> dict:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def check_adapter(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, base: dict[str, tuple[int, ...]]) \
        -> AdapterPlan:
    """Everything `AdapterReader` will rely on, from the headers and configs alone."""
    plan = plan_adapter(adapter_dir, tensor_shapes(adapter_dir), base)
    check_base_name(adapter_dir, base_dir, plan.config)
    return plan


class AdapterReader:
    """An adapter expert read like a `ModelReader` of the merged model: the base's names, shapes, dtypes and layout
    (`infos`, `names`), each tensor the base's own or `W + scale·B·A`. Its weight files (`files`, `sha256s`, which
    score and mask provenance record) are the adapter's: the base is recorded as the base."""

    def __init__(self, adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, *, allow_pickle: bool = False,
                 hash_files: bool = False):
        self.model_dir = Path(adapter_dir)
        self.base = ModelReader(base_dir, allow_pickle=allow_pickle)
        try:
            self.factors = ModelReader(adapter_dir, hash_files=hash_files)
            self.plan = plan_adapter(adapter_dir, self.factors.shapes, self.base.shapes)
        except BaseException:
            self.close()
            raise
        self.infos: dict[str, TensorInfo] = self.base.infos
        self.names = self.base.names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.base.shapes

    def source(self, name: str) -> str:
        if name in self.plan.lora or name in self.plan.whole:
            return f"{self.factors.model_dir} (adapter on {self.base.source(name)})"
        return self.base.source(name)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor of the adapted model, in the base's stored dtype or cast to `dtype`."""
        if name not in self.plan.whole and name not in self.plan.lora:
            return self.base.read(name, dtype)
        stored = self.base.infos[name].dtype
        if name in self.plan.whole:
            t = self.factors.read(self.plan.whole[name], stored)
        else:
            lora = self.plan.lora[name]
            delta = self.factors.read(lora.b, torch.float32) @ self.factors.read(lora.a, torch.float32)
            if lora.fan_in_fan_out:
                delta = delta.T
            t = delta.mul_(lora.scale).add_(self.base.read(name, torch.float32)).to(stored)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def files(self) -> list[Path]:
        return self.factors.files()

    def sha256s(self) -> dict[Path, str]:
        return self.factors.sha256s()

    def close(self) -> None:
        self.base.close()
        if hasattr(self, "factors"):
            self.factors.close()

    def __enter__(self) -> AdapterReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_model(model_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None, *,
               allow_pickle: bool = False, hash_files: bool = False) -> ModelReader | AdapterReader:
    """A reader of model `model_dir`: an `AdapterReader` on `base_dir` when it is a PEFT adapter, else a
    `ModelReader`."""
    if is_adapter(model_dir):
        if base_dir is None:
            raise LedmergeError(f"{model_dir} is a PEFT adapter: it needs its base model (the config's base_model)")
        return AdapterReader(model_dir, base_dir, allow_pickle=allow_pickle, hash_files=hash_files)
    return ModelReader(model_dir, allow_pickle=allow_pickle, hash_files=hash_files)


def load_state_dict(model_dir: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
                    allow_pickle: bool = False, base_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a model directory in memory, cast to `dtype` when given (small models only: merges stream
    through ModelReader instead); a PEFT adapter's with the base at `base_dir` (through `open_model`)."""
    with open_model(model_dir, base_dir, allow_pickle=allow_pickle) as r:
        return {name: r.read(name, dtype) for name in r.names}
