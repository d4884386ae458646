"""The command line's basics: --version and -h on every level."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from goflow_gpu.cli import app


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
