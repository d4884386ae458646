"""The simulator's correlated faults: outage windows, fixed answers and backend quirks.

Real HTTP on loopback with a plain aiohttp client, like ``test_simulator.py`` (whose helpers
this reuses). Outage windows are a few tenths of a second of real time.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner

from goflow_gpu.simulator import (
    FixedAnswer,
    Outage,
    Simulator,
    SimulatorThread,
    parse_answer,
    parse_outage,
)
from tests.test_simulator import (
    API,
    KEY,
    NOT_A_UUID,
    UNKNOWN_UUID,
    Api,
    async_test,
    good_report,
    good_result,
    ids,
    running,
)


async def raw(api: Api, method: str, url: str, body: Any = None) -> tuple[int, Any, str | None]:
    """Status, JSON (or text) body and Retry-After header of one call (``url`` may be a path)."""
    if url.startswith("/"):
        url = api.sim.base_url + url
    async with api.http.request(method, url, json=body, headers={"X-API-Key": KEY}) as response:
        if response.content_type == "application/json":
            data: Any = await response.json()
        else:
            data = await response.read()
        return response.status, data, response.headers.get("Retry-After")


def result_path(project: str, media: str, analysis: str) -> str:
    return f"{API}/projects/{project}/media/{media}/analysis/{analysis}"


def combos(manifest: dict[str, Any]) -> list[tuple[str, str, str]]:
    project = manifest["project"]["id"]
    return [(project, m["id"], a["id"]) for m in manifest["media"] for a in manifest["analyses"]]


async def until_closed(outage: Outage) -> None:
    assert outage.closes_at is not None
    await asyncio.sleep(max(0.0, outage.closes_at - time.monotonic()) + 0.02)


# -- outage windows ----------------------------------------------------------------------------


@async_test
async def test_result_outage_after_n_results_with_retry_after_then_recovery() -> None:
    async with running() as api:
        manifest = api.sim.add_job(media=2, analyses=3)
        todo = combos(manifest)
        api.sim.add_outage("result", 0.4, after=2, retry_after="2")
        assert api.sim.outages[0].opened_at is None
        for combo in todo[:2]:
            assert (await api.result(*combo))[0] == 201
        assert api.sim.outages[0].opened_at is None  # opens on the next call, not before

        before = time.monotonic()
        status, body, retry = await raw(api, "POST", result_path(*todo[2]), good_result())
        assert (status, retry) == (503, "2")
        assert body == {"detail": "service unavailable (simulated outage)"}
        (window,) = api.sim.outages
        assert window.opened_at is not None and window.closes_at is not None
        assert before <= window.opened_at <= time.monotonic()
        assert window.closes_at == pytest.approx(window.opened_at + 0.4)
        assert window.is_open() and not window.is_closed()
        assert (await api.result(*todo[3]))[0] == 503  # every call, any combination
        # the key check still comes first
        assert (await api.result(*todo[3], key="wrong"))[0] == 401
        assert len(api.sim.ledger.results) == 2

        await until_closed(window)
        assert api.sim.outages[0].is_closed()
        assert api.sim.outages[0].answered == 2
        assert (await api.result(*todo[2]))[0] == 201
        assert (await api.result(*todo[3]))[0] == 201  # each window opens only once
        result_calls = [c for c in api.sim.ledger.calls if c["route"] == "result"]
        assert [(c["status"], c["fault"]) for c in result_calls] == [
            (201, None),
            (201, None),
            (503, "outage"),
            (503, "outage"),
            (401, None),
            (201, None),
            (201, None),
        ]

        # a second window on the same route, without Retry-After and with another status
        api.sim.add_outage("result", 0.3, after=5, status=500)
        assert (await api.result(*todo[4]))[0] == 201  # 4 accepted so far: not yet
        status, body, retry = await raw(api, "POST", result_path(*todo[5]), good_result())
        assert (status, retry) == (500, None)
        assert "simulated outage" in body["detail"]
        await until_closed(api.sim.outages[1])
        assert (await api.result(*todo[5]))[0] == 201
    assert len(api.sim.ledger.results) == 6


@async_test
async def test_media_outage_covers_every_project_and_report_outage_after_one() -> None:
    async with running(image_long_side=(64, 96)) as api:
        one, two = api.sim.add_job(media=1, analyses=1), api.sim.add_job(media=1, analyses=1)
        api.sim.add_outage("media", 0.3, status=502)
        for manifest in (one, two):
            status, body, retry = await raw(api, "GET", manifest["media"][0]["optimised_path"])
            assert (status, retry) == (502, None)
            assert body == {"detail": "bad gateway (simulated outage)"}
        await until_closed(api.sim.outages[0])
        status, image, _ = await raw(api, "GET", one["media"][0]["greyscale_path"])
        assert status == 200 and image[:2] == b"\xff\xd8"  # a JPEG again

        api.sim.add_outage("report", 0.3, after=1, retry_after="date")
        assert (await api.report(one["project"]["id"]))[0] == 201
        path = f"{API}/projects/{two['project']['id']}/reports"
        status, _, retry = await raw(api, "PUT", path, good_report())
        assert status == 503 and retry is not None
        window = api.sim.outages[1]
        assert window.closes_at is not None
        closes_wall = time.time() + (window.closes_at - time.monotonic())
        when = email.utils.parsedate_to_datetime(retry).timestamp()
        assert closes_wall <= when <= closes_wall + 1.01  # the closing time, rounded up
        assert set(api.sim.ledger.reports) == {one["project"]["id"]}
        await until_closed(window)
        assert (await api.report(two["project"]["id"]))[0] == 201
        media_faults = [c["fault"] for c in api.sim.ledger.calls if c["route"] == "media"]
        assert media_faults == ["outage", "outage", None]


@async_test
async def test_windows_of_one_route_never_overlap() -> None:
    async with running() as api:
        manifest = api.sim.add_job(media=1, analyses=1)
        api.sim.add_outage("next-job", 0.2, status=429, retry_after="1")
        api.sim.add_outage("next-job", 0.2, status=500)
        assert (await api.call("GET", f"{API}/next-job"))[0] == 429
        first, second = api.sim.outages
        assert second.opened_at is None  # waits for the first to close
        await until_closed(first)
        assert (await api.call("GET", f"{API}/next-job"))[0] == 500
        second = api.sim.outages[1]
        assert second.opened_at is not None and first.closes_at is not None
        assert second.opened_at >= first.closes_at
        await until_closed(second)
        assert await api.call("GET", f"{API}/next-job") == (200, manifest)  # the job was kept


def test_outage_and_answer_arguments_are_checked() -> None:
    sim = Simulator(KEY)
    calls: list[tuple[Callable[[], None], str]] = [
        (lambda: sim.add_outage("results", 1), "'results'"),
        (lambda: sim.add_outage("result", 0), "seconds=0"),
        (lambda: sim.add_outage("result", 1, after=-1), "after=-1"),
        (lambda: sim.add_outage("result", 1, status=200), "200"),
        (lambda: sim.add_outage("result", 1, retry_after="soon"), "'soon'"),
        (lambda: sim.fix_answer("result", 201), "201"),
        (lambda: sim.fix_answer("status", 409, media_id=UNKNOWN_UUID), "media="),
        (lambda: sim.fix_answer("media", 409, analysis_id=UNKNOWN_UUID), "analysis="),
        (lambda: sim.fix_answer("result", 409, media_id="nope"), "'nope'"),
        (lambda: sim.fix_answer("result", 409, times=0), "times=0"),
        (lambda: sim.reoffer(UNKNOWN_UUID), UNKNOWN_UUID),
    ]
    for call, fragment in calls:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            call()
    assert sim.outages == () and sim.answers == ()


# -- fixed answers -----------------------------------------------------------------------------


@async_test
async def test_fixed_409_on_one_combination_only() -> None:
    async with running() as api:
        manifest = api.sim.add_job(media=2, analyses=2)
        project, media, analysis = ids(manifest)
        api.sim.fix_answer("result", 409, media_id=media.upper(), analysis_id=analysis)
        # a malformed request still gets its real error
        assert (await api.result(project, media, analysis, {"modelUsed": "m"}))[0] == 422
        assert (await api.result(project, media, UNKNOWN_UUID))[0] == 404
        for _ in range(2):  # forever
            assert await api.result(project, media, analysis) == (
                409,
                {"detail": "conflict (simulated fixed answer)"},
            )
        others = [c for c in combos(manifest) if c != (project, media, analysis)]
        for combo in others:
            assert (await api.result(*combo))[0] == 201
        assert set(api.sim.ledger.results) == set(others)
        assert api.sim.answers[0].used == 2
        faults = [c["fault"] for c in api.sim.ledger.calls if c["status"] == 409]
        assert faults == ["fixed", "fixed"]


@async_test
async def test_fixed_422_on_every_report_keeps_real_errors() -> None:
    async with running() as api:
        one, two = api.sim.add_job()["project"]["id"], api.sim.add_job()["project"]["id"]
        api.sim.fix_answer("report", 422, "report.details.model: unknown model")
        for project in (one, two, one):
            assert await api.report(project) == (
                422,
                {"detail": "report.details.model: unknown model"},
            )
        status, body = await api.report(NOT_A_UUID)
        assert status == 422 and body["detail"][0]["loc"] == ["path", "projectId"]
        assert (await api.report(UNKNOWN_UUID))[0] == 404
        assert (await api.report(one, {"type": "quality_analysis"}))[0] == 422
        assert api.sim.ledger.reports == {}
        assert api.sim.answers[0].used == 3


@async_test
async def test_fixed_answer_times_then_normal() -> None:
    async with running() as api:
        manifest = api.sim.add_job()
        project = manifest["project"]["id"]
        api.sim.fix_answer("next-job", 503, times=1)
        api.sim.fix_answer("status", 500, "try later", times=1)
        assert (await api.call("GET", f"{API}/next-job"))[0] == 503
        assert await api.call("GET", f"{API}/next-job") == (200, manifest)  # still queued
        assert await api.status(project, "processing") == (500, {"detail": "try later"})
        assert (await api.status(project, "processing"))[0] == 200
        assert api.sim.ledger.statuses == {project: ["processing"]}
        assert [a.used for a in api.sim.answers] == [1, 1]
        assert all(a.exhausted for a in api.sim.answers)


@async_test
async def test_fixed_answer_with_accept_records_then_answers() -> None:
    async with running() as api:
        manifest = api.sim.add_job(media=1, analyses=2)
        project, media, analysis = ids(manifest)
        api.sim.fix_answer("result", 409, "analysis result already exists", accept=True, times=1)
        # not accepted: the real error, and the fixed answer is not used up
        assert (await api.result(project, media, analysis, {"status": "completed"}))[0] == 422
        assert await api.result(project, media, analysis) == (
            409,
            {"detail": "analysis result already exists"},
        )
        assert api.sim.ledger.results == {(project, media, analysis): [good_result()]}
        assert api.sim.ledger.events[-1]["delivered"] is True
        assert api.sim.ledger.calls[-1]["status"] == 409
        assert api.sim.ledger.calls[-1]["fault"] == "fixed"
        status, body = await api.result(project, media, analysis)  # times=1: real answers now
        assert status == 400 and "duplicate" in body["detail"]
        other = manifest["analyses"][1]["id"]
        assert (await api.result(project, media, other))[0] == 201


@async_test
async def test_reject_result_is_a_fixed_answer_and_the_latest_wins() -> None:
    async with running() as api:
        project, media, analysis = ids(api.sim.add_job(media=1, analyses=1))
        api.sim.reject_result(media, analysis, 400, "first")
        api.sim.reject_result(media.upper(), analysis.upper(), 422, "second")
        assert await api.result(project, media, analysis) == (422, {"detail": "second"})
        assert [(a.route, a.status, a.media_id) for a in api.sim.answers] == [
            ("result", 400, media),
            ("result", 422, media),
        ]
        with pytest.raises(ValueError, match="400 or 422"):
            api.sim.reject_result(media, analysis, 409)


# -- quirks: duplicate wording, upper-case ids, re-offered jobs --------------------------------


@async_test
async def test_duplicate_detail_wording() -> None:
    text = "analysis result for this media and analysis has already been submitted"
    async with running(duplicate_detail=text) as api:
        project, media, analysis = ids(api.sim.add_job(media=1, analyses=1))
        assert (await api.result(project, media, analysis))[0] == 201
        assert await api.result(project, media, analysis) == (400, {"detail": text})


@async_test
async def test_upper_case_ids_and_an_exactly_once_sequence() -> None:
    async with running(upper_ids=True, image_long_side=(64, 96)) as api:
        manifest = api.sim.add_job(media=2, analyses=2)
        assert await api.call("GET", f"{API}/next-job") == (200, manifest)
        every_id = [manifest["client"]["id"], manifest["project"]["id"]]
        every_id += [item["id"] for item in manifest["media"] + manifest["analyses"]]
        for value in every_id:
            assert value == value.upper() != value.lower()
        project = manifest["project"]["id"]
        assert (await api.status(project, "processing"))[0] == 200
        await api.all_results(manifest)
        assert (await api.status(project, "completed"))[0] == 200
        assert (await api.report(project))[0] == 201
        status, image, _ = await raw(api, "GET", manifest["media"][0]["optimised_path"])
        assert status == 200 and image[:2] == b"\xff\xd8"
        upper_url = manifest["media"][1]["greyscale_path"].replace(
            manifest["media"][1]["id"].lower(), manifest["media"][1]["id"]
        )
        assert (await raw(api, "GET", upper_url))[0] == 200

        assert api.sim.check_job(manifest) == []
        ledger = api.sim.ledger
        lower = project.lower()
        assert ledger.statuses == {lower: ["processing", "completed"]}
        assert set(ledger.reports) == {lower}
        assert {key for key in ledger.results} == {
            (lower, m["id"].lower(), a["id"].lower())
            for m in manifest["media"]
            for a in manifest["analyses"]
        }
        # a repeat in another case is still the same combination
        status, body = await api.result(*(value.lower() for value in ids(manifest)))
        assert status == 400 and "duplicate" in body["detail"]


@async_test
async def test_reoffer_a_finished_job() -> None:
    async with running() as api:
        manifest, other = api.sim.add_job(media=1, analyses=1), api.sim.add_job()
        assert await api.call("GET", f"{API}/next-job") == (200, manifest)
        project, media, analysis = ids(manifest)
        assert (await api.status(project, "processing"))[0] == 200
        assert (await api.result(project, media, analysis))[0] == 201
        assert (await api.status(project, "completed"))[0] == 200
        assert (await api.report(project))[0] == 201

        api.sim.reoffer(project.upper(), upper=True)
        status, again = await api.call("GET", f"{API}/next-job")  # before the queued one
        assert status == 200
        assert again["project"]["id"] == project.upper()
        assert again["media"][0]["id"] == media.upper()
        assert again["project"]["name"] == manifest["project"]["name"]
        assert api.sim.check_job(again) == []
        status, body = await api.result(project.upper(), media.upper(), analysis.upper())
        assert status == 400 and "duplicate" in body["detail"]  # still known, not 404
        assert await api.call("GET", f"{API}/next-job") == (200, other)
        api.sim.reoffer(project)
        assert await api.call("GET", f"{API}/next-job") == (200, manifest)
        assert [e["kind"] for e in api.sim.ledger.events].count("job") == 4


@async_test
async def test_reoffer_closed_hands_each_job_out_once_more() -> None:
    async with running(reoffer_closed=True) as api:
        one, two = api.sim.add_job(media=1, analyses=1), api.sim.add_job(media=1, analyses=1)

        async def finish(manifest: dict[str, Any]) -> None:
            project = manifest["project"]["id"]
            assert (await api.status(project, "processing"))[0] == 200
            await api.all_results(manifest)
            assert (await api.status(project, "completed"))[0] == 200
            assert (await api.report(project))[0] == 201

        assert await api.call("GET", f"{API}/next-job") == (200, one)
        await finish(one)
        assert await api.call("GET", f"{API}/next-job") == (200, one)  # on the next poll
        assert await api.call("GET", f"{API}/next-job") == (200, two)
        await finish(two)
        assert (await api.report(one["project"]["id"]))[0] == 201  # a repeat: not re-queued
        assert await api.call("GET", f"{API}/next-job") == (200, two)
        assert (await api.call("GET", f"{API}/next-job"))[0] == 404
        assert api.sim.check_job(two) == []


def test_thread_wrappers_and_admin_routes() -> None:
    import json
    import urllib.error
    import urllib.request

    def post(url: str, body: Any) -> Any:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    with SimulatorThread(Simulator(KEY, seed=2)) as sim:
        manifest = sim.add_job(media=1, analyses=1)
        sim.add_outage("status", 5, after=3)
        sim.fix_answer("report", 502, times=2)
        windows = post(sim.base_url + "/_sim/outages", {"spec": "media:1:status=504"})
        assert [(w["route"], w["status"], w["opened_at"]) for w in windows] == [
            ("status", 503, None),
            ("media", 504, None),
        ]
        answers = post(sim.base_url + "/_sim/answers", {"spec": "next-job:418:detail=a: b"})
        assert [(a["route"], a["status"], a["detail"]) for a in answers] == [
            ("report", 502, None),
            ("next-job", 418, "a: b"),
        ]
        assert post(sim.base_url + "/_sim/reoffer", {"project": manifest["project"]["id"]}) == {
            "status": "queued"
        }
        assert [o.route for o in sim.outages] == ["status", "media"]
        assert [a.times for a in sim.answers] == [2, None]
        sim.reoffer(manifest["project"]["id"], upper=True)
        with pytest.raises(urllib.error.HTTPError) as info:
            post(sim.base_url + "/_sim/outages", {"spec": "media:x"})
        assert info.value.code == 422
        assert "'x'" in json.load(info.value)["detail"]


# -- text syntax and the CLI -------------------------------------------------------------------


def test_parse_good_specs() -> None:
    assert parse_outage("result:2") == Outage("result", 2.0)
    assert parse_outage(" media:0.5:after=3:status=502:retry-after=date") == Outage(
        "media", 0.5, after=3, status=502, retry_after="date"
    )
    upper = UNKNOWN_UUID.upper()
    assert parse_answer(
        f"result:409:times=2:accept:media={upper}:analysis={UNKNOWN_UUID}:detail=exists: yes"
    ) == FixedAnswer(
        "result",
        409,
        "exists: yes",
        media_id=UNKNOWN_UUID,
        analysis_id=UNKNOWN_UUID,
        times=2,
        accept=True,
    )
    assert parse_answer("report:422") == FixedAnswer("report", 422)
    text = parse_answer("report:422").text  # "content" or "entity", by Python version
    assert text.startswith("unprocessable ") and text.endswith(" (simulated fixed answer)")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("results:2", "'results'"),
        ("result", "ROUTE:SECONDS"),
        ("result:soon", "'soon'"),
        ("result:-1", "seconds=-1"),
        ("result:2:after=x", "after='x'"),
        ("result:2:after", "'after'"),
        ("result:2:later=1", "'later'"),
        ("result:2:status=200", "200"),
        ("result:2:retry-after=soon", "'soon'"),
    ],
)
def test_parse_outage_errors_name_the_bad_part(text: str, named: str) -> None:
    with pytest.raises(ValueError, match="bad spec") as info:
        parse_outage(text)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("reports:409", "'reports'"),
        ("report:", "ROUTE:STATUS"),
        ("report:abc", "'abc'"),
        ("report:700", "700"),
        ("report:409:times=0", "times=0"),
        ("report:409:times", "'times'"),
        ("report:409:forever", "'forever'"),
        ("status:409:media=" + UNKNOWN_UUID, "media="),
        ("result:409:media=nope", "'nope'"),
        ("result:409:detail=", "detail="),
    ],
)
def test_parse_answer_errors_name_the_bad_part(text: str, named: str) -> None:
    with pytest.raises(ValueError, match="bad spec") as info:
        parse_answer(text)
    assert named in str(info.value)


def test_cli_flags_configure_the_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    from goflow_gpu.simulator import cli
    from goflow_gpu.simulator.__main__ import app

    served: list[Simulator] = []

    async def fake_serve(simulator: Simulator, *args: Any) -> None:
        served.append(simulator)

    monkeypatch.setattr(cli, "_serve", fake_serve)
    monkeypatch.setenv("GOFLOW_API_KEY", KEY)
    runner = CliRunner()
    args = ["--port", "0", "--outage", "result:2:after=10:retry-after=1"]
    args += ["--outage", "media:0.5:status=502", "--answer", "report:422:times=1"]
    args += ["--answer", "result:409:accept:detail=already: there", "--upper-ids"]
    args += ["--reoffer-closed", "--duplicate-detail", "has already been submitted"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (sim,) = served
    assert sim.outages == (
        Outage("result", 2.0, after=10, retry_after="1"),
        Outage("media", 0.5, status=502),
    )
    assert sim.answers == (
        FixedAnswer("report", 422, times=1),
        FixedAnswer("result", 409, "already: there", accept=True),
    )
    assert (sim.upper_ids, sim.reoffer_closed) == (True, True)
    assert sim.duplicate_detail == "has already been submitted"

    for flag, spec, named in [
        ("--outage", "result:2:after=many", "after='many'"),
        ("--outage", "resul:2", "'resul'"),
        ("--answer", "report:4o9", "'4o9'"),
        ("--answer", "report:409:sometimes", "'sometimes'"),
    ]:
        result = runner.invoke(app, ["--port", "0", flag, spec])
        assert result.exit_code == 2, (flag, spec)
        assert f"error: {flag}: " in result.output and named in result.output
    assert runner.invoke(app, ["--duplicate-detail", " "]).exit_code == 2
    assert len(served) == 1

    help_text = runner.invoke(app, ["--help"]).output
    for fragment in (
        "--outage",
        "ROUTE:SECONDS[:after=N][:status=CODE][:retry-after=S",
        "--outage result:2:after=10:retry-after=1",
        "ROUTE:STATUS[:times=N][:accept][:media=ID][:analysis=ID][:detail=TEXT]",
        "--answer result:409:accept:detail=already exists",
        "--upper-ids",
        "--reoffer-closed",
        "--duplicate-detail",
    ):
        assert fragment in help_text, fragment
