"""Count-matched controls: masks with exactly the per-tensor counts of given final (disjoint) LED masks.

A control answers "does the *choice* of weights matter, or only how many?". For every tensor and task it keeps
k_t = the number of ones of that task's final mask M_t (after Election and Disjoint), chosen otherwise:
- `random`: uniform at random. Per tensor one seeded permutation of its n positions (`random_generator(seed,
  "control", tensor name)`: the same bits whatever the order, device or other tensors); the tasks, in sorted order,
  take consecutive slices of it (k_t each). Each task's mask is a uniform k_t-subset, and no position is given to two
  tasks, so the controls are disjoint like the masks they match (Σ_t k_t ≤ n since those are).
- `magnitude`: the k_t largest |τ_t| = |θ_t − θ_0|, TIES' trim at SNIP's count. Disjoint by taking the tasks in
  increasing order of k_t (ties by name), each the top k_t of |τ_t| among the positions the earlier ones left; so
  the task with the fewest weights (the safety task at the paper's rates) gets exactly its top-k_t.
The counts are those of the matched masks, tensor by tensor, so a comparison of LED against a control compares
locations at equal size. The mask files carry the matched masks' provenance (their `expert_*`/`base_*` metadata),
so the merge checks them against the models as it checks LED's.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import LedmergeError
from ..schema import sweep_values
from ..topk import top_k_mask
from .files import MaskFile, PackedMask, pack_bits, save_masks
from .location import random_generator

CONTROLS = tuple(v for v in sweep_values("control") if v != "none")  # the sweep axis `control`, less LED's own masks


def random_control(counts: dict[str, int], shape, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Disjoint uniform random masks of `shape` with counts[t] ones each: consecutive slices of one permutation,
    tasks in sorted order."""
    n = 1
    for s in shape:
        n *= s
    if sum(counts.values()) > n:
        raise LedmergeError(f"counts {counts} exceed the tensor's {n} entries: the matched masks are not disjoint")
    perm = torch.randperm(n, generator=generator)
    out, start = {}, 0
    for t in sorted(counts):
        flat = torch.zeros(n, dtype=torch.bool)
        flat[perm[start:start + counts[t]]] = True
        start += counts[t]
        out[t] = flat.view(shape)
    return out


def magnitude_control(counts: dict[str, int], tau: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Disjoint top-k_t masks of |τ_t|: tasks in increasing count (then name), each among the positions left."""
    first = next(iter(tau.values()))
    n = first.numel()
    if sum(counts.values()) > n:
        raise LedmergeError(f"counts {counts} exceed the tensor's {n} entries: the matched masks are not disjoint")
    taken = torch.zeros(n, dtype=torch.bool)
    out = {}
    for t in sorted(counts, key=lambda t: (counts[t], t)):
        score = tau[t].reshape(-1).float().abs()
        score[taken] = -1.0  # below every |τ| ≥ 0: positions another task holds are never chosen
        mask = top_k_mask(score, counts[t])
        taken |= mask
        out[t] = mask.view(first.shape)
    return {t: out[t] for t in sorted(out)}


def control_files(kind: str, matched: dict, out_paths: dict, stats_csv, *, seed: int | None = None,
                  base_dir=None, expert_dirs: dict | None = None, allow_pickle: bool = False) -> dict:
    """Count-matched control masks of `kind` (CONTROLS) for the final masks `matched` (task -> path), written to
    `out_paths` (task -> path) with their per-tensor statistics (stats.csv's columns; elected = kept = the count).
    `random` needs `seed`; `magnitude` the base and expert model directories. Returns {task: ones}."""
    from .election import STATS_COLUMNS, _write_csv, layer_and_module

    if kind not in CONTROLS:
        raise LedmergeError(f"unknown control {kind!r}: use one of {list(CONTROLS)}")
    if set(matched) != set(out_paths):
        raise LedmergeError(f"tasks of the matched masks {sorted(matched)} and of the outputs {sorted(out_paths)} "
                            "differ")
    if kind == "random" and seed is None:
        raise LedmergeError("control random needs a seed (the workflow passes the config seed): give --seed")
    if kind == "magnitude" and (base_dir is None or not expert_dirs or set(expert_dirs) != set(matched)):
        raise LedmergeError("control magnitude needs the base model (--base) and every task's expert (--expert)")
    tasks = sorted(matched)
    masks: dict[str, dict] = {t: {} for t in tasks}
    rows, totals = [], dict.fromkeys(tasks, 0)
    with contextlib.ExitStack() as stack:
        files = {t: stack.enter_context(MaskFile(matched[t])) for t in tasks}
        names = sorted(files[tasks[0]].shapes)
        for t in tasks[1:]:
            if sorted(files[t].shapes) != names:
                raise LedmergeError(f"the masks of tasks '{tasks[0]}' and '{t}' cover different tensors: rebuild them")
        if kind == "magnitude":
            from ..checkpoint import open_model

            base = stack.enter_context(open_model(base_dir, allow_pickle=allow_pickle))
            experts = {t: stack.enter_context(open_model(expert_dirs[t], base_dir, allow_pickle=allow_pickle))
                       for t in tasks}
        for name in names:
            shape = tuple(files[tasks[0]].shapes[name])
            counts = {t: int(files[t].get(name).sum()) for t in tasks}
            if kind == "random":
                drawn = random_control(counts, shape, random_generator(seed, "control", name))
            else:
                theta0 = base.read(name, torch.float32)
                drawn = magnitude_control(counts, {t: experts[t].read(name, torch.float32) - theta0 for t in tasks})
            layer, module = layer_and_module(name)
            for t in tasks:
                m = drawn[t]
                assert int(m.sum()) == counts[t]
                masks[t][name] = PackedMask(pack_bits(m), shape)
                totals[t] += counts[t]
                n = m.numel()
                rows.append({"task": t, "tensor": name, "layer": layer, "module": module, "numel": n,
                             "elected": counts[t], "kept": counts[t], "elected_fraction": counts[t] / n if n else 0.0,
                             "kept_fraction": counts[t] / n if n else 0.0, "zero_capped": False})
        metadata = {t: files[t].user_metadata for t in tasks}
    for t in tasks:
        meta = metadata[t]
        save_masks(out_paths[t], masks[t], metadata={
            **{k: v for k, v in meta.items() if k.startswith(("expert_", "base_"))},  # the matched masks' sources
            "kind": "control", "control": kind, "task": t, "tasks": ",".join(tasks), "rate": meta.get("rate", ""),
            "pattern": meta.get("pattern", ""), "matched": str(matched[t]),
            **({"seed": str(seed)} if kind == "random" else {})})
    _write_csv(stats_csv, sorted(rows, key=lambda r: (tasks.index(r["task"]), r["tensor"])), STATS_COLUMNS)
    return totals
