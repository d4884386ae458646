"""The command line's basics: --version and -h on every level."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from goflow_gpu.cli import app
from goflow_gpu.simulator import SimulatorThread


def test_version_prints_the_installed_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"goflow-gpu {version('goflow-gpu')}"


def test_short_help_works_on_the_app_and_on_commands() -> None:
    top = CliRunner().invoke(app, ["-h"])
    assert top.exit_code == 0 and "Usage: goflow-gpu" in top.output
    run = CliRunner().invoke(app, ["run", "-h"])
    assert run.exit_code == 0 and "75" in run.output  # the exit codes are documented


def test_a_mistyped_variable_stops_a_command_with_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOFLOW_STATEDIR", "/tmp/nowhere")
    result = CliRunner().invoke(app, ["state", "show"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())  # the console may wrap the line
    assert "GOFLOW_STATEDIR (did you mean GOFLOW_STATE_DIR?)" in text


def test_run_with_a_broken_catalog_exits_2_before_taking_a_job(
    tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    catalog = tmp_path / "prompts"
    catalog.mkdir()
    (catalog / "object-detection.yaml").write_text("slug: object-detection\nversion: [oops\n")
    sim_thread.add_job(media=1, analyses=1)
    harness = Path(__file__).with_name("crash_worker.py")
    command = [sys.executable, str(harness), "cli", "run", "--base-url", sim_thread.base_url]
    command += ["--state-dir", str(tmp_path / "state"), "--prompts-dir", str(catalog)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "prompt catalog" in " ".join(done.stderr.split())
    assert sim_thread.ledger_snapshot()["calls"] == []  # no job was taken
