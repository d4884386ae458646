"""Job-level backoff: what happens when a transient failure outlasts the client's retries.

The client retries each call a few times (:mod:`goflow_gpu.retry`, the contract's 3-5 attempts
over seconds). A backend deploy, an image CDN incident or a network partition lasts longer than
that. Giving up then would turn a passing fault into a lost result, so instead the *job* pauses:
an :class:`Outage` is shared by every task of a job that talks to one service (one for the
GoFlow backend, one for the image hosts). The first task whose call fails past its retries opens
the outage; from then on every task waits for the same next try (growing, jittered, capped,
the server's Retry-After honoured), one call probes the service, and a success closes the outage
for all of them. Nothing is marked terminal while it lasts: combinations stay ``pending`` /
``ready`` / ``posting`` and ``completed`` waits.

How long to wait in total is ``patience`` seconds from the start of the outage: ``serve`` waits
forever (``None``); ``run`` waits ``outage_patience`` (10 minutes by default) and then ends the
job unfinished (:class:`PatienceExhausted`), with its state kept, so that the process can exit
with "try again later" (75) and the next start resumes.

Every wait wakes at once when the worker is asked to stop (:class:`Stopped`): a drain never
sits out a backoff.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from goflow_gpu.errors import ApiError, GoFlowError, MediaError, TransientError
from goflow_gpu.logs import get_logger

__all__ = ["Outage", "PatienceExhausted", "Stopped"]

T = TypeVar("T")
log = get_logger(__name__)


class PatienceExhausted(GoFlowError):
    """A service stayed unavailable for longer than the configured patience."""

    def __init__(self, message: str, *, service: str, seconds: float) -> None:
        super().__init__(message)
        self.service = service
        self.seconds = seconds


class Stopped(Exception):
    """The worker was asked to stop while a call waited for a service to come back."""


#: Called when an outage opens (reason text) or closes (``None``); must not raise.
OutageHook = Callable[[str, str | None], None]


class Outage:
    """The shared backoff state of one service for one job (see the module docstring).

    ``base``/``cap`` bound the delay between probes (full jitter above ``base``: the delay is
    drawn from ``[base, min(cap, base * 2**n)]``); ``retry_after_max`` caps a server's
    Retry-After. ``clock``/``rng`` are seams for tests.
    """

    def __init__(
        self,
        service: str,
        *,
        stopping: asyncio.Event,
        patience: float | None,
        base: float = 1.0,
        cap: float = 30.0,
        retry_after_max: float = 120.0,
        on_change: OutageHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if patience is not None and patience < 0:
            raise ValueError(f"patience must be >= 0 seconds or None, got {patience}")
        self.service = service
        self.stopping = stopping
        self.patience = patience
        self.base = base
        self.cap = cap
        self.retry_after_max = retry_after_max
        self.on_change = on_change
        self.clock = clock
        self.rng = rng or random.Random()
        self.since: float | None = None  # when the current outage began
        self.failures = 0  # failed probes in the current outage
        self.next_try = 0.0  # no call before this clock reading
        self.last_reason: str | None = None
        self._changed = asyncio.Event()
        self._probing = False  # a call is probing the service during an outage
        self._scheduled_at = float("-inf")  # when next_try was last set

    @property
    def active(self) -> bool:
        """Whether the service is considered down right now."""
        return self.since is not None

    async def call(self, fn: Callable[[], Awaitable[T]], *, what: str) -> T:
        """Run ``fn`` until it succeeds, waiting out outages of this service.

        Raises :class:`Stopped` when asked to stop while the service is down (the caller leaves
        its work as it is, to be resumed), :class:`PatienceExhausted` when the outage outlasts
        the patience; any non-transient error of ``fn`` propagates unchanged.
        """
        while True:
            probe = await self.wait_turn()
            started = self.clock()
            try:
                result = await fn()
            except TransientError as exc:
                self.failed(exc, what=what, started=started)
                if self.stopping.is_set():
                    raise Stopped from None
                self.check_patience()
                continue
            except (ApiError, MediaError):
                self.recovered()  # a definite answer: the service is up (it said no)
                raise
            else:
                self.recovered()
                return result
            finally:
                if probe:
                    self._probing = False
                    self._changed.set()

    async def wait_turn(self) -> bool:
        """Wait until a call may be made; returns whether this call is the outage's probe.

        While the service is down only one call at a time probes it, at the scheduled time;
        the others wait for its outcome. Raises :class:`Stopped` if stopping while down.
        """
        while self.active:
            if self.stopping.is_set():
                raise Stopped
            self.check_patience()
            delay = self.next_try - self.clock()
            if delay <= 0 and not self._probing:
                self._probing = True
                return True
            self._changed.clear()
            waits = [
                asyncio.ensure_future(self.stopping.wait()),
                asyncio.ensure_future(self._changed.wait()),
            ]
            try:
                await asyncio.wait(
                    waits,
                    timeout=max(delay, 0.0) if not self._probing else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for waiter in waits:
                    waiter.cancel()
        return False

    def failed(self, exc: TransientError, *, what: str, started: float | None = None) -> None:
        """Record a call that failed past its retries; opens the outage or pushes the next try.

        A failure of a call that started before the current schedule was set (another task's
        call that was already on the way) does not push it further: one outage, one schedule.
        """
        now = self.clock()
        reason = f"{what}: {exc.cause}" + (f" (HTTP {exc.status})" if exc.status else "")
        self.last_reason = reason
        if self.since is None:
            self.since = now
            self.failures = 0
            log.warning(
                "service unavailable past the call's retries: pausing the job's calls to it",
                service=self.service,
                reason=reason,
                patience_s=self.patience,
            )
            if self.on_change is not None:
                self.on_change(self.service, reason)
        elif started is not None and started < self._scheduled_at:
            return
        self.failures += 1
        ceiling = max(self.base, min(self.cap, self.base * 2.0 ** min(self.failures - 1, 30)))
        delay = self.rng.uniform(self.base, ceiling)
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.retry_after_max))
        self._scheduled_at = now
        self.next_try = now + delay
        log.info(
            "waiting for the service",
            service=self.service,
            reason=reason,
            probe=self.failures,
            delay_s=round(delay, 3),
            down_s=round(now - self.since, 1),
        )
        self._changed.set()

    def check_patience(self) -> None:
        """Raise :class:`PatienceExhausted` when the current outage is older than the patience."""
        if self.since is None or self.patience is None:
            return
        down = self.clock() - self.since
        if down > self.patience:
            raise PatienceExhausted(
                f"{self.service} unavailable for {down:.0f} s (patience {self.patience:g} s); "
                f"last failure: {self.last_reason}",
                service=self.service,
                seconds=down,
            )

    def forget(self) -> None:
        """The job that owned this outage ended: report it closed without logging a recovery."""
        if self.since is not None and self.on_change is not None:
            self.on_change(self.service, None)
        self.since = None

    def recovered(self) -> None:
        """Record a successful call: the outage, if any, is over for every waiting task."""
        if self.since is None:
            return
        down = self.clock() - self.since
        log.info(
            "service available again",
            service=self.service,
            down_s=round(down, 1),
            probes=self.failures,
        )
        self.since = None
        self.failures = 0
        self.next_try = 0.0
        self._changed.set()
        if self.on_change is not None:
            self.on_change(self.service, None)
