"""The log pipeline as an operator meets it: the real ``goflow-gpu`` in child processes.

-q/-v/--log-level on a cheap command, bad values refused in one line, and the fatal error line:
one line however narrow the terminal, JSON in JSON mode, and nothing after it (an unclosed
aiohttp session used to log an asyncio error after the line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from goflow_gpu.errors import EXIT_CODES
from goflow_gpu.simulator import Simulator, SimulatorThread
from goflow_gpu.store import Store
from tests.doubles import http_server

KEY = "made-up-key-for-log-cli-tests"


def goflow(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed command (or ``python -m goflow_gpu``) with pipes: off a terminal."""
    script = Path(sys.executable).with_name("goflow-gpu")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "goflow_gpu"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("GOFLOW_")}
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env={**base, "COLUMNS": "80", **(env or {})},
        timeout=180,
        check=False,
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    with Store.open(tmp_path / "state"):
        pass
    return tmp_path / "state"


def _events(stderr: str) -> list[tuple[str, str]]:
    return [(line["level"], line["event"]) for line in map(json.loads, stderr.splitlines())]


def test_quiet_verbose_and_log_level_on_a_cheap_command(state_dir: Path) -> None:
    show = ("state", "show", "--state-dir", str(state_dir))
    opened = ("debug", "state opened read-only")

    plain = goflow(*show)
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr == ""  # info: nothing to say
    verbose = goflow("-v", *show)
    assert verbose.returncode == 0 and opened in _events(verbose.stderr)
    assert str(state_dir) in verbose.stdout and "state opened" not in verbose.stdout
    by_flag = goflow("--log-level", "debug", *show)
    assert opened in _events(by_flag.stderr)
    # The flags win over GOFLOW_LOG_LEVEL: -q silences what the environment asked for.
    env_debug = {"GOFLOW_LOG_LEVEL": "debug"}
    assert opened in _events(goflow(*show, env=env_debug).stderr)
    quiet = goflow("-q", *show, env=env_debug)
    assert quiet.returncode == 0 and quiet.stderr == ""
    # --log-level wins over -q.
    assert opened in _events(goflow("-q", "--log-level", "DEBUG", *show).stderr)


@pytest.mark.parametrize(
    ("args", "env", "first_words"),
    [
        (["--log-level", "verbose"], {}, "usage error: --log-level 'verbose' is not a log level"),
        (["-q", "-v"], {}, "usage error: -q/--quiet and -v/--verbose contradict"),
        (
            [],
            {"GOFLOW_LOG_LEVEL": "verbose", "GOFLOW_LOG_FORMAT": "console"},
            "configuration error: GOFLOW_LOG_LEVEL 'verbose' is not a log level",
        ),
    ],
    ids=["bad-flag", "quiet-and-verbose", "bad-env"],
)
def test_a_bad_log_level_is_one_line_and_exit_2(
    state_dir: Path, args: list[str], env: dict[str, str], first_words: str
) -> None:
    done = goflow(*args, "state", "show", "--state-dir", str(state_dir), env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(first_words)
    assert "debug, info, warning, error" in line or "pass one" in line


def test_top_level_help_ends_with_the_exit_code_table() -> None:
    done = goflow("--help")
    assert done.returncode == 0
    tail = done.stdout.rstrip().splitlines()[-len(EXIT_CODES) :]
    assert [line.split()[0] for line in tail] == [str(code) for code, _ in EXIT_CODES]
    assert "Exit codes" in done.stdout


# -- the fatal error line --------------------------------------------------------------------------

PLAIN_HTTP = ["run", "--base-url", "http://goflow.example.com"]


def test_a_fatal_error_is_one_unwrapped_line_at_80_columns_off_a_terminal(tmp_path: Path) -> None:
    done = goflow(
        *PLAIN_HTTP,
        "--state-dir",
        str(tmp_path),
        "--log-format",
        "console",
        env={"GOFLOW_API_KEY": KEY},
    )
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("configuration error: ")
    assert "goflow.example.com" in line and "plain http" in line
    assert len(line) > 80  # it would have wrapped at 80 columns
    assert "\x1b" not in line  # no colour codes off a terminal


def test_a_fatal_error_is_one_json_object_in_json_mode(tmp_path: Path) -> None:
    done = goflow(
        *PLAIN_HTTP,
        "--state-dir",
        str(tmp_path),
        "--log-format",
        "json",
        env={"GOFLOW_API_KEY": KEY},
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    payload = json.loads(line)
    assert payload["level"] == "error"
    assert payload["event"] == "fatal error"
    assert payload["kind"] == "configuration error"
    assert "plain http" in payload["message"]
    assert payload["exit_code"] == 2


class _Chat(BaseHTTPRequestHandler):
    """Just enough of an OpenAI-compatible server for the openai engine to start."""

    def do_GET(self) -> None:
        data = json.dumps({"data": [{"id": "fake-vl"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def chat_server() -> Iterator[str]:
    with http_server(_Chat) as url:
        yield url


def _run_with_openai(sim: SimulatorThread, chat_url: str, state: Path, fmt: str, key: str) -> Any:
    return goflow(
        "run",
        "--base-url",
        sim.base_url,
        "--state-dir",
        str(state),
        "--engine",
        "openai",
        "--log-format",
        fmt,
        env={"GOFLOW_API_KEY": key, "GOFLOW_OPENAI_BASE_URL": chat_url, "GOFLOW_MODEL": "fake-vl"},
    )


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_refused_key_ends_the_output_with_one_line_and_no_unclosed_session(
    tmp_path: Path, chat_server: str, fmt: str
) -> None:
    with SimulatorThread(Simulator(KEY, seed=5)) as sim:
        sim.add_job(media=1, analyses=1)
        done = _run_with_openai(sim, chat_server, tmp_path / "state", fmt, "made-up-wrong-key")
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert "Unclosed" not in done.stderr
    if fmt == "json":
        payloads = [json.loads(line) for line in lines]  # every line is JSON
        assert payloads[-1]["event"] == "fatal error"
        assert payloads[-1]["kind"] == "authentication failed"
        assert payloads[-1]["exit_code"] == 3
        assert "GOFLOW_API_KEY" in payloads[-1]["message"]
    else:
        assert lines[-1].startswith("authentication failed: ")
        assert "HTTP 401" in lines[-1] and "GOFLOW_API_KEY" in lines[-1]


def test_an_engine_that_fails_to_start_is_closed_before_the_error_line(tmp_path: Path) -> None:
    """The openai engine opens its HTTP session, then cannot reach the server: exit 5, and the
    session is closed (it used to be left to the garbage collector, which logged an asyncio
    "Unclosed client session" error after the fatal line)."""
    with SimulatorThread(Simulator(KEY, seed=6)) as sim:
        done = _run_with_openai(sim, "http://127.0.0.1:9/v1", tmp_path / "state", "console", KEY)
    assert done.returncode == 5, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert lines[-1].startswith("engine failed: ")
    assert "Unclosed" not in done.stderr
