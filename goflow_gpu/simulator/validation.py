"""Strict request checks of the simulator, answering like the backend: 422 with located details.

Each checker returns a list of problems ``{"loc": [...], "msg": "...", "type": "..."}`` (empty
when the input is valid). They are deliberately stricter than a lenient parser: exact keys, no
extra keys where the contract lists them all, no type coercion (``"15"`` is not an integer,
``true`` is not a number, ``15.0`` is not an integer).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

Problem = dict[str, Any]
Loc = list[str | int]

_NUMBER_CONSTANTS = ("NaN", "Infinity", "-Infinity")


def parse_json(text: str) -> Any:
    """Parse a request body; raises ``ValueError`` (with the reason) for anything not JSON,
    including ``NaN``/``Infinity``, which JSON does not have."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    if not text.strip():
        raise ValueError("the body is empty")
    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _problem(loc: Loc, msg: str, kind: str) -> Problem:
    return {"loc": loc, "msg": msg, "type": kind}


def check_path_uuids(parts: dict[str, str]) -> list[Problem]:
    """Path ids must be UUIDs in canonical 8-4-4-4-12 form."""
    problems = []
    for name, value in parts.items():
        try:
            canonical = str(uuid.UUID(value))
        except ValueError:
            canonical = ""
        if canonical != value.lower():
            problems.append(
                _problem(
                    ["path", name], f"{value!r} is not a UUID (8-4-4-4-12 hex)", "uuid_parsing"
                )
            )
    return problems


def _object(value: Any, loc: Loc, problems: list[Problem]) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    problems.append(_problem(loc, f"must be a JSON object, got {_kind(value)}", "dict_type"))
    return None


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _keys(
    obj: dict[str, Any],
    required: tuple[str, ...],
    loc: Loc,
    problems: list[Problem],
    *,
    extra: bool = False,
) -> None:
    for key in required:
        if key not in obj:
            problems.append(_problem([*loc, key], "field required", "missing"))
    if not extra:
        for key in obj:
            if key not in required:
                problems.append(
                    _problem([*loc, key], "extra field not permitted", "extra_forbidden")
                )


def _string(obj: dict[str, Any], key: str, loc: Loc, problems: list[Problem]) -> None:
    if key not in obj:
        return
    value = obj[key]
    if not isinstance(value, str):
        problems.append(
            _problem([*loc, key], f"must be a string, got {_kind(value)}", "string_type")
        )
    elif not value.strip():
        problems.append(_problem([*loc, key], "must be a non-empty string", "string_too_short"))


def _choice(
    obj: dict[str, Any], key: str, choices: tuple[str, ...], loc: Loc, problems: list[Problem]
) -> None:
    if key in obj and obj[key] not in choices:
        allowed = " or ".join(repr(c) for c in choices)
        problems.append(
            _problem([*loc, key], f"must be {allowed}, got {obj[key]!r}", "literal_error")
        )


def _numeric(
    obj: dict[str, Any],
    key: str,
    loc: Loc,
    problems: list[Problem],
    *,
    integer: bool,
    high: float | None = None,
) -> None:
    if key not in obj:
        return
    value = obj[key]
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        what = "an integer" if integer else "a number"
        problems.append(_problem([*loc, key], f"must be {what}, got {value!r}", "type_error"))
    elif value < 0 or (high is not None and value > high):
        bound = f"between 0 and {high:g}" if high is not None else "zero or more"
        problems.append(_problem([*loc, key], f"must be {bound}, got {value!r}", "range_error"))


def check_status_body(body: Any) -> list[Problem]:
    """``{"status": "processing" | "completed"}`` and nothing else."""
    problems: list[Problem] = []
    obj = _object(body, ["body"], problems)
    if obj is not None:
        _keys(obj, ("status",), ["body"], problems)
        _choice(obj, "status", ("processing", "completed"), ["body"], problems)
    return problems


RESULT_KEYS = ("modelUsed", "userPromptUsed", "systemPromptUsed", "status", "analysisResult")


def check_result_body(body: Any) -> list[Problem]:
    """Exactly the five camelCase keys of the contract, each of the right type."""
    problems: list[Problem] = []
    obj = _object(body, ["body"], problems)
    if obj is None:
        return problems
    _keys(obj, RESULT_KEYS, ["body"], problems)
    for key in ("modelUsed", "userPromptUsed", "systemPromptUsed"):
        _string(obj, key, ["body"], problems)
    _choice(obj, "status", ("completed", "failed"), ["body"], problems)
    if "analysisResult" in obj:
        _object(obj["analysisResult"], ["body", "analysisResult"], problems)
    return problems


REPORT_DETAIL_KEYS = (
    "total_media_processed",
    "total_analyses_completed",
    "processing_time_minutes",
    "success_rate",
    "analysis_types_completed",
    "key_findings",
)


def check_report_body(body: Any) -> list[Problem]:
    """``{"type": "quality_analysis", "report": {"summary", "details": {required + extra}}}``."""
    problems: list[Problem] = []
    obj = _object(body, ["body"], problems)
    if obj is None:
        return problems
    _keys(obj, ("type", "report"), ["body"], problems)
    _choice(obj, "type", ("quality_analysis",), ["body"], problems)
    if "report" not in obj:
        return problems
    report = _object(obj["report"], ["body", "report"], problems)
    if report is None:
        return problems
    loc: Loc = ["body", "report"]
    _keys(report, ("summary", "details"), loc, problems)
    _string(report, "summary", loc, problems)
    if "details" not in report:
        return problems
    details = _object(report["details"], [*loc, "details"], problems)
    if details is None:
        return problems
    dloc: Loc = [*loc, "details"]
    _keys(details, REPORT_DETAIL_KEYS, dloc, problems, extra=True)
    _numeric(details, "total_media_processed", dloc, problems, integer=True)
    _numeric(details, "total_analyses_completed", dloc, problems, integer=True)
    _numeric(details, "processing_time_minutes", dloc, problems, integer=False)
    _numeric(details, "success_rate", dloc, problems, integer=False, high=1.0)
    types = details.get("analysis_types_completed", [])
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        problems.append(
            _problem([*dloc, "analysis_types_completed"], "must be a list of strings", "list_type")
        )
    if "key_findings" in details and not isinstance(details["key_findings"], str):
        problems.append(_problem([*dloc, "key_findings"], "must be a string", "string_type"))
    return problems
