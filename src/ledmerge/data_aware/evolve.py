"""Evolutionary merging (as mergekit-evolve): CMA-ES over a merge method's coefficients.

The genome (`genome`) is one weight per task (λ_t for LED), plus one density per task for TIES and DARE
(DARE's drop = 1 − density); with `genes: per_layer`, one of each per task and decoder layer plus one per task
for the tensors outside the layers (embeddings, final norm, LM head), as mergekit-evolve's layer-wise genome.
CMA-ES searches inside box bounds (weights [weight_min, weight_max], densities [DENSITY_MIN, 1]) with the `cma`
package's bound handling, from weight 1/N and density 1 with step size sigma0, as in the paper. Each candidate
is merged in place and scored (`fitness`); the search minimises the loss −fitness. The budget counts
evaluations, the start point included, and is rounded up to whole CMA-ES generations. The result is the best
candidate on the search split or (`select: heldout`) the best on the held-out split among the
`heldout_candidates` best on the search split (`select`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cma
import numpy as np
import pandas as pd

from ..errors import LedmergeError
from ..fileio import atomic_path, write_json
from ..merge import get_method
from ..schema import resolve
from .fitness import MergeEvaluator, fitness, scores

log = logging.getLogger(__name__)

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "led")
DENSITIES = ("ties", "dare_linear", "dare_ties")  # the methods with a density gene per task
NORMALIZED = ("ties", "dare_ties")  # TIES' consensus: `normalize` divides by the weights
DENSITY_MIN = 0.05
POSITIVE_WEIGHT = 1e-6  # TIES-style means divide by the weights: 0 becomes this
REST = "rest"  # the slot of the tensors outside the decoder layers


@dataclass(frozen=True)
class Gene:
    """One coordinate of the search: a weight or density of `task`, for every tensor (`slot` None), one decoder
    layer (an int) or the other tensors (`REST`); its bounds and start."""

    kind: str
    task: str
    slot: int | str | None
    lower: float
    upper: float
    start: float

    @property
    def column(self) -> str:
        """Its column in history.csv: weight_math, or per layer weight_math_3, weight_math_rest."""
        return f"{self.kind}_{self.task}" + ("" if self.slot is None else f"_{self.slot}")


def genome(method: str, tasks: list[str], *, weight_min: float, weight_max: float,
           layers: int | None = None) -> list[Gene]:
    """A weight per task, then a density per task (methods with one); with `layers` (genes per_layer) each of them
    per decoder layer 0..layers−1 and once more for the other tensors. `weight_min`, `weight_max`:
    data_aware.evolve's."""
    if method not in METHODS:
        raise LedmergeError(f"data-aware search has no method {method!r}: choose from {list(METHODS)}")
    if weight_min >= weight_max:
        raise LedmergeError(f"data_aware.evolve.weight_min ({weight_min}) must be below weight_max ({weight_max})")
    slots = [None] if layers is None else [*range(layers), REST]
    kinds = [("weight", weight_min, weight_max, 1.0 / len(tasks))]
    if method in DENSITIES:
        kinds.append(("density", DENSITY_MIN, 1.0, 1.0))
    return [Gene(kind, t, slot, lo, hi, start) for kind, lo, hi, start in kinds for t in tasks for slot in slots]


def decode(method: str, genes: list[Gene], x, *, normalize: bool = True) -> dict:
    """The merge spec of one point of the search space (clipped into the bounds); `normalize`: TIES' (ties,
    dare_ties), data_aware.evolve.normalize. Per-layer genes give per-layer lists (`merge.params`)."""
    values: dict[tuple[str, str], list[float]] = {}
    for g, v in zip(genes, x, strict=True):
        values.setdefault((g.kind, g.task), []).append(float(np.clip(v, g.lower, g.upper)))
    per_model = genes[0].slot is None
    one = (lambda v: v[0]) if per_model else list
    weights = {t: one(v) for (kind, t), v in values.items() if kind == "weight"}
    density = {t: one(v) for (kind, t), v in values.items() if kind == "density"}
    # Positive weights where a mean divides by them (LED, from before negative weights: its TIES combiners)
    if method in NORMALIZED and normalize or method == "led" and all(g.lower >= 0 for g in genes):
        weights = {t: max(w, POSITIVE_WEIGHT) if per_model else [max(x, POSITIVE_WEIGHT) for x in w]
                   for t, w in weights.items()}
    if method == "led":
        return {"method": "led", "lambdas": weights}
    spec = {"method": method, "weights": weights}
    if method == "ties":
        spec["density"] = density
    elif method.startswith("dare"):
        spec["drop"] = {t: 1.0 - d if per_model else [1.0 - x for x in d] for t, d in density.items()}
    if method in NORMALIZED and not normalize:
        spec["normalize"] = False
    return spec


def search_options(opts: dict) -> dict:
    """The config's `data_aware.evolve` section, schema defaults filled, less `methods` (which searches run, not
    how one runs)."""
    return {k: v for k, v in resolve("data_aware.evolve", opts).items() if k != "methods"}


def select(evaluator: MergeEvaluator, history: list[dict], how: str, n: int, w_align: float,
           w_task: float) -> tuple[dict, dict]:
    """The candidate the search returns and how it was chosen: the best on the search split (`how` search, or
    the held-out split lacks the data), else of the `n` best distinct specs on the search split the best on the
    held-out split (ties: the better on the search split). Returns (row, selection record)."""
    best = max(history, key=lambda r: r["fitness"])  # first of equals: ties go to the earlier evaluation
    record = {"select": how, "selected_on": "search", "search_best_evaluation": best["evaluation"]}
    if how == "search":
        return best, record
    if not evaluator.covers("heldout", w_align, w_task):
        log.warning("the held-out split lacks data the objective weighs: selecting on the search split")
        return best, record
    ranked, seen = [], set()
    for row in sorted(history, key=lambda r: -r["fitness"]):  # stable: the earlier of equals first
        key = json.dumps(row["spec"], sort_keys=True)
        if key not in seen and math.isfinite(row["fitness"]):
            seen.add(key)
            ranked.append(row)
        if len(ranked) == n:
            break
    candidates = [{"evaluation": r["evaluation"], "search_fitness": r["fitness"],
                   "heldout_fitness": fitness(evaluator.score(get_method(r["spec"]), "heldout"), w_align, w_task)}
                  for r in ranked]
    chosen = max(candidates, key=lambda c: c["heldout_fitness"])
    record.update(selected_on="heldout", candidates=candidates)
    return history[chosen["evaluation"]], record


def evolve(evaluator: MergeEvaluator, method: str, *, w_align: float, w_task: float, popsize: int | None = None,
           **opts) -> tuple[list[dict], dict, dict]:
    """CMA-ES search. Returns (history rows, chosen row, selection record: `select`'s, with the genome size); a row
    holds the evaluation index, the generation, the coefficients, the alignment term, CE_task, fitness and the
    spec. `opts`: `search_options`."""
    o = search_options(opts)
    layers = evaluator.num_layers if o["genes"] == "per_layer" else None
    genes = genome(method, evaluator.tasks, weight_min=o["weight_min"], weight_max=o["weight_max"], layers=layers)
    x0 = [g.start for g in genes]
    # cma treats seed 0 as "seed from the clock": offset by one so every config seed is reproducible.
    cma_opts = {"seed": o["seed"] + 1, "bounds": [[g.lower for g in genes], [g.upper for g in genes]],
                "verbose": -9, "verb_log": 0, "verb_disp": 0}
    if popsize:
        cma_opts["popsize"] = popsize
    es = cma.CMAEvolutionStrategy(x0, o["sigma0"], cma_opts)
    history: list[dict] = []
    start = time.time()
    log.info("%s: %d genes (%s)", method, len(genes), o["genes"])

    def evaluate(x, generation):
        spec = decode(method, genes, x, normalize=o["normalize"])
        measured = evaluator.score(get_method(spec))
        row = {"evaluation": len(history), "generation": generation,
               **{g.column: float(np.clip(v, g.lower, g.upper)) for g, v in zip(genes, x)},
               **evaluator.terms(measured, w_align, w_task), "spec": spec}
        history.append(row)
        return -row["fitness"]

    evaluate(x0, 0)  # the paper's start point, for reference in the history
    generation = 0
    while len(history) < o["budget"]:
        generation += 1
        xs = es.ask()
        es.tell(xs, [evaluate(x, generation) for x in xs])
    if not any(math.isfinite(r["fitness"]) for r in history):
        raise LedmergeError(f"data-aware search for {method} found no finite fitness: check the synthetic data")
    best, record = select(evaluator, history, o["select"], o["heldout_candidates"], w_align, w_task)
    log.info("%s: %d evaluations in %.1fs, chosen %d (on %s), fitness %.4f (start %.4f)", method, len(history),
             time.time() - start, best["evaluation"], record["selected_on"], best["fitness"], history[0]["fitness"])
    return history, best, {"genome_size": len(genes), **record}


def run_evolve(evaluator: MergeEvaluator, method: str, out_dir, *, objective: str, w_align: float, w_task: float,
               **search) -> dict:
    """Search, then write history.csv, recipe.json (the chosen merge spec) and search.json into `out_dir`; the
    summary holds the chosen spec's terms and fitness on both splits."""
    start = time.time()
    search = search_options(search)
    history, best, record = evolve(evaluator, method, w_align=w_align, w_task=w_task, **search)
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "history.csv") as tmp:
        pd.DataFrame([{k: v for k, v in r.items() if k != "spec"} for r in history]).to_csv(
            tmp, index=False, float_format="%.8g")
    summary = {"method": method, "objective": objective, "w_align": w_align, "w_task": w_task,
               "align_metric": evaluator.align_metric, **search, "evaluations": len(history), **record,
               "best_evaluation": best["evaluation"], "best_spec": best["spec"],
               "best": scores(evaluator, best["spec"], w_align, w_task),
               "start": scores(evaluator, history[0]["spec"], w_align, w_task),
               "seconds": round(time.time() - start, 2)}
    write_json(out_dir / "search.json", summary)
    write_json(out_dir / "recipe.json", best["spec"])
    return summary
