"""The merge methods and post-steps by name: `get_method` turns a spec dict into a validated method object.

A spec is the dict from the user's config, e.g. {"method": "ties", "density": 0.5}, optionally with post-steps
under their own keys ({"method": "ties", "resta": {"gamma": 0.5}}). The tables are built here from the method
modules (which import `base`, `params` and each other, never this module or their package, so there is no import
cycle): the task-vector family as presets, each a sparsification and a consensus (`task_vectors.preset`, as
mergekit names its generalized task arithmetic's), then LED, linear and SLERP; `register` adds another method
class. `reference_markdown` renders every method's and post-step's parameters, as declared in its `PARAMS`, for the
configuration reference.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import LedmergeError
from .base import MergeMethod, PostStep
from .led import Led
from .linear import Linear
from .params import Param
from .resta import Resta
from .safemerge import SafeMerge
from .slerp import Slerp
from .task_vectors import preset

# The task-vector presets: name, sparsification (`sparsify.SPARSIFIERS`), consensus (`consensus.CONSENSUS`), docstring.
PRESETS = (
    preset("task_arithmetic", "none", "sum",
           "Task arithmetic: the base plus the weighted sum of the task vectors τ_t = θ_t − θ_0."),
    preset("ties", "magnitude", "ties",
           "TIES-Merging: keep the largest-magnitude entries of each task vector, elect a sign per weight, average "
           "the task vectors that agree with it."),
    preset("dare_linear", "dare", "sum",
           "DARE with a linear combination: drop and rescale each task vector, then task arithmetic."),
    preset("dare_ties", "dare", "ties",
           "DARE with TIES' sign election and disjoint mean: drop and rescale each task vector, then combine."),
    preset("breadcrumbs", "breadcrumbs", "sum",
           "Model Breadcrumbs: drop the largest and the smallest entries of each task vector by magnitude, then "
           "task arithmetic on what is left."),
    preset("breadcrumbs_ties", "breadcrumbs", "ties",
           "Model Breadcrumbs with TIES' sign election and disjoint mean in place of the sum."),
    preset("della", "della", "ties",
           "DELLA: magnitude-ranked random drops with rescale, then TIES' sign election and disjoint mean."),
    preset("della_linear", "della", "sum",
           "DELLA with a linear combination: magnitude-ranked random drops with rescale, then task arithmetic."),
)

METHODS: dict[str, type[MergeMethod]] = {}
# Spec key -> post-step, in the order they run: SafeMERGE judges the method's own update, then RESTA adds V.
POST_STEPS: dict[str, type[PostStep]] = {cls.name: cls for cls in (SafeMerge, Resta)}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available under its `name`."""
    assert cls.name and cls.name not in METHODS, f"bad or duplicate merge method name {cls.name!r}"
    METHODS[cls.name] = cls
    return cls


for _cls in (*PRESETS, Led, Linear, Slerp):
    register(_cls)
del _cls


def get_method(spec: Mapping) -> MergeMethod:
    """A validated method object from a spec dict; any problem is a one-line LedmergeError."""
    if not isinstance(spec, Mapping) or "method" not in spec:
        raise LedmergeError(f"merge spec {spec!r} has no 'method': write e.g. {{method: ties, density: 0.5}}")
    if spec["method"] not in METHODS:
        raise LedmergeError(f"unknown merge method {spec['method']!r}: choose one of {sorted(METHODS)}")
    return METHODS[spec["method"]].from_spec(spec, POST_STEPS)


def _default(p: Param) -> str:
    if p.default is None:
        return "unset"
    if isinstance(p.default, bool):
        return f"`{str(p.default).lower()}`"
    return f"`{p.default}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """A "Merge methods" section in Markdown: one table per method (parameter, type, default, allowed values,
    description), from each method's `PARAMS`."""
    lines = ["## Merge methods", "",
             "A merge spec names its method and sets any of that method's parameters, e.g. "
             "`{method: ties, density: 0.5}`; a parameter left out takes its default. Any other key is an error.", ""]
    for name in sorted(METHODS):
        lines += _table(f"### `{name}`", METHODS[name])
    lines += ["## Post-steps", "",
              "Any merge spec may add these, each under its own key with its parameters, e.g. "
              "`{method: ties, density: 0.5, resta: {gamma: 0.5}}` (`resta: {}` takes every default). They run on "
              f"each merged tensor in this order: {', '.join(f'`{k}`' for k in POST_STEPS)}. `aligned` and "
              "`unaligned` name models the merge reads: `base` or a task.", ""]
    for key, cls in POST_STEPS.items():
        lines += _table(f"### `{key}`", cls)
    return "\n".join(lines)


def summary_markdown() -> str:
    """The README's method table: one row per method and post-step, its parameters with their defaults."""
    def params(cls) -> str:
        return ", ".join(f"`{p.name}` {_default(p)}" for p in cls.PARAMS) or "none"

    rows = ["| method | what it does | parameters (default) |", "|---|---|---|"]
    rows += [f"| `{n}` | {_cell(_first_sentence(METHODS[n]))} | {params(METHODS[n])} |" for n in sorted(METHODS)]
    rows += [f"| post-step `{k}:` | {_cell(_first_sentence(cls))} | {params(cls)} |" for k, cls in POST_STEPS.items()]
    return "\n".join(rows) + "\n"


def _first_sentence(cls) -> str:
    text = " ".join((cls.__doc__ or "").split())
    return text.split(". ")[0].rstrip(".") + "."


def _table(title: str, cls) -> list[str]:
    summary = " ".join((cls.__doc__ or "").split())
    lines = [title, "", *([summary, ""] if summary else [])]
    lines += ["| parameter | type | default | allowed | description |", "|---|---|---|---|---|"]
    lines += [f"| `{p.name}` | {_cell(p.type_name)} | {_default(p)} | {_cell(p.allowed)} | {_cell(p.description)} |"
              for p in cls.PARAMS]
    return [*lines, ""]
