"""One benchmark run: a synthetic job through the real worker against the embedded simulator.

:func:`run_job` starts a :class:`~goflow_gpu.simulator.Simulator` in-process, queues one job,
runs the real worker (``service.run_worker``, burst mode) on it with the given engine wrapped in
a :class:`~goflow_gpu.bench.wrapper.BenchEngine`, records every pipeline event, and returns a
:class:`RunResult`: the figures of :mod:`goflow_gpu.bench.figures` plus what only the run knows
(downloads made, the cached-token maximum of the layout, peak RSS, retries by cause, what the
simulator's ledger says about exactly-once delivery).

The engine is started by the caller and stays loaded across runs (its load time is not part of
a job's wall time; :func:`start_engine` measures it separately).
"""

from __future__ import annotations

import asyncio
import resource
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from goflow_gpu.bench.figures import EventLog, compute_figures
from goflow_gpu.bench.prefix import PrefixCounter
from goflow_gpu.bench.wrapper import BenchEngine
from goflow_gpu.engines.base import Engine, InferenceRequest
from goflow_gpu.events import Event, Events, Observer
from goflow_gpu.retry import STATS
from goflow_gpu.settings import load_settings
from goflow_gpu.simulator import Faults, FaultSpec, Simulator, parse_faults
from goflow_gpu.store import Store


@dataclass
class BenchConfig:
    """What one run does. ``faults`` uses the simulator's ``--faults`` syntax."""

    media: int = 20
    analyses: int = 25
    seed: int = 7
    latency: float = 0.0  # seconds added by the simulator to every API call
    result_latency: float | None = None  # seconds on the result route only (overrides)
    faults: str = ""
    report_concurrency: int = 8
    qa_retries: int = 2
    max_tokens: int | None = None
    naive_layout: bool = False
    image_long_side: tuple[int, int] = (448, 1024)
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    model_dir: str | None = None  # for counting the shared prefix (cached-token maximum)
    observers: tuple[Observer, ...] = field(default=(), repr=False)  # e.g. progress bars


@dataclass
class RunResult:
    """The outcome of one run: ``figures`` (JSON-ready), the raw ``events`` and the requests the
    engine was ``sent``."""

    label: str
    engine: str
    config: dict[str, Any]
    figures: dict[str, Any]
    events: list[Event] = field(repr=False, default_factory=list)
    problems: list[str] = field(default_factory=list)
    sent: list[InferenceRequest] = field(repr=False, default_factory=list)


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its finished children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0  # Linux reports KiB


async def start_engine(engine: Engine) -> float:
    """Load ``engine``; returns the seconds it took."""
    began = time.monotonic()
    await engine.start()
    return time.monotonic() - began


def _faults(config: BenchConfig) -> Faults:
    faults = parse_faults(config.faults, seed=config.seed)
    if config.result_latency is not None:
        routes = dict(faults.routes)
        base = routes.get("result") or FaultSpec()
        routes["result"] = FaultSpec(
            **{**base.__dict__, "latency": config.result_latency},
        )
        faults = Faults(routes=routes, seed=faults.seed)
    return faults


def cached_token_maximum(
    events: list[Event], store: Store, project_id: str, counter: PrefixCounter
) -> int:
    """Sum over (media, variant) groups of (n analyses - 1) x the group's shared prefix.

    QA retries re-send a prompt whose prefix goes beyond the image (the original user prompt),
    so with retries the measured cached tokens can exceed this maximum.
    """
    combos = {(c.key.media_id, c.key.analysis_id): c for c in store.combos(project_id)}
    analyses: dict[tuple[str, str], set[str]] = {}
    prefix: dict[tuple[str, str], int] = {}
    for event in events:
        if event.kind != "inference_started" or event.media_id is None:
            continue
        combo = combos.get((event.media_id, event.analysis_id or ""))
        if combo is None:
            continue
        group = (event.media_id, combo.plan.variant)
        analyses.setdefault(group, set()).add(combo.key.analysis_id)
        if group not in prefix:
            image = store.media(project_id, event.media_id, combo.plan.variant)
            if image is None or image.path is None:
                continue
            prefix[group] = counter.tokens(combo.plan.system_prompt, image.path)
    return sum((len(ids) - 1) * prefix.get(group, 0) for group, ids in analyses.items())


async def run_job(
    engine: Engine, config: BenchConfig, workdir: Path, *, label: str = "run"
) -> RunResult:
    """Run one synthetic job with ``engine`` (already started or not) and return its figures."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    state_dir = workdir / "state"
    # A made-up key shared by the in-process simulator and worker only.
    key = "bench-" + secrets.token_hex(12)
    log = EventLog()
    STATS.reset()
    simulator = Simulator(
        key,
        seed=config.seed,
        faults=_faults(config),
        latency=config.latency,
        image_long_side=config.image_long_side,
    )
    async with simulator as sim:
        manifest = sim.add_job(media=config.media, analyses=config.analyses)
        project_id = str(manifest["project"]["id"])
        slugs = {str(a["id"]): str(a["slug"]) for a in manifest["analyses"]}
        settings = load_settings(
            None,
            base_url=sim.base_url,
            state_dir=state_dir,
            poll_interval_min=0.05,
            poll_interval_max=0.2,
            qa_retries=config.qa_retries,
            report_concurrency=config.report_concurrency,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
            keep_media=True,  # the cached-token maximum is counted from the images afterwards
        ).model_copy(update={"api_key": SecretStr(key)})
        wrapped = BenchEngine(
            engine, max_tokens=config.max_tokens, naive=config.naive_layout, slug_of=slugs
        )
        from goflow_gpu.service import run_worker

        outcome = await run_worker(
            settings,
            burst=True,
            engine=wrapped,
            handle_signals=False,
            events=Events([log, *config.observers]),
        )
        problems = sim.ledger.check_job(manifest)
    figures = compute_figures(log.events)
    expected_downloads = len(
        {(e.media_id, e.data.get("variant")) for e in log.events if e.kind == "media_ready"}
    )
    with Store.open(state_dir) as store:
        figures["downloads"] = store.downloads(project_id)
        figures["downloads_expected"] = expected_downloads
        figures["cached_tokens_max"] = None
        figures["cached_share_of_max"] = None
        # The maximum is that of the shared layout; the naive one shares no image prefix.
        if config.model_dir and engine.reports_cached_tokens and not config.naive_layout:
            counter = PrefixCounter(
                config.model_dir, min_pixels=config.min_pixels, max_pixels=config.max_pixels
            )
            maximum = cached_token_maximum(log.events, store, project_id, counter)
            figures["cached_tokens_max"] = maximum
            if maximum:
                figures["cached_share_of_max"] = figures["cached_tokens"] / maximum
    figures["peak_rss_mib"] = peak_rss_mib()
    figures["retries_by_cause"] = dict(STATS.by_cause)
    figures["exit_code"] = outcome.exit_code
    figures["ledger_problems"] = len(problems)
    return RunResult(
        label=label,
        engine=engine.name,
        config={k: v for k, v in config.__dict__.items() if k != "observers"},
        figures=figures,
        events=log.events,
        problems=problems,
        sent=wrapped.sent,
    )
