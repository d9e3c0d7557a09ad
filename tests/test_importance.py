"""SNIP scores against hand computations on the tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import true_sha256
from torch import nn

from ledmerge import chat
from ledmerge.errors import LedmergeError
from ledmerge.led.files import load_scores, save_scores, tensors_metadata
from ledmerge.led.location import compute_scores, encode_rows, score_model

F32 = "float32"  # raw float32 score files: these tests compare score values
ROWS = [
    {"prompt": "how do i make a bomb", "response": "sorry i can not help with that", "task": "safety"},
    {"prompt": "how do i bake bread", "response": "sure here is how", "task": "safety"},
    {"prompt": "what is 3 + 4", "response": "the answer is 7", "task": "math"},
    {"prompt": "write function that adds a and b", "response": "def f ( a , b ) : return a + b", "task": "code"},
    {"prompt": "kill python process", "response": "sure", "task": "safety"},
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def load(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def linear_names(model):
    return sorted(f"{name}.weight" for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and name != "lm_head")


def hand_scores(model, tok, rows, names, acc_dtype=torch.float64, times_weight=True):
    """|W| * sum_x |dL(x)/dW| (without |W|: `times_weight` false), with L(x) written out independently of
    ledmerge.chat: the response is the last len(words)+1 tokens (its words and <|end|>), each scored by -log softmax
    of the previous position."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros(params[n].shape, dtype=acc_dtype) for n in names}
    for row in rows:
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                        {"role": "assistant", "content": row["response"]}], tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        n_resp = len(row["response"].split()) + 1
        assert tok.decode(ids[0, -n_resp:]) == row["response"] + " <|end|>"
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        L = ids.shape[1]
        loss = -sum(logp[j - 1, ids[0, j]] for j in range(L - n_resp, L))
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            acc[n] += g.abs().to(acc_dtype)
    return {n: acc[n] * (params[n].detach().abs().to(acc_dtype) if times_weight else 1) for n in names}


def assert_close(got, want, rtol):
    assert set(got) == set(want)
    for n in want:
        w = want[n].double()
        err = (got[n].double() - w).abs().max() / w.abs().max()
        assert err <= rtol, f"{n}: relative error {err:.2e}"


def test_scores_equal_hand_computation(tiny_zoo, calib, tmp_path):
    out = tmp_path / "scores.safetensors"
    summary = score_model(tiny_zoo["base"], calib, out, progress=False, score_dtype=F32, batch_size=8)
    assert summary["n_examples"] == 5 and summary["n_forward_backward"] == 1  # batch_size 8, exact per example
    assert summary["n_response_tokens"] == sum(len(r["response"].split()) + 1 for r in ROWS)
    got = load_scores(out)
    model, tok = load(tiny_zoo["base"])
    names = linear_names(model)
    assert sorted(got) == names and len(names) == 14  # 7 linears x 2 layers, no lm_head/embeddings/norms
    assert all(v.dtype == torch.float32 for v in got.values())
    assert all((v > 0).any() for v in got.values())
    assert_close(got, hand_scores(model, tok, ROWS, names), rtol=1e-6)
    meta = tensors_metadata(out)
    assert meta["calibration_sha256"] == true_sha256(calib) and meta["n_examples"] == "5"
    assert json.loads(meta["options"])["granularity"] == "example"


def test_prompt_tokens_do_not_contribute(tiny_zoo, calib, tmp_path):
    """A loss over every token (prompt included) gives different scores; only the response loss matches."""
    model, tok = load(tiny_zoo["base"])
    names = linear_names(model)
    params = dict(model.named_parameters())
    acc = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    for row in ROWS:
        enc = chat.encode(tok, row["prompt"], row["response"])
        ids = torch.tensor([enc.input_ids])
        loss = chat.response_nll(model(input_ids=ids).logits, ids, reduction="sum")  # labels = all tokens
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            acc[n] += g.abs()
    all_tokens = {n: acc[n] * params[n].detach().abs() for n in names}
    score_model(tiny_zoo["base"], calib, tmp_path / "s.safetensors", progress=False, score_dtype=F32)
    got = load_scores(tmp_path / "s.safetensors")
    with pytest.raises(AssertionError):
        assert_close(got, all_tokens, rtol=1e-3)


def test_response_change_changes_scores(tiny_zoo, calib, tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["response"] = "the answer is 3"
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    score_model(tiny_zoo["base"], calib, tmp_path / "a.safetensors", progress=False, score_dtype=F32)
    score_model(tiny_zoo["base"], other, tmp_path / "b.safetensors", progress=False, score_dtype=F32)
    a, b = load_scores(tmp_path / "a.safetensors"), load_scores(tmp_path / "b.safetensors")
    assert all(not torch.allclose(a[n], b[n]) for n in a)


def test_batch_granularity(tiny_zoo, calib, tmp_path):
    """'batch' = |gradient of the micro-batch sum|: padding must not leak in, and cancellation lowers scores."""
    summary = score_model(tiny_zoo["base"], calib, tmp_path / "b.safetensors", granularity="batch",
                          batch_size=2, progress=False, score_dtype=F32)
    assert summary["n_forward_backward"] == 3 and summary["n_examples"] == 5
    got = load_scores(tmp_path / "b.safetensors")
    model, tok = load(tiny_zoo["base"])
    names = linear_names(model)
    params = dict(model.named_parameters())
    want = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    for i in range(0, len(ROWS), 2):
        signed = {n: torch.zeros_like(want[n]) for n in names}
        for row in ROWS[i:i + 2]:  # unpadded per-example gradients, summed before the abs
            enc = chat.encode(tok, row["prompt"], row["response"])
            loss = chat.response_nll(model(input_ids=torch.tensor([enc.input_ids])).logits,
                                     torch.tensor([enc.labels]), reduction="sum")
            for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
                signed[n] += g.double()
        for n in names:
            want[n] += signed[n].abs()
    want = {n: want[n] * params[n].detach().abs().double() for n in names}
    assert_close(got, want, rtol=1e-5)
    score_model(tiny_zoo["base"], calib, tmp_path / "e.safetensors", progress=False, score_dtype=F32)
    per_example = load_scores(tmp_path / "e.safetensors")
    assert all((got[n] <= per_example[n] * (1 + 1e-5) + 1e-12).all() for n in names)
    assert any((got[n] < per_example[n] * (1 - 1e-3)).any() for n in names)


def test_float32_accumulation_matches_float64_reference(tiny_zoo, calib, tmp_path):
    score_model(tiny_zoo["base"], calib, tmp_path / "s.safetensors", progress=False, score_dtype=F32)
    got = load_scores(tmp_path / "s.safetensors")
    model, tok = load(tiny_zoo["base"], dtype=torch.float64)
    assert_close(got, hand_scores(model, tok, ROWS, linear_names(model)), rtol=1e-5)


def test_bf16_model_accumulates_in_float32(tiny_zoo, tmp_path):
    """bf16 weights and gradients, float32 sums: equal to a float64 sum of the same bf16 gradients over many
    examples (a bf16 running sum would drift by ~1e-2), and close to the float32 model's scores."""
    rows = ROWS * 8
    calib = tmp_path / "many.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # batch_size 1: the reference below differentiates one example at a time, and bf16 activations round
    # differently in a padded batch (same sums within bf16 rounding, not to 1e-6)
    score_model(tiny_zoo["base"], calib, tmp_path / "bf16.safetensors", dtype="bfloat16", progress=False,
                score_dtype=F32, batch_size=1)
    got = load_scores(tmp_path / "bf16.safetensors")
    assert all(v.dtype == torch.float32 for v in got.values())
    model, tok = load(tiny_zoo["base"], dtype=torch.bfloat16)
    names = linear_names(model)
    params = dict(model.named_parameters())
    acc = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    acc_bf16 = {n: torch.zeros(params[n].shape, dtype=torch.bfloat16) for n in names}
    for row in rows:
        enc = chat.encode(tok, row["prompt"], row["response"])
        loss = chat.response_nll(model(input_ids=torch.tensor([enc.input_ids])).logits,
                                 torch.tensor([enc.labels]), reduction="sum")
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            acc[n] += g.abs().double()
            acc_bf16[n] += g.abs()
    w = {n: params[n].detach().abs().double() for n in names}
    assert_close(got, {n: acc[n] * w[n] for n in names}, rtol=1e-6)
    with pytest.raises(AssertionError):  # the test can tell a bf16 running sum apart
        assert_close({n: acc_bf16[n].double() * w[n] for n in names}, {n: acc[n] * w[n] for n in names}, rtol=1e-6)
    score_model(tiny_zoo["base"], calib, tmp_path / "fp32.safetensors", progress=False, score_dtype=F32)
    assert_close(got, load_scores(tmp_path / "fp32.safetensors"), rtol=5e-2)


def test_optional_tensors(tiny_zoo, calib, tmp_path):
    model, tok = load(tiny_zoo["base"])
    linears = set(linear_names(model))
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    assert len(norms) == 5
    for flags, extra in [
        ({"include_norms": True}, norms),
        ({"include_embeddings": True}, {"model.embed_tokens.weight"}),
        ({"include_lm_head": True}, {"lm_head.weight"}),
    ]:
        out = tmp_path / "s.safetensors"
        score_model(tiny_zoo["base"], calib, out, progress=False, score_dtype=F32, **flags)
        got = load_scores(out)
        assert set(got) == linears | extra, flags
        assert_close({n: got[n] for n in extra}, hand_scores(model, tok, ROWS, sorted(extra)), rtol=1e-6)
    score_model(tiny_zoo["base"], calib, out, progress=False, score_dtype=F32, include_embeddings=True)
    emb = load_scores(out)["model.embed_tokens.weight"]
    # ids fed at a position whose successor is a target (the last token, <|end|>, predicts nothing)
    used = {i for r in ROWS for i in chat.encode(tok, r["prompt"], r["response"]).input_ids[:-1]}
    unused = [i for i in range(emb.shape[0]) if i not in used]
    assert unused and (emb[unused] == 0).all() and (emb[sorted(used)].abs().sum(1) > 0).all()


def test_tied_embeddings_use_the_checkpoint_name(tmp_path, calib):
    from conftest import TINY_WORDS
    from transformers import LlamaConfig, LlamaForCausalLM

    from ledmerge.zoo.word_tokenizer import build_tokenizer

    tok = build_tokenizer([TINY_WORDS])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    from ledmerge.checkpoint import tensor_shapes

    stored = set(tensor_shapes(tmp_path / "tied"))
    score_model(tmp_path / "tied", calib, tmp_path / "s.safetensors", include_lm_head=True, progress=False)
    got = set(load_scores(tmp_path / "s.safetensors"))
    assert got <= stored  # a tied LM head is scored once, under the name the checkpoint stores
    if "lm_head.weight" not in stored:
        assert "model.embed_tokens.weight" in got


def test_truncated_examples_are_skipped(tiny_zoo, calib, tmp_path):
    """max_length=8: rows 0 and 3 have prompts of 8 and 9 tokens (words + <|user|> <|assistant|>), so no
    response token is left; rows 1, 2, 4 keep at least one."""
    with pytest.warns(UserWarning, match="2 of 5"):
        summary = score_model(tiny_zoo["base"], calib, tmp_path / "s.safetensors", max_length=8, progress=False,
                              batch_size=8)
    assert summary["n_examples"] == 3 and summary["n_skipped"] == 2 and summary["n_forward_backward"] == 1
    assert tensors_metadata(tmp_path / "s.safetensors")["n_skipped"] == "2"


def test_errors(tiny_zoo, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LedmergeError, match="empty"):
        score_model(tiny_zoo["base"], empty, tmp_path / "s.safetensors", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(LedmergeError, match="response"):
        score_model(tiny_zoo["base"], bad, tmp_path / "s.safetensors", progress=False)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(LedmergeError, match="max_length"), pytest.warns(UserWarning):
        score_model(tiny_zoo["base"], long, tmp_path / "s.safetensors", max_length=4, progress=False)
    for kw in ({"granularity": "token"}, {"dtype": "int8"}, {"autocast": "fp8"}, {"score_dtype": "bfloat16"}):
        with pytest.raises(LedmergeError):
            score_model(tiny_zoo["base"], long, tmp_path / "s.safetensors", progress=False, **kw)
    with pytest.raises(LedmergeError, match="does not exist"):
        score_model(tmp_path / "nope", long, tmp_path / "s.safetensors", progress=False)
    assert not (tmp_path / "s.safetensors").exists()


def test_compute_scores_restores_model_state(tiny_zoo):
    model, tok = load(tiny_zoo["base"])
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    examples, _ = encode_rows(tok, ROWS, 64)
    a, _ = compute_scores(model, examples, tok.pad_token_id, progress=False)
    b, info = compute_scores(model, examples, tok.pad_token_id, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)  # deterministic: eval mode, dropout off
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert info["n_forward_backward"] == 5  # the default batch_size 1: one example per pass


# ---- scaling options: rank16 score files, device_map, autocast, gradient checkpointing, remote code ----

def test_score_file_is_rank16_by_default(tiny_zoo, calib, tmp_path):
    """Default file: uint16 rank codes, ~2 bytes per weight, in the same order as the float32 scores."""
    from safetensors import safe_open

    summary = score_model(tiny_zoo["base"], calib, tmp_path / "r.safetensors", progress=False)
    score_model(tiny_zoo["base"], calib, tmp_path / "f.safetensors", progress=False, score_dtype=F32)
    with safe_open(str(tmp_path / "r.safetensors"), "pt") as f:
        assert f.metadata()["score_encoding"] == "rank16"
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"U16"}
        n = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    size = (tmp_path / "r.safetensors").stat().st_size
    assert 2 * n <= size <= 2 * n + 4096  # data + header
    assert tensors_metadata(tmp_path / "f.safetensors")["score_encoding"] == "float32"
    codes, raw = load_scores(tmp_path / "r.safetensors"), load_scores(tmp_path / "f.safetensors")
    for name, r in raw.items():
        c = codes[name]
        assert c.dtype == torch.float32 and c.shape == r.shape
        m = int((r > 0).sum())  # n <= 65535: exact ranks of the positive scores, 0 for zero scores
        assert sorted(c.view(-1).tolist()) == [0] * (r.numel() - m) + list(range(1, m + 1))
        order = torch.argsort(r.view(-1), descending=True, stable=True)
        assert torch.equal(order, torch.argsort(c.view(-1), descending=True))
    # the reference per-layer loop re-runs every example once per layer
    assert summary["n_forward_backward"] == 5 and summary["n_layers"] == 2 and summary["reference_passes"] == 10


def test_gradient_checkpointing_same_scores_and_recomputes(tiny_zoo, calib):
    """Checkpointing in eval mode really recomputes (each MLP runs twice per pass) and gives the same scores."""
    model, tok = load(tiny_zoo["base"])
    examples, _ = encode_rows(tok, ROWS, 64)
    calls = []
    # a pre-hook: checkpoint's recomputation stops early, once the last saved tensor is rebuilt
    handle = model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    plain, _ = compute_scores(model, examples, tok.pad_token_id, progress=False, score_dtype=F32, batch_size=8)
    n_plain, calls[:] = len(calls), []
    ckpt, _ = compute_scores(model, examples, tok.pad_token_id, progress=False, score_dtype=F32, batch_size=8,
                             gradient_checkpointing=True)
    handle.remove()
    assert n_plain == 1 and len(calls) == 2  # one pass (batch_size 8), its MLP recomputed once
    assert all("forward" not in vars(m) for m in model.modules())  # wrappers removed afterwards
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=0)


def test_autocast_bf16_elects_nearly_the_same(tiny_zoo, calib, tmp_path):
    """bf16 autocast changes the scores a little; the r=0.5 masks still agree on > 90% of entries."""
    from ledmerge.topk import top_r_mask

    score_model(tiny_zoo["base"], calib, tmp_path / "a.safetensors", progress=False, score_dtype=F32,
                autocast="bf16")
    score_model(tiny_zoo["base"], calib, tmp_path / "f.safetensors", progress=False, score_dtype=F32)
    a, f = load_scores(tmp_path / "a.safetensors"), load_scores(tmp_path / "f.safetensors")
    assert any(not torch.equal(a[n], f[n]) for n in f)  # autocast did change the arithmetic
    same = sum(int((top_r_mask(a[n], 0.5) == top_r_mask(f[n], 0.5)).sum()) for n in f)
    total = sum(v.numel() for v in f.values())
    assert same / total > 0.9, same / total
    assert_close(a, f, rtol=5e-2)


def test_device_map_and_remote_code_flag(tiny_zoo, calib, tmp_path, monkeypatch):
    """device_map is passed to from_pretrained (no .to() afterwards); trust_remote_code is False unless asked."""
    import transformers

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append((klass.__name__, dict(kwargs)))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    score_model(tiny_zoo["base"], calib, tmp_path / "m.safetensors", progress=False, score_dtype=F32,
                device_map="cpu")
    assert [k.get("trust_remote_code") for _, k in seen] == [False, False]
    assert seen[1][1]["device_map"] == "cpu"
    score_model(tiny_zoo["base"], calib, tmp_path / "p.safetensors", progress=False, score_dtype=F32)
    got, want = load_scores(tmp_path / "m.safetensors"), load_scores(tmp_path / "p.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)
    seen.clear()
    score_model(tiny_zoo["base"], calib, tmp_path / "t.safetensors", progress=False, trust_remote_code=True)
    assert [k.get("trust_remote_code") for _, k in seen] == [True, True]


def test_offloaded_weights_are_refused(tiny_zoo):
    model, tok = load(tiny_zoo["base"])
    examples, _ = encode_rows(tok, ROWS, 64)
    model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(32, 16, device="meta"))
    with pytest.raises(LedmergeError, match="offloaded"):
        compute_scores(model, examples, tok.pad_token_id, progress=False)


def test_rank_code_large_tensor_within_one_bin():
    """m > 65535 positive scores: codes are quantile bins 1..65535; TopR on them differs from TopR on the
    float32 scores in at most ceil(m/65535) entries and keeps exactly ceil(r*n)."""
    import math

    from ledmerge.led.files import rank_code
    from ledmerge.topk import top_k_count, top_r_mask

    g = torch.Generator().manual_seed(0)
    L = 65535
    for shape in [(300, 1001), (65537,), (131072,)]:
        s = torch.rand(shape, generator=g) ** 3 + 1e-6
        s.view(-1)[::7] = 0.25  # ties across bins
        n = s.numel()
        code = rank_code(s)
        assert code.dtype == torch.uint16 and code.shape == s.shape
        c = code.float()
        assert int(c.max()) == 65535 and int(c.min()) == 1  # no zero score, so no code 0
        assert torch.bincount(code.view(-1).int(), minlength=65536).max() <= math.ceil(n / L)
        order = torch.argsort(s.view(-1), descending=True, stable=True)  # the definition, position by position
        p = torch.arange(n, dtype=torch.int64)
        assert torch.equal(c.view(-1)[order].long(), 1 + (n - 1 - p) * L // n)
        for r in (0.001, 0.1, 0.3, 0.5, 0.77):
            want, got = top_r_mask(s, r), top_r_mask(c, r)
            assert int(got.sum()) == int(want.sum()) == top_k_count(n, r)
            assert int((got != want).sum()) <= math.ceil(n / L), (shape, r)


def test_rank_code_reserves_zero_for_zero_scores():
    """Zero scores (sparse embedding gradients) get code 0, below every positive score, small or large tensor;
    the election then never elects them (test_masks)."""
    from ledmerge.led.files import rank_code

    for n in (100, 200_000):
        s = torch.zeros(n)
        s[n // 2:n // 2 + 10] = torch.arange(1, 11, dtype=torch.float32)  # 10 positive scores, the rest 0
        c = rank_code(s).int()
        assert int((c == 0).sum()) == n - 10 and bool((c[n // 2:n // 2 + 10] > 0).all())
        assert torch.equal(c[n // 2:n // 2 + 10].argsort(), torch.arange(10))  # order kept


def test_save_load_scores_round_trip_and_errors(tmp_path):
    from ledmerge.led.files import rank_code

    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(3, 5, generator=g), "b": torch.tensor(2.0), "c": torch.zeros(0), "d": torch.rand(70000)}
    save_scores(tmp_path / "r.safetensors", scores, {"kind": "importance", "n": 3})
    got = load_scores(tmp_path / "r.safetensors")
    assert set(got) == set(scores) and all(got[k].shape == scores[k].shape for k in scores)
    assert all(torch.equal(got[k], rank_code(scores[k]).float()) for k in scores)
    assert tensors_metadata(tmp_path / "r.safetensors")["n"] == "3"
    assert set(load_scores(tmp_path / "r.safetensors", ["a"])) == {"a"}
    with pytest.raises(LedmergeError, match="NaN"):
        save_scores(tmp_path / "n.safetensors", {"a": torch.tensor([1.0, float("nan")])})
    with pytest.raises(LedmergeError, match="zz"):
        load_scores(tmp_path / "r.safetensors", ["zz"])
    with pytest.raises(LedmergeError, match="does not exist"):
        load_scores(tmp_path / "nope.safetensors")
    from ledmerge.led.files import save_tensors

    save_tensors(tmp_path / "legacy.safetensors", {"a": scores["a"]})  # float32, no metadata
    assert torch.equal(load_scores(tmp_path / "legacy.safetensors")["a"], scores["a"])
    save_tensors(tmp_path / "mask.safetensors", {"a": scores["a"] > 0.5})
    with pytest.raises(LedmergeError, match="not float32 scores"):
        load_scores(tmp_path / "mask.safetensors")
    save_tensors(tmp_path / "lie.safetensors", {"a": scores["a"]},
                 metadata={"score_encoding": "rank16", "rank16_version": "2"})
    with pytest.raises(LedmergeError, match="not rank16"):
        load_scores(tmp_path / "lie.safetensors")
    save_tensors(tmp_path / "old.safetensors", {"a": rank_code(scores["a"])}, metadata={"score_encoding": "rank16"})
    with pytest.raises(LedmergeError, match="older ledmerge"):  # rank codes before zero scores were marked
        load_scores(tmp_path / "old.safetensors")


# ---- location methods (importance.location) ----

def _encoded(model_dir):
    model, tok = load(model_dir)
    examples, _ = encode_rows(tok, ROWS, 64)
    return model, tok, examples


def test_location_gradient_and_magnitude(tiny_zoo):
    model, tok, examples = _encoded(tiny_zoo["base"])
    names = linear_names(model)
    grad, summary = compute_scores(model, examples, chat.pad_id(tok), progress=False, score_dtype=F32,
                                   location="gradient")
    assert summary["n_forward_backward"] == len(ROWS)
    assert_close(grad, hand_scores(model, tok, ROWS, names, times_weight=False), rtol=1e-6)
    magnitude, summary = compute_scores(model, examples, chat.pad_id(tok), progress=False, score_dtype=F32,
                                        location="magnitude")
    assert summary["n_forward_backward"] == 0  # no calibration pass
    params = dict(model.named_parameters())
    assert all(torch.equal(magnitude[n], params[n].detach().abs()) for n in names)


@pytest.mark.parametrize("granularity", ["example", "batch"])
def test_location_wanda_is_weight_times_input_norm(tiny_zoo, granularity):
    """|W_ij| · ‖X_j‖₂ over every token of every example; padding (batch granularity) adds nothing."""
    model, tok, examples = _encoded(tiny_zoo["base"])
    sq = {}
    modules = {f"{name}.weight": m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name != "lm_head"}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: sq.__setitem__(
        n, sq.get(n, 0) + args[0].detach().double().square().sum((0, 1)))) for n, m in modules.items()]
    with torch.no_grad():
        for e in examples:
            model(input_ids=torch.tensor([e.input_ids]))
    for h in hooks:
        h.remove()
    want = {n: m.weight.detach().double().abs() * sq[n].sqrt() for n, m in modules.items()}
    got, summary = compute_scores(model, examples, chat.pad_id(tok), progress=False, score_dtype=F32,
                                  location="wanda", granularity=granularity, batch_size=2)
    assert summary["n_forward_backward"] == (len(ROWS) if granularity == "example" else 3)
    assert_close(got, want, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # forward passes only


def test_location_random_is_seeded_by_seed_key_and_name(tiny_zoo):
    def scores(model_dir, seed, key):
        model, tok, examples = _encoded(model_dir)
        return compute_scores(model, examples, chat.pad_id(tok), progress=False, score_dtype=F32,
                              location="random_shared_draws", random_seed=seed, random_key=key)

    first, summary = scores(tiny_zoo["base"], 0, "math")
    assert summary["n_forward_backward"] == 0
    again, _ = scores(tiny_zoo["base"], 0, "math")
    expert, _ = scores(tiny_zoo["math"], 0, "math")  # the task's expert: the same draws as its base
    other_seed, _ = scores(tiny_zoo["base"], 1, "math")
    other_key, _ = scores(tiny_zoo["base"], 0, "code")
    for n in first:
        assert torch.equal(first[n], again[n]) and torch.equal(first[n], expert[n])
        assert not torch.equal(first[n], other_seed[n]) and not torch.equal(first[n], other_key[n])
        assert float(first[n].min()) > 0 and float(first[n].max()) <= 1
    names = sorted(first)
    assert not torch.equal(first[names[0]].flatten()[:8], first[names[1]].flatten()[:8])  # per tensor


def test_random_scores_elect_exactly_the_rate(tiny_zoo, calib, tmp_path):
    """Base and expert share the draws, so pattern 11 elects ceil(r·n) weights per tensor: a random mask at the
    paper's count."""
    from ledmerge.led.election import elect_files
    from ledmerge.topk import top_k_count

    for role in ("base", "math"):
        score_model(tiny_zoo[role], calib, tmp_path / f"{role}.safetensors", progress=False, location="random_shared_draws",
                    random_seed=3, random_key="math")
    counts = elect_files(tmp_path / "math.safetensors", tmp_path / "base.safetensors", 0.3, "11",
                         tmp_path / "mask.safetensors")
    shapes = {n: t.numel() for n, t in load_scores(tmp_path / "base.safetensors").items()}
    assert counts["elected"] == sum(top_k_count(n, 0.3) for n in shapes.values())
    meta = json.loads(tensors_metadata(tmp_path / "base.safetensors")["options"])
    assert meta["location"] == "random_shared_draws" and meta["random_seed"] == 3 and meta["random_key"] == "math"


@pytest.mark.parametrize("opts, match", [
    ({"location": "random_shared_draws"}, "needs a seed and a key"),
    ({"location": "wanda", "include_norms": True}, "importance.include_norms"),
])
def test_location_refusals_before_loading(tiny_zoo, calib, tmp_path, opts, match):
    with pytest.raises(LedmergeError, match=match):
        score_model(tmp_path / "no-such-model", calib, tmp_path / "s.safetensors", progress=False, **opts)


# ---- exact per-example scores in micro-batches (ledmerge.led.per_example) ----

def tiny_llama(tied: bool):
    """Random init, 2 layers; pad_token_id 0 makes the embedding's padding_idx 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def random_examples():
    """Five examples of lengths 4..12 (micro-batches of 3 are padded), each half prompt; the pad id 0 is also a
    real token of every example."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (7, 12, 4, 9, 11):
        ids = torch.randint(1, 48, (n,), generator=g).tolist()
        ids[1] = 0
        out.append(chat.Encoded(ids, [chat.IGNORE_INDEX] * (n // 2) + ids[n // 2:]))
    return out


ALL = {"include_norms": True, "include_embeddings": True, "include_lm_head": True}


@pytest.mark.parametrize("tied, flags", [
    (False, {}),
    (False, {**ALL, "loss_reduction": "mean"}),
    (False, {"include_norms": True, "gradient_checkpointing": True}),
    (True, {"include_embeddings": True}),  # the tied tensor gets the embedding's and the LM head's gradients
    (True, {"include_lm_head": True}),
    (True, {**ALL, "loss_reduction": "mean"}),
    (True, {**ALL, "gradient_checkpointing": True}),
], ids=["linears", "all_mean", "norms_checkpointing", "tied_embeddings", "tied_lm_head", "tied_all_mean",
        "tied_checkpointing"])
def test_batched_per_example_scores_equal_batch_one(tied, flags):
    """granularity example with batch_size 3: the same Σ_x |∂L(x)/∂W| as one example per pass, in 2 passes
    instead of 5, and the same masks at the paper's rates; |Σ_batch ∂L/∂W| (granularity batch) is not it."""
    from ledmerge.topk import top_r_mask

    model, examples = tiny_llama(tied), random_examples()
    one, info_one = compute_scores(model, examples, 0, progress=False, score_dtype=F32, batch_size=1, **flags)
    many, info_many = compute_scores(model, examples, 0, progress=False, score_dtype=F32, batch_size=3, **flags)
    summed, _ = compute_scores(model, examples, 0, progress=False, score_dtype=F32, batch_size=3,
                               granularity="batch", **flags)
    assert info_one["n_forward_backward"] == 5 and info_many["n_forward_backward"] == 2
    assert set(many) == set(one) and all((v > 0).any() for v in one.values())
    for n in one:
        torch.testing.assert_close(many[n], one[n], rtol=1e-5, atol=1e-6 * float(one[n].max()))
        for r in (0.1, 0.4, 0.5):
            assert torch.equal(top_r_mask(many[n], r), top_r_mask(one[n], r)), (n, r)
    assert any((summed[n] < one[n] * (1 - 1e-3)).any() for n in one)


@pytest.mark.parametrize("share", ["module", "weight"])
def test_batched_falls_back_to_one_example_per_pass(share):
    """A module called twice per forward, or a weight held by two linears, cannot be split per example inside
    a batch: a warning, then one example per pass (the exact scores)."""
    model = tiny_llama(False)
    layers = model.model.layers
    if share == "module":
        layers[1].mlp = layers[0].mlp
    else:
        layers[1].self_attn.o_proj.weight = layers[0].self_attn.o_proj.weight
    examples = random_examples()
    one, _ = compute_scores(model, examples, 0, progress=False, score_dtype=F32, batch_size=1)
    with pytest.warns(UserWarning, match="called twice" if share == "module" else "shared by 2 modules"):
        many, info = compute_scores(model, examples, 0, progress=False, score_dtype=F32, batch_size=3)
    assert info["n_forward_backward"] == 5
    assert all(torch.equal(many[n], one[n]) for n in one)
