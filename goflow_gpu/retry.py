"""The one retry mechanism: per-endpoint policies as data, full-jitter backoff, Retry-After.

What may be retried is not decided here but by :func:`goflow_gpu.errors.is_retryable`; this module
only decides *when* to try again::

    result = await call_with_retry(attempt_fn, POLICIES["result"], endpoint="result")

``attempt_fn(n)`` is called with the attempt number (1, 2, ...). After a retryable failure the
delay is drawn with full jitter from ``[0, min(cap, base * 2**(n-1))]``, multiplied by
``server_error_factor`` for 5xx answers (an overloaded server gets more air), and raised to the
server's Retry-After when it sent one (clamped to ``retry_after_max`` so a hostile or confused
server cannot park the worker for hours). When the policy's retries are used up, the last error
is raised unchanged.

Every retry is logged (reason, attempt, delay, endpoint) and counted in a :class:`RetryStats`
(the module-level :data:`STATS` unless one is injected) for metrics and benchmarks.

Tests call :func:`set_testing` so that sleeps return at once; the delays are still computed,
logged and recorded, so tests can assert on them.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import math
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from goflow_gpu.errors import TransientError, is_retryable
from goflow_gpu.logs import get_logger

__all__ = [
    "POLICIES",
    "STATS",
    "RetryEvent",
    "RetryPolicy",
    "RetryStats",
    "backoff_delay",
    "call_with_retry",
    "is_testing",
    "parse_retry_after",
    "set_testing",
    "sleep_unless_stopped",
]

T = TypeVar("T")
log = get_logger(__name__)

# 2**62 * any sane base is already far beyond any cap; bounding the exponent avoids float overflow.
_MAX_EXPONENT = 62


@dataclass(frozen=True)
class RetryPolicy:
    """How one endpoint is retried.

    ``retries`` extra attempts after the first; delays grow as ``base * 2**(attempt-1)`` up to
    ``cap`` (full jitter below that); 5xx delays are multiplied by ``server_error_factor``; a
    server's Retry-After is honoured up to ``retry_after_max``; ``timeout`` is the total time one
    attempt may take, in seconds.
    """

    retries: int
    base: float = 0.5
    cap: float = 30.0
    server_error_factor: float = 2.0
    retry_after_max: float = 120.0
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        for name in ("base", "cap", "retry_after_max", "timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not (math.isfinite(self.server_error_factor) and self.server_error_factor >= 1):
            raise ValueError(f"server_error_factor must be >= 1, got {self.server_error_factor!r}")


#: The contract's retry counts per endpoint; the final report is the critical last step.
POLICIES: Mapping[str, RetryPolicy] = {
    "next-job": RetryPolicy(retries=3, timeout=30.0),
    "status": RetryPolicy(retries=3, timeout=15.0),
    "result": RetryPolicy(retries=3, timeout=30.0),
    "report": RetryPolicy(retries=5, timeout=60.0),
}


@dataclass(frozen=True)
class RetryEvent:
    """One retry that was scheduled: which endpoint, after which attempt, why, and how long."""

    endpoint: str
    attempt: int
    cause: str
    status: int | None
    delay: float


@dataclass
class RetryStats:
    """Counters of retries, read by metrics and the benchmark.

    ``by_cause`` counts retries per :attr:`TransientError.cause` (``"429"``, ``"5xx"``,
    ``"network"``, ``"timeout"``), ``by_endpoint`` per endpoint, ``exhausted`` the calls that ran
    out of retries per endpoint. ``recent`` keeps the last events (bounded: the worker runs for
    weeks).
    """

    by_cause: Counter[str] = field(default_factory=Counter)
    by_endpoint: Counter[str] = field(default_factory=Counter)
    exhausted: Counter[str] = field(default_factory=Counter)
    recent: deque[RetryEvent] = field(default_factory=lambda: deque(maxlen=1000))

    def record(self, event: RetryEvent) -> None:
        """Count one scheduled retry."""
        self.by_cause[event.cause] += 1
        self.by_endpoint[event.endpoint] += 1
        self.recent.append(event)

    @property
    def total(self) -> int:
        """All retries recorded so far."""
        return sum(self.by_cause.values())

    def reset(self) -> None:
        """Forget everything (between benchmark runs)."""
        self.by_cause.clear()
        self.by_endpoint.clear()
        self.exhausted.clear()
        self.recent.clear()


#: Process-wide stats used when no :class:`RetryStats` is injected.
STATS = RetryStats()

_testing = False
_default_rng = random.Random()


def set_testing(testing: bool) -> None:
    """Make retry sleeps instant (``True``) or real again (``False``). For test suites only."""
    global _testing
    _testing = testing


def is_testing() -> bool:
    """Whether :func:`set_testing` is on."""
    return _testing


async def _default_sleep(seconds: float) -> None:
    # Even when testing, yield to the loop so a retry loop never starves other tasks.
    await asyncio.sleep(0 if _testing else seconds)


def backoff_delay(
    policy: RetryPolicy, attempt: int, exc: TransientError, rng: random.Random
) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based) that raised ``exc``."""
    exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
    ceiling = min(policy.cap, policy.base * 2.0**exponent)
    if exc.cause == "5xx":
        ceiling *= policy.server_error_factor
    delay = rng.uniform(0.0, ceiling)
    if exc.retry_after is not None:
        delay = min(max(exc.retry_after, delay), policy.retry_after_max)
    return delay


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date.

    A date in the past or a negative number gives ``0``; anything unparseable gives ``None``
    (the caller then falls back to its own backoff).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are GMT; parsedate_to_datetime leaves "-0000" dates naive.
        when = when.replace(tzinfo=datetime.UTC)
    reference = time.time() if now is None else now
    return max(when.timestamp() - reference, 0.0)


async def call_with_retry(
    fn: Callable[[int], Awaitable[T]],
    policy: RetryPolicy,
    *,
    endpoint: str,
    on_retry: Callable[[int, TransientError, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    rng: random.Random | None = None,
    stats: RetryStats | None = None,
    stop: asyncio.Event | None = None,
) -> T:
    """Call ``fn(attempt)`` until it succeeds, fails permanently, or retries run out.

    Only errors for which :func:`is_retryable` is true are retried, at most ``policy.retries``
    times; anything else propagates at once. ``on_retry(attempt, exc, delay)`` is called before
    each wait. ``stop``, when set, ends the retries: a failure while it is set, or a wait it
    interrupts, raises the last error at once (a draining worker never sits out a backoff).
    ``sleep``, ``rng`` and ``stats`` are seams for tests and metrics.
    """
    do_sleep = sleep or _default_sleep
    random_source = rng or _default_rng
    counters = stats if stats is not None else STATS
    attempt = 1
    while True:
        try:
            return await fn(attempt)
        except Exception as exc:
            if not is_retryable(exc) or not isinstance(exc, TransientError):
                raise
            if stop is not None and stop.is_set():
                raise
            if attempt > policy.retries:
                counters.exhausted[endpoint] += 1
                log.warning(
                    "retries exhausted",
                    endpoint=endpoint,
                    attempts=attempt,
                    reason=exc.cause,
                    status=exc.status,
                )
                raise
            delay = backoff_delay(policy, attempt, exc, random_source)
            counters.record(RetryEvent(endpoint, attempt, exc.cause, exc.status, delay))
            log.info(
                "retrying",
                endpoint=endpoint,
                reason=exc.cause,
                status=exc.status,
                attempt=attempt,
                delay_s=round(delay, 3),
                retry_after=exc.retry_after,
            )
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            last = exc
        if stop is None:
            await do_sleep(delay)
        elif not await sleep_unless_stopped(delay, stop, do_sleep):
            raise last
        attempt += 1


async def sleep_unless_stopped(
    delay: float,
    stop: asyncio.Event,
    do_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """Sleep ``delay`` seconds (with ``do_sleep``); False, at once, when ``stop`` is or gets set.

    The one stop-aware wait of the worker: retry backoffs, the engine's re-tries and the idle
    polls all wake on the drain switch through it."""
    if stop.is_set():
        return False
    nap = asyncio.ensure_future(do_sleep(delay))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([nap, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        nap.cancel()
        stopped.cancel()
    return not stop.is_set()
