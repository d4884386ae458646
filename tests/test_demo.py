"""The README's main job: `goflow-gpu demo` in a subprocess, checked through its ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.engine
def test_demo_runs_end_to_end_and_reports_every_combination_once(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    env.pop("GOFLOW_API_KEY", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "goflow_gpu",
            "demo",
            "--media",
            "2",
            "--analyses",
            "3",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "random weights" in done.stdout
    assert "exactly-once check" in done.stdout
    ledger = json.loads((tmp_path / "out" / "ledger.json").read_text())
    results = ledger["results"]
    assert len(results) == 6
    assert all(len(bodies) == 1 for bodies in results.values())
    (statuses,) = ledger["statuses"].values()
    assert statuses == ["processing", "completed"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["report"]["details"]["total_combinations"] == 6
    # the tiny model was built into the cache dir, offline
    assert any((tmp_path / "cache" / "goflow-gpu").iterdir())
