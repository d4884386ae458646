"""``--compare offline``: the worker against vLLM's own offline batch API, on the same requests.

The best a Python program can do with vLLM on a fixed set of requests is to hand them all at once
to ``vllm.LLM.generate``: no HTTP, no downloads, no QA, no database, the scheduler sees the whole
queue from the first step. That is the bar for the worker's feeding of the engine.

Each repeat runs one synthetic job through the worker (``run_job``, the in-process ``AsyncLLM``
of the :class:`~goflow_gpu.engines.vllm_engine.VllmEngine`), records every request the engine was
sent (QA re-asks included), then gives exactly those requests to an offline ``LLM`` built from
the same engine arguments (:meth:`VllmEngine.engine_kwargs`, so ``max_num_batched_tokens``,
prefix caching, pixel bounds and structured-output backend are equal), with the same prompt
dicts (:meth:`VllmEngine.prompt`: rendered chat text, the prepared image and its
``multi_modal_uuids``) and the same ``SamplingParams``. The offline side decodes its images
before its clock starts and is timed over ``generate`` alone; the worker is timed over its whole
job (simulator, downloads, QA, POSTs, SQLite). Both engines' prefix and multimodal caches are
emptied before each side runs, and every repeat uses new pictures.

The check is the median of the worker's wall times over the median of the offline ones (target
:data:`OFFLINE_TARGET`), with the token counts of both sides next to it: prompt and generated
tokens must be equal for the figure to mean anything (cached tokens may differ a little, since
which request of an image is prefilled first depends on the arrival order).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

from goflow_gpu.bench.compare import _ratio
from goflow_gpu.bench.runner import BenchConfig, RunResult, run_job
from goflow_gpu.engines.base import Engine, InferenceRequest
from goflow_gpu.engines.images import prepare_image
from goflow_gpu.engines.vllm_engine import VllmEngine
from goflow_gpu.errors import ConfigError

OFFLINE_TARGET = 1.10
REPEATS = 3


def build_offline_llm(engine: VllmEngine) -> Any:
    """``vllm.LLM`` with the started engine's own arguments (blocking; seconds to minutes).

    The scheduler budget is the one the engine resolved: left unset, ``LLM()`` and ``AsyncLLM``
    pick different defaults (see :meth:`VllmEngine.engine_kwargs`).
    """
    from vllm import LLM

    kwargs = engine.engine_kwargs()
    kwargs["max_num_batched_tokens"] = engine.scheduler_budget
    llm = LLM(**kwargs, structured_outputs_config=engine.structured_outputs_config())
    offline_budget = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    if offline_budget != engine.scheduler_budget:  # pragma: no cover - a vLLM change
        raise ConfigError(
            f"the offline LLM took max_num_batched_tokens {offline_budget}, the engine "
            f"{engine.scheduler_budget}: the comparison would not be fair"
        )
    return llm


def run_offline(llm: Any, engine: VllmEngine, requests: list[InferenceRequest]) -> dict[str, Any]:
    """Generate ``requests`` with one ``llm.generate`` call; returns its figures (blocking)."""
    images = {}
    for request in requests:
        if request.image_path not in images:
            images[request.image_path] = prepare_image(
                request.image_path, engine.min_pixels, engine.max_pixels
            )
    prompts = [engine.prompt(r, images[r.image_path], engine.template) for r in requests]
    params = [engine.sampling_params(r) for r in requests]
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    began = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - began
    combinations = len({r.request_id.rsplit(":", 1)[0] for r in requests})
    return {
        "wall_s": wall,
        "requests": len(outputs),
        "combinations": combinations,
        "combinations_per_s": combinations / wall,
        "prompt_tokens": sum(len(o.prompt_token_ids or ()) for o in outputs),
        "cached_tokens": sum(int(o.num_cached_tokens or 0) for o in outputs),
        "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs if o.outputs),
        "images": len(images),
    }


async def compare_offline(
    engine: Engine, config: BenchConfig, workdir: Path, *, repeats: int = REPEATS
) -> tuple[list[RunResult], dict[str, Any]]:
    """``repeats`` x (worker job, then the same requests offline); the ratio of the medians."""
    if not isinstance(engine, VllmEngine):
        raise ConfigError(
            f"--compare offline measures against vLLM's LLM.generate: it needs the vllm "
            f"engine, not {engine.name}"
        )
    await engine.start()
    llm = await asyncio.to_thread(build_offline_llm, engine)
    runs: list[RunResult] = []
    try:
        for index in range(repeats):
            seed = config.seed + 200 + index  # new pictures: no cache is warm for them
            await engine.reset_caches()
            worker = await run_job(
                engine,
                dataclasses.replace(config, seed=seed),
                workdir / f"offline-{index}",
                label=f"worker #{index + 1}",
            )
            figures = await asyncio.to_thread(run_offline, llm, engine, worker.sent)
            offline = RunResult(
                label=f"LLM.generate #{index + 1}",
                engine="vllm-offline",
                config=worker.config,
                figures=figures,
            )
            runs += [worker, offline]
    finally:
        await asyncio.to_thread(_shutdown, llm)
    comparison = offline_comparison(runs)
    comparison["max_num_batched_tokens"] = engine.scheduler_budget
    return runs, comparison


def offline_comparison(runs: list[RunResult]) -> dict[str, Any]:
    """The check of :func:`compare_offline` from its runs (worker, offline, worker, ...)."""
    workers = [r for r in runs if r.engine != "vllm-offline"]
    offline = [r for r in runs if r.engine == "vllm-offline"]
    worker_s = statistics.median(r.figures["wall_s"] for r in workers)
    offline_s = statistics.median(r.figures["wall_s"] for r in offline)
    ratio = _ratio(worker_s, offline_s)
    checks: list[dict[str, Any]] = [
        {
            "what": f"median wall worker / median wall LLM.generate ({len(workers)} each)",
            "value": ratio,
            "target": f"<= {OFFLINE_TARGET}",
            "met": ratio <= OFFLINE_TARGET,
        }
    ]
    for key in ("prompt_tokens", "generated_tokens", "cached_tokens"):
        worker_total = sum(r.figures[key] or 0 for r in workers)
        offline_total = sum(r.figures[key] or 0 for r in offline)
        exact = key != "cached_tokens"
        checks.append(
            {
                "what": f"{key} worker / LLM.generate ({worker_total} / {offline_total})",
                "value": _ratio(worker_total, offline_total),
                "target": "== 1" if exact else "",
                "met": worker_total == offline_total if exact else None,
            }
        )
    return {
        "name": "offline",
        "runs": [r.label for r in runs],
        "worker_wall_s": [r.figures["wall_s"] for r in workers],
        "offline_wall_s": [r.figures["wall_s"] for r in offline],
        "checks": checks,
    }


def _shutdown(llm: Any) -> None:
    """Stop the offline engine's core process now rather than at garbage collection."""
    llm.llm_engine.engine_core.shutdown()
