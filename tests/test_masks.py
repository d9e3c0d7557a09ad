"""Election and Disjoint on hand-made tensors, the file-level steps, and the score and mask file readers (one open per file)."""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch

from ledmerge.errors import LedmergeError
from ledmerge.led.election import disjoint, disjoint_files, elect, elect_files, layer_and_module, mask_stats
from ledmerge.led.files import (
    MaskFile,
    PackedMask,
    ScoreFile,
    load_masks,
    load_scores,
    pack_bits,
    save_masks,
    save_scores,
    save_tensors,
    tensors_metadata,
    unpack_bits,
)
from ledmerge.topk import top_k_count, top_r_mask

B = lambda *xs: torch.tensor(xs, dtype=torch.bool)


# ---- TopR ----

def test_top_r_keeps_the_largest_not_the_smallest():
    s = torch.tensor([0.5, -2.0, 9.0, 3.0, 1.0, 7.0])
    assert top_r_mask(s, 0.5).tolist() == [False, False, True, True, False, True]


def test_top_r_count_is_ceil_and_exact():
    s = torch.arange(10.0)
    for rate, k in [(0.1, 1), (0.15, 2), (0.25, 3), (0.99, 10), (1e-9, 1)]:
        assert int(top_r_mask(s, rate).sum()) == k, rate
    # rate*n is 7.000000000000001 in floats: still exactly 7, not 8
    assert top_k_count(100, 0.07) == 7
    assert int(top_r_mask(torch.arange(100.0), 0.07).sum()) == 7


def test_top_r_ties_are_broken_by_lowest_index():
    s = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 2.0])
    assert top_r_mask(s, 0.3).tolist() == [False, True, True, False, False, False]  # k = 2 of three 3.0s
    assert top_r_mask(s, 0.5).tolist() == [False, True, True, False, True, False]   # all three 3.0s
    assert top_r_mask(s, 0.6).tolist() == [False, True, True, False, True, True]    # k = 4: 3,3,3,2


def test_top_r_all_zero_scores_elect_k_not_everything():
    m = top_r_mask(torch.zeros(4, 5), 0.1)
    assert m.shape == (4, 5) and m.dtype == torch.bool
    assert int(m.sum()) == 2 and m.view(-1)[:2].all()
    # a mostly-zero tensor (sparse embedding gradients): nonzeros first, then zeros by index
    s = torch.zeros(10)
    s[7] = 1.0
    assert top_r_mask(s, 0.3).nonzero().view(-1).tolist() == [0, 1, 7]


def test_top_r_is_per_tensor_shape_preserving_and_deterministic():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 3, (7, 9), generator=g).float()  # many ties
    a, b = top_r_mask(s, 0.4), top_r_mask(s.clone(), 0.4)
    assert torch.equal(a, b) and a.shape == s.shape and int(a.sum()) == 26  # ceil(0.4 * 63)
    assert s[a].min() >= s[~a].max()


def test_rate_one_keeps_all_and_bad_rates_fail():
    assert top_r_mask(torch.zeros(5), 1.0).all()
    assert top_r_mask(torch.tensor([1.0, float("nan")]), 1.0).all()
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), "0.1", None, True):
        with pytest.raises(LedmergeError):
            top_r_mask(torch.ones(4), bad)
    with pytest.raises(LedmergeError, match="NaN"):
        top_r_mask(torch.tensor([1.0, float("nan"), 0.0]), 0.5)


# ---- Election ----

EXPERT = {"w": torch.tensor([4.0, 3.0, 2.0, 1.0])}   # top-50%: {0, 1}
BASE = {"w": torch.tensor([1.0, 4.0, 3.0, 2.0])}     # top-50%: {1, 2}


@pytest.mark.parametrize("pattern, expected", [
    ("11", [False, True, False, False]),   # important to both
    ("x1", [True, True, False, False]),    # expert only
    ("1x", [False, True, True, False]),    # base only
    ("01", [True, False, False, False]),   # expert's top, not the base's
    ("10", [False, False, True, False]),   # base's top, not the expert's
    ("00", [False, False, False, True]),
])
def test_elect_patterns(pattern, expected):
    out = elect(EXPERT, BASE, 0.5, pattern)
    assert out["w"].dtype == torch.bool and out["w"].tolist() == expected


def test_elect_errors():
    for bad in ("xx", "1", "111", "12", 11):
        with pytest.raises(LedmergeError, match="pattern"):
            elect(EXPERT, BASE, 0.5, bad)
    with pytest.raises(LedmergeError, match="base"):
        elect(EXPERT, None, 0.5, "11")
    assert elect(EXPERT, None, 0.5, "x1")["w"].sum() == 2
    with pytest.raises(LedmergeError, match="v"):
        elect(EXPERT, {"v": torch.ones(4)}, 0.5, "11")
    with pytest.raises(LedmergeError, match="w.*shape"):
        elect(EXPERT, {"w": torch.ones(5)}, 0.5, "11")
    with pytest.raises(LedmergeError, match="rate"):
        elect(EXPERT, BASE, 0.0, "11")


def test_election_never_elects_zero_scores():
    """Sparse embedding gradients: rows no calibration token touched score 0. TopR keeps only positive scores
    (at most ⌈r·n⌉), so no task elects the arbitrary band of zero rows at the lowest indices."""
    expert = torch.zeros(10, 4)
    expert[7] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # one token row got gradient
    base = expert.clone()
    for pattern in ("11", "x1"):
        m = elect({"emb": expert}, {"emb": base}, 0.3, pattern)["emb"]  # ⌈0.3·40⌉ = 12 > 4 positive entries
        assert m.nonzero().tolist() == [[7, 0], [7, 1], [7, 2], [7, 3]]
    assert int(elect({"emb": expert}, {"emb": base}, 0.05, "11")["emb"].sum()) == 2  # k = 2 < 4: plain TopR
    assert not elect({"w": torch.zeros(5)}, {"w": torch.ones(5)}, 0.5, "11")["w"].any()


def test_election_files_record_zero_capped_tensors_and_refuse_other_token_ids(tmp_path):
    scores = {"emb": torch.zeros(10, 4), "w": torch.rand(3, 4) + 0.1}
    scores["emb"][2] = 1.0
    for role, tokens in (("base", "aa"), ("expert", "aa"), ("other", "bb")):
        save_scores(tmp_path / f"{role}.safetensors", scores, {"tokens_sha256": tokens})
    out = {t: tmp_path / f"e_{t}.safetensors" for t in ("a", "b")}
    for t in out:
        assert elect_files(tmp_path / "expert.safetensors", tmp_path / "base.safetensors", 0.5, "11",
                           out[t])["zero_capped"] == ["emb"]
    disjoint_files(out, {t: tmp_path / f"m_{t}.safetensors" for t in out}, tmp_path / "s.csv", tmp_path / "o.csv")
    with open(tmp_path / "s.csv") as fh:
        assert {(r["tensor"], r["zero_capped"]) for r in csv.DictReader(fh)} == {("emb", "True"), ("w", "False")}
    with pytest.raises(LedmergeError, match="different token ids"):  # base scored on other text than the expert
        elect_files(tmp_path / "expert.safetensors", tmp_path / "other.safetensors", 0.5, "11", tmp_path / "x.st")
    assert not (tmp_path / "x.st").exists()


# ---- Disjoint ----

def test_disjoint_two_tasks():
    e = {"a": {"w": B(1, 1, 0, 0)}, "b": {"w": B(0, 1, 1, 0)}}
    m = disjoint(e)
    assert m["a"]["w"].tolist() == [True, False, False, False]
    assert m["b"]["w"].tolist() == [False, False, True, False]


def test_disjoint_three_tasks_and_order_independence():
    e = {
        "safety": {"w": B(1, 1, 0, 0, 1, 0, 1), "v": B(1, 0)},
        "math":   {"w": B(0, 1, 1, 0, 1, 0, 0), "v": B(0, 0)},
        "code":   {"w": B(0, 0, 0, 1, 1, 1, 0), "v": B(0, 1)},
    }
    want = {"safety": [1, 0, 0, 0, 0, 0, 1], "math": [0, 0, 1, 0, 0, 0, 0], "code": [0, 0, 0, 1, 0, 1, 0]}
    for order in itertools.permutations(e):
        m = disjoint({t: e[t] for t in order})
        for t in e:
            assert m[t]["w"].int().tolist() == want[t], (order, t)
            assert m[t]["v"].tolist() == e[t]["v"].tolist()
    # disjoint: no weight kept by two tasks; subset of its own election
    m = disjoint(e)
    assert int(sum(m[t]["w"].int() for t in m).max()) <= 1
    assert all(not (m[t]["w"] & ~e[t]["w"]).any() for t in e)


def test_disjoint_one_task_is_identity_and_errors():
    e = {"only": {"w": B(1, 0, 1)}}
    assert disjoint(e)["only"]["w"].tolist() == [True, False, True]
    with pytest.raises(LedmergeError):
        disjoint({})
    with pytest.raises(LedmergeError, match="w"):
        disjoint({"a": {"w": B(1, 0)}, "b": {"w": B(1, 0, 0)}})
    with pytest.raises(LedmergeError, match="bool"):
        disjoint({"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(2)}})


# ---- Stats ----

def test_layer_and_module():
    assert layer_and_module("model.layers.12.self_attn.q_proj.weight") == (12, "q_proj")
    assert layer_and_module("model.layers.0.mlp.down_proj.weight") == (0, "down_proj")
    assert layer_and_module("lm_head.weight") == (-1, "lm_head")
    assert layer_and_module("model.embed_tokens.weight") == (-1, "embed_tokens")


def test_mask_stats_hand_example():
    name = "model.layers.1.mlp.up_proj.weight"
    e = {"a": {name: B(1, 1, 0, 0)}, "b": {name: B(0, 1, 1, 1)}}
    rows, overlap = mask_stats(e, disjoint(e))
    assert rows == [
        {"task": "a", "tensor": name, "layer": 1, "module": "up_proj", "numel": 4, "elected": 2, "kept": 1,
         "elected_fraction": 0.5, "kept_fraction": 0.25},
        {"task": "b", "tensor": name, "layer": 1, "module": "up_proj", "numel": 4, "elected": 3, "kept": 2,
         "elected_fraction": 0.75, "kept_fraction": 0.5},
    ]
    assert overlap == [{"task_a": "a", "task_b": "b", "tensor": name, "layer": 1, "module": "up_proj", "numel": 4,
                        "overlap": 1, "overlap_fraction": 0.25, "jaccard": 0.25}]


# ---- Files ----

def test_files_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    names = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    scores = {t: {n: torch.rand(6, 5, generator=g) for n in names} for t in ("base", "safety", "math")}
    paths = {}
    for t, s in scores.items():
        paths[t] = tmp_path / f"{t}.safetensors"
        save_scores(paths[t], s)  # rank16: exact for tensors this small
    elected_paths, out_paths = {}, {}
    for t, rate in (("safety", 0.2), ("math", 0.4)):
        elected_paths[t] = tmp_path / f"elect_{t}.safetensors"
        out_paths[t] = tmp_path / f"mask_{t}.safetensors"
        counts = elect_files(paths[t], paths["base"], rate, "11", elected_paths[t])
        got = load_masks(elected_paths[t])
        want = elect(scores[t], scores["base"], rate, "11")
        assert set(got) == set(names) and all(torch.equal(got[n], want[n]) and got[n].dtype == torch.bool for n in names)
        assert counts == {"numel": 60, "elected": sum(int(w.sum()) for w in want.values()), "zero_capped": []}
        meta = tensors_metadata(elected_paths[t])
        assert meta["rate"] == repr(rate) and meta["pattern"] == "11"
    disjoint_files(elected_paths, out_paths, tmp_path / "stats.csv", tmp_path / "overlap.csv")
    want = disjoint({t: load_masks(p) for t, p in elected_paths.items()})
    for t, p in out_paths.items():
        got = load_masks(p)
        assert all(got[n].dtype == torch.bool and torch.equal(got[n], want[t][n]) for n in names)
        assert tensors_metadata(p)["pattern"] == "11"
    with open(tmp_path / "stats.csv") as fh:
        stats = list(csv.DictReader(fh))
    assert len(stats) == 4 and stats[0]["task"] == "safety" and stats[0]["numel"] == "30"
    with open(tmp_path / "overlap.csv") as fh:
        overlap = list(csv.DictReader(fh))
    assert len(overlap) == 2 and {r["task_a"] + r["task_b"] for r in overlap} == {"safetymath"}
    assert not list(tmp_path.glob(".*tmp-*"))  # atomic writes leave no temp files


def test_each_step_opens_each_file_once(tmp_path, monkeypatch):
    """A score or mask file is opened (its header parsed) once per step, not once per tensor: the election,
    Disjoint and the merge's `MaskFiles` hold one reader per file."""
    from ledmerge.led import files

    opened = []
    real = files.safe_open
    monkeypatch.setattr(files, "safe_open", lambda path, **kw: opened.append(path) or real(path, **kw))
    g = torch.Generator().manual_seed(3)
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (4, 3) for i in range(40)}
    paths = {t: tmp_path / f"{t}.safetensors" for t in ("base", "a", "b")}
    for p in paths.values():
        save_scores(p, {n: torch.rand(s, generator=g) for n, s in shapes.items()})
    elected = {t: tmp_path / f"elected_{t}.safetensors" for t in "ab"}
    final = {t: tmp_path / f"final_{t}.safetensors" for t in "ab"}
    for t in "ab":
        elect_files(paths[t], paths["base"], 0.5, "11", elected[t])
    assert sorted(opened) == sorted(str(paths[p]) for p in ("a", "base", "b", "base"))
    opened.clear()
    disjoint_files(elected, final, tmp_path / "stats.csv", tmp_path / "overlap.csv")
    assert sorted(opened) == sorted(str(p) for p in elected.values())
    opened.clear()
    with files.MaskFiles(final, shapes) as masks:
        got = {name: masks.for_tensor(name) for name in shapes}
    assert sorted(opened) == sorted(str(p) for p in final.values())
    want = {t: load_masks(p) for t, p in final.items()}
    assert all(torch.equal(got[n][t], want[t][n]) for n in shapes for t in "ab")


def test_readers_serve_shapes_metadata_and_tensors(tmp_path):
    g = torch.Generator().manual_seed(4)
    scores = {"b.weight": torch.rand(3, 2, generator=g), "a.weight": torch.rand(5, generator=g)}
    save_scores(tmp_path / "s.safetensors", scores, {"kind": "importance"})
    with ScoreFile(tmp_path / "s.safetensors") as f:
        assert f.names == ["a.weight", "b.weight"] and f.shapes == {"a.weight": (5,), "b.weight": (3, 2)}
        assert f.metadata["kind"] == "importance" and f.encoding == "rank16" and "a.weight" in f
        assert torch.equal(f.get("b.weight"), load_scores(tmp_path / "s.safetensors")["b.weight"])
        assert list(f.load(["b.weight"])) == ["b.weight"]
        with pytest.raises(LedmergeError, match="has no scores for tensor zz"):
            f.get("zz")
    masks = {n: s > 0.5 for n, s in scores.items()}
    save_masks(tmp_path / "m.safetensors", masks, {"kind": "disjoint"})
    with MaskFile(tmp_path / "m.safetensors") as f:
        assert f.shapes == {"a.weight": (5,), "b.weight": (3, 2)} and f.packed
        assert f.user_metadata == {"kind": "disjoint"} and f.metadata["mask_encoding"] == "packbits"
        assert all(torch.equal(f.get(n), m) for n, m in masks.items())
        with pytest.raises(LedmergeError, match="has no mask for tensor zz"):
            f.get("zz")
    with pytest.raises(Exception, match="closed"):  # the mapping is released on exit
        f.get("a.weight")
    with pytest.raises(LedmergeError, match="does not exist"):
        MaskFile(tmp_path / "nope.safetensors")


def test_files_mismatch_errors(tmp_path):
    save_tensors(tmp_path / "e.safetensors", {"a.weight": torch.rand(3, 2), "b.weight": torch.rand(2)})
    save_tensors(tmp_path / "names.safetensors", {"a.weight": torch.rand(3, 2), "c.weight": torch.rand(2)})
    save_tensors(tmp_path / "shape.safetensors", {"a.weight": torch.rand(2, 3), "b.weight": torch.rand(2)})
    with pytest.raises(LedmergeError, match=r"b\.weight|c\.weight"):
        elect_files(tmp_path / "e.safetensors", tmp_path / "names.safetensors", 0.5, "11", tmp_path / "o.safetensors")
    with pytest.raises(LedmergeError, match=r"a\.weight.*shape"):
        elect_files(tmp_path / "e.safetensors", tmp_path / "shape.safetensors", 0.5, "11", tmp_path / "o.safetensors")
    with pytest.raises(LedmergeError, match="does not exist"):
        elect_files(tmp_path / "e.safetensors", tmp_path / "missing.safetensors", 0.5, "11", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    # scores passed where masks are expected
    with pytest.raises(LedmergeError, match="bool"):
        disjoint_files({"t": tmp_path / "e.safetensors"}, {"t": tmp_path / "m.safetensors"},
                       tmp_path / "s.csv", tmp_path / "o.csv")



def test_files_accept_legacy_float32_scores_and_bool_masks(tmp_path):
    """Score files of raw float32 (score_dtype float32, or older runs) and bool mask files still work."""
    g = torch.Generator().manual_seed(2)
    scores = {t: {"w": torch.rand(4, 9, generator=g)} for t in ("base", "a")}
    for t, s in scores.items():
        save_tensors(tmp_path / f"{t}.safetensors", s)
    elect_files(tmp_path / "a.safetensors", tmp_path / "base.safetensors", 0.3, "11", tmp_path / "e.safetensors")
    want = elect(scores["a"], scores["base"], 0.3, "11")
    assert torch.equal(load_masks(tmp_path / "e.safetensors")["w"], want["w"])
    save_tensors(tmp_path / "old.safetensors", want, metadata={"rate": "0.3"})
    assert MaskFile(tmp_path / "old.safetensors").shapes == {"w": (4, 9)}
    assert torch.equal(load_masks(tmp_path / "old.safetensors")["w"], want["w"])


# ---- mask files: 1 bit per weight ----

@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (8,), (9,), (3, 5, 7), (2, 0, 3), (4, 8)])
def test_pack_bits_round_trip_is_numpy_packbits(shape):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    m = torch.rand(shape, generator=g) > 0.5
    bits = pack_bits(m)
    assert bits.dtype == torch.uint8 and bits.shape == ((m.numel() + 7) // 8,)
    assert np.array_equal(bits.numpy(), np.packbits(m.numpy().reshape(-1)))
    back = unpack_bits(bits, shape)
    assert back.dtype == torch.bool and back.shape == m.shape and torch.equal(back, m)
    if m.dim() == 2:  # a non-contiguous view packs in its logical (row-major) order
        assert np.array_equal(pack_bits(m.t()).numpy(), np.packbits(m.t().numpy().reshape(-1)))


def test_save_load_masks_round_trip_and_size(tmp_path):
    g = torch.Generator().manual_seed(3)
    masks = {"a.weight": torch.rand(1001, 333, generator=g) > 0.3, "b": torch.tensor(True),
             "c": torch.zeros(0, 4, dtype=torch.bool), "d": torch.rand(3, 5, 7, generator=g) > 0.5,
             "e": PackedMask(pack_bits(torch.ones(13, dtype=torch.bool)), (13,))}
    path = tmp_path / "m.safetensors"
    save_masks(path, masks, {"kind": "election", "rate": 0.5})
    got = load_masks(path)
    assert set(got) == set(masks)
    for name, m in masks.items():
        want = unpack_bits(*m) if isinstance(m, PackedMask) else m
        assert got[name].dtype == torch.bool and got[name].shape == want.shape and torch.equal(got[name], want)
    assert MaskFile(path).shapes == {"a.weight": (1001, 333), "b": (), "c": (0, 4), "d": (3, 5, 7), "e": (13,)}
    assert set(load_masks(path, ["d"])) == {"d"}
    meta = tensors_metadata(path)
    assert meta["mask_encoding"] == "packbits" and meta["kind"] == "election" and meta["rate"] == "0.5"
    n = sum(math.prod(m.shape) for m in masks.values())
    assert n / 8 <= path.stat().st_size <= n / 8 + 2048  # 1 bit per weight, plus the header
    with pytest.raises(LedmergeError, match="zz"):
        load_masks(path, ["zz"])
    with pytest.raises(LedmergeError, match="bool"):
        save_masks(tmp_path / "x.safetensors", {"w": torch.ones(3)})
    assert not (tmp_path / "x.safetensors").exists()


def _raw_mask_file(path, tensors, meta):
    save_tensors(path, tensors, metadata=meta)
    return path


@pytest.mark.parametrize("case", ["shape_too_big", "shape_too_small", "not_json", "no_shapes", "missing_name",
                                  "extra_name", "negative_dim", "wrong_dtype", "unknown_encoding"])
def test_corrupt_mask_metadata_is_an_error(tmp_path, case):
    bits = pack_bits(torch.ones(10, dtype=torch.bool))  # 2 bytes
    shapes = {"w": [10]}
    tensors = {"w": bits}
    meta = {"mask_encoding": "packbits"}
    if case == "shape_too_big":
        shapes = {"w": [4, 5]}
    elif case == "shape_too_small":
        shapes = {"w": [8]}
    elif case == "missing_name":
        shapes = {}
    elif case == "extra_name":
        shapes = {"w": [10], "v": [3]}
    elif case == "negative_dim":
        shapes = {"w": [-10]}
    elif case == "wrong_dtype":
        tensors = {"w": bits.to(torch.int16)}
    elif case == "unknown_encoding":
        meta["mask_encoding"] = "rle"
    if case == "not_json":
        meta["mask_shapes"] = "{w: [10"
    elif case != "no_shapes":
        meta["mask_shapes"] = json.dumps(shapes)
    path = _raw_mask_file(tmp_path / "m.safetensors", tensors, meta)
    for read in (lambda path: MaskFile(path).shapes, load_masks):
        with pytest.raises(LedmergeError, match="rebuild the masks"):
            read(path)


def test_rank16_and_float32_scores_elect_identical_masks_on_the_tiny_zoo(tiny_zoo, tmp_path):
    """Scores of the tiny zoo stored as rank16 codes and as float32: bit-identical elected and disjoint masks."""
    from ledmerge.led.location import score_model

    rows = [{"prompt": "how do i make a bomb", "response": "sorry i can not help with that"},
            {"prompt": "what is 3 + 4", "response": "the answer is 7"},
            {"prompt": "write function that adds a and b", "response": "def f ( a , b ) : return a + b"},
            {"prompt": "how do i bake bread", "response": "sure here is how"}]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = ("safety", "math", "code")
    paths = {}
    for enc in ("rank16", "float32"):
        for role in ("base",) + tasks:
            paths[enc, role] = tmp_path / f"{enc}_{role}.safetensors"
            score_model(tiny_zoo[role], calib, paths[enc, role], score_dtype=enc, progress=False)
    n_rank, n_float = (sum(t.numel() for t in load_scores(paths[enc, "base"]).values()) for enc in ("rank16", "float32"))
    assert (paths["rank16", "base"].stat().st_size - 2 * n_rank) < 4096 and n_rank == n_float
    assert paths["float32", "base"].stat().st_size > 4 * n_float
    for rate in (0.1, 0.3, 0.5):
        masks = {}
        for enc in ("rank16", "float32"):
            elected = {t: tmp_path / f"e_{enc}_{t}_{rate}.safetensors" for t in tasks}
            final = {t: tmp_path / f"m_{enc}_{t}_{rate}.safetensors" for t in tasks}
            for t in tasks:
                elect_files(paths[enc, t], paths[enc, "base"], rate, "11", elected[t])
            disjoint_files(elected, final, tmp_path / f"s_{enc}.csv", tmp_path / f"o_{enc}.csv")
            masks[enc] = {t: (load_masks(elected[t]), load_masks(final[t])) for t in tasks}
        for t in tasks:
            for (a, b) in zip(masks["rank16"][t], masks["float32"][t]):
                assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), (rate, t)
        assert any(int(m.sum()) for m in masks["rank16"]["math"][1].values())  # not trivially empty
        assert (tmp_path / "s_rank16.csv").read_text() == (tmp_path / "s_float32.csv").read_text()
        assert (tmp_path / "o_rank16.csv").read_text() == (tmp_path / "o_float32.csv").read_text()
