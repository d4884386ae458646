"""Crash resume with real subprocesses: SIGKILL the worker at points of a job's life (API calls,
media downloads, inference, store writes, and inside SQLite transactions), restart it, and check
the simulator's ledger: every combination accepted exactly once, statuses ``processing`` then
``completed``, one report after all results. The only repeats tolerated are the ones the
contract cannot avoid: a status or report PUT that landed right before the kill is sent again.

Points are ``TARGET:NAME:N:WHEN`` (see ``crash_worker.py``); ``tx:...`` dies inside the N-th
store transaction of that kind after WHEN statements, before its COMMIT.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from goflow_gpu.simulator import Simulator, SimulatorThread
from goflow_gpu.store import Store

KEY = "made-up-crash-key-0002"
HARNESS = Path(__file__).with_name("crash_worker.py")
MEDIA, ANALYSES = 3, 5
COMBOS = MEDIA * ANALYSES


@dataclass(frozen=True)
class Point:
    """A crash point, what repeat the contract cannot avoid there, and the backend's latency."""

    where: str
    repeat: str | None = None  # "processing" | "completed" | "report"
    latency: float = 0.0  # > 0 keeps several POSTs in flight when the kill comes
    # Downloads overlap the first inference: the kill may come while the ``processing`` PUT
    # is in flight, and then that PUT is repeated (allowed, not required).
    overlaps_processing: bool = False


POINTS = [
    # job stored
    Point("store:create_job:1:after"),
    # media: mid-download (headers in, body unread), body in a temp file, file in place but
    # not recorded, inside the record_media transaction, recorded
    Point("fetcher:_read_body:1:before", overlaps_processing=True),
    Point("fetcher:_read_body:3:after", overlaps_processing=True),
    Point("media:_commit:2:after", overlaps_processing=True),
    Point("tx:record media:2:1", overlaps_processing=True),
    Point("store:record_media:2:after", overlaps_processing=True),
    # status processing: intent recorded (PUT not sent), PUT landed (not recorded), inside the
    # transaction recording it
    Point("store:mark_status:1:after"),
    Point("client:set_status:1:after", "processing"),
    Point("tx:status processing sent:1:2", "processing"),
    # inference
    Point("engine:infer:1:before"),
    Point("engine:infer:3:before"),
    Point("engine:infer:9:after"),
    Point("engine:infer:15:before"),
    # verdict stored
    Point("tx:mark_ready:4:2"),
    Point("store:mark_ready:5:after"),
    # POST intent recorded, nothing sent (alone, and with other POSTs in flight)
    Point("store:mark_posting:1:after"),
    Point("store:mark_posting:6:after", latency=0.05),
    Point("tx:mark_posting:3:3"),
    # POST landed, outcome not recorded (alone, and with other POSTs in flight)
    Point("client:post_result:1:after"),
    Point("client:post_result:4:after"),
    Point("client:post_result:9:after", latency=0.05),
    Point("tx:mark_reported:6:2", latency=0.05),
    Point("store:mark_reported:10:before"),
    Point("store:mark_reported:15:after"),
    # status completed: intent, PUT landed, inside the transaction recording it
    Point("store:mark_status:3:after"),
    Point("client:set_status:2:after", "completed"),
    Point("tx:status completed sent:1:2", "completed"),
    # report: intent, PUT landed, inside the transaction recording it, recorded
    Point("store:mark_report:1:after"),
    Point("client:put_report:1:after", "report"),
    Point("tx:report sent:1:2", "report"),
    Point("store:mark_report:2:after"),
    # closing
    Point("store:close_job:1:before"),
    Point("tx:close job:1:2"),
]


def start(
    state: Path, base_url: str, point: str | None, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ, GOFLOW_API_KEY=KEY, GOFLOW_LOG_FORMAT="json", **env)
    args = [sys.executable, str(HARNESS), str(state), base_url] + ([point] if point else [])
    return subprocess.run(args, capture_output=True, text=True, env=environ, timeout=120)


def check_database(state: Path) -> None:
    """The reopened state is a consistent SQLite database: nothing torn, nothing orphaned."""
    conn = sqlite3.connect(state / "state.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        for project, combos in conn.execute(
            "SELECT j.project_id, COUNT(c.project_id) FROM jobs j "
            "LEFT JOIN combos c ON c.project_id = j.project_id GROUP BY j.project_id"
        ):
            assert combos == COMBOS, f"job {project} has {combos} combinations"
        orphans = conn.execute(
            "SELECT COUNT(*) FROM combos WHERE project_id NOT IN (SELECT project_id FROM jobs)"
        ).fetchone()[0]
        assert orphans == 0
    finally:
        conn.close()


def committed(store: Store, prefix: str) -> int:
    """How many transactions of kind ``prefix`` the store shows as committed."""
    jobs = store.jobs()
    rows = [r for job in jobs for r in store.combos(job.project_id)]
    counts: dict[str, Any] = {
        "create job": lambda: len(jobs),
        "record media": lambda: int(
            store.conn.execute("SELECT COUNT(*) FROM media WHERE ok = 1").fetchone()[0]
        ),
        "mark_ready": lambda: sum(r.state != "pending" for r in rows),
        "mark_posting": lambda: sum(r.post_attempts for r in rows),
        "mark_reported": lambda: sum(r.state == "reported" for r in rows),
        "status processing sent": lambda: sum(j.status_processing == "sent" for j in jobs),
        "status completed sent": lambda: sum(j.status_completed == "sent" for j in jobs),
        "report sent": lambda: sum(j.report == "sent" for j in jobs),
        "close job": lambda: sum(j.state == "closed" for j in jobs),
    }
    return int(counts[prefix]())


def check_killed_transaction_left_no_trace(state: Path, point: str) -> None:
    _, prefix, nth, _ = point.split(":")
    check_database(state)
    with Store.open(state) as store:
        # Changes the job makes through Store.run may share one commit with changes queued with
        # them: those die with the N-th and none of their callers had been told it was done.
        # So at most N-1 stuck, never the torn N-th.
        assert committed(store, prefix) <= int(nth) - 1, f"{prefix}: a torn transaction stuck"


def problems_beyond_the_contract(
    sim: SimulatorThread, manifest: dict[str, Any], *points: Point
) -> list[str]:
    """``check_job``'s problems, minus exactly the one repeat the contract cannot avoid."""
    project = manifest["project"]["id"]
    snapshot = sim.ledger_snapshot()
    problems = sim.check_job(manifest)
    repeat = next((p.repeat for p in points if p.repeat), None)
    in_flight = ["processing", "processing", "completed"]
    if any(p.overlaps_processing for p in points) and snapshot["statuses"][project] == in_flight:
        repeat = "processing"
    if repeat in ("processing", "completed"):
        expected = ["processing", "completed"]
        expected.insert(expected.index(repeat), repeat)
        assert snapshot["statuses"][project] == expected
        problems = [p for p in problems if "statuses were" not in p]
    if repeat == "report":
        assert len(snapshot["reports"][project]) == 2
        problems = [p for p in problems if "2 reports accepted" not in p]
    return problems


def check_resumed_state(state: Path, project: str) -> None:
    with Store.open(state) as store:
        job = store.job(project)
        assert job is not None and job.state == "closed"
        assert store.counts(project)["reported"] == COMBOS
    leftovers = list((state / "media").rglob("*.part-*"))
    assert leftovers == [], f"temporary download files left behind: {leftovers}"


@pytest.mark.parametrize("point", POINTS, ids=[p.where for p in POINTS])
def test_kill_and_resume_keeps_exactly_once(tmp_path: Path, point: Point) -> None:
    with SimulatorThread(Simulator(api_key=KEY, seed=11, latency=point.latency)) as sim:
        manifest = sim.add_job(media=MEDIA, analyses=ANALYSES)
        crashed = start(tmp_path, sim.base_url, point.where)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
        if point.where.startswith("tx:"):
            check_killed_transaction_left_no_trace(tmp_path, point.where)
        resumed = start(tmp_path, sim.base_url, None)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "Traceback" not in crashed.stderr + resumed.stderr
        assert KEY not in crashed.stderr + resumed.stderr
        assert problems_beyond_the_contract(sim, manifest, point) == []
    check_resumed_state(tmp_path, manifest["project"]["id"])


# Before the job is stored nothing was sent for it, and nothing of it is kept: the backend has
# handed the job out and must hand it out again (the contract has no way to give a job back).
@pytest.mark.parametrize(
    "point", ["store:create_job:1:before", "tx:create job:1:1", "tx:create job:1:99"]
)
def test_kill_before_the_job_is_stored_sends_nothing_and_keeps_no_half_job(
    tmp_path: Path, point: str
) -> None:
    with SimulatorThread(Simulator(api_key=KEY, seed=13)) as sim:
        manifest = sim.add_job(media=MEDIA, analyses=ANALYSES)
        project = manifest["project"]["id"]
        crashed = start(tmp_path, sim.base_url, point)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
        check_database(tmp_path)
        with Store.open(tmp_path) as store:
            assert store.jobs() == []
            assert store.conn.execute("SELECT COUNT(*) FROM combos").fetchone()[0] == 0
        snapshot = sim.ledger_snapshot()
        assert project not in snapshot["statuses"]
        assert not any(k.startswith(project) for k in snapshot["results"])
        sim.add_raw_job(manifest)  # the backend hands the job out again
        resumed = start(tmp_path, sim.base_url, None)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert sim.check_job(manifest) == []
    check_resumed_state(tmp_path, project)


# Two kills in a row at different points, then a clean run.
DOUBLE = [
    (Point("client:post_result:3:after"), Point("store:mark_report:1:after")),
    (
        Point("fetcher:_read_body:2:before", overlaps_processing=True),
        Point("store:mark_posting:4:after"),
    ),
    (Point("tx:mark_reported:2:2", latency=0.05), Point("tx:mark_reported:5:2")),
    (Point("engine:infer:5:before"), Point("tx:status completed sent:1:2", "completed")),
]


@pytest.mark.parametrize(
    ("first", "second"), DOUBLE, ids=[f"{a.where}+{b.where}" for a, b in DOUBLE]
)
def test_two_kills_then_resume_keeps_exactly_once(
    tmp_path: Path, first: Point, second: Point
) -> None:
    with SimulatorThread(Simulator(api_key=KEY, seed=14, latency=first.latency)) as sim:
        manifest = sim.add_job(media=MEDIA, analyses=ANALYSES)
        for point in (first, second):
            crashed = start(tmp_path, sim.base_url, point.where)
            assert crashed.returncode == -signal.SIGKILL, (point, crashed.stderr[-2000:])
            check_database(tmp_path)
        resumed = start(tmp_path, sim.base_url, None)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert problems_beyond_the_contract(sim, manifest, first, second) == []
    check_resumed_state(tmp_path, manifest["project"]["id"])


def test_sigterm_during_inference_drains_and_exits_0(tmp_path: Path) -> None:
    env = dict(os.environ, GOFLOW_API_KEY=KEY, ENGINE_DELAY="0.2")
    with SimulatorThread(Simulator(api_key=KEY, seed=12)) as sim:
        manifest = sim.add_job(media=4, analyses=10)
        project = manifest["project"]["id"]
        proc = subprocess.Popen(
            [sys.executable, str(HARNESS), str(tmp_path), sim.base_url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            results = sim.ledger_snapshot()["results"]
            if sum(1 for k in results if k.startswith(project)) >= 4:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-2000:]
        snapshot = sim.ledger_snapshot()
        reported = sum(1 for k in snapshot["results"] if k.startswith(project))
        assert 4 <= reported < 40  # drained: in-flight work reported, the rest left
        assert snapshot["statuses"][project] == ["processing"]
        with Store.open(tmp_path) as store:
            counts = store.counts(project)
            assert counts["reported"] == reported  # every accepted result is recorded
            assert counts["ready"] == counts["posting"] == 0  # nothing left in the outbox
        resumed = start(tmp_path, sim.base_url, None)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert sim.check_job(manifest) == []
