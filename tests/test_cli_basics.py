"""The command line's basics: --version and -h on every level."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup
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


@pytest.mark.parametrize("command", ["serve", "run"])
def test_worker_help_shows_defaults_the_key_variable_and_the_exit_codes(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the help may wrap anywhere
    for shown in (
        "vllm | transformers | openai. [default: vllm; env GOFLOW_ENGINE]",
        "[default: Qwen/Qwen2.5-VL-7B-Instruct; env GOFLOW_MODEL]",
        "[default: ~/.local/state/goflow-gpu; env GOFLOW_STATE_DIR]",
        "[default: the shipped catalog; env GOFLOW_PROMPTS_DIR]",
        "[default: off; env GOFLOW_METRICS_PORT]",
        "[default: auto; env GOFLOW_LOG_FORMAT]",
        "read from the environment variable GOFLOW_API_KEY only",
        "75 run: the backend or an image host stayed down past outage_patience",
        "5 the inference engine failed",
        "2 bad configuration or usage",
    ):
        assert shown in text, shown
    assert "--api-key" not in text  # the key has no flag


def test_serve_and_run_share_one_option_set() -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    options = {
        name: [(p.name, p.opts, getattr(p, "help", None)) for p in group.commands[name].params]
        for name in ("serve", "run")
    }
    assert options["serve"] == options["run"]
    names = [name for name, _, _ in options["run"]]
    assert names == [
        "config",
        "base_url",
        "state_dir",
        "engine",
        "model",
        "log_format",
        "metrics_port",
        "prompts_dir",
    ]


def test_run_with_a_model_path_that_does_not_exist_stops_before_loading_anything(
    tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    # Stand-ins that end the process if anything imports the engine libraries: the model must
    # be refused before the engine module (and its seconds of library output) is imported.
    fakes = tmp_path / "fakes"
    for library in ("vllm", "torch", "transformers"):
        (fakes / library).mkdir(parents=True)
        (fakes / library / "__init__.py").write_text(
            f"raise SystemExit('{library} was imported')\n", encoding="utf-8"
        )
    sim_thread.add_job(media=1, analyses=1)
    env = dict(os.environ, PYTHONPATH=str(fakes))
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "goflow_gpu", "--version"], env=env, check=True, capture_output=True
    )
    cli_start = time.monotonic() - started  # the floor: Python and the CLI's own imports
    command = [sys.executable, "-m", "goflow_gpu", "run", "--model", "./nope"]
    command += ["--base-url", sim_thread.base_url, "--state-dir", str(tmp_path / "state")]
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-2000:]  # configuration, per the exit-code table
    (line,) = done.stderr.splitlines()  # one line: no library noise, no traceback
    assert "model ./nope: no such directory" in line
    assert str(tmp_path / "nope") in line  # where it looked, resolved
    assert done.stdout == ""
    assert sim_thread.ledger_snapshot()["calls"] == []  # no job was taken
    assert not (tmp_path / "state").exists()  # and no state was created for a start that failed
    # Beyond the CLI's own start, the refusal takes well under a second (settings and a few
    # stat calls; measured 0.3-0.7 s on a loaded 2-core machine); the margin is for that load.
    # Before, importing and starting vLLM came first: 8 s or more.
    assert elapsed - cli_start < 3, (elapsed, cli_start)
