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

The lever is the image's prefill, so the comparison makes the image dominate the prompt as it
does on a real model (a 7B prompt is ~1000 visual tokens + ~150 text): pictures of at least
:data:`LAYOUT_MIN_LONG_SIDE` px on the long side, and answers capped at
:data:`LAYOUT_MAX_TOKENS` tokens so that prefill, not decoding, is what both layouts pay. The
visual tokens per picture still come from the engine's pixel budget (``min_pixels`` /
``max_pixels``): the tiny model's default of 256 x 28 x 28 caps them at 256, against ~450 tokens
of byte-level text, so run it with ``max_pixels: 802816`` (1024 x 28 x 28). The result states
the share of visual tokens in the prompt, so a run where text dominates reads as such.

Cached tokens are read against three maxima (see :func:`token_maxima`): issue 6's
``(n - 1) x (system + image)`` per (media, variant); and what an ideal prefix cache would serve
for the exact prompts in the order sent, per token (raw) and in whole KV blocks as vLLM caches
them (block). The target is checked against the block one; the others are reported next to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

from goflow_gpu.bench.prefix import PrefixCounter, ideal_cached
from goflow_gpu.bench.wrapper import capped_request, naive_request
from goflow_gpu.engines.base import Engine, InferenceRequest, Sampling
from goflow_gpu.prompts import load_catalog
from goflow_gpu.protocol import parse_manifest
from goflow_gpu.simulator import Simulator
from goflow_gpu.worker import plan_job

SPEEDUP_TARGET = 1.5
CACHED_SHARE_TARGET = 0.9
#: The shortest long side of the comparison's pictures: large enough for ~1000 visual tokens
#: under a 1024 x 28 x 28 pixel budget.
LAYOUT_MIN_LONG_SIDE = 896
#: Answers stay short, so prefill (the lever) dominates the time as it does on a 7B model.
LAYOUT_MAX_TOKENS = 16


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


async def _drive(
    engine: Engine, requests: list[InferenceRequest]
) -> tuple[dict[str, Any], set[str]]:
    """Stream ``requests`` through ``engine``: the figures, and the ids of the failed ones."""

    async def source() -> Any:
        for request in requests:
            yield request

    began = time.monotonic()
    results = [result async for result in engine.stream(source())]
    wall = time.monotonic() - began
    failed = {r.request_id for r in results if r.error}
    figures = {
        "requests": len(results),
        "wall_s": wall,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in results),
        "cached_tokens": sum(r.cached_tokens or 0 for r in results)
        if engine.reports_cached_tokens
        else None,
        "generated_tokens": sum(r.generated_tokens or 0 for r in results),
        "errors": len(failed),
        # A few distinct messages, so a run with failures says why.
        "error_messages": sorted({str(r.error)[:300] for r in results if r.error})[:3],
    }
    return figures, failed


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


def token_maxima(
    shared: list[InferenceRequest],
    naive: list[InferenceRequest],
    counter: PrefixCounter,
    block_size: int | None,
) -> dict[str, Any]:
    """The prompt-token figures the measured cached tokens are read against.

    ``issue_max``: issue 6's theoretical maximum of the shared layout, ``(n - 1)`` x
    (system + image) tokens per (media, variant). Per layout (``shared``, ``naive``): the
    expected prompt tokens, the visual ones, and what an ideal prefix cache serves for those
    prompts in that order, per token (``ideal_raw``) and in whole blocks of ``block_size``
    (``ideal_block``, None when the block size is unknown), with the shared layout's text
    before the image already cached.
    """
    figures: dict[str, Any] = {"issue_max": shared_maximum(shared, counter)}
    # The engine has served the catalog's system prompt before (the suite's baseline run, or a
    # running worker's first request): the ideal cache holds the shared text before the image.
    first = counter.prompt(shared[0]) if shared else []
    primer = [list(itertools.takewhile(lambda t: not isinstance(t, tuple), first))]
    for name, requests in (("shared", shared), ("naive", naive)):
        prompts = [counter.prompt(r) for r in requests]
        figures[name] = {
            "prompt_tokens": sum(len(p) for p in prompts),
            "image_tokens": sum(1 for p in prompts for t in p if isinstance(t, tuple)),
            "ideal_raw": ideal_cached(prompts, 1, primer),
            "ideal_block": ideal_cached(prompts, block_size, primer) if block_size else None,
        }
    return figures


def engine_block_size(engine: Engine) -> int | None:
    """The KV block size of a started vLLM engine (its prefix cache's unit), else None."""
    llm = getattr(engine, "_llm", None)
    config = getattr(getattr(llm, "vllm_config", None), "cache_config", None)
    size = getattr(config, "block_size", None)
    return size if isinstance(size, int) and size > 0 else None


def _method_text(low: int, high: int, cap: int, counter: PrefixCounter | None) -> str:
    budget = f", max {counter.max_pixels // 784} x 28 x 28 px" if counter else ""
    return f"images {low}-{high} px{budget}, <= {cap} new tokens"


def _share(part: int | None, whole: int | None) -> float | None:
    return part / whole if part is not None and whole else None


def _info(what: str, value: float | None) -> dict[str, Any]:
    return {"what": what, "value": value, "target": "", "met": None}


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
    """Both layouts on the same requests; returns the measurements, ratios and target checks.

    ``image_long_side`` is raised to at least :data:`LAYOUT_MIN_LONG_SIDE` and ``max_tokens``
    capped at :data:`LAYOUT_MAX_TOKENS` (see the module docstring); the result's ``method``
    states what was used.
    """
    low, high = (max(side, LAYOUT_MIN_LONG_SIDE) for side in image_long_side)
    cap = LAYOUT_MAX_TOKENS if max_tokens is None else min(max_tokens, LAYOUT_MAX_TOKENS)
    shared, slugs = await job_requests(
        media, analyses, seed=seed, image_long_side=(low, high), image_dir=workdir / "images"
    )
    shared = [capped_request(r, cap) for r in shared]
    order = {slug: i for i, slug in enumerate(dict.fromkeys(slugs.values()))}
    naive = sorted(
        (naive_request(r, slugs[r.request_id]) for r in shared),
        key=lambda r: order[slugs[r.request_id]],  # stable: media order kept within a slug
    )
    await engine.start()
    await _drive(engine, warm_up_requests(shared, slugs))
    measured, failed = {}, set()
    for name, requests in (("shared", shared), ("naive", naive)):
        measured[name], lost = await _drive(engine, requests)
        failed |= lost
    block_size = engine_block_size(engine)
    # A failed request computed no KV (or none that counts): the maxima leave it out, in both
    # layouts, and the result says how many failed and why.
    shared = [r for r in shared if r.request_id not in failed]
    naive = [r for r in naive if r.request_id not in failed]
    maxima = (
        await asyncio.to_thread(token_maxima, shared, naive, counter, block_size)
        if counter is not None
        else None
    )
    cached = measured["shared"]["cached_tokens"]
    speedup = measured["naive"]["wall_s"] / max(measured["shared"]["wall_s"], 1e-9)
    block_share = _share(cached, maxima["shared"]["ideal_block"]) if maxima else None
    checks = [
        {
            "what": f"naive wall / shared wall ({_method_text(low, high, cap, counter)})",
            "value": speedup,
            "target": f">= {SPEEDUP_TARGET}",
            "met": speedup >= SPEEDUP_TARGET,
        },
        {
            "what": f"shared cached / ideal cache in {block_size or '?'}-token blocks",
            "value": block_share,
            "target": f">= {CACHED_SHARE_TARGET:.0%}",
            "met": None if block_share is None else block_share >= CACHED_SHARE_TARGET,
        },
    ]
    if maxima is not None:
        ours, theirs = maxima["shared"], maxima["naive"]
        naive_cached = measured["naive"]["cached_tokens"]
        checks += [
            _info(
                "shared cached / (n-1) x (system + image), issue 6",
                _share(cached, maxima["issue_max"]),
            ),
            _info("shared cached / ideal cache per token", _share(cached, ours["ideal_raw"])),
            _info(
                "shared visual / prompt tokens", _share(ours["image_tokens"], ours["prompt_tokens"])
            ),
            _info(
                "shared ideal cached / prompt tokens",
                _share(ours["ideal_block"], ours["prompt_tokens"]),
            ),
            _info(
                "naive ideal cached / prompt tokens",
                _share(theirs["ideal_block"], theirs["prompt_tokens"]),
            ),
            _info("naive cached / prompt tokens", _share(naive_cached, theirs["prompt_tokens"])),
        ]
    return {
        "name": "layout",
        "engine": engine.name,
        "media": media,
        "analyses": analyses,
        "method": {
            "image_long_side": [low, high],
            "max_tokens": cap,
            "min_pixels": counter.min_pixels if counter else None,
            "max_pixels": counter.max_pixels if counter else None,
            "block_size": block_size,
            "warm_up": "one request per analysis under another system prompt",
            "order": "shared first, then naive",
        },
        "layouts": measured,
        "cached_tokens_max": maxima["issue_max"] if maxima else None,
        "token_maxima": maxima,
        "checks": checks,
    }
