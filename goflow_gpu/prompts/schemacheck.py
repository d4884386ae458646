"""Checks of a spec's JSON schema: validity (errors) and tightness (lint warnings).

Errors: the schema is not valid JSON Schema draft 2020-12, its top level is not an object, or an
``enum`` value does not have the declared type (YAML turns unquoted ``no``/``yes``/``on`` into
booleans, a classic trap). Warnings: anything unbounded. Bounds matter twice: structured
decoding needs them to end (an unbounded string or number lets a weak model run on until the
token budget), and QA needs them to keep results small and predictable.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator

from goflow_gpu.prompts.yamlsrc import PathKey

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "array": (list,),
    "object": (dict,),
}
_META = Draft202012Validator(Draft202012Validator.META_SCHEMA)


def schema_errors(schema: dict[str, Any]) -> list[tuple[PathKey, str]]:
    """Problems that make the schema unusable, each with its path inside the schema."""
    problems: list[tuple[PathKey, str]] = []
    for error in sorted(_META.iter_errors(schema), key=lambda e: list(map(str, e.absolute_path))):
        problems.append((tuple(error.absolute_path), f"invalid JSON schema: {error.message}"))
    if problems:
        return problems
    if schema.get("type") != "object":
        problems.append((("type",), "the top level of the schema must be 'type: object'"))
    for path, node in walk_schemas(schema):
        declared = node.get("type")
        if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
            # vLLM refuses such a schema for xgrammar (its structured-decoding backend): every
            # request of the analysis would fail on the GPU. An anchored pattern bounds the
            # length by itself.
            problems.append(
                (
                    path,
                    f"{_describe(path)}: pattern/format together with minLength/maxLength is not "
                    "supported by vLLM's structured decoding (xgrammar); bound the length in "
                    "the pattern instead, e.g. ^#[0-9a-f]{6}$",
                )
            )
        if "enum" in node and isinstance(declared, str) and declared in _JSON_TYPES:
            for index, value in enumerate(node["enum"]):
                if not _has_type(value, declared):
                    problems.append(
                        (
                            (*path, "enum", index),
                            f"enum value {value!r} is not of type {declared} "
                            "(quote it in YAML, e.g. 'no')",
                        )
                    )
    return problems


def schema_warnings(schema: dict[str, Any]) -> list[tuple[PathKey, str]]:
    """Places where the schema does not bound the answer."""
    warnings: list[tuple[PathKey, str]] = []
    for path, node in walk_schemas(schema):
        kind = node.get("type")
        if "enum" in node or "const" in node:
            continue
        where = _describe(path)
        if kind == "string" and "maxLength" not in node and "pattern" not in node:
            warnings.append((path, f"{where}: string without maxLength"))
        elif kind == "array" and "maxItems" not in node:
            warnings.append((path, f"{where}: array without maxItems"))
        elif kind in ("number", "integer") and ("minimum" not in node or "maximum" not in node):
            warnings.append((path, f"{where}: {kind} without both minimum and maximum"))
        elif kind == "object":
            props = set(node.get("properties", {}))
            missing = sorted(props - set(node.get("required", [])))
            if missing:
                warnings.append((path, f"{where}: properties not in required: {missing}"))
            if node.get("additionalProperties") is not False:
                warnings.append((path, f"{where}: object without additionalProperties: false"))
        elif kind is None and not any(node.get(k) for k in ("anyOf", "oneOf")):
            # A union is typed by its branches, which are walked (and warned about) themselves.
            warnings.append((path, f"{where}: no type (anything goes)"))
    return warnings


def walk_schemas(schema: Any, path: PathKey = ()) -> Iterator[tuple[PathKey, dict[str, Any]]]:
    """Every subschema reachable through properties, items and the combinators, with its path."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk_schemas(sub, (*path, "properties", name))
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            yield from walk_schemas(schema[key], (*path, key))
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for index, sub in enumerate(schema.get(key) or []):
            yield from walk_schemas(sub, (*path, key, index))
    for name, sub in (schema.get("$defs") or {}).items():
        yield from walk_schemas(sub, (*path, "$defs", name))


def _has_type(value: Any, declared: str) -> bool:
    if isinstance(value, bool) and declared in ("integer", "number"):
        return False
    if declared == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES[declared])


def _describe(path: PathKey) -> str:
    """``properties.objects.items.properties.name`` -> ``objects[].name``."""
    out = ""
    parts = list(path)
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == "properties" and i + 1 < len(parts):
            out += ("." if out else "") + str(parts[i + 1])
            i += 2
            continue
        if part == "items":
            out += "[]"
        else:
            out += ("." if out else "") + str(part)
        i += 1
    return out or "(top level)"
