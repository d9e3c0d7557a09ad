"""mergekit configurations in and out: a mergekit YAML file as a merge spec, and a merge spec as a mergekit file.

Both directions read one table, `EQUIVALENTS`: per shared method, which mergekit parameter is which ledmerge
parameter (and how the value converts), which mergekit settings ledmerge's method computes with and therefore
requires, and what still differs (written as comments into exported files). Adding a method is one entry.
Anything outside the table (slices, per-layer gradients and filters, tokenizer settings, another compute dtype,
models that are not the run's base and experts) is refused with one line naming the mergekit key: a file
ledmerge cannot honour must not turn silently into another merge.

The mergekit version these semantics were read from and checked against is `MERGEKIT_VERSION`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import yaml

from ..errors import LedmergeError
from ..fileio import read_yaml
from .base import MergeMethod
from .params import per_task, task_weights
from .registry import METHODS

MERGEKIT_VERSION = "0.1.5"
FILE_NAME = "mergekit_config.yml"
COMPUTE_DTYPE = "float32"  # every ledmerge merge computes in float32 and writes each tensor in the base's dtype
DTYPES = ("float32", "bfloat16", "float16")
MIXED = "mixed"  # a base whose floating tensors are stored in several dtypes


def _one_minus(x: float) -> float:
    """1 − x on the decimal values, so that density ↔ drop survives a round trip (1 − 0.3 is 0.7, not
    0.7000000000000001). Anything but a finite number is passed on for the method's own check to refuse."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return x
    return float(Decimal(1) - Decimal(repr(float(x))))


@dataclass(frozen=True)
class Key:
    """One mergekit parameter of a method.

    `ours`: the ledmerge parameter it is, converted by `convert` (its own inverse: identity or 1 − x); None for a
    setting ledmerge's method has built in, which must then equal `value`. `per_model`: set in each model's
    `parameters` (a per-task value of ours). `default`: mergekit's default for this method (None: mergekit has
    none, and ledmerge's own default applies when the key is absent).
    """

    theirs: str
    ours: str | None = None
    per_model: bool = False
    default: Any = None
    value: Any = None
    convert: Callable[[Any], Any] | None = None

    def to_other(self, x):
        return self.convert(x) if self.convert else x


@dataclass(frozen=True)
class Equivalent:
    """A ledmerge method and the mergekit method that computes the same merge (under `keys`)."""

    method: str
    keys: tuple[Key, ...]
    uses_base: bool = True  # mergekit needs `base_model` (task-vector methods); linear ignores it
    lists_base: bool = False  # mergekit counts the base among `models` (slerp's two inputs)
    ignored: tuple[str, ...] = ()  # mergekit settings that do not change the result (accepted, not exported)
    differences: str = ""  # what still differs, for the exported file's comments


WEIGHT = Key("weight", "weights", per_model=True)
LAMBDA = Key("lambda", "scale", default=1.0)


def _normalize(ties: bool, default: bool) -> Key:
    """mergekit's `normalize` (its `default` for the method): TIES' consensus has the parameter of that name (divide
    by the agreeing weights, or not); the plain sum computes with normalize: false."""
    return Key("normalize", "normalize", default=default) if ties else Key("normalize", value=False, default=default)


EQUIVALENTS: dict[str, Equivalent] = {e.method: e for e in (
    Equivalent("task_arithmetic", (WEIGHT, LAMBDA, Key("normalize", value=False, default=False)),
               ignored=("int8_mask",)),
    Equivalent("ties", (WEIGHT, LAMBDA, Key("density", "density", per_model=True, default=1.0),
                        Key("normalize", "normalize", default=True), Key("rescale", value=False, default=False)),
               ignored=("int8_mask",),
               differences="TIES differs in ties only: mergekit's trim keeps int(density*n) entries of each task "
               "vector where ledmerge keeps ceil(density*n) (ties at the cut-off to the lowest index), and where the "
               "weighted task vectors sum to exactly 0 mergekit elects the + sign where ledmerge elects none (the "
               "weight keeps the base's value)."),
    *(Equivalent(name, (WEIGHT, LAMBDA, Key("density", "drop", per_model=True, default=1.0, convert=_one_minus),
                        Key("rescale", "rescale", default=True), _normalize(ties, default=False)),
                 ignored=("int8_mask",),
                 differences="DARE agrees in distribution only: mergekit draws the drops from torch's global "
                 "generator (mergekit-yaml --random-seed), ledmerge per (seed, tensor, task) from the spec's seed; "
                 "and mergekit's rescale matches the L1 norm of each task vector where ledmerge divides the kept "
                 "entries by 1 - drop.")
      for name, ties in (("dare_linear", False), ("dare_ties", True))),
    Equivalent("linear", (WEIGHT, Key("normalize", "normalize", default=True)), uses_base=False),
    *(Equivalent(name, (WEIGHT, LAMBDA, Key("density", "density", per_model=True, default=1.0),
                        Key("gamma", "gamma", per_model=True, default=0.01), Key("rescale", "rescale", default=False),
                        _normalize(ties, default=False)),
                 ignored=("int8_mask",),
                 differences="Breadcrumbs differs in counts only: mergekit keeps int(density*n) entries after "
                 "dropping the int(gamma*n) largest, ledmerge rounds both up (and refuses density + gamma > 1).")
      for name, ties in (("breadcrumbs", False), ("breadcrumbs_ties", True))),
    *(Equivalent(name, (WEIGHT, LAMBDA, Key("density", "density", per_model=True, default=1.0),
                        Key("epsilon", "epsilon", per_model=True, default=0.15), Key("rescale", "rescale", default=True),
                        _normalize(ties, default=ties)),
                 ignored=("int8_mask",),
                 differences="DELLA agrees in everything but the draws: mergekit draws the drops with "
                 "torch.bernoulli from the global generator (mergekit-yaml --random-seed), ledmerge seeded "
                 "uniforms per (seed, tensor, task) from the spec's seed.")
      for name, ties in (("della", True), ("della_linear", False))),
    Equivalent("slerp", (Key("t", "t"),), lists_base=True,
               differences="SLERP differs on a zero tensor only (mergekit rotates it as if of norm 1, ledmerge "
               "interpolates linearly); ledmerge sums the norms and the cosine in float64, mergekit in float32."),
)}

# What a mergekit file may hold at its top level; every other key is refused.
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
REFUSED = {"slices": "layer slices", "modules": "per-module merges", "tokenizer_source": "tokenizer settings",
           "tokenizer": "tokenizer settings", "chat_template": "chat templates"}


# ---------------------------------------------------------------------------------------------
# In: a mergekit file as a ledmerge spec.

def _error(where: str, key: str, problem: str) -> LedmergeError:
    return LedmergeError(f"{where}: mergekit key '{key}': {problem}")


def _scalar(where: str, key: str, value):
    if isinstance(value, list) and not any(isinstance(v, Mapping) for v in value):
        raise _error(where, key, "per-layer gradients (lists of values) have no ledmerge equivalent: give one value")
    if isinstance(value, (list, Mapping)):
        raise _error(where, key, "filtered values ({filter: ..., value: ...}) have no ledmerge equivalent: give one "
                     "value for every tensor")
    return value


def read_mergekit(path) -> dict:
    """The parsed mergekit file at `path` (a mapping), or a one-line error."""
    doc = read_yaml(path, "mergekit file")
    if not isinstance(doc, Mapping):
        raise LedmergeError(f"mergekit file {path} is not a YAML mapping: write a mergekit configuration "
                            "(merge_method, base_model, models, parameters)")
    return doc


def from_mergekit(doc: Mapping, where: str, tasks: list[str], identify: Callable[[str], str | None],
                  base_dtype: Callable[[], str | None], seed: int | None = None) -> dict:
    """The ledmerge spec that computes what mergekit configuration `doc` computes, for a run whose experts are
    `tasks`. `identify` maps a mergekit model reference to 'base', a task name, or None (not one of the run's
    models); `base_dtype` gives the base's stored floating dtype (None: not on disk yet; `MIXED`); `seed` is the spec's seed
    for the methods that draw random numbers. `where` (the file) prefixes every error."""
    for key in doc:
        if key in REFUSED:
            raise _error(where, key, f"{REFUSED[key]} have no ledmerge equivalent: remove it (ledmerge merges whole "
                         "models and takes the tokenizer from the config's tokenizer_source)")
        if key not in TOP_KEYS:
            raise _error(where, key, f"not supported by ledmerge's import: remove it (supported keys: {list(TOP_KEYS)})")
    method = doc.get("merge_method")
    if method not in EQUIVALENTS:
        raise _error(where, "merge_method", f"{method!r} has no ledmerge equivalent: use one of {sorted(EQUIVALENTS)} "
                     "or write the merge as a ledmerge spec")
    eq = EQUIVALENTS[method]
    _check_dtypes(doc, where, base_dtype)
    shared = doc.get("parameters") or {}
    if not isinstance(shared, Mapping):
        raise _error(where, "parameters", "must be a mapping of parameter names to values")
    per_model = _models(doc, where, eq, tasks, identify)
    known = {k.theirs for k in eq.keys} | set(eq.ignored)
    for scope, params in (("parameters", shared), *((f"models[{i}].parameters", p) for i, p in per_model.values())):
        for key, value in params.items():
            if key not in known:
                raise _error(where, f"{scope}.{key}", f"{method} has no such parameter in ledmerge's translation: "
                             f"remove it (its parameters: {sorted(known)})")
            _scalar(where, f"{scope}.{key}", value)
    spec: dict[str, Any] = {"method": method}
    params = {p.name: p for p in METHODS[method].PARAMS}
    for k in eq.keys:
        if not k.per_model:
            value = shared.get(k.theirs, k.default)
            if k.ours is None:
                if value != k.value:
                    raise _error(where, f"parameters.{k.theirs}",
                                 f"{json.dumps(value)}{' (mergekit default)' if k.theirs not in shared else ''} "
                                 f"cannot be honoured: ledmerge's {method} computes with {k.theirs}: "
                                 f"{json.dumps(k.value)}; set that")
            elif value is not None:
                spec[k.ours] = k.to_other(value)
            continue
        values = {}
        for t in tasks:
            i, own = per_model[t]
            value = own.get(k.theirs, shared.get(k.theirs, k.default))
            if value is not None:
                values[t] = k.to_other(value)
        if params[k.ours].kind == "task_numbers":  # ledmerge gives an unlisted task 1.0: list only the others
            listed = {t: v for t, v in values.items() if v != 1.0}
            if listed:
                spec[k.ours] = listed
        elif values:
            spec[k.ours] = values[tasks[0]] if len(set(values.values())) == 1 else values
    if seed is not None:
        if "seed" not in params:
            raise LedmergeError(f"{where}: seed is given but {method} draws no random numbers: remove it")
        spec["seed"] = seed
    try:  # the values themselves, in ledmerge's words, with the mergekit names they came from
        METHODS[method].from_spec(spec)
    except LedmergeError as exc:
        renamed = ", ".join(f"{k.ours} = {'1 - ' if k.convert is _one_minus else ''}{k.theirs}"
                            for k in eq.keys if k.ours and (k.ours != k.theirs or k.convert))
        raise LedmergeError(f"{where}: {exc} (in mergekit's words: {renamed})") from None
    return spec


def _check_dtypes(doc: Mapping, where: str, base_dtype: Callable[[], str | None]) -> None:
    dtype = doc.get("dtype")
    if dtype is not None and dtype != COMPUTE_DTYPE:
        raise _error(where, "dtype", f"{dtype!r}: ledmerge always computes in {COMPUTE_DTYPE}: set dtype: "
                     f"{COMPUTE_DTYPE} or remove it")
    out_dtype = doc.get("out_dtype")
    if out_dtype is None:
        return
    if out_dtype not in DTYPES:
        raise _error(where, "out_dtype", f"{out_dtype!r} is not a dtype ledmerge writes ({list(DTYPES)})")
    stored = base_dtype()
    if stored is None or stored == MIXED:
        why = "cannot be checked before the base model is on disk" if stored is None else "but the base mixes dtypes"
        raise _error(where, "out_dtype", f"{out_dtype!r} {why} (ledmerge writes every tensor in the base's own "
                     "dtype): remove it")
    if out_dtype != stored:
        raise _error(where, "out_dtype", f"{out_dtype!r}, but ledmerge writes every tensor in the base's dtype, "
                     f"{stored}: remove it or set {stored}")


def _models(doc: Mapping, where: str, eq: Equivalent, tasks: list[str],
            identify: Callable[[str], str | None]) -> dict[str, tuple[int, Mapping]]:
    """task -> (index in `models`, its parameters); the base and every task's expert are checked to be there."""
    base = doc.get("base_model")
    if base is None and eq.uses_base:
        raise _error(where, "base_model", f"not set, and mergekit's {eq.method} needs it: name the config's base model")
    if base is not None and identify(_ref(where, "base_model", base)) != "base":
        raise _error(where, "base_model", f"{base!r} is not the config's base model: name the same directory "
                     "(or hub id) as base_model in the config")
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise _error(where, "models", "must list the config's task experts, e.g. [{model: <dir>, parameters: "
                     "{weight: 1.0}}]")
    found: dict[str, tuple[int, Mapping]] = {}
    for i, entry in enumerate(models):
        if not isinstance(entry, Mapping) or "model" not in entry or set(entry) - {"model", "parameters"}:
            raise _error(where, f"models[{i}]", "must be {model: <dir>, parameters: {...}}")
        name = identify(_ref(where, f"models[{i}].model", entry["model"]))
        if name == "base" and eq.uses_base and not entry.get("parameters"):
            continue  # mergekit's usual way of naming the base once more: it is not merged as an expert
        if name is None or name == "base":
            what = ("the base model, with parameters or in a merge of the experts only" if name == "base" else
                    "not one of the config's task experts")
            raise _error(where, f"models[{i}].model", f"{entry['model']!r} is {what}: list only the directories "
                         f"(or hub ids) of tasks.<t>.model, one entry per task {tasks}")
        if name in found:
            raise _error(where, f"models[{i}].model", f"{entry['model']!r} is task '{name}' again: list each once")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise _error(where, f"models[{i}].parameters", "must be a mapping of parameter names to values")
        found[name] = (i, params)
    missing = [t for t in tasks if t not in found]
    if missing:
        raise _error(where, "models", f"no entry for task(s) {missing}: ledmerge merges every task's expert; add "
                     "them (weight 0 is not an equivalent)")
    return found


def _ref(where: str, key: str, value) -> str:
    if not isinstance(value, str):
        raise _error(where, key, f"{value!r}: only a model directory or hub id (a string) has a ledmerge equivalent")
    return value


# ---------------------------------------------------------------------------------------------
# Out: a ledmerge merge as a mergekit file.

def to_mergekit(method: MergeMethod, base_dir, expert_dirs: Mapping[str, Any], out_dtype: str | None) -> str | None:
    """The mergekit configuration (YAML text, comments included) that computes this merge, or None when mergekit
    has no such method (LED: its masks come from calibration data), the spec adds post-steps, or it has per-layer
    values (mergekit's per-layer lists interpolate between layers). `out_dtype`: the base's one floating dtype (None:
    mixed), what ledmerge writes."""
    eq = EQUIVALENTS.get(method.name)
    if eq is None or method.post or method.per_layer_params():  # no RESTA, SafeMERGE, per-layer values
        return None
    recipe, tasks = method.recipe(), sorted(expert_dirs)
    shared, per_model = {}, {t: {} for t in tasks}
    for k in eq.keys:
        if k.per_model and k.ours == "weights":
            for t, w in zip(tasks, task_weights(recipe[k.ours], tasks)):
                per_model[t][k.theirs] = w
        elif k.per_model:
            for t in tasks:
                per_model[t][k.theirs] = k.to_other(per_task(recipe[k.ours], t))
        else:
            shared[k.theirs] = k.value if k.ours is None else k.to_other(recipe[k.ours])
    doc = {"merge_method": method.name,
           **({"base_model": str(base_dir)} if eq.uses_base else {}),
           "models": [*([{"model": str(base_dir)}] if eq.lists_base else []),
                      *({"model": str(expert_dirs[t]), **({"parameters": per_model[t]} if per_model[t] else {})}
                        for t in tasks)],
           "parameters": shared, "dtype": COMPUTE_DTYPE,
           **({"out_dtype": out_dtype} if out_dtype not in (None, COMPUTE_DTYPE) else {})}
    notes = [f"mergekit {MERGEKIT_VERSION} configuration of this merge, written by ledmerge from its recipe "
             f"({method.name}). Run it with: mergekit-yaml {FILE_NAME} <out_dir>"]
    if out_dtype is None:
        notes.append("The base mixes floating dtypes: ledmerge writes each tensor in the base's own dtype, mergekit "
                     "all in one (float32 here).")
    if "seed" in recipe:
        notes.append(f"ledmerge's seed: {recipe['seed']} (import this file with {{mergekit: <file>, seed: "
                     f"{recipe['seed']}}} to keep it).")
    if eq.differences:
        notes.append(eq.differences)
    return "".join(_comment(n) for n in notes) + yaml.safe_dump(doc, sort_keys=False)


def floating_dtype(infos: Mapping[str, Any]) -> str | None:
    """The one dtype a model's floating tensors are stored in (`ModelReader.infos`; what ledmerge writes the merge
    in), or None when they mix dtypes."""
    dtypes = {i.dtype for i in infos.values() if i.dtype.is_floating_point}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def _comment(text: str, width: int = 110) -> str:
    lines, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "#"
        line += " " + word
    return "\n".join([*lines, line]) + "\n"
