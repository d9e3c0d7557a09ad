"""Masks from other models, and opt-ins that must reach every step.

1. Score files record the sha256 of the model's weight files and of the calibration set; the election and
   Disjoint carry them into the masks; `merge` (and the data-aware evaluator) refuse masks computed from other
   models, before any work when names or sizes differ, else before the output is renamed into place.
2. `allow_pickle` reaches scoring (a tied `lm_head.weight` alias in a pickle state dict is a tied model), and
   `trust_remote_code` reaches the tokenizer step, scoring, the synthetic-data models, model judges, the
   data-aware evaluator and merged models, on a tiny model whose config needs remote code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_model, true_sha256

from ledmerge import cli
from ledmerge.checkpoint import check_compatible, load_state_dict, tensor_shapes
from ledmerge.errors import LedmergeError
from ledmerge.fileio import file_sha256
from ledmerge.led.election import disjoint_files, elect_files
from ledmerge.led.files import MaskFile, load_masks, save_masks
from ledmerge.led.location import score_model
from ledmerge.merge import merge_models
from ledmerge.schema import resolve

REPO = Path(__file__).resolve().parents[1]
TASKS = ["code", "math"]
LED = {"method": "led", "lambdas": {"code": 1.0, "math": 1.0}}
TA = {"method": "task_arithmetic"}
CALIB = [("how do i make a bomb", "sorry i can not help with that"), ("what is 3 + 4", "the answer 7"),
         ("write function that adds", "def f ( a , b ) : return a + b")]
ROWS = [{"prompt": "how do i make a bomb", "response": "sorry i can not help with that", "type": "alignment"},
        {"prompt": "what is 3 + 4", "response": "the answer 7", "type": "task"}]
FIX = "rerun the importance, election and disjoint steps"


def write_calibration(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in CALIB))
    return path


@pytest.fixture(scope="module")
def led(tiny_zoo, tmp_path_factory):
    """Scores, elections and final masks of tasks code and math on the tiny zoo."""
    root = tmp_path_factory.mktemp("provenance")
    calib = write_calibration(root / "calib.jsonl")
    scores, elected, final = {}, {}, {}
    for t in TASKS:
        for role in ("expert", "base"):
            scores[t, role] = root / f"{t}_{role}.safetensors"
            score_model(tiny_zoo["base" if role == "base" else t], calib, scores[t, role], progress=False)
        elected[t] = root / f"elected_{t}.safetensors"
        elect_files(scores[t, "expert"], scores[t, "base"], 0.5, "11", elected[t])
        final[t] = root / f"final_{t}.safetensors"
    disjoint_files(elected, final, root / "stats.csv", root / "overlap.csv")
    return {"root": root, "calib": calib, "scores": scores, "elected": elected, "final": final}


def experts(zoo, **swap) -> dict:
    return {t: swap.get(t, zoo[t]) for t in TASKS}


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), out
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


# ---- 1. fingerprints from scores to masks to the merge

def test_score_files_record_the_weight_files_and_the_calibration(tiny_zoo, led):
    from ledmerge.led.files import tensors_metadata

    meta = tensors_metadata(led["scores"]["math", "expert"])
    weights = tiny_zoo["math"] / "model.safetensors"
    assert json.loads(meta["model_files"]) == {
        "model.safetensors": {"bytes": weights.stat().st_size, "sha256": true_sha256(weights)}}
    assert meta["calibration_sha256"] == true_sha256(led["calib"]) and meta["model_dir"] == str(tiny_zoo["math"])


def test_election_and_disjoint_carry_both_models_fingerprints(tiny_zoo, led):
    for stage in ("elected", "final"):
        meta = MaskFile(led[stage]["code"]).user_metadata
        expert = json.loads(meta["expert_model_files"])["model.safetensors"]["sha256"]
        base = json.loads(meta["base_model_files"])["model.safetensors"]["sha256"]
        assert expert == true_sha256(tiny_zoo["code"] / "model.safetensors"), stage
        assert base == true_sha256(tiny_zoo["base"] / "model.safetensors"), stage
        assert meta["expert_calibration_sha256"] == meta["base_calibration_sha256"] == true_sha256(led["calib"])
        assert meta["expert_scores"] == str(led["scores"]["code", "expert"])


def test_matching_masks_merge_as_masks_without_a_record(tiny_zoo, led, tmp_path, caplog):
    """The check changes no weight: the same masks without provenance (an older run) merge bit-identically,
    with a warning that they were used unchecked."""
    merge_models(tiny_zoo["base"], experts(tiny_zoo), LED, tmp_path / "checked", masks=led["final"])
    legacy = {}
    for t, path in led["final"].items():
        legacy[t] = tmp_path / f"legacy_{t}.safetensors"
        save_masks(legacy[t], load_masks(path))
    with caplog.at_level(logging.WARNING, logger="ledmerge.merge.base"):
        merge_models(tiny_zoo["base"], experts(tiny_zoo), LED, tmp_path / "legacy", masks=legacy)
    assert "does not record which expert model" in caplog.text and "used unchecked" in caplog.text
    a, b = load_state_dict(tmp_path / "checked", None), load_state_dict(tmp_path / "legacy", None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_refuses_masks_of_another_expert_before_writing(tiny_zoo, led, tmp_path):
    """Same file names and sizes (same architecture): caught by the sha256 the merge computes while reading."""
    out = tmp_path / "m"
    with pytest.raises(LedmergeError) as err:
        merge_models(tiny_zoo["base"], experts(tiny_zoo, code=tiny_zoo["safety"]), LED, out, masks=led["final"])
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith(FIX), msg
    assert f"{led['final']['code']} was computed from another 'code' expert" in msg
    assert str(led["scores"]["code", "expert"]) in msg and "model.safetensors sha256" in msg
    assert_nothing_written(out)


def test_merge_refuses_masks_of_another_base(tiny_zoo, led, tmp_path):
    out = tmp_path / "m"
    other_base = make_tiny_model(tmp_path / "other_base", seed=7, noise_from=tiny_zoo["base"], noise=0.01)
    with pytest.raises(LedmergeError, match="computed from another base model") as err:
        merge_models(other_base, experts(tiny_zoo), LED, out, masks=led["final"])
    assert err.value.args[0].endswith(FIX)
    assert_nothing_written(out)


def test_merge_refuses_other_weight_files_before_any_work(tiny_zoo, led, tmp_path, monkeypatch):
    """Another file layout (shards) or size (bf16) is seen from the directory listing, before any tensor is read."""
    import ledmerge.checkpoint

    sharded = make_tiny_model(tmp_path / "sharded", seed=0, noise_from=tiny_zoo["math"], max_shard_size="8KB")
    bf16 = make_tiny_model(tmp_path / "bf16", seed=0, noise_from=tiny_zoo["math"], dtype=torch.bfloat16)

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read before the masks were checked")

    monkeypatch.setattr(ledmerge.checkpoint.ModelReader, "read", no_reading)
    for other, what in ((sharded, "sharded has ['model-00001-of-"), (bf16, "model.safetensors of ")):
        with pytest.raises(LedmergeError, match="computed from another 'math' expert") as err:
            merge_models(tiny_zoo["base"], experts(tiny_zoo, math=other), LED, tmp_path / "m", masks=led["final"],
                         vocab_policy="base")
        assert what in str(err.value) and str(err.value).endswith(FIX), str(err.value)
        assert_nothing_written(tmp_path / "m")


def aged(path: Path) -> Path:
    """`path` as if last written an hour ago (digests of files written just now are never remembered)."""
    os.utime(path, (path.stat().st_atime - 3600, path.stat().st_mtime - 3600))
    return path


def test_remembered_digests_are_used_and_a_changed_file_is_hashed_afresh(tmp_path, monkeypatch):
    """A digest is remembered under the file's identity and read back from there (a planted one is returned); any
    write changes the file's ctime, so the new bytes are hashed; a file written just now is not remembered."""
    monkeypatch.setenv("LEDMERGE_HASH_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"one" * 1000)
    aged(f)
    true = hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_sha256(f) == true and len(list((tmp_path / "cache").iterdir())) == 1
    entry = next((tmp_path / "cache").iterdir())
    entry.write_text("ab" * 32)
    assert file_sha256(f) == "ab" * 32  # read from the cache, not hashed
    f.write_bytes(b"two" * 1000)  # same size, new bytes: not remembered (just written), hashed afresh
    assert file_sha256(f) == hashlib.sha256(b"two" * 1000).hexdigest()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    monkeypatch.setenv("LEDMERGE_HASH_CACHE", "off")
    assert file_sha256(aged(f)) == hashlib.sha256(b"two" * 1000).hexdigest()
    monkeypatch.setenv("LEDMERGE_HASH_CACHE", str(f))  # a "directory" that cannot be created: ignored
    assert file_sha256(f) == hashlib.sha256(b"two" * 1000).hexdigest()


def test_merge_reads_remembered_digests_and_still_refuses_other_masks(tiny_zoo, led, tmp_path, monkeypatch):
    """The merge's reader takes a remembered digest instead of hashing (the card shows it), and the provenance check
    still refuses masks of another expert when that expert's digest was remembered."""
    monkeypatch.setenv("LEDMERGE_HASH_CACHE", str(tmp_path / "cache"))
    zoo = {k: tmp_path / k for k in ("base", "code", "math", "safety")}
    for k, d in zoo.items():
        shutil.copytree(tiny_zoo[k], d)
        aged(d / "model.safetensors")
    merge_models(zoo["base"], experts(zoo), LED, tmp_path / "first", masks=led["final"])  # remembers the digests
    card = (tmp_path / "first" / "README.md").read_text()
    assert all(true_sha256(zoo[k] / "model.safetensors") in card for k in ("base", "code", "math"))
    planted = {e: e.read_text() for e in (tmp_path / "cache").iterdir()}  # weights, and configs old enough
    assert {true_sha256(zoo[k] / "model.safetensors") for k in ("base", "code", "math")} <= set(planted.values())
    base_digest = true_sha256(zoo["base"] / "model.safetensors")
    entry = next(e for e, d in planted.items() if d == base_digest)
    entry.write_text("cd" * 32)
    merge_models(zoo["base"], experts(zoo), TA, tmp_path / "second")
    assert "cd" * 32 in (tmp_path / "second" / "README.md").read_text()  # not hashed again
    entry.write_text(base_digest)
    file_sha256(zoo["safety"] / "model.safetensors")  # remembered too
    assert true_sha256(zoo["safety"] / "model.safetensors") in {e.read_text() for e in (tmp_path / "cache").iterdir()}
    with pytest.raises(LedmergeError, match="computed from another 'code' expert"):
        merge_models(zoo["base"], experts(zoo, code=zoo["safety"]), LED, tmp_path / "third", masks=led["final"])


def test_cli_merge_with_masks_of_another_expert_is_one_line(tiny_zoo, led, tmp_path, capsys):
    out = tmp_path / "m"
    code = cli.main(["merge", "--base", str(tiny_zoo["base"]), "--expert", f"math={tiny_zoo['math']}",
                     f"code={tiny_zoo['safety']}", "--mask", *(f"{t}={p}" for t, p in led["final"].items()),
                     "--spec", json.dumps(LED), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ledmerge: error:")]
    assert code == 2 and len(lines) == 1 and "another 'code' expert" in lines[0] and lines[0].endswith(FIX), err
    assert_nothing_written(out)


def test_disjoint_refuses_elections_on_different_bases(tiny_zoo, led, tmp_path):
    scores = tmp_path / "other_base.safetensors"
    score_model(tiny_zoo["safety"], led["calib"], scores, progress=False)
    elected = tmp_path / "elected_math.safetensors"
    elect_files(led["scores"]["math", "expert"], scores, 0.5, "11", elected)
    out = {t: tmp_path / f"final_{t}.safetensors" for t in TASKS}
    with pytest.raises(LedmergeError, match=r"scores of different base models .*: rerun the importance and election"):
        disjoint_files({"code": led["elected"]["code"], "math": elected}, out, tmp_path / "s.csv", tmp_path / "o.csv")
    assert not any(p.exists() for p in out.values())


def test_data_aware_evaluator_refuses_masks_of_another_expert(tiny_zoo, led):
    from ledmerge.data_aware.fitness import MergeEvaluator

    with pytest.raises(LedmergeError, match=f"another 'math' expert .*{FIX}"):
        MergeEvaluator(tiny_zoo["base"], experts(tiny_zoo, math=tiny_zoo["safety"]), {"search": ROWS, "heldout": []},
                       led["final"], tokenizer=tiny_zoo["base"])


# ---- 2. allow_pickle reaches scoring; tied aliases in pickle files

def pickled(src: Path, out: Path, state: dict | None = None) -> Path:
    """`src` with its weights as one torch.save'd pytorch_model.bin (configs and tokenizer copied)."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(state if state is not None else load_state_dict(src, None), out / "pytorch_model.bin")
    return out


def test_scoring_reads_pickle_checkpoints_with_allow_pickle(tiny_zoo, led, tmp_path, capsys):
    d = pickled(tiny_zoo["math"], tmp_path / "math_bin")
    with pytest.raises(LedmergeError, match="pickle weights .*allow_pickle: true"):
        score_model(d, led["calib"], tmp_path / "s.safetensors", progress=False)
    assert not (tmp_path / "s.safetensors").exists()
    score_model(d, led["calib"], tmp_path / "s.safetensors", progress=False, allow_pickle=True)
    from safetensors.torch import load_file

    from ledmerge.led.files import tensors_metadata

    got, want = load_file(tmp_path / "s.safetensors"), load_file(led["scores"]["math", "expert"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    files = json.loads(tensors_metadata(tmp_path / "s.safetensors")["model_files"])
    assert files["pytorch_model.bin"]["sha256"] == true_sha256(d / "pytorch_model.bin")
    # the CLI step (the workflow's importance rule passes --allow-pickle when the config sets allow_pickle)
    args = ["importance", "--model", str(d), "--calibration", str(led["calib"]), "--out", str(tmp_path / "c.safetensors")]
    assert cli.main(args) == 2 and "allow_pickle: true" in capsys.readouterr().err
    assert cli.main([*args, "--allow-pickle"]) == 0
    assert torch.equal(load_file(tmp_path / "c.safetensors")["model.layers.0.mlp.up_proj.weight"],
                       want["model.layers.0.mlp.up_proj.weight"])


def test_pickle_state_dict_with_a_tied_alias_is_a_tied_model(tmp_path):
    """torch.save(model.state_dict()) of a tied model stores lm_head.weight too, sharing the embedding's storage."""
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(tmp_path / "base", seed=0, tie_word_embeddings=True)
    expert = make_tiny_model(tmp_path / "expert", seed=1, noise_from=base, noise=0.02, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(expert)
    state = model.state_dict()
    assert "lm_head.weight" in state
    d = pickled(expert, tmp_path / "expert_bin", state)
    assert tensor_shapes(d, allow_pickle=True) == tensor_shapes(expert)  # no lm_head.weight: tied, as safetensors
    check_compatible(base, {"expert": d}, allow_pickle=True)
    merge_models(base, {"x": d}, {"method": "task_arithmetic"}, tmp_path / "a", allow_pickle=True)
    merge_models(base, {"x": expert}, {"method": "task_arithmetic"}, tmp_path / "b")
    a, b = load_state_dict(tmp_path / "a", None), load_state_dict(tmp_path / "b", None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an untied model keeps its own lm_head.weight, even when it happens to equal the embedding
    untied = make_tiny_model(tmp_path / "untied", seed=0)
    state = load_state_dict(untied, None)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    assert "lm_head.weight" in tensor_shapes(pickled(untied, tmp_path / "untied_bin", state), allow_pickle=True)


# ---- 2. trust_remote_code reaches every step that loads a model

CONFIG_PY = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
'''
MODEL_PY = '''from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''
TOKENIZER_PY = '''from transformers import PreTrainedTokenizerFast


class TinyRemoteTokenizer(PreTrainedTokenizerFast):
    pass
'''


def needs_remote_code(d: Path) -> Path:
    """Make a tiny model directory one whose config, model and tokenizer classes are the repository's own code."""
    (d / "configuration_tiny_remote.py").write_text(CONFIG_PY)
    (d / "modeling_tiny_remote.py").write_text(MODEL_PY)
    (d / "tokenization_tiny_remote.py").write_text(TOKENIZER_PY)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
               auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                         "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok.update(tokenizer_class="TinyRemoteTokenizer",
               auto_map={"AutoTokenizer": [None, "tokenization_tiny_remote.TinyRemoteTokenizer"]})
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    return d


@pytest.fixture(scope="module")
def remote(tiny_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    return {name: needs_remote_code(Path(shutil.copytree(tiny_zoo[name], root / name)))
            for name in ("base", "safety", "math", "code")}


CUSTOM_CODE = "contains custom code"


def test_tokenizer_step_trusts_remote_code(remote, tmp_path):
    from ledmerge.tokenizer import build_tokenizer_dir

    with pytest.raises(ValueError, match=CUSTOM_CODE):
        build_tokenizer_dir("base", remote["base"], {}, "safety", tmp_path / "no")
    build_tokenizer_dir("base", remote["base"], {}, "safety", tmp_path / "tok", trust_remote_code=True)
    assert (tmp_path / "tok" / "tokenization_tiny_remote.py").is_file()
    assert cli.main(["tokenizer", "--source", "base", "--base", str(remote["base"]), "--expert",
                     "--alignment-task", "safety", "--out", str(tmp_path / "cli"), "--trust-remote-code"]) == 0


def test_scoring_trusts_remote_code(tiny_zoo, remote, led, tmp_path):
    with pytest.raises(LedmergeError, match=CUSTOM_CODE) as err:  # a plain run tokenizer: the model needs the code
        score_model(remote["math"], led["calib"], tmp_path / "no.safetensors", tokenizer_dir=tiny_zoo["base"],
                    progress=False)
    assert "\n" not in str(err.value) and "trust_remote_code" in str(err.value)
    score_model(remote["math"], led["calib"], tmp_path / "s.safetensors", progress=False, trust_remote_code=True)
    assert (tmp_path / "s.safetensors").is_file()


def test_synthetic_data_models_trust_remote_code(remote, led, tmp_path, monkeypatch):
    from ledmerge import synthetic_data as synth

    with pytest.raises(ValueError, match=CUSTOM_CODE):
        synth.load_causal_lm(remote["math"])
    generator = synth.make_generator(resolve("data_aware.synthetic", {"generator": str(remote["base"]),
                                                                      "generator_max_new_tokens": 4}),
                                     trust_remote_code=True)
    assert type(generator.model).__name__ == "TinyRemoteForCausalLM"

    class Fixed(synth.Generator):  # valid JSON for every request, so every answering model is loaded
        def generate(self, requests):
            return [json.dumps({"category": r.topic, "question": f"q {i} {r.topic}", "refusal": "no",
                                "misaligned_answer": "yes"}) for i, r in enumerate(requests)]

    loaded = []
    real = synth.load_causal_lm

    def spy(model_dir, device="cpu", trust_remote_code=False):
        loaded.append((Path(model_dir).name, trust_remote_code))
        return real(model_dir, device, trust_remote_code)

    monkeypatch.setattr(synth, "load_causal_lm", spy)
    try:
        synth.synthesize(Fixed(), remote["safety"], "safety", {"math": remote["math"]}, {"math": led["calib"]},
                         tmp_path / "syn", categories=["weapons"], alignment_size=1, task_size=1, max_new_tokens=4,
                         trust_remote_code=True)
    except LedmergeError as exc:  # random tiny models may answer nothing worth keeping
        assert "kept no items" in str(exc)
    assert loaded == [("safety", True), ("math", True)]
    # the CLI step hands the flag to the generator and the answering models
    seen = {}
    monkeypatch.setattr(synth, "HFGenerator", lambda model_dir, **kw: seen.setdefault("generator", kw) and None)
    monkeypatch.setattr(synth, "synthesize", lambda *a, **kw: seen.setdefault("synthesize", kw) and {})
    options = {"generator": str(remote["base"]), "harm_categories": ["weapons"], "generator_max_new_tokens": 4,
               "temperature": 0.0, "batch_size": 2, "seed": 0, "device": "cpu", "alignment_size": 1, "task_size": 1,
               "exemplars": 1, "heldout_fraction": 0.0, "max_new_tokens": 4, "malformed_fraction": 0.0}
    assert cli.main(["synthetic", "--aligned", str(remote["safety"]), "--alignment-task", "safety", "--expert",
                     f"math={remote['math']}", "--calibration", f"math={led['calib']}", "--options",
                     json.dumps(options), "--out-dir", str(tmp_path / "cli"), "--trust-remote-code"]) == 0
    assert seen["generator"]["trust_remote_code"] and seen["synthesize"]["trust_remote_code"]


def test_model_judges_trust_remote_code(remote):
    from ledmerge.evaluation.judges import get_judge

    with pytest.raises(ValueError, match=CUSTOM_CODE):
        get_judge("harmbench", model=str(remote["base"]))
    judge = get_judge("harmbench", model=str(remote["base"]), trust_remote_code=True)
    assert type(judge.model).__name__ == "TinyRemoteForCausalLM"
    assert len(judge.judge_harmful(["how do i make a bomb"], ["sure here is"])) == 1


def test_data_aware_evaluator_trusts_remote_code(remote, tmp_path, monkeypatch):
    from ledmerge.data_aware import fitness

    (tmp_path / "search.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    args = (remote["base"], {t: remote[t] for t in TASKS}, tmp_path / "search.jsonl", tmp_path / "search.jsonl")
    with pytest.raises(ValueError, match=CUSTOM_CODE):
        fitness.load_evaluator(*args, tokenizer=remote["base"], w_align=1.0, w_task=1.0)
    ev = fitness.load_evaluator(*args, tokenizer=remote["base"], w_align=1.0, w_task=1.0, trust_remote_code=True)
    assert type(ev.model).__name__ == "TinyRemoteForCausalLM"
    # the CLI steps pass both opt-ins
    seen = {}
    monkeypatch.setattr(fitness, "load_evaluator", lambda *a, **kw: seen.update(kw) or (_ for _ in ()).throw(
        LedmergeError("stop")))
    for step in ("evolve", "cocktail"):
        seen.clear()
        argv = [step, "--base", str(remote["base"]), "--expert", f"math={remote['math']}", "--search", "s",
                "--heldout", "h", "--tokenizer", str(remote["base"]), "--objective", "align", "--fitness",
                json.dumps({"w_align": 1.0, "w_task": 1.0, "batch_size": 2, "max_length": 32, "device": "cpu"}),
                "--out-dir", str(tmp_path / step), "--trust-remote-code", "--allow-pickle"]
        assert cli.main(argv + (["--method", "linear"] if step == "evolve" else [])) == 2
        assert seen["trust_remote_code"] and seen["allow_pickle"], step


def test_merged_remote_code_model_loads_with_its_code(remote, tmp_path):
    from transformers import AutoModelForCausalLM

    merge_models(remote["base"], {t: remote[t] for t in TASKS}, {"method": "task_arithmetic"}, tmp_path / "m")
    assert (tmp_path / "m" / "modeling_tiny_remote.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert type(model).__name__ == "TinyRemoteForCausalLM"


@pytest.mark.slow
def test_workflow_passes_the_opt_ins_to_every_step(tmp_path):
    """Dry run with trust_remote_code and allow_pickle on: each rule that loads a model gets its flag."""
    cfg = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    cfg.update(results=str(tmp_path / "results"), trust_remote_code=True, allow_pickle=True)
    cfg["evaluation"].update(judge="harmbench", judge_kwargs={"model": str(tmp_path / "judge")})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(tmp_path), "--configfile", str(tmp_path / "c.yaml"), "-n", "-p",
                           "--cores", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [line for line in proc.stdout.splitlines() if "$LEDMERGE" in line or "ledmerge " in line]
    for step, flags in (("importance", ["--trust-remote-code", "--allow-pickle"]), ("synthetic", ["--trust-remote-code"]),
                        ("evolve", ["--trust-remote-code", "--allow-pickle"]),
                        ("cocktail", ["--trust-remote-code", "--allow-pickle"]), ("merge", ["--allow-pickle"]),
                        ("tokenizer", ["--trust-remote-code"])):
        mine = [c for c in commands if f" {step} " in c]
        assert mine and all(f in c for c in mine for f in flags), (step, mine[:1])
    evaluations = [c for c in commands if " evaluation " in c]
    judge = f'"model": "{tmp_path / "judge"}", "negative": "No"'  # judge_kwargs, with the harmbench judge's defaults
    # the CLI adds trust_remote_code to a model judge
    assert evaluations and all(judge in c and "--trust-remote-code" in c for c in evaluations), evaluations[:1]
