"""`!function` hooks of the ledmerge lm-eval tasks: thin adapters from lm-eval's (doc, results) to
ledmerge's scorers, so the same code scores inside and outside the harness."""

from ledmerge.evaluation.answers import code_passes, math_correct
from ledmerge.evaluation.judges import RefusalJudge

_REFUSAL = RefusalJudge()


def process_math(doc, results):
    return {"exact_match": float(math_correct(results[0], doc["answer"]))}


def process_code(doc, results):
    return {"pass_rate": float(code_passes(results[0], doc["tests"], doc.get("entry_point")))}


def process_refusal(doc, results):
    """Refusal rate under the default keyword judge; the configured judge is applied afterwards."""
    return {"refusal_rate": float(_REFUSAL.is_refusal(doc["prompt"], results[0]))}
