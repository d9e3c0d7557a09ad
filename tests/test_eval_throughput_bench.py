"""bench/eval_throughput.py's count of a reply's generated tokens (the figure its throughput divides by)"""

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "eval_throughput", Path(__file__).resolve().parent.parent / "bench" / "eval_throughput.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_reply_length_counts_the_tokens_before_the_first_eos_at_most_max_new_tokens():
    assert bench.reply_length([5, 6, 2, 2, 2], [2], 40) == 2  # EOS and the padding after it not counted
    assert bench.reply_length([5, 7, 6, 1, 9], [7, 1], 40) == 1  # the first of several EOS ids
    assert bench.reply_length([2, 5], [2], 40) == 0
    assert bench.reply_length([5, 6, 8], [2], 40) == 3  # a batch that stopped early: the row's own length
    assert bench.reply_length([5, 6, 8, 9, 2], [2], 3) == 3  # never more than max_new_tokens
