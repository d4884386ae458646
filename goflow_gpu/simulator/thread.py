"""Run a :class:`Simulator` on its own event loop in a daemon thread, for sync code.

Sync tests and tests that start the worker as a subprocess (crash tests) need a server that
keeps serving while the test blocks. Every method hops onto the simulator's loop, so the
simulator's state is only ever touched from one thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from goflow_gpu.simulator.app import Simulator
from goflow_gpu.simulator.faults import Faults
from goflow_gpu.simulator.scripted import FixedAnswer, Outage

T = TypeVar("T")
_TIMEOUT = 30.0


class SimulatorThread:
    """A running simulator for sync code: ``with SimulatorThread(Simulator(key)) as sim: ...``."""

    def __init__(self, simulator: Simulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.simulator = simulator
        self.host = host
        self.port = port
        self.base_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Start the loop thread and the server; return the base URL."""
        if self._thread is not None:
            raise RuntimeError("this SimulatorThread is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._serve, args=(loop,), name="goflow-simulator", daemon=True
        )
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self.simulator.start(self.host, self.port), loop)
        self.base_url = future.result(_TIMEOUT)
        return self.base_url

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Stop the server and the loop thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(self.simulator.stop(), loop).result(_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_TIMEOUT)

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``function(*args, **kwargs)`` on the simulator's loop and return its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the SimulatorThread is not running: use it inside `with`")

        async def run() -> T:
            return function(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(_TIMEOUT)

    def add_job(
        self,
        media: int = 3,
        analyses: int = 4,
        *,
        slugs: list[str] | None = None,
        media_faults: dict[int, str] | None = None,
    ) -> dict[str, Any]:
        """Queue a generated job (see :meth:`Simulator.add_job`)."""
        return self.call(
            self.simulator.add_job, media, analyses, slugs=slugs, media_faults=media_faults
        )

    def add_raw_job(self, raw: Any) -> None:
        self.call(self.simulator.add_raw_job, raw)

    def reject_result(
        self, media_id: str, analysis_id: str, status: int = 422, detail: str = "rejected"
    ) -> None:
        """See :meth:`Simulator.reject_result`."""
        self.call(self.simulator.reject_result, media_id, analysis_id, status, detail)

    def add_outage(
        self,
        route: str,
        seconds: float,
        *,
        after: int = 0,
        status: int = 503,
        retry_after: str | None = None,
    ) -> None:
        """See :meth:`Simulator.add_outage`."""
        self.call(
            self.simulator.add_outage,
            route,
            seconds,
            after=after,
            status=status,
            retry_after=retry_after,
        )

    @property
    def outages(self) -> tuple[Outage, ...]:
        """See :attr:`Simulator.outages` (read on the simulator's loop)."""
        return self.call(lambda: self.simulator.outages)

    def fix_answer(
        self,
        route: str,
        status: int,
        detail: str | None = None,
        *,
        media_id: str | None = None,
        analysis_id: str | None = None,
        times: int | None = None,
        accept: bool = False,
    ) -> None:
        """See :meth:`Simulator.fix_answer`."""
        self.call(
            self.simulator.fix_answer,
            route,
            status,
            detail,
            media_id=media_id,
            analysis_id=analysis_id,
            times=times,
            accept=accept,
        )

    @property
    def answers(self) -> tuple[FixedAnswer, ...]:
        """See :attr:`Simulator.answers`."""
        return self.call(lambda: self.simulator.answers)

    def reoffer(self, project_id: str, *, upper: bool = False) -> None:
        """See :meth:`Simulator.reoffer`."""
        self.call(self.simulator.reoffer, project_id, upper=upper)

    def set_faults(self, faults: Faults | None) -> None:
        self.call(self.simulator.set_faults, faults)

    def revoke_key(self) -> None:
        self.call(self.simulator.revoke_key)

    def restore_key(self) -> None:
        self.call(self.simulator.restore_key)

    def ledger_snapshot(self) -> dict[str, Any]:
        """A JSON-able copy of the ledger, taken on the simulator's loop."""
        return self.call(self.simulator.ledger.snapshot)

    def check_job(self, manifest: dict[str, Any]) -> list[str]:
        """``Ledger.check_job`` run on the simulator's loop."""
        return self.call(self.simulator.ledger.check_job, manifest)
