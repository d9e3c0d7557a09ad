"""The fused CPU kernels (`ledmerge.kernels`) give the same bits as the torch ops they replace.

1. TIES' trim: `top_k_abs_delta_mask` against `topk.top_k_mask_chunks` over |expert − base|, bf16 and float32, on
   task vectors with many ties (bf16 deltas, zeros), every k from 1 to n.
2. TIES' consensus: `TaskVectorMethod.merge_elements` with the kernel against the torch ops, for every method whose
   consensus is TIES (trim, DARE's drops with and without rescale, Breadcrumbs, DELLA's rescale), with weights,
   `normalize: false`, λ, zeros and -0.0 in the inputs.
3. Whole merges of the tiny zoo are byte-identical with and without the kernels.
"""

from __future__ import annotations

import pytest
import torch

from ledmerge import kernels
from ledmerge.checkpoint import load_state_dict
from ledmerge.errors import LedmergeError
from ledmerge.merge import merge_models, sparsify
from ledmerge.merge import task_vectors as task_vector_methods
from ledmerge.merge.base import TensorContext
from ledmerge.merge.registry import get_method
from ledmerge.merge.sparsify import DeltaChunks
from ledmerge.merge.task_vectors import TaskVectorMethod
from ledmerge.topk import top_k_mask_chunks

TASKS = ("code", "math", "safety")


@pytest.fixture
def fused_everywhere(monkeypatch):
    """The kernels for tensors of any size (the merges use them from `FUSED_FROM` entries on)."""
    monkeypatch.setattr(sparsify, "FUSED_FROM", 0)
    monkeypatch.setattr(task_vector_methods, "FUSED_FROM", 0)


def task_vectors(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A base and three experts in `dtype`: small deltas (bf16 rounds many to equal or zero |τ|), some entries
    unchanged, some -0.0 and zero bases."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    base[::7] = 0.0
    base[3::11] = -0.0
    experts = {}
    for i, t in enumerate(TASKS):
        e = base + torch.randn(n, generator=g) * 0.002 * (i + 1)
        e[i::5] = base[i::5]  # no change: |τ| = 0
        experts[t] = e.to(dtype)
    return base.to(dtype), experts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_trim_is_the_chunked_top_k(dtype):
    base, experts = task_vectors(20_011, dtype, seed=1)
    n = base.numel()
    for t, e in experts.items():
        delta = DeltaChunks(e, base)
        for k in (1, 2, 17, n // 10, n // 2, n - 3, n - 1, n):
            fused = kernels.top_k_abs_delta_mask(e, base, k)
            ref = top_k_mask_chunks(delta.abs_slice, n, k, chunk=4096)
            assert torch.equal(fused, ref), (t, k)
            assert int(fused.sum()) == k


def test_fused_trim_refuses_nan_as_the_chunked_one_does():
    base, experts = task_vectors(1000, torch.float32, seed=2)
    experts["code"][10] = float("nan")
    with pytest.raises(LedmergeError, match="scores contain NaN"):
        kernels.top_k_abs_delta_mask(experts["code"], base, 100)
    with pytest.raises(LedmergeError, match="scores contain NaN"):
        top_k_mask_chunks(DeltaChunks(experts["code"], base).abs_slice, 1000, 100)


SPECS = [
    {"method": "ties", "density": 0.3},
    {"method": "ties", "density": {"code": 0.2, "math": 1.0, "safety": 0.6}, "weights": {"code": 0.5, "math": 2.0},
     "scale": 0.7},
    {"method": "ties", "density": 0.5, "normalize": False, "weights": {"safety": -0.5, "math": 1.5}},
    {"method": "dare_ties", "drop": 0.7, "seed": 3},
    {"method": "dare_ties", "drop": {"code": 0.1, "math": 0.5, "safety": 0.9}, "rescale": False},
    {"method": "breadcrumbs_ties", "density": 0.5, "gamma": 0.05},
    {"method": "della", "density": 0.5, "epsilon": 0.1, "rescale": True},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["method"])
def test_fused_consensus_is_the_torch_ops(spec, fused_everywhere):
    method = get_method(spec)
    assert isinstance(method, TaskVectorMethod) and method.consensus.name == "ties"
    base, experts = task_vectors(30_000, torch.bfloat16, seed=4)
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", seed=method.seed)
    layer = method.for_tensor(ctx.name)
    ctx.kept = layer.select(base, experts, ctx)
    fb, fe = base.float(), {t: e.float() for t, e in experts.items()}
    part = slice(1000, 29_000)  # a chunk, as the driver streams them
    chunk = ctx.chunk(part)
    fused = layer.fused_elements(fb[part].clone(), {t: e[part] for t, e in fe.items()}, chunk)
    assert fused is not None
    ref = fb[part] + layer.merge_deltas({t: e[part] - fb[part] for t, e in fe.items()}, chunk)
    assert torch.equal(fused.view(torch.int32), ref.view(torch.int32))  # -0.0 and +0.0 told apart


def test_other_consensus_and_small_chunks_take_the_torch_ops():
    base, experts = task_vectors(1000, torch.float32, seed=5)
    assert get_method({"method": "ties", "density": 0.5}).fused_elements(base, experts, TensorContext("x")) is None
    ctx = TensorContext("x")
    assert get_method({"method": "task_arithmetic"}).fused_elements(base, experts, ctx) is None
    assert get_method({"method": "dare_linear"}).fused_elements(base, experts, ctx) is None


@pytest.mark.parametrize("spec", SPECS[:5], ids=lambda s: s["method"])
def test_merges_are_byte_identical_without_the_kernels(tiny_zoo, tmp_path, monkeypatch, fused_everywhere, spec):
    experts = {t: tiny_zoo[t] for t in TASKS}
    calls = []
    monkeypatch.setattr(kernels, "ties_elements", lambda *a, f=kernels.ties_elements: calls.append(1) or f(*a))
    merge_models(tiny_zoo["base"], experts, spec, tmp_path / "fused", progress=False)
    assert calls  # the kernels ran
    monkeypatch.setattr(TaskVectorMethod, "fused_elements", lambda self, *a: None)
    monkeypatch.setattr(kernels, "supports", lambda *a: False)
    merge_models(tiny_zoo["base"], experts, spec, tmp_path / "torch", progress=False)
    a, b = load_state_dict(tmp_path / "fused", None), load_state_dict(tmp_path / "torch", None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
