"""Count-matched controls (ledmerge.led.controls) and the sweep axis `control`."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import save_file

from ledmerge.led.controls import control_files, magnitude_control, random_control
from ledmerge.led.files import MaskFile, save_masks
from ledmerge.led.location import random_generator

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (8, 12), "model.layers.0.mlp.down_proj.weight": (12, 10)}


def _disjoint_masks(seed=0):
    """Hand-made disjoint final masks of three tasks with different counts per tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {t: {} for t in ("code", "math", "safety")}
    for name, shape in SHAPES.items():
        owner = torch.randint(0, 6, shape, generator=g)  # 0, 1, 2: a task; 3-5: nobody
        for i, t in enumerate(("code", "math", "safety")):
            out[t][name] = owner == i
    return out


def _write(tmp_path, masks):
    paths = {}
    for t, m in masks.items():
        paths[t] = tmp_path / f"final_{t}.safetensors"
        save_masks(paths[t], m, metadata={"kind": "disjoint", "rate": "0.1", "pattern": "11",
                                          "expert_model_dir": f"/models/{t}"})
    return paths


def test_random_control_has_the_counts_is_disjoint_and_seeded():
    counts = {"safety": 3, "math": 20, "code": 41}
    a = random_control(counts, (8, 12), random_generator(0, "control", "w"))
    b = random_control(counts, (8, 12), random_generator(0, "control", "w"))
    c = random_control(counts, (8, 12), random_generator(1, "control", "w"))
    assert {t: int(m.sum()) for t, m in a.items()} == counts
    assert int(sum(m.int() for m in a.values()).max()) == 1  # no weight given to two tasks
    assert all(torch.equal(a[t], b[t]) for t in counts)  # same seed, same bits
    assert any(not torch.equal(a[t], c[t]) for t in counts)
    with pytest.raises(Exception, match="not disjoint"):
        random_control({"a": 50, "b": 50}, (8, 12), random_generator(0, "control", "w"))


def test_magnitude_control_takes_the_largest_task_vector_entries_disjointly():
    g = torch.Generator().manual_seed(0)
    tau = {t: torch.randn(10, 10, generator=g) for t in ("safety", "math")}
    tau["math"].view(-1)[:5] = 100.0  # math's largest entries ...
    tau["safety"].view(-1)[:3] = 1000.0  # ... include safety's: the smaller count (safety) goes first
    counts = {"safety": 3, "math": 10}
    out = magnitude_control(counts, tau)
    assert {t: int(m.sum()) for t, m in out.items()} == counts
    assert not (out["safety"] & out["math"]).any()
    assert out["safety"].view(-1)[:3].all()  # safety: exactly its own top 3
    left = tau["math"].abs().view(-1).clone()
    left[:3] = -1
    assert torch.equal(out["math"].view(-1), torch.zeros(100, dtype=torch.bool).index_fill_(0, left.topk(10).indices, True))


def test_control_files_match_every_tensor_and_task_count(tmp_path):
    masks = _disjoint_masks()
    matched = _write(tmp_path, masks)
    runs = []
    for run in ("a", "b"):
        out = {t: tmp_path / run / f"{t}.safetensors" for t in masks}
        control_files("random", matched, out, tmp_path / run / "stats.csv", seed=7)
        runs.append({t: MaskFile(p).load() for t, p in out.items()})
    for name in SHAPES:
        for t in masks:
            assert int(runs[0][t][name].sum()) == int(masks[t][name].sum())  # SNIP's final per-tensor count
            assert torch.equal(runs[0][t][name], runs[1][t][name])  # seeded: same bits
        assert int(sum(runs[0][t][name].int() for t in masks).max()) <= 1  # disjoint across tasks
    meta = MaskFile(tmp_path / "a" / "safety.safetensors").user_metadata
    assert meta["control"] == "random" and meta["seed"] == "7" and meta["expert_model_dir"] == "/models/safety"
    rows = list(csv.DictReader(open(tmp_path / "a" / "stats.csv")))
    assert {(r["task"], r["tensor"]): int(r["kept"]) for r in rows} == {
        (t, n): int(masks[t][n].sum()) for t in masks for n in SHAPES}


def test_control_files_magnitude_reads_the_task_vectors(tmp_path):
    masks = _disjoint_masks(1)
    matched = _write(tmp_path, masks)
    g = torch.Generator().manual_seed(3)
    models = {}
    for who in ("base", *masks):
        models[who] = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
        (tmp_path / who).mkdir()
        save_file(models[who], str(tmp_path / who / "model.safetensors"))
    out = {t: tmp_path / "ctl" / f"{t}.safetensors" for t in masks}
    control_files("magnitude", matched, out, tmp_path / "ctl" / "stats.csv", base_dir=tmp_path / "base",
                  expert_dirs={t: tmp_path / t for t in masks})
    for name in SHAPES:
        counts = {t: int(masks[t][name].sum()) for t in masks}
        want = magnitude_control(counts, {t: models[t][name] - models["base"][name] for t in masks})
        for t in masks:
            assert torch.equal(MaskFile(out[t]).get(name), want[t])


def test_control_points_are_named_and_branched_by_the_masks_they_match():
    import yaml

    from ledmerge.config import validate
    from ledmerge.sweeps import branches, expand

    cfg = yaml.safe_load(open("config/config.yaml"))
    cfg["sweeps"] = {"c": {"merge": "led", "control": ["none", "random", "magnitude"]}}
    points = expand(validate(cfg))
    assert [p.name for p in points] == ["led.control-none", "led.control-random", "led.control-magnitude"]
    none, rnd, mag = points
    assert none.matched is None and rnd.matched == mag.matched == none.masks
    assert rnd.masks == none.masks + "+random" and mag.masks == none.masks + "+magnitude"
    b = branches(points)
    assert set(b.masks) == {none.masks} and set(b.controls) == {rnd.masks, mag.masks}
