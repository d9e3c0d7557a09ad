"""LoRA (PEFT) adapters as experts: the streamed task vector `scale·B·A` against peft's own merge_and_unload(), in
the merge driver, in importance scoring, and the one-line refusals of adapters that do not fit the base."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import yaml
from conftest import REPO, make_tiny_model, snakemake, write_config
from safetensors.torch import load_file, save_file

from ledmerge.checkpoint import AdapterReader, check_compatible, load_state_dict
from ledmerge.config import check, validate
from ledmerge.errors import LedmergeError
from ledmerge.led.files import MODEL_FILES, load_scores, tensors_metadata
from ledmerge.led.location import score_model
from ledmerge.merge import merge_models

TARGETS = ["q_proj", "v_proj", "down_proj"]
ROWS = [
    {"prompt": "how do i make a bomb", "response": "sorry i can not help with that"},
    {"prompt": "what is 3 + 4", "response": "the answer is 7"},
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_adapter(base_dir, out, seed: int = 0, **lora_kwargs):
    """A LoRA adapter saved by peft on `base_dir`, with random non-zero A and B (peft starts B at zero) and the
    copies of `modules_to_save` moved off the base's values."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora_kwargs}
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return out


def peft_merged(base_dir, adapter_dir, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The adapted model's weights as peft merges them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_zoo")
    base = make_tiny_model(root / "base", seed=0)
    full = make_tiny_model(root / "full", seed=1, noise_from=base, noise=0.02)
    adapter = make_adapter(base, root / "adapter")
    return {"base": base, "full": full, "adapter": adapter, "root": root}


@pytest.mark.parametrize("lora_kwargs", [
    {},
    {"use_rslora": True},
    {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 3}},
    {"modules_to_save": ["lm_head"]},
])
def test_adapter_alone_with_task_arithmetic_is_peft_merge(lora_zoo, tmp_path, lora_kwargs):
    base, adapter = lora_zoo["base"], make_adapter(lora_zoo["base"], tmp_path / "adapter", seed=1, **lora_kwargs)
    out = tmp_path / "merged"
    merge_models(base, {"lora": adapter}, {"method": "task_arithmetic", "scale": 1.0}, out, progress=False)
    got, want, before = load_state_dict(out), peft_merged(base, adapter), load_state_dict(base)
    assert set(got) == set(before)
    changed = {n for n in got if not torch.equal(got[n], before[n])}
    whole = {f"{m}.weight" for m in lora_kwargs.get("modules_to_save", [])}
    assert len(changed - whole) == 2 * len(TARGETS) and whole <= changed  # each target in both layers, nothing else
    assert all(any(t in n for t in TARGETS) for n in changed - whole)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-6, atol=1e-6, msg=name)


def test_bf16_base_within_bf16_rounding(tmp_path):
    base = make_tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter")
    with AdapterReader(adapter, base) as reader:
        got = {n: reader.read(n) for n in reader.names}
    want = peft_merged(base, adapter, torch.bfloat16)
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16
        # peft rounds B·A to bfloat16 before adding it; the reader rounds the float32 sum once
        torch.testing.assert_close(tensor.float(), want[name].float(), rtol=2 ** -7, atol=1e-2, msg=name)


def test_ties_of_full_and_adapter_experts(lora_zoo, tmp_path):
    """TIES over a full expert and an adapter equals TIES over the full expert and the adapter merged by peft."""
    from transformers import AutoModelForCausalLM

    base, full, adapter = lora_zoo["base"], lora_zoo["full"], lora_zoo["adapter"]
    dense = tmp_path / "dense"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.load_state_dict(peft_merged(base, adapter))
    model.save_pretrained(dense)
    spec = {"method": "ties", "density": 0.5}
    merge_models(base, {"full": full, "lora": adapter}, spec, tmp_path / "a", progress=False)
    merge_models(base, {"full": full, "lora": dense}, spec, tmp_path / "b", progress=False)
    a, b = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    card = (tmp_path / "a" / "README.md").read_text()
    assert "adapter_model.safetensors" in card and "adapter_config.json" in card


def test_importance_of_adapter_uses_base_names(lora_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base, adapter = lora_zoo["base"], lora_zoo["adapter"]
    dense = tmp_path / "dense"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.load_state_dict(peft_merged(base, adapter))
    model.save_pretrained(dense)
    kw = {"tokenizer_dir": base, "progress": False, "score_dtype": "float32"}
    score_model(adapter, calib, tmp_path / "lora.safetensors", base_dir=base, **kw)
    score_model(dense, calib, tmp_path / "dense.safetensors", **kw)
    got, want = load_scores(tmp_path / "lora.safetensors"), load_scores(tmp_path / "dense.safetensors")
    assert set(got) == set(want) and "model.layers.0.self_attn.q_proj.weight" in got
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-9, msg=name)
    assert list(json.loads(tensors_metadata(tmp_path / "lora.safetensors")[MODEL_FILES])) == [
        "adapter_model.safetensors"]
    with pytest.raises(LedmergeError, match="needs its base model"):
        score_model(adapter, calib, tmp_path / "x.safetensors", **kw)


def edit_adapter(src, dst, *, config=None, rename=None, reshape=None):
    """A copy of adapter `src` with its config updated, a tensor renamed or one given another shape."""
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    tensors = load_file(src / "adapter_model.safetensors")
    for old, new in (rename or {}).items():
        tensors[new] = tensors.pop(old)
    for name, shape in (reshape or {}).items():
        tensors[name] = torch.zeros(shape)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = Q_A.replace("lora_A", "lora_B")


@pytest.mark.parametrize("edit, match", [
    ({"rename": {n: n.replace("layers.0", "layers.7") for n in (Q_A, Q_B)}},
     "adapts model.layers.7.self_attn.q_proj.weight, which the base does not have"),
    ({"rename": {n: n.replace("q_proj", "c_attn") for n in (Q_A, Q_B)}}, "adapts model.layers.0.self_attn.c_attn.weight"),
    ({"rename": {Q_A: Q_A.replace("q_proj", "c_attn")}}, "c_attn has lora_A without its pair"),
    ({"reshape": {Q_A: (4, 24)}}, r"do not make the base's shape \[16, 16\]"),
    ({"reshape": {Q_A: (2, 16)}}, "has rank 2 but its lora_B has rank 4: the adapter file is corrupt"),
    ({"config": {"r": 8}}, "have rank 4 but adapter_config.json says r = 8"),
    ({"config": {"rank_pattern": {"q_proj": 2}}}, "says rank_pattern 'q_proj': 2"),
    ({"config": {"use_dora": True}}, "use_dora is set"),
    ({"config": {"peft_type": "IA3"}}, "peft_type 'IA3' is not supported"),
    ({"config": {"base_model_name_or_path": "other-org/other-model"}}, "trained on 'other-org/other-model'"),
    ({"reshape": {"base_model.model.model.layers.0.mlp.up_proj.lora_embedding_A": (4, 16)}}, "LoRA on an embedding"),
])
def test_bad_adapters_one_line(lora_zoo, tmp_path, edit, match):
    import shutil

    base = tmp_path / "org--tiny-base"  # a base fetched from the hub as org/tiny-base
    shutil.copytree(lora_zoo["base"], base)
    bad = edit_adapter(lora_zoo["adapter"], tmp_path / "bad", **edit)
    with pytest.raises(LedmergeError, match=match) as info:
        check_compatible(base, {"lora": bad})
    assert "\n" not in str(info.value) and str(info.value).startswith("model 'lora': adapter ")
    with pytest.raises(LedmergeError, match=match):  # the merge refuses before writing anything
        merge_models(base, {"lora": bad}, {"method": "task_arithmetic"}, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_base_name_checks(lora_zoo, tmp_path):
    base, adapter = lora_zoo["base"], lora_zoo["adapter"]
    other = make_tiny_model(tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    wrong = edit_adapter(adapter, tmp_path / "wrong", config={"base_model_name_or_path": str(other)})
    with pytest.raises(LedmergeError, match="num_hidden_layers is 4, the base's 2"):
        check_compatible(base, {"lora": wrong})
    # names that cannot be told apart from the base pass: another copy of it, an unknown hub id
    copy = make_tiny_model(tmp_path / "copy")
    for named in (str(copy), "someone/tiny-llama", None):
        ok = edit_adapter(adapter, tmp_path / f"ok{abs(hash(named))}", config={"base_model_name_or_path": named})
        assert check_compatible(base, {"lora": ok}) == {}


def test_fan_in_fan_out_transposes(tmp_path):
    """GPT-2's Conv1D stores weights [in, out]: B·A is added transposed (checked on a hand-made adapter)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, generator=g)  # [in, out]
    save_file({"h.0.attn.c_attn.weight": w, "h.0.attn.c_attn.bias": torch.zeros(3)}, base / "model.safetensors")
    a, b = torch.randn(2, 6, generator=g), torch.randn(3, 2, generator=g)
    save_file({"base_model.model.h.0.attn.c_attn.lora_A.weight": a,
               "base_model.model.h.0.attn.c_attn.lora_B.weight": b}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "fan_in_fan_out": True, "target_modules": ["c_attn"]}))
    with AdapterReader(adapter, base) as reader:
        torch.testing.assert_close(reader.read("h.0.attn.c_attn.weight"), w + 2.0 * (b @ a).T)
        assert torch.equal(reader.read("h.0.attn.c_attn.bias"), torch.zeros(3))


def adapter_config(lora_zoo, tmp_path, math_model) -> dict:
    """The default config on the tiny models: full experts for safety and code, `math_model` for math."""
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    cfg["results"] = str(tmp_path / "results")
    cfg["base_model"] = str(lora_zoo["base"])
    for task in cfg["tasks"]:
        cfg["tasks"][task]["model"] = str(math_model if task == "math" else lora_zoo["full"])
    cfg["data_aware"]["enabled"] = False
    cfg["evaluation"] = {k: "zoo" for k in ("harmful", "benign", "math", "code")}
    return cfg


def test_config_check_accepts_a_matching_adapter_and_refuses_a_bad_one(lora_zoo, tmp_path):
    check(validate(adapter_config(lora_zoo, tmp_path, lora_zoo["adapter"])))
    bad = edit_adapter(lora_zoo["adapter"], tmp_path / "bad", reshape={Q_A: (4, 24)})
    with pytest.raises(LedmergeError, match=r"^config error at 'tasks.math.model': model 'math': adapter .*base's "
                                            r"shape \[16, 16\]") as info:
        check(validate(adapter_config(lora_zoo, tmp_path, bad)))
    assert "\n" not in str(info.value)


@pytest.mark.integration
def test_workflow_passes_the_base_to_adapter_jobs(lora_zoo, tmp_path):
    """Scoring and evaluating a LoRA expert get --base (and depend on the base's weights); full experts do not."""
    configfile = write_config(tmp_path / "lora.yaml", adapter_config(lora_zoo, tmp_path, lora_zoo["adapter"]))
    proc = snakemake(tmp_path, configfile, "-n", "-p", "--cores", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [line for line in proc.stdout.splitlines() if "$LEDMERGE" in line or "-m ledmerge" in line]
    flagged = {m.group(1) for line in commands if " --base " in line and (m := re.search(
        r"(importance --model \S+|evaluation --model \S+)", line))}
    adapter = str(lora_zoo["adapter"])
    assert flagged == {f"importance --model {adapter}", f"evaluation --model {adapter}"}, commands


def test_evaluation_loads_the_base_then_the_adapter(lora_zoo, tmp_path):
    from ledmerge.evaluation import evaluate_model
    from ledmerge.evaluation.runner import lm_eval_model_args

    base, adapter = lora_zoo["base"], lora_zoo["adapter"]
    hf = lm_eval_model_args(adapter, "hf", "cpu", None, dtype="auto", base=base)
    assert (hf["pretrained"], hf["peft"]) == (str(base.resolve()), str(adapter.resolve()))
    vllm = lm_eval_model_args(adapter, "vllm", "cuda", {"max_lora_rank": 64}, dtype="auto", base=base)
    assert (vllm["pretrained"], vllm["lora_local_path"], vllm["max_lora_rank"]) == (
        str(base.resolve()), str(adapter.resolve()), 64)
    with pytest.raises(LedmergeError, match="evaluating it needs its base model"):
        evaluate_model(adapter, tmp_path / "m.json", tmp_path / "g.jsonl", harmful_path=None, benign_path=None)
