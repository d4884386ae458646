"""Fault injection: what can go wrong on each route, parsed from a short text, drawn with a seed.

A :class:`Faults` maps a route (``next-job``, ``status``, ``result``, ``report``, ``media``) to a
:class:`FaultSpec` of per-call probabilities. Every call on a route that passes the key check and
is not answered by an outage window draws exactly one number from that route's own
``random.Random``, seeded from ``Faults.seed`` and the route name, so the same seed and the same
sequence of calls on a route give the same faults, whatever other routes do (and however long an
outage lasted).

These draws are independent. Correlated faults (a route down for a while, one combination always
refused, "stored, then 409") are scripted instead: see :mod:`goflow_gpu.simulator.scripted`
(``Simulator.add_outage`` / ``fix_answer``); the app module's docstring lists every fault kind.

Text syntax (the CLI's ``--faults``)::

    result:503=0.1,429=0.05,reset=0.03,slow=0.02,drop=0.02,latency=0.05;status:500=0.1

``ROUTE:KEY=VALUE,...`` parts joined by ``;``. Keys: ``429``, ``500``, ``503``, ``reset``,
``slow``, ``drop`` (probabilities), ``latency`` (seconds added to every call), ``retry-after``
(``1``-style seconds or ``date`` for the HTTP-date form) and ``slow-seconds``. Route ``*`` means
every API route (not ``media``); it is applied first and named routes override the keys they set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Literal

FaultKind = Literal["429", "500", "503", "reset", "slow", "drop"]

API_ROUTES: tuple[str, ...] = ("next-job", "status", "result", "report")
ROUTES: tuple[str, ...] = (*API_ROUTES, "media")
# Accept-then-drop needs a side effect to lose; on next-job it would silently lose the job.
DROP_ROUTES: frozenset[str] = frozenset({"status", "result", "report"})

_RATE_KEYS: dict[str, str] = {
    "429": "rate_429",
    "500": "rate_500",
    "503": "rate_503",
    "reset": "rate_reset",
    "slow": "rate_slow",
    "drop": "rate_drop",
}
_ORDER: tuple[tuple[FaultKind, str], ...] = (
    ("429", "rate_429"),
    ("500", "rate_500"),
    ("503", "rate_503"),
    ("reset", "rate_reset"),
    ("slow", "rate_slow"),
    ("drop", "rate_drop"),
)


def check_retry_after(value: str) -> None:
    """A simulated Retry-After: whole seconds (``"1"``) or ``"date"`` (the HTTP-date form)."""
    if value != "date" and not value.isdigit():
        raise ValueError(f"retry-after={value!r} must be whole seconds (e.g. '1') or 'date'")


@dataclass(frozen=True)
class FaultSpec:
    """Per-call fault probabilities on one route (all 0 by default: a healthy route).

    ``rate_slow`` answers only after ``slow_seconds`` (meant to be past the client's timeout);
    ``rate_drop`` records the call as accepted, then cuts the connection before answering;
    ``latency`` is added to every call; ``retry_after`` is sent with 429s: seconds such as
    ``"1"``, or ``"date"`` for an HTTP-date one second ahead.
    """

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_reset: float = 0.0
    rate_slow: float = 0.0
    rate_drop: float = 0.0
    latency: float = 0.0
    retry_after: str = "1"
    slow_seconds: float = 5.0

    def __post_init__(self) -> None:
        for kind, attr in _ORDER:
            value = getattr(self, attr)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault rate {kind}={value} must be between 0 and 1")
        total = sum(getattr(self, attr) for _, attr in _ORDER)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to {total:g}; they must add up to at most 1")
        if self.latency < 0:
            raise ValueError(f"latency={self.latency} must not be negative")
        if self.slow_seconds <= 0:
            raise ValueError(f"slow-seconds={self.slow_seconds} must be positive")
        check_retry_after(self.retry_after)


@dataclass(frozen=True)
class Faults:
    """Fault specs by route (``next-job``, ``status``, ``result``, ``report``, ``media``)."""

    routes: dict[str, FaultSpec] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        for route, spec in self.routes.items():
            if route not in ROUTES:
                raise ValueError(f"unknown fault route {route!r}; routes are {', '.join(ROUTES)}")
            if spec.rate_drop and route not in DROP_ROUTES:
                raise ValueError(
                    f"drop is not supported on route {route!r}: only status, result and report "
                    "have an effect that can be accepted and then lost"
                )

    def spec(self, route: str) -> FaultSpec:
        """The spec of ``route`` (a healthy one when the route is not listed)."""
        return self.routes.get(route) or FaultSpec()


def _number(part: str, key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"bad fault spec {part!r}: value {text!r} of {key!r} is not a number"
        ) from None


def _settings(part: str, body: str) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"bad fault spec {part!r}: {item!r} is not KEY=VALUE")
        if key in _RATE_KEYS:
            out[_RATE_KEYS[key]] = _number(part, key, value)
        elif key == "latency":
            out["latency"] = _number(part, key, value)
        elif key == "slow-seconds":
            out["slow_seconds"] = _number(part, key, value)
        elif key == "retry-after":
            out["retry_after"] = value
        else:
            known = ", ".join([*_RATE_KEYS, "latency", "retry-after", "slow-seconds"])
            raise ValueError(f"bad fault spec {part!r}: unknown key {key!r} (known: {known})")
    return out


def parse_faults(text: str, *, seed: int = 0) -> Faults:
    """Parse the ``--faults`` syntax (see the module docstring). Raises ``ValueError`` naming
    the bad part. An empty text means no faults."""
    star: dict[str, float | str] = {}
    named: dict[str, dict[str, float | str]] = {}
    for raw in text.split(";"):
        part = raw.strip()
        if not part:
            continue
        route, sep, body = part.partition(":")
        route = route.strip()
        if not sep:
            raise ValueError(f"bad fault spec {part!r}: expected ROUTE:KEY=VALUE,...")
        if route != "*" and route not in ROUTES:
            raise ValueError(
                f"bad fault spec {part!r}: unknown route {route!r} "
                f"(routes: {', '.join(ROUTES)} or * for every API route)"
            )
        settings = _settings(part, body)
        if route == "*":
            star.update(settings)
        else:
            named.setdefault(route, {}).update(settings)
    routes: dict[str, FaultSpec] = {}
    for route in ROUTES:
        merged: dict[str, float | str] = {}
        if route in API_ROUTES:
            merged.update(star)
            if route not in DROP_ROUTES:
                merged.pop("rate_drop", None)
        merged.update(named.get(route, {}))
        if merged:
            try:
                routes[route] = FaultSpec(**merged)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ValueError(f"bad fault spec for route {route!r}: {exc}") from None
    try:
        return Faults(routes=routes, seed=seed)
    except ValueError as exc:
        raise ValueError(f"bad fault spec: {exc}") from None


class FaultPlan:
    """The seeded draw of faults for a running simulator: one generator per route."""

    def __init__(self, faults: Faults | None) -> None:
        self.faults = faults or Faults()
        self._rngs = {route: random.Random(f"{self.faults.seed}:{route}") for route in ROUTES}

    def spec(self, route: str) -> FaultSpec:
        return self.faults.spec(route)

    def draw(self, route: str) -> FaultKind | None:
        """The fault for the next call on ``route``, or ``None``. Always consumes one draw."""
        roll = self._rngs[route].random()
        spec = self.faults.spec(route)
        edge = 0.0
        for kind, attr in _ORDER:
            edge += getattr(spec, attr)
            if roll < edge:
                return kind
        return None


def with_seed(faults: Faults, seed: int) -> Faults:
    """A copy of ``faults`` drawing with ``seed``."""
    return replace(faults, seed=seed)


__all__ = [
    "API_ROUTES",
    "ROUTES",
    "FaultKind",
    "FaultPlan",
    "FaultSpec",
    "Faults",
    "check_retry_after",
    "parse_faults",
    "with_seed",
]
