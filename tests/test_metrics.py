"""Metrics fed by a hand-written job's events, and the ops server over real loopback HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from goflow_gpu.errors import ConfigError
from goflow_gpu.events import Event, Events
from goflow_gpu.health import OpsServer, Readiness, api_call_hook, start_ops_server
from goflow_gpu.metrics import Metrics
from goflow_gpu.retry import RetryEvent, RetryStats

P = "3fa85f64-5717-4562-b3fc-2c963f66afa7"
M1 = "3fa85f64-5717-4562-b3fc-2c963f66afa8"
M2 = "3fa85f64-5717-4562-b3fc-2c963f66afa9"
A1 = "3fa85f64-5717-4562-b3fc-2c963f66afaa"
A2 = "3fa85f64-5717-4562-b3fc-2c963f66afab"
WALL = 1_700_000_000.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def ev(
    kind: str,
    media: str | None = None,
    analysis: str | None = None,
    t: float = 0.0,
    /,
    **data: Any,
) -> Event:
    return Event(kind, P, media, analysis, t, data)


def small_job() -> list[Event]:
    """2 media x 2 analyses. M1A1 passes; M1A2 fails QA once then passes, its POST is retried
    then answered duplicate; M2A1 fails QA for good and the backend refuses it (422); M2's
    greyscale image cannot be fetched, so M2A2 is reported failed."""
    return [
        ev("job_started", combinations=4, media=2, analyses=2),
        ev("media_ready", M1, variant="optimised", downloaded=True, error=None),
        ev("media_ready", M2, variant="optimised", downloaded=False, error=None),
        ev("media_ready", M2, variant="greyscale", error="HTTP 404 for greyscale_path"),
        ev("status_sent", status="processing"),
        # M1 x A1: 0.3 s
        ev("inference_started", M1, A1, 10.0, attempt=1),
        ev("inference_started", M1, A2, 10.0, attempt=1),
        ev(
            "inference_finished",
            M1,
            A1,
            10.3,
            attempt=1,
            prompt_tokens=100,
            cached_tokens=0,
            generated_tokens=20,
            error=None,
        ),
        ev("qa_verdict", M1, A1, passed=True, attempt=1, final=True),
        # M1 x A2: 0.7 s, QA fails, then 1.5 s and passes
        ev(
            "inference_finished",
            M1,
            A2,
            10.7,
            attempt=1,
            prompt_tokens=100,
            cached_tokens=80,
            generated_tokens=30,
            error=None,
        ),
        ev("qa_verdict", M1, A2, passed=False, attempt=1, final=False),
        ev("post_started", M1, A1),
        ev("post_finished", M1, A1, http_status=201, outcome="accepted"),
        ev("inference_started", M1, A2, 11.0, attempt=2),
        ev(
            "inference_finished",
            M1,
            A2,
            12.5,
            attempt=2,
            prompt_tokens=100,
            cached_tokens=90,
            generated_tokens=25,
            error=None,
        ),
        ev("qa_verdict", M1, A2, passed=True, attempt=2, final=True),
        # M2 x A1: 12 s, QA fails with no retry left
        ev("inference_started", M2, A1, 20.0, attempt=1),
        ev(
            "inference_finished",
            M2,
            A1,
            32.0,
            attempt=1,
            prompt_tokens=50,
            cached_tokens=40,
            generated_tokens=10,
            error=None,
        ),
        ev("qa_verdict", M2, A1, passed=False, attempt=1, final=True),
        ev("post_finished", M1, A2, http_status=503, outcome="retry"),
        ev("post_finished", M1, A2, http_status=400, outcome="duplicate"),
        ev("post_finished", M2, A1, http_status=422, outcome="rejected"),
        ev("post_finished", M2, A2, http_status=201, outcome="accepted"),
        ev("status_sent", status="completed"),
        ev("report_sent"),
        ev("job_finished", closed=True, completed=2, failed=2),
    ]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def fed_metrics() -> tuple[Metrics, RetryStats]:
    stats = RetryStats()
    stats.record(RetryEvent("result", 1, "5xx", 503, 0.2))
    stats.record(RetryEvent("status", 1, "429", 429, 1.0))
    stats.exhausted["result"] += 1
    metrics = Metrics(retry_stats=stats, wall_clock=lambda: WALL)
    for event in small_job():
        metrics.observe(event)
    metrics.set_queue_depth("inference", 3)
    metrics.set_queue_depth("report", 0)
    metrics.api_call("result", 201, 0.05)
    metrics.api_call("result", None, 30.0, cause="timeout")
    metrics.api_call("next-job", 404, 0.02)
    return metrics, stats


def test_counts_of_a_small_job() -> None:
    metrics, _ = fed_metrics()
    s = parse(metrics.render().decode())

    assert value(s, "goflow_jobs_started_total") == 1
    assert value(s, "goflow_jobs_total", outcome="closed") == 1
    assert value(s, "goflow_jobs_total", outcome="paused") == 0
    assert value(s, "goflow_combinations_total", outcome="completed") == 2
    assert value(s, "goflow_combinations_total", outcome="failed") == 1
    assert value(s, "goflow_combinations_total", outcome="rejected") == 1
    assert value(s, "goflow_qa_verdicts_total", verdict="pass") == 2
    assert value(s, "goflow_qa_verdicts_total", verdict="fail") == 2
    assert value(s, "goflow_result_posts_total", outcome="accepted") == 2
    assert value(s, "goflow_result_posts_total", outcome="retry") == 1
    assert value(s, "goflow_result_posts_total", outcome="duplicate") == 1
    assert value(s, "goflow_result_posts_total", outcome="rejected") == 1
    assert value(s, "goflow_status_updates_total", status="processing") == 1
    assert value(s, "goflow_status_updates_total", status="completed") == 1
    assert value(s, "goflow_reports_sent_total") == 1
    assert value(s, "goflow_media_total", source="downloaded") == 1
    assert value(s, "goflow_media_total", source="cache") == 1
    assert value(s, "goflow_media_total", source="error") == 1
    assert value(s, "goflow_tokens_total", kind="prompt") == 350
    assert value(s, "goflow_tokens_total", kind="cached") == 210
    assert value(s, "goflow_tokens_total", kind="generated") == 85
    assert value(s, "goflow_inference_errors_total") == 0
    assert value(s, "goflow_queue_depth", queue="inference") == 3
    assert value(s, "goflow_queue_depth", queue="report") == 0
    assert value(s, "goflow_last_job_completed_timestamp_seconds") == WALL
    assert value(s, "goflow_api_calls_total", endpoint="result", code="201") == 1
    assert value(s, "goflow_api_calls_total", endpoint="result", code="timeout") == 1
    assert value(s, "goflow_api_calls_total", endpoint="next-job", code="404") == 1
    assert value(s, "goflow_api_call_duration_seconds_count", endpoint="result") == 2


def test_inference_histogram_has_one_sample_per_attempt() -> None:
    metrics, _ = fed_metrics()
    s = parse(metrics.render().decode())
    name = "goflow_inference_duration_seconds"
    # Latencies fed: 0.3, 0.7, 1.5, 12.0 seconds.
    assert value(s, name + "_count") == 4
    assert value(s, name + "_sum") == pytest.approx(14.5)
    assert value(s, name + "_bucket", le="0.25") == 0
    assert value(s, name + "_bucket", le="0.5") == 1
    assert value(s, name + "_bucket", le="1.0") == 2
    assert value(s, name + "_bucket", le="2.5") == 3
    assert value(s, name + "_bucket", le="10.0") == 3
    assert value(s, name + "_bucket", le="20.0") == 4
    assert value(s, name + "_bucket", le="+Inf") == 4


def test_retries_are_read_from_retry_stats_at_scrape_time() -> None:
    metrics, stats = fed_metrics()
    s = parse(metrics.render().decode())
    assert value(s, "goflow_retries_total", cause="5xx") == 1
    assert value(s, "goflow_retries_total", cause="429") == 1
    assert value(s, "goflow_retries_by_endpoint_total", endpoint="status") == 1
    assert value(s, "goflow_retries_exhausted_total", endpoint="result") == 1

    stats.record(RetryEvent("result", 2, "5xx", 500, 0.4))
    stats.record(RetryEvent("report", 1, "network", None, 0.1))
    s = parse(metrics.render().decode())
    assert value(s, "goflow_retries_total", cause="5xx") == 2
    assert value(s, "goflow_retries_total", cause="network") == 1
    assert value(s, "goflow_retries_by_endpoint_total", endpoint="result") == 2


def test_events_seam_feeds_metrics_and_registries_are_separate() -> None:
    first = Metrics(retry_stats=RetryStats())
    second = Metrics(retry_stats=RetryStats())
    events = Events([first.observe])
    events.emit("job_started", P, combinations=1, media=1, analyses=1)
    events.emit("inference_started", P, M1, A1, attempt=1)
    events.emit("inference_finished", P, M1, A1, attempt=1, prompt_tokens=7, error="oom")
    events.emit("job_finished", P, closed=False, completed=0, failed=0)

    s1 = parse(first.render().decode())
    s2 = parse(second.render().decode())
    assert events.observers == [first.observe]  # the observer never raised
    assert value(s1, "goflow_jobs_total", outcome="paused") == 1
    assert value(s1, "goflow_inference_duration_seconds_count") == 1
    assert value(s1, "goflow_inference_errors_total") == 1
    assert value(s1, "goflow_tokens_total", kind="prompt") == 7
    assert value(s1, "goflow_last_job_completed_timestamp_seconds") == 0
    assert value(s2, "goflow_jobs_total", outcome="paused") == 0
    assert value(s2, "goflow_inference_duration_seconds_count") == 0


def test_paused_job_drops_unfinished_inferences_and_resumed_outcomes_are_labelled() -> None:
    metrics = Metrics(retry_stats=RetryStats())
    metrics.observe(ev("inference_started", M1, A1, 1.0, attempt=1))
    metrics.observe(ev("job_finished", closed=False, completed=0, failed=0))
    # The same process resumes the job; a stale finish must not be timed from the old start.
    metrics.observe(ev("inference_finished", M1, A1, 500.0, attempt=1, error=None))
    # A combination whose verdict was reached before a restart: outcome from the runner, or
    # unknown when the runner does not say.
    metrics.observe(ev("post_finished", M2, A1, outcome="accepted", result_status="failed"))
    metrics.observe(ev("post_finished", M2, A2, outcome="accepted"))
    s = parse(metrics.render().decode())
    assert value(s, "goflow_inference_duration_seconds_count") == 0
    assert value(s, "goflow_combinations_total", outcome="failed") == 1
    assert value(s, "goflow_combinations_total", outcome="unknown") == 1
    assert value(s, "goflow_combinations_total", outcome="completed") == 0


# -- the ops server ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def with_server(
    metrics: Metrics,
    readiness: Readiness,
    body: Callable[[OpsServer, aiohttp.ClientSession], Awaitable[None]],
) -> None:
    async def main() -> None:
        server = await start_ops_server("127.0.0.1", 0, metrics, readiness)
        try:
            async with aiohttp.ClientSession() as session:
                await body(server, session)
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 10))


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with session.get(url) as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def readyz(session: aiohttp.ClientSession, server: OpsServer) -> tuple[int, dict[str, Any]]:
    async with session.get(server.url + "/readyz") as response:
        return response.status, await response.json()


def test_metrics_endpoint_serves_the_job_over_http() -> None:
    metrics, _ = fed_metrics()

    async def body(server: OpsServer, session: aiohttp.ClientSession) -> None:
        assert server.port > 0
        status, ctype, text = await get(session, server.url + "/metrics")
        assert status == 200
        assert ctype.startswith("text/plain")
        s = parse(text)
        assert value(s, "goflow_combinations_total", outcome="completed") == 2
        assert value(s, "goflow_inference_duration_seconds_count") == 4
        assert value(s, "goflow_retries_total", cause="5xx") == 1
        status, _, text = await get(session, server.url + "/healthz")
        assert (status, text) == (200, '{"status": "alive"}')

    with_server(metrics, Readiness(), body)


def test_readyz_follows_readiness_and_backend_freshness() -> None:
    clock = FakeClock()
    readiness = Readiness(freshness=300.0, clock=clock)

    async def body(server: OpsServer, session: aiohttp.ClientSession) -> None:
        status, data = await readyz(session, server)
        assert status == 503
        assert data["failing"] == ["engine_loaded", "state_open", "backend_reachable"]
        assert data["checks"]["backend_reachable"]["detail"] == "no successful backend call yet"

        readiness.engine_loaded = True
        readiness.state_open = True
        readiness.backend_failed("POST result: network error")
        status, data = await readyz(session, server)
        assert status == 503
        assert data["failing"] == ["backend_reachable"]
        assert "POST result: network error" in data["checks"]["backend_reachable"]["detail"]

        readiness.backend_ok()
        status, data = await readyz(session, server)
        assert (status, data["ready"], data["failing"]) == (200, True, [])

        clock.now += 299.0
        assert (await readyz(session, server))[0] == 200
        clock.now += 2.0
        status, data = await readyz(session, server)
        assert status == 503
        assert data["failing"] == ["backend_reachable"]
        assert "301 s ago (limit 300 s)" in data["checks"]["backend_reachable"]["detail"]
        # Liveness does not depend on readiness.
        assert (await get(session, server.url + "/healthz"))[0] == 200

        readiness.backend_ok()
        assert (await readyz(session, server))[0] == 200

    with_server(Metrics(retry_stats=RetryStats()), readiness, body)


def test_port_in_use_is_a_config_error_and_stop_closes_the_port() -> None:
    async def main() -> None:
        metrics, readiness = Metrics(retry_stats=RetryStats()), Readiness()
        first = await start_ops_server("127.0.0.1", 0, metrics, readiness)
        try:
            with pytest.raises(ConfigError, match=f"127.0.0.1:{first.port}"):
                await start_ops_server("127.0.0.1", first.port, metrics, readiness)
        finally:
            await first.stop()
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(first.url + "/healthz")

    asyncio.run(asyncio.wait_for(main(), 10))


def test_api_call_hook_counts_calls_and_keeps_readiness() -> None:
    clock = FakeClock()
    metrics = Metrics(retry_stats=RetryStats())
    readiness = Readiness(engine_loaded=True, state_open=True, clock=clock)
    hook = api_call_hook(metrics, readiness)

    hook("next-job", None, 10.0, "timeout")
    assert not readiness.ready()
    assert "next-job: timeout" in readiness.checks()["backend_reachable"]["detail"]
    hook("next-job", 404, 0.02, None)  # idle: the backend answered
    assert readiness.ready()
    clock.now += 400.0
    hook("result", 503, 0.1, None)
    assert not readiness.ready()
    assert "result: HTTP 503" in readiness.checks()["backend_reachable"]["detail"]

    s = parse(metrics.render().decode())
    assert value(s, "goflow_api_calls_total", endpoint="next-job", code="timeout") == 1
    assert value(s, "goflow_api_calls_total", endpoint="next-job", code="404") == 1
    assert value(s, "goflow_api_calls_total", endpoint="result", code="503") == 1
    assert value(s, "goflow_api_call_duration_seconds_sum", endpoint="next-job") == pytest.approx(
        10.02
    )
