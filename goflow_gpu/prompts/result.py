"""The JSON schema of an analysis type's *result*: what the worker POSTs as ``analysisResult``.

A spec's ``json_schema`` describes what the model is asked. The result differs: QA converts
boxes and points to the original image's pixels under the wire's names, and adds fields the
model is never asked (confidences from log-probabilities, computed fields, pixel facts, the
worker's ``processing_time_seconds`` and, when QA repaired something, ``qa_warnings``).
:func:`result_schema` builds that schema from the spec, in result order, each property marked
with where its value comes from (``x-source``: ``model``, ``computed``, ``pixels``,
``log-probabilities``, ``worker``). The customer reference (docs/ANALYSES.md) and the
evaluation's label checks read it, so both describe what customers actually receive.
"""

from __future__ import annotations

import copy
from typing import Any

from goflow_gpu.prompts.derive import computed_type, insert_after
from goflow_gpu.prompts.geometry import WIRE_BOX_KEY, WIRE_POINT_KEY, WIRE_POINTS_KEY
from goflow_gpu.prompts.spec import QARules

SOURCE = "x-source"
_PIXELS = {"type": "integer", "minimum": 0}
WIRE_BOX_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["x", "y", "width", "height"],
    "properties": {
        "x": {**_PIXELS, "description": "Left edge, in pixels of the original image."},
        "y": {**_PIXELS, "description": "Top edge, in pixels of the original image."},
        "width": {"type": "integer", "minimum": 1, "description": "Width in pixels."},
        "height": {"type": "integer", "minimum": 1, "description": "Height in pixels."},
    },
}
WIRE_POINT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["x", "y"],
    "properties": {
        "x": {**_PIXELS, "description": "Column, in pixels of the original image."},
        "y": {**_PIXELS, "description": "Row, in pixels of the original image."},
    },
}
WORKER_FIELDS: dict[str, dict[str, Any]] = {
    "processing_time_seconds": {
        "type": "number",
        "minimum": 0,
        "description": "Seconds the worker spent on this analysis of this image (all tries).",
        SOURCE: "worker",
    },
    "qa_warnings": {
        "type": "array",
        "items": {"type": "string"},
        "description": "What QA repaired in the model's answer (an item dropped, a count range "
        "set from the points...); present only when something was repaired.",
        SOURCE: "worker",
    },
}


def result_schema(json_schema: dict[str, Any], qa: QARules) -> dict[str, Any]:
    """The schema of the result of a spec with this answer schema and these rules."""
    from goflow_gpu.prompts.pixels import FACTS  # numpy: only when a result schema is needed

    schema: dict[str, Any] = _wire(copy.deepcopy(json_schema), qa)
    for rated in qa.logprob_confidence:
        target, leaf = _target(schema, rated.field)
        if target is not None:
            _insert_after(
                target,
                rated.value,
                leaf,
                {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "maximum": 1,
                    "description": rated.description,
                    SOURCE: "log-probabilities",
                },
            )
    for entry in qa.computed:
        target, leaf = _target(schema, entry.field)
        if target is None:
            continue
        source = _source_items(target, entry.source)
        kind = computed_type(entry, source)
        target.setdefault("properties", {})[leaf] = {
            **kind,
            "description": entry.description,
            SOURCE: f"computed ({entry.rule})",
        }
        target.setdefault("required", []).append(leaf)
    for name, fact in qa.pixel_facts.items():
        info = FACTS[fact]
        schema["properties"][name] = {
            **copy.deepcopy(info.json_schema),
            "description": info.description,
            SOURCE: f"pixels ({fact})",
        }
        schema.setdefault("required", []).append(name)
    schema["properties"].update(copy.deepcopy(WORKER_FIELDS))
    schema.setdefault("required", []).append("processing_time_seconds")
    return schema


def _wire(node: Any, qa: QARules) -> Any:
    """Boxes and points under their wire names and shapes; every asked field marked ``model``."""
    if isinstance(node, list):
        return [_wire(item, qa) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _wire(value, qa) for key, value in node.items()}
    properties = out.get("properties")
    if isinstance(properties, dict):
        renamed: dict[str, Any] = {}
        for name, sub in properties.items():
            new_name, new_sub = _wire_property(name, sub, qa)
            if isinstance(new_sub, dict):
                new_sub.setdefault(SOURCE, "model")
            renamed[new_name] = new_sub
        out["properties"] = renamed
        if isinstance(out.get("required"), list):
            names = dict(zip(properties, renamed, strict=True))
            out["required"] = [names.get(n, n) for n in out["required"]]
    return out


def _wire_property(name: str, sub: Any, qa: QARules) -> tuple[str, Any]:
    described = {"description": sub.get("description", "")} if isinstance(sub, dict) else {}
    if name in qa.box_fields:
        return WIRE_BOX_KEY, {**copy.deepcopy(WIRE_BOX_SCHEMA), **described}
    if name in qa.point_fields:
        if name.startswith("points"):
            bounds = {k: sub[k] for k in ("maxItems",) if isinstance(sub, dict) and k in sub}
            many = {"type": "array", "items": copy.deepcopy(WIRE_POINT_SCHEMA), **bounds}
            return WIRE_POINTS_KEY, {**many, **described}
        return WIRE_POINT_KEY, {**copy.deepcopy(WIRE_POINT_SCHEMA), **described}
    return name, sub


def _target(schema: dict[str, Any], field: str) -> tuple[dict[str, Any] | None, str]:
    """The object schema that holds ``field`` (``a`` or ``list[].a``) and the key in it."""
    if "[]." not in field:
        return schema, field
    name, leaf = field.split("[].", 1)
    items = (schema.get("properties") or {}).get(name, {}).get("items")
    return (items, leaf) if isinstance(items, dict) else (None, leaf)


def _source_items(target: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The schema of the items of ``source`` (for the ``first`` rule), when it is a list."""
    node = (target.get("properties") or {}).get(source.split(".", 1)[0])
    items = node.get("items") if isinstance(node, dict) else None
    if isinstance(items, dict):
        return {k: v for k, v in items.items() if k != SOURCE}
    return None


def _insert_after(target: dict[str, Any], anchor: str, key: str, value: Any) -> None:
    insert_after(target.setdefault("properties", {}), anchor, key, value)
    target.setdefault("required", []).append(key)


__all__ = ["SOURCE", "WORKER_FIELDS", "result_schema"]
