"""The merge spec of each configured merge: the one object `ledmerge check-config` validates, the merge job runs
(the workflow passes it as the merge rule's `--spec`) and a sweep varies (`ledmerge.sweeps`).

Its own module, below both `ledmerge.config` (whose checks validate it) and `ledmerge.sweeps` (whose points vary
it), so that neither imports the other to get it.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .layout import is_hub, model_dir


def merge_spec(config: dict, name: str) -> dict:
    """The full spec of merge `name`, the one object both `check` validates and the merge job runs (the workflow
    passes it as the merge rule's `--spec`); an entry {mergekit: file} is translated (`mergekit_spec`). LED's
    per-task λ: `lambdas.<t>` of the spec where given, else `tasks.<t>.lambda` (a partial `lambdas` falls back per
    task). A post-step's unset `aligned`: `alignment_task`."""
    from .merge.registry import POST_STEPS

    entry = config["merges"][name]
    spec = mergekit_spec(config, entry) if "mergekit" in entry else copy.deepcopy(entry)
    for key in POST_STEPS:
        if isinstance(spec.get(key), dict) and spec[key].get("aligned") is None:
            spec[key]["aligned"] = config["alignment_task"]
    if spec["method"] == "led":
        given = spec.get("lambdas") or {}
        spec["lambdas"] = {t: float(given.get(t, task["lambda"])) for t, task in config["tasks"].items()}
        spec["lambdas"].update({t: v for t, v in given.items() if t not in config["tasks"]})  # check reports these
    return spec


def mergekit_spec(config: dict, entry: dict) -> dict:
    """The spec of a merge given as a mergekit file (`ledmerge.merge.mergekit_io`). Its models map to the run's by
    the rule documented in docs/workflow.md: a hub id equal to a {hub: org/name} model's (with `@revision` when
    not main), else a path (relative: to the working directory, as mergekit reads it) that resolves to the same
    directory as the model's."""
    from .checkpoint import ModelReader
    from .merge.mergekit_io import MIXED, floating_dtype, from_mergekit, read_mergekit

    names = ["base", *config["tasks"]]
    sources = {n: config["base_model"] if n == "base" else config["tasks"][n]["model"] for n in names}

    def identify(ref: str) -> str | None:
        for n in names:
            source = sources[n]
            if is_hub(source) and ref in (f"{source['hub']}@{source['revision']}",
                                          *([source["hub"]] if source["revision"] == "main" else [])):
                return n
            if Path(ref).resolve() == Path(model_dir(config, n)).resolve():
                return n
        return None

    def base_dtype() -> str | None:
        if not Path(model_dir(config, "base")).is_dir():
            return None
        with ModelReader(model_dir(config, "base"), allow_pickle=config["allow_pickle"]) as reader:
            return floating_dtype(reader.infos) or MIXED

    path = entry["mergekit"]
    return from_mergekit(read_mergekit(path), path, sorted(config["tasks"]), identify, base_dtype, entry.get("seed"))
