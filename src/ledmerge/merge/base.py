"""The one interface every merge method implements, and the per-tensor context it receives.

A merge is split in two so the driver can stream: `select` sees a whole tensor once and decides what
needs the whole tensor (TIES keeps the top-k of each task vector, DARE draws its drops), returning
per-task bool masks; `merge_elements` is then elementwise, so the driver may feed it the tensor in
flat chunks that stay in cache (and on the GPU, whole). `merge_tensor` runs both on one whole tensor:
the same bits either way. Everything random or mask-dependent comes through the context, keyed by
tensor name, so a result never depends on the order tensors or tasks are visited.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import LedmergeError

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


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, declared once: its spec checks and the reference docs read this.

    `kind` is how the value is checked: "number" (in the range lo..hi, ends closed unless `lo_open`/`hi_open`),
    "number_or_per_task" (one such number, or {task: number}), "task_numbers" ({task: number >= lo}, or unset:
    every task 1.0), "int", "bool", "choice" (one of `choices`), "model" (`base` or a task name: a string here,
    its name is checked against the models by `check_inputs`). `optional`: unset (None) is allowed, and means
    what the description says.
    """

    name: str
    kind: str
    default: Any
    description: str
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False

    def check(self, method: str, value):
        """The value to use, or a one-line LedmergeError naming the method and the parameter."""
        if value is None and (self.optional or self.kind == "task_numbers"):
            return None
        if self.kind == "model":
            if not isinstance(value, str) or not value:
                raise _invalid(method, self.name, "a model name (base or a task)", value)
            return value
        if self.kind == "number":
            return check_number(method, self.name, value, self.lo, self.hi, lo_open=self.lo_open, hi_open=self.hi_open)
        if self.kind == "number_or_per_task":
            return check_number_or_per_task(method, self.name, value, self.lo, self.hi, lo_open=self.lo_open,
                                            hi_open=self.hi_open)
        if self.kind == "task_numbers":
            return check_task_floats(method, self.name, value, self.lo, lo_open=self.lo_open)
        if self.kind == "int":
            return check_int(method, self.name, value)
        if self.kind == "bool":
            return check_bool(method, self.name, value)
        if self.kind == "choice":
            return check_choice(method, self.name, value, self.choices)
        raise AssertionError(f"unknown parameter kind {self.kind!r}")

    @property
    def type_name(self) -> str:
        return {"number": "number", "number_or_per_task": "number or {task: number}", "task_numbers": "{task: number}",
                "int": "integer", "bool": "true/false", "choice": "string", "model": "model name"}[self.kind]

    @property
    def allowed(self) -> str:
        """What the check accepts, in words: a range, the choices, or 'any'."""
        if self.kind == "choice":
            return ", ".join(f"`{c}`" for c in self.choices)
        if self.kind == "int":
            return "any integer"
        if self.kind == "bool":
            return "`true`, `false`"
        if self.kind == "model":
            return "`base` or a task name"
        if self.kind == "task_numbers":
            if self.lo == -math.inf:
                return "any number per task"
            return f"numbers {'>' if self.lo_open else '>='} {_num(self.lo)} per task"
        return number_range(self.lo, self.hi, self.lo_open, self.hi_open)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def number_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> str:
    """A number parameter's allowed values, as its docs and its error line say them."""
    if lo == -math.inf and hi == math.inf:
        return "any finite number"
    if hi == math.inf:
        return f"a finite number {'>' if lo_open else '>='} {_num(lo)}"
    if lo == -math.inf:
        return f"a finite number {'<' if hi_open else '<='} {_num(hi)}"
    return f"{'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"


class Declared:
    """What a merge spec configures: `PARAMS` declares its parameters (each a `Param`: name, type, default, allowed
    values, description); an instance has one attribute per parameter. `__post_init__` validates the values
    (raising LedmergeError; by default each parameter's own check, in declaration order)."""

    name: ClassVar[str] = ""
    PARAMS: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **values):
        unknown = sorted(set(values) - {p.name for p in self.PARAMS})
        if unknown:
            raise TypeError(f"{type(self).__name__} has no parameter(s) {unknown}")
        for p in self.PARAMS:
            setattr(self, p.name, values[p.name] if p.name in values else p.default)
        self.__post_init__()

    def __post_init__(self):
        self.check_params()

    def check_params(self, *names: str) -> None:
        """Check the parameters `names` (default: all, in declaration order) against their declarations."""
        params = {p.name: p for p in self.PARAMS}
        for key in names or params:
            setattr(self, key, self.check_param(params[key], getattr(self, key)))

    def check_param(self, param: Param, value):
        return param.check(self.name, value)

    def params(self) -> dict:
        """Every parameter's value, defaults included."""
        return {p.name: copy.deepcopy(getattr(self, p.name)) for p in self.PARAMS}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{p.name}={getattr(self, p.name)!r}' for p in self.PARAMS)})"


# Parameters several methods declare alike (each method lists them in its PARAMS).
SCALE = Param("scale", "number", 1.0, "λ, multiplies the merged task vector")
WEIGHTS = Param("weights", "task_numbers", None, "per-task w_t; unlisted tasks get 1.0")
DROP_SEED = Param("seed", "int", 0, "seed of the random drops (drawn per seed, tensor and task)")


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

    def select(self, base: Tensor, experts: dict[str, Tensor], ctx: TensorContext) -> dict[str, Tensor]:
        """Per-task bool masks that need the whole tensor (any dtype in; computed in float32); {} if none.
        Whole-tensor numbers go into `ctx.scales`."""
        return {}

    def merge_elements(self, base: Tensor, experts: dict[str, Tensor], ctx: TensorContext) -> Tensor:
        """The merge, elementwise given `ctx.kept`: inputs are float32 of any shape (flat chunks when streaming)."""
        raise NotImplementedError

    def merge_tensor(self, name: str, base: Tensor, experts: dict[str, Tensor], ctx: TensorContext) -> Tensor:
        """Merge one whole float32 tensor, post-steps included."""
        ctx.kept = self.select(base, experts, ctx)
        return self.finish(self.merge_elements(base, experts, ctx), base, experts, ctx)

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


class DeltaChunks:
    """One tensor's task vector τ = expert − base, read on demand: `delta(part)` is a fresh float32 copy of the flat
    slice `part` (the callee may overwrite it), `delta.whole()` the whole task vector in its shape."""

    def __init__(self, expert: Tensor, base: Tensor):
        self.shape, self._expert, self._base = base.shape, expert.reshape(-1), base.reshape(-1)

    def __call__(self, part: slice) -> Tensor:
        return self._expert[part].to(torch.float32, copy=True).sub_(self._base[part].float())

    def whole(self) -> Tensor:
        return self(slice(None)).view(self.shape)


class TaskVectorMethod(MergeMethod):
    """Methods of the form θ = θ_0 + f({τ_t}): f is `merge_deltas`, which LED reuses on masked τ_t."""

    def select(self, base, experts, ctx):
        if type(self).select_delta is TaskVectorMethod.select_delta:
            return {}
        kept = {}
        for t in sorted(experts):
            keep = self.select_delta(t, DeltaChunks(experts[t], base), base.numel(), ctx)
            if keep is not None:
                kept[t] = keep.to(base.device).view(base.shape)
        return kept

    def select_delta(self, task: str, delta: DeltaChunks, n: int, ctx: TensorContext) -> Tensor | None:
        """The entries of the n-entry task vector that survive (a flat bool mask), or None: all of them.

        The task vector comes in flat slices, `delta(part)`: a fresh float32 copy each call (the callee may
        overwrite it), so no whole-tensor float32 copy is ever needed (an 8B model's LM head is 525M entries).
        `delta.whole()` is the whole task vector in its shape, for methods that need it at once (DELLA's per-row
        ranks). A rescale of the survivors goes into `ctx.scales[task]`."""
        return None

    @staticmethod
    def kept_deltas(deltas: dict[str, Tensor], ctx: TensorContext) -> dict[str, Tensor]:
        """Each task vector restricted to the entries `select` kept, times the rescale it chose, if any."""
        out = {}
        for t, d in deltas.items():
            kept = d * ctx.kept[t] if t in ctx.kept else d
            out[t] = kept * ctx.scales[t] if t in ctx.scales else kept
        return out

    def merge_elements(self, base, experts, ctx):
        return base + self.merge_deltas({t: e - base for t, e in experts.items()}, ctx)

    def merge_deltas(self, deltas: dict[str, Tensor], ctx: TensorContext) -> Tensor:
        raise NotImplementedError


SUM_CHUNK = 1 << 20  # elements summed at a time by `sum64`: 8 MiB of float64 scratch


def sum64(a: Tensor, b: Tensor | None = None) -> float:
    """Σ a (or Σ a·b) over a whole tensor, in float64, a slice at a time, the slices added in order. A float32
    sum's last bits depend on how torch splits it across threads; a float64 sum's differences lie far below
    float32's precision, so the float32 results computed from it are the same on any machine. Slicing bounds
    the scratch on embedding-sized tensors."""
    a = a.reshape(-1)
    b = None if b is None else b.reshape(-1)
    total = 0.0
    for start in range(0, a.numel(), SUM_CHUNK):
        part = a[start:start + SUM_CHUNK].double()
        if b is not None:
            part *= b[start:start + SUM_CHUNK]
        total += float(part.sum())
    return total


def l1_rescale(magnitudes: Tensor, keep: Tensor, ctx: TensorContext, task: str) -> None:
    """Record in `ctx.scales[task]` the factor that gives the kept entries the L1 norm of the whole task vector
    (`magnitudes` = |τ_t|): mergekit's `rescale`, one number per tensor, so the chunks need no per-entry
    probabilities. Below 1e-7 either norm is noise and nothing is rescaled, as mergekit does."""
    before, after = sum64(magnitudes), sum64(magnitudes, keep)
    if before >= 1e-7 and after >= 1e-7:
        ctx.scales[task] = before / after


# ---------------------------------------------------------------------------------------------
# Parameter validation: one-line errors that name the parameter and say what to write instead.

def _invalid(method: str, key: str, must: str, value) -> LedmergeError:
    return LedmergeError(f"merge method '{method}': {key} must be {must}, got {value!r}: fix it in the merge spec")


def check_number(method: str, key: str, value, lo: float = -math.inf, hi: float = math.inf, *,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        allowed = number_range(lo, hi, lo_open, hi_open)
        must = "a finite number" if allowed.startswith("any") else allowed if allowed.startswith("a ") else \
            f"a number in {allowed}"
        raise _invalid(method, key, must, value)
    return float(value)


def check_number_or_per_task(method: str, key: str, value, lo: float, hi: float,
                             **open_ends) -> float | dict[str, float]:
    """One number for every task, or {task: number} (what a per-task coefficient search writes)."""
    if isinstance(value, Mapping):
        return {str(t): check_number(method, f"{key}[{t}]", v, lo, hi, **open_ends) for t, v in value.items()}
    return check_number(method, key, value, lo, hi, **open_ends)


def per_task(value: float | Mapping[str, float], task: str) -> float:
    return value[task] if isinstance(value, Mapping) else value


def each_value(value: float | Mapping[str, float]) -> list[float]:
    """Every value of a number-or-per-task parameter (for checks that combine it with another parameter)."""
    return list(value.values()) if isinstance(value, Mapping) else [value]


def check_int(method: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(method, key, "an integer", value)
    return value


def check_choice(method: str, key: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _invalid(method, key, f"one of {list(choices)}", value)
    return value


def check_bool(method: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise _invalid(method, key, "true or false", value)
    return value


def check_task_floats(method: str, key: str, value, lo: float = -math.inf, *,
                      lo_open: bool = False) -> dict[str, float] | None:
    """A per-task mapping {task: number}; None means every task gets 1.0."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise LedmergeError(f"merge method '{method}': {key} must map task names to numbers, got {value!r}: "
                            f"write e.g. {key}: {{math: 1.0, code: 0.5}}")
    return {str(t): check_number(method, f"{key}[{t}]", v, lo, lo_open=lo_open) for t, v in value.items()}


def check_task_keys(method: str, key: str, per_task: Mapping[str, float], tasks: list[str]) -> None:
    unknown = sorted(set(per_task) - set(tasks))
    if unknown:
        raise LedmergeError(f"merge method '{method}': {key} names task(s) {unknown} that are not among the experts "
                            f"{sorted(tasks)}: fix the task names")


def task_weights(per_task: Mapping[str, float] | None, tasks) -> list[float]:
    """Weights in the order of `tasks`; tasks not listed get 1.0."""
    per_task = per_task or {}
    return [per_task.get(t, 1.0) for t in tasks]
