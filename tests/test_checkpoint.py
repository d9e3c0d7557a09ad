"""Streaming checkpoint I/O and the streaming merge: sharded input and output, dtypes, tied embeddings,
vocabulary mismatches, pickle refusal, corrupt files and the model card's hashes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_tiny_model, true_sha256
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ledmerge.checkpoint import (
    INDEX,
    SINGLE,
    ModelReader,
    ShardedWriter,
    check_compatible,
    load_state_dict,
    parse_size,
    tensor_shapes,
    weight_files,
)
from ledmerge.errors import LedmergeError
from ledmerge.merge import merge_device, merge_models

TA = {"method": "task_arithmetic", "scale": 1.0}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and two experts, single-file float32, plus the same three saved as bf16 shards."""
    root = tmp_path_factory.mktemp("ckpt_zoo")
    out = {"base": make_tiny_model(root / "base", seed=0)}
    for i, task in enumerate(["math", "code"], start=1):
        out[task] = make_tiny_model(root / task, seed=i, noise_from=out["base"], noise=0.02)
    for name in ["base", "math", "code"]:
        src = out[name]
        out[f"{name}_sharded"] = make_tiny_model(root / f"{name}_sharded", seed=0, noise_from=src, noise=0.0,
                                                 max_shard_size="8KB")
        out[f"{name}_bf16"] = make_tiny_model(root / f"{name}_bf16", seed=0, noise_from=src, noise=0.0,
                                              dtype=torch.bfloat16, max_shard_size="10KB")
    return out


def experts(zoo, suffix=""):
    return {t: zoo[f"{t}{suffix}"] for t in ("math", "code")}


def test_reader_reads_single_and_sharded_files_exactly(zoo):
    assert not (zoo["base"] / INDEX).exists() and (zoo["base_sharded"] / INDEX).exists()
    assert len(weight_files(zoo["base_sharded"])) > 2
    reference = load_file(zoo["base"] / SINGLE)
    for d in (zoo["base"], zoo["base_sharded"]):
        with ModelReader(d) as r:
            assert set(r.names) == set(reference)
            for name in r.names:
                assert torch.equal(r.read(name), reference[name])
    with ModelReader(zoo["base_bf16"]) as r:
        name = r.names[0]
        assert r.read(name).dtype == torch.bfloat16 and r.read(name, torch.float32).dtype == torch.float32


def test_sharded_inputs_merge_like_single_files(zoo, tmp_path):
    merge_models(zoo["base"], experts(zoo), TA, tmp_path / "single")
    merge_models(zoo["base_sharded"], experts(zoo, "_sharded"), TA, tmp_path / "sharded")
    a, b = load_state_dict(tmp_path / "single"), load_state_dict(tmp_path / "sharded")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_output_has_an_index_and_loads_in_transformers(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    merge_models(zoo["base"], experts(zoo), TA, tmp_path / "one")
    merge_models(zoo["base"], experts(zoo), TA, tmp_path / "many", shard_size="6KB")
    index = json.loads((tmp_path / "many" / INDEX).read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 2 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) for f in shards)
    assert not (tmp_path / "many" / SINGLE).exists()
    for f in shards:  # the safetensors library accepts every header we wrote
        with safe_open(str(tmp_path / "many" / f), framework="pt") as fh:
            assert {k for k, v in index["weight_map"].items() if v == f} == set(fh.keys())
    one = load_state_dict(tmp_path / "one")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "many")
    state = model.state_dict()
    assert all(torch.equal(state[k], one[k]) for k in one)
    for f in ("config.json", "tokenizer.json", "README.md"):
        assert (tmp_path / "many" / f).is_file()


def test_bf16_inputs_compute_in_float32_and_write_bf16(zoo, tmp_path):
    merge_models(zoo["base_bf16"], experts(zoo, "_bf16"), TA, tmp_path / "m")
    base = load_state_dict(zoo["base_bf16"])
    exp = {t: load_state_dict(d) for t, d in experts(zoo, "_bf16").items()}
    got = load_state_dict(tmp_path / "m", dtype=None)
    for name, b in base.items():
        want = (b + (exp["math"][name] - b) + (exp["code"][name] - b)).to(torch.bfloat16)
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want), name


def test_writer_keeps_mixed_dtypes_aligned(tmp_path):
    tensors = {"a.bf16": torch.randn(3, 3).bfloat16(), "b.f32": torch.randn(5), "c.bool": torch.rand(7) > 0.5,
               "d.f64": torch.randn(2, dtype=torch.float64), "e.scalar": torch.tensor(1.5), "f.empty": torch.zeros(0, 4)}
    w = ShardedWriter(tmp_path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], max_shard_size=40)
    for name in w.order:
        w.write(name, tensors[name])
    w.close()
    assert (tmp_path / INDEX).exists()
    with ModelReader(tmp_path) as r:
        for name, t in tensors.items():
            assert torch.equal(r.read(name), t)
            assert r.infos[name].begin % t.dtype.itemsize == 0  # aligned for zero-copy loaders
    got = {}
    for f in weight_files(tmp_path):
        got.update(load_file(f))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_writer_refuses_wrong_order_and_incomplete_models(tmp_path):
    w = ShardedWriter(tmp_path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))], max_shard_size="5GB")
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("b", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="planned"):
        w.write("b", torch.zeros(3))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_tied_embeddings_merge_and_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(tmp_path / "base", seed=0, tie_word_embeddings=True)
    exps = {t: make_tiny_model(tmp_path / t, seed=i, noise_from=base, noise=0.02, tie_word_embeddings=True)
            for i, t in enumerate(["math", "code"], start=1)}
    assert "lm_head.weight" not in tensor_shapes(base)
    merge_models(base, exps, TA, tmp_path / "m")
    assert "lm_head.weight" not in tensor_shapes(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    b = load_state_dict(base)["model.embed_tokens.weight"]
    want = b + sum(load_state_dict(d)["model.embed_tokens.weight"] - b for d in exps.values())
    assert torch.equal(emb.detach(), want)


def test_tied_and_untied_models_do_not_mix(zoo, tmp_path):
    tied = make_tiny_model(tmp_path / "tied", seed=0, tie_word_embeddings=True)
    with pytest.raises(LedmergeError, match="tie_word_embeddings must agree"):
        check_compatible(zoo["base"], {"tied": tied})


def test_vocabulary_mismatch_is_an_error_naming_tensors_and_shapes(zoo, tmp_path):
    bigger = make_tiny_model(tmp_path / "bigger", seed=3, noise_from=zoo["math"], noise=0.0, extra_tokens=3)
    vocab = tensor_shapes(zoo["base"])["model.embed_tokens.weight"][0]
    with pytest.raises(LedmergeError) as err:
        merge_models(zoo["base"], {"math": bigger, "code": zoo["code"]}, TA, tmp_path / "out")
    msg = str(err.value)
    assert "different vocabulary" in msg and "vocab_policy: base" in msg and "\n" not in msg
    assert "lm_head.weight" in msg and f"[{vocab + 3}, 16] vs base [{vocab}, 16]" in msg
    assert not (tmp_path / "out").exists()


def test_vocab_policy_base_keeps_the_base_vocabulary(zoo, tmp_path):
    bigger = make_tiny_model(tmp_path / "bigger", seed=3, noise_from=zoo["math"], noise=0.0, extra_tokens=3)
    merge_models(zoo["base"], {"math": bigger, "code": zoo["code"]}, TA, tmp_path / "p", vocab_policy="base")
    merge_models(zoo["base"], experts(zoo), TA, tmp_path / "same")
    got, same = load_state_dict(tmp_path / "p"), load_state_dict(tmp_path / "same")
    assert all(torch.equal(got[k], same[k]) for k in same)  # the extra rows are dropped, nothing else moves
    assert "vocab_policy: base" in (tmp_path / "p" / "README.md").read_text()
    # and an expert with *fewer* rows (a base with a padded embedding): missing rows keep the base's values
    base = load_state_dict(zoo["base"])
    small = load_state_dict(zoo["code"])
    small = {k: (v[:-2] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in small.items()}
    (tmp_path / "small").mkdir()
    save_file(small, tmp_path / "small" / SINGLE)
    merge_models(zoo["base"], {"code": tmp_path / "small"}, TA, tmp_path / "q", vocab_policy="base")
    emb = load_state_dict(tmp_path / "q")["model.embed_tokens.weight"]
    assert torch.equal(emb[-2:], base["model.embed_tokens.weight"][-2:])
    assert torch.equal(emb[:-2], small["model.embed_tokens.weight"])


def test_other_shape_mismatches_are_errors_even_with_vocab_policy_base(zoo, tmp_path):
    state = load_state_dict(zoo["code"])
    name = "model.layers.0.mlp.gate_proj.weight"
    state[name] = state[name][:-1]
    (tmp_path / "bad").mkdir()
    save_file(state, tmp_path / "bad" / SINGLE)
    with pytest.raises(LedmergeError, match=re.escape(f"has {name} of shape [31, 16] but the base has [32, 16]")):
        check_compatible(zoo["base"], {"bad": tmp_path / "bad"}, vocab_policy="base")


def test_pickle_checkpoints_are_refused_unless_allowed(zoo, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save(load_state_dict(zoo["code"]), d / "pytorch_model.bin")
    (d / "config.json").write_text((zoo["code"] / "config.json").read_text())
    with pytest.raises(LedmergeError, match=r"pickle weights .*allow_pickle: true") as err:
        merge_models(zoo["base"], {"math": zoo["math"], "code": d}, TA, tmp_path / "out")
    assert "save_pretrained" in str(err.value)
    assert not (tmp_path / "out").exists()
    merge_models(zoo["base"], {"math": zoo["math"], "code": d}, TA, tmp_path / "out", allow_pickle=True)
    merge_models(zoo["base"], experts(zoo), TA, tmp_path / "ref")
    a, b = load_state_dict(tmp_path / "out"), load_state_dict(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("damage", ["truncate", "header", "missing_shard"])
def test_corrupt_inputs_fail_cleanly(zoo, tmp_path, damage):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(zoo["code_sharded"], d)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "header":
        shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    else:
        shard.unlink()
    with pytest.raises(LedmergeError, match="corrupt or truncated|is missing") as err:
        merge_models(zoo["base_sharded"], {"math": zoo["math_sharded"], "code": d}, TA, tmp_path / "out")
    assert str(shard.name) in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_model_card_hashes_every_input_file(zoo, tmp_path):
    """The hashes are computed while the tensors stream past; inputs laid out differently from the base
    (the sharded experts) are read out of order and must still hash to the files' real sha256."""
    exps = {"math": zoo["math_sharded"], "code": zoo["code"]}
    merge_models(zoo["base"], exps, TA, tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    for d in [zoo["base"], *exps.values()]:
        for f in weight_files(d):
            assert f"`{f.name}` | `{true_sha256(f)}`" in card, f


def test_merge_device_is_checked():
    assert merge_device("cpu").type == "cpu"
    with pytest.raises(LedmergeError, match="not a device"):
        merge_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(LedmergeError, match="no CUDA device"):
            merge_device("cuda")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    assert parse_size("500MB") == 500 * 10**6
    for bad in ("lots", "-1GB", 0, "0MB"):
        with pytest.raises(LedmergeError, match="shard size"):
            parse_size(bad)


@pytest.mark.parametrize("spec", [
    TA, {"method": "ties", "density": 0.3}, {"method": "dare_linear", "drop": 0.4, "seed": 5},
    {"method": "dare_ties", "drop": 0.6, "seed": 1}, {"method": "linear"},
    {"method": "led"}, {"method": "led", "combine": "ties", "density": 0.5},
    {"method": "led", "combine": "dare_ties", "drop": 0.5, "unscored": "task_arithmetic"},
    {"method": "breadcrumbs", "density": 0.5, "gamma": 0.1, "rescale": True}, {"method": "breadcrumbs_ties"},
    {"method": "della", "density": 0.4, "seed": 2}, {"method": "della_linear", "rescale": False},
])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole-reads", "sliced-reads"])
def test_streamed_chunks_equal_whole_tensor_merges(zoo, tmp_path, monkeypatch, spec, sliced):
    """The driver merges in flat chunks (here 37 elements, so chunks straddle rows); TIES' trim, DARE's
    drops and the L1 rescales are chosen on the whole tensor first, so the bits equal `merge_tensor` on whole
    tensors. `sliced`: every tensor is read in slabs of 100 entries (`TensorSlices`: how an LM head of a large
    vocabulary is read), with the same bits, and the model card's input hashes still those of the files."""
    import ledmerge.merge.driver as merge_driver
    from ledmerge.led.files import save_masks
    from ledmerge.merge import get_method
    from ledmerge.merge.base import TensorContext

    exps = experts(zoo)
    base = load_state_dict(zoo["base"])
    loaded = {t: load_state_dict(d) for t, d in exps.items()}
    g = torch.Generator().manual_seed(0)
    masks = {t: {n: torch.rand(v.shape, generator=g) < 0.3 for n, v in base.items() if v.dim() == 2} for t in exps}
    paths = {}
    for t, m in masks.items():
        paths[t] = tmp_path / f"{t}.mask.safetensors"
        save_masks(paths[t], m)
    monkeypatch.setattr(merge_driver, "CHUNK", 37)
    if sliced:
        monkeypatch.setattr(merge_driver, "SLICED", 1)
        monkeypatch.setattr(merge_driver, "SLAB", 100)
    merge_models(zoo["base"], exps, spec, tmp_path / "m", masks=paths if spec["method"] == "led" else None)
    if sliced:
        card = (tmp_path / "m" / "README.md").read_text()
        assert all(f"`{f.name}` | `{true_sha256(f)}`" in card for d in [zoo["base"], *exps.values()]
                   for f in weight_files(d))
    got = load_state_dict(tmp_path / "m")
    method = get_method(spec)
    for name, b in base.items():
        ctx = TensorContext(name, seed=method.seed,
                            masks={t: masks[t].get(name) for t in exps} if spec["method"] == "led" else {})
        want = method.merge_tensor(name, b, {t: loaded[t][name] for t in exps}, ctx)
        assert torch.equal(got[name], want), name
