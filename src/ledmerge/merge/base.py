"""The one interface every merge method implements, and the per-tensor context it receives.

A merge is split in two so the driver can stream: `select` sees a whole tensor once and decides what
needs the whole tensor (TIES keeps the top-k of each task vector, DARE draws its drops), returning
per-task bool masks; `merge_elements` is then elementwise, so the driver may feed it the tensor in
flat chunks that stay in cache (and on the GPU, whole). `merge_tensor` runs both on one whole tensor:
the same bits either way. Everything random or mask-dependent comes through the context, keyed by
tensor name, so a result never depends on the order tensors or tasks are visited.

What a spec configures, and its parameters' declarations and checks, are `params`' (`Declared`, `Param`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import LedmergeError
from .params import Declared, Param, at_layer, check_task_keys, has_layers, layer_of

log = logging.getLogger(__name__)



@dataclass
class TensorContext:
    """What a method may need beyond the weights of one tensor."""

    name: str
    seed: int = 0
    masks: dict[str, Tensor | None] = field(default_factory=dict)  # task -> LED mask (None: tensor unscored)
    kept: dict[str, Tensor] = field(default_factory=dict)  # task -> entries `select` kept (whole-tensor choices)
    # Numbers `select` derived from the whole tensor, keyed as the method likes (an L1 rescale per task, SLERP's
    # two coefficients): a chunk cannot compute them from its own slice.
    scales: dict[str, float] = field(default_factory=dict)
    report: dict[str, dict] = field(default_factory=dict)  # post-step -> what it did to this tensor (model card)
    # Where `select` may run tasks side by side: the driver's pool of single-threaded workers, for whole CPU tensors
    # (a sliced tensor's slab reads feed the inputs' sha256 in file order, one thread at a time).
    pool: Executor | None = None

    def generator(self, task: str, seed: int | None = None) -> torch.Generator:
        """A generator seeded from (seed, tensor name, task): independent of visiting order. `seed` overrides the
        method's (a post-step draws with its own)."""
        seed = self.seed if seed is None else seed
        return torch.Generator().manual_seed(zlib.crc32(f"{seed}\0{self.name}\0{task}".encode()))

    def chunk(self, part: slice) -> TensorContext:
        """The context of the flat slice `part` of the tensor (masks sliced alike)."""
        flat = lambda m: None if m is None else m.reshape(-1)[part]
        return TensorContext(self.name, self.seed, {t: flat(m) for t, m in self.masks.items()},
                             {t: flat(k) for t, k in self.kept.items()}, self.scales, self.report)

    def to(self, device: torch.device) -> TensorContext:
        move = lambda m: None if m is None else m.to(device)
        return TensorContext(self.name, self.seed, {t: move(m) for t, m in self.masks.items()},
                             {t: move(k) for t, k in self.kept.items()}, self.scales, self.report)

class MergeMethod(Declared):
    """Base class of the merge methods (parameters: `Declared`).

    `check_inputs` validates what depends on the models (task names, masks); `select` and `merge_elements` do the
    work, and `finish` runs the spec's post-steps (`post`, see `PostStep`) on each merged tensor.
    """

    uses_masks: ClassVar[bool] = False
    seed = 0  # methods that draw random numbers declare it as a parameter
    post: tuple[PostStep, ...] = ()  # set by `from_spec`, in the registry's order

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self.recipe() == other.recipe()

    @classmethod
    def from_spec(cls, spec: Mapping, post_steps: Mapping[str, type[PostStep]] | None = None) -> MergeMethod:
        """The method of `spec`, with the post-steps (`post_steps`, by spec key, in the order they run) it names."""
        post_steps = post_steps or {}
        params = {k: v for k, v in spec.items() if k != "method" and k not in post_steps}
        allowed = [p.name for p in cls.PARAMS]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            also = f", and every method takes the post-steps {list(post_steps)}" if post_steps else ""
            raise LedmergeError(f"merge method '{cls.name}' has no parameter(s) {unknown}: "
                                f"remove them; its parameters are {allowed}{also}")
        method = cls(**params)
        method.post = tuple(step.from_spec(cls.name, spec[key]) for key, step in post_steps.items() if key in spec)
        return method

    def recipe(self) -> dict:
        """The full spec, defaults and post-steps included: what the model card records."""
        return {"method": self.name, **self.params(), **{step.name: step.params() for step in self.post}}

    def check_inputs(self, tasks: list[str], masks: Mapping[str, os.PathLike] | None) -> None:
        for step in self.post:
            step.check_inputs(tasks)
        weights = getattr(self, "weights", None)
        if weights:
            check_task_keys(self.name, "weights", weights, tasks)
        # per-task values (data-aware search) must cover every task
        for key in (p.name for p in self.PARAMS if p.kind == "number_or_per_task"):
            value = getattr(self, key)
            if isinstance(value, Mapping):
                check_task_keys(self.name, key, value, tasks)
                missing = sorted(set(tasks) - set(value))
                if missing:
                    raise LedmergeError(f"merge method '{self.name}': {key} has no value for task(s) {missing}: "
                                        f"list every task or give one number")
        if masks and not self.uses_masks:
            log.warning("merge method '%s' ignores the masks it was given", self.name)

    def per_layer_params(self) -> list[str]:
        """The parameters that hold per-layer values (`Param.per_layer`)."""
        return [p.name for p in self.PARAMS if p.per_layer and has_layers(getattr(self, p.name))]

    def check_layers(self, n_layers: int) -> None:
        """Per-layer values (`Param.per_layer`) must hold one number per decoder layer of the models, then one for
        the other tensors."""
        for key in self.per_layer_params():
            for t, v in getattr(self, key).items():
                if isinstance(v, list) and len(v) != n_layers + 1:
                    raise LedmergeError(f"merge method '{self.name}': {key}[{t}] has {len(v)} per-layer values, but "
                                        f"the models have {n_layers} decoder layers: give {n_layers + 1} (one per "
                                        "layer, then one for the embeddings, final norm and LM head)")

    def for_tensor(self, name: str) -> MergeMethod:
        """The method that merges tensor `name`: itself, or, with per-layer values, a copy holding the values of
        the tensor's layer (the last entry for tensors outside the layers), built once per layer."""
        layered = self.per_layer_params()
        if not layered:
            return self
        layer = layer_of(name)
        cache = self.__dict__.setdefault("_per_layer", {})
        if layer not in cache:
            values = self.params()
            for key in layered:
                values[key] = at_layer(values[key], layer)
            method = type(self)(**values)
            method.post = self.post
            cache[layer] = method
        return cache[layer]

    def select(self, base: Tensor, experts: dict[str, Tensor], ctx: TensorContext) -> dict[str, Tensor]:
        """Per-task bool masks that need the whole tensor (any dtype in; computed in float32); {} if none.
        Whole-tensor numbers go into `ctx.scales`."""
        return {}

    def merge_elements(self, base: Tensor, experts: dict[str, Tensor], ctx: TensorContext) -> Tensor:
        """The merge, elementwise given `ctx.kept`: inputs are float32 of any shape (flat chunks when streaming)."""
        raise NotImplementedError

    def merge_tensor(self, name: str, base: Tensor, experts: dict[str, Tensor], ctx: TensorContext) -> Tensor:
        """Merge one whole float32 tensor, post-steps included (per-layer values: those of its layer)."""
        method = self.for_tensor(name)
        ctx.kept = method.select(base, experts, ctx)
        return method.finish(method.merge_elements(base, experts, ctx), base, experts, ctx)

    def finish(self, merged: Tensor, base: Tensor, experts: dict[str, Tensor], ctx: TensorContext) -> Tensor:
        """The post-steps, in order, on the whole merged float32 tensor (the inputs in any dtype)."""
        models = {"base": base, **experts}
        for step in self.post:
            merged = step.apply(merged, models, ctx)
        return merged


SAFETY_PAIR = (
    Param("aligned", "model", None, "the aligned model of the safety vector V = θ_aligned − θ_unaligned: `base` or "
          "a task; unset: the config's `alignment_task` (the workflow fills it in)", optional=True),
    Param("unaligned", "model", "base", "the unaligned model of V: `base` or a task"),
)


class PostStep(Declared):
    """A step run on every merged tensor after the method, whatever the method: the merge spec turns it on with a
    key of its `name` holding its parameters, e.g. `{method: ties, resta: {gamma: 0.5}}`.

    Post-steps restore safety from a safety vector V = θ_aligned − θ_unaligned (`SAFETY_PAIR` in `PARAMS`): two
    of the models the merge already reads (the base and the experts), so the driver streams them like any input.
    `apply` sees whole tensors; what it decides for a tensor goes in `ctx.report[name]`, which the model card
    (`card_lines`) and the merge's JSON summary record.
    """

    aligned: str | None
    unaligned: str

    def __init__(self, method: str = "", **values):
        self.method = method  # the merge method it follows: the errors name it
        super().__init__(**values)

    def check_param(self, param, value):
        return dataclasses.replace(param, name=f"{self.name}.{param.name}").check(self.method, value)

    @classmethod
    def from_spec(cls, method: str, values) -> PostStep:
        if not isinstance(values, Mapping):
            raise LedmergeError(f"merge method '{method}': {cls.name} must map its parameters to values, got "
                                f"{values!r}: write e.g. {cls.name}: {{{cls.PARAMS[0].name}: {cls.PARAMS[0].default}}}")
        allowed = [p.name for p in cls.PARAMS]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise LedmergeError(f"merge method '{method}': {cls.name} has no parameter(s) {unknown}: remove them; "
                                f"its parameters are {allowed}")
        return cls(method, **values)

    def check_inputs(self, tasks: list[str]) -> None:
        """The safety pair must name two different models among those the merge reads."""
        models = ["base", *sorted(tasks)]
        where = f"merge method '{self.method}': {self.name}"
        if self.aligned is None:
            raise LedmergeError(f"{where}.aligned is not set: name the aligned (instruct) model, one of {models}")
        for key in ("aligned", "unaligned"):
            if getattr(self, key) not in models:
                raise LedmergeError(f"{where}.{key} names {getattr(self, key)!r}, which this merge does not read: "
                                    f"choose one of {models}")
        if self.aligned == self.unaligned:
            raise LedmergeError(f"{where}: aligned and unaligned are both {self.aligned!r}, so the safety vector is "
                                "zero: name two different models")

    def safety_vector(self, models: Mapping[str, Tensor]) -> Tensor:
        """V = θ_aligned − θ_unaligned in float32, a new tensor."""
        return models[self.aligned].to(torch.float32, copy=True).sub_(models[self.unaligned])

    def apply(self, merged: Tensor, models: Mapping[str, Tensor], ctx: TensorContext) -> Tensor:
        """The step on one whole merged float32 tensor; `models`: base and experts by name, any dtype."""
        raise NotImplementedError

    def card_lines(self, records: Mapping[str, dict]) -> list[str]:
        """Markdown for the model card from the per-tensor `ctx.report` records; [] if nothing to say."""
        return []
