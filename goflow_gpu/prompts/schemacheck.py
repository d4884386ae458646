"""Checks of a spec's JSON schema: validity (errors) and tightness (lint warnings).

Errors: the schema is not valid JSON Schema draft 2020-12, its top level is not an object, an
``enum`` value does not have the declared type (YAML turns unquoted ``no``/``yes``/``on`` into
booleans, a classic trap), or a part of it no answer can satisfy (:func:`unsatisfiable`): with
structured decoding such a schema cannot be decoded at all, and without it every answer fails QA
and is asked again until the retries run out. Warnings: anything unbounded. Bounds matter twice:
structured decoding needs them to end (an unbounded string or number lets a weak model run on
until the token budget), and QA needs them to keep results small and predictable.

Every problem comes with the path of the keyword inside the schema (the loader turns it into the
file's line) and a message that starts with the field it concerns (``objects[].name``), so an
author finds it by either.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any, TypeGuard, TypeVar

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
_T = TypeVar("_T", dict[str, Any], list[Any])
#: Keywords whose value holds subschemas by name or index; any other key ends a field path.
_BY_NAME = ("properties", "$defs", "patternProperties")
_BY_INDEX = ("anyOf", "oneOf", "allOf", "prefixItems")
_SINGLE = ("items", "additionalProperties", "not", "contains")
#: (lower, upper) keyword pairs whose lower bound must not exceed the upper one.
_COUNT_BOUNDS = (
    ("minLength", "maxLength"),
    ("minItems", "maxItems"),
    ("minProperties", "maxProperties"),
    ("minContains", "maxContains"),
)


def schema_errors(schema: dict[str, Any]) -> list[tuple[PathKey, str]]:
    """Problems that make the schema unusable, each with its path inside the schema."""
    problems: list[tuple[PathKey, str]] = []
    for error in sorted(_META.iter_errors(schema), key=lambda e: list(map(str, e.absolute_path))):
        where = tuple(error.absolute_path)
        field, keyword = _split(where)
        at = f" at '{'.'.join(map(str, keyword))}'" if keyword else ""
        problems.append((where, f"{_describe(field)}: invalid JSON schema{at}: {error.message}"))
    if problems:
        return problems
    if schema.get("type") != "object":
        problems.append((("type",), "(top level): the schema must be 'type: object'"))
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
        if isinstance(declared, str) and declared in _JSON_TYPES:
            for index, value in enumerate(node.get("enum") or []):
                if not _has_type(value, declared):
                    problems.append(
                        (
                            (*path, "enum", index),
                            f"{_describe(path)}: enum value {value!r} is not of type {declared} "
                            "(quote it in YAML, e.g. 'no')",
                        )
                    )
            if "const" in node and not _has_type(node["const"], declared):
                problems.append(
                    (
                        (*path, "const"),
                        f"{_describe(path)}: const {node['const']!r} is not of type {declared}",
                    )
                )
        problems.extend(unsatisfiable(node, path))
    return problems


def unsatisfiable(node: dict[str, Any], path: PathKey = ()) -> list[tuple[PathKey, str]]:
    """Why no value can satisfy ``node`` (at ``path`` in its schema) by its own keywords, not
    its subschemas' (:func:`walk_schemas` visits those themselves): the path of each keyword at
    fault, and a message that starts with the field.

    Found: a required property the object cannot have (not in ``properties`` while
    ``additionalProperties`` is false, or whose schema is ``false``), more required properties
    than ``maxProperties``, a lower count bound above its upper one (``minItems`` >
    ``maxItems``, ``minLength`` > ``maxLength``, ...), an empty numeric range (``minimum`` >
    ``maximum``, exclusive bounds that meet, an integer range with no integer in it), an empty
    ``enum``, and an array that needs more items than ``items: false`` lets it have.
    """
    out: list[tuple[PathKey, str]] = []
    field = _describe(path)
    nothing = "no answer can satisfy it"
    properties = _of(node, "properties", dict)
    patterns = _of(node, "patternProperties", dict)
    required = _of(node, "required", list)
    for index, name in enumerate(required):
        if not isinstance(name, str):
            continue
        member = _describe((*path, "properties", name))
        if properties.get(name) is False:
            out.append(
                (
                    (*path, "properties", name),
                    f"{member}: required, but its schema is false: {nothing}",
                )
            )
        elif (
            name not in properties
            and node.get("additionalProperties") is False
            and not any(_matches(pattern, name) for pattern in patterns)
        ):
            out.append(
                (
                    (*path, "required", index),
                    f"{member}: required, but not in properties while additionalProperties is "
                    f"false: {nothing} (add it to properties, or remove it from required)",
                )
            )
    most = node.get("maxProperties")
    if _is_number(most) and len(set(required)) > most:
        out.append(
            (
                (*path, "maxProperties"),
                f"{field}: {len(set(required))} required properties but maxProperties {most}: "
                f"{nothing}",
            )
        )
    for lower, upper in _COUNT_BOUNDS:
        low, high = node.get(lower), node.get(upper)
        if _is_number(low) and _is_number(high) and low > high:
            out.append(
                ((*path, lower), f"{field}: {lower} {low} is above {upper} {high}: {nothing}")
            )
    for where, message in _empty_range(node):
        out.append(((*path, *where), f"{field}: {message}"))
    if node.get("enum") == []:
        out.append(((*path, "enum"), f"{field}: empty enum: {nothing} (list the allowed values)"))
    prefix = _of(node, "prefixItems", list)
    fewest = node.get("minItems")
    if node.get("items") is False and _is_number(fewest) and fewest > len(prefix):
        out.append(
            (
                (*path, "minItems"),
                f"{field}: minItems {fewest} but items is false after {len(prefix)} "
                f"prefixItems: {nothing}",
            )
        )
    return out


def _empty_range(node: dict[str, Any]) -> list[tuple[PathKey, str]]:
    """``minimum``/``exclusiveMinimum`` and ``maximum``/``exclusiveMaximum`` that leave no value."""
    low, low_key, low_open = _bound(node, "minimum", "exclusiveMinimum", max)
    high, high_key, high_open = _bound(node, "maximum", "exclusiveMaximum", min)
    if low is None or high is None:
        return []
    shown = f"{low_key} {low} and {high_key} {high} leave no value"
    if low > high or (low == high and (low_open or high_open)):
        return [((low_key,), f"{shown}: no answer can satisfy it")]
    if node.get("type") == "integer":
        first = math.floor(low) + 1 if low_open and float(low).is_integer() else math.ceil(low)
        last = math.ceil(high) - 1 if high_open and float(high).is_integer() else math.floor(high)
        if first > last:
            return [((low_key,), f"{shown} for an integer: no answer can satisfy it")]
    return []


def _bound(
    node: dict[str, Any], inclusive: str, exclusive: str, tighter: Any
) -> tuple[float | None, str, bool]:
    """The effective bound of one side: ``(value, keyword, open)``; the tighter one wins."""
    candidates = [
        (node[key], key, key == exclusive)
        for key in (inclusive, exclusive)
        if _is_number(node.get(key))
    ]
    if not candidates:
        return None, inclusive, False
    value = tighter(c[0] for c in candidates)
    # At a tie the exclusive bound is the tighter one.
    chosen = [c for c in candidates if c[0] == value]
    return value, chosen[-1][1], any(c[2] for c in chosen)


def _of(node: dict[str, Any], key: str, kind: type[_T]) -> _T:
    """``node[key]`` when it is a ``kind``, else an empty one (a wrong type is the meta-schema's
    to report)."""
    value = node.get(key)
    return value if isinstance(value, kind) else kind()


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _matches(pattern: Any, name: str) -> bool:
    try:
        return re.search(str(pattern), name) is not None
    except re.error:
        return False


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
    for name, sub in (schema.get("patternProperties") or {}).items():
        yield from walk_schemas(sub, (*path, "patternProperties", name))
    for key in _SINGLE:
        if isinstance(schema.get(key), dict):
            yield from walk_schemas(schema[key], (*path, key))
    for key in _BY_INDEX:
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


def _split(path: PathKey) -> tuple[PathKey, PathKey]:
    """``(subschema path, keyword path)`` of a path into the schema.

    ``properties.label.maxLength`` -> ``(properties.label, maxLength)``: the field a meta-schema
    error concerns, and the keyword of that field at fault.
    """
    i = 0
    while i < len(path):
        part = path[i]
        if part in _BY_NAME or part in _BY_INDEX:
            if i + 1 == len(path):
                break
            i += 2
        elif part in _SINGLE:
            i += 1
        else:
            break
    return tuple(path[:i]), tuple(path[i:])


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
