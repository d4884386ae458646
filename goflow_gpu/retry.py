"""The one retry mechanism: per-endpoint policies as data, run by tenacity.

What may be retried is not decided here but by :func:`goflow_gpu.errors.is_retryable`; this module
only decides *when* to try again::

    result = await call_with_retry(attempt_fn, POLICIES["result"], endpoint="result")

``attempt_fn(n)`` is called with the attempt number (1, 2, ...). After a retryable failure the
delay is drawn with full jitter from ``[0, min(cap, base * 2**(n-1))]``, multiplied by
``server_error_factor`` for 5xx answers (an overloaded server gets more air), and raised to the
server's Retry-After when it sent one (clamped to ``retry_after_max`` so a hostile or confused
server cannot park the worker for hours). When the policy's retries are used up, the last error
is raised unchanged. ``stop`` (the worker's drain switch) ends the retries: a failure while it
is set, or a backoff it interrupts, raises the last error at once.

**Why tenacity, not stamina.** Both are well kept; tenacity's parts map one to one onto what the
worker needs, stamina's opinions do not: stamina's jitter is added on top of the exponential
delay (ours is full jitter, the contract's schedule), it has no place for the 5xx factor, no
injectable sleep (our drain switch must wake a backoff; tests inject a recording sleep) and no
random source to seed; and its testing switch also caps the attempts, which would hide the
retry counts the chaos tests assert on. The price: tenacity re-inspects its hooks on every
attempt, about 0.1 ms of CPU per call, against the milliseconds of the HTTP call it wraps.

**What is configuration now** (tenacity does the loop): :func:`_retrying` builds one
``AsyncRetrying`` per call from the policy: ``stop=`` the policy's attempt count or the drain
switch (``stop_when_event_set``), ``retry=`` the errors module's predicate, ``wait=`` the policy's
schedule (:class:`PolicyWait`, a tenacity wait strategy: this is where Retry-After is honoured),
``before_sleep=`` logging and :class:`RetryStats`, ``sleep=`` a stop-aware sleep,
``retry_error_callback=`` the "retries exhausted" record.

**What logic remains, and why:** :func:`backoff_delay` (tenacity's ``wait_random_exponential``
draws from the module-level ``random`` and knows neither the 5xx factor nor Retry-After, so the
formula is ours; tests and the hypothesis properties pin it), :func:`parse_retry_after` (HTTP
date or seconds; no retry library parses headers), :func:`sleep_unless_stopped` (the one
stop-aware wait, also used by the worker's idle polls and the engine's re-tries) and the
:class:`RetryStats` counters read by metrics and the benchmark.

Tests call :func:`set_testing` so that sleeps return at once; the delays are still computed,
logged and recorded, so tests can assert on them.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import itertools
import math
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_never,
    stop_when_event_set,
)
from tenacity.wait import wait_base

from goflow_gpu.errors import TransientError, is_retryable
from goflow_gpu.logs import get_logger

__all__ = [
    "POLICIES",
    "STATS",
    "PolicyWait",
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
    attempt may take, in seconds (used by the caller, not by the retry loop).
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
    """Make retry sleeps instant (``True``) or real again (``False``). For test suites only.

    Unlike stamina's switch it leaves the attempt counts alone: tests see every retry."""
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


class PolicyWait(wait_base):
    """tenacity's wait hook for a :class:`RetryPolicy`: :func:`backoff_delay` of the failure.

    The server's Retry-After reaches tenacity here: the failed attempt's
    :class:`TransientError` carries it, and the delay returned is at least that long."""

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        return backoff_delay(
            self.policy, retry_state.attempt_number, _failure(retry_state), self.rng
        )


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


def _retryable(exc: BaseException) -> bool:
    # The errors module decides; TransientError is what carries cause and Retry-After.
    return is_retryable(exc) and isinstance(exc, TransientError)


def _failure(retry_state: RetryCallState) -> TransientError:
    """The failed attempt's error (tenacity only waits after a failure ``_retryable`` passed)."""
    outcome = retry_state.outcome
    exc = outcome.exception() if outcome is not None else None
    if not isinstance(exc, TransientError):
        raise TypeError(f"retry hook called without a TransientError (got {exc!r})")
    return exc


def _retrying(
    policy: RetryPolicy,
    *,
    endpoint: str,
    on_retry: Callable[[int, TransientError, float], None] | None,
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random,
    stats: RetryStats,
    stop: asyncio.Event | None,
) -> AsyncRetrying:
    """The tenacity configuration of one call (see the module docstring)."""
    waiting_after: list[TransientError] = []  # the failure whose backoff is under way

    def before_sleep(retry_state: RetryCallState) -> None:
        exc = _failure(retry_state)
        attempt, delay = retry_state.attempt_number, retry_state.upcoming_sleep
        stats.record(RetryEvent(endpoint, attempt, exc.cause, exc.status, delay))
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
        waiting_after[:] = [exc]

    def give_up(retry_state: RetryCallState) -> NoReturn:
        exc = _failure(retry_state)
        if stop is None or not stop.is_set():  # draining is not running out of retries
            stats.exhausted[endpoint] += 1
            log.warning(
                "retries exhausted",
                endpoint=endpoint,
                attempts=retry_state.attempt_number,
                reason=exc.cause,
                status=exc.status,
            )
        raise exc

    async def pause(seconds: float) -> None:
        if stop is None:
            await sleep(seconds)
        elif not await sleep_unless_stopped(seconds, stop, sleep):
            # Cut short by the drain switch: the caller sees the failure it was waiting out.
            raise waiting_after[0]

    return AsyncRetrying(
        stop=stop_after_attempt(policy.retries + 1)
        # stop_when_event_set is typed for threading.Event; it only calls is_set(), as asyncio's
        | (stop_when_event_set(stop) if stop is not None else stop_never),  # type: ignore[arg-type]
        retry=retry_if_exception(_retryable),
        wait=PolicyWait(policy, rng),
        before_sleep=before_sleep,
        sleep=pause,
        retry_error_callback=give_up,
    )


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
    retrying = _retrying(
        policy,
        endpoint=endpoint,
        on_retry=on_retry,
        sleep=sleep or _default_sleep,
        rng=rng or _default_rng,
        stats=stats if stats is not None else STATS,
        stop=stop,
    )
    numbers = itertools.count(1)

    async def attempt() -> T:
        return await fn(next(numbers))

    result: T = await retrying(attempt)
    return result


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
