"""A worker process for crash and CLI tests: the real worker with a scripted engine, which can
SIGKILL itself at a chosen point.

    python tests/crash_worker.py STATE_DIR BASE_URL [POINT]
    python tests/crash_worker.py cli [goflow-gpu arguments ...]

``POINT`` is ``TARGET:NAME:N:WHEN``:

- ``store``, ``client``, ``engine``, ``fetcher`` (a method of Store, GoFlowClient,
  ScriptedEngine, MediaFetcher) or ``media`` (a function of ``goflow_gpu.media``): the process
  kills itself right ``before`` or right ``after`` the N-th call of ``NAME``.
- ``tx``: inside a SQLite write. ``NAME`` is the start of the store transaction's description
  (``create job``, ``mark_reported``, ``status completed sent``, ...); the process dies inside
  the N-th such transaction after WHEN statements ran, before COMMIT (a WHEN larger than the
  transaction's statement count dies right before COMMIT).

The ``cli`` form runs the real ``goflow-gpu`` command line with the scripted engine in place of
the configured one (no model is loaded), for exit-code tests. The key comes from
GOFLOW_API_KEY like in production; ENGINE_DELAY slows the scripted engine down, ENGINE_SLOTS
sets how many requests it takes at once, REAL_SLEEPS=1 keeps retry sleeps real (timing tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from goflow_gpu import media, retry, service
from goflow_gpu.client import GoFlowClient
from goflow_gpu.engines.base import Engine
from goflow_gpu.media import MediaFetcher
from goflow_gpu.service import run_worker
from goflow_gpu.settings import Settings, load_settings
from goflow_gpu.store import Store
from tests.doubles import ScriptedEngine

TARGETS: dict[str, type | ModuleType] = {
    "store": Store,
    "client": GoFlowClient,
    "engine": ScriptedEngine,
    "fetcher": MediaFetcher,
    "media": media,
}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(owner: type | ModuleType, name: str, nth: int, when: str) -> None:
    """Die before/after the ``nth`` call of ``owner.name`` (looked up at call time by callers)."""
    original = getattr(owner, name)
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

        setattr(owner, name, async_wrapper)
    else:

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            index = before()
            value = original(*args, **kwargs)
            after(index)
            return value

        setattr(owner, name, wrapper)


class _DyingConnection:
    """A connection that dies after ``statements`` execute/executemany calls, mid-transaction."""

    def __init__(self, conn: sqlite3.Connection, statements: int) -> None:
        self._conn = conn
        self._left = statements

    def _ran(self) -> None:
        self._left -= 1
        if self._left == 0:
            die()

    def execute(self, *args: Any) -> sqlite3.Cursor:
        cursor = self._conn.execute(*args)
        self._ran()
        return cursor

    def executemany(self, *args: Any) -> sqlite3.Cursor:
        cursor = self._conn.executemany(*args)
        self._ran()
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def arm_transaction(prefix: str, nth: int, statements: int) -> None:
    """Die inside the ``nth`` store transaction described as ``prefix...``, before its COMMIT.

    The seam is ``Store._tx``, the one helper every write goes through: the wrapped transaction
    hands the caller a connection that kills the process after ``statements`` statements.
    """
    original = Store._tx
    seen = 0

    @contextlib.contextmanager
    def transaction(self: Store, what: str) -> Iterator[Any]:
        nonlocal seen
        with original(self, what) as conn:
            if what.startswith(prefix):
                seen += 1
                if seen == nth:
                    yield _DyingConnection(conn, statements)
                    die()  # fewer statements than asked for: die right before COMMIT
                    return
            yield conn

    Store._tx = transaction  # type: ignore[method-assign]


def arm_point(point: str) -> None:
    target, name, nth, when = point.split(":")
    if target == "tx":
        arm_transaction(name, int(nth), int(when))
    else:
        arm(TARGETS[target], name, int(nth), when)


def scripted_engine() -> ScriptedEngine:
    return ScriptedEngine(
        delay=float(os.environ.get("ENGINE_DELAY", "0.001")),
        slots=int(os.environ.get("ENGINE_SLOTS", "4")),
    )


def run_cli(args: list[str]) -> int:
    """The real command line, with the scripted engine instead of the configured one."""
    from goflow_gpu import cli

    def create_engine(settings: Settings, **overrides: Any) -> Engine:
        return scripted_engine()

    setattr(service, "create_engine", create_engine)  # noqa: B010 - the one swap this harness makes
    retry.set_testing(os.environ.get("REAL_SLEEPS") != "1")
    sys.argv = ["goflow-gpu", *args]
    try:
        cli.main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def main() -> int:
    if sys.argv[1] == "cli":
        return run_cli(sys.argv[2:])
    state_dir, base_url = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        arm_point(sys.argv[3])
    retry.set_testing(True)
    settings = load_settings(
        base_url=base_url,
        state_dir=Path(state_dir),
        poll_interval_min=0.01,
        poll_interval_max=0.05,
        report_concurrency=int(os.environ.get("REPORT_CONCURRENCY", "8")),
    )
    result = asyncio.run(run_worker(settings, burst=True, engine=scripted_engine()))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
