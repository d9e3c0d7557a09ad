"""Merge-spec parameters: their declarations (`Param`), the objects a spec configures (`Declared`: methods and
post-steps), and the checks behind them, each failing with one line that names the method and the parameter and says
what to write instead. Also the helpers that read per-task values (`per_task`, `each_value`, `task_weights`) and
per-layer ones (`layer_of`, `at_layer`).

Per-layer values (a parameter declared `per_layer`, as a layer-wise data-aware search writes them): a task's value
may be a list of L + 1 numbers, one per decoder layer (`model.layers.<i>.`) in order, then one for every tensor
outside the layers (embeddings, final norm, LM head). The method resolves them per tensor (`MergeMethod.for_tensor`).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import LedmergeError


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
    per_layer: bool = False

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
                                            hi_open=self.hi_open, per_layer=self.per_layer)
        if self.kind == "task_numbers":
            return check_task_floats(method, self.name, value, self.lo, lo_open=self.lo_open, per_layer=self.per_layer)
        if self.kind == "int":
            return check_int(method, self.name, value)
        if self.kind == "bool":
            return check_bool(method, self.name, value)
        if self.kind == "choice":
            return check_choice(method, self.name, value, self.choices)
        raise AssertionError(f"unknown parameter kind {self.kind!r}")

    @property
    def type_name(self) -> str:
        per_task = "number or per-layer list" if self.per_layer else "number"
        return {"number": "number", "number_or_per_task": f"number or {{task: {per_task}}}",
                "task_numbers": f"{{task: {per_task}}}", "int": "integer", "bool": "true/false", "choice": "string",
                "model": "model name"}[self.kind]

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


# ---------------------------------------------------------------------------------------------
# The checks: one-line errors that name the parameter and say what to write instead.

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


def check_number_or_per_task(method: str, key: str, value, lo: float, hi: float, *, per_layer: bool = False,
                             **open_ends) -> float | dict[str, float]:
    """One number for every task, or {task: number} (what a per-task coefficient search writes); with `per_layer`,
    a task's number may be a per-layer list."""
    if isinstance(value, Mapping):
        return {str(t): _task_value(method, f"{key}[{t}]", v, lo, hi, per_layer, **open_ends) for t, v in value.items()}
    return check_number(method, key, value, lo, hi, **open_ends)


def _task_value(method: str, key: str, value, lo: float, hi: float, per_layer: bool, **open_ends):
    """One task's number, or (`per_layer`) its non-empty list of numbers, one per layer and one for the rest."""
    if per_layer and isinstance(value, (list, tuple)):
        if len(value) < 2:
            raise _invalid(method, key, "a number, or a list of one number per decoder layer then one for the other "
                           "tensors", value)
        return [check_number(method, f"{key}[{i}]", v, lo, hi, **open_ends) for i, v in enumerate(value)]
    return check_number(method, key, value, lo, hi, **open_ends)


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


def check_task_floats(method: str, key: str, value, lo: float = -math.inf, *, lo_open: bool = False,
                      per_layer: bool = False) -> dict[str, float] | None:
    """A per-task mapping {task: number} (`per_layer`: or per-layer lists); None means every task gets 1.0."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise LedmergeError(f"merge method '{method}': {key} must map task names to numbers, got {value!r}: "
                            f"write e.g. {key}: {{math: 1.0, code: 0.5}}")
    return {str(t): _task_value(method, f"{key}[{t}]", v, lo, math.inf, per_layer, lo_open=lo_open)
            for t, v in value.items()}


def check_task_keys(method: str, key: str, per_task: Mapping[str, float], tasks: list[str]) -> None:
    unknown = sorted(set(per_task) - set(tasks))
    if unknown:
        raise LedmergeError(f"merge method '{method}': {key} names task(s) {unknown} that are not among the experts "
                            f"{sorted(tasks)}: fix the task names")


# ---------------------------------------------------------------------------------------------
# Reading per-task values.

def per_task(value: float | Mapping[str, float], task: str) -> float:
    return value[task] if isinstance(value, Mapping) else value


def each_value(value: float | Mapping[str, float]) -> list[float]:
    """Every number of a per-task parameter, per-layer lists flattened (for checks that combine it with another)."""
    values = list(value.values()) if isinstance(value, Mapping) else [value]
    return [x for v in values for x in (v if isinstance(v, list) else [v])]


def task_weights(per_task: Mapping[str, float] | None, tasks) -> list[float]:
    """Weights in the order of `tasks`; tasks not listed get 1.0."""
    per_task = per_task or {}
    return [per_task.get(t, 1.0) for t in tasks]


# ---------------------------------------------------------------------------------------------
# Per-layer values.

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer of tensor `name` (`model.layers.<i>.…`), or None for the others (embeddings, final norm,
    LM head)."""
    found = LAYER.search(name)
    return int(found.group(1)) if found else None


def num_layers(names) -> int:
    """How many decoder layers the tensor names hold (the highest layer index + 1)."""
    return 1 + max((i for i in map(layer_of, names) if i is not None), default=-1)


def has_layers(value) -> bool:
    """Whether a per-task value holds per-layer lists."""
    return isinstance(value, Mapping) and any(isinstance(v, list) for v in value.values())


def at_layer(value, layer: int | None):
    """A per-task value with each per-layer list replaced by its entry for `layer` (None: the last, the other
    tensors'; the lengths are `MergeMethod.check_layers`')."""
    if not has_layers(value):
        return value
    return {t: v[-1 if layer is None else layer] if isinstance(v, list) else v for t, v in value.items()}
