"""Checking answers: extracting and grading math and code replies, shared by the lm-eval task hooks and the tests."""

from __future__ import annotations

import re

from .sandbox import run_tests

# "the answer is 7", "The answer is: -1,234.5", GSM8K's "#### 7"; the toy zoo may split "- 3".
_ANSWER = re.compile(r"(?:the answer is|####)\s*:?\s*\$?\s*(-?\s?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_FENCE = re.compile(r"```(?:[A-Za-z0-9_+-]*)\n?(.*?)(?:```|$)", re.DOTALL)


def normalize_number(text: str) -> str:
    """'1,234' -> '1234', '7.0' -> '7', '- 3' -> '-3'; non-numbers are returned stripped."""
    text = text.replace(",", "").replace(" ", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(response: str) -> str | None:
    """The final answer: the number after the last "the answer is" (or "####"), else None."""
    found = _ANSWER.findall(response)
    return normalize_number(found[-1]) if found else None


def math_correct(response: str, answer) -> bool:
    """Exact match of the extracted final answer with the reference, both normalised as numbers."""
    got = extract_answer(response)
    return got is not None and got == normalize_number(str(answer))


def extract_code(response: str) -> str:
    """The first fenced code block of a chat reply, else the reply itself (the toy expert writes bare code)."""
    m = _FENCE.search(response)
    return m.group(1) if m else response


def until_fence(reply: str) -> str:
    """A reply that continues an opened code fence, up to the fence that closes it."""
    end = reply.find("```")
    return reply if end == -1 else reply[:end]


def code_passes(response: str, tests: list[str], entry_point: str | None = None, **limits) -> bool:
    """Whether the reply's code passes all tests, run in the sandbox (never in this process)."""
    return run_tests(extract_code(response), tests, entry_point, **limits)
