"""Chaos soak: several 20 x 25 jobs in a row through the real worker against ONE faulty simulator.

On the result route, all at once: 10% 503, 5% 429 with Retry-After, 3% connection resets, 2%
answers slower than the client's timeout and 2% accept-then-drop, and in every job one
correlated outage (the route answers 503 for 1.5 s, far past the client's retries); plus faults
on next-job, status and report. The invariants are read from the simulator's ledger (what the backend
accepted, in which order), never from the worker's own account:

- every media x analysis combination accepted exactly once, nothing else accepted;
- statuses exactly ``processing`` then ``completed``; one report, after every result;
- exit code 0, every job closed; no ERROR log record, no traceback, no unraisable exception;
- the worker's traced memory grows by less than :data:`MEMORY_BOUND_PER_JOB` per job between
  the end of job 1 and the end of the last job. The simulator runs as a child process (``goflow-gpu simulate``)
  so that its ledger, which keeps every accepted body by design, is not counted.

The client's timeouts are shortened through ``run_worker(policies=...)`` so that a "slow" answer
costs half a second instead of the production 30 s; backoff sleeps are instant
(``retry.set_testing``), while the delays are still computed and counted.

CI runs 3 jobs; ``pytest -m slow tests/test_chaos.py`` runs the 10-job soak. Each run prints its
figures (``-s`` shows them): calls, injected faults by kind, retries by cause, wall time, memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from goflow_gpu import retry
from goflow_gpu.engines.base import InferenceRequest, InferenceResult
from goflow_gpu.events import Event, Events
from goflow_gpu.service import run_worker
from goflow_gpu.settings import load_settings
from goflow_gpu.simulator import Ledger
from tests.doubles import ScriptedEngine

KEY = "made-up-chaos-key-7f3a"
MEDIA, ANALYSES = 20, 25
#: Client timeout per attempt in the soak; a "slow" answer takes 1 s, well past it.
CLIENT_TIMEOUT = 0.5
#: Allowed growth of the worker's traced memory per job, from the end of job 1 to the end of the
#: last job (measured: about 0.35 MiB per job over 3 jobs, 0.3 over 10).
MEMORY_BOUND_PER_JOB = 1024 * 1024
SEED = 11

# The simulator's --faults syntax (see `goflow-gpu simulate --help`). Slow answers only where a
# late copy cannot be recorded twice: the simulator refuses a second result (duplicate-400) and
# keeps a next-job for a client that gave up, but would record a late status or report again,
# which would say nothing about the worker.
CHAOS = ";".join(
    [
        "result:503=0.10,429=0.05,reset=0.03,slow=0.02,drop=0.02,retry-after=1,slow-seconds=1",
        "status:503=0.10,429=0.05,reset=0.05,drop=0.05",
        "report:500=0.15,429=0.05,reset=0.10,drop=0.10",
        "next-job:503=0.10,429=0.05,reset=0.05,slow=0.05,slow-seconds=1",
    ]
)
#: Seconds of each job's result-route outage (503 without Retry-After), far past the client's
#: retries, so the job-level backoff has to wait it out.
OUTAGE_SECONDS = 1.5


def outages(jobs: int) -> list[str]:
    """One result-route outage per job, opening 200 results into each job."""
    per_job = MEDIA * ANALYSES
    return [f"result:{OUTAGE_SECONDS}:after={job * per_job + 200}" for job in range(jobs)]


SHORT_TIMEOUTS = {
    name: dataclasses.replace(policy, timeout=CLIENT_TIMEOUT)
    for name, policy in retry.POLICIES.items()
}


class SimulatorProcess:
    """``goflow-gpu simulate`` in a child process, so its ledger does not count as the worker's
    memory; jobs are queued and the ledger read through its admin routes."""

    def __init__(self, faults: str, seed: int, log: Path, outages: list[str] | None = None) -> None:
        command = [sys.executable, "-m", "goflow_gpu.simulator", "--port", "0", "--jobs", "0"]
        command += ["--faults", faults, "--seed", str(seed)]
        for outage in outages or []:
            command += ["--outage", outage]
        env = {**os.environ, "GOFLOW_API_KEY": KEY}
        # stderr to a file: a pipe nobody reads could fill up and stall the simulator.
        with log.open("wb") as errors:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env
            )
        assert self.process.stdout is not None
        first = self.process.stdout.readline()
        if not first.startswith("GoFlow simulator listening on "):
            self.stop()
            raise AssertionError(f"simulator did not start: {first}{log.read_text()}")
        self.base_url = first.split()[-1]

    def _admin(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base_url + path, data=data, method="POST" if data else "GET"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def add_job(self) -> dict[str, Any]:
        manifest: dict[str, Any] = self._admin("/_sim/jobs", {"media": MEDIA, "analyses": ANALYSES})
        return manifest

    def ledger(self) -> Ledger:
        return Ledger.from_snapshot(self._admin("/_sim/ledger"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()


@dataclass
class Figures:
    """What one soak did, for the assertions and the printed summary."""

    jobs: int
    wall_seconds: float
    calls: Counter[str]
    faults: Counter[str]
    retries: Counter[str]
    exhausted: Counter[str]
    memory_at_job_end: list[int]
    problems: dict[str, list[str]]
    exit_code: int
    closed: int
    bad_records: list[str] = field(default_factory=list)

    @property
    def memory_bound(self) -> int:
        return MEMORY_BOUND_PER_JOB * (self.jobs - 1)

    def summary(self) -> str:
        growth = self.memory_at_job_end[-1] - self.memory_at_job_end[0]
        return "\n".join(
            [
                f"chaos soak: {self.jobs} jobs of {MEDIA}x{ANALYSES} in {self.wall_seconds:.1f} s",
                f"  calls by route: {dict(sorted(self.calls.items()))}",
                f"  injected faults by kind: {dict(sorted(self.faults.items()))}",
                f"  retries by cause: {dict(sorted(self.retries.items()))}",
                f"  client retries exhausted by endpoint: {dict(sorted(self.exhausted.items()))}",
                "  worker traced memory at each job end (MiB): "
                + ", ".join(f"{m / 2**20:.1f}" for m in self.memory_at_job_end),
                f"  growth job 1 -> job {self.jobs}: {growth / 2**20:.2f} MiB "
                f"(bound {self.memory_bound / 2**20:.0f} MiB)",
            ]
        )


class _ForgetfulEngine(ScriptedEngine):
    """The scripted engine without its request history, which would grow with every job."""

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        result = await super().infer(request)
        self.history.clear()
        return result


class _Recorder(logging.Handler):
    """Keeps every WARNING-or-worse record that is an error or carries a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.bad: list[str] = []
        self.warnings = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.warnings += 1
        text = record.getMessage()
        if record.exc_info or record.levelno >= logging.ERROR or "Traceback" in text:
            self.bad.append(f"{record.levelname} {record.name}: {text}")


def soak(tmp_path: Path, jobs: int) -> Figures:
    """Queue ``jobs`` jobs on one faulty simulator and run the worker in burst mode over them."""
    recorder = _Recorder()
    root = logging.getLogger()
    memory: list[int] = []

    def on_event(event: Event) -> None:
        if event.kind == "job_finished":
            memory.append(tracemalloc.get_traced_memory()[0])

    sim = SimulatorProcess(CHAOS, SEED, tmp_path / "simulator.log", outages(jobs))
    try:
        manifests = [sim.add_job() for _ in range(jobs)]
        settings = load_settings(
            base_url=sim.base_url,
            state_dir=tmp_path / "state",
            poll_interval_min=0.01,
            poll_interval_max=0.05,
            # Job-level backoff is real time (the instant-sleep switch covers only the client).
            outage_backoff_min=0.1,
            outage_backoff_max=0.5,
        )
        retry.STATS.reset()
        root.addHandler(recorder)
        tracemalloc.start()
        started = time.monotonic()
        try:
            result = asyncio.run(
                run_worker(
                    settings,
                    burst=True,
                    engine=_ForgetfulEngine(),
                    handle_signals=False,
                    events=Events([on_event]),
                    policies=SHORT_TIMEOUTS,
                )
            )
        finally:
            wall = time.monotonic() - started
            tracemalloc.stop()
            root.removeHandler(recorder)
        ledger = sim.ledger()
    finally:
        sim.stop()
    figures = Figures(
        jobs=jobs,
        wall_seconds=wall,
        calls=Counter(c["route"] for c in ledger.calls),
        faults=Counter(f"{c['route']}:{c['fault']}" for c in ledger.calls if c["fault"]),
        retries=Counter(retry.STATS.by_cause),
        exhausted=Counter(retry.STATS.exhausted),
        memory_at_job_end=memory,
        problems={m["project"]["id"]: ledger.check_job(m) for m in manifests},
        exit_code=result.exit_code,
        closed=sum(1 for job in result.jobs if job.closed),
        bad_records=recorder.bad,
    )
    print(figures.summary())
    return figures


@pytest.fixture(autouse=True)
def _instant_backoff(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GOFLOW_API_KEY", KEY)
    retry.set_testing(True)
    yield
    retry.set_testing(False)


def check(figures: Figures) -> None:
    """Every invariant of the module docstring."""
    assert figures.problems and all(p == [] for p in figures.problems.values()), figures.problems
    assert len(figures.problems) == figures.jobs
    assert figures.exit_code == 0
    assert figures.closed == figures.jobs
    assert figures.bad_records == []
    # The chaos really happened, every kind of it, on the result route and elsewhere.
    for kind in ("503", "429", "reset", "slow", "drop"):
        assert figures.faults[f"result:{kind}"] > 0, kind
    # Each job's outage window opened and was waited out (answers with the outage's 503).
    assert figures.faults["result:outage"] >= figures.jobs
    for route in ("status", "report", "next-job"):
        assert sum(n for k, n in figures.faults.items() if k.startswith(route + ":")) > 0, route
    for cause in ("5xx", "429", "network", "timeout"):
        assert figures.retries[cause] > 0, cause
    assert len(figures.memory_at_job_end) == figures.jobs
    growth = figures.memory_at_job_end[-1] - figures.memory_at_job_end[0]
    assert growth < figures.memory_bound, figures.summary()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_chaos_soak_three_jobs_in_a_row(tmp_path: Path) -> None:
    check(soak(tmp_path, jobs=3))


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_chaos_soak_ten_jobs_in_a_row(tmp_path: Path) -> None:
    check(soak(tmp_path, jobs=10))
