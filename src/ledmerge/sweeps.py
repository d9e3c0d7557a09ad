"""Sweeps: the config's `sweeps` section expanded into points, each a merge of its own (workflow/rules/sweeps.smk).

A sweep varies one configured merge over the Cartesian product of its axes (location, pattern, control, rate,
lambda, density, drop, zoo_seed). An axis is a list of values, or for the per-task axes (rate, lambda) either
{task: [values]} (a grid over those tasks) or [{task: value, ...}, ...] (a list of tuples); tasks and keys a
point does not set keep the configured value.

A point is named by its own values (`ledmerge.layout.point_name`): its merge and every value its sweep sets, whether
or not it equals the configured one, so a changed config never renames a point. It is never the configured merge
itself: one with the same values is merged again, under its own name. Two sweeps that set the same values share it.

Each point is a cached branch: every stage's output is named by the values that stage depends on and nothing
else (`ledmerge.layout`'s branch ids), so points share what they have in common and Snakemake reruns only what a
changed value reaches:
- scores by (zoo seed, location): a rate or pattern sweep reuses them;
- elected masks by (scores, pattern, the task's rate): a sweep of one task's rate reuses the others' elections;
- final masks by (scores, pattern, every rate): a λ, density or drop sweep reuses them;
- a count-matched control (control random or magnitude) by the final masks it matches and its kind;
- the merge and its evaluation by the point's name.
The scores (and the zoo) are read from the main run's files when they equal them (the main zoo and
`importance.location`: None here), since they depend on no value of the merge; the elections and masks are always
the sweeps' own, so a configured rate, pattern or λ reaches only the points that take it from the config (rerun
under the same name), never one that sets its own. A zoo seed other than the config's re-trains the toy base and
experts with that seed (data, tokenizer, calibration and evaluation sets stay the main run's), under their own
directory.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field

from .errors import LedmergeError
from .layout import (
    AXES,
    CONTROL,
    NO_CONTROL,
    PER_TASK,
    ZOO,
    ZOO_SEED,
    columns,
    control_id,
    election_id,
    masks_id,
    point_name,
    scores_id,
)
from .specs import merge_spec

MASK_AXES = ("location", "pattern", "control", "rate")  # what the LED masks depend on (besides the zoo)


@dataclass(frozen=True)
class Point:
    sweep: str
    merge: str  # the configured merge the sweep varies
    name: str  # the point's merge name (layout.point_name): the merge and the values the sweep sets
    values: dict  # column (location, pattern, control, rate_<t>, lambda_<t>, density, drop, zoo_seed) -> effective value
    spec: dict = field(repr=False)  # the merge spec the point runs
    zoo_seed: int | None  # None: the main zoo (or models that are not the zoo)
    uses_masks: bool
    scores: str | None = None  # branch ids (scores None: the main run's); set when uses_masks
    elections: dict = field(default_factory=dict)  # task -> election branch id
    masks: str | None = None  # the masks the point merges with: final masks, or a control of them (layout.control_id)
    matched: str | None = None  # a control's final masks (whose per-tensor counts it keeps); None without a control


@dataclass(frozen=True)
class Branches:
    """What the sweeps' jobs compute, each once. `points`: every distinct point by name (sweeps that set the same
    values share one); the branch tables map each branch id (an election's with its task) to the first point that
    needs it, which gives the values the branch is computed from. `masks`: the final (disjoint) masks, those the
    controls match too; `controls`: each count-matched control's branch (layout.control_id)."""
    points: dict
    scores: dict
    elections: dict
    masks: dict
    controls: dict = field(default_factory=dict)


def branches(points: list[Point]) -> Branches:
    distinct = {p.name: p for p in points}
    return Branches(points=distinct,
                    scores={p.scores: p for p in distinct.values() if p.scores},
                    elections={(e, t): p for p in distinct.values() for t, e in p.elections.items()},
                    masks={p.matched or p.masks: p for p in distinct.values() if p.masks},
                    controls={p.masks: p for p in distinct.values() if p.matched})


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
    """(scores id, {task: election id}, masks id) of a point's LED masks. The scores id is None where the scores are
    the main run's (the main zoo, `importance.location`); elections and masks are always the sweeps' own."""
    scores = scores_id(location, zoo_seed)
    main_scores = zoo_seed is None and location == config["importance"]["location"]
    elections = {t: election_id(scores, pattern, rates[t]) for t in sorted(rates)}
    return None if main_scores else scores, elections, masks_id(scores, pattern, rates)


def expand(config: dict) -> list[Point]:
    """Every point of every sweep of a validated config, sweep by sweep, in grid order. Bad axes raise one
    LedmergeError naming `sweeps.<name>` (see `check`)."""
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
            if key == ZOO_SEED and config["base_model"] != ZOO:
                raise LedmergeError(f"{where}.zoo_seed': zoo seeds re-train the toy zoo, and base_model is not "
                                    "zoo: remove zoo_seed")
        for combo in itertools.product(*(_axis_points(sweep, k) for k in axes)):
            chosen = {k: v for part in combo for k, v in part.items()}
            points.append(_point(config, sweep_name, merge, base_spec, chosen, tasks, uses_masks, where))
    return points


def _point(config, sweep_name, merge, base_spec, chosen, tasks, uses_masks, where) -> Point:
    from .merge import get_method

    main = {ZOO_SEED: config["seed"], "location": config["importance"]["location"],
            "pattern": config["election"]["pattern"], CONTROL: NO_CONTROL,
            **{f"rate_{t}": float(config["tasks"][t]["rate"]) for t in tasks},
            **({f"lambda_{t}": float(base_spec["lambdas"][t]) for t in tasks} if uses_masks else {}),
            "density": base_spec.get("density"), "drop": base_spec.get("drop")}
    own = {k: float(v) if k.startswith(("rate_", "lambda_")) else v for k, v in chosen.items()}  # the point's values
    values = {**main, **own}
    spec = copy.deepcopy(base_spec)
    for key in ("density", "drop"):
        if key in own:
            spec[key] = own[key]
    if uses_masks:
        spec["lambdas"] = {t: values[f"lambda_{t}"] for t in tasks}
    try:
        method = get_method(spec)
        method.check_inputs(tasks, {t: "" for t in tasks} if method.uses_masks else None)
    except LedmergeError as exc:
        raise LedmergeError(f"{where}': the point {json.dumps(chosen, sort_keys=True)} of merge {merge!r}: "
                            f"{exc}") from None
    zoo_seed = None if values[ZOO_SEED] == config["seed"] else values[ZOO_SEED]
    point = dict(sweep=sweep_name, merge=merge, name=point_name(merge, own, tasks), spec=spec, zoo_seed=zoo_seed,
                 uses_masks=uses_masks,
                 values={k: v for k, v in values.items() if v is not None and (uses_masks or k not in (
                     "location", "pattern", CONTROL, *(f"rate_{t}" for t in tasks)))})
    if uses_masks:
        scores, elections, masks = _branches(config, zoo_seed, values["location"], values["pattern"],
                                             {t: values[f"rate_{t}"] for t in tasks})
        point.update(scores=scores, elections=elections, masks=masks)
        if values[CONTROL] != NO_CONTROL:  # a count-matched control of those masks
            point.update(masks=control_id(masks, values[CONTROL]), matched=masks)
    return Point(**point)


def swept_columns(config: dict) -> list[str]:
    """The parameter columns of sweeps.csv: every column some sweep varies, in AXES order."""
    swept = set()
    for sweep in config["sweeps"].values():
        for key in AXES:
            if key in sweep and key in PER_TASK:
                swept |= {f"{key}_{t}" for p in _per_task_points(sweep[key]) for t in p}
            elif key in sweep:
                swept.add(key)
    return [c for c in columns(config["tasks"]) if c in swept]


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
