"""The one definition of every option: the JSON Schema `schemas/config.schema.yaml`.

Type, default, allowed values and description of each key live in the schema, the file users write their
configuration against; every other layer reads them from here: the workflow's config validation
(`config.validate`), the CLI (`--options` of each step is resolved through `resolve`, its `--help` lists the
section's options), the package functions (which take the resolved values without defaults of their own) and
docs/configuration.md (`reference_markdown`).
"""

from __future__ import annotations

import copy
import functools
import json
import math
from importlib import resources

import yaml
from jsonschema import Draft202012Validator, validators

from .errors import LedmergeError


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("ledmerge").joinpath("schemas/config.schema.yaml").read_text()


@functools.lru_cache(maxsize=1)
def _parsed_schema() -> dict:
    # Parsed once per process (libyaml when available): every `resolve` reads the schema, ~0.4 s per parse.
    return yaml.load(_schema_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def schema() -> dict:
    """The whole configuration schema (a fresh copy)."""
    return copy.deepcopy(_parsed_schema())


def _resolve_refs(node, root: dict):
    if isinstance(node, dict):
        if "$ref" in node:
            target = root
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            merged = {**_resolve_refs(target, root), **{k: v for k, v in node.items() if k != "$ref"}}
            return _resolve_refs(merged, root)
        return {k: _resolve_refs(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_refs(v, root) for v in node]
    return node


def section(path: str) -> dict:
    """The sub-schema of a dotted section path ("importance", "data_aware.synthetic"; "" = everything), with
    every $ref resolved (a fresh copy)."""
    return copy.deepcopy(_section(path))


@functools.cache
def _section(path: str) -> dict:
    root = schema()
    node = _resolve_refs(root, root)
    for part in filter(None, path.split(".")):
        props = node.get("properties", {})
        if part not in props:
            raise LedmergeError(f"the configuration has no section {path!r}")
        node = props[part]
    return node


def _copy(value):
    return copy.deepcopy(value)


def _with_defaults(validator_class):
    """A validator that fills in `default` values while it validates (the jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = _copy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def fill(instance: dict, path: str = "", where: str = "", prefix: str = "option ") -> dict:
    """Fill the defaults of section `path` into `instance` (in place) and validate it; the first error becomes
    one line naming the key (`where` prefixes the key, e.g. "importance.") and the fix. Validated against the schema
    with every $ref resolved, so that a `{$ref: ...}` key takes its target's default as `resolve` does."""
    return _fill(instance, section(path), where, prefix)


def fill_definition(instance: dict, name: str, where: str = "", prefix: str = "option ") -> dict:
    """`fill` against one of the schema's `definitions` (e.g. harmbench_judge, for the options a judge is given)."""
    root = schema()
    if name not in root.get("definitions", {}):
        raise LedmergeError(f"the configuration schema has no definition {name!r}")
    return _fill(instance, _resolve_refs(root["definitions"][name], root), where, prefix)


def definition_defaults(name: str) -> dict:
    """The defaults of one of the schema's `definitions` (e.g. lm_eval_task)."""
    root = schema()
    return {k: _copy(v["default"]) for k, v in _resolve_refs(root["definitions"][name], root)["properties"].items()
            if "default" in v}


def _non_finite(value, path: tuple = ()) -> tuple[tuple, float] | None:
    """(path, value) of the first NaN or infinity in `value` (JSON Schema's `number` admits them; no option means
    one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((found for k, v in items if (found := _non_finite(v, (*path, k))) is not None), None)


def _fill(instance: dict, sub: dict, where: str, prefix: str) -> dict:
    found = _non_finite(instance)
    if found is not None:
        key = f"{where}{'.'.join(map(str, found[0]))}" or "(top level)"
        raise LedmergeError(f"{prefix}'{key}': {found[1]} is not a finite number: write a number")
    validator = _with_defaults(Draft202012Validator)(sub)
    # Validate twice: the first pass fills defaults (inside nested defaults too), the second reports.
    list(validator.iter_errors(instance))
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        err = errors[0]
        key = ".".join(map(str, err.absolute_path))
        key = f"{where}{key}" if key else (where.rstrip(".") or "(top level)")
        hint = err.schema.get("description", "") if isinstance(err.schema, dict) else ""
        if err.validator == "additionalProperties" and isinstance(err.schema, dict):  # a misspelt key
            hint = f"allowed keys: {', '.join(sorted(err.schema.get('properties', {})))}"
        raise LedmergeError(f"{prefix}'{key}': {err.message}" + (f" ({hint})" if hint else ""))
    return instance


def resolve(path: str, given: dict | None = None) -> dict:
    """The options of section `path`: a deep copy of `given` with the schema defaults filled in, validated.
    An unknown key or a bad value is one LedmergeError naming e.g. `importance.max_length` and the fix."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise LedmergeError(f"{path}: the options must be a JSON object, got {json.dumps(given)}")
    return fill(_copy(given), path, f"{path}." if path else "")


def defaults(path: str) -> dict:
    """Every default of section `path` (what a run that sets none of its keys uses)."""
    sub = section(path)
    return {k: _copy(v["default"]) for k, v in sub.get("properties", {}).items() if "default" in v}


def _key(path_to_key: str) -> dict:
    """The schema node of one key, e.g. "seed" or "merge.shard_size" (empty when there is none)."""
    parent, _, key = path_to_key.rpartition(".")
    return section(parent).get("properties", {}).get(key) or {}


def default_of(path_to_key: str):
    """The default of one key, e.g. "seed" or "merge.shard_size"."""
    node = _key(path_to_key)
    if "default" not in node:
        raise LedmergeError(f"{path_to_key} has no default")
    return _copy(node["default"])


def allowed(path_to_key: str) -> list:
    """The allowed values (enum) of one key, e.g. "election.pattern"."""
    node = _key(path_to_key)
    if "enum" not in node:
        raise LedmergeError(f"{path_to_key} has no list of allowed values")
    return list(node["enum"])


def sweep_values(axis: str) -> list:
    """The values a sweep axis allows (an enum axis such as `control`), as the schema's sweep definition lists them."""
    return list(_parsed_schema()["definitions"]["sweep"]["properties"][axis]["items"]["enum"])  # a copy of the list


# ----------------------------------------------------------------------------------------------------------------
# The configuration reference (docs/configuration.md, and each CLI step's --help).

def _type(node: dict) -> str:
    if "enum" in node:
        return "one of " + ", ".join(f"`{json.dumps(v) if not isinstance(v, str) else v}`" for v in node["enum"])
    if "oneOf" in node:
        return " or ".join(_type(n) for n in node["oneOf"])
    t = node.get("type", "any")
    t = " or ".join(t) if isinstance(t, list) else t
    if t == "array" and isinstance(node.get("items"), dict):
        t += f" of {_type(node['items'])}"
    return t


def _range(node: dict) -> str:
    parts = []
    for key, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
                     ("minLength", "length >="), ("minItems", "items >="), ("pattern", "matches")):
        if key in node:
            parts.append(f"{sym} {node[key]}")
    return ", ".join(parts)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def option_lines(path: str) -> list[str]:
    """One line per option of section `path`: `key` (type; default; range): description."""
    return _option_lines(section(path))


def _option_lines(sub: dict) -> list[str]:
    out = []
    for key, node in sub.get("properties", {}).items():
        bits = [_type(node)]
        if "default" in node:
            bits.append(f"default {json.dumps(node['default'])}")
        if _range(node):
            bits.append(_range(node))
        desc = _one_line(node.get("description", ""))
        out.append(f"{key} ({'; '.join(bits)})" + (f": {desc}" if desc else ""))
    return out


def conditional_sections(node: dict) -> list[tuple[str, str, str, dict]]:
    """(key, other key, its value, schema) of each object that key `key` of section `node` takes when `other key` has
    that value: the schema's `allOf: [{if: {properties: {judge: {const: harmbench}}}, then: {properties:
    {judge_kwargs: ...}}}]` (evaluation.judge_kwargs, by evaluation.judge)."""
    out = []
    for case in node.get("allOf", []):
        when = {k: v["const"] for k, v in case.get("if", {}).get("properties", {}).items() if "const" in v}
        then = case.get("then", {}).get("properties", {})
        if len(when) == 1 and len(then) == 1:
            (other, value), (key, sub) = next(iter(when.items())), next(iter(then.items()))
            out.append((key, other, value, sub))
    return out


def help_epilog(path: str) -> str:
    """The `--options` keys of a CLI step, for its --help."""
    node = section(path)
    lines, shown = [f"  {line}" for line in _option_lines(node)], []
    for key, other, value, sub in conditional_sections(node):
        mine = _option_lines(sub)
        # a key's options under another value with the same keys: only the lines that differ (e.g. the defaults)
        like = next(((v, theirs) for k, v, theirs, keys in shown if (k, keys) == (key, set(sub["properties"]))), None)
        shown.append((key, value, mine, set(sub["properties"])))
        head = f"  {key} with {other} {value}" + (f" (other keys as with {other} {like[0]})" if like else "")
        lines += [head + ":"] + [f"    {line}" for line in mine if not like or line not in like[1]]
    lines = "\n".join(lines)
    return (f"--options keys (the config's `{path}` section; missing keys take these defaults):\n{lines}")


def _is_section(node: dict) -> bool:
    return node.get("type") == "object" and bool(node.get("properties"))


def _types(node: dict) -> list:
    kind = node.get("type")
    return kind if isinstance(kind, list) else [kind]


def reference_markdown() -> str:
    """The configuration reference: every key with its type, default, allowed values or range and description;
    nested sections as headings. Generated from the schema (`ledmerge config-reference`, `make docs`)."""
    root = section("")
    lines = ["# Configuration reference", "",
             "<!-- Generated from src/ledmerge/schemas/config.schema.yaml by `make docs` "
             "(`ledmerge config-reference`); do not edit by hand. -->", "",
             _one_line(root.get("description", "")), "",
             f"Required top-level keys: {', '.join(f'`{k}`' for k in root.get('required', []))}.", ""]

    def table(node: dict) -> list[str]:
        rows = ["| key | type | default | range | description |", "|---|---|---|---|---|"]
        for key, sub in node.get("properties", {}).items():
            default = f"`{json.dumps(sub['default'])}`" if "default" in sub else ""
            desc = _one_line(sub.get("description", "")).replace("|", "\\|")
            if _is_section(sub):
                desc = (desc + " " if desc else "") + "(section below)"
            kind = _type(sub).replace("|", "\\|")
            rows.append(f"| `{key}` | {kind} | {default} | {_range(sub)} | {desc} |")
        return rows

    def walk(node: dict, path: str, depth: int, when: str = "") -> None:
        if path:
            lines.extend([f"{'#' * min(depth + 1, 6)} `{path}`{when}", ""])
            if node.get("description"):
                lines.extend([_one_line(node["description"]), ""])
        lines.extend(table(node) + [""])
        for key, other, value, sub in conditional_sections(node):  # e.g. judge_kwargs, by judge
            walk(sub, f"{path}.{key}" if path else key, depth + 1, f" with `{other}: {value}`")
        for key, sub in node.get("properties", {}).items():
            if _is_section(sub):
                walk(sub, f"{path}.{key}" if path else key, depth + 1)
            elif "object" in _types(sub) and isinstance(sub.get("additionalProperties"), dict) \
                    and _is_section(sub["additionalProperties"]):
                walk(sub["additionalProperties"], f"{path}.{key}.<name>" if path else f"{key}.<name>", depth + 1)
            elif "array" in _types(sub):  # a list of objects: their keys under `key[]`
                items = sub.get("items", {})
                for option in [o for o in items.get("oneOf", [items]) if _is_section(o)]:
                    walk(option, f"{path}.{key}[]" if path else f"{key}[]", depth + 1)

    walk(root, "", 0)
    return "\n".join(lines).rstrip() + "\n"
