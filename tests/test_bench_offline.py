"""``bench --compare offline`` end to end on the tiny model: vLLM's AsyncLLM behind the worker, and
vLLM's offline ``LLM.generate`` on the requests the worker sent.

Timing is not asserted (that is the benchmark's job); what must hold is that both sides ran the
same requests: equal prompt and generated token counts, every worker request replayed once.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from rich.console import Console

from goflow_gpu.bench.runner import BenchConfig
from goflow_gpu.bench.suite import run_suite
from goflow_gpu.engines import create_engine
from goflow_gpu.settings import Settings

pytestmark = pytest.mark.engine

MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224


def test_worker_and_offline_batch_run_the_same_requests(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(
        engine="vllm",
        model=str(tiny_model_dir),
        model_label="tiny-test",
        max_model_len=2048,
        max_num_seqs=8,
        max_num_batched_tokens=2048,
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        max_in_flight=12,
    )
    config = BenchConfig(
        media=2,
        analyses=3,
        seed=3,
        qa_retries=0,
        max_tokens=12,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        image_long_side=(300, 400),
    )
    console = Console(record=True, width=200)
    result = asyncio.run(
        run_suite(
            create_engine(settings),
            config,
            out_dir=tmp_path / "out",
            compare=["offline"],
            console=console,
        )
    )
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    offline = next(c for c in data["comparisons"] if c["name"] == "offline")
    assert offline["max_num_batched_tokens"] == 2048  # the same scheduler budget on both sides
    labels = [r["label"] for r in data["runs"]]
    assert labels == [
        "baseline",
        "worker #1", "LLM.generate #1",
        "worker #2", "LLM.generate #2",
        "worker #3", "LLM.generate #3",
    ]  # fmt: skip
    workers = [r for r in result.runs if r.label.startswith("worker")]
    batches = [r for r in result.runs if r.label.startswith("LLM.generate")]
    for worker, batch in zip(workers, batches, strict=True):
        assert worker.figures["ledger_problems"] == 0
        assert len(worker.sent) == 6  # 2 x 3, no QA retries
        assert batch.figures["requests"] == 6 and batch.figures["combinations"] == 6
        assert batch.figures["images"] == 2
        assert batch.figures["prompt_tokens"] == worker.figures["prompt_tokens"] > 0
        assert batch.figures["generated_tokens"] == worker.figures["generated_tokens"] > 0
    checks = {c["what"].split(" ")[0]: c for c in offline["checks"]}
    assert checks["median"]["value"] > 0
    assert checks["prompt_tokens"]["met"] is True
    assert checks["generated_tokens"]["met"] is True
    assert "offline: median wall worker / median wall LLM.generate (3 each) = ratio" in (
        console.export_text()
    )
