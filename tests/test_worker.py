"""Full jobs through the real worker against the simulator, with a scripted engine.

Every assertion reads the world after the run: the simulator's ledger (what the backend
accepted, in which order) and the rows of the state store.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from goflow_gpu import retry
from goflow_gpu.client import GoFlowClient
from goflow_gpu.engines.base import InferenceRequest
from goflow_gpu.errors import AuthenticationError
from goflow_gpu.media import MediaFetcher, MediaLimits
from goflow_gpu.service import job_options, run_worker
from goflow_gpu.settings import Settings, load_settings
from goflow_gpu.simulator import Faults, FaultSpec, Simulator
from goflow_gpu.store import Store
from goflow_gpu.worker import Worker
from tests.doubles import ScriptedEngine

KEY = "made-up-worker-key-0001"


@pytest.fixture(autouse=True)
def _instant_retries(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GOFLOW_API_KEY", KEY)
    retry.set_testing(True)
    yield
    retry.set_testing(False)


def settings_for(sim: Simulator, state: Path, **extra: Any) -> Settings:
    return load_settings(
        base_url=sim.base_url,
        state_dir=state,
        poll_interval_min=0.01,
        poll_interval_max=0.05,
        **{"outage_patience": 30.0, **extra},  # a bug must not hang a test for 10 minutes
    )


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(coro_fn())


def accepted(sim: Simulator, project: str) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    return {k: v for k, v in sim.ledger.results.items() if k[0] == project}


@pytest.mark.parametrize(("media", "analyses"), [(1, 1), (15, 20), (20, 25)])
def test_full_job_reported_exactly_once(tmp_path: Path, media: int, analyses: int) -> None:
    async def go() -> None:
        engine = ScriptedEngine()
        async with Simulator(api_key=KEY, seed=media) as sim:
            manifest = sim.add_job(media=media, analyses=analyses)
            result = await run_worker(
                settings_for(sim, tmp_path), burst=True, engine=engine, handle_signals=False
            )
            project = manifest["project"]["id"]
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            got = accepted(sim, project)
            assert len(got) == media * analyses
            assert all(len(v) == 1 and v[0]["status"] == "completed" for v in got.values())
            assert sim.ledger.statuses[project] == ["processing", "completed"]
            (report,) = sim.ledger.reports[project]
            details = report["report"]["details"]
            assert details["total_analyses_completed"] == media * analyses
            assert details["total_media_processed"] == media
            assert details["success_rate"] == 1.0
            # media-major: all analyses of the first image were asked before the second image
            # (first asks; a QA re-ask comes when its answer failed, after others started)
            firsts = [r for r in engine.history if r.request_id.endswith(":1")]
            first_media = [r.group_key[0] for r in firsts[:analyses]]
            assert len(set(first_media)) == 1
            # every body carries the exact prompts and the model label
            body = next(iter(got.values()))[0]
            assert body["modelUsed"] == "scripted-test-engine"
            assert body["systemPromptUsed"] and body["userPromptUsed"]
            assert "processing_time_seconds" in body["analysisResult"]
            # boxes reach the wire as the contract's bounding_box, never the model's bbox_2d
            results = [v[0]["analysisResult"] for v in got.values()]
            assert not any("bbox_2d" in json.dumps(r) for r in results)
            boxes = [o["bounding_box"] for r in results for o in r.get("objects_detected", [])]
            assert boxes and all(set(b) == {"x", "y", "width", "height"} for b in boxes)
        assert not (tmp_path / "media" / project).exists()  # a closed job's images are removed
        with Store.open(tmp_path) as store:
            job = store.job(project)
            assert job is not None and job.state == "closed"
            assert store.counts(project) == {
                "pending": 0,
                "ready": 0,
                "posting": 0,
                "reported": media * analyses,
                "rejected": 0,
            }

    run(go)


def test_faults_during_a_20x25_job_keep_exactly_once(tmp_path: Path) -> None:
    faults = Faults(
        seed=3,
        routes={
            "result": FaultSpec(
                rate_503=0.10, rate_429=0.05, rate_reset=0.03, rate_drop=0.02, retry_after="1"
            ),
            "status": FaultSpec(rate_503=0.2, rate_drop=0.2),
            "report": FaultSpec(rate_500=0.3, rate_reset=0.2),
            "next-job": FaultSpec(rate_503=0.2),
        },
    )

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=5, faults=faults) as sim:
            manifest = sim.add_job(media=20, analyses=25)
            result = await run_worker(
                settings_for(sim, tmp_path),
                burst=True,
                engine=ScriptedEngine(),
                handle_signals=False,
            )
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            injected = [c for c in sim.ledger.calls if c.get("fault")]
            assert len(injected) > 30  # the faults really happened
            assert any(c["fault"] == "drop" for c in injected)

    run(go)


def test_media_faults_fail_their_combinations_and_the_rest_completes(tmp_path: Path) -> None:
    # Permanent faults only: a cut connection ("truncated") is transient and waited out.
    media_faults = {0: "404", 1: "html", 2: "corrupt", 3: "bomb", 4: "oversized"}

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=9) as sim:
            manifest = sim.add_job(media=6, analyses=3, media_faults=media_faults)
            settings = settings_for(sim, tmp_path, max_image_bytes=5 * 1024 * 1024)
            await run_worker(settings, burst=True, engine=ScriptedEngine(), handle_signals=False)
            assert sim.ledger.check_job(manifest) == []
            project = manifest["project"]["id"]
            ids = [m["id"] for m in manifest["media"]]
            got = accepted(sim, project)
            expected_words = {0: "404", 1: "text/html", 2: "corrupt", 3: "pixel", 4: "bytes"}
            for index, word in expected_words.items():
                bodies = [v[0] for k, v in got.items() if k[1] == ids[index]]
                assert len(bodies) == 3
                for body in bodies:
                    assert body["status"] == "failed"
                    reasons = " ".join(body["analysisResult"]["reasons"]).lower()
                    assert word in reasons
            healthy = [v[0] for k, v in got.items() if k[1] == ids[5]]
            assert [b["status"] for b in healthy] == ["completed"] * 3
            details = sim.ledger.reports[project][0]["report"]["details"]
            assert details["total_analyses_completed"] == 3
            assert len(details["failures"]) == 15

    run(go)


def test_qa_failure_is_retried_with_reasons_then_reported_failed(tmp_path: Path) -> None:
    asked: dict[str, int] = {}

    def script(request: InferenceRequest) -> str | None:
        schema = json.dumps(request.json_schema)
        if "objects_detected" in schema:
            return "I think there is a car."  # never JSON: fails every attempt
        asked[schema] = asked.get(schema, 0) + 1
        if asked[schema] == 1:
            return '{"nonsense": true}'  # the first attempt fails the schema
        return None  # the retry gets it right

    async def go() -> None:
        engine = ScriptedEngine(script=script)
        async with Simulator(api_key=KEY, seed=2) as sim:
            manifest = sim.add_job(media=1, analyses=2)  # object-detection, text-recognition
            await run_worker(
                settings_for(sim, tmp_path, qa_retries=2),
                burst=True,
                engine=engine,
                handle_signals=False,
            )
            assert sim.ledger.check_job(manifest) == []
            project = manifest["project"]["id"]
            by_slug = {a["id"]: a["slug"] for a in manifest["analyses"]}
            bodies = {by_slug[k[2]]: v[0] for k, v in accepted(sim, project).items()}
            failed = bodies["object-detection"]
            assert failed["status"] == "failed"
            assert bodies["text-recognition"]["status"] == "completed"
            assert failed["analysisResult"]["attempts"] == 3
            assert any("json" in r.lower() for r in failed["analysisResult"]["reasons"])
            per_analysis = sim.ledger.reports[project][0]["report"]["details"]["per_analysis"]
            # 2 re-asks that never passed; 1 re-ask that passed (counted too).
            assert per_analysis["object-detection"]["qa_retries"] == 2
            assert per_analysis["object-detection"]["passed_after_retry"] == 0
            assert per_analysis["text-recognition"]["qa_retries"] == 1
            assert per_analysis["text-recognition"]["passed_after_retry"] == 1
        asked = [r for r in engine.history if "objects_detected" in json.dumps(r.json_schema)]
        assert len(asked) == 3  # 1 + 2 retries
        assert asked[0].user_prompt != asked[1].user_prompt  # reasons appended
        with Store.open(tmp_path) as store:
            rows = [r for r in store.combos(project) if r.plan.slug == "object-detection"]
            assert len(rows[0].reasons) == 3

    run(go)


def test_invalid_manifest_is_skipped_kept_and_the_next_job_runs(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY) as sim:
            sim.add_raw_job({"client": {"id": "nope"}, "project": {}, "media": [], "analyses": []})
            manifest = sim.add_job(media=1, analyses=2)
            result = await run_worker(
                settings_for(sim, tmp_path),
                burst=True,
                engine=ScriptedEngine(),
                handle_signals=False,
            )
            assert result.skipped == 1 and result.exit_code == 1
            assert sim.ledger.check_job(manifest) == []
        with Store.open(tmp_path) as store:
            (kept,) = store.rejected_manifests()
            assert "client.id" in json.dumps(kept)

    run(go)


def test_401_mid_job_stops_keeps_state_and_resumes_exactly_once(tmp_path: Path) -> None:
    async def go() -> None:
        sim = Simulator(api_key=KEY, seed=4)
        async with sim:
            manifest = sim.add_job(media=3, analyses=4)
            calls = 0

            def script(request: InferenceRequest) -> str | None:
                nonlocal calls
                calls += 1
                if calls == 5:
                    sim.revoke_key()
                return None

            with pytest.raises(AuthenticationError):
                await run_worker(
                    settings_for(sim, tmp_path),
                    burst=True,
                    engine=ScriptedEngine(script=script, slots=1),
                    handle_signals=False,
                )
            project = manifest["project"]["id"]
            assert len(accepted(sim, project)) < 12
            sim.restore_key()
            await run_worker(
                settings_for(sim, tmp_path),
                burst=True,
                engine=ScriptedEngine(),
                handle_signals=False,
            )
            assert sim.ledger.check_job(manifest) == []

    run(go)


def test_drain_leaves_an_open_job_that_the_next_start_finishes(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=6) as sim:
            manifest = sim.add_job(media=4, analyses=5)
            project = manifest["project"]["id"]
            settings = settings_for(sim, tmp_path)
            engine = ScriptedEngine(delay=0.02, slots=2)
            stop = asyncio.Event()  # what SIGTERM sets in `serve`
            task = asyncio.create_task(
                run_worker(settings, burst=True, engine=engine, handle_signals=False, stop=stop)
            )
            while len(accepted(sim, project)) < 3:
                await asyncio.sleep(0.01)
            stop.set()
            result = await task
            assert result.drained and result.exit_code == 0
            partial = len(accepted(sim, project))
            assert 3 <= partial < 20
            assert sim.ledger.statuses[project] == ["processing"]
            await run_worker(settings, burst=True, engine=ScriptedEngine(), handle_signals=False)
            assert sim.ledger.check_job(manifest) == []

    run(go)


def test_a_project_the_backend_forgot_is_parked_and_the_next_job_runs(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=13) as sim:
            forgotten = sim.add_job(media=2, analyses=3)
            healthy = sim.add_job(media=1, analyses=2)
            gone = forgotten["project"]["id"]

            def script(request: InferenceRequest) -> str | None:
                sim.forget_project(gone)  # deleted upstream while we work on it
                return None

            engine = ScriptedEngine(script=script)
            result = await run_worker(
                settings_for(sim, tmp_path), burst=True, engine=engine, handle_signals=False
            )
            assert [job.parked for job in result.jobs] == [True, False]
            assert result.exit_code == 1
            assert sim.ledger.check_job(healthy) == []
            assert not sim.ledger.reports.get(gone)
        with Store.open(tmp_path) as store:
            job = store.job(gone)
            assert job is not None
            assert job.parked and job.attention is not None and "HTTP 404" in job.attention
            assert store.unfinished_jobs() == []  # not resumed first on every start

    run(go)


def test_a_result_route_that_stays_down_is_never_given_up_run_exits_75_and_resumes(
    tmp_path: Path,
) -> None:
    faults = Faults(seed=1, routes={"result": FaultSpec(rate_503=1.0)})

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=14, faults=faults) as sim:
            manifest = sim.add_job(media=1, analyses=2)
            project = manifest["project"]["id"]
            settings = settings_for(sim, tmp_path, outage_patience=0.3, outage_backoff_min=0.05)
            result = await run_worker(
                settings, burst=True, engine=ScriptedEngine(), handle_signals=False
            )
            assert result.exit_code == 75  # EX_TEMPFAIL: try again later
            assert result.unfinished == 1
            assert accepted(sim, project) == {}
            assert sim.ledger.statuses[project] == ["processing"]  # no "completed" yet
            assert not sim.ledger.reports.get(project)
            with Store.open(tmp_path) as store:
                counts = store.counts(project)
                assert counts["rejected"] == 0 and counts["reported"] == 0
                assert counts["posting"] == 2  # kept, outcome unknown
            sim.set_faults(None)  # the backend is back
            again = await run_worker(
                settings, burst=True, engine=ScriptedEngine(), handle_signals=False
            )
            assert again.exit_code == 0
            assert sim.ledger.check_job(manifest) == []

    run(go)


def test_an_answer_qa_cannot_check_fails_that_combination_not_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from goflow_gpu import job as job_module
    from goflow_gpu.prompts.qa import judge as real_judge

    def fragile_judge(result: Any, *args: Any, **kwargs: Any) -> Any:
        if result.text == "boom":
            raise RecursionError("maximum recursion depth exceeded")
        return real_judge(result, *args, **kwargs)

    monkeypatch.setattr(job_module, "judge", fragile_judge)
    calls = 0

    def script(request: InferenceRequest) -> str | None:
        nonlocal calls
        calls += 1
        return "boom" if calls == 1 else None

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=15) as sim:
            manifest = sim.add_job(media=1, analyses=2)
            result = await run_worker(
                settings_for(sim, tmp_path, qa_retries=0),
                burst=True,
                engine=ScriptedEngine(script=script, slots=1),
                handle_signals=False,
            )
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            bodies = [v[0] for v in accepted(sim, manifest["project"]["id"]).values()]
            assert sorted(b["status"] for b in bodies) == ["completed", "failed"]
            failed = next(b for b in bodies if b["status"] == "failed")
            assert failed["analysisResult"]["reasons"] == ["qa error: RecursionError"]

    run(go)


def test_a_job_offered_again_after_it_was_closed_is_not_run_twice(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=16) as sim:
            manifest = sim.add_job(media=1, analyses=2)
            project = manifest["project"]["id"]
            first = await run_worker(
                settings_for(sim, tmp_path),
                burst=True,
                engine=ScriptedEngine(),
                handle_signals=False,
            )
            assert first.exit_code == 0
            calls_before = len(sim.ledger.calls)
            sim.add_raw_job(manifest)  # the backend hands out the finished job again
            again = await run_worker(
                settings_for(sim, tmp_path),
                burst=True,
                engine=ScriptedEngine(),
                handle_signals=False,
            )
            assert again.skipped == 1
            assert again.exit_code == 1
            new_calls = sim.ledger.calls[calls_before:]
            assert [c["route"] for c in new_calls] == ["next-job"]  # nothing sent for it
            assert sim.ledger.check_job(manifest) == []
            assert sim.ledger.statuses[project] == ["processing", "completed"]

    run(go)


class _TopOfRange(random.Random):
    """Draws the top of every jitter range, so the backoff's ceilings show as they are."""

    def uniform(self, a: float, b: float) -> float:
        return b


class _BottomOfRange(random.Random):
    """Draws the bottom of every jitter range (0 s): the poll_min floor must hold."""

    def uniform(self, a: float, b: float) -> float:
        return a


@pytest.mark.parametrize(
    ("rng", "expected"),
    [
        # Doubling from poll_min (2 s) up to poll_max (60 s), as the retry module's schedule.
        (_TopOfRange(), [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
        # Full jitter may draw 0 s; an idle worker still waits poll_min between polls.
        (_BottomOfRange(), [2.0] * 7),
    ],
)
def test_idle_polls_back_off_on_the_retry_schedule(
    tmp_path: Path, rng: random.Random, expected: list[float]
) -> None:
    async def go() -> list[float]:
        slept: list[float] = []
        stopping = asyncio.Event()

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            if len(slept) == len(expected):
                stopping.set()  # SIGTERM after the last expected pause

        async with Simulator(api_key=KEY, seed=0) as sim:  # no job queued: every poll is 404
            settings = settings_for(sim, tmp_path)
            engine = ScriptedEngine()
            with Store.open(tmp_path) as store:
                async with GoFlowClient(sim.base_url, SecretStr(KEY)) as client:
                    fetcher = MediaFetcher(
                        store, MediaLimits(max_bytes=1 << 20, max_pixels=1 << 20)
                    )
                    worker = Worker(
                        store=store,
                        client=client,
                        engine=engine,
                        fetcher=fetcher,
                        options=job_options(settings, engine, burst=False),
                        poll_min=2.0,
                        poll_max=60.0,
                        sleep=sleep,
                        rng=rng,
                        stopping=stopping,
                    )
                    try:
                        result = await worker.run(burst=False)
                    finally:
                        await fetcher.close()
            assert result.drained and result.job_runs == 0
            polls = [c for c in sim.ledger.calls if c["route"] == "next-job"]
            assert len(polls) == len(expected)  # one poll before each pause
        return slept

    assert run(go) == expected
