"""QA of one model answer: strict JSON, the spec's schema, then semantic rules.

Steps, each stopping at its first failing stage so reasons stay relevant:

1. parse: the whole answer must be one JSON object; one fenced block (```json ... ```) around it
   is tolerated, nothing looser (no prose, no JSON picked out of text);
2. schema: every violation of the spec's JSON schema, as ``field: problem``;
3. semantics (:class:`~goflow_gpu.prompts.spec.QARules`): confidences in [0, 1]; boxes are
   checked in the pixel space of the image as the model saw it (``bbox_2d`` ``[x1, y1, x2, y2]``
   with x1 < x2 and y1 < y2, inside that image; a small overhang is clamped) and replaced by the
   wire's ``bounding_box`` ``{x, y, width, height}`` in the original image's pixels (points
   ``point_2d`` likewise become ``point`` ``{x, y}``); required texts and lists are not empty.

QA repairs what code can fix instead of re-asking (a re-ask at temperature 0 mostly repeats the
answer): a list item whose box or point is degenerate or off the image is dropped, repeated
items are dropped, a count bin that disagrees with the points is set from the points, a primary
value repeated among the secondary ones is removed. Each repair is a warning, returned in the
verdict and kept in the result as ``qa_warnings`` (absent when there was none). Only what code
cannot fix fails the answer.

A passing answer is then finished: confidences from the engine's token log-probabilities
(``qa.logprob_confidence``, read on the answer as written, before any repair), computed fields
(``qa.computed``, :mod:`goflow_gpu.prompts.derive`) and facts from the image's pixels
(``qa.pixel_facts``, :mod:`goflow_gpu.prompts.pixels`, computed by the caller and passed in).

Reasons are written for two readers: the operator in logs and state, and the model itself, which
gets them back in the retry prompt (:func:`retry_user_prompt`).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaViolation

from goflow_gpu.engines.base import InferenceResult
from goflow_gpu.prompts.confidence import span_probability, value_spans
from goflow_gpu.prompts.derive import apply_computed, holders, insert_after, read_path
from goflow_gpu.prompts.geometry import (
    WIRE_BOX_KEY,
    WIRE_POINT_KEY,
    WIRE_POINTS_KEY,
    iou,
    smart_resize,
    to_wire_box,
    to_wire_point,
)
from goflow_gpu.prompts.spec import CountCheck, QARules, RenderedPrompt

MAX_REASONS = 20
WARNINGS_KEY = "qa_warnings"
DUPLICATE_IOU = 0.9
_BIN = re.compile(r"\A(?:(?P<low>\d+)(?:-(?P<high>\d+))?|more than (?P<above>\d+))\Z")
_FENCE = re.compile(r"\A```(?:json|JSON)?[ \t]*\r?\n(?P<body>.*?)\r?\n?```\Z", re.DOTALL)
_BOX_KEYS = ("x", "y", "width", "height")
_JSON_NAMES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


@dataclass
class QAVerdict:
    """The outcome of QA: ``result`` is the converted result when ``passed``."""

    passed: bool
    result: dict[str, Any] | None
    reasons: list[str] = field(default_factory=list)
    #: what QA repaired in a passing answer (also in the result's ``qa_warnings``)
    warnings: list[str] = field(default_factory=list)


class _NotJson(ValueError):
    pass


@dataclass(frozen=True)
class _Space:
    """Where boxes and points are checked: the rules, and the original and model image sizes
    (``(width, height)``)."""

    qa: QARules
    original: tuple[int, int]
    model: tuple[int, int]


def judge(
    result: InferenceResult,
    rendered: RenderedPrompt,
    qa: QARules,
    *,
    original_size: tuple[int, int],
    min_pixels: int,
    max_pixels: int,
    facts: Mapping[str, Any] | None = None,
) -> QAVerdict:
    """The verdict on one engine answer: an engine error fails it; otherwise
    :func:`check_output` in the pixel space the model saw (the engine's report of it, or the
    Qwen resize rule for these pixel settings), with the answer's token log-probabilities.
    ``facts``: the image's pixel facts the rules name (``qa.pixel_facts``), by fact name.
    """
    if result.error:
        return QAVerdict(passed=False, result=None, reasons=[f"engine: {result.error}"])
    model_size = result.image_size
    if model_size is None:
        height, width = smart_resize(
            original_size[1], original_size[0], min_pixels=min_pixels, max_pixels=max_pixels
        )
        model_size = (width, height)
    return check_output(
        result.text,
        rendered,
        qa,
        original_size=original_size,
        model_size=model_size,
        token_logprobs=result.token_logprobs,
        facts=facts,
    )


def check_output(
    text: str,
    rendered: RenderedPrompt,
    qa: QARules,
    *,
    original_size: tuple[int, int],
    model_size: tuple[int, int],
    token_logprobs: list[tuple[str, float]] | None = None,
    facts: Mapping[str, Any] | None = None,
) -> QAVerdict:
    """Check one answer; sizes are ``(width, height)`` of the original and the model's image.

    ``token_logprobs``: the engine's (token text, log-probability) pairs of the answer, for
    ``qa.logprob_confidence`` (``None``: those confidences are ``null``). ``facts``: pixel facts
    by name for ``qa.pixel_facts``; a missing one raises ``ValueError`` (a caller's bug).
    """
    try:
        data = parse_json_output(text)
    except _NotJson as exc:
        return QAVerdict(passed=False, result=None, reasons=[str(exc)])
    reasons = schema_reasons(data, rendered.json_schema)
    if reasons:
        return QAVerdict(passed=False, result=None, reasons=reasons)
    result = copy.deepcopy(data)
    # Confidences first: their paths are those of the answer as written, before items drop.
    _add_confidences(result, text, token_logprobs, qa)
    warnings: list[str] = []
    # Warnings name items by their place in the answer as written, before any item drops.
    places = {
        id(item): index
        for items in result.values()
        if isinstance(items, list)
        for index, item in enumerate(items)
        if isinstance(item, dict)
    }
    reasons = _geometry(result, _Space(qa, original_size, model_size), warnings)
    reasons += _semantic_reasons(result, qa)
    if reasons:
        return QAVerdict(passed=False, result=None, reasons=reasons[:MAX_REASONS])
    _drop_repeats(result, qa, places, warnings)
    _cross_field(result, qa, rendered.json_schema, warnings)
    apply_computed(result, qa.computed)
    for name, fact in qa.pixel_facts.items():
        if facts is None or fact not in facts:
            raise ValueError(f"pixel fact {fact!r} for {name!r} was not computed")
        result[name] = copy.deepcopy(facts[fact])
    if warnings:
        result[WARNINGS_KEY] = warnings[:MAX_REASONS]
    return QAVerdict(passed=True, result=result, reasons=[], warnings=warnings)


def retry_user_prompt(user_prompt: str, reasons: list[str]) -> str:
    """The user prompt again, with the reasons the last answer was rejected appended."""
    shown = [r if len(r) <= 300 else r[:297] + "..." for r in reasons[:10]]
    lines = "\n".join(f"- {r}" for r in shown)
    more = f"\n- ... and {len(reasons) - len(shown)} more" if len(reasons) > len(shown) else ""
    return (
        f"{user_prompt}\n\n"
        f"Your previous answer was rejected for these reasons:\n{lines}{more}\n"
        "Answer again with one JSON object only that fixes every one of them."
    )


# --- parsing ---------------------------------------------------------------------------------


def parse_json_output(text: str) -> dict[str, Any]:
    """The JSON object in ``text``; raises ``ValueError`` with a reason a model can act on."""
    stripped = text.strip()
    if not stripped:
        raise _NotJson("the answer is empty; answer with one JSON object")
    fenced = _FENCE.match(stripped)
    body = fenced.group("body").strip() if fenced else stripped
    if fenced and "```" in body:
        raise _NotJson("the answer holds more than one fenced block; answer with one JSON object")
    try:
        data = _strict_loads(body)
    except json.JSONDecodeError as exc:
        if _has_json_inside(body):
            raise _NotJson(
                "the answer has text around the JSON object; answer with the JSON object only, "
                "no prose before or after it"
            ) from None
        if _is_cut_off(body):
            raise _NotJson(
                "the answer is not valid JSON: it ends early (cut off at the token limit?); "
                "keep texts and lists shorter"
            ) from None
        raise _NotJson(
            f"the answer is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise _NotJson(f"the answer is not valid JSON: {exc}") from None
    except RecursionError:
        # A degenerate answer ("[[[[..."): Python's parser gives up; so do we, politely.
        raise _NotJson("the answer is nested too deeply; answer with a flat JSON object") from None
    if not isinstance(data, dict):
        raise _NotJson(f"the answer must be a JSON object, got {_json_type(data)}")
    if not _all_finite(data):
        # 1e400 parses to inf, which no JSON body can carry to the backend.
        raise _NotJson("the answer holds a number too large to represent; use normal numbers")
    return data


def _all_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _strict_loads(text: str) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not allowed in JSON")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"duplicate key '{key}'")
            out[key] = value
        return out

    return json.loads(text, parse_constant=no_constants, object_pairs_hook=pairs)


def _is_cut_off(text: str) -> bool:
    """True when the text ends inside a string or with brackets still open."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
    return text.lstrip().startswith(("{", "[")) and (in_string or depth > 0)


def _has_json_inside(text: str) -> bool:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start or (start == 0 and end == len(text) - 1):
        return False
    try:
        json.loads(text[start : end + 1])
    except ValueError:
        return False
    return True


# --- schema ----------------------------------------------------------------------------------


def schema_reasons(data: Any, schema: dict[str, Any]) -> list[str]:
    """Every schema violation of ``data`` as ``field: problem``, in document order."""
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    return [_describe_violation(e) for e in errors[:MAX_REASONS]]


def _describe_violation(error: SchemaViolation) -> str:
    where = _path_text(list(error.absolute_path))
    value = error.instance
    kind = error.validator
    expected = error.validator_value
    if kind == "required":
        missing = [name for name in expected if isinstance(value, dict) and name not in value]
        name = missing[0] if missing else error.message
        return f"{_join(where, name)}: missing required field"
    if kind == "additionalProperties" and isinstance(value, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        known = set(schema.get("properties") or {})
        extra = sorted(k for k in value if k not in known)
        return f"{where}: unexpected field(s) {', '.join(extra)}"
    if kind == "type":
        return f"{where}: expected {_or(expected)}, got {_json_type(value)} {_short(value)}"
    if kind == "maxItems":
        return f"{where}: too many items ({len(value)}, at most {expected})"
    if kind == "minItems":
        return f"{where}: too few items ({len(value)}, at least {expected})"
    if kind == "maxLength":
        return f"{where}: text too long ({len(value)} characters, at most {expected})"
    if kind == "minLength":
        return f"{where}: text too short ({len(value)} characters, at least {expected})"
    if kind == "maximum":
        return f"{where}: {_short(value)} is above the maximum {expected}"
    if kind == "minimum":
        return f"{where}: {_short(value)} is below the minimum {expected}"
    if kind == "enum":
        return f"{where}: {_short(value)} is not one of {', '.join(map(json.dumps, expected))}"
    if kind == "pattern":
        return f"{where}: {_short(value)} does not match the pattern {expected}"
    return f"{where}: {error.message}"


def _path_text(path: list[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(top level)"


def _join(where: str, name: str) -> str:
    return name if where == "(top level)" else f"{where}.{name}"


def _or(expected: Any) -> str:
    return " or ".join(expected) if isinstance(expected, list) else str(expected)


def _json_type(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


# --- semantic rules --------------------------------------------------------------------------


def _semantic_reasons(result: dict[str, Any], qa: QARules) -> list[str]:
    reasons: list[str] = []
    computed = {c.field.rsplit(".", 1)[-1] for c in qa.logprob_confidence}
    for path, key, parent, _ in _walk_keys(result, [], None):
        value = parent[key]
        where = _path_text([*path, key])
        if key in qa.confidence_fields and key not in computed:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                reasons.append(f"{where}: confidence must be a number from 0 to 1")
            elif not (0.0 <= value <= 1.0) or math.isnan(value):
                reasons.append(f"{where}: confidence {value} is outside [0, 1]")
    for name in qa.non_empty:
        value = result.get(name)
        if value is None or (isinstance(value, (str, list, dict)) and not _has_content(value)):
            reasons.append(f"{name}: must not be empty")
    return reasons


def _geometry(result: dict[str, Any], space: _Space, warnings: list[str]) -> list[str]:
    """Check and convert every box and point. One that cannot be used fails the answer, unless
    it belongs to an item of a list: then the item is dropped, with a warning."""
    reasons: list[str] = []
    drops: list[tuple[list[Any], dict[str, Any], str]] = []
    for path, key, parent, holder in _walk_keys(result, [], None):
        where = _path_text([*path, key])
        if key in space.qa.box_fields:
            reason = _check_box(parent, key, where, space)
        elif key in space.qa.point_fields:
            reason = _check_point(parent, key, where, space, warnings)
        else:
            continue
        if reason is None:
            continue
        if holder is None:
            reasons.append(reason)
        else:
            drops.append((holder, parent, f"dropped {_path_text(path)}: {reason}"))
    for holder, item, note in drops:
        kept = [other for other in holder if other is not item]
        if len(kept) < len(holder):
            holder[:] = kept
            warnings.append(note)
    return reasons


def _drop_repeats(
    result: dict[str, Any], qa: QARules, places: dict[int, int], warnings: list[str]
) -> None:
    """Drop repeated items: in ``distinct`` lists, an item equal to an earlier one (case aside);
    in any list of boxed items, an item whose other fields equal an earlier one's and whose box
    overlaps it (IoU >= 0.9): the same detection twice."""
    for name, items in list(result.items()):
        if not isinstance(items, list):
            continue
        distinct = name in qa.distinct
        kept: list[Any] = []
        for index, item in enumerate(items):
            twin = next((k for k in kept if _same_item(k, item, distinct)), None)
            if twin is None:
                kept.append(item)
            else:
                place = places.get(id(item), index)
                warnings.append(f"dropped {name}[{place}]: {_short(item)} repeats an earlier item")
        items[:] = kept


def _same_item(first: Any, second: Any, distinct: bool) -> bool:
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return distinct and _token(first) == _token(second)
    box_a, box_b = first.get(WIRE_BOX_KEY), second.get(WIRE_BOX_KEY)
    if not distinct and not (isinstance(box_a, dict) and isinstance(box_b, dict)):
        return False
    skip = {WIRE_BOX_KEY, WIRE_POINT_KEY, WIRE_POINTS_KEY, "confidence"}
    rest_a = {k: v for k, v in first.items() if k not in skip}
    rest_b = {k: v for k, v in second.items() if k not in skip}
    if _token(rest_a) != _token(rest_b):
        return False
    if isinstance(box_a, dict) and isinstance(box_b, dict):
        return iou(box_a, box_b) >= DUPLICATE_IOU
    return True  # a distinct list's items with equal fields (confidences aside)


def _token(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False).lower()


def _cross_field(
    result: dict[str, Any], qa: QARules, schema: dict[str, Any], warnings: list[str]
) -> None:
    """Fields that must agree: a count bin with its points; a primary value not repeated among
    the secondary ones. The evidence wins; each change is a warning."""
    for check in qa.counts:
        bins = _enum_at(schema, check.bin)
        for place, holder, _ in holders(result, check.bin):
            where = f"{_path_text(list(place))}." if place else ""
            _check_count(holder, check, bins, where, warnings)
    for rule in qa.exclusions:
        items = result.get(rule.within)
        value = result.get(rule.value)
        if isinstance(items, list) and isinstance(value, str):
            kept = [v for v in items if not (isinstance(v, str) and v.lower() == value.lower())]
            if len(kept) < len(items):
                warnings.append(f"{rule.within}: removed {value!r}, already given as {rule.value}")
                items[:] = kept


def _enum_at(schema: dict[str, Any], path: str) -> list[str]:
    """The enum of the schema property at ``path`` (``a`` or ``list[].a``)."""
    node: Any = schema
    for part in path.split("."):
        spread = part.endswith("[]")
        node = (node.get("properties") or {}).get(part[:-2] if spread else part) or {}
        if spread:
            node = node.get("items") or {}
    values = node.get("enum") if isinstance(node, dict) else None
    return [v for v in values if isinstance(v, str)] if isinstance(values, list) else []


def _check_count(
    holder: dict[str, Any],
    check: CountCheck,
    bins: list[str],
    where: str,
    warnings: list[str],
) -> None:
    bin_key = check.bin.rsplit(".", 1)[-1]
    points = read_path(holder, check.points.rsplit(".", 1)[-1])
    found = holder.get(bin_key)
    if not isinstance(points, list) or not isinstance(found, str):
        return
    count = len(points)
    full = count >= check.at_most
    span = _bin_span(found)
    if span is not None and (span[1] >= check.at_most if full else span[0] <= count <= span[1]):
        return  # the bin agrees with the points
    want = check.at_most if full else count
    options = [v for v in bins if _holds(v, want)]
    if options:
        holder[bin_key] = options[0]
        warnings.append(
            f"{where}{bin_key}: {found!r} disagreed with {count} point(s); set to {options[0]!r}"
        )


def _bin_span(value: str) -> tuple[float, float] | None:
    """``"4-6"`` -> (4, 6); ``"1"`` -> (1, 1); ``"more than 20"`` -> (21, inf)."""
    match = _BIN.match(value.strip())
    if match is None:
        return None
    if match["above"] is not None:
        return float(match["above"]) + 1, math.inf
    low = float(match["low"])
    return low, float(match["high"]) if match["high"] is not None else low


def _holds(value: str, count: int) -> bool:
    span = _bin_span(value)
    return span is not None and span[0] <= count <= span[1]


def _add_confidences(
    result: dict[str, Any],
    text: str,
    tokens: list[tuple[str, float]] | None,
    qa: QARules,
) -> None:
    """Set each ``qa.logprob_confidence`` field right after the value it rates."""
    if not qa.logprob_confidence:
        return
    spans: dict[tuple[str | int, ...], tuple[int, int]] = {}
    if tokens and "".join(piece for piece, _ in tokens) != text:
        tokens = None  # offsets would point at the wrong characters: no confidence, not a wrong one
    if tokens:
        try:
            spans = value_spans(text)
        except ValueError:
            spans = {}

    def rate(path: tuple[str | int, ...]) -> float | None:
        span = spans.get(path)
        if span is None or not tokens:
            return None
        probability = span_probability(tokens, *span)
        return None if probability is None else round(probability, 3)

    for entry in qa.logprob_confidence:
        for place, holder, leaf in holders(result, entry.field):
            if entry.value in holder:
                insert_after(holder, entry.value, leaf, rate((*place, entry.value)))


def _rename(node: dict[str, Any], key: str, new_key: str, value: Any) -> None:
    """Replace ``key`` by ``new_key`` (with ``value``) at the same place in ``node``."""
    items = [(new_key, value) if k == key else (k, v) for k, v in node.items()]
    node.clear()
    node.update(items)


def _has_content(value: str | list[Any] | dict[str, Any]) -> bool:
    return bool(value.strip()) if isinstance(value, str) else bool(value)


def _walk_keys(
    node: Any, path: list[Any], holder: list[Any] | None
) -> list[tuple[list[Any], str, dict[str, Any], list[Any] | None]]:
    """Every (path of the parent, key, parent dict, the list holding the parent or ``None``) in
    the tree, parents before children."""
    found: list[tuple[list[Any], str, dict[str, Any], list[Any] | None]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((path, key, node, holder))
            found.extend(_walk_keys(value, [*path, key], None))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found.extend(_walk_keys(item, [*path, index], node))
    return found


def _check_box(parent: dict[str, Any], key: str, where: str, space: _Space) -> str | None:
    """Check a model-space box, then replace it with the wire's box in original pixels.

    A corner box ``[x1, y1, x2, y2]`` (Qwen's ``bbox_2d``) becomes ``bounding_box`` ``{x, y,
    width, height}`` in the parent, at the same place; an object box ``{x, y, width, height}``
    (the format of prompt versions before ``bbox_2d``, still met in jobs frozen with them) is
    converted under its own key.
    """
    value = parent[key]
    if isinstance(value, dict):
        return _check_object_box(parent, key, where, space)
    if not (isinstance(value, list) and len(value) == 4 and all(map(_is_number, value))):
        return f"{where}: a box is 4 integers [x1, y1, x2, y2]: top-left, then bottom-right corner"
    x1, y1, x2, y2 = value
    wrong = [f"{b} <= {a}" for a, b, ok in (("x1", "x2", x1 < x2), ("y1", "y2", y1 < y2)) if not ok]
    if wrong:
        return (
            f"{where}: {_short(value)} has {' and '.join(wrong)}; give [x1, y1, x2, y2]: the "
            "top-left corner, then the bottom-right corner"
        )
    if not _fits(x1, y1, x2, y2, space):
        width, height = space.model
        return (
            f"{where}: {_short(value)} lies outside the image, which is {width}x{height} pixels "
            f"as you see it (x from 0 to {width}, y from 0 to {height})"
        )
    if key != WIRE_BOX_KEY and WIRE_BOX_KEY in parent:
        return f"{where}: remove {WIRE_BOX_KEY}; give each box once, as {key}"
    _rename(parent, key, WIRE_BOX_KEY, to_wire_box(value, space.model, space.original))
    return None


def _check_object_box(parent: dict[str, Any], key: str, where: str, space: _Space) -> str | None:
    box = parent[key]
    if not all(_is_number(box.get(k)) for k in _BOX_KEYS):
        return f"{where}: a box needs numbers x, y, width and height"
    x, y, w, h = (box[k] for k in _BOX_KEYS)
    if not (x < x + w and y < y + h):  # not w > 0: 1e-20 vanishes next to x in floats
        return f"{where}: the box is empty (width {w}, height {h})"
    if not _fits(x, y, x + w, y + h, space):
        x, y, w, h = (_num(float(v)) for v in (x, y, w, h))
        return (
            f"{where}: the box x={x} y={y} width={w} height={h} lies outside the image, which is "
            f"{space.model[0]}x{space.model[1]} pixels as you see it (use pixel coordinates of "
            "that image)"
        )
    parent[key] = {**box, **to_wire_box((x, y, x + w, y + h), space.model, space.original)}
    return None


def _check_point(
    parent: dict[str, Any], key: str, where: str, space: _Space, warnings: list[str]
) -> str | None:
    """Check a model-space point ``[x, y]`` and replace it with the wire's ``point`` ``{x, y}``
    in original pixels, at the same place in the parent. A key starting with ``points``
    (``points_2d``) holds a list of points: it becomes ``points``, and a bad point in it is
    dropped with a warning."""
    value = parent[key]
    many = key.startswith("points")
    if many and not isinstance(value, list):
        return f"{where}: a list of points [[x, y], ...]"
    wire: Any
    if many:
        wire = []
        for index, point in enumerate(value):
            problem = _point_problem(point, space)
            if problem:
                warnings.append(f"dropped {where}[{index}]: {_short(point)} {problem}")
            else:
                wire.append(to_wire_point(point, space.model, space.original))
    else:
        problem = _point_problem(value, space)
        if problem:
            return f"{where}: {_short(value)} {problem}"
        wire = to_wire_point(value, space.model, space.original)
    _rename(parent, key, WIRE_POINTS_KEY if many else WIRE_POINT_KEY, wire)
    return None


def _point_problem(point: Any, space: _Space) -> str | None:
    if not (isinstance(point, list) and len(point) == 2 and all(map(_is_number, point))):
        return "is not a point: 2 integers [x, y]"
    x, y = point
    width, height = space.model
    slack_x, slack_y = space.qa.box_tolerance * width, space.qa.box_tolerance * height
    if -slack_x <= x <= width + slack_x and -slack_y <= y <= height + slack_y:
        return None
    return (
        f"lies outside the image, which is {width}x{height} pixels as you see it "
        f"(x from 0 to {width}, y from 0 to {height})"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(x1: float, y1: float, x2: float, y2: float, space: _Space) -> bool:
    """True when the box may be clamped into the model image: it overhangs no side by more than
    ``box_tolerance`` of that side, and it covers some part of the image."""
    width, height = space.model
    slack_x, slack_y = space.qa.box_tolerance * width, space.qa.box_tolerance * height
    within = -slack_x <= x1 and x2 <= width + slack_x and -slack_y <= y1 and y2 <= height + slack_y
    overlaps = x1 < width and y1 < height and x2 > 0 and y2 > 0
    return within and overlaps


def _num(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:g}"
