"""The retry mechanism: backoff bounds, Retry-After, 5xx factor, retry counts, testing switch,
the drain switch, and hypothesis properties of the schedule tenacity runs."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from goflow_gpu import retry
from goflow_gpu.errors import InvalidRequestError, TransientError
from goflow_gpu.retry import (
    POLICIES,
    RetryPolicy,
    RetryStats,
    backoff_delay,
    call_with_retry,
    parse_retry_after,
)


@pytest.fixture(autouse=True)
def instant_sleeps() -> Iterator[None]:
    retry.set_testing(True)
    yield
    retry.set_testing(False)


class UpperRandom(random.Random):
    """A random source whose uniform(a, b) always returns b: the top of the jitter range."""

    def uniform(self, a: float, b: float) -> float:
        return b


def transient(cause: str = "network", retry_after: float | None = None) -> TransientError:
    status = {"429": 429, "5xx": 503}.get(cause)
    return TransientError(
        f"boom ({cause})", endpoint="GET x", status=status, cause=cause, retry_after=retry_after
    )


POLICY = RetryPolicy(
    retries=3, base=0.5, cap=4.0, server_error_factor=3.0, retry_after_max=60.0, timeout=1.0
)


# --- backoff_delay ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (40, 4.0)]
)
def test_delay_grows_exponentially_up_to_the_cap(attempt: int, ceiling: float) -> None:
    assert backoff_delay(POLICY, attempt, transient(), UpperRandom()) == pytest.approx(ceiling)


def test_full_jitter_stays_within_zero_and_the_ceiling() -> None:
    rng = random.Random(1234)
    for attempt, ceiling in [(1, 0.5), (3, 2.0), (9, 4.0)]:
        samples = [backoff_delay(POLICY, attempt, transient(), rng) for _ in range(500)]
        assert min(samples) >= 0.0
        assert max(samples) <= ceiling
        # Full jitter spreads over the whole range, not a fixed point near either end.
        assert min(samples) < 0.1 * ceiling
        assert max(samples) > 0.9 * ceiling


def test_server_errors_get_longer_delays() -> None:
    rng = UpperRandom()
    assert backoff_delay(POLICY, 2, transient("5xx"), rng) == pytest.approx(3.0)
    assert backoff_delay(POLICY, 2, transient("network"), rng) == pytest.approx(1.0)
    assert backoff_delay(POLICY, 2, transient("429"), rng) == pytest.approx(1.0)
    # At the cap the 5xx factor still applies on top.
    assert backoff_delay(POLICY, 10, transient("5xx"), rng) == pytest.approx(12.0)


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert backoff_delay(POLICY, 10_000, transient(), UpperRandom()) == pytest.approx(4.0)


def test_retry_after_is_a_floor_for_the_delay() -> None:
    rng = UpperRandom()
    assert backoff_delay(POLICY, 1, transient("429", retry_after=7.0), rng) == pytest.approx(7.0)
    # A Retry-After shorter than the jittered backoff does not shorten it.
    assert backoff_delay(POLICY, 4, transient("429", retry_after=1.0), rng) == pytest.approx(4.0)
    assert backoff_delay(POLICY, 1, transient("429", retry_after=0.0), rng) == pytest.approx(0.5)


def test_retry_after_is_clamped() -> None:
    rng = random.Random(5)
    delay = backoff_delay(POLICY, 1, transient("429", retry_after=3600.0), rng)
    assert delay == pytest.approx(60.0)


# --- parse_retry_after ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
        ("inf", None),
        ("Wed, 32 Foo 2015 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after_delta_seconds_and_garbage(
    value: str | None, expected: float | None
) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    # 2015-10-21T07:28:00Z is 1445412480 seconds after the epoch.
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 30) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 -0000", now=1445412480 - 5) == 5.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 +0100", now=1445412480 - 3600) == 0.0


def test_parse_retry_after_date_in_the_past_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 + 100) == 0.0


def test_parse_retry_after_date_uses_the_clock_by_default() -> None:
    from email.utils import formatdate

    seconds = parse_retry_after(formatdate(time.time() + 20, usegmt=True))
    assert seconds is not None
    assert 18.0 <= seconds <= 20.0


# --- policies ---------------------------------------------------------------------------------


def test_contract_retry_counts_per_endpoint() -> None:
    assert {name: p.retries for name, p in POLICIES.items()} == {
        "next-job": 3,
        "status": 3,
        "result": 3,
        "report": 5,
    }
    assert all(0 < p.timeout <= 120 for p in POLICIES.values())


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": 1, "base": 0.0}, "base"),
        ({"retries": 1, "cap": float("inf")}, "cap"),
        ({"retries": 1, "timeout": -1.0}, "timeout"),
        ({"retries": 1, "server_error_factor": 0.5}, "server_error_factor"),
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        RetryPolicy(**kwargs)


# --- call_with_retry --------------------------------------------------------------------------


def test_succeeds_after_transient_failures_and_records_delays() -> None:
    attempts: list[int] = []
    seen: list[tuple[int, str, float]] = []
    stats = RetryStats()

    async def flaky(attempt: int) -> str:
        attempts.append(attempt)
        if attempt == 1:
            raise transient("5xx")
        if attempt == 2:
            raise transient("429", retry_after=2.5)
        return "done"

    result = asyncio.run(
        call_with_retry(
            flaky,
            POLICY,
            endpoint="result",
            on_retry=lambda n, exc, d: seen.append((n, exc.cause, d)),
            rng=UpperRandom(),
            stats=stats,
        )
    )
    assert result == "done"
    assert attempts == [1, 2, 3]
    assert [(n, cause, round(d, 6)) for n, cause, d in seen] == [(1, "5xx", 1.5), (2, "429", 2.5)]
    assert stats.by_cause == {"5xx": 1, "429": 1}
    assert stats.by_endpoint == {"result": 2}
    assert [e.delay for e in stats.recent] == [pytest.approx(1.5), pytest.approx(2.5)]
    assert stats.total == 2


def test_exhausted_retries_raise_the_last_error() -> None:
    errors: list[TransientError] = []
    stats = RetryStats()

    async def always_down(attempt: int) -> None:
        errors.append(transient("network"))
        raise errors[-1]

    with pytest.raises(TransientError) as info:
        asyncio.run(call_with_retry(always_down, POLICY, endpoint="status", stats=stats))
    assert len(errors) == 4  # the first attempt and 3 retries
    assert info.value is errors[-1]
    assert stats.by_cause == {"network": 3}
    assert stats.exhausted == {"status": 1}


def test_zero_retries_means_one_attempt() -> None:
    calls: list[int] = []

    async def down(attempt: int) -> None:
        calls.append(attempt)
        raise transient()

    with pytest.raises(TransientError):
        asyncio.run(call_with_retry(down, RetryPolicy(retries=0), endpoint="x", stats=RetryStats()))
    assert calls == [1]


@pytest.mark.parametrize(
    "error", [InvalidRequestError("bad", endpoint="POST result", status=400), RuntimeError("bug")]
)
def test_permanent_errors_are_not_retried(error: Exception) -> None:
    calls: list[int] = []

    async def refused(attempt: int) -> None:
        calls.append(attempt)
        raise error

    with pytest.raises(type(error)):
        asyncio.run(call_with_retry(refused, POLICY, endpoint="result", stats=RetryStats()))
    assert calls == [1]


def test_testing_switch_makes_sleeps_instant_but_keeps_the_delays() -> None:
    stats = RetryStats()

    async def rate_limited(attempt: int) -> int:
        if attempt < 3:
            raise transient("429", retry_after=50.0)
        return attempt

    started = time.monotonic()
    assert asyncio.run(call_with_retry(rate_limited, POLICY, endpoint="x", stats=stats)) == 3
    assert time.monotonic() - started < 2.0
    assert [e.delay for e in stats.recent] == [50.0, 50.0]


def test_real_sleeps_when_testing_is_off() -> None:
    retry.set_testing(False)
    policy = RetryPolicy(retries=1, base=0.2, cap=0.2, timeout=1.0)

    async def once_down(attempt: int) -> int:
        if attempt == 1:
            raise transient("network", retry_after=0.3)
        return attempt

    started = time.monotonic()
    asyncio.run(call_with_retry(once_down, policy, endpoint="x", stats=RetryStats()))
    assert time.monotonic() - started >= 0.3


def test_an_injected_sleep_receives_each_delay() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def twice_down(attempt: int) -> int:
        if attempt <= 2:
            raise transient("timeout")
        return attempt

    asyncio.run(
        call_with_retry(
            twice_down,
            POLICY,
            endpoint="x",
            sleep=fake_sleep,
            rng=UpperRandom(),
            stats=RetryStats(),
        )
    )
    assert slept == [pytest.approx(0.5), pytest.approx(1.0)]


def test_each_retry_is_logged_with_reason_attempt_delay_and_endpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def down(attempt: int) -> None:
        raise transient("5xx")

    with caplog.at_level(logging.DEBUG, logger="goflow_gpu.retry"), pytest.raises(TransientError):
        asyncio.run(
            call_with_retry(
                down,
                RetryPolicy(retries=2, base=1.0, cap=8.0, server_error_factor=2.0),
                endpoint="report",
                rng=UpperRandom(),
                stats=RetryStats(),
            )
        )
    retries = [r.goflow_fields for r in caplog.records if r.getMessage() == "retrying"]  # type: ignore[attr-defined]
    assert [(f["endpoint"], f["reason"], f["attempt"], f["delay_s"]) for f in retries] == [
        ("report", "5xx", 1, 2.0),
        ("report", "5xx", 2, 4.0),
    ]
    gave_up = [r for r in caplog.records if r.getMessage() == "retries exhausted"]
    assert len(gave_up) == 1
    assert gave_up[0].levelno == logging.WARNING


def test_module_stats_are_used_when_none_is_injected() -> None:
    before = retry.STATS.by_cause["timeout"]

    async def once(attempt: int) -> int:
        if attempt == 1:
            raise transient("timeout")
        return 1

    asyncio.run(call_with_retry(once, POLICY, endpoint="x"))
    assert retry.STATS.by_cause["timeout"] == before + 1


# --- the drain switch (stop=) -------------------------------------------------------------------


def test_a_backoff_wakes_on_the_stop_switch_and_raises_the_last_error() -> None:
    retry.set_testing(False)  # a real 30 s backoff, which only the stop switch can cut short
    stats = RetryStats()
    errors: list[TransientError] = []

    async def down(attempt: int) -> None:
        errors.append(transient("429", retry_after=30.0))
        raise errors[-1]

    async def scenario() -> float:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, stop.set)
        started = time.monotonic()
        with pytest.raises(TransientError) as info:
            await call_with_retry(down, POLICY, endpoint="report", stats=stats, stop=stop)
        assert info.value is errors[-1]
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 5.0
    assert len(errors) == 1  # no attempt after the drain began
    assert stats.by_cause == {"429": 1}  # the backoff was scheduled...
    assert stats.exhausted == {}  # ...but draining is not running out of retries


def test_a_failure_while_stopping_is_raised_at_once() -> None:
    calls: list[int] = []
    stats = RetryStats()

    async def down(attempt: int) -> None:
        calls.append(attempt)
        raise transient("5xx")

    async def scenario() -> None:
        stop = asyncio.Event()
        stop.set()
        await call_with_retry(down, POLICY, endpoint="result", stats=stats, stop=stop)

    with pytest.raises(TransientError):
        asyncio.run(scenario())
    assert calls == [1]
    assert stats.total == 0
    assert stats.exhausted == {}


def test_an_unset_stop_switch_changes_nothing() -> None:
    async def twice_down(attempt: int) -> int:
        if attempt <= 2:
            raise transient()
        return attempt

    async def scenario() -> int:
        return await call_with_retry(
            twice_down, POLICY, endpoint="x", stats=RetryStats(), stop=asyncio.Event()
        )

    assert asyncio.run(scenario()) == 3


# --- hypothesis: properties of the backoff schedule ---------------------------------------------

policies = st.builds(
    RetryPolicy,
    retries=st.integers(0, 8),
    base=st.floats(0.001, 10.0),
    cap=st.floats(0.001, 300.0),
    server_error_factor=st.floats(1.0, 10.0),
    retry_after_max=st.floats(0.001, 600.0),
    timeout=st.just(1.0),
)
causes = st.sampled_from(["429", "5xx", "network", "timeout"])


def _ceiling(policy: RetryPolicy, attempt: int, cause: str) -> float:
    # Written out independently of backoff_delay: base doubling per attempt, capped, 5xx factor.
    ceiling = policy.cap
    if attempt - 1 < 64:
        ceiling = min(policy.cap, policy.base * 2 ** (attempt - 1))
    return ceiling * (policy.server_error_factor if cause == "5xx" else 1.0)


@settings(max_examples=300, deadline=None)
@given(policy=policies, attempt=st.integers(1, 10_000), cause=causes, seed=st.integers(0, 2**32))
def test_property_delay_lies_in_the_full_jitter_range(
    policy: RetryPolicy, attempt: int, cause: str, seed: int
) -> None:
    delay = backoff_delay(policy, attempt, transient(cause), random.Random(seed))
    assert 0.0 <= delay <= _ceiling(policy, attempt, cause) * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(policy=policies, cause=causes)
def test_property_the_ceiling_never_shrinks_and_stops_at_the_cap(
    policy: RetryPolicy, cause: str
) -> None:
    tops = [backoff_delay(policy, n, transient(cause), UpperRandom()) for n in range(1, 40)]
    assert tops == sorted(tops)
    factor = policy.server_error_factor if cause == "5xx" else 1.0
    assert max(tops) <= policy.cap * factor * (1 + 1e-9)
    assert tops[0] == pytest.approx(min(policy.base, policy.cap) * factor)


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    attempt=st.integers(1, 50),
    cause=st.sampled_from(["429", "5xx"]),
    retry_after=st.floats(0.0, 10_000.0),
    seed=st.integers(0, 2**32),
)
def test_property_retry_after_is_a_floor_up_to_the_clamp(
    policy: RetryPolicy, attempt: int, cause: str, retry_after: float, seed: int
) -> None:
    delay = backoff_delay(policy, attempt, transient(cause, retry_after), random.Random(seed))
    assert delay <= policy.retry_after_max
    assert delay >= min(retry_after, policy.retry_after_max)


@settings(max_examples=150, deadline=None)
@given(
    policy=policies,
    failures=st.lists(causes, max_size=12),
    seed=st.integers(0, 2**32),
)
def test_property_the_loop_sleeps_the_schedule_and_counts_every_retry(
    policy: RetryPolicy, failures: list[str], seed: int
) -> None:
    """Whatever tenacity does inside, the world looks as the policy says: attempts, the sleeps
    (drawn from a seeded source, so they can be recomputed by hand), the stats, the outcome."""
    slept: list[float] = []
    stats = RetryStats()

    async def record_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def flaky(attempt: int) -> int:
        if attempt <= len(failures):
            raise transient(failures[attempt - 1])
        return attempt

    async def scenario() -> int:
        return await call_with_retry(
            flaky,
            policy,
            endpoint="e",
            sleep=record_sleep,
            rng=random.Random(seed),
            stats=stats,
        )

    retries_needed = len(failures)
    if retries_needed <= policy.retries:
        assert asyncio.run(scenario()) == retries_needed + 1
        assert stats.exhausted == {}
    else:
        with pytest.raises(TransientError) as info:
            asyncio.run(scenario())
        assert info.value.cause == failures[policy.retries]
        assert stats.exhausted == {"e": 1}
    retried = failures[: min(retries_needed, policy.retries)]
    replay = random.Random(seed)
    expected = [
        backoff_delay(policy, n, transient(cause), replay) for n, cause in enumerate(retried, 1)
    ]
    assert slept == expected
    assert [e.delay for e in stats.recent] == expected
    assert [e.attempt for e in stats.recent] == list(range(1, len(retried) + 1))
    assert stats.by_cause == Counter(retried)
