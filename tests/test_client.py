"""The GoFlow client over real loopback sockets.

Edge cases use tiny scripted aiohttp.web servers defined here; contract behaviour (retry counts,
faults, exactly-once) runs against the embedded simulator and is checked in its ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from goflow_gpu import retry
from goflow_gpu.client import GoFlowClient
from goflow_gpu.errors import (
    ApiError,
    AuthenticationError,
    ConfigError,
    DuplicateSubmission,
    InvalidRequestError,
    NoJobAvailable,
    NotFoundError,
    ProtocolError,
    TransientError,
    UnprocessableError,
)
from goflow_gpu.protocol import Report, ReportBody, ReportDetails, ResultBody
from goflow_gpu.retry import POLICIES, RetryPolicy, RetryStats
from goflow_gpu.simulator import Faults, FaultSpec, Simulator
from goflow_gpu.simulator.faults import API_ROUTES as ROUTES
from goflow_gpu.simulator.faults import FaultPlan

KEY = "made-up-test-key-0f9e8d7c"
P, M, A = (str(uuid.UUID(int=n)) for n in (1, 2, 3))
FAST = RetryPolicy(retries=2, base=0.01, cap=0.05, timeout=0.5)
FAST_POLICIES = {name: FAST for name in ("next-job", "status", "result", "report")}

RESULT = ResultBody(
    model_used="qwen2.5vl",
    user_prompt_used="List the objects.",
    system_prompt_used="You are an image analyst.",
    status="completed",
    analysis_result={"objects_detected": []},
)
REPORT = ReportBody(
    report=Report(
        summary="all done",
        details=ReportDetails(
            total_media_processed=1,
            total_analyses_completed=1,
            processing_time_minutes=0.1,
            success_rate=1.0,
            analysis_types_completed=["object-detection"],
            key_findings="none",
        ),
    )
)


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    retry.set_testing(True)
    yield
    retry.set_testing(False)


# --- a scripted loopback server -----------------------------------------------------------------

Step = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Step:
    """A step that answers ``status`` with ``body`` (JSON unless it is bytes)."""

    async def step(request: web.Request) -> web.StreamResponse:
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, headers=headers)
        text = "" if body is None else json.dumps(body)
        return web.Response(
            status=status, text=text, content_type="application/json", headers=headers
        )

    return step


def slow(seconds: float, then: Step) -> Step:
    async def step(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await then(request)

    return step


async def reset(request: web.Request) -> web.StreamResponse:
    """Cut the connection without answering."""
    assert request.transport is not None
    request.transport.abort()
    await asyncio.sleep(0.05)
    return web.Response(status=500)


@dataclass
class Seen:
    method: str
    path: str
    api_key: str | None
    body: bytes


@dataclass
class Script:
    """Answers each request with the next step (the last one repeats) and records requests."""

    steps: list[Step]
    seen: list[Seen] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(
                request.method, request.path, request.headers.get("X-API-Key"), await request.read()
            )
        )
        step = self.steps[min(len(self.seen), len(self.steps)) - 1]
        return await step(request)


@contextlib.asynccontextmanager
async def serve(script: Script) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def run_against(
    steps: list[Step],
    call: Callable[[GoFlowClient], Awaitable[Any]],
    *,
    policies: dict[str, RetryPolicy] | None = None,
    stats: RetryStats | None = None,
) -> tuple[Any, Script]:
    """Serve ``steps``, run ``call(client)``; return (its result or raised error, the script)."""
    script = Script(steps)

    async def main() -> Any:
        async with (
            serve(script) as base,
            GoFlowClient(
                base,
                SecretStr(KEY),
                policies=policies or FAST_POLICIES,
                stats=stats or RetryStats(),
            ) as client,
        ):
            try:
                return await call(client)
            except ApiError as exc:
                return exc

    return asyncio.run(main()), script


JOB = {"client": {"id": P}, "project": {"id": P}, "media": [], "analyses": []}


# --- next-job -------------------------------------------------------------------------------------


def test_next_job_returns_the_raw_object_and_sends_the_key() -> None:
    got, script = run_against([answer(200, JOB)], lambda c: c.next_job())
    assert got == JOB
    assert [(s.method, s.path, s.api_key) for s in script.seen] == [
        ("GET", "/api/v1/agent/next-job", KEY)
    ]


def test_next_job_404_is_no_job_and_not_retried() -> None:
    got, script = run_against([answer(404, {"detail": "no job"})], lambda c: c.next_job())
    assert isinstance(got, NoJobAvailable)
    assert got.status == 404
    assert len(script.seen) == 1


@pytest.mark.parametrize(
    ("body", "what"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "list"), (b"", "not valid JSON")],
)
def test_next_job_with_a_bad_body_is_a_protocol_error_not_retried(body: bytes, what: str) -> None:
    got, script = run_against([answer(200, body)], lambda c: c.next_job())
    assert isinstance(got, ProtocolError)
    assert what in str(got)
    assert "GET next-job" in str(got)
    assert len(script.seen) == 1


# --- status, result, report: success and each error code -----------------------------------------


def test_set_status_puts_the_body() -> None:
    got, script = run_against([answer(200, {"ok": True})], lambda c: c.set_status(P, "processing"))
    assert got is None
    assert [(s.method, s.path, json.loads(s.body)) for s in script.seen] == [
        ("PUT", f"/api/v1/agent/projects/{P}/status", {"status": "processing"})
    ]


@pytest.mark.parametrize("code", [200, 201])
def test_post_result_returns_the_status_and_sends_camel_case(code: int) -> None:
    got, script = run_against([answer(code, {"id": "x"})], lambda c: c.post_result(P, M, A, RESULT))
    assert got == code
    assert script.seen[0].path == f"/api/v1/agent/projects/{P}/media/{M}/analysis/{A}"
    assert json.loads(script.seen[0].body) == {
        "modelUsed": "qwen2.5vl",
        "userPromptUsed": "List the objects.",
        "systemPromptUsed": "You are an image analyst.",
        "status": "completed",
        "analysisResult": {"objects_detected": []},
    }


def test_a_2xx_with_an_unexpected_body_is_fine_where_no_body_is_needed() -> None:
    got, _ = run_against([answer(201, b"<html>created</html>")], lambda c: c.put_report(P, REPORT))
    assert got is None


def test_put_report_sends_the_report() -> None:
    got, script = run_against([answer(201, {})], lambda c: c.put_report(P, REPORT))
    assert got is None
    sent = json.loads(script.seen[0].body)
    assert (script.seen[0].method, script.seen[0].path) == (
        "PUT",
        f"/api/v1/agent/projects/{P}/reports",
    )
    assert sent["type"] == "quality_analysis"
    assert sent["report"]["details"]["success_rate"] == 1.0


def test_duplicate_400_on_first_attempt_is_not_an_unknown_outcome() -> None:
    got, script = run_against(
        [answer(400, {"detail": "Duplicate submission for this combination"})],
        lambda c: c.post_result(P, M, A, RESULT),
    )
    assert isinstance(got, DuplicateSubmission)
    assert got.prior_attempt_unknown is False
    assert len(script.seen) == 1


def test_other_400_is_an_invalid_request_with_the_detail() -> None:
    got, script = run_against(
        [answer(400, {"detail": "analysisResult missing"})],
        lambda c: c.post_result(P, M, A, RESULT),
    )
    assert type(got) is InvalidRequestError
    assert "analysisResult missing" in str(got)
    assert all(some_id in str(got) for some_id in (P, M, A))
    assert len(script.seen) == 1


def test_422_keeps_the_servers_detail_and_is_not_retried() -> None:
    detail = [{"loc": ["body", "status"], "msg": "bad value"}]
    got, script = run_against(
        [answer(422, {"detail": detail})], lambda c: c.post_result(P, M, A, RESULT)
    )
    assert isinstance(got, UnprocessableError)
    assert got.detail == detail
    assert got.status == 422
    assert "bad value" in str(got)
    assert len(script.seen) == 1


def test_long_details_are_truncated_in_the_message() -> None:
    got, _ = run_against(
        [answer(422, {"detail": "x" * 5000})], lambda c: c.set_status(P, "completed")
    )
    assert isinstance(got, UnprocessableError)
    assert 400 < len(str(got)) < 700


@pytest.mark.parametrize("route", ["status", "result", "report"])
def test_404_elsewhere_is_not_found(route: str) -> None:
    calls = {
        "status": lambda c: c.set_status(P, "completed"),
        "result": lambda c: c.post_result(P, M, A, RESULT),
        "report": lambda c: c.put_report(P, REPORT),
    }
    got, script = run_against([answer(404, {"detail": "unknown project"})], calls[route])
    assert isinstance(got, NotFoundError)
    assert "unknown project" in str(got)
    assert len(script.seen) == 1


@pytest.mark.parametrize("code", [401, 403])
def test_auth_failures_are_never_retried_and_logged_as_security_events(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        got, script = run_against(
            [answer(code, {"detail": "bad key"})], lambda c: c.set_status(P, "processing")
        )
    assert isinstance(got, AuthenticationError)
    assert len(script.seen) == 1
    events = [r for r in caplog.records if r.getMessage() == "authentication failed"]
    assert len(events) == 1
    assert events[0].levelno == logging.ERROR
    assert events[0].goflow_fields["security_event"] is True  # type: ignore[attr-defined]


def test_redirects_are_not_followed() -> None:
    got, script = run_against(
        [answer(307, None, {"Location": "http://127.0.0.2:1/steal"})], lambda c: c.next_job()
    )
    assert type(got) is ApiError
    assert got.status == 307
    assert len(script.seen) == 1


# --- retries ------------------------------------------------------------------------------------


def test_5xx_then_success_is_retried() -> None:
    stats = RetryStats()
    got, script = run_against(
        [answer(503, {"detail": "busy"}), answer(500), answer(201)],
        lambda c: c.post_result(P, M, A, RESULT),
        stats=stats,
    )
    assert got == 201
    assert len(script.seen) == 3
    assert stats.by_cause == {"5xx": 2}


def test_5xx_retries_run_out_and_raise_the_last_error() -> None:
    got, script = run_against([answer(502, {"detail": "bad gateway"})], lambda c: c.next_job())
    assert isinstance(got, TransientError)
    assert got.cause == "5xx"
    assert got.status == 502
    assert len(script.seen) == 3  # FAST allows 2 retries


def test_retry_after_seconds_is_honoured_and_clamped() -> None:
    stats = RetryStats()
    policy = RetryPolicy(retries=2, base=0.01, cap=0.05, retry_after_max=20.0, timeout=0.5)
    got, script = run_against(
        [
            answer(429, None, {"Retry-After": "7"}),
            answer(429, None, {"Retry-After": "999"}),
            answer(200),
        ],
        lambda c: c.set_status(P, "completed"),
        policies={"status": policy},
        stats=stats,
    )
    assert got is None
    assert len(script.seen) == 3
    assert [e.delay for e in stats.recent] == [7.0, 20.0]
    assert stats.by_cause == {"429": 2}


def test_retry_after_http_date_is_honoured() -> None:
    stats = RetryStats()

    async def dated(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=429, headers={"Retry-After": formatdate(time.time() + 30, usegmt=True)}
        )

    got, _ = run_against([dated, answer(200)], lambda c: c.set_status(P, "completed"), stats=stats)
    assert got is None
    assert len(stats.recent) == 1
    assert 27.0 <= stats.recent[0].delay <= 30.0


def test_garbage_retry_after_falls_back_to_backoff() -> None:
    stats = RetryStats()
    got, _ = run_against(
        [answer(503, None, {"Retry-After": "whenever"}), answer(200)],
        lambda c: c.set_status(P, "completed"),
        stats=stats,
    )
    assert got is None
    # FAST: base 0.01 with the default 5xx factor of 2 -> at most 0.02 s.
    assert 0.0 <= stats.recent[0].delay <= 0.02


def test_timeouts_are_retried_then_raised() -> None:
    policy = RetryPolicy(retries=2, base=0.01, cap=0.05, timeout=0.2)
    stats = RetryStats()
    started = time.monotonic()
    got, script = run_against(
        [slow(1.0, answer(200))],
        lambda c: c.set_status(P, "completed"),
        policies={"status": policy},
        stats=stats,
    )
    assert isinstance(got, TransientError)
    assert got.cause == "timeout"
    assert len(script.seen) == 3
    assert stats.by_cause == {"timeout": 2}
    assert time.monotonic() - started < 3.0


def test_connection_resets_are_retried_then_raised() -> None:
    stats = RetryStats()
    got, script = run_against([reset], lambda c: c.post_result(P, M, A, RESULT), stats=stats)
    assert isinstance(got, TransientError)
    assert got.cause == "network"
    assert len(script.seen) == 3
    assert stats.by_cause == {"network": 2}


def test_resets_on_idempotent_calls_count_one_attempt_per_policy_retry() -> None:
    # aiohttp itself re-sends an idempotent request (GET, PUT) once when the connection drops
    # (RFC 9112 section 9.3.1.1), so the server may see up to two requests per attempt.
    stats = RetryStats()
    got, script = run_against([reset], lambda c: c.put_report(P, REPORT), stats=stats)
    assert isinstance(got, TransientError)
    assert got.cause == "network"
    assert stats.by_cause == {"network": 2}
    assert 3 <= len(script.seen) <= 6


def test_reset_then_success() -> None:
    got, script = run_against([reset, answer(200, JOB)], lambda c: c.next_job())
    assert got == JOB
    assert len(script.seen) == 2


def test_duplicate_after_a_timed_out_attempt_marks_the_prior_attempt_unknown() -> None:
    policy = RetryPolicy(retries=3, base=0.01, cap=0.05, timeout=0.2)
    got, script = run_against(
        [slow(0.5, answer(201)), answer(400, {"detail": "DUPLICATE result"})],
        lambda c: c.post_result(P, M, A, RESULT),
        policies={"result": policy},
    )
    assert isinstance(got, DuplicateSubmission)
    assert got.prior_attempt_unknown is True
    assert len(script.seen) == 2


def test_duplicate_after_a_429_is_not_an_unknown_outcome() -> None:
    got, _ = run_against(
        [answer(429), answer(400, {"detail": "duplicate"})],
        lambda c: c.post_result(P, M, A, RESULT),
    )
    assert isinstance(got, DuplicateSubmission)
    assert got.prior_attempt_unknown is False


# --- checks before any call ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda c: c.set_status("not-a-uuid", "processing"), "project_id 'not-a-uuid'"),
        (lambda c: c.post_result(P, "../../admin", A, RESULT), "media_id '../../admin'"),
        (lambda c: c.post_result(P, M, "{" + A + "}", RESULT), "analysis_id"),
        (lambda c: c.put_report(P.replace("-", ""), REPORT), "project_id"),
        (lambda c: c.set_status(P, "done"), "'done'"),
    ],
)
def test_bad_input_is_refused_before_any_call(
    call: Callable[[GoFlowClient], Awaitable[Any]], named: str
) -> None:
    got, script = run_against([answer(200)], call)
    assert isinstance(got, InvalidRequestError)
    assert named in str(got)
    assert "no call made" in str(got)
    assert script.seen == []


def test_nan_in_a_result_is_refused_before_any_call() -> None:
    body = RESULT.model_copy(update={"analysis_result": {"score": float("nan")}})
    got, script = run_against([answer(201)], lambda c: c.post_result(P, M, A, body))
    assert isinstance(got, InvalidRequestError)
    assert script.seen == []


def test_plain_http_is_refused_off_loopback() -> None:
    with pytest.raises(ConfigError, match="plain http"):
        GoFlowClient("http://goflow.example.com", SecretStr(KEY))
    assert GoFlowClient("https://goflow.example.com/", SecretStr(KEY)).base_url == (
        "https://goflow.example.com"
    )


def test_repr_hides_the_key() -> None:
    client = GoFlowClient("https://goflow.example.com", SecretStr(KEY))
    assert KEY not in repr(client)
    assert "goflow.example.com" in repr(client)


# --- ping -----------------------------------------------------------------------------------------


def test_ping_any_http_answer_means_reachable_without_sending_the_key() -> None:
    got, script = run_against([answer(404)], lambda c: c.ping())
    assert isinstance(got, float)
    assert 0.0 < got < 5.0
    assert [(s.method, s.path, s.api_key) for s in script.seen] == [("GET", "/", None)]


def test_ping_unreachable_is_a_transient_error() -> None:
    async def main() -> None:
        # Bind then close a port so that nothing listens there.
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        async with GoFlowClient(f"http://127.0.0.1:{port}", SecretStr(KEY)) as client:
            with pytest.raises(TransientError, match="network error"):
                await client.ping()

    asyncio.run(main())


# --- against the simulator ------------------------------------------------------------------------


def contract_policies(timeout: float = 2.0) -> dict[str, RetryPolicy]:
    """The contract's retry counts with fast timings."""
    return {
        name: RetryPolicy(retries=p.retries, base=0.01, cap=0.05, timeout=timeout)
        for name, p in POLICIES.items()
    }


def sim_run(
    faults: Faults | None,
    scenario: Callable[[Simulator, GoFlowClient], Awaitable[Any]],
    *,
    policies: dict[str, RetryPolicy] | None = None,
    stats: RetryStats | None = None,
) -> Simulator:
    """Start a simulator with ``faults``, run ``scenario(sim, client)``, return the simulator."""
    sim = Simulator(api_key=KEY, seed=0, faults=faults)

    async def main() -> None:
        async with (
            sim,
            GoFlowClient(
                sim.base_url,
                SecretStr(KEY),
                policies=policies or contract_policies(),
                stats=stats or RetryStats(),
            ) as client,
        ):
            await scenario(sim, client)

    asyncio.run(main())
    return sim


def ids_of(manifest: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    return (
        manifest["project"]["id"],
        [m["id"] for m in manifest["media"]],
        [a["id"] for a in manifest["analyses"]],
    )


def test_a_whole_job_against_the_simulator() -> None:
    manifests: list[dict[str, Any]] = []
    codes: list[int] = []

    async def scenario(sim: Simulator, client: GoFlowClient) -> None:
        queued = sim.add_job(media=2, analyses=3)
        manifest = await client.next_job()
        manifests.extend([queued, manifest])
        project, media, analyses = ids_of(manifest)
        await client.set_status(project, "processing")
        for media_id in media:
            for analysis_id in analyses:
                codes.append(await client.post_result(project, media_id, analysis_id, RESULT))
        await client.set_status(project, "completed")
        await client.put_report(project, REPORT)
        with pytest.raises(NoJobAvailable):
            await client.next_job()

    sim = sim_run(None, scenario)
    queued, served = manifests
    assert served == queued
    project, media, analyses = ids_of(served)
    assert codes == [201] * 6
    assert sim.ledger.statuses[project] == ["processing", "completed"]
    assert sorted(sim.ledger.results) == sorted((project, m, a) for m in media for a in analyses)
    assert all(len(bodies) == 1 for bodies in sim.ledger.results.values())
    assert len(sim.ledger.reports[project]) == 1
    assert sim.check_job(served) == []


def test_each_endpoint_retries_as_often_as_the_contract_says() -> None:
    always_503 = Faults(routes={r: FaultSpec(rate_503=1.0) for r in ROUTES})
    stats = RetryStats()
    raised: list[ApiError] = []

    async def scenario(sim: Simulator, client: GoFlowClient) -> None:
        project, media, analyses = ids_of(sim.add_job(media=1, analyses=1))
        calls = [
            client.next_job(),
            client.set_status(project, "processing"),
            client.post_result(project, media[0], analyses[0], RESULT),
            client.put_report(project, REPORT),
        ]
        for call in calls:
            with pytest.raises(TransientError) as info:
                await call
            raised.append(info.value)

    sim = sim_run(always_503, scenario, stats=stats)
    per_route = Counter(call["route"] for call in sim.ledger.calls)
    assert per_route == {"next-job": 4, "status": 4, "result": 4, "report": 6}
    assert all(c["status"] == 503 and c["fault"] == "503" for c in sim.ledger.calls)
    assert [(e.status, getattr(e, "cause", None)) for e in raised] == [(503, "5xx")] * 4
    assert stats.by_endpoint == {"next-job": 3, "status": 3, "result": 3, "report": 5}
    assert sim.ledger.results == {}


def test_429_retry_after_from_the_simulator_is_honoured() -> None:
    stats = RetryStats()
    seconds = Faults(routes={"status": FaultSpec(rate_429=1.0, retry_after="1")})

    async def scenario(sim: Simulator, client: GoFlowClient) -> None:
        project, _, _ = ids_of(sim.add_job(media=1, analyses=1))
        with pytest.raises(TransientError, match="HTTP 429"):
            await client.set_status(project, "processing")

    sim = sim_run(seconds, scenario, stats=stats)
    assert [c["status"] for c in sim.ledger.calls] == [429] * 4
    # The jitter of the fast policy is at most 0.05 s, so the 1 s Retry-After wins every time.
    assert [e.delay for e in stats.recent] == [1.0, 1.0, 1.0]
    assert stats.by_cause == {"429": 3}


def test_accept_then_drop_gives_a_duplicate_with_unknown_prior_attempt_and_one_result() -> None:
    # Find a fault seed whose first two draws on the result route are "drop", then nothing.
    def plan(seed: int) -> Faults:
        return Faults(routes={"result": FaultSpec(rate_drop=0.5)}, seed=seed)

    def first_draws(seed: int) -> list[str | None]:
        draws = FaultPlan(plan(seed))
        return [draws.draw("result"), draws.draw("result")]

    seed = next(s for s in range(200) if first_draws(s) == ["drop", None])
    raised: list[DuplicateSubmission] = []
    keys: list[tuple[str, str, str]] = []

    async def scenario(sim: Simulator, client: GoFlowClient) -> None:
        project, media, analyses = ids_of(sim.add_job(media=1, analyses=1))
        keys.append((project, media[0], analyses[0]))
        with pytest.raises(DuplicateSubmission) as info:
            await client.post_result(project, media[0], analyses[0], RESULT)
        raised.append(info.value)

    sim = sim_run(plan(seed), scenario)
    assert raised[0].prior_attempt_unknown is True
    assert raised[0].status == 400
    assert len(sim.ledger.results[keys[0]]) == 1
    assert [(c["route"], c["status"], c["fault"]) for c in sim.ledger.calls] == [
        ("result", 201, "drop"),
        ("result", 400, None),
    ]


def test_401_from_the_simulator_is_not_retried() -> None:
    async def scenario(sim: Simulator, client: GoFlowClient) -> None:
        project, media, analyses = ids_of(sim.add_job(media=1, analyses=1))
        sim.revoke_key()
        with pytest.raises(AuthenticationError, match="HTTP 401"):
            await client.post_result(project, media[0], analyses[0], RESULT)

    sim = sim_run(None, scenario)
    assert [(c["route"], c["status"]) for c in sim.ledger.calls] == [("result", 401)]
    assert sim.ledger.results == {}


def test_simulator_404_and_422_are_mapped_with_the_servers_detail() -> None:
    bad_body = ResultBody.model_construct(
        model_used="m",
        user_prompt_used="u",
        system_prompt_used="s",
        status="bogus",  # type: ignore[arg-type]
        analysis_result={},
    )

    async def scenario(sim: Simulator, client: GoFlowClient) -> None:
        project, media, analyses = ids_of(sim.add_job(media=1, analyses=1))
        unknown = str(uuid.UUID(int=99))
        with pytest.raises(NotFoundError, match=f"project {unknown} not found"):
            await client.set_status(unknown, "processing")
        with pytest.raises(NotFoundError, match=f"media {unknown} not found"):
            await client.post_result(project, unknown, analyses[0], RESULT)
        with pytest.raises(UnprocessableError, match="status") as info:
            await client.post_result(project, media[0], analyses[0], bad_body)
        assert isinstance(info.value.detail, list)

    sim = sim_run(None, scenario)
    assert [c["status"] for c in sim.ledger.calls] == [404, 404, 422]
    assert sim.ledger.results == {}


def test_slow_answers_past_the_timeout_are_retried_then_raised() -> None:
    slow_status = Faults(routes={"status": FaultSpec(rate_slow=1.0, slow_seconds=1.0)})
    stats = RetryStats()
    policies = {
        **contract_policies(),
        "status": RetryPolicy(retries=1, base=0.01, cap=0.05, timeout=0.2),
    }

    async def scenario(sim: Simulator, client: GoFlowClient) -> None:
        project, _, _ = ids_of(sim.add_job(media=1, analyses=1))
        with pytest.raises(TransientError, match="timed out") as info:
            await client.set_status(project, "processing")
        assert info.value.cause == "timeout"

    sim_run(slow_status, scenario, policies=policies, stats=stats)
    assert stats.by_cause == {"timeout": 1}
    assert stats.exhausted == {"status": 1}


def test_no_trace_of_the_key_in_logs_errors_or_reprs_of_a_faulty_run() -> None:
    faulty = Faults(
        routes={
            route: FaultSpec(
                rate_429=0.15,
                rate_500=0.1,
                rate_503=0.1,
                rate_reset=0.1,
                rate_drop=0.1,
                retry_after="date",
            )
            if route != "next-job"
            else FaultSpec(rate_429=0.2, rate_500=0.2, rate_reset=0.2)
            for route in ROUTES
        },
        seed=7,
    )
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    texts: list[str] = []

    async def scenario(sim: Simulator, client: GoFlowClient) -> None:
        texts.append(repr(client))
        for _ in range(2):
            sim.add_job(media=2, analyses=3)
        unknown = str(uuid.UUID(int=12345))
        for _ in range(3):
            try:
                manifest = await client.next_job()
            except ApiError as exc:
                texts.extend([str(exc), repr(exc), repr(exc.detail), repr(exc.__dict__)])
                continue
            project, media, analyses = ids_of(manifest)
            calls: list[Awaitable[Any]] = [client.set_status(project, "processing")]
            calls += [client.post_result(project, m, a, RESULT) for m in media for a in analyses]
            calls += [client.post_result(project, media[0], analyses[0], RESULT)]
            calls += [client.set_status(unknown, "completed"), client.put_report(project, REPORT)]
            for call in calls:
                try:
                    await call
                except ApiError as exc:
                    texts.extend([str(exc), repr(exc), repr(exc.detail), repr(exc.__dict__)])
        sim.revoke_key()
        with pytest.raises(AuthenticationError) as info:
            await client.put_report(project, REPORT)
        texts.extend([str(info.value), repr(info.value), repr(info.value.__dict__)])

    root = logging.getLogger()
    handler = Keep(level=logging.DEBUG)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        sim = sim_run(faulty, scenario)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)

    # The run was really faulty and really logged: otherwise this test would prove nothing.
    faults_seen = Counter(c["fault"] for c in sim.ledger.calls if c["fault"])
    assert {"429", "500", "503", "reset", "drop"} <= set(faults_seen)
    assert any(r.getMessage() == "retrying" for r in records)
    assert any(r.getMessage() == "authentication failed" for r in records)
    assert any(r.levelno == logging.DEBUG for r in records)  # aiohttp / asyncio chatter included
    raw = [
        f"{r.getMessage()} {r.__dict__!r} "
        + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
        for r in records
    ]
    everything = "\n".join(raw + texts)
    assert "made-up-test-key" not in everything
    assert KEY not in everything


def test_api_calls_and_retries_are_logged_with_ids_status_and_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        got, _ = run_against(
            [answer(503, {"detail": "busy now"}), answer(201)],
            lambda c: c.post_result(P, M, A, RESULT),
        )
    assert got == 201
    lines = [
        (r.levelno, r.getMessage(), r.goflow_fields)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name.startswith("goflow_gpu")
    ]
    failed, retried, ok = lines
    assert failed[:2] == (logging.WARNING, "api call failed")
    assert {k: failed[2][k] for k in ("endpoint", "method", "status", "attempt", "detail")} == {
        "endpoint": "result",
        "method": "POST",
        "status": 503,
        "attempt": 1,
        "detail": "busy now",
    }
    assert (failed[2]["project_id"], failed[2]["media_id"], failed[2]["analysis_id"]) == (P, M, A)
    assert retried[:2] == (logging.INFO, "retrying")
    assert retried[2]["reason"] == "5xx"
    assert ok[:2] == (logging.DEBUG, "api call")  # one per call: DEBUG, not the job's story
    assert (ok[2]["status"], ok[2]["attempt"]) == (201, 2)
    assert ok[2]["duration_ms"] >= 0


@pytest.mark.parametrize(
    ("detail", "duplicate"),
    [
        ("duplicate submission: already have it", True),
        ("Result already exists for this media and analysis", True),
        ("analysis already submitted", True),
        ("analysisResult: field required", False),
    ],
)
def test_duplicate_wordings_are_recognised(detail: str, duplicate: bool) -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"detail": detail}, status=400)

    async def go() -> type[BaseException]:
        app = web.Application()
        app.router.add_post("/api/v1/agent/projects/{p}/media/{m}/analysis/{a}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with GoFlowClient(f"http://127.0.0.1:{port}", SecretStr("made-up-dup-key")) as c:
                try:
                    await c.post_result(
                        "3fa85f64-5717-4562-b3fc-2c963f66afa7",
                        "3fa85f64-5717-4562-b3fc-2c963f66afa8",
                        "3fa85f64-5717-4562-b3fc-2c963f66afaa",
                        ResultBody(
                            model_used="m",
                            user_prompt_used="u",
                            system_prompt_used="s",
                            status="completed",
                            analysis_result={},
                        ),
                    )
                except InvalidRequestError as exc:
                    return type(exc)
        finally:
            await runner.cleanup()
        raise AssertionError("no error raised")

    kind = asyncio.run(go())
    assert (kind is DuplicateSubmission) == duplicate
