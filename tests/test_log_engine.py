"""The log pipeline around a real vLLM engine (the tiny random model), in real processes.

vLLM, torch and transformers log through :mod:`logging`, warn through :mod:`warnings`, and their
engine-core processes and C++ code write straight to file descriptor 2. With
``--log-format json`` every line of stderr must still be JSON (a log collector parses them
all) and stdout must hold only the command's output; on a terminal the screen must show our
lines, bars and summary only, the libraries' lines going to the library log.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from fcntl import ioctl
from pathlib import Path

import pytest
import yaml

from goflow_gpu.logs import LIBRARY_LOG
from goflow_gpu.simulator import SimulatorThread
from tests.doubles import tiny_vllm_config

pytestmark = pytest.mark.engine


def _command() -> list[str]:
    script = Path(sys.executable).with_name("goflow-gpu")
    return [str(script)] if script.exists() else [sys.executable, "-m", "goflow_gpu"]


def test_run_on_vllm_with_json_logs_writes_only_json_to_stderr(
    tmp_path: Path, tiny_model_dir: Path, sim_thread: SimulatorThread
) -> None:
    manifest = sim_thread.add_job(media=1, analyses=2)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_vllm_config(tiny_model_dir, poll_interval_min=0.2)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_LOGGING", "VLLM_CONFIG"))}
    done = subprocess.run(
        [*_command(), "run", "--config", str(config), "--base-url", sim_thread.base_url,
         "--state-dir", str(tmp_path / "state"), "--log-format", "json"],
        capture_output=True, text=True, timeout=600, check=False,
        env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sim_thread.check_job(manifest) == []
    # stdout: the command's one-line summary, nothing of vLLM's.
    assert done.stdout.splitlines() == [
        "done: 1/1 job runs closed, 0 skipped, 0 parked, 0 unfinished"
    ]
    lines = done.stderr.splitlines()
    payloads = []
    for number, line in enumerate(lines, 1):
        try:
            payloads.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"stderr line {number} of {len(lines)} is not JSON: {line[:300]!r}")
    assert all({"ts", "level", "logger", "event"} <= set(p) for p in payloads)
    loggers = {p["logger"] for p in payloads}
    # vLLM did log, through the pipeline (its engine-core processes' raw output as "stderr").
    assert any(name.startswith("vllm") for name in loggers), loggers
    events = [p["event"] for p in payloads if p["logger"].startswith("goflow_gpu")]
    assert "vllm engine ready" in events and "job completed" in events
    assert "analysis passed qa" not in events  # per combination: debug


def _run_on_a_terminal(args: list[str], rows: int, cols: int, timeout: float) -> tuple[int, str]:
    """Run a command on a new pseudo-terminal of that size; its exit code and what it drew."""
    master, slave = pty.openpty()
    ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}
    env.update(TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows), HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal closed: the process ended
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif process.poll() is not None:
                break
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def _screen_lines(drawn: str) -> list[str]:
    """The lines a reader sees: colours and cursor moves removed, each line in its last state,
    progress bars (redrawn many times in place) left out."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", drawn)
    lines = []
    for line in plain.replace("\r\n", "\n").split("\n"):
        parts = [part for part in line.split("\r") if part.strip()]
        if parts and "━" not in parts[-1]:
            lines.append(parts[-1].rstrip())
    return lines


def test_demo_on_a_terminal_fits_a_screen_with_no_library_lines(tmp_path: Path) -> None:
    out = Path(tempfile.mkdtemp(prefix="gd-", dir="/tmp"))  # short: the path fits a table cell
    try:
        code, drawn = _run_on_a_terminal(
            [*_command(), "demo", "--media", "2", "--analyses", "3", "--out", str(out)],
            rows=40,
            cols=120,
            timeout=600,
        )
        kept = (out / "state" / LIBRARY_LOG).read_text()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lines = _screen_lines(drawn)
    assert code == 0, "\n".join(lines[-40:])
    text = "\n".join(lines)
    assert "exactly-once check" in text
    # Nothing of the libraries' on screen: no vLLM/torch lines, warnings, or loading bars.
    for noise in ("FutureWarning", "Triton", "[vllm", "vllm.", "safetensors", "NUMA"):
        assert noise not in text.replace("engine vllm", ""), (noise, text)
    assert not [line for line in lines if re.match(r"\[?[WIE]\d{4} \d\d:", line)]  # glog, torch
    # 40 rows: the panel (5), the simulator line (1-2), the summary table (14), a line per
    # failed combination (6 at most here) and warnings of ours; the four bars are redrawn in
    # place and not counted. About 22-35 lines in practice.
    assert len(lines) <= 36, text
    assert str(out / "state" / LIBRARY_LOG) in text  # named in the summary
    assert "[vllm" in kept  # vLLM's records, with their logger
    assert "[stderr]" in kept  # the engine-core processes' raw output
