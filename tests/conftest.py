"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from goflow_gpu.simulator import Simulator, SimulatorThread


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2.5-VL, built once per test session, offline."""
    from goflow_gpu.engines.tiny import build_tiny_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2.5-vl"), seed=0)


# -- simulator fixtures (owner: simulator) --------------------------------------------------------

SIM_API_KEY = "made-up-simulator-key"
"""The key the simulator fixtures check; they also put it in GOFLOW_API_KEY for the worker."""


@pytest.fixture
def simulator(monkeypatch: pytest.MonkeyPatch) -> Simulator:
    """An unstarted :class:`Simulator` (seed 0) checking the key that GOFLOW_API_KEY now holds.

    Start it in the test's own event loop: ``async with simulator: ...``.
    """
    from goflow_gpu.simulator import Simulator

    monkeypatch.setenv("GOFLOW_API_KEY", SIM_API_KEY)
    return Simulator(SIM_API_KEY, seed=0)


@pytest.fixture
def sim_thread(simulator: Simulator) -> Iterator[SimulatorThread]:
    """The ``simulator`` fixture running in a background thread, for sync and subprocess tests.

    GOFLOW_API_KEY holds its key, so a worker (in-process or a child process) sends the right one.
    """
    from goflow_gpu.simulator import SimulatorThread

    with SimulatorThread(simulator) as running:
        yield running


# -- vLLM OpenAI-compatible server (owner: vllm/openai engines) -----------------------------------

VLLM_SERVED_NAME = "tiny-qwen"
"""The model name the ``vllm_server`` fixture serves (not the configured default model)."""
VLLM_SERVER_MIN_PIXELS = 56 * 56
VLLM_SERVER_MAX_PIXELS = 448 * 448


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 with the tiny model.

    Yields the base URL (``http://127.0.0.1:PORT``, no ``/v1``). The server reports cached prompt
    tokens (``--enable-prompt-tokens-details``) and writes compact JSON under a schema. Its log
    is shown when it fails to come up within 180 s.
    """
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_dir),
        "--served-model-name", VLLM_SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--max-num-seqs", "8",
        "--gpu-memory-utilization", "0.2", "--enforce-eager",
        "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
        "--mm-processor-kwargs", json.dumps(
            {"min_pixels": VLLM_SERVER_MIN_PIXELS, "max_pixels": VLLM_SERVER_MAX_PIXELS}
        ),
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        "--enable-prompt-tokens-details",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM server exited with {process.returncode}:\n{log_tail()}")
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after 180 s:\n{log_tail()}")
            time.sleep(1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo a test's logging setup (CLI runs call setup_logging): a root logger left at INFO
    makes later tests create and capture records they never asked for, which skews memory
    measurements such as the chaos soak's."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _bounded_outage_patience(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `run` that waits out an outage gives up after 30 s in tests instead of 10 minutes, so a
    bug that leaves a job waiting fails fast; tests about patience set their own value."""
    monkeypatch.setenv("GOFLOW_OUTAGE_PATIENCE", "30")
