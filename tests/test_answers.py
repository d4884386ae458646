"""Every answer of every endpoint has one defined outcome (issue 11, point 2 and 7).

The expected decisions are spelled out here from the rules in docs/RELIABILITY.md, not computed
by the code under test; the walk over 400-599 goes through the real client over loopback HTTP,
so the status -> exception -> decision chain is what the worker really does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from goflow_gpu.answers import ENDPOINTS, Decision, decide, speaks_of_duplicate, table_rows
from goflow_gpu.client import GoFlowClient
from goflow_gpu.errors import ApiError, AuthenticationError, NoJobAvailable, TransientError
from goflow_gpu.protocol import ReportBody, ResultBody
from goflow_gpu.retry import RetryPolicy

PID = "3fa85f64-5717-4562-b3fc-2c963f66afa7"
MID = "3fa85f64-5717-4562-b3fc-2c963f66afa8"
AID = "3fa85f64-5717-4562-b3fc-2c963f66afaa"
NO_RETRY = {
    e: RetryPolicy(retries=0, timeout=5) for e in ("next-job", "status", "result", "report")
}


def expected(endpoint: str, status: int, *, duplicate_words: bool, prior_unknown: bool) -> str:
    """The rule table of docs/RELIABILITY.md, written out by hand."""
    if status in (401, 403):
        return "auth"
    if status in (408, 425, 429) or status >= 500:
        return "transient"
    if endpoint == "next-job":
        return "no-job" if status == 404 else "poll-later"
    duplicate = status == 409 or (status == 400 and duplicate_words)
    if endpoint == "result":
        return "landed" if duplicate and prior_unknown and status != 404 else "refused"
    return "landed" if duplicate and status != 404 else "park"


ALL = [(e, s) for e in ("next-job", "status", "result", "report") for s in range(400, 600)]


@pytest.mark.parametrize("prior_unknown", [False, True])
@pytest.mark.parametrize("detail", ["invalid result format", "duplicate submission"])
def test_decide_matches_the_written_rules_for_every_code(prior_unknown: bool, detail: str) -> None:
    mismatches = []
    for endpoint, status in ALL:
        got = decide(endpoint, status, detail, prior_unknown=prior_unknown)  # type: ignore[arg-type]
        want = expected(
            endpoint,
            status,
            duplicate_words=detail.startswith("duplicate"),
            prior_unknown=prior_unknown,
        )
        if got.value != want:
            mismatches.append((endpoint, status, got.value, want))
    assert mismatches == []


def test_a_network_error_or_timeout_is_transient_everywhere() -> None:
    for endpoint in ENDPOINTS:
        assert decide(endpoint, None, prior_unknown=False) is Decision.TRANSIENT


def test_the_docs_show_the_table_of_the_code() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md").read_text()
    for row in table_rows():
        line = "| " + " | ".join(f"`{cell}`" for cell in row) + " |"
        assert line in doc, f"docs/RELIABILITY.md lacks the answer-table row {line}"


# -- through the real client ------------------------------------------------------------------


async def _client_decisions(detail: str) -> list[tuple[str, int, str]]:
    answer = {"status": 200}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"detail": detail}, status=answer["status"])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    out: list[tuple[str, int, str]] = []
    body = ResultBody(
        model_used="m",
        user_prompt_used="u",
        system_prompt_used="s",
        status="completed",
        analysis_result={"x": 1},
    )
    report = ReportBody.model_validate(
        {
            "type": "quality_analysis",
            "report": {
                "summary": "s",
                "details": {
                    "total_media_processed": 1,
                    "total_analyses_completed": 1,
                    "processing_time_minutes": 0.1,
                    "success_rate": 1.0,
                    "analysis_types_completed": ["a"],
                    "key_findings": "k",
                },
            },
        }
    )
    calls: dict[str, Any] = {
        "next-job": lambda c: c.next_job(),
        "status": lambda c: c.set_status(PID, "processing"),
        "result": lambda c: c.post_result(PID, MID, AID, body),
        "report": lambda c: c.put_report(PID, report),
    }
    try:
        async with GoFlowClient(
            f"http://127.0.0.1:{port}", SecretStr("made-up-answers-key"), policies=NO_RETRY
        ) as client:
            for endpoint, status in ALL:
                answer["status"] = status
                try:
                    await calls[endpoint](client)
                except TransientError:
                    got = "transient"
                except AuthenticationError:
                    got = "auth"
                except NoJobAvailable:
                    got = "no-job"
                except ApiError as exc:
                    seen = exc.status
                    got = decide(endpoint, seen, exc.detail_text, prior_unknown=True).value  # type: ignore[arg-type]
                    got = got if seen == status else f"wrong status {seen}"
                else:
                    got = "ok"
                out.append((endpoint, status, got))
    finally:
        await runner.cleanup()
    return out


def test_every_code_through_the_real_client_gets_its_decision() -> None:
    got = asyncio.run(_client_decisions("analysis result already submitted"))
    mismatches = [
        (endpoint, status, decision)
        for endpoint, status, decision in got
        if decision != expected(endpoint, status, duplicate_words=True, prior_unknown=True)
    ]
    assert mismatches == []
    assert len(got) == 800


# -- duplicates by meaning --------------------------------------------------------------------

DUPLICATE_PHRASINGS = [
    "duplicate submission",
    "Duplicate result for media x analysis",
    "duplicate submission: media 1f0e x analysis 9a2b of project 77c1 was already submitted",
    "analysis result for this media and analysis has already been submitted",
    "This combination was already recorded",
    "result already reported",
    "Result already exists",
    "a result is already present for this analysis",
    "already stored",
    "submitted already",
    "ALREADY RECEIVED",
    "a result for this media and analysis exists",
    "Conflict: existing submission for media 3fa85f64 and analysis 3fa85f64",
    "duplicated request",
    "RESULT_ALREADY_EXISTS",
    "this analysis was previously submitted",
    "project already completed",
]

NOT_DUPLICATES = [
    "analysisResult.already: extra fields not permitted",
    "field 'already_seen' is not allowed",
    "status 'alreadysubmitted' is not one of completed, failed",
    "invalid result format",
    "userPromptUsed must not be empty (already trimmed)",
    "project does not exist",
    "media 3fa85f64 not found; no result exists",
    "analysis_types_completed contains duplicate values",
    "duplicate object ids in objects_detected",
    "analysisId must reference an existing analysis",
    "not a duplicate: the first submission failed validation",
    "There is already an upload in progress",
    "",
]


@pytest.mark.parametrize("detail", DUPLICATE_PHRASINGS)
def test_duplicate_phrasings_are_recognised(detail: str) -> None:
    assert speaks_of_duplicate(detail)


@pytest.mark.parametrize("detail", NOT_DUPLICATES)
def test_validation_errors_are_not_taken_for_duplicates(detail: str) -> None:
    assert not speaks_of_duplicate(detail)


def test_a_duplicate_without_an_unknown_earlier_attempt_is_a_refusal() -> None:
    assert decide("result", 400, "duplicate submission", prior_unknown=False) is Decision.REFUSED
    assert decide("result", 400, "duplicate submission", prior_unknown=True) is Decision.LANDED
    assert decide("result", 409, "locked by reviewer", prior_unknown=False) is Decision.REFUSED
    assert decide("result", 409, None, prior_unknown=True) is Decision.LANDED
    assert decide("status", 409, None, prior_unknown=False) is Decision.LANDED
    assert decide("report", 422, "summary too long", prior_unknown=True) is Decision.PARK
