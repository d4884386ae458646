"""Assembly: settings in, a running worker out. The one entry point that ``serve``, ``run`` and
``demo`` call, so the CLI stays thin and tests can start the real thing with a test engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator, Mapping

from goflow_gpu.client import GoFlowClient
from goflow_gpu.engines import create_engine
from goflow_gpu.engines.base import Engine
from goflow_gpu.errors import ConfigError
from goflow_gpu.events import Events
from goflow_gpu.health import Readiness, api_call_hook, start_ops_server
from goflow_gpu.job import JobOptions
from goflow_gpu.logs import get_logger, register_secret
from goflow_gpu.media import MediaFetcher, MediaLimits
from goflow_gpu.metrics import Metrics
from goflow_gpu.prompts import CatalogError, load_catalog
from goflow_gpu.retry import RetryPolicy
from goflow_gpu.settings import Settings
from goflow_gpu.store import Store
from goflow_gpu.worker import Worker, WorkerResult

log = get_logger(__name__)


def job_options(settings: Settings, engine: Engine, *, burst: bool = True) -> JobOptions:
    """The per-job knobs, from the settings and what the engine can take.

    ``serve`` (``burst`` False) waits for an unavailable service forever; ``run`` waits up to
    ``outage_patience`` and then exits "try again later"."""
    return JobOptions(
        qa_retries=settings.qa_retries,
        inference_slots=min(settings.max_in_flight, engine.max_in_flight),
        report_concurrency=settings.report_concurrency,
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
        keep_media=settings.keep_media,
        outage_patience=settings.outage_patience if burst else None,
        outage_backoff_min=settings.outage_backoff_min,
        outage_backoff_max=settings.outage_backoff_max,
        drain_timeout=settings.drain_timeout,
        engine_retries=settings.engine_retries,
    )


@contextlib.contextmanager
def _stop_on_signals(worker: Worker) -> Iterator[None]:
    """SIGTERM/SIGINT ask the worker to drain; a second SIGINT is left to Python (abort)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, worker.stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def run_worker(
    settings: Settings,
    *,
    burst: bool,
    engine: Engine | None = None,
    handle_signals: bool = True,
    stop: asyncio.Event | None = None,
    events: Events | None = None,
    policies: Mapping[str, RetryPolicy] | None = None,
) -> WorkerResult:
    """Open the state, load the engine, and process jobs (``burst``: until none is left).

    ``stop``, when given, is the drain switch (what SIGTERM sets): setting it stops polling and
    new inference requests, lets in-flight work be reported, and returns. ``policies``
    overrides the retry policy (attempts, timeouts) of some endpoints; the contract's defaults
    (``retry.POLICIES``) are meant for production, chaos tests shorten the timeouts.
    """
    api_key = settings.require_api_key()
    register_secret(api_key.get_secret_value())
    # Built, not loaded (engines import their libraries in start()), and first: a model that
    # cannot be loaded stops the start in milliseconds with the doctor's message, before the
    # catalog is read and before any state is opened or created.
    engine = engine if engine is not None else create_engine(settings)
    try:
        # Before anything is taken from the backend: a job must never meet a broken catalog.
        catalog = load_catalog(settings.prompts_dir)
    except CatalogError as exc:
        raise ConfigError(f"the prompt catalog cannot be used: {exc}") from None
    stop = stop if stop is not None else asyncio.Event()
    events = events or Events()
    metrics = Metrics()
    readiness = Readiness()
    events.subscribe(metrics.observe)
    ops = None
    if settings.metrics_port is not None:
        ops = await start_ops_server(
            settings.metrics_host, settings.metrics_port, metrics, readiness
        )
        log.info("metrics and health endpoints up", url=ops.url)
    store = Store.open(settings.state_dir)
    readiness.state_open = True
    try:
        async with GoFlowClient(
            settings.base_url,
            api_key,
            policies=policies or {},
            on_call=api_call_hook(metrics, readiness),
            stopping=stop,
        ) as client:
            fetcher = MediaFetcher(
                store,
                MediaLimits(
                    max_bytes=settings.max_image_bytes,
                    max_pixels=settings.max_image_pixels,
                    timeout=settings.media_timeout,
                ),
                concurrency=settings.download_concurrency,
                stopping=stop,
            )
            log.info("loading engine", engine=engine.name, model=settings.model)
            try:
                # Inside the try: an engine that fails to start may hold a session or a
                # process already, and must be closed too (else asyncio reports an unclosed
                # session after the fatal error line).
                await engine.start()
                readiness.engine_loaded = True
                worker = Worker(
                    store=store,
                    client=client,
                    engine=engine,
                    fetcher=fetcher,
                    options=job_options(settings, engine, burst=burst),
                    prompts_dir=settings.prompts_dir,
                    poll_min=settings.poll_interval_min,
                    poll_max=settings.poll_interval_max,
                    stopping=stop,
                    events=events,
                    catalog=catalog,
                    on_outage=readiness.outage,
                )
                if handle_signals:
                    with _stop_on_signals(worker):
                        return await worker.run(burst=burst)
                return await worker.run(burst=burst)
            finally:
                readiness.engine_loaded = False
                await fetcher.close()
                await engine.close()
    finally:
        readiness.state_open = False
        store.close()
        if ops is not None:
            await ops.stop()
