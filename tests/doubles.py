"""Test doubles: a scripted engine that answers with schema-valid JSON, instantly.

It stands in for the model so that worker tests exercise the whole pipeline (fetching, QA,
reporting, state) against the simulator without loading weights.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from goflow_gpu.engines.base import Engine, InferenceRequest, InferenceResult

_PATTERN_EXAMPLES = {"^#[0-9a-f]{6}$": "#a0b1c2"}


def instance_for(schema: dict[str, Any]) -> Any:
    """A small instance that satisfies ``schema`` (the subset our catalog uses)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if "anyOf" in schema or "oneOf" in schema:
        return instance_for((schema.get("anyOf") or schema["oneOf"])[0])
    if kind == "object":
        props = schema.get("properties", {})
        return {name: instance_for(props[name]) for name in schema.get("required", props)}
    if kind == "array":
        if _is_corner_box(schema):
            # bbox_2d [x1, y1, x2, y2]: corners apart, or QA refuses the box as empty.
            low = int(schema["items"].get("minimum", 0))
            return [low, low, low + 1, low + 1]
        return [instance_for(schema.get("items", {})) for _ in range(schema.get("minItems", 1))]
    if kind == "string":
        if "pattern" in schema:
            # Hand-picked answers for the patterns our catalog uses; a new one fails loudly.
            return _PATTERN_EXAMPLES[schema["pattern"]]
        return "a" * max(1, schema.get("minLength", 1))
    if kind == "integer":
        return int(schema.get("minimum", 0)) + (
            1 if schema.get("exclusiveMinimum") is not None else 0
        )
    if kind == "number":
        low = schema.get("minimum", 0)
        high = schema.get("maximum", low + 1)
        return (low + high) / 2
    if kind == "boolean":
        return True
    return None


def _is_corner_box(schema: dict[str, Any]) -> bool:
    items = schema.get("items")
    return (
        schema.get("minItems") == schema.get("maxItems") == 4
        and isinstance(items, dict)
        and items.get("type") == "integer"
    )


Script = Callable[[InferenceRequest], str | None]


class ScriptedEngine(Engine):
    """Answers every request with a schema-valid JSON text unless ``script`` says otherwise.

    ``script(request)`` may return a text to answer with instead (e.g. broken JSON to exercise
    QA), or ``None`` for the default answer. ``history`` keeps every request, in order.
    """

    name = "scripted"
    supports_json_schema = True

    def __init__(self, *, delay: float = 0.0, script: Script | None = None, slots: int = 16):
        self.delay = delay
        self.script = script
        self.max_in_flight = slots
        self.model_label = "scripted-test-engine"
        self.history: list[InferenceRequest] = []
        self.started = 0
        self.closed = 0

    async def start(self) -> None:
        self.started += 1

    async def close(self) -> None:
        self.closed += 1

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        began = time.monotonic()
        self.history.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        text = self.script(request) if self.script else None
        if text is None:
            text = json.dumps(instance_for(request.json_schema or {"type": "object"}))
        return InferenceResult(
            request_id=request.request_id,
            text=text,
            prompt_tokens=100,
            cached_tokens=0,
            generated_tokens=len(text) // 4,
            started_at=began,
            finished_at=time.monotonic(),
        )
