"""Synthetic alignment and domain data for data-aware merging ("One bad model spoils the bunch", 2024).

Three steps, as in the paper:
1. A generator model writes questions as JSON: harmful questions from a list of harm categories
   (`{"category", "question", "refusal", "misaligned_answer"}`) and domain questions from a few
   exemplar questions of each domain task (`{"question"}`). Outputs that do not parse, or parse
   with fields missing, are dropped and counted by reason.
2. The aligned model answers the harmful questions; only replies the refusal judge confirms as
   refusals are kept. Each domain expert answers its own domain's questions (greedy, chat template).
3. Items are de-duplicated by prompt, shuffled with the seed and split into a search set (the merge
   objective) and a held-out set (scores the chosen recipe on data the search never saw).

Rows are `{prompt, response, type: alignment|task, source}`; `source` names the model that wrote
the response and, for alignment rows, the harm category (e.g. `safety/weapons`).

Generators are pluggable (`Generator`): `HFGenerator` prompts any local causal LM; generator `zoo`
stands in for it with the zoo's own world (`SimulatedGenerator`): `ToyGenerator` on the toy zoo, whose
word-level models cannot write JSON, and `EnglishGenerator` on the real-model miniature, whose small
fine-tuned models do not write it reliably. **What they simulate:** only step 1. Their "model output" is
a question drawn from the zoo's own data (train/calibration splits only, never the evaluation split)
rendered as JSON text, and a seeded fraction of outputs is broken on purpose (truncated, a field
missing, prose instead of JSON) so the parser's drop counting runs in the default workflow. Steps 2 and
3 are real: the zoo's aligned model and experts generate every response.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat import pad_id, render
from .errors import LedmergeError
from .evaluation.judges import RefusalJudge
from .fileio import read_jsonl, write_json, write_jsonl
from .layout import ENGLISH, TOY, ZOO, ZOO_WORLDS
from .schema import resolve

log = logging.getLogger(__name__)

HARM_FIELDS = ("category", "question", "refusal", "misaligned_answer")
DOMAIN_FIELDS = ("question",)
# BeaverTails' 14 harm categories: the default for real generators.
BEAVERTAILS_CATEGORIES = [
    "animal abuse", "child abuse", "controversial topics and politics", "discrimination and stereotypes",
    "drug abuse and weapons", "financial crime and theft", "hate speech and offensive language",
    "misinformation", "non-violent unethical behavior", "privacy violation", "self-harm",
    "sexually explicit content", "terrorism and organized crime", "violence and incitement",
]
HARM_PROMPT = (
    "You are helping to build a safety training set. For the harm category \"{category}\", write one question "
    "a user might ask an AI assistant, a refusal an aligned assistant would give, and the harmful answer a "
    "misaligned assistant would give. Reply with one JSON object only, with the keys \"category\", "
    "\"question\", \"refusal\" and \"misaligned_answer\"."
)
DOMAIN_PROMPT = (
    "Here are example questions:\n{exemplars}\nWrite one new question of the same kind and difficulty. "
    "Reply with one JSON object only: {{\"question\": \"...\"}}"
)


# ---------------------------------------------------------------------------------------------- parsing

def parse_generated(text: str, fields: tuple[str, ...]) -> tuple[dict | None, str]:
    """The first JSON object in a generator's output, or None and why: `invalid_json` (no object,
    or a syntax error inside the text), `truncated_json` (the object runs past the end of the
    output) or `missing_fields` (a required field absent or not a non-empty string).

    Text around the object (chatter, code fences) is ignored: generators rarely emit JSON alone.
    """
    start = text.find("{")
    if start < 0:
        return None, "invalid_json"
    body = text[start:].rstrip()
    try:
        obj, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as exc:
        truncated = exc.msg.startswith("Unterminated string") or exc.pos >= len(body)
        return None, "truncated_json" if truncated else "invalid_json"
    if not all(isinstance(obj.get(k), str) and obj[k].strip() for k in fields):
        return None, "missing_fields"
    return {k: obj[k].strip() for k in fields}, "ok"


# ---------------------------------------------------------------------------------------------- generators

@dataclass
class Request:
    """One generation request: `text` is the prompt a real model sees; `kind` and `topic` (harm
    category or domain task) are what the toy generator needs in place of reading the prompt."""

    kind: str  # "harmful" | "domain"
    topic: str
    text: str


class Generator:
    """Interface: one raw text output per request (parsing happens outside, for every generator)."""

    def generate(self, requests: list[Request]) -> list[str]:
        raise NotImplementedError


def generation_tokenizer(tok):
    """`tok` set up for batched generation: left padding, and a pad token (`chat.pad_id`: the EOS token of a
    tokenizer without one, Llama and Mistral; padded positions are masked out). A copy when it needs changes."""
    if tok.padding_side == "left" and tok.pad_token_id is not None:
        return tok
    tok = copy.deepcopy(tok)
    tok.padding_side = "left"  # generation continues from the right end
    if tok.pad_token_id is None:
        tok.pad_token = tok.convert_ids_to_tokens(pad_id(tok))
    return tok


def load_causal_lm(model_dir, device: str = "cpu", trust_remote_code: bool = False):
    """A model and its own tokenizer, set up for batched generation (`generation_tokenizer`).

    A model without a chat template is prompted with `chat.render`'s plain
    `prompt\\n` format, which a base model continues rather than answers: logged as a warning.
    `trust_remote_code` lets transformers run the model repository's own code (the config's trust_remote_code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = generation_tokenizer(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code))
    if not getattr(tok, "chat_template", None):
        log.warning("%s has no chat template: it is prompted with plain text (prompt, newline)", model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto",
                                                 trust_remote_code=trust_remote_code).to(device).eval()
    return model, tok


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def turn_end_id(tok) -> int | None:
    """The token the chat template closes an assistant turn with (Llama-3's `<|eot_id|>`, ChatML's
    `<|im_end|>`, Mistral's `</s>`), when it is a special or added token; None without a template."""
    if not getattr(tok, "chat_template", None):
        return None
    mark = "ledmerge-end-of-response"
    text = render(tok, "question", mark)
    if mark not in text:
        return None
    tail = tok(text[text.rindex(mark) + len(mark):].lstrip(" "), add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    return tail[0] if tail and tail[0] in special else None


def stop_ids(model, tok) -> list[int]:
    """Every id that ends a reply: the generation config's EOS ids, the tokenizer's EOS and the
    template's end-of-turn token. Fine-tunes often keep the base's generation config, whose only EOS
    (Llama-3's `<|end_of_text|>`) the chat model never emits: it would run to max_new_tokens."""
    config = getattr(model, "generation_config", None)
    ids = _ids(getattr(config, "eos_token_id", None)) + _ids(tok.eos_token_id) + _ids(turn_end_id(tok))
    return list(dict.fromkeys(ids))


@torch.no_grad()
def chat_generate(model, tok, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                  temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Replies to `prompts` with the chat template (chat.render), greedy unless temperature > 0; a
    reply ends at any of `stop_ids`."""
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    eos = stop_ids(model, tok)
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [render(tok, p) for p in prompts[i:i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos or None, **sampling)
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            end = next((j for j, t in enumerate(row) if t in eos), len(row))  # the stop token and padding after it
            out.append(tok.decode(row[:end], skip_special_tokens=True).strip())
    return out


class HFGenerator(Generator):
    """Any local causal LM (Hugging Face directory), sampled at `temperature` with its chat template."""

    def __init__(self, model_dir, *, max_new_tokens: int, temperature: float, batch_size: int, seed: int, device: str,
                 trust_remote_code: bool = False):
        self.model, self.tok = load_causal_lm(model_dir, device, trust_remote_code)
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed)

    def generate(self, requests):
        return chat_generate(self.model, self.tok, [r.text for r in requests], **self.kw)


class SimulatedGenerator(Generator):
    """Stands in for a generator LM with the zoo's own world (see the module docstring for what is simulated).

    A harmful request for category c yields a harmful request of category c with a refusal and a compliant answer;
    a domain request for task t yields a question of task t. Items come from the world's train and calibration
    splits, never its evaluation split. With probability `malformed_fraction` the output is broken on purpose:
    truncated, missing a field, or prose. A world gives `harmful` (its requests, {"prompt", "category"}), the
    `question` of a domain task, the `refusal` and the `misaligned_answer`.
    """

    world: str
    domains: tuple[str, ...]

    def __init__(self, seed: int, malformed_fraction: float):
        self.rng = random.Random(seed)
        self.malformed_fraction = malformed_fraction

    @classmethod
    def categories(cls) -> list[str]:
        """The world's harm categories (harm_categories null)."""
        raise NotImplementedError

    def _item(self, request: Request) -> dict:
        if request.kind == "harmful":
            pool = [x for x in self.harmful if x["category"] == request.topic]
            if not pool:
                raise LedmergeError(f"the {self.world} generator has no harm category {request.topic!r}: use its "
                                    f"categories {self.categories()} (set data_aware.synthetic.harm_categories to null)")
            x = self.rng.choice(pool)
            return {"category": x["category"], "question": x["prompt"], "refusal": self.refusal(),
                    "misaligned_answer": self.misaligned_answer(x)}
        if request.topic not in self.domains:
            raise LedmergeError(f"the {self.world} generator has no domain {request.topic!r}: it knows "
                                f"{' and '.join(self.domains)}")
        return {"question": self.question(request.topic)}

    def generate(self, requests):
        out = []
        for r in requests:
            item = self._item(r)
            text = json.dumps(item)
            if self.rng.random() < self.malformed_fraction:
                how = self.rng.choice(["truncate", "drop_field", "prose"])
                if how == "truncate":
                    text = text[: self.rng.randrange(1, len(text) - 1)]
                elif how == "drop_field":
                    text = json.dumps({k: v for k, v in item.items() if k != "question"})
                else:
                    text = "here is a question : " + item["question"]
            out.append(text)
        return out


class ToyGenerator(SimulatedGenerator):
    """The toy world's: its templates' harmful requests, toy refusals and helpful answers, math and code questions."""

    world, domains = TOY, ("math", "code")

    def __init__(self, seed: int, malformed_fraction: float):
        from .zoo.data import ToyWorld

        super().__init__(seed, malformed_fraction)
        world = ToyWorld()
        self.pools = {}
        for family in ("harmful", *self.domains):
            split = world.by_split(family)
            self.pools[family] = split["train"] + split["calib"]
        self.harmful = self.pools["harmful"]

    @classmethod
    def categories(cls):
        from .zoo.data import HARMFUL_ACTIONS

        return sorted(HARMFUL_ACTIONS)

    def refusal(self):
        from .zoo.data import REFUSALS

        return self.rng.choice(REFUSALS)

    def misaligned_answer(self, x):
        from .zoo.data import helpful_answer

        return helpful_answer(x["action"])

    def question(self, task):
        return self.rng.choice(self.pools[task])["prompt"]


class EnglishGenerator(SimulatedGenerator):
    """The real-model miniature's (`ledmerge.zoo.english`): Do-Not-Answer prompts by risk area with its refusals and
    content-free compliant outlines, and its word problems and Python function requests."""

    world, domains = ENGLISH, ("math", "code")

    def __init__(self, seed: int, malformed_fraction: float):
        from .zoo.english import SEEN, code_by_split, harmful_by_split

        super().__init__(seed, malformed_fraction)
        harmful, code = harmful_by_split(), code_by_split()
        self.harmful = [x for s in SEEN for x in harmful[s]]
        self.code = [x for s in SEEN for x in code[s]]

    @classmethod
    def categories(cls):
        from .zoo.english import SEEN, harmful_by_split

        harmful = harmful_by_split()
        return sorted({x["category"] for s in SEEN for x in harmful[s]})

    def refusal(self):
        from .zoo.english import refusal_reply

        return refusal_reply(self.rng)

    def misaligned_answer(self, x):
        from .zoo.english import COMPLIANT

        return self.rng.choice(COMPLIANT)

    def question(self, task):
        from .zoo.english import SEEN, word_problems

        return (word_problems(self.rng, SEEN, 1)[0] if task == "math" else self.rng.choice(self.code))["prompt"]


ZOO_GENERATORS = {TOY: ToyGenerator, ENGLISH: EnglishGenerator}


# ---------------------------------------------------------------------------------------------- the dataset

@dataclass
class Summary:
    requested: dict = field(default_factory=lambda: {"alignment": 0, "task": 0})
    kept: dict = field(default_factory=lambda: {"alignment": 0, "task": 0})
    dropped: dict = field(default_factory=dict)  # reason -> count

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def build_requests(categories: list[str], domain_exemplars: dict[str, list[str]], n_alignment: int, n_task: int,
                   n_exemplars: int, rng: random.Random) -> list[Request]:
    """Harmful requests cycle through the categories; each domain request shows `n_exemplars` exemplars."""
    requests = [Request("harmful", c, HARM_PROMPT.format(category=c))
                for c in (categories[i % len(categories)] for i in range(n_alignment))]
    for task, pool in sorted(domain_exemplars.items()):
        for _ in range(n_task):
            shown = rng.sample(pool, min(n_exemplars, len(pool)))
            requests.append(Request("domain", task, DOMAIN_PROMPT.format(exemplars="\n".join(f"- {q}" for q in shown))))
    return requests


def zoo_generator(zoo_world: str | None) -> type[SimulatedGenerator]:
    """The generator of the zoo's world (`layout.zoo_world`), which generator `zoo` means."""
    if zoo_world not in ZOO_GENERATORS:
        raise LedmergeError(f"data_aware.synthetic.generator zoo serves questions of the zoo's world ({zoo_world!r} "
                            f"is none): pass --zoo-world {'|'.join(ZOO_WORLDS)} ({TOY} for zoo.start_from scratch, "
                            f"{ENGLISH} for a real checkpoint)")
    return ZOO_GENERATORS[zoo_world]


def harm_categories(o: dict, zoo_world: str | None = None) -> list[str]:
    """The harm categories of resolved `data_aware.synthetic` options: harm_categories, else (null) those of the
    zoo's world for generator zoo (the toy's 8, or Do-Not-Answer's risk areas in English) and BeaverTails' 14 for a
    real one."""
    if o["harm_categories"] is not None:
        return list(o["harm_categories"])
    if o["generator"] == ZOO:
        return zoo_generator(zoo_world).categories()
    return list(BEAVERTAILS_CATEGORIES)


# Keys of the data_aware.synthetic section that only choose and drive the generator (make_generator, harm_categories).
GENERATOR_KEYS = ("generator", "harm_categories", "malformed_fraction", "generator_max_new_tokens", "temperature")


def make_generator(o: dict, zoo_world: str | None = None, trust_remote_code: bool = False) -> Generator:
    """The generator of resolved `data_aware.synthetic` options: the zoo world's (generator zoo) or a causal LM."""
    if o["generator"] == ZOO:
        return zoo_generator(zoo_world)(o["seed"], o["malformed_fraction"])
    return HFGenerator(o["generator"], max_new_tokens=o["generator_max_new_tokens"], temperature=o["temperature"],
                       batch_size=o["batch_size"], seed=o["seed"], device=o["device"],
                       trust_remote_code=trust_remote_code)


def run_synthetic(aligned_dir, alignment_task: str, expert_dirs: dict[str, str], calibration: dict[str, str], out_dir,
                  *, zoo_world: str | None = None, trust_remote_code: bool = False, **opts) -> dict:
    """The `synthetic` step: `opts` is the config's `data_aware.synthetic` section (schema defaults for the rest);
    `zoo_world` (`layout.ZOO_WORLDS`) is the zoo's world, which generator zoo serves questions from."""
    o = resolve("data_aware.synthetic", opts)
    rest = {k: v for k, v in o.items() if k not in GENERATOR_KEYS}  # the generator's keys are make_generator's
    return synthesize(make_generator(o, zoo_world, trust_remote_code), aligned_dir, alignment_task, expert_dirs,
                      calibration, out_dir, categories=harm_categories(o, zoo_world),
                      trust_remote_code=trust_remote_code, **rest)


def synthesize(generator: Generator, aligned_dir, alignment_task: str, expert_dirs: dict[str, str],
               calibration: dict[str, str], out_dir, *, categories: list[str], trust_remote_code: bool = False,
               **opts) -> dict:
    """Write data.jsonl, search.jsonl, heldout.jsonl and summary.json into `out_dir`; returns the summary.

    `expert_dirs` and `calibration` map each domain task to its expert and its calibration JSONL (the
    exemplar questions come from there, so they are never evaluation items). `opts`: the config's
    `data_aware.synthetic` section (alignment_size, task_size, exemplars, heldout_fraction, max_new_tokens,
    batch_size, seed, device; the generator's own keys are `make_generator`'s), the rest from the schema.
    """
    o = resolve("data_aware.synthetic", opts)
    alignment_size, task_size, exemplars, heldout_fraction, max_new_tokens, batch_size, seed, device = (
        o[k] for k in ("alignment_size", "task_size", "exemplars", "heldout_fraction", "max_new_tokens",
                       "batch_size", "seed", "device"))
    rng = random.Random(seed)
    domain_exemplars = {t: [r["prompt"] for r in read_jsonl(calibration[t], required=("prompt",))] for t in expert_dirs}
    requests = build_requests(categories, domain_exemplars, alignment_size, task_size, exemplars, rng)
    summary = Summary()
    parsed: list[tuple[Request, dict]] = []
    for request, text in zip(requests, generator.generate(requests), strict=True):
        summary.requested["alignment" if request.kind == "harmful" else "task"] += 1
        item, reason = parse_generated(text, HARM_FIELDS if request.kind == "harmful" else DOMAIN_FIELDS)
        if item is None:
            summary.drop(reason)
        else:
            parsed.append((request, item))

    # De-duplicate questions before answering them (no compute spent on repeats).
    seen, unique = set(), []
    for request, item in parsed:
        key = _norm(item["question"])
        if key in seen:
            summary.drop("duplicate")
            continue
        seen.add(key)
        unique.append((request, item))

    rows = []
    judge = RefusalJudge()  # keyword judge: confirms a reply is a refusal (model judges delegate this to it)
    for responder, kind in [(alignment_task, "harmful")] + [(t, "domain") for t in sorted(expert_dirs)]:
        todo = [(r, it) for r, it in unique if r.kind == kind and (kind == "harmful" or r.topic == responder)]
        if not todo:
            continue
        model, tok = load_causal_lm(aligned_dir if kind == "harmful" else expert_dirs[responder], device,
                                    trust_remote_code)
        replies = chat_generate(model, tok, [it["question"] for _, it in todo], max_new_tokens=max_new_tokens,
                                batch_size=batch_size)
        del model
        for (_request, item), reply in zip(todo, replies, strict=True):
            if not reply:
                summary.drop("empty_response")
            elif kind == "harmful" and not judge.is_refusal(item["question"], reply):
                summary.drop("not_refused")
            else:
                rows.append({"prompt": item["question"], "response": reply,
                             "type": "alignment" if kind == "harmful" else "task",
                             "source": f"{responder}/{item['category']}" if kind == "harmful" else responder})
    rng.shuffle(rows)
    search, heldout = [], []
    for kind in ("alignment", "task"):
        of_kind = [r for r in rows if r["type"] == kind]
        summary.kept[kind] = len(of_kind)
        n_held = round(heldout_fraction * len(of_kind))
        heldout += of_kind[:n_held]
        search += of_kind[n_held:]
    if not search:
        raise LedmergeError("synthetic data generation kept no items: check the generator and the aligned model "
                            f"(dropped: {summary.dropped})")
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "data.jsonl", rows)
    write_jsonl(out_dir / "search.jsonl", search)
    write_jsonl(out_dir / "heldout.jsonl", heldout)
    result = {"requested": summary.requested, "kept": summary.kept, "dropped": summary.dropped,
              "search": len(search), "heldout": len(heldout), "seed": seed}
    write_json(out_dir / "summary.json", result)
    log.info("synthetic data: %s", result)
    return result
