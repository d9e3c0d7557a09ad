"""Election and Disjoint: importance scores -> boolean masks (see docs/methods.md).

Election:  E_t = TopR_r(I(θ_t; X_t)) ∧ TopR_r(I(θ_0; X_t))   (pattern "11")
Disjoint:  M_t = E_t ∧ ¬(∪_{j≠t} E_j)

TopR keeps exactly ⌈r·n⌉ entries of each tensor (`ledmerge.topk`). In the election, an entry whose score is 0
(no gradient reached it, or its weight is 0) is never elected: TopR there keeps the ⌈r·n⌉ largest *positive*
scores, or all of them when fewer are positive (`topk.top_r_positive`). Otherwise every task would fill its
count with the same arbitrary band of untouched token rows at the lowest indices. The election records which
tensors were capped so (`zero_capped`), and the mask statistics show it.

Score and mask files are read and written by `ledmerge.led.files` (`ScoreFile`; `save_masks`/`MaskFile`,
1 bit per weight); each input file is opened once per step and read tensor by tensor.

Provenance: an elected mask records where its scores came from (the `expert_*` and `base_*` metadata of
`ledmerge.led.files.sources_metadata`: model directory, weight files with sizes and sha256, calibration set and
its sha256); Disjoint copies them into the final masks and refuses elections on scores of different base models.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import re

import torch

from ..errors import LedmergeError
from ..fileio import write_text
from ..schema import allowed
from ..topk import top_k_count, top_r_positive
from .files import MaskFile, PackedMask, ScoreFile, as_bool_mask, pack_bits, recorded_files, save_masks, sources_metadata

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def _check_pattern(pattern: str) -> str:
    """One of the schema's election patterns (election.pattern: the one list of allowed values)."""
    patterns = allowed("election.pattern")
    if pattern not in patterns:
        raise LedmergeError(f"election pattern must be two characters from '0', '1', 'x' (base, expert), one of "
                            f"{patterns} ('xx' would elect every weight), got {pattern!r}")
    return pattern


def _check_same(a: dict, b: dict, what_a: str, what_b: str) -> None:
    """Same tensor names and shapes, else an error naming the first offending tensor."""
    for name in sorted(set(a) ^ set(b)):
        where = what_a if name in a else what_b
        raise LedmergeError(f"tensor {name} is only in {where}: {what_a} and {what_b} must score the same tensors "
                            "(same model architecture and scoring options)")
    for name in a:
        if tuple(a[name].shape) != tuple(b[name].shape):
            raise LedmergeError(f"tensor {name} has shape {list(a[name].shape)} in {what_a} but "
                                f"{list(b[name].shape)} in {what_b}")


def top_sets(expert: torch.Tensor | None, base: torch.Tensor | None, rate: float) -> dict[str, torch.Tensor]:
    """TopR of each model's positive scores ({"expert", "base"}, a model that is None left out): selected once per
    tensor, then shared by the election and its localisation statistics."""
    return {who: top_r_positive(scores.float(), rate) for who, scores in (("expert", expert), ("base", base))
            if scores is not None}


def elect_from_tops(tops: dict[str, torch.Tensor], pattern: str) -> torch.Tensor:
    """pattern[0] is the base, pattern[1] the expert: '1' = in that model's top-r, '0' = not in it, 'x' = ignored."""
    mask = None
    for char, who in zip(pattern, ("base", "expert")):
        if char == "x":
            continue
        cond = tops[who] if char == "1" else ~tops[who]
        mask = cond if mask is None else mask & cond
    return mask


def elect_tensor(expert: torch.Tensor | None, base: torch.Tensor | None, rate: float, pattern: str) -> torch.Tensor:
    """One tensor's election. pattern[0] is the base, pattern[1] the expert: '1' = must be in that model's
    top-r (of its positive scores), '0' = must not be, 'x' = that model is ignored (its scores may be None)."""
    _check_pattern(pattern)
    used = {who: scores for char, who, scores in zip(pattern, ("base", "expert"), (base, expert)) if char != "x"}
    return elect_from_tops(top_sets(used.get("expert"), used.get("base"), rate), pattern)


def localisation(expert: torch.Tensor | None, base: torch.Tensor | None, rate: float, *,
                 raw: bool = True, tops: dict[str, torch.Tensor] | None = None) -> dict:
    """How concentrated one tensor's importance is, and how much the base's and the expert's top-r agree.

    `top_expert`, `top_base`: the sizes of TopR of each (⌈r·n⌉, fewer where fewer scores are positive); `overlap`:
    |TopR(base) ∩ TopR(expert)|, which for independent choices is about top_base·top_expert/n = r²·n, so
    overlap/top_expert is about r by chance (`chance` = top_base/n); `mass_expert`, `mass_base`: the share of the
    summed score in the top-r (r for scores spread evenly, 1 if the top-r holds everything). The mass shares need
    raw scores (`raw`: score_dtype float32); from rank16 codes they are None. A model that is None (pattern 'x')
    gives None for its entries. `tops`: the models' `top_sets`, when the caller has them already."""
    n = (expert if expert is not None else base).numel()
    out = {"numel": n, "top_expert": None, "top_base": None, "overlap": None, "mass_expert": None, "mass_base": None}
    tops = top_sets(expert, base, rate) if tops is None else tops
    for who, scores in (("expert", expert), ("base", base)):
        if scores is None:
            continue
        scores = scores.float()
        top = tops[who]
        out[f"top_{who}"] = int(top.sum())
        if raw:
            total = float(scores.sum(dtype=torch.float64))
            out[f"mass_{who}"] = float(scores[top].sum(dtype=torch.float64)) / total if total > 0 else None
    if len(tops) == 2:
        out["overlap"] = int((tops["expert"] & tops["base"]).sum())
    return out


def elect(expert_scores: dict, base_scores: dict | None, rate: float, pattern: str) -> dict[str, torch.Tensor]:
    """Election E_t for every tensor: name -> bool mask.

    `pattern` is two characters, the first for the base model θ_0 and the second for the expert θ_t:
    '1' = the weight must be in that model's top-r (by its scores on X_t), '0' = it must NOT be,
    'x' = that model is ignored. So "11" is LED (important to both), "x1" expert-only top-r,
    "01" important to the expert but not the base, "10" important to the base but not the expert.
    "xx" is refused. `base_scores` may be None when the pattern starts with 'x'.
    """
    _check_pattern(pattern)
    top_k_count(1, rate)  # validate the rate even for empty inputs
    if pattern[0] == "x":
        base_scores = None
    elif base_scores is None:
        raise LedmergeError(f"election pattern {pattern!r} uses the base model's scores but none were given")
    if base_scores is not None:
        _check_same(expert_scores, base_scores, "the expert scores", "the base scores")
    out = {}
    for name, scores in expert_scores.items():
        base = base_scores[name] if base_scores is not None else None
        try:
            out[name] = elect_tensor(scores, base, rate, pattern)
        except LedmergeError as exc:
            raise LedmergeError(f"{name}: {exc}") from None
    return out


def disjoint(elected: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """M_t = E_t ∧ ¬(∪_{j≠t} E_j): weights elected by two or more tasks are dropped from all of them.

    Computed from 'elected by >= 1' and 'elected by >= 2' masks, so the result cannot depend on task order.
    """
    if not elected:
        raise LedmergeError("disjoint needs at least one task")
    tasks = list(elected)
    first = elected[tasks[0]]
    for t in tasks[1:]:
        _check_same(first, elected[t], f"task '{tasks[0]}'", f"task '{t}'")
    out: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    for name in first:
        once = torch.zeros(first[name].shape, dtype=torch.bool, device=first[name].device)
        twice = torch.zeros_like(once)
        for t in tasks:
            e = as_bool_mask(elected[t][name], f"task '{t}' tensor {name}")
            twice |= once & e
            once |= e
        for t in tasks:
            out[t][name] = elected[t][name] & ~twice
    return out


def layer_and_module(name: str) -> tuple[int, str]:
    """`model.layers.3.self_attn.q_proj.weight` -> (3, 'q_proj'); no layer index -> -1."""
    m = _LAYER.search(name)
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]
    return (int(m.group(1)) if m else -1), module


def mask_stats(elected: dict[str, dict[str, torch.Tensor]], final: dict[str, dict[str, torch.Tensor]]):
    """Rows for the CSV reports.

    per-tensor rows: task, tensor, layer, module, numel, elected, kept, elected_fraction, kept_fraction.
    overlap rows (each unordered pair of tasks, in the order given): task_a, task_b, tensor, layer, module,
    numel, overlap (elected by both), overlap_fraction (overlap / numel), jaccard (overlap / union; 0 when
    neither elects anything).
    """
    rows, overlap_rows = [], []
    for task, masks in elected.items():
        for name, e in masks.items():
            layer, module = layer_and_module(name)
            n = e.numel()
            n_e, n_k = int(e.sum()), int(final[task][name].sum())
            rows.append({"task": task, "tensor": name, "layer": layer, "module": module, "numel": n,
                         "elected": n_e, "kept": n_k, "elected_fraction": n_e / n if n else 0.0,
                         "kept_fraction": n_k / n if n else 0.0})
    for a, b in itertools.combinations(list(elected), 2):
        for name, ea in elected[a].items():
            eb = elected[b][name]
            layer, module = layer_and_module(name)
            n = ea.numel()
            both, union = int((ea & eb).sum()), int((ea | eb).sum())
            overlap_rows.append({"task_a": a, "task_b": b, "tensor": name, "layer": layer, "module": module,
                                 "numel": n, "overlap": both, "overlap_fraction": both / n if n else 0.0,
                                 "jaccard": both / union if union else 0.0})
    return rows, overlap_rows


# ---- file level: what the workflow calls ----

class _Shape:  # lets _check_same compare headers without loading tensors
    def __init__(self, shape):
        self.shape = shape


def elect_files(expert_scores_path, base_scores_path, rate: float, pattern: str, out_path) -> dict:
    """Election from two score files (rank16 or float32) to one mask file, tensor by tensor to bound memory.

    Returns counts: {'numel', 'elected'}."""
    _check_pattern(pattern)
    top_k_count(1, rate)
    use_base = pattern[0] != "x"
    if use_base and base_scores_path is None:
        raise LedmergeError(f"election pattern {pattern!r} needs the base model's scores")
    masks, numel, kept, capped, located = {}, 0, 0, [], {}
    with contextlib.ExitStack() as stack:  # each score file opened once, its header parsed once
        expert_file = stack.enter_context(ScoreFile(expert_scores_path))
        base_file = stack.enter_context(ScoreFile(base_scores_path)) if use_base else None
        if use_base:
            _check_same({k: _Shape(v) for k, v in expert_file.shapes.items()},
                        {k: _Shape(v) for k, v in base_file.shapes.items()}, str(expert_scores_path), str(base_scores_path))
            _check_same_tokens(expert_file, base_file, expert_scores_path, base_scores_path)
        sources = sources_metadata("expert", expert_file.metadata, expert_scores_path)
        if use_base:
            sources.update(sources_metadata("base", base_file.metadata, base_scores_path))
        for name in sorted(expert_file.shapes):
            expert = expert_file.get(name)
            base = base_file.get(name) if use_base else None
            try:  # each model's top-r selected once, for the mask and its statistics
                tops = top_sets(expert, base, rate)
                mask = elect_from_tops(tops, pattern)
            except LedmergeError as exc:
                raise LedmergeError(f"{name} in {expert_scores_path}: {exc}") from None
            raw = expert_file.encoding == "float32" and (not use_base or base_file.encoding == "float32")
            loc = localisation(expert, base, rate, raw=raw, tops=tops)
            located[name] = [loc[c] for c in LOCALISATION_KEYS]
            k = top_k_count(mask.numel(), rate)
            if any(s is not None and int((s > 0).sum()) < k for c, s in zip(pattern, (base, expert)) if c != "x"):
                capped.append(name)
            numel += mask.numel()
            kept += int(mask.sum())
            masks[name] = PackedMask(pack_bits(mask), tuple(mask.shape))
            del mask, expert, base
    save_masks(out_path, masks, metadata={
        "kind": "election", "rate": repr(float(rate)), "pattern": pattern,
        "expert_scores": str(expert_scores_path), "base_scores": str(base_scores_path) if use_base else "",
        "zero_capped": json.dumps(capped), **sources,
        # per tensor, LOCALISATION_KEYS: the statistics of `localisation`, which Disjoint writes to localisation.csv
        "localisation": json.dumps({"keys": LOCALISATION_KEYS, "tensors": located}),
    })
    return {"numel": numel, "elected": kept, "zero_capped": capped}


def _check_same_tokens(expert: ScoreFile, base: ScoreFile, expert_scores_path, base_scores_path) -> None:
    """Base and expert of a task must be scored on the same token ids, or the intersection compares scores of
    different texts (a base without a chat template scored on plain text, the expert on its chat format)."""
    fingerprints = [f.metadata.get("tokens_sha256") for f in (expert, base)]
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        raise LedmergeError(f"{expert_scores_path} and {base_scores_path} were scored on different token ids "
                            "(another tokenizer, chat template, calibration set or max_length): rescore both with "
                            "the same tokenizer directory (ledmerge importance --tokenizer)")


def _check_same_base(elected_paths: dict, metadata: dict[str, dict[str, str]]) -> None:
    """Every task's election must intersect with scores of the same base model (when the files say which).
    `metadata`: each task's election's (`MaskFile.user_metadata`)."""
    seen = {}
    for task, path in elected_paths.items():
        meta = metadata[task]
        files = recorded_files(meta, "base", path)
        if files is not None:
            seen[task] = ({n: f["sha256"] for n, f in files.items()}, meta.get("base_scores", "?"))
    first, (want, first_scores) = next(iter(seen.items()), (None, (None, None)))
    for task, (files, scores) in seen.items():
        if files != want:
            raise LedmergeError(f"the elections of tasks '{first}' and '{task}' used scores of different base models "
                                f"({first_scores} and {scores}): rerun the importance and election steps")


def _write_csv(path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


LOCALISATION_KEYS = ["top_expert", "top_base", "overlap", "mass_expert", "mass_base"]
LOCALISATION_COLUMNS = ["task", "tensor", "layer", "module", "numel", "rate", *LOCALISATION_KEYS, "chance",
                        "overlap_share", "elected", "kept", "removed_share", "kept_fraction"]
STATS_COLUMNS = ["task", "tensor", "layer", "module", "numel", "elected", "kept", "elected_fraction", "kept_fraction",
                 "zero_capped"]
OVERLAP_COLUMNS = ["task_a", "task_b", "tensor", "layer", "module", "numel", "overlap", "overlap_fraction", "jaccard"]


def localisation_row(task: str, name: str, rate: str, recorded: list | None, elected: int, kept: int,
                     numel: int) -> dict:
    """One row of localisation.csv: the election's statistics (`localisation`, recorded in its mask file) with what
    Disjoint did to the task's election of the tensor. `chance`: the overlap share that independent top-r sets
    would give (top_base/n, about r); `overlap_share` = overlap/top_expert; `removed_share`: the share of the
    election that Disjoint removed; `kept_fraction`: the final mask's share of the tensor."""
    layer, module = layer_and_module(name)
    loc = dict(zip(LOCALISATION_KEYS, recorded or [None] * len(LOCALISATION_KEYS)))
    top_e, top_b, both = loc["top_expert"], loc["top_base"], loc["overlap"]
    return {"task": task, "tensor": name, "layer": layer, "module": module, "numel": numel, "rate": rate, **loc,
            "chance": top_b / numel if top_b is not None and numel else None,
            "overlap_share": both / top_e if both is not None and top_e else None,
            "elected": elected, "kept": kept, "removed_share": (elected - kept) / elected if elected else None,
            "kept_fraction": kept / numel if numel else 0.0}


def disjoint_files(elected_paths: dict, out_paths: dict, stats_csv, overlap_csv, localisation_csv=None) -> None:
    """Disjoint over every task's election file; writes one mask file per task and the two CSVs, and with
    `localisation_csv` the localisation statistics (`localisation_row`).

    Tensor by tensor: only one tensor's masks (all tasks) are ever unpacked at once."""
    if set(elected_paths) != set(out_paths):
        raise LedmergeError(f"tasks of the election files {sorted(elected_paths)} and of the outputs "
                            f"{sorted(out_paths)} differ")
    if not elected_paths:
        raise LedmergeError("disjoint needs at least one task")
    tasks = list(elected_paths)
    final: dict[str, dict[str, PackedMask]] = {t: {} for t in tasks}
    rows: dict[str, list] = {t: [] for t in tasks}
    overlap_rows: dict[tuple, list] = {pair: [] for pair in itertools.combinations(tasks, 2)}
    with contextlib.ExitStack() as stack:  # each election opened once, its header parsed and checked once
        files = {t: stack.enter_context(MaskFile(elected_paths[t])) for t in tasks}
        for t in tasks[1:]:
            _check_same({k: _Shape(v) for k, v in files[tasks[0]].shapes.items()},
                        {k: _Shape(v) for k, v in files[t].shapes.items()}, f"task '{tasks[0]}'", f"task '{t}'")
        metadata = {t: files[t].user_metadata for t in tasks}
        # Tensors where a model had fewer positive scores than ⌈r·n⌉: the election kept fewer entries.
        zero_capped = {t: set(json.loads(metadata[t].get("zero_capped", "[]"))) for t in tasks}
        located = {t: json.loads(metadata[t].get("localisation", '{"tensors": {}}'))["tensors"] for t in tasks}
        loc_rows = []
        _check_same_base(elected_paths, metadata)
        for name in files[tasks[0]].shapes:
            elected = {t: {name: files[t].get(name)} for t in tasks}
            kept = disjoint(elected)
            tensor_rows, tensor_overlap = mask_stats(elected, kept)
            for row in tensor_rows:
                row["zero_capped"] = name in zero_capped[row["task"]]
                rows[row["task"]].append(row)
                t = row["task"]
                loc_rows.append(localisation_row(t, name, metadata[t].get("rate", ""), located[t].get(name),
                                                 row["elected"], row["kept"], row["numel"]))
            for row in tensor_overlap:
                overlap_rows[(row["task_a"], row["task_b"])].append(row)
            for t in tasks:
                final[t][name] = PackedMask(pack_bits(kept[t][name]), tuple(kept[t][name].shape))
            del elected, kept
    for task in tasks:
        meta = metadata[task]
        save_masks(out_paths[task], final[task], metadata={
            "kind": "disjoint", "task": task, "tasks": ",".join(tasks), "rate": meta.get("rate", ""),
            "pattern": meta.get("pattern", ""), "elected": str(elected_paths[task]),
            **{k: v for k, v in meta.items() if k.startswith(("expert_", "base_"))},  # where the scores came from
        })
    _write_csv(stats_csv, [r for t in tasks for r in rows[t]], STATS_COLUMNS)
    _write_csv(overlap_csv, [r for pair in overlap_rows for r in overlap_rows[pair]], OVERLAP_COLUMNS)
    if localisation_csv is not None:
        _write_csv(localisation_csv, sorted(loc_rows, key=lambda r: (tasks.index(r["task"]), r["tensor"])),
                   LOCALISATION_COLUMNS)
