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
