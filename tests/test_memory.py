"""What the worker keeps across jobs stays bounded: ``serve`` runs for weeks, job after job.

A memory soak (tracemalloc snapshots at every job end, compared by traceback) found one structure
that grew by one entry per job without bound: :class:`~goflow_gpu.worker.WorkerResult` kept every
:class:`~goflow_gpu.job.JobOutcome` of the run. It now counts every job run and keeps only the
latest outcomes. These tests would fail with the old list.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from goflow_gpu import retry, worker
from goflow_gpu.job import JobOutcome
from goflow_gpu.service import run_worker
from goflow_gpu.settings import load_settings
from goflow_gpu.simulator import Simulator
from goflow_gpu.worker import WorkerResult
from tests.doubles import ScriptedEngine

KEY = "made-up-memory-key-5c21"


@pytest.fixture(autouse=True)
def _instant_retries(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GOFLOW_API_KEY", KEY)
    retry.set_testing(True)
    yield
    retry.set_testing(False)


def outcome(n: int, *, closed: bool = True, parked: bool = False) -> JobOutcome:
    return JobOutcome(f"project-{n}", closed, 4, 4, 0, 0.1, parked=parked)


def test_a_long_run_keeps_a_bounded_number_of_outcomes_and_counts_every_run() -> None:
    result = WorkerResult()
    # 1000 job runs, as a node would see over some weeks: every 10th paused (not closed),
    # every 100th parked.
    for n in range(1000):
        result.add(outcome(n, closed=n % 10 != 0, parked=n % 100 == 99))
    assert len(result.jobs) == 100
    assert result.jobs[0].project_id == "project-900"
    assert result.jobs[-1].project_id == "project-999"
    assert result.job_runs == 1000
    assert result.closed == 900
    assert result.parked == 10
    assert result.exit_code == 1


def test_the_exit_code_counts_a_parked_job_that_is_no_longer_kept() -> None:
    result = WorkerResult()
    result.add(outcome(0, parked=True))
    for n in range(1, 250):
        result.add(outcome(n))
    assert all(not job.parked for job in result.jobs)
    assert result.parked == 1
    assert result.exit_code == 1


def test_a_clean_run_exits_zero() -> None:
    result = WorkerResult()
    for n in range(150):
        result.add(outcome(n))
    assert (result.job_runs, result.closed, result.parked) == (150, 150, 0)
    assert result.exit_code == 0


def test_a_burst_over_several_jobs_keeps_only_the_latest_outcomes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small bound so that a quick run goes past it; the real one is the same code path.
    monkeypatch.setattr(worker, "RECENT_JOBS", 2)

    async def go() -> tuple[WorkerResult, list[str]]:
        async with Simulator(api_key=KEY, seed=7) as sim:
            manifests = [sim.add_job(media=1, analyses=2) for _ in range(5)]
            settings = load_settings(
                base_url=sim.base_url,
                state_dir=tmp_path,
                poll_interval_min=0.01,
                poll_interval_max=0.05,
            )
            result = await run_worker(
                settings, burst=True, engine=ScriptedEngine(), handle_signals=False
            )
            assert all(sim.ledger.check_job(m) == [] for m in manifests)
            return result, [m["project"]["id"] for m in manifests]

    result, projects = asyncio.run(go())
    assert result.exit_code == 0
    assert (result.job_runs, result.closed, result.parked) == (5, 5, 0)
    assert [job.project_id for job in result.jobs] == projects[-2:]
