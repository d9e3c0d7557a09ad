"""`!function` hooks of the ledmerge lm-eval tasks: thin adapters from lm-eval's (doc, results) to
ledmerge's scorers, so the same code scores inside and outside the harness."""

from ledmerge.evaluation.answers import code_passes, math_correct, until_fence
from ledmerge.evaluation.judges import RefusalJudge
from ledmerge.evaluation.sandbox import run_tests

_REFUSAL = RefusalJudge()


def process_math(doc, results):
    return {"exact_match": float(math_correct(results[0], doc["answer"]))}


def process_code(doc, results):
    return {"pass_rate": float(code_passes(results[0], doc["tests"], doc.get("entry_point")))}


def process_refusal(doc, results):
    """Refusal rate under the default keyword judge; the configured judge is applied afterwards."""
    return {"refusal_rate": float(_REFUSAL.is_refusal(doc["prompt"], results[0]))}


def process_humaneval(doc, results):
    """The prompt's signature and docstring, then the reply up to its closing fence, against HumanEval's `check`."""
    program = doc["prompt"] + until_fence(results[0])
    return {"pass_rate": float(run_tests(program, [doc["test"], f"check({doc['entry_point']})"], doc["entry_point"]))}


def process_mbpp(doc, results):
    """The reply up to its closing fence (the prompt opened it), after the problem's setup code, against its tests."""
    program = (doc.get("test_setup_code") or "") + "\n" + until_fence(results[0])
    return {"pass_rate": float(run_tests(program, list(doc["test_list"])))}
