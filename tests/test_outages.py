"""Correlated, slow faults at real timing: outages that outlast every per-call retry, answers no
list named, ids in another case, a broken catalog. Issue 11.

Unlike the chaos soak these tests do NOT make retry sleeps instant: the client's policies and the
job-level backoff are short settings, and outages are real time windows of the simulator. Every
assertion reads the backend's ledger (what it accepted, in which order) or the state store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from goflow_gpu import retry
from goflow_gpu.engines.base import InferenceRequest, InferenceResult
from goflow_gpu.errors import ConfigError, EngineError
from goflow_gpu.retry import RetryPolicy
from goflow_gpu.service import run_worker
from goflow_gpu.settings import Settings, load_settings
from goflow_gpu.simulator import Faults, FaultSpec, Simulator
from goflow_gpu.store import Store
from tests.doubles import ScriptedEngine

KEY = "made-up-outage-key-0001"

#: The contract's retry counts, with delays and timeouts short enough for a test.
SHORT = {
    name: RetryPolicy(retries=3, base=0.02, cap=0.1, timeout=2.0)
    for name in ("next-job", "status", "result", "report")
}


@pytest.fixture(autouse=True)
def _real_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOFLOW_API_KEY", KEY)
    retry.set_testing(False)  # real timing: every sleep and backoff really waits


def settings_for(sim: Simulator, state: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "base_url": sim.base_url,
        "state_dir": state,
        "poll_interval_min": 0.01,
        "poll_interval_max": 0.05,
        "outage_backoff_min": 0.1,
        "outage_backoff_max": 0.5,
        "outage_patience": 60.0,
        "media_timeout": 2.0,
        **extra,
    }
    return load_settings(**values)


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(coro_fn())


async def work(settings: Settings, engine: Any = None, **kw: Any) -> Any:
    return await run_worker(
        settings,
        burst=True,
        engine=engine or ScriptedEngine(),
        handle_signals=False,
        policies=SHORT,
        **kw,
    )


def results_of(sim: Simulator, project: str) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    return {k: v for k, v in sim.ledger.results.items() if k[0] == project.lower()}


def statuses_of(sim: Simulator, project: str) -> list[str]:
    return list(sim.ledger.statuses.get(project.lower(), []))


# -- 1. a transient failure never becomes terminal ---------------------------------------------


def test_a_result_outage_longer_than_every_retry_loses_nothing(tmp_path: Path) -> None:
    """The route is down (503, no Retry-After) for 4 s, far beyond the client's retries
    (~0.3 s): every result is accepted once, none as failed, and completed comes after."""

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=21) as sim:
            manifest = sim.add_job(media=3, analyses=4)
            project = manifest["project"]["id"]
            sim.add_outage("result", 4.0, after=3)
            started = time.monotonic()
            result = await work(settings_for(sim, tmp_path))
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            got = results_of(sim, project)
            assert len(got) == 12
            assert all(v[0]["status"] == "completed" for v in got.values())
            (window,) = sim.outages
            assert window.opened_at is not None
            assert window.closes_at is not None and window.closes_at <= time.monotonic()
            assert time.monotonic() - started >= 4.0  # it really waited the outage out
            outage_answers = [c for c in sim.ledger.calls if c.get("fault") == "outage"]
            assert len(outage_answers) >= 4  # the client's retries, then job-level probes
            (report,) = sim.ledger.reports[project]
            assert report["report"]["details"]["success_rate"] == 1.0

    run(go)


def test_run_waits_up_to_the_patience_then_exits_75_and_the_next_start_resumes(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=22) as sim:
            manifest = sim.add_job(media=2, analyses=3)
            project = manifest["project"]["id"]
            sim.add_outage("result", 3.0, after=2)
            started = time.monotonic()
            first = await work(settings_for(sim, tmp_path, outage_patience=1.0))
            waited = time.monotonic() - started
            assert first.exit_code == 75
            assert 1.0 <= waited < 3.0  # the client's retries (~0.3 s), then 1 s of patience
            assert statuses_of(sim, project) == ["processing"]  # completed waits
            with Store.open(tmp_path) as store:
                counts = store.counts(project)
                assert counts["rejected"] == 0
                assert counts["reported"] == 2
                assert counts["pending"] + counts["ready"] + counts["posting"] == 4
            while sim.outages[0].is_open():
                await asyncio.sleep(0.1)
            second = await work(settings_for(sim, tmp_path))
            assert second.exit_code == 0
            assert sim.ledger.check_job(manifest) == []

    run(go)


def test_status_and_report_outages_are_waited_out_too(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=23) as sim:
            manifest = sim.add_job(media=1, analyses=3)
            sim.add_outage("status", 1.5, after=0)  # processing waits 1.5 s
            sim.add_outage("report", 1.5, after=0, retry_after="date")
            result = await work(settings_for(sim, tmp_path))
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            assert all(w.opened_at is not None for w in sim.outages)

    run(go)


def test_a_report_outage_across_restarts_never_counts_as_a_crash_loop(tmp_path: Path) -> None:
    """Each `run` that waits out a report outage re-sends the report's intent on the next start;
    an outage is no crash loop, so the bounded re-send count starts over and nothing parks."""

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=35) as sim:
            manifest = sim.add_job(media=1, analyses=2)
            pid = manifest["project"]["id"]
            sim.add_outage("report", 600.0)
            for _ in range(2):
                result = await work(settings_for(sim, tmp_path, outage_patience=0.3))
                assert result.exit_code == 75
            with Store.open(tmp_path) as store:
                job = store.job(pid)
                assert job is not None and job.report == "intent"
                assert job.put_resends == 0
                assert not job.parked

    run(go)


# -- 3. images -----------------------------------------------------------------------------------


def test_an_image_host_outage_fails_no_combination(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=24) as sim:
            manifest = sim.add_job(media=3, analyses=2)
            project = manifest["project"]["id"]
            sim.add_outage("media", 3.0)  # the image CDN is down from the start
            result = await work(settings_for(sim, tmp_path))
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            bodies = [v[0] for v in results_of(sim, project).values()]
            assert [b["status"] for b in bodies] == ["completed"] * 6
            assert any(c.get("fault") == "outage" for c in sim.ledger.calls)

    run(go)


def test_a_permanent_image_failure_still_fails_its_combinations(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=25) as sim:
            manifest = sim.add_job(media=2, analyses=2, media_faults={0: "404"})
            project = manifest["project"]["id"]
            result = await work(settings_for(sim, tmp_path))
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            bodies = sorted(v[0]["status"] for v in results_of(sim, project).values())
            assert bodies == ["completed", "completed", "failed", "failed"]

    run(go)


# -- 2. unexpected 4xx: the next job always runs --------------------------------------------------


def test_a_409_on_one_result_refuses_that_one_and_the_next_job_runs(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=26) as sim:
            first = sim.add_job(media=2, analyses=2)
            second = sim.add_job(media=1, analyses=2)
            locked_media = first["media"][1]["id"]
            locked_analysis = first["analyses"][0]["id"]
            sim.fix_answer(
                "result",
                409,
                "locked by a reviewer",
                media_id=locked_media,
                analysis_id=locked_analysis,
            )
            result = await work(settings_for(sim, tmp_path))
            assert result.exit_code == 0
            assert result.closed == 2
            project = first["project"]["id"]
            assert len(results_of(sim, project)) == 3  # the locked one is refused, visibly
            assert statuses_of(sim, project) == ["processing", "completed"]
            (report,) = sim.ledger.reports[project]
            (failure,) = report["report"]["details"]["failures"]
            assert failure["http_status"] == 409
            assert failure["server_detail"] == "locked by a reviewer"
            assert failure["media_id"] == locked_media
            assert sim.ledger.check_job(second) == []

    run(go)


@pytest.mark.parametrize("status", [400, 410, 422])
def test_a_refused_report_parks_the_job_the_next_runs_and_nothing_loops(
    tmp_path: Path, status: int
) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=27) as sim:
            parked = sim.add_job(media=1, analyses=2)
            healthy = sim.add_job(media=1, analyses=2)
            pid = parked["project"]["id"]
            sim.fix_answer("report", status, "report validation failed: summary too long", times=1)
            result = await work(settings_for(sim, tmp_path))
            assert result.parked == 1 and result.exit_code == 1
            assert sim.ledger.check_job(healthy) == []
            assert statuses_of(sim, pid) == ["processing", "completed"]
            report_puts = [c for c in sim.ledger.calls if c["route"] == "report"]
            assert len(report_puts) == 2  # the refused one (not retried) and the healthy job's
            # Further starts do not resume a parked job by themselves.
            again = await work(settings_for(sim, tmp_path))
            assert again.exit_code == 0 and again.job_runs == 0
            assert len([c for c in sim.ledger.calls if c["route"] == "report"]) == 2
            # The backend offers the parked job again: skipped (nothing sent), not a hot loop.
            sim.reoffer(pid)
            polls_before = sum(1 for c in sim.ledger.calls if c["route"] == "next-job")
            offered = await work(settings_for(sim, tmp_path))
            assert offered.skipped == 1 and offered.exit_code == 1
            polls = sum(1 for c in sim.ledger.calls if c["route"] == "next-job") - polls_before
            assert polls == 1
            assert statuses_of(sim, pid) == ["processing", "completed"]
            with Store.open(tmp_path) as store:
                (job,) = store.parked_jobs()
                assert job.project_id == pid
                assert job.attention is not None
                assert f"HTTP {status}" in job.attention and "summary too long" in job.attention
                store.rearm_job(pid)  # what `goflow-gpu state retry` does
            rearmed = await work(settings_for(sim, tmp_path))
            assert rearmed.exit_code == 0 and rearmed.closed == 1
            assert sim.ledger.check_job(parked) == []
            assert statuses_of(sim, pid) == ["processing", "completed"]  # still two

    run(go)


def test_a_409_on_a_status_put_counts_as_sent(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=28) as sim:
            manifest = sim.add_job(media=1, analyses=2)
            pid = manifest["project"]["id"]
            sim.fix_answer("status", 409, "status already set", times=1, accept=True)
            result = await work(settings_for(sim, tmp_path))
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            status_puts = [c for c in sim.ledger.calls if c["route"] == "status"]
            assert len(status_puts) == 2
            assert statuses_of(sim, pid) == ["processing", "completed"]

    run(go)


# -- 5/6. ids in upper case, a closed job offered again ------------------------------------------


def test_upper_case_ids_and_a_re_offered_closed_job_are_handled_canonically(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=29, upper_ids=True, reoffer_closed=True) as sim:
            manifest = sim.add_job(media=2, analyses=2)
            pid = manifest["project"]["id"]
            assert pid == pid.upper() and pid != pid.lower()
            result = await work(settings_for(sim, tmp_path))
            assert result.closed == 1
            assert result.skipped == 1  # the re-offer: logged, nothing sent
            assert sim.ledger.check_job(manifest) == []
            api_paths = [c["path"] for c in sim.ledger.calls if c["route"] in ("status", "result")]
            assert api_paths and all(pid in path for path in api_paths)  # the server's spelling
            calls = len(sim.ledger.calls)
            sim.reoffer(pid, upper=False)  # and in lower case, on another start
            again = await work(settings_for(sim, tmp_path))
            assert again.skipped == 1 and again.exit_code == 1
            # One poll got the closed job; burst mode stops there instead of asking again.
            assert [c["route"] for c in sim.ledger.calls[calls:]] == ["next-job"]
        with Store.open(tmp_path) as store:
            (job,) = store.jobs()
            assert job.project_id == pid.lower() and job.state == "closed"

    run(go)


# -- 7. duplicate answers by meaning --------------------------------------------------------------


def test_a_dropped_answer_then_an_unfamiliar_duplicate_wording_counts_as_landed(
    tmp_path: Path,
) -> None:
    wording = "analysis result for this media and analysis has already been submitted"
    faults = Faults(seed=4, routes={"result": FaultSpec(rate_drop=0.3)})

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=30, faults=faults, duplicate_detail=wording) as sim:
            manifest = sim.add_job(media=4, analyses=4)
            project = manifest["project"]["id"]
            result = await work(settings_for(sim, tmp_path))
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            drops = [c for c in sim.ledger.calls if c.get("fault") == "drop"]
            assert drops  # answers really were lost after the backend stored the result
            (report,) = sim.ledger.reports[project]
            # The report says what the backend holds: all 16, none "refused as duplicate".
            assert report["report"]["details"]["total_analyses_completed"] == 16

    run(go)


# -- 4. engine failures are not QA failures -------------------------------------------------------


class FlakyEngine(ScriptedEngine):
    """Fails the first try of every request with an engine error, then answers."""

    def __init__(self, fail_always: set[str] | None = None) -> None:
        super().__init__()
        self.tries: dict[str, int] = {}
        self.fail_always = fail_always or set()

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        slug_key = request.request_id
        self.tries[slug_key] = self.tries.get(slug_key, 0) + 1
        if self.tries[slug_key] == 1 or request.group_key[0] in self.fail_always:
            self.history.append(request)
            return InferenceResult(request.request_id, "", "error", error="CUDA hiccup")
        return await super().infer(request)


def test_an_engine_error_uses_no_qa_attempt_and_never_reaches_the_model(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=31) as sim:
            manifest = sim.add_job(media=2, analyses=2)
            project = manifest["project"]["id"]
            broken_media = manifest["media"][1]["id"]
            engine = FlakyEngine(fail_always={broken_media})
            result = await work(settings_for(sim, tmp_path, qa_retries=0), engine=engine)
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            assert all("engine" not in r.user_prompt.lower() for r in engine.history)
            bodies = {k[1:]: v[0] for k, v in results_of(sim, project).items()}
            # qa_retries=0 leaves one QA attempt: the engine's failed try did not use it.
            good = [b for (m, _), b in bodies.items() if m != broken_media]
            assert [b["status"] for b in good] == ["completed", "completed"]
            broken = [b for (m, _), b in bodies.items() if m == broken_media]
            assert [b["status"] for b in broken] == ["failed", "failed"]
            assert all(b["analysisResult"]["error"] == "engine_error" for b in broken)
            with Store.open(tmp_path) as store:
                assert all(row.attempts == 0 for row in store.combos(project))

    run(go)


class DeadEngine(ScriptedEngine):
    async def infer(self, request: InferenceRequest) -> InferenceResult:
        raise EngineError("the vLLM engine died: core process exited")


def test_a_dead_engine_stops_the_job_resumably(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=32) as sim:
            manifest = sim.add_job(media=1, analyses=2)
            with pytest.raises(EngineError, match="died"):
                await work(settings_for(sim, tmp_path), engine=DeadEngine())
            assert results_of(sim, manifest["project"]["id"]) == {}
            result = await work(settings_for(sim, tmp_path))
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []

    run(go)


# -- 8. nothing may fail between next-job and the job being stored --------------------------------


def test_a_broken_catalog_stops_the_start_before_any_job_is_taken(tmp_path: Path) -> None:
    catalog = tmp_path / "prompts"
    catalog.mkdir()
    (catalog / "object-detection.yaml").write_text("slug: object-detection\nversion: [oops\n")

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=33) as sim:
            sim.add_job(media=1, analyses=2)
            with pytest.raises(ConfigError, match="prompt catalog"):
                await work(settings_for(sim, tmp_path / "state", prompts_dir=catalog))
            assert sim.ledger.calls == []  # nothing was taken from the backend

    run(go)


def test_a_failure_after_next_job_keeps_the_job_as_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from goflow_gpu import worker

    def broken_plan(*args: Any) -> Any:
        raise KeyError("variant")

    monkeypatch.setattr(worker, "plan_job", broken_plan)

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=34) as sim:
            manifest = sim.add_job(media=1, analyses=2)
            result = await work(settings_for(sim, tmp_path))
            assert result.skipped == 1
        with Store.open(tmp_path) as store:
            (kept,) = store.rejected_manifests()
            assert kept["raw"]["project"]["id"] == manifest["project"]["id"]
            assert "KeyError" in kept["error"]

    run(go)


# -- 5. bounded drain: SIGTERM to a real `serve` process ------------------------------------------

HARNESS = Path(__file__).with_name("crash_worker.py")


@pytest.mark.parametrize(
    ("drain_timeout", "outage", "limit"),
    [
        (20.0, True, 20.0 + 5.0),  # the bound: drain_timeout + 5 s, during an outage
        (1.0, False, 3.0),  # shorter than one 3 s request: in-flight requests are aborted
    ],
)
def test_sigterm_with_64_slow_requests_in_flight_exits_0_in_bounded_time(
    tmp_path: Path, drain_timeout: float, outage: bool, limit: float
) -> None:
    import os
    import signal
    import subprocess
    import sys

    from goflow_gpu.simulator import SimulatorThread

    env = dict(
        os.environ,
        GOFLOW_API_KEY=KEY,
        ENGINE_DELAY="3",  # a 3 s-per-request model
        ENGINE_SLOTS="64",
        REAL_SLEEPS="1",
        GOFLOW_MAX_IN_FLIGHT="64",
        GOFLOW_DRAIN_TIMEOUT=str(drain_timeout),
        GOFLOW_OUTAGE_BACKOFF_MIN="2",
        GOFLOW_LOG_FORMAT="json",
    )
    with SimulatorThread(Simulator(api_key=KEY, seed=40)) as sim:
        manifest = sim.add_job(media=4, analyses=25)
        project = manifest["project"]["id"]
        if outage:
            sim.add_outage("result", 600.0)  # the backend's result route is down throughout
        command = [sys.executable, str(HARNESS), "cli", "serve"]
        command += ["--base-url", sim.base_url, "--state-dir", str(tmp_path)]
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while not sim.ledger_snapshot()["statuses"].get(project):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)  # the 64 slots are busy with 3 s requests now
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - signalled
        print(f"drain: exit {proc.returncode} {took:.2f} s after SIGTERM (limit {limit} s)")
        assert proc.returncode == 0, stderr[-3000:]
        assert took < limit, f"drain took {took:.1f} s (limit {limit} s)"
        snapshot = sim.ledger_snapshot()
        assert snapshot["statuses"][project] == ["processing"]
        accepted = [v for k, v in snapshot["results"].items() if k.startswith(project)]
        assert all(body["status"] == "completed" for bodies in accepted for body in bodies)
        if outage:
            assert accepted == []
    with Store.open(tmp_path) as store:
        counts = store.counts(project)
        assert counts["rejected"] == 0
        rows = store.combos(project)
        assert all(row.attempts == 0 for row in rows)  # no aborted request used a QA attempt
        if outage:
            # Every in-flight request finished and its verdict is kept for the next start.
            assert counts["ready"] + counts["posting"] >= 64
        else:
            assert counts["ready"] + counts["posting"] + counts["reported"] == 0
            assert counts["pending"] == 100  # aborted requests left their rows untouched
