"""The engine registry and the transformers engine on the tiny random Qwen2.5-VL (CPU)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from goflow_gpu import engines as registry
from goflow_gpu.engines import InferenceRequest, InferenceResult, Sampling, create_engine
from goflow_gpu.engines.hf import TransformersEngine
from goflow_gpu.errors import ConfigError, EngineError
from goflow_gpu.settings import Settings

MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448

SCHEMAS = [
    {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]},
    {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0}}},
    None,
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, size, fmt in [
        ("wide.jpg", (640, 480), "JPEG"),
        ("tall.png", (300, 500), "PNG"),
        ("small.jpg", (120, 90), "JPEG"),
    ]:
        image = Image.new("RGB", size, (30, 90, 160))
        ImageDraw.Draw(image).rectangle((10, 10, size[0] // 2, size[1] // 2), fill=(240, 200, 0))
        image.save(folder / name, fmt)
        paths[name] = folder / name
    broken = folder / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    paths["broken.jpg"] = broken
    return paths


def _engine(model_dir: Path, **overrides: object) -> TransformersEngine:
    settings = Settings(
        engine="transformers",
        model=str(model_dir),
        model_label="tiny-test",
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        batch_size=4,
        device="cpu",
    )
    engine = create_engine(settings, **overrides)
    assert isinstance(engine, TransformersEngine)
    return engine


def _request(rid: str, image: Path, **kwargs: object) -> InferenceRequest:
    defaults: dict[str, object] = {
        "system_prompt": "You are a careful vision assistant.",
        "user_prompt": f"Describe the image ({rid}) as JSON.",
        "sampling": Sampling(max_tokens=5),
    }
    defaults.update(kwargs)
    return InferenceRequest(rid, image, **defaults)  # type: ignore[arg-type]


# -- registry (no heavy imports needed) -------------------------------------------------------


def test_importing_the_registry_imports_no_heavy_library() -> None:
    code = (
        "import sys, goflow_gpu.engines, goflow_gpu.engines.cli; "
        "heavy = [m for m in ('torch', 'transformers', 'vllm') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_available_engines_lists_the_installed_stack() -> None:
    names = registry.available_engines()
    # CI installs the whole CPU stack: every engine must be available there.
    assert set(names) == {"vllm", "transformers", "openai"}


def test_unknown_engine_and_missing_library_are_engine_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(EngineError, match="unknown engine 'nope'"):
        registry.engine_class("nope")
    monkeypatch.setitem(
        registry._REQUIRES, "transformers", (("goflow_no_such_library",), "transformers")
    )
    with pytest.raises(EngineError, match=r"goflow_no_such_library.*goflow-gpu\[transformers\]"):
        create_engine(Settings(engine="transformers"))
    assert "transformers" not in registry.available_engines()


@pytest.mark.engine
def test_create_engine_builds_the_transformers_engine_from_settings(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, batch_size=3)
    assert engine.name == "transformers"
    assert engine.model_label == "tiny-test"
    assert engine.supports_json_schema is False
    assert engine.batch_size == 3
    assert engine.max_in_flight == 96  # the settings default: 1.5x max_num_seqs (64)


# -- the engine ---------------------------------------------------------------------------


def _check_well_formed(result: InferenceResult, request: InferenceRequest) -> None:
    assert result.request_id == request.request_id
    assert result.error is None, result.error
    assert isinstance(result.text, str)
    assert result.finish_reason in ("stop", "length")
    assert result.generated_tokens is not None
    assert 1 <= result.generated_tokens <= request.sampling.max_tokens
    if result.finish_reason == "length":
        assert result.generated_tokens == request.sampling.max_tokens
    assert result.prompt_tokens is not None
    assert result.prompt_tokens > 0
    assert result.finished_at >= result.started_at > 0


@pytest.mark.engine
def test_mixed_concurrent_batch_is_answered_well_formed(
    tiny_model_dir: Path, images: dict[str, Path]
) -> None:
    requests = [
        _request("wide-0", images["wide.jpg"], json_schema=SCHEMAS[0]),
        _request("wide-1", images["wide.jpg"], json_schema=SCHEMAS[1], user_prompt="Count."),
        _request("tall-0", images["tall.png"], sampling=Sampling(max_tokens=3)),
        _request("tall-1", images["tall.png"], image_first=False, json_schema=SCHEMAS[0]),
        _request("small-0", images["small.jpg"], system_prompt=""),
        _request("small-1", images["small.jpg"], sampling=Sampling(max_tokens=4, temperature=0.8)),
        _request("wide-2", images["wide.jpg"], sampling=Sampling(max_tokens=6)),
    ]

    async def run() -> list[InferenceResult]:
        async with _engine(tiny_model_dir) as engine:
            return list(await asyncio.gather(*(engine.infer(r) for r in requests)))

    results = asyncio.run(run())
    for result, request in zip(results, requests, strict=True):
        _check_well_formed(result, request)
    by_id = {r.request_id: r for r in results}
    # Worked out by hand with Qwen's rule (sides multiples of 28, area in [56*56, 448*448]):
    # 640x480 is over budget: scale sqrt(640*480 / 448**2) = 1.2372, then
    # 640/1.2372/28 = 18.47 -> 18*28 = 504 and 480/1.2372/28 = 13.86 -> 13*28 = 364.
    assert by_id["wide-0"].image_size == (504, 364)
    # 300x500 fits: 300/28 = 10.7 -> 11*28 = 308, 500/28 = 17.9 -> 18*28 = 504.
    assert by_id["tall-0"].image_size == (308, 504)
    # 120x90: 120/28 = 4.3 -> 4*28 = 112, 90/28 = 3.2 -> 3*28 = 84 (area 9408 >= 3136).
    assert by_id["small-0"].image_size == (112, 84)
    # The prompt holds one token per 28x28 px of the resized image: 18*13 = 234 for 640x480.
    assert by_id["wide-0"].prompt_tokens is not None
    assert by_id["wide-0"].prompt_tokens > 234
    assert by_id["small-0"].prompt_tokens is not None
    assert 12 < by_id["small-0"].prompt_tokens < 234


@pytest.mark.engine
def test_unreadable_image_fails_alone(tiny_model_dir: Path, images: dict[str, Path]) -> None:
    requests = [
        _request("good-0", images["wide.jpg"]),
        _request("broken", images["broken.jpg"]),
        _request("missing", images["wide.jpg"].parent / "nowhere.jpg"),
        _request("good-1", images["small.jpg"]),
    ]

    async def run() -> list[InferenceResult]:
        async with _engine(tiny_model_dir) as engine:
            return list(await asyncio.gather(*(engine.infer(r) for r in requests)))

    good0, broken, missing, good1 = asyncio.run(run())
    _check_well_formed(good0, requests[0])
    _check_well_formed(good1, requests[3])
    assert broken.error is not None
    assert "broken.jpg" in broken.error
    assert "not a readable image" in broken.error
    assert broken.text == ""
    assert missing.error is not None
    assert "does not exist" in missing.error


@pytest.mark.engine
def test_close_releases_and_the_engine_starts_again(
    tiny_model_dir: Path, images: dict[str, Path]
) -> None:
    async def run() -> None:
        engine = _engine(tiny_model_dir, batch_size=1)
        await engine.start()
        assert engine.started
        tasks = [
            asyncio.create_task(engine.infer(_request(f"r{i}", images["small.jpg"])))
            for i in range(6)
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await engine.close()
        assert not engine.started
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        closed = [o for o in outcomes if isinstance(o, EngineError)]
        answered = [o for o in outcomes if isinstance(o, InferenceResult)]
        assert len(closed) + len(answered) == 6
        assert len(answered) >= 1
        assert len(closed) >= 3
        assert all("closed" in str(e) for e in closed)
        await engine.close()  # idempotent

        await engine.start()
        again = await engine.infer(_request("again", images["tall.png"]))
        _check_well_formed(again, _request("again", images["tall.png"]))
        await engine.close()

    asyncio.run(run())


@pytest.mark.engine
def test_a_cancelled_caller_does_not_disturb_the_others(
    tiny_model_dir: Path, images: dict[str, Path]
) -> None:
    async def run() -> list[InferenceResult]:
        async with _engine(tiny_model_dir, batch_size=2) as engine:
            doomed = asyncio.create_task(engine.infer(_request("doomed", images["wide.jpg"])))
            others = [
                asyncio.create_task(engine.infer(_request(f"ok{i}", images["small.jpg"])))
                for i in range(3)
            ]
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            return list(await asyncio.gather(*others))

    results = asyncio.run(run())
    assert [r.request_id for r in results] == ["ok0", "ok1", "ok2"]
    assert all(r.error is None for r in results)


@pytest.mark.engine
def test_dummy_load_format_builds_random_weights_from_the_config(
    tiny_model_dir: Path, images: dict[str, Path]
) -> None:
    async def run() -> InferenceResult:
        async with _engine(tiny_model_dir, load_format="dummy", seed=3) as engine:
            return await engine.infer(_request("dummy", images["tall.png"]))

    result = asyncio.run(run())
    _check_well_formed(result, _request("dummy", images["tall.png"]))
    assert result.image_size == (308, 504)


@pytest.mark.engine
def test_bad_model_directory_is_a_configuration_error(tmp_path: Path) -> None:
    # Refused before anything is imported or loaded, with the doctor's message (exit 2: the
    # setting must change; a restart would fail the same way).
    async def run() -> None:
        async with _engine(tmp_path / "no-model"):
            pass

    with pytest.raises(ConfigError, match="no-model: no such directory"):
        asyncio.run(run())


def _check_token_logprobs(result: InferenceResult) -> None:
    assert result.token_logprobs is not None, result
    assert "".join(text for text, _ in result.token_logprobs) == result.text
    assert len(result.token_logprobs) == result.generated_tokens
    assert all(math.isfinite(value) and value <= 0 for _, value in result.token_logprobs)


@pytest.mark.engine
def test_token_logprobs_only_for_the_requests_that_ask(
    tiny_model_dir: Path, images: dict[str, Path]
) -> None:
    # One batch: asking requests and others share one generate; sampled ones too.
    requests = [
        _request("ask-0", images["wide.jpg"], logprobs=True, sampling=Sampling(max_tokens=12)),
        _request("plain", images["wide.jpg"], sampling=Sampling(max_tokens=12)),
        _request("ask-1", images["small.jpg"], logprobs=True, sampling=Sampling(max_tokens=3)),
        _request(
            "ask-hot",
            images["tall.png"],
            logprobs=True,
            sampling=Sampling(max_tokens=8, temperature=0.9),
        ),
    ]

    async def run() -> list[InferenceResult]:
        async with _engine(tiny_model_dir) as engine:
            return list(await asyncio.gather(*(engine.infer(r) for r in requests)))

    ask0, plain, ask1, hot = asyncio.run(run())
    for result, request in zip((ask0, plain, ask1, hot), requests, strict=True):
        _check_well_formed(result, request)
    _check_token_logprobs(ask0)
    _check_token_logprobs(ask1)
    _check_token_logprobs(hot)
    assert plain.token_logprobs is None
    # Greedy: each written token was the most likely one, so none is below log(1/vocabulary).
    assert all(value >= math.log(1 / 4096) for _, value in ask0.token_logprobs or [])
