"""The embedded GoFlow simulator, over real sockets on loopback with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import io
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from PIL import Image
from typer.testing import CliRunner

from goflow_gpu.protocol import parse_manifest
from goflow_gpu.simulator import (
    ANALYSIS_TYPES,
    MEDIA_FAULTS,
    Faults,
    FaultSpec,
    Ledger,
    Simulator,
    SimulatorThread,
    parse_faults,
)

KEY = "made-up-test-key"
API = "/api/v1/agent"
NOT_A_UUID = "not-a-uuid"
UNKNOWN_UUID = "00000000-0000-4000-8000-000000000000"


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop (the project does not use pytest-asyncio)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


class Api:
    """A thin raw HTTP helper: the response status and decoded JSON (or text), nothing more."""

    def __init__(self, sim: Simulator, http: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.http = http

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: str | None = None,
        key: str | None = KEY,
        timeout: float = 10.0,  # noqa: ASYNC109 - a per-request client timeout, passed on
    ) -> tuple[int, Any]:
        headers = {"X-API-Key": key} if key is not None else {}
        async with self.http.request(
            method,
            self.sim.base_url + path,
            json=json,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def status(self, project: str, value: Any, **kw: Any) -> tuple[int, Any]:
        return await self.call(
            "PUT", f"{API}/projects/{project}/status", json={"status": value}, **kw
        )

    async def result(
        self, project: str, media: str, analysis: str, body: Any = None, **kw: Any
    ) -> tuple[int, Any]:
        path = f"{API}/projects/{project}/media/{media}/analysis/{analysis}"
        return await self.call("POST", path, json=good_result() if body is None else body, **kw)

    async def report(self, project: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        path = f"{API}/projects/{project}/reports"
        return await self.call("PUT", path, json=good_report() if body is None else body, **kw)

    async def all_results(self, manifest: dict[str, Any], skip: int = 0) -> None:
        project = manifest["project"]["id"]
        combos = [(m["id"], a["id"]) for m in manifest["media"] for a in manifest["analyses"]]
        for media, analysis in combos[: len(combos) - skip]:
            assert (await self.result(project, media, analysis))[0] == 201


@contextlib.asynccontextmanager
async def running(**kwargs: Any) -> AsyncIterator[Api]:
    sim = Simulator(KEY, **kwargs)
    async with sim, aiohttp.ClientSession() as http:
        yield Api(sim, http)


def good_result() -> dict[str, Any]:
    return {
        "modelUsed": "qwen2.5vl",
        "userPromptUsed": "List the objects.",
        "systemPromptUsed": "You are an image analyst.",
        "status": "completed",
        "analysisResult": {"objects_detected": [{"name": "car", "confidence": 0.9}]},
    }


def good_report() -> dict[str, Any]:
    return {
        "type": "quality_analysis",
        "report": {
            "summary": "All good.",
            "details": {
                "total_media_processed": 2,
                "total_analyses_completed": 4,
                "processing_time_minutes": 0.5,
                "success_rate": 1.0,
                "analysis_types_completed": ["object-detection", "text-recognition"],
                "key_findings": "Cars.",
                "model": "qwen2.5vl",
            },
        },
    }


def locs(detail: list[dict[str, Any]]) -> list[list[Any]]:
    return [item["loc"] for item in detail]


def ids(manifest: dict[str, Any]) -> tuple[str, str, str]:
    return manifest["project"]["id"], manifest["media"][0]["id"], manifest["analyses"][0]["id"]


# -- next-job, manifests ---------------------------------------------------------------------


@async_test
async def test_next_job_serves_queue_in_order_then_404() -> None:
    async with running() as api:
        first = api.sim.add_job(media=2, analyses=4)
        second = api.sim.add_job(media=1, analyses=1)
        assert await api.call("GET", f"{API}/next-job") == (200, first)
        assert await api.call("GET", f"{API}/next-job") == (200, second)
        assert await api.call("GET", f"{API}/next-job") == (404, {"detail": "no job available"})

    parsed = parse_manifest(first)  # the contract's validator accepts what we serve
    assert [a.slug for a in parsed.analyses] == [
        "object-detection",
        "text-recognition",
        "image-description",
        "scene-classification",
    ]
    assert [a.name for a in parsed.analyses][:2] == ["Object Detection", "Text Recognition"]
    media = first["media"][0]
    root = f"{api.sim.base_url}/media/{first['project']['id']}/{media['id']}"
    assert media["optimised_path"] == f"{root}/optimised.jpg"
    assert media["greyscale_path"] == f"{root}/greyscale.jpg"
    assert first["project"]["id"] != second["project"]["id"]
    assert [e["kind"] for e in api.sim.ledger.events] == ["job", "job"]


def test_analysis_catalogue_and_cycling() -> None:
    assert len(ANALYSIS_TYPES) == 25
    assert ANALYSIS_TYPES[0] == ("object-detection", "Object Detection")
    assert ANALYSIS_TYPES[-1] == ("compliance-flags", "Compliance Flags")

    async def body() -> None:
        async with running() as api:
            big = api.sim.add_job(media=1, analyses=27)
            slugs = [a["slug"] for a in big["analyses"]]
            assert slugs[25:] == ["object-detection-2", "text-recognition-2"]
            assert len(set(slugs)) == 27
            custom = api.sim.add_job(media=1, slugs=["brand-tone", "alt-text"])
            assert [(a["slug"], a["name"]) for a in custom["analyses"]] == [
                ("brand-tone", "Brand Tone"),
                ("alt-text", "Alt Text"),
            ]
            with pytest.raises(ValueError, match="bomb2"):
                api.sim.add_job(media=1, media_faults={0: "bomb2"})

    asyncio.run(body())


@async_test
async def test_same_seed_same_ids_and_add_job_needs_a_started_server() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        Simulator(KEY).add_job()
    async with running(seed=3) as one, running(seed=3) as two, running(seed=4) as three:
        a, b, c = (api.sim.add_job() for api in (one, two, three))
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


@async_test
async def test_raw_jobs_are_served_as_is_and_unknown_to_the_backend() -> None:
    async with running() as api:
        api.sim.add_raw_job({"project": {"id": "nope"}, "media": []})
        api.sim.add_raw_job([1, 2])
        assert await api.call("GET", f"{API}/next-job") == (
            200,
            {"project": {"id": "nope"}, "media": []},
        )
        assert await api.call("GET", f"{API}/next-job") == (200, [1, 2])
        assert (await api.status(UNKNOWN_UUID, "processing"))[0] == 404


# -- key check -------------------------------------------------------------------------------


@async_test
async def test_every_api_route_needs_the_key_and_revocation_takes_effect() -> None:
    async with running() as api:
        manifest = api.sim.add_job(media=1, analyses=1)
        project, media, analysis = ids(manifest)
        calls: list[Callable[[str | None], Coroutine[Any, Any, tuple[int, Any]]]] = [
            lambda key: api.call("GET", f"{API}/next-job", key=key),
            lambda key: api.status(project, "processing", key=key),
            lambda key: api.result(project, media, analysis, key=key),
            lambda key: api.report(project, key=key),
        ]
        for call in calls:
            for key in (None, "wrong-key", KEY[:-1]):
                status, body = await call(key)
                assert status == 401
                assert "X-API-Key" in body["detail"]
        assert api.sim.ledger.events == []
        # media and admin routes are keyless
        async with api.http.get(manifest["media"][0]["optimised_path"]) as response:
            assert response.status == 200
        assert (await api.call("GET", "/_sim/ledger", key=None))[0] == 200

        assert (await api.status(project, "processing"))[0] == 200
        api.sim.revoke_key()
        for call in calls:
            assert (await call(KEY))[0] == 401
        assert api.sim.ledger.statuses == {project: ["processing"]}
        assert (await api.call("GET", f"{API}/next-job", key=None))[0] == 401
        api.sim.restore_key()
        assert (await api.status(project, "completed"))[0] == 200
        assert KEY not in str(api.sim.ledger.snapshot())


# -- status ----------------------------------------------------------------------------------


@async_test
async def test_status_endpoint_codes_and_details() -> None:
    async with running() as api:
        project = api.sim.add_job()["project"]["id"]
        assert await api.status(project, "processing") == (200, {"status": "processing"})
        assert await api.status(project, "completed") == (200, {"status": "completed"})

        status, body = await api.status(NOT_A_UUID, "processing")
        assert status == 422
        assert locs(body["detail"]) == [["path", "projectId"]]
        assert (await api.status(UNKNOWN_UUID, "processing"))[0] == 404

        status, body = await api.status(project, "done")
        assert status == 422
        assert locs(body["detail"]) == [["body", "status"]]
        assert "'done'" in body["detail"][0]["msg"]

        path = f"{API}/projects/{project}/status"
        status, body = await api.call("PUT", path, json={"status": "completed", "extra": 1})
        assert (status, locs(body["detail"])) == (422, [["body", "extra"]])
        status, body = await api.call("PUT", path, json={})
        assert (status, locs(body["detail"])) == (422, [["body", "status"]])
        status, body = await api.call("PUT", path, json=["completed"])
        assert (status, locs(body["detail"])) == (422, [["body"]])
        status, body = await api.call("PUT", path, data="{status: completed}")
        assert status == 400
        assert "JSON" in body["detail"]
        assert api.sim.ledger.statuses == {project: ["processing", "completed"]}


# -- results ---------------------------------------------------------------------------------


@async_test
async def test_result_created_then_duplicate_400() -> None:
    async with running() as api:
        manifest = api.sim.add_job(media=2, analyses=2)
        project, media, analysis = ids(manifest)
        status, body = await api.result(project, media, analysis)
        assert status == 201
        assert body["status"] == "created"
        assert len(body["id"]) == 36
        status, body = await api.result(project, media, analysis)
        assert status == 400
        assert "duplicate" in body["detail"]
        # upper-case ids name the same combination
        status, _ = await api.result(project.upper(), media.upper(), analysis.upper())
        assert status == 400
        assert api.sim.ledger.results == {(project, media, analysis): [good_result()]}


@async_test
async def test_result_404s_for_unknown_or_foreign_ids() -> None:
    async with running() as api:
        one = api.sim.add_job(media=1, analyses=1)
        other = api.sim.add_job(media=1, analyses=1)
        project, media, analysis = ids(one)
        _, other_media, other_analysis = ids(other)
        for path_ids, word in [
            ((UNKNOWN_UUID, media, analysis), "project"),
            ((project, UNKNOWN_UUID, analysis), "media"),
            ((project, media, UNKNOWN_UUID), "analysis"),
            ((project, other_media, analysis), "media"),
            ((project, media, other_analysis), "analysis"),
        ]:
            status, body = await api.result(*path_ids)
            assert status == 404, path_ids
            assert body["detail"].startswith(word)
        assert api.sim.ledger.results == {}


@async_test
async def test_result_validation_details() -> None:
    async with running() as api:
        project, media, analysis = ids(api.sim.add_job(media=1, analyses=1))

        status, body = await api.result(NOT_A_UUID, "x", analysis)
        assert status == 422
        assert locs(body["detail"]) == [["path", "projectId"], ["path", "mediaId"]]

        cases: list[tuple[dict[str, Any], list[list[Any]]]] = []
        missing = good_result()
        del missing["systemPromptUsed"]
        cases.append((missing, [["body", "systemPromptUsed"]]))
        cases.append(({**good_result(), "confidence": 1}, [["body", "confidence"]]))
        cases.append(({**good_result(), "analysisResult": ["x"]}, [["body", "analysisResult"]]))
        cases.append(({**good_result(), "status": "done"}, [["body", "status"]]))
        cases.append(({**good_result(), "modelUsed": ""}, [["body", "modelUsed"]]))
        cases.append(({**good_result(), "userPromptUsed": 5}, [["body", "userPromptUsed"]]))
        snake = {
            "model_used": "m",
            "user_prompt_used": "u",
            "system_prompt_used": "s",
            "status": "completed",
            "analysis_result": {},
        }
        snake_locs = [["body", k] for k in ("modelUsed", "userPromptUsed", "systemPromptUsed")]
        snake_locs += [["body", "analysisResult"]]
        snake_locs += [["body", k] for k in snake if k != "status"]
        cases.append((snake, snake_locs))
        for body_in, expected in cases:
            status, body = await api.result(project, media, analysis, body_in)
            assert status == 422, body_in
            assert sorted(locs(body["detail"])) == sorted(expected)
            assert all(item["msg"] for item in body["detail"])

        path = f"{API}/projects/{project}/media/{media}/analysis/{analysis}"
        for text in ("not json", '{"modelUsed": NaN}', ""):
            status, body = await api.call("POST", path, data=text)
            assert status == 400, text
            assert "JSON" in body["detail"]
        assert api.sim.ledger.results == {}
        # a failed analysis is a valid submission
        assert (await api.result(project, media, analysis, {**good_result(), "status": "failed"}))[
            0
        ] == 201


# -- reports ---------------------------------------------------------------------------------


@async_test
async def test_report_codes_and_validation() -> None:
    async with running() as api:
        project = api.sim.add_job()["project"]["id"]
        assert (await api.report(UNKNOWN_UUID))[0] == 404
        status, body = await api.report(NOT_A_UUID)
        assert (status, locs(body["detail"])) == (422, [["path", "projectId"]])

        details = ["body", "report", "details"]
        bad: list[tuple[Any, list[list[Any]]]] = []
        report = good_report()
        del report["report"]["details"]["key_findings"]
        bad.append((report, [[*details, "key_findings"]]))
        report = good_report()
        report["report"]["details"]["success_rate"] = 1.5
        bad.append((report, [[*details, "success_rate"]]))
        report = good_report()
        report["report"]["details"]["total_media_processed"] = "2"
        bad.append((report, [[*details, "total_media_processed"]]))
        report = good_report()
        report["report"]["details"]["total_analyses_completed"] = 4.0
        bad.append((report, [[*details, "total_analyses_completed"]]))
        bad.append(({**good_report(), "type": "summary"}, [["body", "type"]]))
        bad.append(({**good_report(), "extra": True}, [["body", "extra"]]))
        bad.append(({"type": "quality_analysis"}, [["body", "report"]]))
        report = good_report()
        report["report"]["summary"] = ""
        bad.append((report, [["body", "report", "summary"]]))
        for body_in, expected in bad:
            status, body = await api.report(project, body_in)
            assert status == 422, body_in
            assert locs(body["detail"]) == expected
        assert api.sim.ledger.reports == {}

        status, body = await api.report(project)
        assert status == 201
        assert body["status"] == "created"
        assert api.sim.ledger.reports == {project: [good_report()]}  # extra detail key kept


@async_test
async def test_unknown_route_and_method_answer_json() -> None:
    async with running() as api:
        assert await api.call("GET", f"{API}/nothing-here") == (404, {"detail": "Not Found"})
        status, body = await api.call("DELETE", f"{API}/next-job")
        assert status == 405
        assert body == {"detail": "Method Not Allowed"}


# -- images ----------------------------------------------------------------------------------


@async_test
async def test_images_are_real_jpegs_of_varied_stated_sizes() -> None:
    async with running(seed=0, image_long_side=(200, 400)) as api:
        manifest = api.sim.add_job(media=8, analyses=1)
        shapes: set[str] = set()
        for media in manifest["media"]:
            pictures = {}
            for variant in ("optimised", "greyscale"):
                async with api.http.get(media[f"{variant}_path"]) as response:
                    assert response.status == 200
                    assert response.content_type == "image/jpeg"
                    data = await response.read()
                picture = Image.open(io.BytesIO(data))
                picture.load()
                assert picture.format == "JPEG"
                pictures[variant] = picture
            colour, grey = pictures["optimised"], pictures["greyscale"]
            assert colour.mode == "RGB"
            assert grey.mode == "L"
            assert colour.size == grey.size == api.sim.image_size(media["id"])
            assert 200 <= max(colour.size) <= 400
            darkest, lightest = grey.getextrema()
            assert isinstance(darkest, int)
            assert isinstance(lightest, int)
            assert lightest - darkest > 30  # drawn, not blank
            shapes.add("landscape" if colour.width > colour.height else "portrait-or-square")
        assert shapes == {"landscape", "portrait-or-square"}
        async with api.http.get(manifest["media"][0]["optimised_path"]) as response:
            first = await response.read()
        bad = manifest["media"][0]["optimised_path"].replace("optimised.jpg", "sepia.jpg")
        async with api.http.get(bad) as response:
            assert response.status == 404

    async with running(seed=0, image_long_side=(200, 400)) as again:
        url = again.sim.add_job(media=8, analyses=1)["media"][0]["optimised_path"]
        async with again.http.get(url) as response:
            assert await response.read() == first  # same seed, same bytes


@async_test
async def test_each_media_fault() -> None:
    assert set(MEDIA_FAULTS) == {
        "404",
        "html",
        "truncated",
        "corrupt",
        "bomb",
        "oversized",
        "slow",
        "redirect-loop",
    }
    faults = Faults(routes={"media": FaultSpec(slow_seconds=0.6)})
    async with running(faults=faults) as api:
        order = list(MEDIA_FAULTS)
        manifest = api.sim.add_job(media=len(order), media_faults=dict(enumerate(order)))
        url = {
            fault: [m["optimised_path"], m["greyscale_path"]]
            for fault, m in zip(order, manifest["media"], strict=True)
        }
        get = api.http.get

        for variant in (0, 1):
            async with get(url["404"][variant]) as response:
                assert response.status == 404
            async with get(url["html"][variant]) as response:
                assert (response.status, response.content_type) == (200, "text/html")
                assert b"<html>" in await response.read()
            async with get(url["corrupt"][variant]) as response:
                assert (response.status, response.content_type) == (200, "image/jpeg")
                corrupt = await response.read()
            with pytest.raises(OSError, match=r"(?i)truncated|cannot identify"):
                Image.open(io.BytesIO(corrupt)).load()
            async with get(url["truncated"][variant]) as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            with pytest.raises(aiohttp.TooManyRedirects):
                async with get(url["redirect-loop"][variant], max_redirects=5):
                    pass

        async with get(url["bomb"][0]) as response:
            bomb = await response.read()
        assert len(bomb) < 100_000
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(bomb))
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            assert Image.open(io.BytesIO(bomb)).size == (20_000, 20_000)  # header only
        finally:
            Image.MAX_IMAGE_PIXELS = limit

        async with get(url["oversized"][1]) as response:
            assert response.content_type == "image/jpeg"
            assert response.content_length is not None
            assert response.content_length >= 40_000_000
            assert len(await response.read()) == response.content_length

        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            async with get(url["slow"][0], timeout=aiohttp.ClientTimeout(total=0.2)):
                pass
        assert time.monotonic() - started < 0.5
        async with get(url["slow"][1]) as response:
            assert response.status == 200
            Image.open(io.BytesIO(await response.read())).load()
        assert time.monotonic() - started >= 0.6

        noted = {call["fault"] for call in api.sim.ledger.calls if call["route"] == "media"}
        assert noted == set(MEDIA_FAULTS)


# -- faults ----------------------------------------------------------------------------------


def test_parse_faults_example_and_star() -> None:
    faults = parse_faults(
        "result:503=0.1,429=0.05,reset=0.03,slow=0.02,drop=0.02,latency=0.05;status:500=0.1"
    )
    assert faults.routes["result"] == FaultSpec(
        rate_503=0.1, rate_429=0.05, rate_reset=0.03, rate_slow=0.02, rate_drop=0.02, latency=0.05
    )
    assert faults.routes["status"] == FaultSpec(rate_500=0.1)
    assert set(faults.routes) == {"result", "status"}

    starred = parse_faults(
        "status:500=0.5; *:503=0.1,drop=0.1,retry-after=date,slow-seconds=2", seed=9
    )
    assert starred.seed == 9
    assert set(starred.routes) == {"next-job", "status", "result", "report"}
    assert starred.routes["status"].rate_500 == 0.5
    assert starred.routes["status"].rate_503 == 0.1
    assert starred.routes["result"].retry_after == "date"
    assert starred.routes["result"].slow_seconds == 2.0
    assert starred.routes["next-job"].rate_drop == 0.0  # nothing to drop on next-job
    assert starred.routes["report"].rate_drop == 0.1
    assert parse_faults("") == Faults()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("results:503=0.1", "'results'"),
        ("result:504=0.1", "'504'"),
        ("result:503=lots", "'lots'"),
        ("result:503", "'503'"),
        ("result 503=0.1", "'result 503=0.1'"),
        ("result:503=1.5", "503=1.5"),
        ("result:503=0.6,500=0.6", "add up"),
        ("next-job:drop=0.1", "'next-job'"),
        ("media:retry-after=soon", "'soon'"),
    ],
)
def test_parse_faults_errors_name_the_bad_part(text: str, named: str) -> None:
    with pytest.raises(ValueError, match="fault") as info:
        parse_faults(text)
    assert named in str(info.value)


@async_test
async def test_429_500_503_answers() -> None:
    spec = FaultSpec(rate_429=1.0, retry_after="1")
    async with running(faults=Faults(routes={"next-job": spec})) as api:
        async with api.http.get(
            api.sim.base_url + f"{API}/next-job", headers={"X-API-Key": KEY}
        ) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "1"
            assert "detail" in await response.json()

        api.sim.set_faults(Faults(routes={"next-job": FaultSpec(rate_429=1.0, retry_after="date")}))
        async with api.http.get(
            api.sim.base_url + f"{API}/next-job", headers={"X-API-Key": KEY}
        ) as response:
            assert response.status == 429
            when = email.utils.parsedate_to_datetime(response.headers["Retry-After"])
            assert 0 < when.timestamp() - time.time() <= 3

        for code in (500, 503):
            spec = FaultSpec(rate_500=1.0) if code == 500 else FaultSpec(rate_503=1.0)
            api.sim.set_faults(Faults(routes={"status": spec}))
            project = api.sim.add_job()["project"]["id"]
            status, body = await api.status(project, "processing")
            assert status == code
            assert "simulated" in body["detail"]
            assert api.sim.ledger.statuses == {}
        assert [c["fault"] for c in api.sim.ledger.calls] == ["429", "429", "500", "503"]


@async_test
async def test_seeded_faults_are_reproducible() -> None:
    async def sequence(seed: int) -> list[int]:
        spec = FaultSpec(rate_500=0.3, rate_503=0.3)
        async with running(faults=Faults(routes={"next-job": spec}, seed=seed)) as api:
            return [(await api.call("GET", f"{API}/next-job"))[0] for _ in range(30)]

    first, again, other = await sequence(5), await sequence(5), await sequence(6)
    assert first == again
    assert first != other
    assert {500, 503, 404} == set(first)


@async_test
async def test_reset_cuts_the_connection_and_changes_nothing() -> None:
    faults = Faults(routes={"result": FaultSpec(rate_reset=1.0)})
    async with running(faults=faults) as api:
        project, media, analysis = ids(api.sim.add_job())
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.result(project, media, analysis)
        assert api.sim.ledger.results == {}
        assert [(c["route"], c["status"], c["fault"]) for c in api.sim.ledger.calls] == [
            ("result", None, "reset")
        ]


@async_test
async def test_accept_then_drop_records_then_drops() -> None:
    faults = Faults(routes={"result": FaultSpec(rate_drop=1.0)})
    async with running(faults=faults) as api:
        project, media, analysis = ids(api.sim.add_job())
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.result(project, media, analysis)
        assert api.sim.ledger.results == {(project, media, analysis): [good_result()]}
        assert api.sim.ledger.events[-1]["delivered"] is False
        assert api.sim.ledger.calls[-1]["fault"] == "drop"
        assert api.sim.ledger.calls[-1]["status"] == 201
        api.sim.set_faults(None)
        status, body = await api.result(project, media, analysis)
        assert (status, "duplicate" in body["detail"]) == (400, True)


@async_test
async def test_slow_answers_after_the_client_gave_up_and_latency_delays() -> None:
    faults = Faults(routes={"status": FaultSpec(rate_slow=1.0, slow_seconds=0.4)})
    async with running(faults=faults) as api:
        project = api.sim.add_job()["project"]["id"]
        with pytest.raises(asyncio.TimeoutError):
            await api.status(project, "processing", timeout=0.1)
        assert api.sim.ledger.statuses == {}
        for _ in range(50):
            if api.sim.ledger.statuses:
                break
            await asyncio.sleep(0.05)
        assert api.sim.ledger.statuses == {project: ["processing"]}
        assert api.sim.ledger.events[-1]["delivered"] is False

        api.sim.set_faults(Faults(routes={"status": FaultSpec(latency=0.3)}))
        started = time.monotonic()
        assert (await api.status(project, "completed"))[0] == 200
        assert time.monotonic() - started >= 0.3
        assert api.sim.ledger.events[-1]["delivered"] is True


@async_test
async def test_slow_next_job_keeps_the_job_for_a_client_that_gave_up() -> None:
    faults = Faults(routes={"next-job": FaultSpec(rate_slow=1.0, slow_seconds=0.3)})
    async with running(faults=faults) as api:
        manifest = api.sim.add_job()
        with pytest.raises(asyncio.TimeoutError):
            await api.call("GET", f"{API}/next-job", timeout=0.1)
        await asyncio.sleep(0.4)
        assert api.sim.ledger.events == []
        api.sim.set_faults(None)
        assert await api.call("GET", f"{API}/next-job") == (200, manifest)


# -- ledger.check_job ------------------------------------------------------------------------


async def play(api: Api, steps: list[str]) -> tuple[Simulator, dict[str, Any]]:
    """Make real calls for one job: processing, results, completed, report, in a given order."""
    manifest = api.sim.add_job(media=2, analyses=2)
    project = manifest["project"]["id"]
    for step in steps:
        if step in ("processing", "completed"):
            assert (await api.status(project, step))[0] == 200
        elif step == "results":
            await api.all_results(manifest)
        elif step == "results-but-last":
            await api.all_results(manifest, skip=1)
        elif step == "last-result":
            last = manifest["media"][-1]["id"], manifest["analyses"][-1]["id"]
            assert (await api.result(project, *last))[0] == 201
        elif step == "report":
            assert (await api.report(project))[0] == 201
    return api.sim, manifest


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (["processing", "results", "completed", "report"], []),
        (["processing", "results-but-last", "completed", "report"], ["1 of 4 media x analysis"]),
        (["results", "processing", "completed", "report"], ["accepted before status 'processing'"]),
        (
            ["processing", "results-but-last", "completed", "last-result", "report"],
            ["accepted before the last result"],
        ),
        (
            ["processing", "processing", "results", "completed", "report"],
            ["statuses were ['processing', 'processing', 'completed']"],
        ),
        (["processing", "results", "report"], ["statuses were ['processing']", "before status"]),
        (["processing", "results", "completed"], ["0 reports accepted"]),
        (["processing", "results", "completed", "report", "report"], ["2 reports accepted"]),
        (
            ["processing", "results", "report", "completed"],
            ["the report (event 6) was accepted before status 'completed'"],
        ),
    ],
)
def test_check_job_catches_each_violation(steps: list[str], expected: list[str]) -> None:
    async def body() -> None:
        async with running() as api:
            sim, manifest = await play(api, steps)
            problems = sim.ledger.check_job(manifest)
            assert len(problems) == len(expected), problems
            for problem, fragment in zip(problems, expected, strict=True):
                assert fragment in problem
            # the snapshot carries everything check_job needs
            assert Ledger.from_snapshot(sim.ledger.snapshot()).check_job(manifest) == problems

    asyncio.run(body())


@async_test
async def test_check_job_excuses_repeats_of_lost_answers_only() -> None:
    async with running() as api:
        manifest = api.sim.add_job(media=1, analyses=1)
        project, media, analysis = ids(manifest)
        api.sim.set_faults(Faults(routes={"status": FaultSpec(rate_drop=1.0)}))
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.status(project, "processing")
        api.sim.set_faults(None)
        assert (await api.status(project, "processing"))[0] == 200
        assert (await api.result(project, media, analysis))[0] == 201
        assert (await api.status(project, "completed"))[0] == 200
        assert (await api.report(project))[0] == 201
        # aiohttp's client itself repeats an idempotent PUT once when the connection drops,
        # so the dropped copies are one or two; all of them undelivered.
        statuses = api.sim.ledger.statuses[project]
        assert statuses[-2:] == ["processing", "completed"]
        assert set(statuses[:-2]) == {"processing"}
        lost = [e for e in api.sim.ledger.events if e["kind"] == "status" and not e["delivered"]]
        assert len(lost) == len(statuses) - 2 >= 1
        assert api.sim.ledger.check_job(manifest) == []
        # a repeat after a delivered answer is the worker's fault
        assert (await api.status(project, "completed"))[0] == 200
        assert len(api.sim.ledger.check_job(manifest)) == 1


# -- admin routes, thread, CLI ---------------------------------------------------------------


@async_test
async def test_admin_routes() -> None:
    async with running() as api:
        status, manifest = await api.call(
            "POST", "/_sim/jobs", json={"media": 2, "analyses": 3}, key=None
        )
        assert status == 200
        assert (len(manifest["media"]), len(manifest["analyses"])) == (2, 3)
        assert await api.call("GET", f"{API}/next-job") == (200, manifest)
        status, body = await api.call("POST", "/_sim/jobs", json={"media": 0}, key=None)
        assert status == 422
        assert "media" in body["detail"]

        status, _ = await api.call(
            "POST", "/_sim/faults", json={"spec": "next-job:503=1"}, key=None
        )
        assert status == 200
        assert (await api.call("GET", f"{API}/next-job"))[0] == 503
        status, body = await api.call("POST", "/_sim/faults", json={"spec": "x:1=1"}, key=None)
        assert status == 422
        assert "'x'" in body["detail"]

        status, ledger = await api.call("GET", "/_sim/ledger", key=None)
        assert status == 200
        assert [e["kind"] for e in ledger["events"]] == ["job"]
        assert [c["status"] for c in ledger["calls"]] == [200, 503]

        assert (await api.call("POST", "/_sim/revoke-key", key=None))[0] == 200
        assert (await api.call("GET", f"{API}/next-job"))[0] == 401


def _get_json(url: str, key: str) -> Any:
    import json

    request = urllib.request.Request(url, headers={"X-API-Key": key})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def test_simulator_thread_from_sync_code() -> None:
    with SimulatorThread(Simulator(KEY, seed=1)) as sim:
        manifest = sim.add_job(media=1, analyses=2)
        assert _get_json(sim.base_url + f"{API}/next-job", KEY) == manifest
        snapshot = sim.ledger_snapshot()
        assert [e["kind"] for e in snapshot["events"]] == ["job"]
        assert snapshot["calls"][0]["path"] == f"{API}/next-job"
        problems = sim.check_job(manifest)
        assert any("never accepted" in p for p in problems)
        base_url = sim.base_url
    with pytest.raises(urllib.error.URLError):
        _get_json(base_url + f"{API}/next-job", KEY)


def test_fixtures_share_the_key_with_the_environment(sim_thread: SimulatorThread) -> None:
    manifest = sim_thread.add_job()
    assert _get_json(sim_thread.base_url + f"{API}/next-job", os.environ["GOFLOW_API_KEY"]) == (
        manifest
    )


def test_cli_refuses_to_start_without_a_key_or_with_bad_faults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from goflow_gpu.simulator.__main__ import app

    monkeypatch.delenv("GOFLOW_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["--port", "0"])
    assert result.exit_code == 2
    assert "GOFLOW_API_KEY is not set" in result.output
    monkeypatch.setenv("GOFLOW_API_KEY", KEY)
    result = CliRunner().invoke(app, ["--port", "0", "--faults", "result:503=2"])
    assert result.exit_code == 2
    assert "503=2" in result.output
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "GOFLOW_API_KEY=" in help_text
    assert "--jobs 2" in help_text
    assert "ROUTE:KEY=VALUE" in help_text


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_serves_until_interrupted() -> None:
    env = {**os.environ, "GOFLOW_API_KEY": KEY}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "goflow_gpu.simulator",
            "--port",
            "0",
            "--jobs",
            "2",
            "--media",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # A shell's background job (`make test &`, some CI launchers) starts with SIGINT
        # ignored and a child inherits that: the simulator would never see the Ctrl-C below.
        preexec_fn=_default_sigint,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
        base_url = lines[0].split()[-1]
        projects = [line.split()[2] for line in lines[1:3]]
        assert lines[0].startswith("GoFlow simulator listening on http://127.0.0.1:")
        assert _get_json(base_url + f"{API}/next-job", KEY)["project"]["id"] == projects[0]
        assert KEY not in "".join(lines)
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            rest, _ = process.communicate()
            pytest.fail(f"the simulator did not stop on SIGINT within 30 s; its output: {rest!r}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "simulator stopped" in output
