"""Crash resume with real subprocesses: SIGKILL the worker at points of a job's life, restart
it, and check the simulator's ledger: every combination accepted exactly once, statuses
``processing`` then ``completed``, one report after all results.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from goflow_gpu.simulator import Simulator, SimulatorThread

KEY = "made-up-crash-key-0002"
HARNESS = Path(__file__).with_name("crash_worker.py")

# (crash point, what the contract cannot avoid at that point)
POINTS = [
    ("store:create_job:1:after", None),
    ("store:record_media:2:after", None),
    ("store:mark_status:1:after", None),  # processing intent recorded, PUT not sent
    ("client:set_status:1:after", "status"),  # PUT landed, not yet recorded
    ("engine:infer:3:before", None),  # mid-inference
    ("store:mark_ready:5:after", None),
    ("store:mark_posting:1:after", None),  # POST intent, nothing sent
    ("client:post_result:4:after", None),  # POST accepted, outcome not recorded
    ("store:mark_reported:10:before", None),
    ("store:mark_status:3:after", None),  # completed intent
    ("store:mark_report:1:after", None),  # report intent, PUT not sent
    ("client:put_report:1:after", "report"),  # report landed, not recorded
    ("store:close_job:1:before", None),
]


def start(state: Path, base_url: str, point: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GOFLOW_API_KEY=KEY, GOFLOW_LOG_FORMAT="json")
    args = [sys.executable, str(HARNESS), str(state), base_url] + ([point] if point else [])
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(("point", "repeatable"), POINTS, ids=[p for p, _ in POINTS])
def test_kill_and_resume_keeps_exactly_once(
    tmp_path: Path, point: str, repeatable: str | None
) -> None:
    with SimulatorThread(Simulator(api_key=KEY, seed=11)) as sim:
        manifest = sim.add_job(media=3, analyses=5)
        crashed = start(tmp_path, sim.base_url, point)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
        resumed = start(tmp_path, sim.base_url, None)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "Traceback" not in resumed.stderr
        assert KEY not in crashed.stderr + resumed.stderr
        snapshot = sim.ledger_snapshot()
        problems = sim.check_job(manifest)
    project = manifest["project"]["id"]
    if repeatable == "status":
        # A PUT that landed just before the kill is sent again: the contract gives no way to
        # ask the backend. Everything else must still hold.
        problems = [p for p in problems if "status" not in p]
        assert snapshot["statuses"][project][0] == "processing"
        assert snapshot["statuses"][project][-1] == "completed"
    if repeatable == "report":
        problems = [p for p in problems if "report" not in p]
    assert problems == []


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
        resumed = start(tmp_path, sim.base_url, None)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert sim.check_job(manifest) == []
