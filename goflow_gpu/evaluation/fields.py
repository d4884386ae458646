"""Which kind of comparison each labelled field gets, read from the spec's JSON schema.

A label is a *partial* analysisResult in wire form. :func:`plan_fields` walks it beside the
schema and returns one :class:`FieldRule` per field to score; nested objects recurse and give
dotted paths (``focal_point.subject``, ``flags.alcohol.present``). The kinds:

=========  ==========================================================================
``exact``  a boolean, ``null``, or a string the schema limits by ``enum``/``const``
``number`` an integer or number: right within ``max(abs_tol, rel_tol * |expected|)``
``text``   a free string: similarity of the normalised texts (:func:`normalise`)
``set``    a list of strings: F1 of the normalised sets
``box``    one box ``{x, y, width, height}`` under the key ``bounding_box``: IoU >= threshold
``boxes``  a list of objects carrying a ``bounding_box``: one-to-one matching by IoU, F1
``items``  a list of objects without a box: one-to-one matching on the labelled fields, F1
=========  ==========================================================================

Inside list items every labelled field besides the box must *agree* for two items to match:
strings equal after normalising, numbers within tolerance, booleans and ``null`` exactly. Label
only what must agree (``{name: circle, bounding_box: ...}`` leaves ``confidence`` free).

Boxes are compared in the wire form the worker POSTs (``bounding_box`` in the original
image's pixels). A spec's schema may describe the model's own form instead (Qwen's ``bbox_2d``
corners, converted by QA), so a labelled ``bounding_box`` is accepted wherever the schema's
object has a box-like property: an object with ``x``/``y``/``width``/``height``, or an array of
four numbers.

Problems with a label (a field the schema lacks, a value of the wrong type, a value outside the
field's enum) raise :class:`FieldError` with the dotted path; callers add the file name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BOX_KEY = "bounding_box"
"""The wire key of a box, as the worker POSTs it."""
BOX_SIDES: tuple[str, ...] = ("x", "y", "width", "height")

KINDS: tuple[str, ...] = ("exact", "number", "text", "set", "box", "boxes", "items")
BOX_KINDS: frozenset[str] = frozenset({"box", "boxes"})

_SPACE = re.compile(r"\s+")
_MAX_REF_DEPTH = 32


class FieldError(ValueError):
    """A label that does not fit the schema; ``path`` is the dotted field path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path or '(top level)'}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class FieldRule:
    """One labelled field to score: where it is, how to compare it, what is expected."""

    path: str
    keys: tuple[str, ...]
    kind: str
    expected: Any


def normalise(text: str) -> str:
    """Lower-case, trimmed, runs of whitespace collapsed to one space."""
    return _SPACE.sub(" ", text).strip().lower()


def is_box(value: Any) -> bool:
    """True for ``{x, y, width, height}`` with finite numbers and positive sides."""
    if not isinstance(value, Mapping):
        return False
    for side in BOX_SIDES:
        number = value.get(side)
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            return False
        if not math.isfinite(number):
            return False
    return bool(value["width"] > 0 and value["height"] > 0)


def plan_fields(expected: Mapping[str, Any], schema: Mapping[str, Any]) -> list[FieldRule]:
    """One rule per labelled field of ``expected`` (a partial analysisResult).

    Raises :class:`FieldError` naming the first field that does not fit ``schema``.
    """
    rules: list[FieldRule] = []
    _plan_object(expected, _resolve(schema, schema), schema, (), rules)
    return rules


def _check_item(
    item: Any, item_schema: Mapping[str, Any], root: Mapping[str, Any], path: str
) -> None:
    """Check one labelled list item against its schema (see the module docstring)."""
    if not isinstance(item, Mapping):
        raise FieldError(path, f"a list item must be a mapping, got {_type_name(item)}")
    resolved = _resolve(item_schema, root)
    if "object" not in _types(resolved):
        raise FieldError(path, "the schema does not describe these list items as objects")
    for key, value in item.items():
        where = f"{path}.{key}"
        if key == BOX_KEY:
            if not _has_box_property(resolved, root):
                raise FieldError(where, "the schema's items have no box")
            if not is_box(value):
                raise FieldError(where, "a box needs numbers x, y, width, height (sides > 0)")
            continue
        child = _property(resolved, key, root, where)
        if isinstance(value, (Mapping, list)):
            raise FieldError(where, "inside list items only strings, numbers, booleans are scored")
        _scalar_kind(value, child, root, where)


# --- walking ---------------------------------------------------------------------------------


def _plan_object(
    expected: Any,
    schema: Mapping[str, Any],
    root: Mapping[str, Any],
    keys: tuple[str, ...],
    rules: list[FieldRule],
) -> None:
    path = ".".join(keys)
    if not isinstance(expected, Mapping):
        raise FieldError(path, f"expected a mapping of fields, got {_type_name(expected)}")
    if "object" not in _types(schema):
        raise FieldError(path, "the schema does not describe an object here")
    for key, value in expected.items():
        if not isinstance(key, str):
            raise FieldError(path, f"field names must be strings, got {key!r}")
        child_keys = (*keys, key)
        where = ".".join(child_keys)
        if key == BOX_KEY and not isinstance(value, list):
            if not _has_box_property(schema, root):
                raise FieldError(where, "not a field of this analysis (the schema has no box here)")
            if not is_box(value):
                raise FieldError(where, "a box needs numbers x, y, width, height (sides > 0)")
            rules.append(FieldRule(where, child_keys, "box", dict(value)))
            continue
        child = _property(schema, key, root, where)
        if isinstance(value, Mapping):
            _plan_object(value, child, root, child_keys, rules)
        elif isinstance(value, list):
            rules.append(FieldRule(where, child_keys, _list_kind(value, child, root, where), value))
        else:
            rules.append(
                FieldRule(where, child_keys, _scalar_kind(value, child, root, where), value)
            )


def _list_kind(
    value: list[Any], schema: Mapping[str, Any], root: Mapping[str, Any], path: str
) -> str:
    if "array" not in _types(schema):
        raise FieldError(path, "the schema does not describe a list here")
    items = _resolve(schema.get("items") or {}, root)
    item_types = _types(items)
    if "object" in item_types:
        for index, item in enumerate(value):
            _check_item(item, items, root, f"{path}[{index}]")
        with_box = [isinstance(item, Mapping) and BOX_KEY in item for item in value]
        if any(with_box) and not all(with_box):
            raise FieldError(path, "either every labelled item has a bounding_box or none has")
        if value:
            return "boxes" if all(with_box) else "items"
        return "boxes" if _has_box_property(items, root) else "items"
    if "string" in item_types:
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise FieldError(f"{path}[{index}]", f"expected a string, got {_type_name(item)}")
            _check_enum(item, items, f"{path}[{index}]")
        return "set"
    raise FieldError(path, "only lists of strings or of objects can be scored")


def _scalar_kind(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any], path: str) -> str:
    types = _types(schema)
    if value is None:
        if "null" not in types:
            raise FieldError(path, "null is not allowed here by the schema")
        return "exact"
    if isinstance(value, bool):
        if "boolean" not in types:
            raise FieldError(path, f"expected {_or(types)}, got a boolean")
        return "exact"
    if isinstance(value, int | float):
        if "number" in types or ("integer" in types and float(value).is_integer()):
            _check_enum(value, schema, path)
            return "exact" if "enum" in schema or "const" in schema else "number"
        raise FieldError(path, f"expected {_or(types)}, got the number {value!r}")
    if isinstance(value, str):
        if "string" not in types:
            raise FieldError(path, f"expected {_or(types)}, got a string")
        _check_enum(value, schema, path)
        return "exact" if "enum" in schema or "const" in schema else "text"
    raise FieldError(path, f"a {_type_name(value)} cannot be a label (use JSON types only)")


# --- schema helpers --------------------------------------------------------------------------


def _resolve(schema: Any, root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow local ``$ref``s and pick the first non-null branch of ``anyOf``/``oneOf``."""
    current: Any = schema
    for _ in range(_MAX_REF_DEPTH):
        if not isinstance(current, Mapping):
            return {}
        ref = current.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            target: Any = root
            for part in ref.lstrip("#").strip("/").split("/") if ref != "#" else []:
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, Mapping) else None
            current = target
            continue
        for combiner in ("anyOf", "oneOf"):
            branches = current.get(combiner)
            if isinstance(branches, list) and "type" not in current:
                real = [b for b in branches if _types(_resolve(b, root)) != {"null"}]
                nulls = len(real) < len(branches)
                if real:
                    merged = dict(_resolve(real[0], root))
                    if nulls:
                        merged["type"] = sorted(_types(merged) | {"null"})
                    return merged
        return current
    return {}


def _types(schema: Mapping[str, Any]) -> set[str]:
    declared = schema.get("type")
    if isinstance(declared, str):
        types = {declared}
    elif isinstance(declared, list):
        types = {t for t in declared if isinstance(t, str)}
    else:
        values = list(schema.get("enum") or []) + ([schema["const"]] if "const" in schema else [])
        types = {_json_type(v) for v in values}
        if not types and "properties" in schema:
            types = {"object"}
        if not types and "items" in schema:
            types = {"array"}
    return types


def _property(
    schema: Mapping[str, Any], key: str, root: Mapping[str, Any], path: str
) -> Mapping[str, Any]:
    properties = schema.get("properties")
    if isinstance(properties, Mapping) and key in properties:
        return _resolve(properties[key], root)
    known = sorted(properties) if isinstance(properties, Mapping) else []
    hint = f"; its fields here are {', '.join(known)}" if known else ""
    raise FieldError(path, f"not a field of this analysis{hint}")


def _has_box_property(schema: Mapping[str, Any], root: Mapping[str, Any]) -> bool:
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return False
    if BOX_KEY in properties:
        return True
    return any(_box_like(_resolve(p, root), root) for p in properties.values())


def _box_like(schema: Mapping[str, Any], root: Mapping[str, Any]) -> bool:
    properties = schema.get("properties")
    if isinstance(properties, Mapping) and all(side in properties for side in BOX_SIDES):
        return True
    if "array" not in _types(schema):
        return False
    prefix = schema.get("prefixItems")
    if isinstance(prefix, list):
        return len(prefix) == 4
    items = _resolve(schema.get("items") or {}, root)
    numeric = bool(_types(items) & {"integer", "number"})
    return numeric and schema.get("minItems") == 4 and schema.get("maxItems") == 4


def _check_enum(value: Any, schema: Mapping[str, Any], path: str) -> None:
    allowed = list(schema.get("enum") or []) + ([schema["const"]] if "const" in schema else [])
    if allowed and value not in allowed:
        shown = ", ".join(repr(a) for a in allowed[:20])
        raise FieldError(path, f"{value!r} is not one of the allowed values {shown}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, str, bool, int, float)):
        return f"a {_json_type(value).replace('array', 'list').replace('integer', 'number')}"
    return f"a {type(value).__name__}"


def _or(types: set[str]) -> str:
    return " or ".join(sorted(types)) if types else "nothing (the schema gives no type)"
