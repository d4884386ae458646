"""The OpenAI-compatible engine: against a real vLLM server, and a scripted server for failures.

The real server (``vllm_server`` fixture) is ``python -m vllm.entrypoints.openai.api_server``
with the tiny random Qwen2.5-VL, started once per session. Failure paths (5xx, 429, 400, a
model that is not served) use a small aiohttp server on loopback that answers as scripted.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from PIL import Image

from goflow_gpu import retry
from goflow_gpu.engines import InferenceRequest, InferenceResult, Sampling, create_engine
from goflow_gpu.engines.openai_engine import OpenAIEngine
from goflow_gpu.errors import ConfigError, EngineError
from goflow_gpu.settings import Settings
from tests.conftest import VLLM_SERVED_NAME
from tests.engine_data import SCHEMAS

pytestmark = pytest.mark.engine

MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448
SYSTEM = "You are a careful vision assistant. Answer with JSON only."


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    retry.set_testing(True)
    yield
    retry.set_testing(False)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("openai-images")
    paths = {}
    for index, (name, size) in enumerate(
        [("wide.jpg", (640, 480)), ("big.png", (1000, 600)), ("tall.jpg", (300, 500))]
    ):
        Image.new("RGB", size, (30 + 50 * index, 120, 60)).save(folder / name)
        paths[name] = folder / name
    return paths


def _settings(base_url: str, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "engine": "openai",
        "openai_base_url": base_url,
        "model_label": "tiny-test",
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "max_in_flight": 4,
    }
    fields.update(overrides)
    return Settings(**fields)


def _engine(base_url: str, **overrides: Any) -> OpenAIEngine:
    engine = create_engine(_settings(base_url, **overrides))
    assert isinstance(engine, OpenAIEngine)
    return engine


def _request(rid: str, image: Path, **kwargs: Any) -> InferenceRequest:
    fields: dict[str, Any] = {
        "system_prompt": SYSTEM,
        "user_prompt": f"Question {rid}: describe the image.",
        "sampling": Sampling(max_tokens=48),
    }
    fields.update(kwargs)
    return InferenceRequest(rid, image, **fields)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- against a real vLLM server -----------------------------------------------------------------


def test_mixed_concurrent_requests_return_parseable_json(
    vllm_server: str, images: dict[str, Path]
) -> None:
    # The configured model (the default Qwen id) is not served; the only served one is used.
    engine = _engine(vllm_server + "/v1/")
    names = list(images)
    requests = [
        _request(
            f"mix-{i}",
            images[names[i % len(names)]],
            json_schema=SCHEMAS[i % len(SCHEMAS)],
            user_prompt=f"Task {i}.",
        )
        for i in range(9)
    ]

    async def scenario() -> tuple[str | None, list[InferenceResult]]:
        async def source() -> AsyncIterator[InferenceRequest]:
            for request in requests:
                yield request

        async with engine:
            return engine.served_model, [result async for result in engine.stream(source())]

    served, results = asyncio.run(scenario())

    assert served == VLLM_SERVED_NAME
    assert sorted(r.request_id for r in results) == sorted(r.request_id for r in requests)
    by_id = {r.request_id: r for r in results}
    expected_sizes = {"wide.jpg": (504, 364), "big.png": (560, 336), "tall.jpg": (308, 504)}
    for request in requests:
        result = by_id[request.request_id]
        assert result.error is None, result.error
        # Bounded schemas: the random model has nowhere to ramble, so each object closes.
        assert result.finish_reason == "stop", result
        assert request.json_schema is not None
        jsonschema.validate(json.loads(result.text), request.json_schema)
        assert result.prompt_tokens and result.generated_tokens
        assert result.image_size == expected_sizes[request.image_path.name]


def test_cached_tokens_are_reported_for_later_analyses_of_an_image(
    vllm_server: str, tmp_path: Path
) -> None:
    path = tmp_path / "fresh.jpg"
    Image.new("RGB", (640, 480), (201, 13, 77)).save(path)
    engine = _engine(vllm_server)  # no /v1: the engine adds it
    system = "Cache report test."

    async def scenario() -> list[InferenceResult]:
        async with engine:
            first = await engine.infer(_request("c-0", path, system_prompt=system))
            later = await asyncio.gather(
                *(engine.infer(_request(f"c-{i}", path, system_prompt=system)) for i in range(1, 3))
            )
            return [first, *later]

    first, *later = asyncio.run(scenario())
    assert first.error is None
    image_tokens = (504 // 28) * (364 // 28)
    for result in later:
        assert result.cached_tokens is not None and result.cached_tokens >= image_tokens - 16


def test_token_logprobs_from_a_real_server_spell_the_text(
    vllm_server: str, images: dict[str, Path]
) -> None:
    engine = _engine(vllm_server)

    async def scenario() -> list[InferenceResult]:
        async with engine:
            return list(
                await asyncio.gather(
                    engine.infer(
                        _request("lp", images["wide.jpg"], json_schema=SCHEMAS[1], logprobs=True)
                    ),
                    engine.infer(_request("plain", images["wide.jpg"], json_schema=SCHEMAS[1])),
                )
            )

    asked, plain = asyncio.run(scenario())
    assert asked.error is None and asked.finish_reason == "stop"
    tokens = asked.token_logprobs
    assert tokens is not None
    assert "".join(text for text, _ in tokens) == asked.text
    assert len(tokens) == asked.generated_tokens
    # vLLM serve names the stop token "<|im_end|>"; it spells no text of the answer.
    assert tokens[-1][0] == ""
    assert all(math.isfinite(value) and value <= 0 for _, value in tokens)
    assert plain.error is None and plain.token_logprobs is None


def test_an_unreachable_server_raises_engine_error_naming_it(images: dict[str, Path]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    engine = _engine(url)

    async def scenario() -> None:
        try:
            await engine.infer(_request("x", images["wide.jpg"]))
        finally:
            await engine.close()

    with pytest.raises(EngineError, match=r"cannot reach the OpenAI-compatible server") as info:
        asyncio.run(scenario())
    assert f"{url}/v1" in str(info.value)


def test_openai_engine_needs_a_base_url() -> None:
    with pytest.raises(ConfigError, match="openai_base_url"):
        create_engine(Settings(engine="openai"))


# -- against a scripted server ------------------------------------------------------------------


class Scripted:
    """A loopback chat-completions server answering from a script; records what it received."""

    def __init__(self, script: list[tuple[int, dict[str, Any]]], models: list[str]) -> None:
        self.script = list(script)
        self.models = models
        self.received: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": m} for m in self.models]})

    async def _chat(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.auth.append(request.headers.get("Authorization"))
        status, body = self.script.pop(0)
        headers = {"Retry-After": "0"} if status == 429 else None
        return web.json_response(body, status=status, headers=headers)

    async def __aenter__(self) -> Scripted:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def _completion(text: str) -> dict[str, Any]:
    return {
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 300, "completion_tokens": 7},
    }


def test_retries_5xx_and_429_then_sends_the_documented_request(
    images: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOFLOW_OPENAI_API_KEY", "made-up-inference-key")
    script = [
        (503, {"error": "warming up"}),
        (429, {"error": "slow down"}),
        (200, _completion('{"ok":true}')),
    ]
    schema = SCHEMAS[0] | {"title": "Image check!"}

    async def scenario() -> tuple[Scripted, InferenceResult, str]:
        async with Scripted(script, ["qwen2.5vl:7b"]) as server:
            engine = _engine(server.url, model="qwen2.5vl:7b", seed=7)
            async with engine:
                result = await engine.infer(
                    _request("r", images["big.png"], json_schema=schema, user_prompt="Check.")
                )
            return server, result, repr(engine)

    server, result, shown = asyncio.run(scenario())

    assert result.error is None and result.text == '{"ok":true}'
    assert (result.prompt_tokens, result.generated_tokens, result.cached_tokens) == (300, 7, None)
    assert len(server.received) == 3  # two retried failures, then the answer
    body = server.received[-1]
    assert body["model"] == "qwen2.5vl:7b"
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (48, 0.0, 7)
    # Explicit: otherwise the server applies the model's generation_config (1.05 for Qwen).
    assert (body["top_p"], body["repetition_penalty"]) == (1.0, 1.0)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Image_check", "schema": schema, "strict": True},
    }
    system, user = body["messages"]
    assert system == {"role": "system", "content": SYSTEM}
    image_part, text_part = user["content"]  # image first, then the text
    assert text_part == {"type": "text", "text": "Check."}
    prefix = "data:image/jpeg;base64,"
    assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith(prefix)
    sent = Image.open(io.BytesIO(base64.b64decode(image_part["image_url"]["url"][len(prefix) :])))
    assert sent.format == "JPEG" and sent.size == (560, 336) == result.image_size
    assert server.auth == ["Bearer made-up-inference-key"] * 3
    assert "made-up-inference-key" not in shown


def _logprob_item(token: str, logprob: float, data: bytes | None = None) -> dict[str, Any]:
    raw = token.encode() if data is None else data
    return {"token": token, "logprob": logprob, "bytes": list(raw), "top_logprobs": []}


def test_logprobs_are_asked_for_only_when_the_request_does(images: dict[str, Path]) -> None:
    text = '{"name":"car"}'
    answer = _completion(text)
    answer["choices"][0]["logprobs"] = {
        "content": [
            _logprob_item('{"', -0.1),
            _logprob_item("name", 0.0),
            _logprob_item('":"', -0.2),
            _logprob_item("car", -1.5),
            _logprob_item('"}', -0.01),
            _logprob_item("<|im_end|>", -0.3),
        ]
    }
    script = [(200, answer), (200, answer)]

    async def scenario() -> tuple[Scripted, InferenceResult, InferenceResult]:
        async with Scripted(script, ["m"]) as server:
            async with _engine(server.url) as engine:
                asked = await engine.infer(_request("a", images["wide.jpg"], logprobs=True))
                plain = await engine.infer(_request("p", images["wide.jpg"]))
            return server, asked, plain

    server, asked, plain = asyncio.run(scenario())
    asked_body, plain_body = server.received
    assert asked_body["logprobs"] is True
    assert "top_logprobs" not in asked_body
    assert "logprobs" not in plain_body
    assert asked.token_logprobs == [
        ('{"', -0.1),
        ("name", 0.0),
        ('":"', -0.2),
        ("car", -1.5),
        ('"}', -0.01),
        ("", -0.3),  # the stop token: no text of the answer
    ]
    # Not asked: whatever the server sends is not reported.
    assert plain.token_logprobs is None


def test_split_characters_are_rebuilt_from_the_bytes_and_bad_logprobs_give_none(
    images: dict[str, Path],
) -> None:
    text = '{"w":"café"}'
    e_acute = "é".encode()  # two bytes, C3 A9, written by two tokens
    split = _completion(text)
    split["choices"][0]["logprobs"] = {
        "content": [
            _logprob_item('{"w":"caf', -0.2),
            _logprob_item("bytes:\\xc3", -0.7, e_acute[:1]),
            _logprob_item("bytes:\\xa9", -0.1, e_acute[1:]),
            _logprob_item('"}', -0.05),
        ]
    }
    other_text = _completion(text)
    other_text["choices"][0]["logprobs"] = {"content": [_logprob_item('{"w":"cafe"}', -0.2)]}
    no_logprobs = _completion(text)
    script = [(200, split), (200, other_text), (200, no_logprobs)]

    async def scenario() -> list[InferenceResult]:
        async with Scripted(script, ["m"]) as server, _engine(server.url) as engine:
            return [
                await engine.infer(_request(f"r{i}", images["wide.jpg"], logprobs=True))
                for i in range(3)
            ]

    rebuilt, mismatched, missing = asyncio.run(scenario())
    assert rebuilt.token_logprobs == [
        ('{"w":"caf', -0.2),
        ("", -0.7),
        ("é", -0.1),
        ('"}', -0.05),
    ]
    assert mismatched.text == text and mismatched.token_logprobs is None
    assert missing.text == text and missing.token_logprobs is None


def test_a_refused_request_is_a_result_error_with_the_servers_reason(
    images: dict[str, Path],
) -> None:
    script = [(400, {"error": {"message": "response_format json_schema is not supported"}})]

    async def scenario() -> tuple[Scripted, InferenceResult]:
        async with Scripted(script, ["only-model"]) as server:
            engine = _engine(server.url)
            async with engine:
                result = await engine.infer(_request("r", images["tall.jpg"], image_first=False))
            return server, result

    server, result = asyncio.run(scenario())
    assert result.error is not None
    assert "400" in result.error and "json_schema is not supported" in result.error
    assert len(server.received) == 1, "a 400 is not retried"
    text_part, image_part = server.received[0]["messages"][1]["content"]
    assert text_part["type"] == "text" and image_part["type"] == "image_url"


def test_persistent_5xx_stops_the_job_as_an_engine_error_after_the_retries(
    images: dict[str, Path],
) -> None:
    script = [(500, {"error": "boom"})] * 4
    received: list[Any] = []

    async def scenario() -> None:
        async with Scripted(script, ["m"]) as server:
            engine = _engine(server.url)
            try:
                async with engine:
                    await engine.infer(_request("r", images["tall.jpg"]))
            finally:
                received.extend(server.received)

    # Not a failed result: the job stops resumably and the request is asked again later.
    with pytest.raises(EngineError, match=r"kept failing: .*500.*boom"):
        asyncio.run(scenario())
    assert len(received) == 4  # first try + 3 retries


def test_a_model_that_is_not_served_among_several_is_an_engine_error() -> None:
    async def scenario() -> None:
        async with Scripted([], ["a", "b"]) as server:
            engine = _engine(server.url, model="c")
            try:
                await engine.start()
            finally:
                await engine.close()

    with pytest.raises(EngineError, match=r"does not serve model 'c'; it serves: a, b"):
        asyncio.run(scenario())
