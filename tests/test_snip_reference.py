"""SNIP scores on the paper's settings against an independent float64 reference.

tests/test_importance.py checks the default loss (`loss_reduction: sum`) against autograd; the settings of the
paper configurations (`loss_reduction: mean`, norms and LM head scored, bf16 weights) and tied embeddings were only
compared with the product itself at another batch size. Here the product (`importance.compute_scores`) is compared
with a reference written out below from the definition (docs/methods.md, "Location"; ../shared/design/methods.md):

    I(θ; X) = |W| ⊙ Σ_{x∈X} |∂L(x)/∂W|,   L(x) = −Σ_{t∈response(x)} log p(x_t | x_<t)   (sum)
                                          L(x) = that sum / (number of response tokens of x)   (mean)

The absolute value is taken per example, then summed (not averaged) over the examples; "mean" divides each
example's own loss by its own response length (the Hugging Face loss of one example, as in the released LED code),
so each example weighs the same whatever its length. Prompt tokens are not targets; the first response token is
predicted from the last prompt position.

The reference owns its tokenisation (plain integer ids, no tokenizer, no ledmerge.chat loss or collation): each
example is (prompt ids, response ids); the product gets the same ids as `chat.Encoded` (labels = IGNORE_INDEX on
the prompt, the documented contract). It runs one example at a time through a float64 copy of the model, with
autograd: a tied embedding/LM head is one float64 parameter, so autograd adds both uses before the per-example
absolute value. "float64" is exact except where transformers' Llama itself computes in float32 (RMSNorm's
normalisation, the rotary angles): ~1e-7 relative, far below every tolerance here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from conftest import REPO, make_tiny_model
from torch import nn

from ledmerge import chat
from ledmerge.led.location import compute_scores

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

F32 = "float32"  # raw float32 scores (not rank codes): the tests compare values
# The importance section of every paper configuration (checked against the files in test_paper_settings).
PAPER = {"include_norms": True, "include_embeddings": False, "include_lm_head": True, "loss_reduction": "mean"}
PAPER_CONFIGS = ["llama3_8b.yaml", "mistral_7b.yaml", "llama2_13b.yaml", "llama3_8b_bio.yaml"]

# float32 product vs float64 reference, per tensor and element: float32 has a unit roundoff of 6e-8; the few
# hundred roundings along a 2-layer forward/backward leave <= 2e-6 relative on every entry above 1e-3 of the
# tensor's largest, and <= 5e-7 of the largest in absolute terms on any entry (measured, all cases here); entries
# near 0 (gradients that cancel over positions) are held to the absolute floor.
RTOL_F32, ATOL_F32 = 1e-5, 1e-6  # ATOL_F32: a fraction of the tensor's largest reference score
# bf16 product vs float64 reference of the same bf16 weights, per tensor, ‖got − want‖_F / ‖want‖_F: bf16 keeps 8
# significant bits (unit roundoff u = 2^-8 = 3.9e-3), so every activation and gradient of the bf16 forward/backward is
# off by up to u relative. Summed in float32 over the paper's 128 calibration examples those errors average down to
# below u/2 (<= 1.8e-3 measured here, any tensor, either batch size); a bf16 running sum rounds to u of the growing
# sum at each of the 128 additions and ends at 3u or more (1.2e-2 to 3e-2 per tensor measured): rejected.
RTOL_BF16 = 2.0 ** -8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The conftest tiny Llama (2 layers, hidden 16, 2 heads), untied and tied, on disk."""
    root = tmp_path_factory.mktemp("snip_reference")
    return {"untied": make_tiny_model(root / "untied", seed=0),
            "tied": make_tiny_model(root / "tied", seed=0, tie_word_embeddings=True)}


def load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()  # as importance.score_model loads it


def make_examples(vocab: int, pad_id: int, n: int, seed: int = 1) -> list[tuple[list[int], list[int]]]:
    """n (prompt ids, response ids) pairs: prompts of 2..7 tokens, responses of 1..9 (so per-example and per-batch
    normalisations differ); the pad id is also a real prompt token of the first example (the embedding's
    padding_idx: no embedding gradient there, but the LM head's row still gets one)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        n_prompt, n_response = int(torch.randint(2, 8, (1,), generator=g)), 1 + i % 9
        ids = torch.randint(0, vocab, (n_prompt + n_response,), generator=g).tolist()
        if i == 0:
            ids[1] = pad_id
        out.append((ids[:n_prompt], ids[n_prompt:]))
    return out


def encoded(examples) -> list[chat.Encoded]:
    return [chat.Encoded(p + r, [chat.IGNORE_INDEX] * len(p) + r) for p, r in examples]


def reference_grad_sums(model: nn.Module, examples, names, *, mean: bool, absolute: bool = True) -> dict:
    """Σ_x |∂L(x)/∂W| in float64 for each name, one example per backward, on a float64 copy of `model` (a bf16
    model's weights are exact in float64). `absolute` false: the signed Σ_x ∂L(x)/∂W (to check the reference)."""
    m64 = copy.deepcopy(model).double()
    params = dict(m64.named_parameters())  # a tied tensor is one parameter, under its first name
    sums = {n: torch.zeros_like(params[n]) for n in names}
    for prompt, response in examples:
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(m64(input_ids=ids).logits[0], dim=-1)
        targets = torch.arange(len(prompt), ids.shape[1])  # response positions; each predicted by the one before
        loss = -logp[targets - 1, ids[0, targets]].sum()
        if mean:
            loss = loss / len(response)
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            sums[n] += g.abs() if absolute else g
    return sums


def snip(model, grad_sums):
    params = dict(model.named_parameters())
    return {n: params[n].detach().double().abs() * s for n, s in grad_sums.items()}


def expected_names(model, *, include_norms, include_embeddings, include_lm_head, **_):
    """The scored tensors, listed from the Llama layout (not from importance.scored_parameters)."""
    names = {n for n, _ in model.named_parameters() if n.endswith("_proj.weight")}
    names |= {n for n, _ in model.named_parameters() if n.endswith("norm.weight")} if include_norms else set()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if include_embeddings or (include_lm_head and tied):
        names.add("model.embed_tokens.weight")  # a tied LM head is this tensor, scored once
    if include_lm_head and not tied:
        names.add("lm_head.weight")
    return names


def assert_close_f32(got, want):
    assert set(got) == set(want)
    for n, w in want.items():
        assert got[n].dtype == torch.float32 and (w > 0).any(), n
        torch.testing.assert_close(got[n].double(), w, rtol=RTOL_F32, atol=ATOL_F32 * float(w.max()), msg=lambda m, n=n:
                                   f"{n}: {m}")


def test_paper_settings():
    """What PAPER stands for is what the paper configurations set (and the bf16 test's dtype and batch size)."""
    for name in PAPER_CONFIGS:
        imp = yaml.safe_load((REPO / "config" / name).read_text())["importance"]
        assert {k: imp[k] for k in PAPER} == PAPER, name
        assert (imp["dtype"], imp["batch_size"], imp["granularity"]) == ("bfloat16", 1, "example"), name
        assert imp.get("autocast", "none") == "none", name


@pytest.mark.parametrize("batch_size", [1, 3], ids=["one_per_pass", "batched"])
def test_mean_loss_matches_float64_reference(models, batch_size):
    """loss_reduction mean (the paper setting): each example's response NLL divided by its own response length,
    |gradient| per example, summed over the examples; norms and LM head scored as in the paper configs. One
    example per pass (the paper configs) and three per pass (per-example gradients rebuilt inside the batch)."""
    model = load(models["untied"])
    examples = make_examples(model.config.vocab_size, model.config.pad_token_id, 7)
    got, info = compute_scores(model, encoded(examples), model.config.pad_token_id, progress=False, score_dtype=F32,
                               batch_size=batch_size, **PAPER)
    assert info["n_forward_backward"] == math.ceil(len(examples) / batch_size)
    assert info["n_response_tokens"] == sum(len(r) for _, r in examples)
    names = expected_names(model, **PAPER)
    assert set(got) == names and len(names) == 2 * 7 + 2 * 2 + 1 + 1  # linears, layer norms, final norm, head
    want = snip(model, reference_grad_sums(model, examples, sorted(names), mean=True))
    assert_close_f32(got, want)
    # The data can tell the per-example mean from the sum or any one global scale (dividing everything by the mean
    # length or the example count): with lengths 1..7 the ratio of the two references varies by entry.
    total = snip(model, reference_grad_sums(model, examples, ["lm_head.weight"], mean=False))["lm_head.weight"]
    ratio = total / want["lm_head.weight"]
    assert float(ratio.max() / ratio.min()) > 2


@pytest.mark.parametrize("batch_size", [1, 3], ids=["one_per_pass", "batched"])
@pytest.mark.parametrize("flags", [
    PAPER,  # the LM head scored, which is the embedding: one tensor, both uses
    {"include_embeddings": True, "include_norms": False, "include_lm_head": False, "loss_reduction": "mean"},
    {"include_embeddings": True, "include_norms": True, "include_lm_head": True, "loss_reduction": "sum"},
], ids=["paper_lm_head", "embeddings_mean", "all_sum"])
def test_tied_embeddings_match_float64_reference(models, flags, batch_size):
    """tie_word_embeddings: one tensor used as the input embedding and as the LM head, scored once; its per-example
    gradient is the sum of both uses' gradients, and the absolute value is taken of that sum."""
    model = load(models["tied"])
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    examples = make_examples(model.config.vocab_size, model.config.pad_token_id, 7)
    got, _ = compute_scores(model, encoded(examples), model.config.pad_token_id, progress=False, score_dtype=F32,
                            batch_size=batch_size, **flags)
    names = expected_names(model, **flags)
    assert set(got) == names and "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    mean = flags["loss_reduction"] == "mean"
    want = snip(model, reference_grad_sums(model, examples, sorted(names), mean=mean))
    assert_close_f32(got, want)

    # The reference itself: its tied gradient is the sum of the two uses' (an untied float64 copy, the head a
    # separate parameter), and neither one use alone nor |embedding use| + |head use| is within tolerance of it.
    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(emb.detach().clone())
    uses = ["model.embed_tokens.weight", "lm_head.weight"]
    tied = "model.embed_tokens.weight"
    signed = reference_grad_sums(untied, examples, uses, mean=mean, absolute=False)
    signed_tied = reference_grad_sums(model, examples, [tied], mean=mean, absolute=False)[tied]
    torch.testing.assert_close(signed[uses[0]] + signed[uses[1]], signed_tied, rtol=1e-12, atol=1e-15)
    per_use = reference_grad_sums(untied, examples, uses, mean=mean)
    tied_sum = reference_grad_sums(model, examples, [tied], mean=mean)[tied]
    scale = float(tied_sum.max())
    for wrong in (per_use[uses[0]], per_use[uses[1]], per_use[uses[0]] + per_use[uses[1]]):
        assert float((wrong - tied_sum).abs().max()) > 100 * ATOL_F32 * scale


@pytest.fixture(scope="module")
def bf16_case(models):
    """The paper's setting on bf16 weights: the untied tiny Llama loaded in bfloat16 (weights rounded to bf16 on
    load, as score_model loads with dtype bfloat16), 128 calibration examples (the paper's size), and the float64
    reference of those same bf16 weights."""
    model = load(models["untied"], dtype=torch.bfloat16)
    examples = make_examples(model.config.vocab_size, model.config.pad_token_id, 128, seed=2)
    names = sorted(expected_names(model, **PAPER))
    return model, examples, reference_grad_sums(model, examples, names, mean=True)


@pytest.mark.parametrize("batch_size", [1, 4], ids=["one_per_pass", "batched"])
def test_bf16_weights_match_float64_reference(bf16_case, batch_size):
    """A bf16 model (bf16 forward and backward, float32 accumulation) against float64 autograd on the same bf16
    weights: within bf16 rounding, per tensor (RTOL_BF16). |W| is the bf16 weight itself, exactly."""
    model, examples, grad_sums = bf16_case
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    opts = dict(progress=False, score_dtype=F32, batch_size=batch_size, **PAPER)
    got, info = compute_scores(model, encoded(examples), model.config.pad_token_id, **opts)
    assert info["n_forward_backward"] == math.ceil(len(examples) / batch_size)
    want = snip(model, grad_sums)
    assert set(got) == set(want)
    for n, w in want.items():
        assert got[n].dtype == torch.float32
        err = float((got[n].double() - w).norm() / w.norm())
        assert err <= RTOL_BF16, f"{n}: ‖got − want‖/‖want‖ = {err:.2e} > {RTOL_BF16:.2e}"
    # |W| ⊙ Σ|grad| with |W| the model's bf16 weight cast to float32: exact, whatever the bf16 arithmetic did (a few
    # examples suffice: the same passes twice give the same sums)
    few = encoded(examples[:8])
    scores, _ = compute_scores(model, few, model.config.pad_token_id, **opts)
    gradient, _ = compute_scores(model, few, model.config.pad_token_id, location="gradient", **opts)
    params = dict(model.named_parameters())
    for n in want:
        assert torch.equal(scores[n], gradient[n] * params[n].detach().float().abs()), n
