"""Evolutionary merging (as mergekit-evolve): CMA-ES over a merge method's coefficients.

The genome is one weight per task (λ_t for LED), plus one density per task for TIES and DARE
(DARE's drop = 1 − density). CMA-ES searches inside box bounds (weights [0, weight_max], densities
[DENSITY_MIN, 1]) with the `cma` package's bound handling, from weight 1/N and density 1 with step
size sigma0, as in the paper. Each candidate is merged in place and scored (`fitness`); the search
minimises the loss −fitness. The budget counts evaluations, the start point included, and is
rounded up to whole CMA-ES generations.
"""

from __future__ import annotations

import logging
import math
import time
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
DENSITY_MIN = 0.05
POSITIVE_WEIGHT = 1e-6  # TIES-style means divide by the weights: 0 becomes this


def genome(method: str, tasks: list[str], weight_max: float) -> list[tuple[str, str, float, float, float]]:
    """(kind, task, lower, upper, start) per coordinate: a weight per task, then a density per task; `weight_max`:
    data_aware.evolve.weight_max."""
    if method not in METHODS:
        raise LedmergeError(f"data-aware search has no method {method!r}: choose from {list(METHODS)}")
    genes = [("weight", t, 0.0, weight_max, 1.0 / len(tasks)) for t in tasks]
    if method in ("ties", "dare_linear", "dare_ties"):
        genes += [("density", t, DENSITY_MIN, 1.0, 1.0) for t in tasks]
    return genes


def decode(method: str, genes, x) -> dict:
    """The merge spec of one point of the search space (clipped into the bounds)."""
    values = {(kind, t): float(np.clip(v, lo, hi)) for (kind, t, lo, hi, _), v in zip(genes, x, strict=True)}
    weights = {t: v for (kind, t), v in values.items() if kind == "weight"}
    density = {t: v for (kind, t), v in values.items() if kind == "density"}
    if method in ("ties", "dare_ties", "led"):  # positive weights (LED: only needed by its TIES combiners)
        weights = {t: max(w, POSITIVE_WEIGHT) for t, w in weights.items()}
    if method == "led":
        return {"method": "led", "lambdas": weights}
    spec = {"method": method, "weights": weights}
    if method == "ties":
        spec["density"] = density
    elif method.startswith("dare"):
        spec["drop"] = {t: 1.0 - d for t, d in density.items()}
    return spec


def search_options(opts: dict) -> dict:
    """budget, sigma0, seed, weight_max of the config's `data_aware.evolve` section (schema defaults for the rest;
    `methods` says which searches run, not how one runs)."""
    return {k: v for k, v in resolve("data_aware.evolve", opts).items() if k != "methods"}


def evolve(evaluator: MergeEvaluator, method: str, *, w_align: float, w_task: float, base_spec: dict | None = None,
           popsize: int | None = None, **opts) -> tuple[list[dict], dict]:
    """CMA-ES search. Returns (history rows, best row); a row holds the evaluation index, the
    generation, the coefficients, CE_align, CE_task, fitness and the spec. `opts`: `search_options`."""
    o = search_options(opts)
    budget, sigma0, seed, weight_max = o["budget"], o["sigma0"], o["seed"], o["weight_max"]
    genes = genome(method, evaluator.tasks, weight_max)
    x0 = [g[4] for g in genes]
    lower, upper = [g[2] for g in genes], [g[3] for g in genes]
    # cma treats seed 0 as "seed from the clock": offset by one so every config seed is reproducible.
    opts = {"seed": seed + 1, "bounds": [lower, upper], "verbose": -9, "verb_log": 0, "verb_disp": 0}
    if popsize:
        opts["popsize"] = popsize
    es = cma.CMAEvolutionStrategy(x0, sigma0, opts)
    history: list[dict] = []
    start = time.time()

    def evaluate(x, generation):
        spec = {**(base_spec or {}), **decode(method, genes, x)}
        ce = evaluator.score(get_method(spec))
        row = {"evaluation": len(history), "generation": generation,
               **{f"{kind}_{t}": float(np.clip(v, lo, hi)) for (kind, t, lo, hi, _), v in zip(genes, x)},
               "ce_align": ce["alignment"], "ce_task": ce["task"], "fitness": fitness(ce, w_align, w_task),
               "spec": spec}
        history.append(row)
        return -row["fitness"]

    evaluate(x0, 0)  # the paper's start point, for reference in the history
    generation = 0
    while len(history) < budget:
        generation += 1
        xs = es.ask()
        es.tell(xs, [evaluate(x, generation) for x in xs])
    best = max(history, key=lambda r: r["fitness"])  # first of equals: ties go to the earlier evaluation
    log.info("%s: %d evaluations in %.1fs, best fitness %.4f (start %.4f)", method, len(history),
             time.time() - start, best["fitness"], history[0]["fitness"])
    if not math.isfinite(best["fitness"]):
        raise LedmergeError(f"data-aware search for {method} found no finite fitness: check the synthetic data")
    return history, best


def run_evolve(evaluator: MergeEvaluator, method: str, out_dir, *, objective: str, w_align: float, w_task: float,
               **search) -> dict:
    """Search, then write history.csv, recipe.json (the best merge spec) and search.json into `out_dir`."""
    start = time.time()
    search = search_options(search)
    history, best = evolve(evaluator, method, w_align=w_align, w_task=w_task, **search)
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "history.csv") as tmp:
        pd.DataFrame([{k: v for k, v in r.items() if k != "spec"} for r in history]).to_csv(
            tmp, index=False, float_format="%.8g")
    summary = {"method": method, "objective": objective, "w_align": w_align, "w_task": w_task, **search,
               "evaluations": len(history), "best_evaluation": best["evaluation"], "best_spec": best["spec"],
               "best": scores(evaluator, best["spec"], w_align, w_task),
               "start": scores(evaluator, history[0]["spec"], w_align, w_task),
               "seconds": round(time.time() - start, 2)}
    write_json(out_dir / "search.json", summary)
    write_json(out_dir / "recipe.json", best["spec"])
    return summary
