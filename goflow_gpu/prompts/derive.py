"""Fields computed in code from other fields of an answer (a spec's ``qa.computed``).

A field that is a function of others is never asked: ``has_text`` from the text blocks,
``main_tag`` from the tags, ``safe_for_general_audience`` from the categories, a 0-10 score
from the enum it mirrors, an exact count from the points. Asked, such a field costs tokens and
can contradict its evidence (structured decoding writes fields in schema order, so a verdict
asked first is decided before its evidence is written). Computed, it always agrees.

The rules are described on :class:`~goflow_gpu.prompts.spec.Computed`; :func:`apply_computed`
applies a spec's list in order, so a later field may read an earlier one.
:func:`computed_type` is the JSON schema of a computed value, for the generated reference and
for checks of the catalog.
"""

from __future__ import annotations

from typing import Any

from goflow_gpu.prompts.spec import Computed

_MISSING = object()


def apply_computed(result: dict[str, Any], computed: list[Computed]) -> None:
    """Add every computed field to ``result`` (in place), in the order listed."""
    for entry in computed:
        for _, holder, leaf in holders(result, entry.field):
            holder[leaf] = _value(entry, read_path(holder, entry.source))


def holders(
    result: dict[str, Any], field: str
) -> list[tuple[tuple[str | int, ...], dict[str, Any], str]]:
    """The objects that hold ``field`` (``a``, or ``list[].a``: every item of ``list``), each
    as (its path in ``result``, the object, the key in it). Paths of the spec's rules that name
    a result field (computed, confidence, count checks) all read this way."""
    if "[]." not in field:
        return [((), result, field)]
    name, leaf = field.split("[].", 1)
    items = result.get(name)
    if not isinstance(items, list):
        return []
    return [((name, i), item, leaf) for i, item in enumerate(items) if isinstance(item, dict)]


def insert_after(node: dict[str, Any], anchor: str, key: str, value: Any) -> None:
    """Set ``node[key]`` right after ``anchor`` (at the end when ``anchor`` is absent), keeping
    the order of the other keys: a confidence follows the value it rates, in results and in
    the result schema alike."""
    items = [(k, v) for k, v in node.items() if k != key]
    at = next((i + 1 for i, (k, _) in enumerate(items) if k == anchor), len(items))
    items.insert(at, (key, value))
    node.clear()
    node.update(items)


def read_path(node: Any, source: str) -> Any:
    """The value at ``source`` in ``node``: ``a.b`` one value; ``a[].b`` the ``b`` of every item
    of list ``a``; ``a.*`` every value of object ``a``. A missing key reads as ``None``."""
    values: list[Any] = [node]
    many = False
    for part in source.split("."):
        step: list[Any] = []
        if part == "*":
            many = True
            for value in values:
                if isinstance(value, dict):
                    step.extend(value.values())
        else:
            spread = part.endswith("[]")
            key = part[:-2] if spread else part
            for value in values:
                inner = value.get(key) if isinstance(value, dict) else None
                if spread:
                    many = True
                    step.extend(inner if isinstance(inner, list) else [])
                else:
                    step.append(inner)
        values = step
    if many:
        return values
    return values[0] if values else None


def _value(entry: Computed, value: Any) -> Any:
    rule = entry.rule
    if rule == "non_empty":
        return _has_content(value)
    if rule == "count":
        if not isinstance(value, list):
            return None
        if entry.at_most is not None and len(value) >= entry.at_most:
            return None  # the list is full: the exact count is unknown (the bin says more)
        return len(value)
    if rule == "first":
        return value[0] if isinstance(value, list) and value else None
    if rule == "join":
        items = value if isinstance(value, list) else [value]
        return entry.separator.join(v for v in items if isinstance(v, str) and v)
    if rule == "map":
        return entry.mapping.get(value) if isinstance(value, str) else None
    items = value if isinstance(value, list) else [value]
    if rule == "all_in":
        return all(v in entry.values for v in items)
    if rule == "any_in":
        return any(v in entry.values for v in items)
    # worst: the value ranked last in ``values`` among those present
    ranks = [entry.values.index(v) for v in items if isinstance(v, str) and v in entry.values]
    return entry.values[max(ranks)] if ranks else None


def _has_content(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, dict)):
        return bool(value)
    return value is not None and value is not False


def computed_type(entry: Computed, source_schema: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON schema of ``entry``'s value; ``source_schema`` is the schema of its source's
    items (for ``first``) where known."""
    rule = entry.rule
    if rule in ("non_empty", "all_in", "any_in"):
        return {"type": "boolean"}
    if rule == "count":
        if entry.at_most is not None:
            return {"type": ["integer", "null"], "minimum": 0, "maximum": entry.at_most - 1}
        return {"type": "integer", "minimum": 0}
    if rule == "join":
        return {"type": "string"}
    if rule == "first":
        return {"anyOf": [source_schema or {}, {"type": "null"}]}
    if rule == "worst":
        return {"type": ["string", "null"], "enum": [*entry.values, None]}
    values = list(entry.mapping.values())
    if values and all(isinstance(v, str) for v in values):
        return {"type": "string", "enum": sorted(set(values), key=values.index)}
    if values and all(isinstance(v, bool) for v in values):
        return {"type": "boolean"}
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return {"type": "integer", "minimum": min(values), "maximum": max(values)}
    return {"type": "number"}


__all__ = ["apply_computed", "computed_type", "holders", "insert_after", "read_path"]
