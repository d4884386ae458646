"""A "sloppy model": an OpenAI-compatible chat server that answers like a careless 7B VLM.

It stands in for Qwen2.5-VL when a catalog's *robustness* is measured (``bench/catalog_compare.py``
runs ``goflow-gpu prompts eval`` against it): every answer is valid JSON that fits the request's
``response_format`` JSON schema, as structured decoding guarantees, but its values are drawn at
random with the mistakes a small model makes at realistic rates: flags that disagree with the
lists beside them, repeated list items, boxes that overhang the image, points off the image,
counts below the people listed, a primary value repeated among the secondary ones. What it says
about the picture is meaningless (it never looks at the pixels, only at the image's size); what
matters is how a catalog and its QA cope with such answers.

Answers are deterministic, like temperature 0: the random generator is seeded from a hash of the
image bytes and the schema, so the same request always gets the same answer.

The schema is walked in property order (structured decoding writes fields in schema order):

- object: every property, in order (``additionalProperties`` is never used);
- ``anyOf`` / ``oneOf`` / a list of types: the first non-null branch, ``null`` at
  :data:`NULL_RATE` where null is allowed;
- enum: a random value, the first one (usually the "none"/"absent"/"unknown" value of a
  catalog) favoured at :data:`FIRST_ENUM_RATE`;
- boolean: a coin toss (which is what makes ``has_*``, ``requires_review`` and
  ``safe_for_general_audience`` disagree with their evidence when they are asked);
- integer: within its bounds (a 0-10 score, a 0-100 share, a ``count`` up to 20); a range wider
  than :data:`WIDE_INT_RANGE` (a ``count`` up to 1000) is drawn from its lowest
  :data:`SMALL_INT_SPAN` + 1 values, as a model counts a few; number: within its bounds (0..1
  without), 2 decimals;
- string: a few words from :data:`VOCABULARY` within ``minLength``/``maxLength`` (a sentence
  when 80 characters or more are allowed), a string already written in the answer at
  :data:`REUSE_STRING_RATE`, ``""`` at :data:`EMPTY_STRING_RATE` where allowed; the colour
  pattern ``^#[0-9a-f]{6}$`` gets a hex colour;
- array: ``minItems`` .. min(``maxItems``, :data:`MAX_LIST_ITEMS`) items; a list of objects
  repeats an earlier item exactly at :data:`REPEAT_OBJECT_RATE`, a list of strings at
  :data:`REPEAT_STRING_RATE`;
- box (``bbox_2d``, or any array of exactly 4 integers): ``[x1, y1, x2, y2]`` inside the image
  as the model sees it (the size of the image in the request), except at
  :data:`BOX_OVERHANG_RATE`, where it runs past the right or bottom edge by
  :data:`BOX_OVERHANG` of that side (QA tolerates 2 %);
- point (``point_2d``, or any array of exactly 2 integers): inside the image, except at
  :data:`POINT_OUTSIDE_RATE`, where it lies far outside; ``points_2d`` (an array of such
  points) is a list of them.

The answer is compact JSON (``separators=(",", ":")``). When the request asks for
``logprobs``, ``choices[0].logprobs.content`` holds the answer split into tokens of 1 to 4
characters whose texts join to the answer exactly, each with a deterministic, plausible
log-probability (most near 0, :data:`UNSURE_TOKEN_RATE` of them lower) and its UTF-8 ``bytes``.
An answer longer than ``max_tokens`` tokens is cut there with ``finish_reason: "length"``.

Use::

    with SloppyModelServer() as server:      # loopback, a free port, its own thread and loop
        ...  # point the OpenAI engine at server.url ("http://127.0.0.1:PORT/v1")

    python -m goflow_gpu.bench.sloppy_model --port 8011   # standalone, until interrupted
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import hashlib
import io
import json
import random
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

# --- error rates and shapes (per decision, independent of each other) ---------------------------

#: Where a schema allows null (``anyOf`` with a null branch), the share of null answers.
NULL_RATE = 0.2
#: Enums: the share of answers that take the first value (else a uniform draw over all values).
FIRST_ENUM_RATE = 0.5
#: Arrays hold at most this many items (and at most ``maxItems``).
MAX_LIST_ITEMS = 4
#: A list of objects repeats an earlier item exactly (the same detection twice).
REPEAT_OBJECT_RATE = 0.2
#: A list of strings repeats an earlier item.
REPEAT_STRING_RATE = 0.15
#: A string reuses one already written in this answer (a main tag among the tags, a block's text
#: as the full text), when it fits the field.
REUSE_STRING_RATE = 0.3
#: A string with no ``minLength`` is empty.
EMPTY_STRING_RATE = 0.05
#: A box runs past the right or bottom edge ...
BOX_OVERHANG_RATE = 0.15
#: ... by this share of that side (QA clamps an overhang of up to 2 % and refuses more).
BOX_OVERHANG = 0.10
#: A point lies far outside the image (30 % to 100 % of the side past its right or bottom edge).
POINT_OUTSIDE_RATE = 0.10
#: Integer ranges wider than WIDE_INT_RANGE (a ``count`` up to 1000) are drawn from their lowest
#: SMALL_INT_SPAN + 1 values: a model counts a few, it does not answer 734.
WIDE_INT_RANGE = 100
SMALL_INT_SPAN = 10
#: The share of tokens written with a low log-probability (-0.1 .. -2.5) instead of near 0.
UNSURE_TOKEN_RATE = 0.2

MODEL_NAME = "sloppy-qwen2.5-vl-7b"
VOCABULARY = (
    "street", "building", "person", "car", "tree", "sky", "window", "sign", "red", "blue",
    "green", "square", "circle", "HOTEL", "OPEN", "shop front", "city", "road", "wall", "light",
    "shadow", "bright", "logo", "cup", "table", "dog", "bird", "outdoor", "daylight", "calm",
)  # fmt: skip
_HEX_PATTERN = "^#[0-9a-f]{6}$"
_PATCH = 28  # Qwen2.5-VL: one image token per 28 x 28 pixels
_ANSWERED: web.AppKey[list[int]] = web.AppKey("answered", list)


class _Draw:
    """One answer's walk over a schema: the generator, the image size, the strings so far."""

    def __init__(self, rng: random.Random, root: Mapping[str, Any], size: tuple[int, int]):
        self.rng = rng
        self.root = root
        self.width, self.height = size
        self.written: list[str] = []

    def value(self, schema: Mapping[str, Any], name: str = "") -> Any:
        schema = self._resolve(schema)
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        branches = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(branches, list) and branches:
            real = [b for b in branches if self._resolve(b).get("type") != "null"]
            if not real or (len(real) < len(branches) and self.rng.random() < NULL_RATE):
                return None
            return self.value(real[0], name)
        if "enum" in schema:
            values = list(schema["enum"])
            if self.rng.random() < FIRST_ENUM_RATE:
                return copy.deepcopy(values[0])
            return copy.deepcopy(self.rng.choice(values))
        kind = schema.get("type")
        if isinstance(kind, list):
            real_types = [t for t in kind if t != "null"]
            if not real_types or (len(real_types) < len(kind) and self.rng.random() < NULL_RATE):
                return None
            kind = real_types[0]
        if kind == "object" or (kind is None and "properties" in schema):
            props = schema.get("properties") or {}
            return {key: self.value(sub, key) for key, sub in props.items()}
        if kind == "array":
            return self._array(schema, name)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            low = float(schema.get("minimum", 0.0))
            high = float(schema.get("maximum", max(low, 1.0)))
            return round(self.rng.uniform(low, high), 2)
        if kind == "string":
            return self._string(schema)
        return None

    def _resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        node: Any = self.root
        for part in ref[2:].split("/"):
            node = node[part]
        return self._resolve(node)

    def _integer(self, schema: Mapping[str, Any]) -> int:
        low = int(schema.get("minimum", 0))
        high = int(schema.get("maximum", low + SMALL_INT_SPAN))
        if high - low > WIDE_INT_RANGE:
            high = low + SMALL_INT_SPAN
        return self.rng.randint(low, max(low, high))

    def _string(self, schema: Mapping[str, Any]) -> str:
        low = int(schema.get("minLength", 0))
        high = int(schema.get("maxLength", 200))
        if schema.get("pattern") == _HEX_PATTERN:
            return f"#{self.rng.randrange(1 << 24):06x}"
        if low == 0 and self.rng.random() < EMPTY_STRING_RATE:
            return ""
        fitting = [s for s in self.written if low <= len(s) <= high]
        if fitting and self.rng.random() < REUSE_STRING_RATE:
            return self.rng.choice(fitting)
        if high >= 80:
            words = [self.rng.choice(VOCABULARY) for _ in range(self.rng.randint(3, 8))]
            text = " ".join(words).capitalize() + "."
        else:
            text = " ".join(self.rng.choice(VOCABULARY) for _ in range(self.rng.randint(1, 3)))
        while len(text) < low:
            text += " " + self.rng.choice(VOCABULARY)
        text = text[:high]
        if len(text.rstrip()) >= low:
            text = text.rstrip()
        self.written.append(text)
        return text

    def _array(self, schema: Mapping[str, Any], name: str) -> list[Any]:
        items = self._resolve(schema.get("items") or {})
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", MAX_LIST_ITEMS))
        if _is_int_tuple(schema, items, 4) or name == "bbox_2d":
            return self._box()
        if _is_int_tuple(schema, items, 2) or name == "point_2d":
            return self._point()
        if name == "points_2d" or _is_int_tuple(items, self._resolve(items.get("items") or {}), 2):
            count = self.rng.randint(low, max(low, min(high, MAX_LIST_ITEMS)))
            return [self._point() for _ in range(count)]
        count = self.rng.randint(low, max(low, min(high, MAX_LIST_ITEMS)))
        values = [self.value(items, name) for _ in range(count)]
        is_object = items.get("type") == "object" or "properties" in items
        rate = REPEAT_OBJECT_RATE if is_object else REPEAT_STRING_RATE
        if values and (is_object or items.get("type") == "string") and self.rng.random() < rate:
            twin = copy.deepcopy(self.rng.choice(values))
            if len(values) < high:
                values.append(twin)
            elif len(values) > 1:
                values[-1] = twin
        return values

    def _box(self) -> list[int]:
        w, h = self.width, self.height
        x1 = self.rng.randint(0, max(0, int(w * 0.7)))
        y1 = self.rng.randint(0, max(0, int(h * 0.7)))
        x2 = self.rng.randint(min(w, x1 + max(1, w // 20)), w)
        y2 = self.rng.randint(min(h, y1 + max(1, h // 20)), h)
        if self.rng.random() < BOX_OVERHANG_RATE:
            if self.rng.random() < 0.5:
                x2 = w + round(w * BOX_OVERHANG)
            else:
                y2 = h + round(h * BOX_OVERHANG)
        return [x1, y1, x2, y2]

    def _point(self) -> list[int]:
        w, h = self.width, self.height
        x, y = self.rng.randint(0, w), self.rng.randint(0, h)
        if self.rng.random() < POINT_OUTSIDE_RATE:
            if self.rng.random() < 0.5:
                x = w + self.rng.randint(round(w * 0.3), w)
            else:
                y = h + self.rng.randint(round(h * 0.3), h)
        return [x, y]


def _is_int_tuple(schema: Mapping[str, Any], items: Mapping[str, Any], n: int) -> bool:
    return (
        schema.get("type") == "array"
        and schema.get("minItems") == n
        and schema.get("maxItems") == n
        and items.get("type") == "integer"
    )


def seed_of(image: bytes, schema: Mapping[str, Any] | None) -> bytes:
    """The answer's seed: a hash of the image bytes and the schema (canonical JSON)."""
    digest = hashlib.sha256(image)
    digest.update(json.dumps(schema, sort_keys=True, separators=(",", ":")).encode())
    return digest.digest()


def sloppy_answer(
    schema: Mapping[str, Any] | None, image_size: tuple[int, int], seed: bytes
) -> Any:
    """The sloppy model's answer to ``schema`` about an image of ``image_size`` (w, h)."""
    if schema is None:
        return {}
    rng = random.Random(int.from_bytes(seed, "big"))
    return _Draw(rng, schema, image_size).value(schema)


def tokenize(text: str, seed: bytes) -> list[tuple[str, float]]:
    """``text`` as tokens of 1 to 4 characters with log-probabilities; deterministic in seed."""
    rng = random.Random(int.from_bytes(hashlib.sha256(seed + b"logprobs").digest(), "big"))
    tokens: list[tuple[str, float]] = []
    at = 0
    while at < len(text):
        size = rng.randint(1, 4)
        if rng.random() < UNSURE_TOKEN_RATE:
            logprob = -rng.uniform(0.1, 2.5)
        else:
            logprob = -rng.uniform(0.0, 0.05)
        tokens.append((text[at : at + size], round(logprob, 4) + 0.0))
        at += size
    return tokens


def decode_image(url: str) -> tuple[bytes, tuple[int, int]]:
    """The bytes and (width, height) of an image data URL; ``ValueError`` when it is not one."""
    from PIL import Image, UnidentifiedImageError

    if not url.startswith("data:") or "," not in url:
        raise ValueError("the image must be a base64 data URL")
    try:
        data = base64.b64decode(url.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            return data, image.size
    except (binascii.Error, OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"the image data URL cannot be read: {exc}") from None


def completion(body: Mapping[str, Any], model: str = MODEL_NAME) -> dict[str, Any]:
    """The chat-completion answer to one request body; ``ValueError`` for a malformed one."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: a non-empty list is required")
    image: tuple[bytes, tuple[int, int]] | None = None
    prompt_chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        parts: Sequence[Any] = [content] if isinstance(content, str) else []
        if isinstance(content, list):
            parts = content
        for part in parts:
            if isinstance(part, str):
                prompt_chars += len(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                prompt_chars += len(str(part.get("text", "")))
            elif isinstance(part, Mapping) and part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, Mapping) else url
                image = decode_image(str(url))
    if image is None:
        raise ValueError("the request holds no image")
    data, size = image
    response_format = body.get("response_format")
    schema = None
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
    seed = seed_of(data, schema)
    answer = sloppy_answer(schema, size, seed)
    text = json.dumps(answer, separators=(",", ":"), ensure_ascii=False)
    tokens = tokenize(text, seed)
    finish = "stop"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and 0 < max_tokens < len(tokens):
        tokens, finish = tokens[:max_tokens], "length"
        text = "".join(token for token, _ in tokens)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish,
    }
    if body.get("logprobs"):
        choice["logprobs"] = {
            "content": [
                {"token": token, "logprob": value, "bytes": list(token.encode())}
                for token, value in tokens
            ]
        }
    image_tokens = (size[0] // _PATCH) * (size[1] // _PATCH)
    prompt_tokens = image_tokens + prompt_chars // 4
    return {
        "id": "chatcmpl-" + seed.hex()[:24],
        "object": "chat.completion",
        "model": str(body.get("model") or model),
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        },
    }


def make_app(model: str = MODEL_NAME) -> web.Application:
    """The aiohttp application: ``GET /v1/models`` and ``POST /v1/chat/completions``."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    answered = app[_ANSWERED] = [0]

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def chat(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            answer = completion(body, model)
        except ValueError as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        answered[0] += 1
        return web.json_response(answer)

    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


class SloppyModelServer:
    """The sloppy model on loopback, on its own thread and event loop (a context manager).

    ``url`` is the API root (``http://127.0.0.1:PORT/v1``) once entered; ``requests`` counts
    the chat completions answered.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, model: str = MODEL_NAME) -> None:
        self.host, self.port, self.model = host, port, model
        self.url = ""
        self._app = make_app(model)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="sloppy-model", daemon=True)
        self._error: OSError | None = None

    @property
    def requests(self) -> int:
        return self._app[_ANSWERED][0]

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self._app, access_log=None)
        try:
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            self._loop.run_until_complete(site.start())
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1])
            self.url = f"http://{self.host}:{self.port}/v1"
        except OSError as exc:  # a port in use: reported by __enter__
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def __enter__(self) -> SloppyModelServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the sloppy model server did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"the sloppy model server did not start: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the sloppy model until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--model", default=MODEL_NAME, help="the name /v1/models reports")
    args = parser.parse_args(argv)
    print(f"sloppy model {args.model} at http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(make_app(args.model), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
