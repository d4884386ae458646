"""Test doubles: a scripted engine that answers with schema-valid JSON, instantly.

It stands in for the model so that worker tests exercise the whole pipeline (fetching, QA,
reporting, state) against the simulator without loading weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from goflow_gpu.engines.base import Engine, InferenceRequest, InferenceResult

_PATTERN_EXAMPLES = {"^#[0-9a-f]{6}$": "#a0b1c2"}
#: a count-bin value: "0", "2-3", "more than 20" (QA checks such an enum against points)
_COUNT_BIN = re.compile(r"\A(?:(\d+)(?:-(\d+))?|more than (\d+))\Z")


def instance_for(schema: dict[str, Any]) -> Any:
    """A small instance that satisfies ``schema`` (the subset our catalog uses) and passes QA.

    ``anyOf``/``oneOf``: the first branch. Lists hold ``minItems`` items, at least one (a list
    of enum values takes them from the end of the enum, so it repeats no sibling). Corner
    boxes (4 integers) and points (2 integers) lie inside any image of at least 32x32 pixels,
    so QA keeps them. A count bin (an enum of values like ``"1"``, ``"2-3"``, ``"more than
    20"``) takes the value that holds the length of the first list beside it in its object
    (every generated list is that short), so QA has nothing to repair.
    """
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema or "oneOf" in schema:
        return instance_for((schema.get("anyOf") or schema["oneOf"])[0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        return _object_for(schema)
    if kind == "array":
        corners = _integer_tuple(schema)
        if corners == 4:
            # bbox_2d [x1, y1, x2, y2]: corners apart, or QA refuses the box as empty.
            low = _low(schema["items"])
            return [low + 1, low + 2, low + 21, low + 22]
        if corners == 2:
            # point_2d [x, y], alone or as an item of points_2d
            low = _low(schema["items"])
            return [low + 10, low + 12]
        items = schema.get("items", {})
        count = schema.get("minItems", 1)
        if isinstance(items.get("enum"), list):
            # distinct values from the end of the enum, so that the list repeats neither
            # itself nor a sibling enum's first value (a primary scene among the secondary)
            return [items["enum"][-1 - i] for i in range(count)]
        return [instance_for(items) for _ in range(count)]
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


def _object_for(schema: dict[str, Any]) -> dict[str, Any]:
    props = schema.get("properties", {})
    out = {name: instance_for(props[name]) for name in schema.get("required", props)}
    lists = [value for value in out.values() if isinstance(value, list)]
    for name in out:
        values = props[name].get("enum")
        if lists and _is_count_bin(values):
            fitting = [v for v in values if _bin_holds(v, len(lists[0]))]
            if fitting:
                out[name] = fitting[0]
    return out


def _is_count_bin(values: Any) -> bool:
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, str) and _COUNT_BIN.match(v) for v in values)
    )


def _bin_holds(value: str, count: int) -> bool:
    match = _COUNT_BIN.match(value)
    assert match is not None
    low, high, above = match.groups()
    if above is not None:
        return count > int(above)
    return int(low) <= count <= int(high if high is not None else low)


def _integer_tuple(schema: dict[str, Any]) -> int | None:
    """2 or 4 when ``schema`` is an array of exactly that many integers (a point, a box)."""
    items = schema.get("items")
    size = schema.get("minItems")
    integers = isinstance(items, dict) and items.get("type") == "integer"
    if integers and size in (2, 4) and schema.get("maxItems") == size:
        return int(size)
    return None


def _low(items: dict[str, Any]) -> int:
    return int(items.get("minimum", 0))


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


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A plain HTTP server on loopback, on its own thread, answering with ``handler``; yields
    its ``/v1`` base URL (the OpenAI-compatible engine's convention)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def tiny_vllm_config(model_dir: Path, **extra: Any) -> dict[str, Any]:
    """Settings (a --config file's content) for the tiny model on vLLM's CPU build, as the
    engine tests that run the real CLI use them: small budgets, 10 % of memory for the KV
    cache (vLLM refuses to start unless that much is free), eager mode, small pictures."""
    return {
        "engine": "vllm",
        "model": str(model_dir),
        "max_model_len": 4096,
        "max_num_seqs": 16,
        "gpu_memory_utilization": 0.1,
        "enforce_eager": True,
        "min_pixels": 56 * 56,
        "max_pixels": 224 * 224,
        **extra,
    }


def run_cli_offline(
    tmp_path: Path, *args: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """``python -m goflow_gpu ARGS`` in a subprocess, as on a fresh machine with no network: its
    cache (the random tiny model is built there on first use) under ``tmp_path / "cache"``, the
    model hub offline, and no API key (the demo's simulator needs none; a key must not leak)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    env.pop("GOFLOW_API_KEY", None)
    command = [sys.executable, "-m", "goflow_gpu", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def strict_object(**properties: Any) -> dict[str, Any]:
    """A JSON schema object with exactly these properties, all required."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(properties),
        "properties": properties,
    }
