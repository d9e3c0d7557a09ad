"""Sweeps: the config's `sweeps` section expanded into points, each a merge of its own (workflow/rules/sweeps.smk).

A sweep varies one configured merge over the Cartesian product of its axes (location, pattern, rate, lambda,
density, drop, zoo_seed). An axis is a list of values, or for the per-task axes (rate, lambda) either
{task: [values]} (a grid over those tasks) or [{task: value, ...}, ...] (a list of tuples); tasks and keys a
point does not set keep the configured value.

Each point is a cached branch: every stage's output is named by the values that stage depends on and nothing
else, so points share what they have in common and Snakemake reruns only what a changed value reaches:
- scores by (zoo seed, location): a rate or pattern sweep reuses them;
- elected masks by (scores, pattern, the task's rate): a sweep of one task's rate reuses the others' elections;
- final masks by (scores, pattern, every rate): a λ, density or drop sweep reuses them;
- the merge by the point's name, which lists exactly the values that differ from the configured merge (so a
  point equal to the configured merge is that merge, and two sweeps with the same point share one merge).
A stage equal to the main run's (None here) reads the main run's files. A zoo seed other than the config's
re-trains the toy base and experts with that seed (data, tokenizer, calibration and evaluation sets stay the
main run's), under their own directory.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field

from .errors import LedmergeError

# Axes in the order of the point names and of the sweeps.csv columns (docs/results.md's order).
AXES = ("location", "pattern", "rate", "lambda", "density", "drop", "zoo_seed")
PER_TASK = ("rate", "lambda")
MASK_AXES = ("location", "pattern", "rate")  # what the LED masks depend on (besides the zoo)


@dataclass(frozen=True)
class Point:
    sweep: str
    merge: str  # the configured merge the sweep varies
    name: str  # the point's merge name: `merge` itself when every value is the configured one
    values: dict  # column (location, pattern, rate_<t>, lambda_<t>, density, drop, zoo_seed) -> effective value
    spec: dict = field(repr=False)  # the merge spec the point runs
    zoo_seed: int | None  # None: the main zoo (or models that are not the zoo)
    uses_masks: bool
    scores: str | None = None  # branch ids (None: the main run's files); set when uses_masks
    elections: dict = field(default_factory=dict)  # task -> election branch id or None
    masks: str | None = None


def _fmt(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _per_task_points(axis) -> list[dict]:
    """{task: [v, ...]} -> the grid over those tasks; [{task: v}, ...] -> as given."""
    if isinstance(axis, dict):
        names = sorted(axis)
        return [dict(zip(names, combo)) for combo in itertools.product(*(axis[t] for t in names))]
    return [dict(p) for p in axis]


def _axis_points(sweep: dict, key: str) -> list[dict]:
    if key in PER_TASK:
        return [{f"{key}_{t}": v for t, v in p.items()} for p in _per_task_points(sweep[key])]
    return [{key: v} for v in sweep[key]]


def _branches(config: dict, zoo_seed, location, pattern, rates) -> tuple:
    """(scores id, {task: election id}, masks id) of a point's LED masks; None for a stage equal to the main
    run's (never with a re-trained zoo)."""
    scores = location + ("" if zoo_seed is None else f"_seed{zoo_seed}")
    main_scores = zoo_seed is None and location == config["importance"]["location"]
    same_pattern = pattern == config["election"]["pattern"]
    elections = {t: None if main_scores and same_pattern and rates[t] == config["tasks"][t]["rate"]
                 else f"{scores}_{pattern}_r{_fmt(rates[t])}" for t in sorted(rates)}
    masks = None if all(e is None for e in elections.values()) else \
        f"{scores}_{pattern}_" + "_".join(f"{t}{_fmt(rates[t])}" for t in sorted(rates))
    return None if main_scores else scores, elections, masks


def expand(config: dict) -> list[Point]:
    """Every point of every sweep of a validated config, sweep by sweep, in grid order. Bad axes raise one
    LedmergeError naming `sweeps.<name>` (see `check`)."""
    from .config import ZOO, merge_spec

    tasks = sorted(config["tasks"])
    points = []
    for sweep_name, sweep in config["sweeps"].items():
        where = f"config error at 'sweeps.{sweep_name}"
        merge = sweep["merge"]
        if merge not in config["merges"]:
            raise LedmergeError(f"{where}.merge': {merge!r} is not an entry of merges ({sorted(config['merges'])}): "
                                "name a configured merge")
        axes = [k for k in AXES if k in sweep]
        if not axes:
            raise LedmergeError(f"{where}': nothing to sweep: give at least one of {list(AXES)}")
        base_spec = merge_spec(config, merge)
        uses_masks = base_spec["method"] == "led"
        for key in axes:
            if key in (*MASK_AXES, "lambda") and not uses_masks:
                raise LedmergeError(f"{where}.{key}': {key} only varies an LED merge (method led), and "
                                    f"{merge!r} is {base_spec['method']}: remove it or sweep an LED merge")
            if key in PER_TASK:
                given = sweep[key] if isinstance(sweep[key], dict) else {t: 0 for p in sweep[key] for t in p}
                unknown = sorted(set(given) - set(tasks))
                if unknown:
                    raise LedmergeError(f"{where}.{key}': {unknown} are not tasks ({tasks}): fix the task names")
                bad = [v for p in _per_task_points(sweep[key]) for v in p.values() if not 0 < v <= 1]
                if key == "rate" and bad:
                    raise LedmergeError(f"{where}.rate': {bad[0]} is not an election rate: give rates in (0, 1]")
            if key == "zoo_seed" and config["base_model"] != ZOO:
                raise LedmergeError(f"{where}.zoo_seed': zoo seeds re-train the toy zoo, and base_model is not "
                                    "zoo: remove zoo_seed")
        for combo in itertools.product(*(_axis_points(sweep, k) for k in axes)):
            chosen = {k: v for part in combo for k, v in part.items()}
            points.append(_point(config, sweep_name, merge, base_spec, chosen, tasks, uses_masks, where))
    return points


def _point(config, sweep_name, merge, base_spec, chosen, tasks, uses_masks, where) -> Point:
    from .merge import get_method

    main = {"zoo_seed": config["seed"], "location": config["importance"]["location"],
            "pattern": config["election"]["pattern"],
            **{f"rate_{t}": float(config["tasks"][t]["rate"]) for t in tasks},
            **({f"lambda_{t}": float(base_spec["lambdas"][t]) for t in tasks} if uses_masks else {}),
            "density": base_spec.get("density"), "drop": base_spec.get("drop")}
    values = {**main, **{k: float(v) if k.startswith(("rate_", "lambda_")) else v for k, v in chosen.items()}}
    spec = copy.deepcopy(base_spec)
    for key in ("density", "drop"):
        if key in chosen:
            spec[key] = chosen[key]
    if uses_masks:
        spec["lambdas"] = {t: values[f"lambda_{t}"] for t in tasks}
    try:
        method = get_method(spec)
        method.check_inputs(tasks, {t: "" for t in tasks} if method.uses_masks else None)
    except LedmergeError as exc:
        raise LedmergeError(f"{where}': the point {json.dumps(chosen, sort_keys=True)} of merge {merge!r}: "
                            f"{exc}") from None
    zoo_seed = None if values["zoo_seed"] == config["seed"] else values["zoo_seed"]
    differs = [k for k in _columns(tasks) if k in values and values[k] != main[k]]
    name = ".".join([merge, *(f"{k}-{_fmt(values[k])}" for k in differs)])
    point = dict(sweep=sweep_name, merge=merge, name=name, spec=spec, zoo_seed=zoo_seed, uses_masks=uses_masks,
                 values={k: v for k, v in values.items() if v is not None and (uses_masks or k not in (
                     "location", "pattern", *(f"rate_{t}" for t in tasks)))})
    if uses_masks:
        scores, elections, masks = _branches(config, zoo_seed, values["location"], values["pattern"],
                                             {t: values[f"rate_{t}"] for t in tasks})
        point.update(scores=scores, elections=elections, masks=masks)
    return Point(**point)


def _columns(tasks: list[str]) -> list[str]:
    cols = []
    for key in AXES:
        cols += [f"{key}_{t}" for t in tasks] if key in PER_TASK else [key]
    return cols


def swept_columns(config: dict) -> list[str]:
    """The parameter columns of sweeps.csv: every column some sweep varies, in AXES order."""
    tasks = sorted(config["tasks"])
    swept = set()
    for sweep in config["sweeps"].values():
        for key in AXES:
            if key in sweep and key in PER_TASK:
                swept |= {f"{key}_{t}" for p in _per_task_points(sweep[key]) for t in p}
            elif key in sweep:
                swept.add(key)
    return [c for c in _columns(tasks) if c in swept]


def check(config: dict) -> None:
    """Expand every sweep once, so a bad axis or point stops the run before any job, and check that each swept
    location can score what the importance section scores."""
    from .led.location import check_location

    for name, sweep in config["sweeps"].items():
        for location in sweep.get("location", []):
            try:
                check_location(location, include_norms=config["importance"]["include_norms"],
                               include_embeddings=config["importance"]["include_embeddings"],
                               random_seed=config["seed"], random_key="")
            except LedmergeError as exc:
                raise LedmergeError(f"config error at 'sweeps.{name}.location': {exc}") from None
    expand(config)
