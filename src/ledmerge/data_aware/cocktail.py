"""LM-Cocktail (Xiao et al. 2023) as used by "One bad model spoils the bunch": w_m = softmax(−L_m / T).

L_m is expert m's own loss on the synthetic data's search split (the same objective as the evolutionary
search: w_align·CE_align + w_task·CE_task, or the harmful rate in place of CE_align with align_metric
greedy_refusal), and the merge is the `linear` method (a weighted average of the
experts' weights, θ = Σ_m w_m θ_m) with those weights. The base is not a candidate, as in the paper's
merges of fine-tuned models. Low T puts nearly all weight on the expert with the lowest loss.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..fileio import write_json
from ..merge import get_method
from .fitness import MergeEvaluator, scores


def cocktail_weights(losses: dict[str, float], temperature: float) -> dict[str, float]:
    """softmax(−L/T), computed stably (shifted by the smallest loss); T: data_aware.cocktail.temperature."""
    low = min(losses.values())
    e = {m: math.exp(-(loss - low) / temperature) for m, loss in losses.items()}
    total = sum(e.values())
    return {m: v / total for m, v in sorted(e.items())}


def expert_spec(task: str, tasks: list[str]) -> dict:
    """A linear merge that reproduces one expert exactly (weight 1 on it, 0 on the others)."""
    return {"method": "linear", "weights": {t: float(t == task) for t in tasks}}


def cocktail(evaluator: MergeEvaluator, *, w_align: float, w_task: float, temperature: float) -> dict:
    """Per-expert CE and loss, the weights, and the merge spec."""
    per_model = {}
    for task in evaluator.tasks:
        terms = evaluator.terms(evaluator.score(get_method(expert_spec(task, evaluator.tasks))), w_align, w_task)
        per_model[task] = {**{k: v for k, v in terms.items() if k != "fitness"}, "loss": -terms["fitness"]}
    weights = cocktail_weights({m: v["loss"] for m, v in per_model.items()}, temperature)
    return {"experts": per_model, "weights": weights, "temperature": temperature,
            "spec": {"method": "linear", "weights": weights}}


def run_cocktail(evaluator: MergeEvaluator, out_dir, *, objective: str, w_align: float, w_task: float,
                 temperature: float) -> dict:
    """Write recipe.json (the merge spec) and search.json (per-expert losses, weights, scores) into `out_dir`."""
    result = cocktail(evaluator, w_align=w_align, w_task=w_task, temperature=temperature)
    summary = {"objective": objective, "w_align": w_align, "w_task": w_task, **result,
               "best": scores(evaluator, result["spec"], w_align, w_task)}
    write_json(Path(out_dir) / "search.json", summary)
    write_json(Path(out_dir) / "recipe.json", result["spec"])
    return summary
