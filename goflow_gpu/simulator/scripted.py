"""Scripted faults: outage windows and fixed answers, the correlated failures of a real backend.

The per-call probabilities of :mod:`goflow_gpu.simulator.faults` are independent draws. Real
backends also fail in runs: a route is down for a while (an :class:`Outage`), or it answers one
call, one combination or every call the same wrong way (a :class:`FixedAnswer`).

Text syntax (the CLI's repeatable ``--outage`` and ``--answer``), ``:``-separated::

    ROUTE:SECONDS[:after=N][:status=CODE][:retry-after=SECS|date]
        result:2:after=10:status=503:retry-after=1
    ROUTE:STATUS[:times=N][:accept][:media=ID][:analysis=ID][:detail=TEXT]
        result:409:accept:detail=analysis result already exists

Routes are ``next-job``, ``status``, ``result``, ``report`` and ``media``. ``detail=`` must come
last: it takes the rest of the text, colons included. ``media=`` is for ``result`` and
``media``; ``analysis=`` for ``result`` only.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus

from goflow_gpu.simulator.faults import ROUTES, check_retry_after


def _check_route(route: str) -> None:
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; routes are {', '.join(ROUTES)}")


def _check_status(status: int) -> None:
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise ValueError(f"status {status!r} must be an HTTP error code from 400 to 599")


def status_phrase(status: int) -> str:
    """``"service unavailable"`` for 503: the lower-case reason phrase (``"error"`` if none)."""
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


def _canonical_id(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a UUID") from None


@dataclass(frozen=True)
class Outage:
    """One outage window on a route, as configured and as it went so far (read-only).

    It opens at the first call on ``route`` that arrives once the route has accepted ``after``
    calls (results recorded in the ledger, for ``result``; 2xx answers of its handler, for the
    other routes), while no other window of the route is open; it stays open ``seconds`` of
    ``time.monotonic()`` time. While open, every call on the route answers ``status`` with
    ``Retry-After: retry_after`` when that is set (``"date"``: the HTTP-date at which the window
    closes). ``opened_at`` / ``closes_at`` are ``None`` until it opens; ``answered`` counts the
    calls it answered.
    """

    route: str
    seconds: float
    after: int = 0
    status: int = 503
    retry_after: str | None = None
    opened_at: float | None = None
    answered: int = 0

    def __post_init__(self) -> None:
        _check_route(self.route)
        if not self.seconds > 0:
            raise ValueError(f"outage seconds={self.seconds} must be positive")
        if isinstance(self.after, bool) or not isinstance(self.after, int) or self.after < 0:
            raise ValueError(f"outage after={self.after!r} must be a whole number >= 0")
        _check_status(self.status)
        if self.retry_after is not None:
            check_retry_after(self.retry_after)

    @property
    def closes_at(self) -> float | None:
        """``time.monotonic()`` at which the window closes (``None`` until it opens)."""
        return None if self.opened_at is None else self.opened_at + self.seconds

    def is_open(self, now: float | None = None) -> bool:
        """Whether the window is open at ``now`` (default: ``time.monotonic()``)."""
        closes = self.closes_at
        if self.opened_at is None or closes is None:
            return False
        now = time.monotonic() if now is None else now
        return self.opened_at <= now < closes

    def is_closed(self, now: float | None = None) -> bool:
        """Whether the window opened and is over."""
        closes = self.closes_at
        now = time.monotonic() if now is None else now
        return closes is not None and now >= closes


@dataclass(frozen=True)
class FixedAnswer:
    """A fixed error answer for matching calls (read-only; ``used`` counts answers given).

    Matching: the ``route`` and, when set, ``media_id`` (``result`` and ``media``) and
    ``analysis_id`` (``result``), compared as canonical lower-case UUIDs. ``times`` limits how
    many calls get it (``None``: every one). Without ``accept`` it answers after the request's
    own validation (path UUIDs, 404s, body) and before the backend records anything; with
    ``accept`` the call is handled normally (recorded in the ledger) and only an accepted (2xx)
    answer is replaced.
    """

    route: str
    status: int
    detail: str | None = None
    media_id: str | None = None
    analysis_id: str | None = None
    times: int | None = None
    accept: bool = False
    used: int = 0

    def __post_init__(self) -> None:
        _check_route(self.route)
        _check_status(self.status)
        if self.media_id is not None and self.route not in ("result", "media"):
            raise ValueError(f"media= applies to routes result and media, not {self.route!r}")
        if self.analysis_id is not None and self.route != "result":
            raise ValueError(f"analysis= applies to route result only, not {self.route!r}")
        object.__setattr__(self, "media_id", _canonical_id("media", self.media_id))
        object.__setattr__(self, "analysis_id", _canonical_id("analysis", self.analysis_id))
        if self.times is not None and (
            isinstance(self.times, bool) or not isinstance(self.times, int) or self.times < 1
        ):
            raise ValueError(f"times={self.times!r} must be a whole number >= 1 (or unset)")

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.used >= self.times

    @property
    def text(self) -> str:
        """The answer's ``detail``: the configured one or a default naming the status."""
        return self.detail or f"{status_phrase(self.status)} (simulated fixed answer)"

    def matches(self, route: str, media_id: str | None, analysis_id: str | None) -> bool:
        if self.exhausted or route != self.route:
            return False
        if self.media_id is not None and (media_id or "").lower() != self.media_id:
            return False
        return self.analysis_id is None or (analysis_id or "").lower() == self.analysis_id


# -- text syntax ------------------------------------------------------------------------------


def _whole(spec: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"bad spec {spec!r}: {key}={value!r} is not a whole number") from None


def _head(spec: str, what: str) -> tuple[str, str, list[str]]:
    route, sep, rest = spec.partition(":")
    route = route.strip()
    if route not in ROUTES:
        raise ValueError(
            f"bad spec {spec!r}: unknown route {route!r} (routes: {', '.join(ROUTES)})"
        )
    first, _, rest = rest.partition(":")
    first = first.strip()
    if not sep or not first:
        raise ValueError(f"bad spec {spec!r}: expected ROUTE:{what}[:KEY=VALUE...]")
    return route, first, rest.split(":") if rest else []


def parse_outage(spec: str) -> Outage:
    """Parse ``ROUTE:SECONDS[:after=N][:status=CODE][:retry-after=SECS|date]`` (see the module
    docstring). Raises ``ValueError`` naming the bad part."""
    route, seconds_text, options = _head(spec, "SECONDS")
    try:
        seconds = float(seconds_text)
    except ValueError:
        raise ValueError(f"bad spec {spec!r}: seconds {seconds_text!r} is not a number") from None
    after, status, retry_after = 0, 503, None
    for option in options:
        key, sep, value = (part.strip() for part in option.partition("="))
        if not sep or not value:
            raise ValueError(f"bad spec {spec!r}: {option!r} is not KEY=VALUE")
        if key == "after":
            after = _whole(spec, key, value)
        elif key == "status":
            status = _whole(spec, key, value)
        elif key == "retry-after":
            retry_after = value
        else:
            raise ValueError(
                f"bad spec {spec!r}: unknown key {key!r} (known: after, status, retry-after)"
            )
    try:
        return Outage(route, seconds, after=after, status=status, retry_after=retry_after)
    except ValueError as exc:
        raise ValueError(f"bad spec {spec!r}: {exc}") from None


def parse_answer(spec: str) -> FixedAnswer:
    """Parse ``ROUTE:STATUS[:times=N][:accept][:media=ID][:analysis=ID][:detail=TEXT]`` (see the
    module docstring). Raises ``ValueError`` naming the bad part."""
    route, status_text, options = _head(spec, "STATUS")
    status = _whole(spec, "status", status_text)
    found: dict[str, str] = {}
    accept = False
    for index, option in enumerate(options):
        key, sep, value = option.partition("=")
        key = key.strip()
        if key == "detail" and sep:
            found["detail"] = ":".join([value, *options[index + 1 :]]).strip()
            if not found["detail"]:
                raise ValueError(f"bad spec {spec!r}: detail= needs a text")
            break
        if key == "accept" and not sep:
            accept = True
            continue
        value = value.strip()
        if key not in ("times", "media", "analysis"):
            raise ValueError(
                f"bad spec {spec!r}: unknown option {option!r} "
                "(known: times=N, accept, media=ID, analysis=ID, detail=TEXT)"
            )
        if not sep or not value:
            raise ValueError(f"bad spec {spec!r}: {option!r} is not KEY=VALUE")
        found[key] = value
    times = _whole(spec, "times", found["times"]) if "times" in found else None
    try:
        return FixedAnswer(
            route,
            status,
            found.get("detail"),
            media_id=found.get("media"),
            analysis_id=found.get("analysis"),
            times=times,
            accept=accept,
        )
    except ValueError as exc:
        raise ValueError(f"bad spec {spec!r}: {exc}") from None


__all__ = ["FixedAnswer", "Outage", "parse_answer", "parse_outage", "status_phrase"]
