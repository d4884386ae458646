"""The ``layout`` comparison: the prompt layout lever measured on the engine alone.

The worker always builds the shared layout (one system prompt, image first, media-major), and
has no analysis-major order. To isolate the lever, this module drives the engine directly with
the requests the worker would build for one job (same images, same catalog prompts, same
schemas and budgets), once per layout, each kept ``engine.max_in_flight`` deep:

- ``shared``: the catalog's shared system prompt, image first, media-major order;
- ``naive``: ``"[slug] " + system`` per analysis, text before the image, analysis-major order.

A warm-up pass (one short request per analysis under a third system prompt) compiles every
schema's grammar and warms the kernels first. Shared runs first, so any warm-up left over
favours the naive layout (the comparison stays conservative); the two layouts share no prefix
(their first tokens differ), so the first cannot fill the prefix cache for the second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

from goflow_gpu.bench.prefix import PrefixCounter
from goflow_gpu.bench.wrapper import capped_request, naive_request
from goflow_gpu.engines.base import Engine, InferenceRequest, Sampling
from goflow_gpu.prompts import load_catalog
from goflow_gpu.protocol import parse_manifest
from goflow_gpu.simulator import Simulator
from goflow_gpu.worker import plan_job

SPEEDUP_TARGET = 1.5
CACHED_SHARE_TARGET = 0.9


async def job_requests(
    media: int, analyses: int, *, seed: int, image_long_side: tuple[int, int], image_dir: Path
) -> tuple[list[InferenceRequest], dict[str, str]]:
    """The shared-layout requests of one synthetic job, media-major, and each request's slug.

    Images are rendered by the simulator (the same pictures a job would download) and written
    to ``image_dir``; prompts come from the shipped catalog via the worker's own planner.
    """
    await asyncio.to_thread(image_dir.mkdir, parents=True, exist_ok=True)
    async with Simulator(
        "layout-" + secrets.token_hex(8), seed=seed, image_long_side=image_long_side
    ) as sim:
        manifest = sim.add_job(media=media, analyses=analyses)
        plan = plan_job(parse_manifest(manifest), load_catalog(None))
        requests = []
        slugs = {}
        paths: dict[tuple[str, str], Path] = {}
        for i, combo in enumerate(plan):
            group = (combo.media_id, combo.variant)
            if group not in paths:
                path = image_dir / f"{combo.media_id}-{combo.variant}.jpg"
                data = await sim.image_bytes(combo.media_id, combo.variant)
                await asyncio.to_thread(path.write_bytes, data)
                paths[group] = path
            request_id = f"{combo.media_id}:{combo.analysis_id}:{i}"
            slugs[request_id] = combo.slug
            requests.append(
                InferenceRequest(
                    request_id=request_id,
                    image_path=paths[group],
                    system_prompt=combo.system_prompt,
                    user_prompt=combo.user_prompt,
                    json_schema=combo.json_schema,
                    sampling=Sampling(max_tokens=combo.max_tokens, temperature=combo.temperature),
                    group_key=group,
                )
            )
    return requests, slugs


async def _drive(engine: Engine, requests: list[InferenceRequest]) -> dict[str, Any]:
    async def source() -> Any:
        for request in requests:
            yield request

    began = time.monotonic()
    results = [result async for result in engine.stream(source())]
    wall = time.monotonic() - began
    return {
        "requests": len(results),
        "wall_s": wall,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in results),
        "cached_tokens": sum(r.cached_tokens or 0 for r in results)
        if engine.reports_cached_tokens
        else None,
        "generated_tokens": sum(r.generated_tokens or 0 for r in results),
        "errors": sum(1 for r in results if r.error),
    }


def warm_up_requests(
    requests: list[InferenceRequest], slugs: dict[str, str]
) -> list[InferenceRequest]:
    """One short request per analysis, under a system prompt neither layout uses.

    Engines compile each JSON schema's grammar once (xgrammar in vLLM) and warm their kernels
    on the first batches; without this the layout measured first pays for all of it.
    """
    first: dict[str, InferenceRequest] = {}
    for request in requests:
        first.setdefault(slugs[request.request_id], request)
    return [
        dataclasses.replace(
            capped_request(r, 4),
            request_id=f"warm-up:{r.request_id}",
            system_prompt="[warm-up] " + r.system_prompt,
        )
        for r in first.values()
    ]


def shared_maximum(requests: list[InferenceRequest], counter: PrefixCounter) -> int:
    """(n - 1) x shared prefix, summed over the (media, variant) groups of ``requests``."""
    sizes = Counter(r.group_key for r in requests)
    first: dict[tuple[str, str], InferenceRequest] = {}
    for request in requests:
        first.setdefault(request.group_key, request)
    return sum(
        (n - 1) * counter.tokens(first[g].system_prompt, first[g].image_path)
        for g, n in sizes.items()
    )


async def compare_layout(
    engine: Engine,
    *,
    media: int,
    analyses: int,
    seed: int,
    image_long_side: tuple[int, int],
    workdir: Path,
    max_tokens: int | None,
    counter: PrefixCounter | None,
) -> dict[str, Any]:
    """Both layouts on the same requests; returns the measurements, ratios and target checks."""
    shared, slugs = await job_requests(
        media, analyses, seed=seed, image_long_side=image_long_side, image_dir=workdir / "images"
    )
    shared = [capped_request(r, max_tokens) for r in shared]
    order = {slug: i for i, slug in enumerate(dict.fromkeys(slugs.values()))}
    naive = sorted(
        (naive_request(r, slugs[r.request_id]) for r in shared),
        key=lambda r: order[slugs[r.request_id]],  # stable: media order kept within a slug
    )
    await engine.start()
    await _drive(engine, warm_up_requests(shared, slugs))
    measured = {"shared": await _drive(engine, shared), "naive": await _drive(engine, naive)}
    maximum = shared_maximum(shared, counter) if counter is not None else None
    cached = measured["shared"]["cached_tokens"]
    share = cached / maximum if cached is not None and maximum else None
    speedup = measured["naive"]["wall_s"] / max(measured["shared"]["wall_s"], 1e-9)
    return {
        "name": "layout",
        "engine": engine.name,
        "media": media,
        "analyses": analyses,
        "layouts": measured,
        "cached_tokens_max": maximum,
        "checks": [
            {
                "what": "naive wall / shared wall",
                "value": speedup,
                "target": f">= {SPEEDUP_TARGET}",
                "met": speedup >= SPEEDUP_TARGET,
            },
            {
                "what": "shared cached tokens / theoretical max",
                "value": share,
                "target": f">= {CACHED_SHARE_TARGET:.0%}",
                "met": None if share is None else share >= CACHED_SHARE_TARGET,
            },
        ],
    }
