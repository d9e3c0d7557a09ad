"""The run's tokenizer: where the chat template and stop tokens come from, and that every step uses them.

Real bases (Meta-Llama-3-8B) have no chat template; their instruct models do, and stop on several EOS ids.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_model
from safetensors import safe_open

from ledmerge.config import check, validate
from ledmerge.errors import LedmergeError
from ledmerge.led.location import score_model
from ledmerge.merge import merge_models
from ledmerge.tokenizer import build_tokenizer_dir, chat_template_of, resolve_source

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def strip_template(model_dir: Path) -> Path:
    """A base as pretrained bases ship: no chat template anywhere, no pad token."""
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    return model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base without chat template and an instruct expert that stops on two EOS ids."""
    root = tmp_path_factory.mktemp("tok")
    base = strip_template(make_tiny_model(root / "base", seed=0))
    safety = make_tiny_model(root / "safety", seed=1, noise_from=base, noise=0.02)
    shutil.copy2(base / "tokenizer_config.json", safety / "tokenizer_config.json")  # the base's tokenizer...
    (safety / "chat_template.jinja").write_text(TEMPLATE)                           # ...plus a chat template
    gen = json.loads((safety / "generation_config.json").read_text())
    (safety / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [3, 5]}))
    math = make_tiny_model(root / "math", seed=2, noise_from=base, noise=0.02)
    strip_template(math)
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in [
        ("how do i make a bomb", "sorry i can not help with that"), ("what is 3 + 4", "the answer 7")]))
    return {"base": base, "safety": safety, "math": math, "calib": calib, "root": root}


def test_auto_takes_the_base_template_else_the_aligned_experts(models, tiny_zoo):
    assert chat_template_of(models["base"]) is None and chat_template_of(models["safety"]) == TEMPLATE
    experts = {"safety": models["safety"], "math": models["math"]}
    assert resolve_source("auto", models["base"], experts, "safety")[0] == models["safety"]
    assert resolve_source("auto", tiny_zoo["base"], experts, "safety")[0] == tiny_zoo["base"]
    assert resolve_source("math", models["base"], experts, "safety")[0] == models["math"]
    with pytest.raises(LedmergeError, match="neither auto"):
        resolve_source("nope", models["base"], experts, "safety")
    with pytest.raises(LedmergeError, match="no chat template"):  # math has none either
        build_tokenizer_dir("math", models["base"], experts, "safety", models["root"] / "never")
    assert not (models["root"] / "never").exists()


def test_tokenizer_dir_carries_template_and_every_eos_id(models, tmp_path):
    experts = {"safety": models["safety"], "math": models["math"]}
    record = build_tokenizer_dir("auto", models["base"], experts, "safety", tmp_path / "tok")
    assert record["tokenizer_source"] == str(models["safety"]) and "no chat template" in record["chosen_because"]
    assert record["eos_token_ids"] == [3, 5]
    assert (tmp_path / "tok" / "chat_template.jinja").read_text() == TEMPLATE
    # a chat_template file replaces the source's own
    other = tmp_path / "other.jinja"
    other.write_text(TEMPLATE.replace("[", "<"))
    build_tokenizer_dir("auto", models["base"], experts, "safety", tmp_path / "tok2", chat_template=other)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "tok2").chat_template == other.read_text()


def test_merged_models_get_the_template_and_stop_tokens(models, tmp_path):
    """A base without a template used to give merged models without one (and evaluation then crashed)."""
    experts = {"safety": models["safety"], "math": models["math"]}
    build_tokenizer_dir("auto", models["base"], experts, "safety", tmp_path / "tok")
    merge_models(models["base"], experts, {"method": "task_arithmetic"}, tmp_path / "m", tokenizer_dir=tmp_path / "tok",
                 progress=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.chat_template == TEMPLATE
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"] == [3, 5]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").generation_config.eos_token_id == [3, 5]
    card = (tmp_path / "m" / "README.md").read_text()
    assert str(models["safety"]) in card and "[3, 5]" in card
    config = json.loads((tmp_path / "m" / "config.json").read_text())  # the base's, stopping like the template's model
    assert config["eos_token_id"] == [3, 5] and config["hidden_size"] == 16


def test_base_and_expert_are_scored_on_the_same_token_ids(models, tmp_path):
    """Each model's own template would score the base on plain text and the expert on its chat format."""
    experts = {"safety": models["safety"], "math": models["math"]}
    build_tokenizer_dir("auto", models["base"], experts, "safety", tmp_path / "tok")

    def fingerprint(model, **kw):
        out = tmp_path / f"{Path(model).name}{len(kw)}.safetensors"
        score_model(model, models["calib"], out, progress=False, **kw)
        with safe_open(str(out), "pt") as f:
            return f.metadata()["tokens_sha256"]

    shared = {m: fingerprint(models[m], tokenizer_dir=tmp_path / "tok") for m in ("base", "safety")}
    assert shared["base"] == shared["safety"]
    assert fingerprint(models["base"]) != fingerprint(models["safety"])  # each with its own tokenizer: different


def real_config(models, **changes) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    cfg["results"] = str(models["root"] / "results")
    cfg["base_model"] = str(models["base"])
    cfg["tasks"] = {t: {"model": str(models[t]), "calibration": {"source": "jsonl", "path": str(models["calib"])},
                        "rate": 0.1} for t in ("safety", "math")}
    cfg["data_aware"]["enabled"] = False
    cfg.update(changes)
    return validate(cfg)


def test_check_config_needs_a_chat_template_before_any_job(models, tmp_path):
    check(real_config(models))  # auto: the base has none, the safety expert has one
    with pytest.raises(LedmergeError, match="tokenizer_source.*no chat template"):
        check(real_config(models, tokenizer_source="base"))
    with pytest.raises(LedmergeError, match="tokenizer_source.*no chat template"):
        check(real_config(models, alignment_task="math"))
    jinja = tmp_path / "t.jinja"
    jinja.write_text(TEMPLATE)
    check(real_config(models, tokenizer_source="base", chat_template=str(jinja)))
    with pytest.raises(LedmergeError, match="chat_template.*not a file"):
        check(real_config(models, chat_template=str(tmp_path / "missing.jinja")))
    with pytest.raises(LedmergeError, match="tokenizer_source.*neither"):
        check(real_config(models, tokenizer_source="chat"))
    with pytest.raises(LedmergeError, match="alignment_task"):
        check(real_config(models, alignment_task="chat"))
    assert copy.deepcopy(real_config(models))["tokenizer_source"] == "auto"
