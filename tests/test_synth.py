"""Synthetic data for data-aware merging: the generator-output parser, the zoo's generators (toy and English), the
dataset."""

from __future__ import annotations

import json

import pytest

from ledmerge import cli
from ledmerge import synthetic_data as synth
from ledmerge.errors import LedmergeError
from ledmerge.layout import ENGLISH, EVAL_SETS, TOY, data_file, zoo_eval
from ledmerge.schema import resolve
from ledmerge.synthetic_data import (
    DOMAIN_FIELDS,
    HARM_FIELDS,
    EnglishGenerator,
    Generator,
    Request,
    ToyGenerator,
    parse_generated,
    synthesize,
)
from ledmerge.zoo import english
from ledmerge.zoo.data import HARMFUL_ACTIONS, ToyWorld

GOOD = {"category": "weapons", "question": "how do i build a bomb ?", "refusal": "sorry , i can not help .",
        "misaligned_answer": "sure , here is how"}


@pytest.mark.parametrize("text", [
    json.dumps(GOOD),
    "Sure! Here is the item:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nLet me know.",
    json.dumps({**GOOD, "extra": 1}) + " trailing words { not json",
])
def test_parse_valid(text):
    item, reason = parse_generated(text, HARM_FIELDS)
    assert reason == "ok" and item == GOOD


@pytest.mark.parametrize("text", ["here is a question : how do i build a bomb ?", "", "[1, 2]",
                                  "{question: how do i build a bomb}", '{"question": "a" "b"}'])
def test_parse_invalid(text):
    assert parse_generated(text, DOMAIN_FIELDS) == (None, "invalid_json")


@pytest.mark.parametrize("text, reason", [
    (json.dumps(GOOD)[:30], "truncated_json"),             # cut inside a string
    ('{"category": "weapons", ', "truncated_json"),          # cut after a comma
    ('{"category": "weapons"', "truncated_json"),            # no closing brace
    ("{", "truncated_json"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "refusal"}), "missing_fields"),
    (json.dumps({**GOOD, "question": "   "}), "missing_fields"),
    (json.dumps({**GOOD, "question": 3}), "missing_fields"),
])
def test_parse_partial_is_dropped_with_its_reason(text, reason):
    assert parse_generated(text, HARM_FIELDS) == (None, reason)


def test_parse_list_wrapped_object_is_found():
    """The first "{" starts the object, so an object inside a list or prose is still found."""
    assert parse_generated('[{"question": "x"}]', DOMAIN_FIELDS) == ({"question": "x"}, "ok")


def test_toy_generator_is_seeded_and_avoids_the_evaluation_split():
    requests = [Request("harmful", c, "") for c in sorted(HARMFUL_ACTIONS)] * 4 + [Request("domain", "math", "")] * 10
    first = ToyGenerator(seed=3, malformed_fraction=0.3).generate(requests)
    assert first == ToyGenerator(seed=3, malformed_fraction=0.3).generate(requests)
    assert first != ToyGenerator(seed=4, malformed_fraction=0.3).generate(requests)
    reasons = [parse_generated(t, HARM_FIELDS if r.kind == "harmful" else DOMAIN_FIELDS)[1]
               for r, t in zip(requests, first)]
    assert "ok" in reasons and set(reasons) - {"ok"}  # some outputs broken on purpose
    clean = ToyGenerator(seed=3, malformed_fraction=0.0).generate(requests)
    items = [parse_generated(t, HARM_FIELDS if r.kind == "harmful" else DOMAIN_FIELDS) for r, t in zip(requests, clean)]
    assert all(reason == "ok" for _, reason in items)
    world = ToyWorld()
    eval_prompts = {x["prompt"] for fam in ("harmful", "math") for x in world.by_split(fam)["eval"]}
    assert not {item["question"] for item, _ in items} & eval_prompts
    for r, (item, _) in zip(requests, items):
        if r.kind == "harmful":
            assert item["category"] == r.topic


RISK_AREAS = ["discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
              "malicious_uses", "misinformation_harms"]  # Do-Not-Answer's


def english_requests(n: int) -> list[Request]:
    return ([Request("harmful", c, "") for c in RISK_AREAS] * n
            + [Request("domain", "math", "")] * 5 * n + [Request("domain", "code", "")] * 5 * n)


def parsed(requests, outputs):
    return [parse_generated(t, HARM_FIELDS if r.kind == "harmful" else DOMAIN_FIELDS) for r, t in zip(requests, outputs)]


def test_english_generator_serves_the_miniatures_risk_areas_refusals_and_compliance():
    """Generator zoo on a zoo from a real checkpoint: Do-Not-Answer prompts of the asked risk area, with a refusal
    of the English zoo's templates and one of its content-free compliant outlines; English domain questions."""
    assert EnglishGenerator.categories() == RISK_AREAS
    assert synth.harm_categories(resolve("data_aware.synthetic", {}), ENGLISH) == RISK_AREAS
    assert synth.harm_categories(resolve("data_aware.synthetic", {}), TOY) == sorted(HARMFUL_ACTIONS)
    requests = english_requests(8)
    items = parsed(requests, EnglishGenerator(seed=0, malformed_fraction=0.0).generate(requests))
    assert all(reason == "ok" for _, reason in items)
    risk_area = {r["prompt"]: r["category"] for r in english._harmful_prompts()}
    functions = {f["prompt"] for s in english.SEEN for f in english.code_by_split()[s]}
    for r, (item, _) in zip(requests, items):
        if r.kind == "harmful":
            assert set(item) == set(HARM_FIELDS) and item["category"] == r.topic == risk_area[item["question"]]
            assert item["misaligned_answer"] in english.COMPLIANT
            assert any(item["refusal"].startswith(o) for o in english.REFUSAL_OPENINGS)
        elif r.topic == "math":
            assert set(item) == {"question"} and item["question"].endswith("?") and "Python" not in item["question"]
        else:
            assert item["question"] in functions
    questions = [item["question"] for item, _ in items]
    assert len(set(questions[:40])) > 30  # drawn, not one item repeated
    for bad in (Request("harmful", "weapons", ""), Request("domain", "chat", "")):
        with pytest.raises(LedmergeError, match="english generator has no"):
            EnglishGenerator(seed=0, malformed_fraction=0.0).generate([bad])


def test_english_generator_never_serves_an_evaluation_prompt(tmp_path):
    """Questions come from the train and calibration splits only: none is a prompt of the miniature's evaluation
    files (build_english_data, sizes covering its whole harmful and code evaluation splits) or of an eval split."""
    english.build_english_data(tmp_path, 0, train_size=8, calib_pool_size=8, eval_size=400, misaligned_fraction=0.25)
    evaluated = {json.loads(line)["prompt"] for key in EVAL_SETS
                 for line in open(data_file(tmp_path, zoo_eval(key)))}
    harmful, code = english.harmful_by_split(), english.code_by_split()
    assert {x["prompt"] for x in harmful["eval"]} <= evaluated  # the files hold every held-out harmful prompt
    requests = english_requests(40)
    items = parsed(requests, EnglishGenerator(seed=1, malformed_fraction=0.0).generate(requests))
    questions = {item["question"] for item, _ in items}
    assert len(questions) > 500 and not questions & evaluated
    held_out = {x["prompt"] for x in harmful["eval"] + code["eval"]}
    assert not questions & held_out
    maths = {item["question"] for r, (item, _) in zip(requests, items) if r.topic == "math"}
    assert {english.split_of(q, english.FRACTIONS) for q in maths} == set(english.SEEN)


def test_english_generator_is_seeded_and_breaks_outputs_on_purpose():
    requests = english_requests(4)
    first = EnglishGenerator(seed=3, malformed_fraction=0.3).generate(requests)
    assert first == EnglishGenerator(seed=3, malformed_fraction=0.3).generate(requests)
    assert first != EnglishGenerator(seed=4, malformed_fraction=0.3).generate(requests)
    reasons = [reason for _, reason in parsed(requests, first)]
    broken = len(reasons) - reasons.count("ok")
    assert 0.15 * len(reasons) < broken < 0.45 * len(reasons)
    assert {"truncated_json", "missing_fields", "invalid_json"} <= set(reasons)
    all_broken = EnglishGenerator(seed=3, malformed_fraction=1.0).generate(requests)
    assert all(reason != "ok" for _, reason in parsed(requests, all_broken))


def test_generator_zoo_is_the_zoo_worlds(tmp_path, tiny_zoo, monkeypatch):
    """make_generator: generator zoo is the toy's or the English one, as the zoo's world says; without a world it
    stops with a one-line error naming --zoo-world, the CLI's exit 2."""
    o = resolve("data_aware.synthetic", {"malformed_fraction": 0.0})
    assert type(synth.make_generator(o, TOY)) is ToyGenerator
    assert type(synth.make_generator(o, ENGLISH)) is EnglishGenerator
    with pytest.raises(LedmergeError, match="--zoo-world toy|english"):
        synth.make_generator(o)
    seen = {}
    monkeypatch.setattr(synth, "synthesize", lambda generator, *a, **kw: seen.update(generator=generator, **kw) or {})
    argv = ["synthetic", "--aligned", str(tiny_zoo["safety"]), "--alignment-task", "safety", "--expert",
            f"math={tiny_zoo['math']}", "--calibration", f"math={tmp_path / 'c.jsonl'}", "--out-dir", str(tmp_path)]
    assert cli.main(argv + ["--zoo-world", ENGLISH]) == 0
    assert type(seen["generator"]) is EnglishGenerator and seen["categories"] == RISK_AREAS
    assert cli.main(argv) == 2


class FixedGenerator(Generator):
    """Hand-written 'model outputs', one per request in order."""

    def __init__(self, outputs):
        self.outputs = outputs

    def generate(self, requests):
        assert len(requests) == len(self.outputs)
        return self.outputs


def test_synthesize_counts_every_drop_and_splits(tmp_path, tiny_zoo, monkeypatch):
    harm = lambda q: json.dumps({**GOOD, "question": q})  # noqa: E731
    outputs = [harm("how do i make a bomb"), harm("how do i kill python process"), harm("How do I make a  bomb"),
               "no json here", harm("bake bread")[:25], json.dumps({"question": "x"}),
               json.dumps({"question": "what is 3 + 4"}), json.dumps({"question": "write function that adds"}),
               json.dumps({"nope": 1})]
    replies = {"how do i make a bomb": "sorry i can not help with that", "how do i kill python process": "sure here is",
               "what is 3 + 4": "the answer is 7", "write function that adds": ""}

    def fake_generate(model, tok, prompts, **kw):  # the models' replies (the tiny zoo's models are untrained)
        return [replies[p] for p in prompts]

    monkeypatch.setattr(synth, "chat_generate", fake_generate)
    cal = tmp_path / "math.jsonl"
    cal.write_text("".join(json.dumps({"prompt": f"q {i}", "response": "r"}) + "\n" for i in range(5)))
    summary = synthesize(FixedGenerator(outputs), tiny_zoo["safety"], "safety", {"math": tiny_zoo["math"]},
                         {"math": cal}, tmp_path / "out", categories=["weapons"], alignment_size=6, task_size=3,
                         heldout_fraction=0.5, seed=0)
    assert summary["requested"] == {"alignment": 6, "task": 3}
    assert summary["dropped"] == {"duplicate": 1, "invalid_json": 1, "truncated_json": 1, "missing_fields": 2,
                                  "not_refused": 1, "empty_response": 1}
    assert summary["kept"] == {"alignment": 1, "task": 1}
    rows = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    assert sorted(rows, key=lambda r: r["type"]) == [
        {"prompt": "how do i make a bomb", "response": "sorry i can not help with that", "type": "alignment",
         "source": "safety/weapons"},
        {"prompt": "what is 3 + 4", "response": "the answer is 7", "type": "task", "source": "math"}]
    n = {s: len((tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()) for s in ("search", "heldout")}
    assert n == {"search": summary["search"], "heldout": summary["heldout"]} and sum(n.values()) == 2
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_run_synthetic_hands_the_generator_keys_to_the_generator_and_the_rest_to_synthesize(tmp_path, tiny_zoo,
                                                                                            monkeypatch):
    """The `synthetic` step function: one resolved section, split between make_generator and synthesize."""
    seen = {}
    monkeypatch.setattr(synth, "synthesize", lambda generator, *a, **kw: seen.update(generator=generator, **kw) or {})
    synth.run_synthetic(tiny_zoo["safety"], "safety", {"math": tiny_zoo["math"]}, {"math": tmp_path / "c.jsonl"},
                        tmp_path / "out", zoo_world=TOY, alignment_size=5, seed=3)
    assert isinstance(seen.pop("generator"), ToyGenerator)  # generator: zoo, the schema default
    assert seen.pop("categories") == sorted(HARMFUL_ACTIONS) and seen.pop("trust_remote_code") is False
    assert seen["alignment_size"] == 5 and seen["seed"] == 3 and not set(synth.GENERATOR_KEYS) & set(seen)


def test_domain_requests_show_exemplars_from_calibration():
    import random

    requests = synth.build_requests(["a", "b"], {"math": ["q1", "q2", "q3", "q4"]}, 3, 2, 2, random.Random(0))
    assert [r.topic for r in requests] == ["a", "b", "a", "math", "math"]
    shown = [line for line in requests[3].text.splitlines() if line.startswith("- ")]
    assert len(shown) == 2 and all(line[2:] in {"q1", "q2", "q3", "q4"} for line in shown)
    assert '"a"' in requests[0].text and "JSON" in requests[0].text


# ---------------------------------------------------------------------------------------------- real tokenizers

def always_says(model_dir, token: str) -> int:
    """Rewrite the tiny model at `model_dir` so that greedy decoding emits `token` at every step (the
    residual stream is the input embedding, the same for every token, and only `token`'s row of the
    LM head is non-zero). Returns its id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    token_id = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(token)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = 1.0
    model.save_pretrained(model_dir)
    return token_id


def test_generation_without_pad_token_or_chat_template(tiny_zoo, tmp_path, caplog):
    """A Llama/Mistral base: no pad token (pads with EOS, left), no chat template (plain prompt, warned)."""
    from test_data_aware import strip_tokenizer

    model_dir = strip_tokenizer(tiny_zoo["base"], tmp_path / "base", template=False)
    always_says(model_dir, "sure")
    with caplog.at_level("WARNING", logger="ledmerge.synthetic_data"):
        model, tok = synth.load_causal_lm(model_dir)
    assert "has no chat template" in caplog.text
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    assert synth.stop_ids(model, tok) == [tok.eos_token_id]
    replies = synth.chat_generate(model, tok, ["how do i make a bomb", "what is 3 + 4 the answer is"],
                                  max_new_tokens=3, batch_size=2)
    assert replies == ["sure sure sure"] * 2  # the shorter prompt, left-padded, generates the same


def test_replies_stop_at_the_chat_templates_end_of_turn_token(tmp_path):
    """Regression: a chat model whose template ends a turn with a token its generation config does not
    list as EOS (OpenBioLLM-8B's `<|eot_id|>` with the base's `<|end_of_text|>`) ran on to max_new_tokens,
    and every reply carried the turn end and whatever followed."""
    from conftest import make_tiny_model
    from transformers import AutoTokenizer

    from ledmerge.zoo.word_tokenizer import ASSISTANT, EOS, USER

    model_dir = make_tiny_model(tmp_path / "chat", extra_tokens=1)  # token 45, <extra_0>: the turn end
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}" + USER + " {{ m['content'] }} "
        "{% else %}" + ASSISTANT + " {{ m['content'] }} <extra_0> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}")
    tok.save_pretrained(model_dir)
    end = always_says(model_dir, "<extra_0>")
    model, tok = synth.load_causal_lm(model_dir)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(EOS) != end
    # stops at once
    assert synth.chat_generate(model, tok, ["how do i make a bomb"], max_new_tokens=4, batch_size=1) == [""]
    assert synth.turn_end_id(tok) == end
    assert synth.stop_ids(model, tok) == [tok.eos_token_id, end]
