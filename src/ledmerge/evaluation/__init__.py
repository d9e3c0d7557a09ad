"""Evaluation: lm-eval runs of a model directory, safety judges, the code sandbox."""

from .answers import code_passes, extract_answer, extract_code, math_correct
from .judges import JUDGES, Judge, ModelJudge, RefusalJudge, get_judge, register_judge
from .runner import evaluate_model
from .sandbox import run_tests

__all__ = ["JUDGES", "Judge", "ModelJudge", "RefusalJudge", "get_judge", "register_judge", "evaluate_model",
           "run_tests", "code_passes", "extract_answer", "extract_code", "math_correct"]
