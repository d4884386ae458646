"""QA of one model answer: strict JSON, the spec's schema, then semantic rules.

Steps, each stopping at its first failing stage so reasons stay relevant:

1. parse: the whole answer must be one JSON object; one fenced block (```json ... ```) around it
   is tolerated, nothing looser (no prose, no JSON picked out of text);
2. schema: every violation of the spec's JSON schema, as ``field: problem``;
3. semantics (:class:`~goflow_gpu.prompts.spec.QARules`): confidences in [0, 1]; boxes are
   checked in the pixel space of the image as the model saw it (``bbox_2d`` ``[x1, y1, x2, y2]``
   with x1 < x2 and y1 < y2, inside that image; a small overhang is clamped) and replaced by the
   wire's ``bounding_box`` ``{x, y, width, height}`` in the original image's pixels; required
   texts and lists are not empty; listed items are distinct.

Reasons are written for two readers: the operator in logs and state, and the model itself, which
gets them back in the retry prompt (:func:`retry_user_prompt`).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaViolation

from goflow_gpu.engines.base import InferenceResult
from goflow_gpu.prompts.geometry import WIRE_BOX_KEY, smart_resize, to_wire_box
from goflow_gpu.prompts.spec import QARules, RenderedPrompt

MAX_REASONS = 20
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


class _NotJson(ValueError):
    pass


def judge(
    result: InferenceResult,
    rendered: RenderedPrompt,
    qa: QARules,
    *,
    original_size: tuple[int, int],
    min_pixels: int,
    max_pixels: int,
) -> QAVerdict:
    """The verdict on one engine answer: an engine error fails it; otherwise
    :func:`check_output` in the pixel space the model saw (the engine's report of it, or the
    Qwen resize rule for these pixel settings).
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
        result.text, rendered, qa, original_size=original_size, model_size=model_size
    )


def check_output(
    text: str,
    rendered: RenderedPrompt,
    qa: QARules,
    *,
    original_size: tuple[int, int],
    model_size: tuple[int, int],
) -> QAVerdict:
    """Check one answer; sizes are ``(width, height)`` of the original and the model's image."""
    try:
        data = parse_json_output(text)
    except _NotJson as exc:
        return QAVerdict(passed=False, result=None, reasons=[str(exc)])
    reasons = schema_reasons(data, rendered.json_schema)
    if reasons:
        return QAVerdict(passed=False, result=None, reasons=reasons)
    result = copy.deepcopy(data)
    reasons = _semantic_reasons(result, qa, original_size, model_size)
    if reasons:
        return QAVerdict(passed=False, result=None, reasons=reasons[:MAX_REASONS])
    return QAVerdict(passed=True, result=result, reasons=[])


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


def _semantic_reasons(
    result: dict[str, Any],
    qa: QARules,
    original_size: tuple[int, int],
    model_size: tuple[int, int],
) -> list[str]:
    reasons: list[str] = []
    for path, key, parent in _walk_keys(result, []):
        value = parent[key]
        where = _path_text([*path, key])
        if key in qa.confidence_fields:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                reasons.append(f"{where}: confidence must be a number from 0 to 1")
            elif not (0.0 <= value <= 1.0) or math.isnan(value):
                reasons.append(f"{where}: confidence {value} is outside [0, 1]")
        if key in qa.box_fields:
            reason = _check_box(parent, key, where, qa, original_size, model_size)
            if reason:
                reasons.append(reason)
    for name in qa.non_empty:
        value = result.get(name)
        if value is None or (isinstance(value, (str, list, dict)) and not _has_content(value)):
            reasons.append(f"{name}: must not be empty")
    for name in qa.distinct:
        items = result.get(name)
        if isinstance(items, list):
            seen: set[str] = set()
            for item in items:
                token = json.dumps(item, sort_keys=True).lower()
                if token in seen:
                    reasons.append(f"{name}: {_short(item)} is listed more than once")
                    break
                seen.add(token)
    return reasons


def _has_content(value: str | list[Any] | dict[str, Any]) -> bool:
    return bool(value.strip()) if isinstance(value, str) else bool(value)


def _walk_keys(node: Any, path: list[Any]) -> list[tuple[list[Any], str, dict[str, Any]]]:
    """Every (path of the parent, key, parent dict) in the tree, parents before children."""
    found: list[tuple[list[Any], str, dict[str, Any]]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((path, key, node))
            found.extend(_walk_keys(value, [*path, key]))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found.extend(_walk_keys(item, [*path, index]))
    return found


def _check_box(
    parent: dict[str, Any],
    key: str,
    where: str,
    qa: QARules,
    original_size: tuple[int, int],
    model_size: tuple[int, int],
) -> str | None:
    """Check a model-space box, then replace it with the wire's box in original pixels.

    A corner box ``[x1, y1, x2, y2]`` (Qwen's ``bbox_2d``) becomes ``bounding_box`` ``{x, y,
    width, height}`` in the parent, at the same place; an object box ``{x, y, width, height}``
    (the format of prompt versions before ``bbox_2d``, still met in jobs frozen with them) is
    converted under its own key.
    """
    value = parent[key]
    if isinstance(value, dict):
        return _check_object_box(parent, key, where, qa, original_size, model_size)
    if not (isinstance(value, list) and len(value) == 4 and all(map(_is_number, value))):
        return f"{where}: a box is 4 integers [x1, y1, x2, y2]: top-left, then bottom-right corner"
    x1, y1, x2, y2 = value
    wrong = [f"{b} <= {a}" for a, b, ok in (("x1", "x2", x1 < x2), ("y1", "y2", y1 < y2)) if not ok]
    if wrong:
        return (
            f"{where}: {_short(value)} has {' and '.join(wrong)}; give [x1, y1, x2, y2]: the "
            "top-left corner, then the bottom-right corner"
        )
    if not _fits(x1, y1, x2, y2, qa, model_size):
        width, height = model_size
        return (
            f"{where}: {_short(value)} lies outside the image, which is {width}x{height} pixels "
            f"as you see it (x from 0 to {width}, y from 0 to {height})"
        )
    if key != WIRE_BOX_KEY and WIRE_BOX_KEY in parent:
        return f"{where}: remove {WIRE_BOX_KEY}; give each box once, as {key}"
    wire = to_wire_box(value, model_size, original_size)
    items = [(WIRE_BOX_KEY, wire) if name == key else (name, v) for name, v in parent.items()]
    parent.clear()
    parent.update(items)
    return None


def _check_object_box(
    parent: dict[str, Any],
    key: str,
    where: str,
    qa: QARules,
    original_size: tuple[int, int],
    model_size: tuple[int, int],
) -> str | None:
    box = parent[key]
    if not all(_is_number(box.get(k)) for k in _BOX_KEYS):
        return f"{where}: a box needs numbers x, y, width and height"
    x, y, w, h = (box[k] for k in _BOX_KEYS)
    if not (x < x + w and y < y + h):  # not w > 0: 1e-20 vanishes next to x in floats
        return f"{where}: the box is empty (width {w}, height {h})"
    if not _fits(x, y, x + w, y + h, qa, model_size):
        x, y, w, h = (_num(float(v)) for v in (x, y, w, h))
        return (
            f"{where}: the box x={x} y={y} width={w} height={h} lies outside the image, which is "
            f"{model_size[0]}x{model_size[1]} pixels as you see it (use pixel coordinates of "
            "that image)"
        )
    parent[key] = {**box, **to_wire_box((x, y, x + w, y + h), model_size, original_size)}
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(
    x1: float, y1: float, x2: float, y2: float, qa: QARules, model_size: tuple[int, int]
) -> bool:
    """True when the box may be clamped into the model image: it overhangs no side by more than
    ``box_tolerance`` of that side, and it covers some part of the image."""
    width, height = model_size
    slack_x, slack_y = qa.box_tolerance * width, qa.box_tolerance * height
    within = -slack_x <= x1 and x2 <= width + slack_x and -slack_y <= y1 and y2 <= height + slack_y
    overlaps = x1 < width and y1 < height and x2 > 0 and y2 > 0
    return within and overlaps


def _num(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:g}"
