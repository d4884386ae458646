"""A worker process for crash tests: the real worker with a scripted engine, which SIGKILLs
itself at a chosen point.

    python tests/crash_worker.py STATE_DIR BASE_URL [TARGET:METHOD:N:WHEN]

TARGET is ``store``, ``client`` or ``engine``; the process kills itself with SIGKILL right
before (``before``) or right after (``after``) the N-th call of that method. The key comes from
GOFLOW_API_KEY like in production.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from goflow_gpu import retry
from goflow_gpu.client import GoFlowClient
from goflow_gpu.service import run_worker
from goflow_gpu.settings import load_settings
from goflow_gpu.store import Store
from tests.doubles import ScriptedEngine


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(cls: type, method: str, nth: int, when: str) -> None:
    original = getattr(cls, method)
    calls = 0

    def before() -> int:
        nonlocal calls
        calls += 1
        if calls == nth and when == "before":
            die()
        return calls

    def after(index: int) -> None:
        if index == nth and when == "after":
            die()

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            index = before()
            value = await original(*args, **kwargs)
            after(index)
            return value

        setattr(cls, method, async_wrapper)
    else:

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            index = before()
            value = original(*args, **kwargs)
            after(index)
            return value

        setattr(cls, method, wrapper)


def main() -> int:
    state_dir, base_url = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        target, method, nth, when = sys.argv[3].split(":")
        cls = {"store": Store, "client": GoFlowClient, "engine": ScriptedEngine}[target]
        arm(cls, method, int(nth), when)
    retry.set_testing(True)
    settings = load_settings(
        base_url=base_url, state_dir=Path(state_dir), poll_interval_min=0.01, poll_interval_max=0.05
    )
    result = asyncio.run(
        run_worker(
            settings,
            burst=True,
            engine=ScriptedEngine(delay=float(os.environ.get("ENGINE_DELAY", "0.001")), slots=4),
        )
    )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
