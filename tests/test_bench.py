"""The benchmark: figures from hand-written events, a small bench run end to end with the
scripted engine (results.json, Markdown table, PNGs, the report-concurrency ratio), and the
request rewrites of the layout comparison. No model is loaded here.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from goflow_gpu.bench.cli import register
from goflow_gpu.bench.figures import compute_figures, percentile, union_length
from goflow_gpu.bench.layout import (
    LAYOUT_MAX_TOKENS,
    LAYOUT_MIN_LONG_SIDE,
    compare_layout,
    engine_block_size,
    job_requests,
)
from goflow_gpu.bench.prefix import ideal_cached, image_tokens
from goflow_gpu.bench.runner import BenchConfig
from goflow_gpu.bench.suite import run_suite
from goflow_gpu.bench.wrapper import BenchEngine
from goflow_gpu.engines.base import InferenceRequest, Sampling
from goflow_gpu.events import Event
from tests.doubles import ScriptedEngine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ev(
    kind: str, t: float, mid: str | None = None, aid: str | None = None, **data: object
) -> Event:
    return Event(kind, "p", mid, aid, t, dict(data))


def hand_written_job() -> list[Event]:
    """Job from t=10 to t=20. Inference spans: A 11-13, B 12-14, C 16-17 (attempt 1), C 17.5-18
    (attempt 2). Busy union = [11,14] + [16,17] + [17.5,18] = 3 + 1 + 0.5 = 4.5 s.
    Idle while work remained (10 .. last inference end 18): 8 - 4.5 = 3.5 s.
    QA passes: A at 13, B at 14, C at 18; accepted POSTs: A 13.5, B 15, C 19 -> latencies
    0.5, 1.0, 1.0: p50 = 1.0, p95 = 1.0. First accepted POST at 13.5 -> 3.5 s after start.
    """
    return [
        ev("job_started", 10.0, combinations=3, media=1, analyses=3),
        ev("inference_started", 11.0, "m", "A", attempt=1),
        ev("inference_started", 12.0, "m", "B", attempt=1),
        ev(
            "inference_finished",
            13.0,
            "m",
            "A",
            attempt=1,
            prompt_tokens=100,
            cached_tokens=0,
            generated_tokens=10,
            error=None,
        ),
        ev("qa_verdict", 13.0, "m", "A", passed=True, attempt=1, final=True),
        ev("post_started", 13.1, "m", "A"),
        ev("post_finished", 13.5, "m", "A", http_status=201, outcome="accepted"),
        ev(
            "inference_finished",
            14.0,
            "m",
            "B",
            attempt=1,
            prompt_tokens=100,
            cached_tokens=80,
            generated_tokens=12,
            error=None,
        ),
        ev("qa_verdict", 14.0, "m", "B", passed=True, attempt=1, final=True),
        ev("post_started", 14.5, "m", "B"),
        ev("post_finished", 15.0, "m", "B", http_status=201, outcome="accepted"),
        ev("inference_started", 16.0, "m", "C", attempt=1),
        ev(
            "inference_finished",
            17.0,
            "m",
            "C",
            attempt=1,
            prompt_tokens=100,
            cached_tokens=80,
            generated_tokens=5,
            error=None,
        ),
        ev("qa_verdict", 17.0, "m", "C", passed=False, attempt=1, final=False),
        ev("inference_started", 17.5, "m", "C", attempt=2),
        ev(
            "inference_finished",
            18.0,
            "m",
            "C",
            attempt=2,
            prompt_tokens=110,
            cached_tokens=100,
            generated_tokens=7,
            error=None,
        ),
        ev("qa_verdict", 18.0, "m", "C", passed=True, attempt=2, final=True),
        ev("post_started", 18.5, "m", "C"),
        ev("post_finished", 19.0, "m", "C", http_status=201, outcome="accepted"),
        ev("job_finished", 20.0, closed=True, completed=3, failed=0),
    ]


def test_figures_match_hand_computed_values() -> None:
    figures = compute_figures(hand_written_job())
    assert figures["wall_s"] == pytest.approx(10.0)
    assert figures["engine_busy_s"] == pytest.approx(4.5)
    assert figures["busy_fraction"] == pytest.approx(0.45)
    assert figures["overhead_s"] == pytest.approx(3.5)
    assert figures["overhead_fraction"] == pytest.approx(0.35)
    assert figures["first_post_s"] == pytest.approx(3.5)
    assert figures["qa_to_post_p50_s"] == pytest.approx(1.0)
    assert figures["qa_to_post_p95_s"] == pytest.approx(1.0)
    assert figures["combinations_per_s"] == pytest.approx(0.3)
    assert figures["requests"] == 4
    assert figures["prompt_tokens"] == 410
    assert figures["cached_tokens"] == 260
    assert figures["generated_tokens"] == 34
    assert (figures["completed"], figures["failed"]) == (3, 0)


def test_figures_need_a_started_job() -> None:
    with pytest.raises(ValueError, match="job_started"):
        compute_figures([ev("job_finished", 1.0)])


def test_percentile_and_union() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([], 50) is None
    assert union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)


def test_image_tokens_follow_the_28px_grid() -> None:
    # 448 x 448 within the budget: 16 x 16 cells of 28 px.
    assert image_tokens(448, 448, 56 * 56, 448 * 448) == 256
    # 1024 x 512 over a 256-token budget: scaled down to at most 256 cells.
    assert image_tokens(1024, 512, 56 * 56, 256 * 28 * 28) <= 256


def test_ideal_cache_counts_whole_blocks_of_the_longest_earlier_prefix() -> None:
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 5]]
    # Per token: 0; then 1 2 3 shared with the first (3); then all 5 but the last token (4).
    assert ideal_cached(prompts, 1) == 0 + 3 + 4
    # Blocks of 2: the second shares block (1, 2) but not (3, 9): 2. The third shares (1, 2) and
    # (3, 4) = 4 tokens, within its first 4 (its last token is always computed): 4.
    assert ideal_cached(prompts, 2) == 0 + 2 + 4
    # Blocks of 4: only the third matches a whole block, (1, 2, 3, 4), and 4 <= 5 - 1.
    assert ideal_cached(prompts, 4) == 4
    # A block is never served when it would include the prompt's last token.
    assert ideal_cached([[7, 8], [7, 8]], 2) == 0
    assert ideal_cached([[7, 8], [7, 8]], 1) == 1


def test_ideal_cache_starts_from_the_primed_prompts_and_keys_images_by_identity() -> None:
    system = [10, 11]
    a = [*system, ("a.jpg", 0), ("a.jpg", 1), 20]
    b = [*system, ("b.jpg", 0), ("b.jpg", 1), 20]
    # b shares only the system tokens with a: a different image breaks the prefix.
    assert ideal_cached([a, b], 1) == 2
    # With the system turn primed, a's first two tokens are hits too.
    assert ideal_cached([a, b], 1, primed=[system]) == 2 + 2
    assert ideal_cached([a, b, a], 2, primed=[system]) == 2 + 2 + 4
    with pytest.raises(ValueError, match="block_size"):
        ideal_cached([a], 0)


def test_block_size_is_read_from_a_started_vllm_engine_only() -> None:
    class Config:
        block_size = 128

    class VllmConfig:
        cache_config = Config()

    class Llm:
        vllm_config = VllmConfig()

    engine = ScriptedEngine()
    assert engine_block_size(engine) is None
    engine._llm = Llm()  # type: ignore[attr-defined]
    assert engine_block_size(engine) == 128


def test_layout_comparison_uses_large_images_and_short_answers(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    result = asyncio.run(
        compare_layout(
            engine, media=2, analyses=3, seed=5, image_long_side=(448, 640),
            workdir=tmp_path, max_tokens=64, counter=None,
        )
    )  # fmt: skip
    measured = [r for r in engine.history if not r.request_id.startswith("warm-up:")]
    assert len(measured) == 2 * 6
    assert all(r.sampling.max_tokens <= LAYOUT_MAX_TOKENS for r in measured)
    for request in measured:
        with Image.open(request.image_path) as image:
            assert max(image.size) >= LAYOUT_MIN_LONG_SIDE
    assert result["method"]["image_long_side"] == [896, 896]
    assert result["method"]["max_tokens"] == 16
    assert result["layouts"]["shared"]["errors"] == 0
    assert "images 896-896 px" in result["checks"][0]["what"]


def test_wrapper_rewrites_for_the_naive_layout_and_caps_tokens(tmp_path: Path) -> None:
    inner = ScriptedEngine()
    engine = BenchEngine(inner, max_tokens=64, naive=True, slug_of={"a1": "alt-text"})
    request = InferenceRequest(
        request_id="m1:a1:1",
        image_path=tmp_path / "x.jpg",
        system_prompt="You are careful.",
        user_prompt="Describe.",
        sampling=Sampling(max_tokens=512),
    )
    asyncio.run(engine.infer(request))
    sent = inner.history[0]
    assert sent.system_prompt == "[alt-text] You are careful."
    assert sent.image_first is False
    assert sent.sampling.max_tokens == 64
    asyncio.run(engine.close())
    assert inner.closed == 0  # the owner closes the inner engine


def test_layout_requests_are_media_major_with_one_image_per_group(tmp_path: Path) -> None:
    requests, slugs = asyncio.run(
        job_requests(2, 3, seed=3, image_long_side=(448, 640), image_dir=tmp_path)
    )
    assert len(requests) == 6
    media_order = [r.request_id.split(":")[0] for r in requests]
    assert media_order == sorted(media_order, key=media_order.index)  # grouped by media
    assert len(set(slugs.values())) == 3
    for request in requests:
        with Image.open(request.image_path) as image:
            assert max(image.size) >= 448


def test_small_bench_writes_every_figure_table_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    console = Console(record=True, width=200)
    result = asyncio.run(
        run_suite(
            ScriptedEngine(delay=0.01),
            BenchConfig(media=2, analyses=3, seed=5),
            out_dir=out,
            compare=["report-concurrency"],
            console=console,
        )
    )
    data = json.loads((out / "results.json").read_text())
    promised = {
        "wall_s", "combinations_per_s", "busy_fraction", "overhead_s", "first_post_s",
        "qa_to_post_p50_s", "qa_to_post_p95_s", "prompt_tokens", "cached_tokens",
        "cached_share_of_max", "generated_tokens", "downloads", "peak_rss_mib",
        "retries_by_cause",
    }  # fmt: skip
    assert len(data["runs"]) == 4  # baseline + three report-concurrency runs
    for run in data["runs"]:
        assert promised <= set(run["figures"])
        assert run["figures"]["combinations"] == 6
        assert run["figures"]["ledger_problems"] == 0
        assert run["figures"]["downloads"] == run["figures"]["downloads_expected"] == 2
    names = [c["name"] for c in data["comparisons"]]
    assert names == ["overhead", "report-concurrency"]
    table = (out / "results.md").read_text()
    assert "| wall time (s) |" in table and "report-concurrency" in table
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"throughput.png", "latency.png", "timeline-baseline.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as image:
            image.verify()
    assert set(result.files) >= {out / "results.json", out / "results.md"}
    printed = console.export_text()
    assert "report-concurrency: wall one-at-a-time / wall bounded (50 ms) = ratio" in printed
    # Five 50 ms POSTs one after the other take longer than with eight at once.
    ratio = data["comparisons"][1]["checks"][0]["value"]
    assert ratio > 1.0


def test_cli_refuses_an_unknown_comparison() -> None:
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["bench", "--compare", "speed", "--out", "unused"])
    assert result.exit_code == 2
    assert "unknown comparison speed" in result.output


def test_cached_maximum_is_counted_with_the_models_tokenizer(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The shared-prefix maximum needs the job's images after the job closed (keep_media)."""

    class CachingEngine(ScriptedEngine):
        reports_cached_tokens = True

    console = Console(record=True, width=200)
    result = asyncio.run(
        run_suite(
            CachingEngine(delay=0.0),
            BenchConfig(media=2, analyses=3, seed=5, model_dir=str(tiny_model_dir)),
            out_dir=tmp_path / "out",
            compare=[],
            console=console,
        )
    )
    figures = result.runs[0].figures
    assert figures["ledger_problems"] == 0
    # 2 images x (3 - 1) analyses that could reuse each image's shared prefix: positive.
    assert figures["cached_tokens_max"] > 0


def _run(label: str, engine: str, wall: float, prompt: int, generated: int, cached: int) -> Any:
    from goflow_gpu.bench.runner import RunResult

    figures = {
        "wall_s": wall,
        "prompt_tokens": prompt,
        "generated_tokens": generated,
        "cached_tokens": cached,
    }
    return RunResult(label=label, engine=engine, config={}, figures=figures)


def test_offline_check_is_the_ratio_of_the_medians_with_equal_token_counts() -> None:
    from goflow_gpu.bench.offline import offline_comparison

    runs = [
        _run("w1", "vllm", 22.0, 100, 10, 50),
        _run("o1", "vllm-offline", 20.0, 100, 10, 48),
        _run("w2", "vllm", 21.0, 100, 10, 50),
        _run("o2", "vllm-offline", 19.0, 100, 10, 50),
        _run("w3", "vllm", 30.0, 100, 10, 50),
        _run("o3", "vllm-offline", 25.0, 100, 10, 50),
    ]
    checks = offline_comparison(runs)["checks"]
    # medians: worker 22.0, offline 20.0 -> 1.1, just inside the target
    assert checks[0]["value"] == pytest.approx(1.1)
    assert checks[0]["met"] is True
    assert checks[1]["what"] == "prompt_tokens worker / LLM.generate (300 / 300)"
    assert checks[1]["met"] is True and checks[2]["met"] is True
    assert checks[3]["what"] == "cached_tokens worker / LLM.generate (150 / 148)"
    assert checks[3]["met"] is None  # reported, not a target
    runs[1] = _run("o1", "vllm-offline", 20.0, 100, 11, 48)  # one more generated token
    runs[5] = _run("o3", "vllm-offline", 19.5, 100, 10, 50)
    checks = offline_comparison(runs)["checks"]
    assert checks[0]["value"] == pytest.approx(22.0 / 19.5) and checks[0]["met"] is False
    assert checks[2]["met"] is False


def test_offline_comparison_needs_the_vllm_engine(tmp_path: Path) -> None:
    from goflow_gpu.bench.offline import compare_offline
    from goflow_gpu.errors import ConfigError

    with pytest.raises(ConfigError, match="needs the vllm engine, not scripted"):
        asyncio.run(compare_offline(ScriptedEngine(), BenchConfig(media=1, analyses=1), tmp_path))


def test_the_wrapper_keeps_every_request_as_the_engine_got_it(tmp_path: Path) -> None:
    wrapped = BenchEngine(ScriptedEngine(delay=0.0), max_tokens=8)
    requests = [
        InferenceRequest(f"m:a{i}:1", tmp_path / "x.png", "S", f"U{i}", sampling=Sampling(64))
        for i in range(3)
    ]

    async def main() -> None:
        for request in requests:
            await wrapped.infer(request)

    asyncio.run(main())
    assert [r.user_prompt for r in wrapped.sent] == ["U0", "U1", "U2"]
    assert {r.sampling.max_tokens for r in wrapped.sent} == {8}


def test_the_gpu_script_runs_vllm_with_the_h200_settings_and_the_offline_comparison(
    tmp_path: Path,
) -> None:
    from goflow_gpu.bench.gpu import gpu_settings, parse_args

    args = parse_args([str(tmp_path / "out"), "--engine", "vllm"])
    settings, compare, shape = gpu_settings("vllm", tmp_path / "model", args)
    assert (settings.engine, settings.load_format, settings.dtype) == ("vllm", "dummy", "bfloat16")
    # configs/h200-7b.yaml, written out: the scheduler budget LLM() would pick on an H200
    assert (settings.max_num_seqs, settings.max_num_batched_tokens) == (256, 16384)
    assert (settings.max_in_flight, settings.qa_retries) == (384, 0)
    assert settings.model == str(tmp_path / "model")
    assert compare == ["offline"]
    assert "max_num_batched_tokens 16384" in shape


def test_the_gpu_script_runs_transformers_batched_on_cuda(tmp_path: Path) -> None:
    from goflow_gpu.bench.gpu import gpu_settings, parse_args

    args = parse_args([str(tmp_path / "out"), "--engine", "transformers", "--batch-size", "16"])
    settings, compare, _shape = gpu_settings("transformers", tmp_path / "model", args)
    assert (settings.engine, settings.device, settings.load_format) == (
        "transformers",
        "cuda",
        "dummy",
    )
    assert (settings.batch_size, settings.max_in_flight) == (16, 32)
    assert compare == []
