"""Job-level backoff (patience.Outage): shared schedule, one probe at a time, Retry-After,
patience, and a stop that wakes every wait. Real (short) sleeps on a real event loop."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from goflow_gpu.errors import NotFoundError, TransientError
from goflow_gpu.patience import Outage, PatienceExhausted, Stopped


def down(retry_after: float | None = None) -> TransientError:
    return TransientError("503", status=503, cause="5xx", retry_after=retry_after)


class Service:
    """Fails every call until ``up_at`` (monotonic), counting calls and their overlap."""

    def __init__(self, up_after: float, retry_after: float | None = None) -> None:
        self.up_at = time.monotonic() + up_after
        self.retry_after = retry_after
        self.calls: list[float] = []
        self.running = 0
        self.most_at_once = 0

    async def call(self) -> str:
        self.calls.append(time.monotonic())
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(0.01)
            if time.monotonic() < self.up_at:
                raise down(self.retry_after)
            return "ok"
        finally:
            self.running -= 1


def outage(**kw: object) -> Outage:
    values: dict[str, object] = {
        "stopping": asyncio.Event(),
        "patience": None,
        "base": 0.05,
        "cap": 0.2,
        "rng": random.Random(1),
    }
    values.update(kw)
    return Outage("backend", **values)  # type: ignore[arg-type]


def test_many_tasks_wait_out_one_outage_with_one_probe_at_a_time() -> None:
    async def go() -> None:
        gate = outage()
        service = Service(up_after=0.6)
        changes: list[str | None] = []
        gate.on_change = lambda name, why: changes.append(why)
        results = await asyncio.gather(*(gate.call(service.call, what="POST") for _ in range(8)))
        assert results == ["ok"] * 8
        assert not gate.active
        assert changes[0] is not None and changes[-1] is None  # opened once, closed once
        assert len(changes) == 2
        during = [t for t in service.calls if t < service.up_at]
        # 8 first calls, then single probes spaced by the backoff: far fewer than 8 per probe.
        assert 9 <= len(during) <= 8 + 12
        # After the first round the probes never overlapped.
        first_round_end = sorted(service.calls)[7]
        later = [t for t in service.calls if t > first_round_end]
        assert later == sorted(later)

    asyncio.run(go())


def test_the_servers_retry_after_is_honoured() -> None:
    async def go() -> None:
        gate = outage(cap=0.05)
        service = Service(up_after=0.3, retry_after=0.4)
        await gate.call(service.call, what="PUT report")
        assert len(service.calls) == 2  # one failure, then one probe after >= 0.4 s
        assert service.calls[1] - service.calls[0] >= 0.4

    asyncio.run(go())


def test_patience_ends_the_wait_with_the_last_reason() -> None:
    async def go() -> None:
        gate = outage(patience=0.3)
        service = Service(up_after=60)
        started = time.monotonic()
        with pytest.raises(PatienceExhausted, match=r"backend unavailable .*POST result: 5xx"):
            await gate.call(service.call, what="POST result")
        assert 0.3 <= time.monotonic() - started < 1.0

    asyncio.run(go())


def test_a_stop_wakes_every_waiting_task_at_once() -> None:
    async def go() -> None:
        stopping = asyncio.Event()
        gate = outage(stopping=stopping, base=5.0, cap=5.0)
        service = Service(up_after=60)
        tasks = [asyncio.create_task(gate.call(service.call, what="POST")) for _ in range(4)]
        await asyncio.sleep(0.2)
        assert gate.active
        started = time.monotonic()
        stopping.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, Stopped) for o in outcomes)
        assert time.monotonic() - started < 0.2  # nobody sat out the 5 s backoff

    asyncio.run(go())


def test_a_definite_answer_ends_the_outage_and_propagates() -> None:
    async def go() -> None:
        gate = outage()
        gate.failed(down(), what="PUT status")
        assert gate.active

        async def refused() -> None:
            raise NotFoundError("404", status=404)

        await asyncio.sleep(0.06)
        with pytest.raises(NotFoundError):
            await gate.call(refused, what="PUT status")
        assert not gate.active  # the backend answered: it is up

    asyncio.run(go())
