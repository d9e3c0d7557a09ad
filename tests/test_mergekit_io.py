"""mergekit configurations in and out (`ledmerge.merge.mergekit_io`): export → import gives the spec back, what
cannot be honoured is refused with one line naming the mergekit key, and the translation table covers every
parameter of the methods it lists. (tests/test_merge_mergekit.py runs mergekit itself on an exported file.)"""

from __future__ import annotations

import copy

import pytest
import yaml
from test_config import base_config, with_models

from ledmerge.config import check, validate
from ledmerge.errors import LedmergeError
from ledmerge.merge import METHODS, get_method
from ledmerge.merge.mergekit_io import EQUIVALENTS, FILE_NAME, to_mergekit
from ledmerge.specs import merge_spec

TASKS = ("code", "math", "safety")


def export(spec: dict, zoo, out_dtype="float32") -> str:
    return to_mergekit(get_method(spec), zoo["base"], {t: zoo[t] for t in TASKS}, out_dtype)


def imported(tmp_path, zoo, text: str, **entry) -> dict:
    """The spec a config with merge {x: {mergekit: <file holding text>, **entry}} runs (validated as
    check-config does)."""
    path = tmp_path / FILE_NAME
    path.write_text(text)
    cfg = with_models(base_config(tmp_path), zoo)
    cfg["merges"] = {"x": {"mergekit": str(path), **entry}}
    validate(cfg)
    return merge_spec(cfg, "x")


@pytest.mark.parametrize("spec, seed", [
    ({"method": "task_arithmetic", "scale": 0.8, "weights": {"math": 0.5, "code": 2.0}}, None),
    ({"method": "ties", "density": 0.3, "scale": 0.7}, None),
    ({"method": "ties", "density": {"code": 0.3, "math": 0.5, "safety": 0.7}, "weights": {"safety": 0.25}}, None),
    ({"method": "dare_linear", "drop": 0.3, "seed": 3, "scale": 1.5}, 3),
    ({"method": "dare_ties", "drop": 0.9, "rescale": False, "weights": {"math": 3.0}}, 0),
    ({"method": "linear", "weights": {"math": 0.5}, "normalize": False}, None),
    ({"method": "breadcrumbs", "density": 0.7, "gamma": 0.05, "rescale": True}, None),
    ({"method": "breadcrumbs_ties", "density": 0.5, "weights": {"code": 2.0}}, None),
    ({"method": "della", "density": 0.4, "epsilon": 0.1, "seed": 2}, 2),
    ({"method": "della_linear", "density": {"code": 0.3, "math": 0.5, "safety": 0.7}, "rescale": False}, 0),
], ids=["task_arithmetic", "ties", "ties-per-task", "dare_linear", "dare_ties", "linear", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear"])
def test_export_then_import_gives_the_same_spec(tmp_path, tiny_zoo, spec, seed):
    text = export(spec, tiny_zoo)
    got = imported(tmp_path, tiny_zoo, text, **({"seed": seed} if seed is not None else {}))
    assert get_method(got).recipe() == get_method(spec).recipe()
    assert get_method(got).recipe() != get_method({"method": spec["method"]}).recipe()  # not just the defaults


def test_slerp_round_trip_lists_the_base_among_the_models(tmp_path, tiny_zoo):
    """mergekit's slerp takes the base and the one expert as its two inputs."""
    text = to_mergekit(get_method({"method": "slerp", "t": 0.3}), tiny_zoo["base"], {"math": tiny_zoo["math"]}, None)
    assert [m["model"] for m in yaml.safe_load(text)["models"]] == [str(tiny_zoo["base"]), str(tiny_zoo["math"])]
    path = tmp_path / FILE_NAME
    path.write_text(text)
    cfg = with_models(base_config(tmp_path), tiny_zoo)
    cfg["tasks"] = {"math": cfg["tasks"]["math"]}
    cfg["merges"] = {"x": {"mergekit": str(path)}}
    validate(cfg)
    assert merge_spec(cfg, "x") == {"method": "slerp", "t": 0.3}


def test_post_steps_have_no_mergekit_equivalent(tiny_zoo):
    assert export({"method": "ties", "density": 0.5, "resta": {"gamma": 0.5, "aligned": "safety"}}, tiny_zoo) is None


def test_exported_file_says_what_differs(tiny_zoo):
    text = export({"method": "ties", "density": 0.5}, tiny_zoo)
    comments = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert "int(density*n)" in comments and "+ sign" in comments
    doc = yaml.safe_load(text)
    assert doc["parameters"] == {"lambda": 1.0, "normalize": True, "rescale": False}
    assert [m["parameters"]["density"] for m in doc["models"]] == [0.5] * 3
    assert "out_dtype" not in doc and "out_dtype" in yaml.safe_load(export({"method": "ties"}, tiny_zoo, "bfloat16"))


def test_led_has_no_mergekit_equivalent_and_its_card_says_so(tiny_zoo):
    from ledmerge.merge.card import model_card

    assert export({"method": "led"}, tiny_zoo) is None
    card = model_card(get_method({"method": "led"}), tiny_zoo["base"], {}, {}, None)
    assert "No mergekit configuration: mergekit has no `led` method." in card


def test_experts_aligned_to_the_base_vocabulary_get_no_mergekit_file(tiny_zoo, tmp_path):
    from conftest import make_tiny_model

    from ledmerge.merge import merge_models

    wide = make_tiny_model(tmp_path / "wide", seed=5, extra_tokens=3)
    merge_models(tiny_zoo["base"], {"math": tiny_zoo["math"], "code": wide}, {"method": "task_arithmetic"},
                 tmp_path / "m", vocab_policy="base")
    assert not (tmp_path / "m" / FILE_NAME).exists()
    assert "vocabularies were aligned to the base's rows by index" in (tmp_path / "m" / "README.md").read_text()


def test_the_table_covers_every_parameter_of_its_methods():
    """A parameter added to a shared method without a translation would be exported as its default: refuse."""
    for name, eq in EQUIVALENTS.items():
        params = {p.name for p in METHODS[name].PARAMS} - {"seed"}  # the seed is the import's own key
        assert {k.ours for k in eq.keys if k.ours} == params, name


def test_check_config_runs_the_imported_spec(tmp_path, tiny_zoo):
    path = tmp_path / "linear.yml"
    path.write_text(export({"method": "linear", "weights": {"math": 2.0}}, tiny_zoo))
    cfg = with_models(base_config(tmp_path), tiny_zoo)
    cfg["merges"] = {"linear_mk": {"mergekit": str(path)}}
    cfg["sweeps"] = {}  # the default sweep varies led
    validate(cfg)
    check(cfg)
    doc = yaml.safe_load(path.read_text())
    doc["models"][0]["parameters"]["weight"] = -3.0  # the weights now sum to 0: the task-level check refuses it
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(LedmergeError, match=r"^config error at 'merges.linear_mk': merge method 'linear': the weights "
                                            r"sum to 0"):
        check(cfg)


def _set(*keys, value):
    def change(doc):
        node = doc
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return change


def _drop(*keys):
    def change(doc):
        node = doc
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return change


TIES = {"method": "ties", "density": 0.5}
# (id, spec exported, change to the mergekit document, the mergekit key the one line names)
REFUSED = [
    ("unknown-method", TIES, _set("merge_method", value="model_stock"), "'merge_method'"),
    ("slices", TIES, _set("slices", value=[]), "'slices'"),
    ("tokenizer-source", TIES, _set("tokenizer_source", value="union"), "'tokenizer_source'"),
    ("chat-template", TIES, _set("chat_template", value="chatml"), "'chat_template'"),
    ("unknown-top-level", TIES, _set("merge_options", value={}), "'merge_options'"),
    ("gradient", TIES, _set("parameters", "density", value=[0.2, 0.8]), "'parameters.density'"),
    ("filter", TIES, _set("models", 1, "parameters", "weight", value=[{"filter": "mlp", "value": 2.0}]),
     "'models[1].parameters.weight'"),
    ("unknown-parameter", TIES, _set("parameters", "gamma", value=0.01), "'parameters.gamma'"),
    ("other-model", TIES, _set("models", 1, "model", value="org/other-model"), "'models[1].model'"),
    ("base-among-models-with-parameters", TIES,
     lambda d: d["models"].append({"model": d["base_model"], "parameters": {"weight": 1.0}}), "'models[3].model'"),
    ("base-among-linear-models", {"method": "linear"},
     lambda d: d["models"].append({"model": d["models"][0]["model"].replace("code", "base")}), "'models[3].model'"),
    ("task-twice", TIES, lambda d: d["models"].append(copy.deepcopy(d["models"][0])), "'models[3].model'"),
    ("task-missing", TIES, lambda d: d["models"].pop(), "'models'"),
    ("other-base", TIES, _set("base_model", value="org/other-base"), "'base_model'"),
    ("no-base", TIES, _drop("base_model"), "'base_model'"),
    ("lora", TIES, _set("models", 0, "model", value={"model": {"path": "x"}, "lora": {"path": "y"}}),
     "'models[0].model'"),
    ("dtype", TIES, _set("dtype", value="bfloat16"), "'dtype'"),
    ("out-dtype", TIES, _set("out_dtype", value="bfloat16"), "'out_dtype'"),
    ("ties-rescaled", TIES, _set("parameters", "rescale", value=True), "'parameters.rescale'"),
    ("task-arithmetic-normalised", {"method": "task_arithmetic"}, _set("parameters", "normalize", value=True),
     "'parameters.normalize'"),
]


@pytest.mark.parametrize("spec, change, key", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_what_cannot_be_honoured_is_refused_naming_the_key(tmp_path, tiny_zoo, spec, change, key):
    doc = yaml.safe_load(export(spec, tiny_zoo))
    change(doc)
    with pytest.raises(LedmergeError) as info:
        imported(tmp_path, tiny_zoo, yaml.safe_dump(doc))
    message = str(info.value)
    assert f"mergekit key {key}" in message, message
    assert "\n" not in message, message


def test_the_base_may_be_listed_among_the_models_without_parameters(tmp_path, tiny_zoo):
    """mergekit's usual way of writing a TIES or DARE config: the base once more in `models`, where it is the base."""
    doc = yaml.safe_load(export(TIES, tiny_zoo))
    doc["models"].insert(0, {"model": doc["base_model"]})
    assert imported(tmp_path, tiny_zoo, yaml.safe_dump(doc)) == {**TIES, "scale": 1.0, "normalize": True}


@pytest.mark.parametrize("method, change, normalize", [
    ("ties", _set("parameters", "normalize", value=False), False),
    ("dare_ties", _drop("parameters", "normalize"), False),  # mergekit's default for dare_ties
    ("della", _drop("parameters", "normalize"), True),  # and for della
    ("breadcrumbs_ties", _set("parameters", "normalize", value=False), False),
])
def test_the_ties_consensus_takes_normalize_from_the_file(tmp_path, tiny_zoo, method, change, normalize):
    """TIES' normalize (divide by the agreeing weights, or their plain sum) is a parameter of our TIES consensus: a
    file's value, or mergekit's default for its method, is imported; and exported as it is."""
    doc = yaml.safe_load(export({"method": method, "normalize": not normalize}, tiny_zoo))
    assert doc["parameters"]["normalize"] is (not normalize)
    change(doc)
    assert imported(tmp_path, tiny_zoo, yaml.safe_dump(doc))["normalize"] is normalize


def test_bad_values_are_refused_with_the_mergekit_names(tmp_path, tiny_zoo):
    doc = yaml.safe_load(export({"method": "dare_ties"}, tiny_zoo))
    doc["models"][0]["parameters"]["density"] = 0.0  # drop 1: nothing kept
    with pytest.raises(LedmergeError, match=r"drop\[code\] must be .* drop = 1 - density"):
        imported(tmp_path, tiny_zoo, yaml.safe_dump(doc))


def test_seed_for_a_method_without_random_draws_is_refused(tmp_path, tiny_zoo):
    with pytest.raises(LedmergeError, match="seed is given but ties draws no random numbers"):
        imported(tmp_path, tiny_zoo, export(TIES, tiny_zoo), seed=1)


def test_relative_paths_and_hub_ids_map_to_the_config_models(tmp_path, tiny_zoo, monkeypatch):
    """The documented rule: a path resolving to the model's directory (relative: to the working directory), or the
    hub id of a {hub: org/name} model."""
    doc = yaml.safe_load(export(TIES, tiny_zoo))
    monkeypatch.chdir(tiny_zoo["base"].parent)
    doc["base_model"] = "./base"
    doc["models"][0]["model"] = "math/../code"
    assert imported(tmp_path, tiny_zoo, yaml.safe_dump(doc)) == {**TIES, "scale": 1.0, "normalize": True}
    cfg = with_models(base_config(tmp_path), tiny_zoo)
    cfg["tasks"]["code"]["model"] = {"hub": "org/coder"}
    doc["models"][0]["model"] = "org/coder"
    (tmp_path / "hub.yml").write_text(yaml.safe_dump(doc))
    cfg["merges"] = {"x": {"mergekit": str(tmp_path / "hub.yml")}}
    validate(cfg)
    assert merge_spec(cfg, "x")["density"] == 0.5
