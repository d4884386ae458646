"""The GoFlow agent API client: four endpoints over one keep-alive aiohttp session.

::

    async with GoFlowClient(settings.base_url, settings.require_api_key()) as api:
        raw = await api.next_job()                     # NoJobAvailable when the queue is empty
        manifest = protocol.parse_manifest(raw)        # validation is the caller's job
        await api.set_status(manifest.project.id, "processing")
        code = await api.post_result(project_id, media_id, analysis_id, body)   # 200 or 201
        await api.put_report(project_id, report)

Every answer and every transport failure is mapped to :mod:`goflow_gpu.errors` in one function,
:func:`_map_outcome`; retries go through :func:`goflow_gpu.retry.call_with_retry` with the
endpoint's policy, so what is retried is decided by the one predicate ``errors.is_retryable``.

Decisions worth knowing:

- ids are checked with :func:`protocol.check_uuid` before any call; a bad id raises
  :class:`InvalidRequestError` and nothing is sent. Paths use the ids as the caller spells them
  (the server's own spelling); comparisons elsewhere are canonical (lower case).
- ``stopping``: once set, no further retries and no retry sleeps (a drain is never held up).
- The ``X-API-Key`` header is added per request, never as a session default: an injected session
  may also fetch images from other hosts, which must never see the key. Redirects are not
  followed for the same reason (the contract has none); a 3xx is a non-retried :class:`ApiError`.
- A 2xx next-job whose body is not a JSON object is a :class:`ProtocolError` and is *not*
  retried: a server that hands out a broken job will hand it out broken again, and retrying a
  job-assigning GET risks taking jobs we then cannot track. Bodies of the other endpoints' 2xx
  answers are not needed and not inspected.
- Exactly-once results: if an attempt of a result POST may have reached the server (timeout,
  dropped connection, 5xx) and a later attempt of the same call gets the duplicate-400, the
  raised :class:`DuplicateSubmission` has ``prior_attempt_unknown = True``: the server most
  likely holds our own result. A failed *connect* does not count: nothing was sent.
- 403 is treated like 401 (the key is not accepted for this call): a security event, no retry.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import aiohttp
from pydantic import SecretStr, ValidationError

from goflow_gpu import protocol
from goflow_gpu.answers import is_transient_status, speaks_of_duplicate
from goflow_gpu.errors import (
    ApiError,
    AuthenticationError,
    ConfigError,
    ConflictError,
    DuplicateSubmission,
    InvalidRequestError,
    NoJobAvailable,
    NotFoundError,
    ProtocolError,
    TransientError,
    UnprocessableError,
)
from goflow_gpu.logs import bind, get_logger, register_secret
from goflow_gpu.protocol import ProjectStatus, ReportBody, ResultBody, StatusBody
from goflow_gpu.retry import POLICIES, RetryPolicy, RetryStats, call_with_retry, parse_retry_after
from goflow_gpu.settings import check_backend_url

__all__ = ["GoFlowClient"]

#: Called after every attempt: (endpoint, HTTP status or None, seconds, failure cause or None).
#: Metrics and readiness use it; it must be quick and must not raise.
CallHook = Callable[[str, int | None, float, str | None], None]

log = get_logger(__name__)

_METHODS: Final = {"next-job": "GET", "status": "PUT", "result": "POST", "report": "PUT"}
# A next-job manifest of 10,000 media is a few MB; anything far beyond is not a manifest.
_MAX_BODY: Final = 32 * 1024 * 1024
_DETAIL_LIMIT: Final = 500
_PING_TIMEOUT: Final = 10.0
_USER_AGENT: Final = "goflow-gpu/0.1"


@dataclass(frozen=True)
class _Call:
    """What one API call is about; used in messages and log fields (never the key)."""

    endpoint: str  # a policy key: "next-job", "status", "result", "report" (or "ping")
    method: str
    ids: Mapping[str, str]
    wants_object: bool = False  # the 2xx body must be a JSON object (next-job)

    @property
    def route(self) -> str:
        """The route name used as ``ApiError.endpoint``, e.g. ``"POST result"``."""
        return f"{self.method} {self.endpoint}"

    def describe(self) -> str:
        ids = ", ".join(f"{k}={v}" for k, v in self.ids.items())
        return f"{self.route}" + (f" ({ids})" if ids else "")


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer, read completely."""

    status: int
    body: bytes
    retry_after: str | None


class _BodyTooLarge(Exception):
    """An answer longer than any answer of the contract."""


@dataclass
class _CallState:
    """Shared by the attempts of one call."""

    maybe_delivered: bool = False  # an earlier attempt may have reached the server


def _detail(body: bytes) -> Any:
    """The server's explanation: ``detail`` (or ``message``/``error``) of a JSON body, or text."""
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip() or None
    if isinstance(parsed, dict):
        for key in ("detail", "message", "error"):
            if key in parsed:
                return parsed[key]
    return parsed


def _detail_text(detail: Any) -> str:
    if detail is None:
        return ""
    return detail if isinstance(detail, str) else json.dumps(detail, default=str)


def _short(text: str, limit: int = _DETAIL_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _map_outcome(call: _Call, outcome: _Answer | BaseException) -> Any:
    """Return the payload of a successful answer, or raise the matching :class:`ApiError`.

    The payload is the parsed JSON object for calls that want one, else ``None``. This is the one
    place where HTTP statuses and transport exceptions become the error tree.
    """
    where = call.describe()
    if isinstance(outcome, BaseException):
        # TimeoutError first: aiohttp's timeout errors are also ClientErrors.
        if isinstance(outcome, TimeoutError):
            raise TransientError(
                f"{where}: timed out", endpoint=call.route, cause="timeout"
            ) from None
        if isinstance(outcome, aiohttp.ClientConnectorCertificateError):
            # Not a passing fault: retrying cannot fix a certificate, and the key must never be
            # sent to a host that could not prove who it is.
            raise ConfigError(
                f"{where}: the backend's TLS certificate failed verification "
                f"({_short(str(outcome.certificate_error), 200)}); check base_url and the "
                "machine's CA certificates"
            ) from None
        if isinstance(outcome, (aiohttp.ClientError, OSError)):
            reason = _short(f"{type(outcome).__name__}: {outcome}", 200)
            raise TransientError(
                f"{where}: network error: {reason}", endpoint=call.route, cause="network"
            ) from None
        if isinstance(outcome, _BodyTooLarge):
            raise ProtocolError(
                f"{where}: answer body larger than {_MAX_BODY} bytes", endpoint=call.route
            ) from None
        raise outcome  # not a transport failure: a bug, let it surface unchanged

    status = outcome.status
    if 200 <= status < 300:
        if not call.wants_object:
            return None
        try:
            payload = json.loads(outcome.body)
        except ValueError:
            raise ProtocolError(
                f"{where}: HTTP {status} but the body is not valid JSON "
                f"({len(outcome.body)} bytes)",
                endpoint=call.route,
                status=status,
            ) from None
        if not isinstance(payload, dict):
            raise ProtocolError(
                f"{where}: HTTP {status} but the body is a JSON {type(payload).__name__}, "
                "not an object",
                endpoint=call.route,
                status=status,
            )
        return payload

    detail = _detail(outcome.body)
    full_text = _detail_text(detail)
    text = _short(full_text)
    message = f"{where}: HTTP {status}" + (f": {text}" if text else "")
    kwargs: dict[str, Any] = {"endpoint": call.route, "status": status, "detail": detail}
    if status in (401, 403):
        raise AuthenticationError(message, **kwargs)
    if status == 404:
        raise (NoJobAvailable if call.endpoint == "next-job" else NotFoundError)(message, **kwargs)
    if status == 400:
        # The contract says "400 bad request OR duplicate submission" without fixing the wording;
        # the meaning is read by answers.speaks_of_duplicate, not one phrasing.
        duplicate = speaks_of_duplicate(full_text)
        raise (DuplicateSubmission if duplicate else InvalidRequestError)(message, **kwargs)
    if status == 409:
        raise ConflictError(message, **kwargs)
    if status == 422:
        raise UnprocessableError(message, **kwargs)
    if is_transient_status(status):
        cause = "timeout" if status == 408 else "5xx" if status >= 500 else str(status)
        raise TransientError(
            message, retry_after=parse_retry_after(outcome.retry_after), cause=cause, **kwargs
        )
    raise ApiError(message, **kwargs)


class GoFlowClient:
    """Client of the GoFlow agent API.

    ``base_url`` must be https (plain http only to loopback test servers); ``api_key`` is sent as
    ``X-API-Key`` and appears nowhere else. ``policies`` overrides the retry policy of some
    endpoints (missing ones keep the defaults). ``session`` is used as given and not closed;
    otherwise one keep-alive session is created on first use and closed by :meth:`close`.
    ``stats`` receives retry counts (default: the process-wide ``retry.STATS``).
    """

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        policies: Mapping[str, RetryPolicy] = POLICIES,
        session: aiohttp.ClientSession | None = None,
        stats: RetryStats | None = None,
        max_connections: int = 64,
        on_call: CallHook | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        try:
            self._base_url = check_backend_url(base_url, "base_url")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not api_key.get_secret_value().strip():
            raise ConfigError("the API key is empty: export the agent API key in GOFLOW_API_KEY")
        self._api_key = api_key
        # Defence in depth: even if the key ends up in some text, the log filter masks it.
        register_secret(api_key.get_secret_value())
        self._policies: dict[str, RetryPolicy] = {**POLICIES, **policies}
        self._session = session
        self._owns_session = session is None
        self._stats = stats
        self._max_connections = max_connections
        self._on_call = on_call
        self._stopping = stopping

    def __repr__(self) -> str:
        return f"GoFlowClient(base_url={self._base_url!r})"

    @property
    def base_url(self) -> str:
        return self._base_url

    async def __aenter__(self) -> GoFlowClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it. Safe to call twice."""
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._owns_session:
                raise ConfigError("the ClientSession given to GoFlowClient is closed")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300),
                headers={"User-Agent": _USER_AGENT},
            )
        return self._session

    # --- the four endpoints -----------------------------------------------------------------

    async def next_job(self) -> dict[str, Any]:
        """Take the next job: the raw manifest object (validate it with ``parse_manifest``).

        Raises :class:`NoJobAvailable` when the queue is empty, :class:`ProtocolError` when the
        body is not a JSON object.
        """
        call = _Call("next-job", "GET", {}, wants_object=True)
        payload, _ = await self._call(call, protocol.NEXT_JOB_PATH)
        assert isinstance(payload, dict)  # _map_outcome guarantees it for wants_object
        return payload

    async def set_status(self, project_id: str, status: ProjectStatus) -> None:
        """Set the project's status (``processing`` or ``completed``)."""
        ids = _checked_ids("PUT status", project_id=project_id)
        try:
            body = StatusBody(status=status).model_dump()
        except ValidationError:
            raise InvalidRequestError(
                f"PUT status (project_id={ids['project_id']}): status {status!r} is not "
                "'processing' or 'completed'; no call made",
                endpoint="PUT status",
            ) from None
        call = _Call("status", "PUT", ids)
        await self._call(call, protocol.status_path(ids["project_id"]), body)

    async def post_result(
        self, project_id: str, media_id: str, analysis_id: str, body: ResultBody
    ) -> int:
        """Submit one media x analysis result. Returns the HTTP status (200 updated, 201 created).

        Raises :class:`DuplicateSubmission` (see ``prior_attempt_unknown``) when the server
        already has this combination.
        """
        ids = _checked_ids(
            "POST result", project_id=project_id, media_id=media_id, analysis_id=analysis_id
        )
        call = _Call("result", "POST", ids)
        path = protocol.result_path(ids["project_id"], ids["media_id"], ids["analysis_id"])
        _, status = await self._call(call, path, body.wire())
        return status

    async def put_report(self, project_id: str, body: ReportBody) -> None:
        """Send the project's final quality report."""
        ids = _checked_ids("PUT report", project_id=project_id)
        call = _Call("report", "PUT", ids)
        await self._call(call, protocol.report_path(ids["project_id"]), body.wire())

    async def ping(self) -> float:
        """Round-trip time in seconds of a GET on the base URL, without taking a job.

        Any HTTP answer means the backend is reachable; the key is not sent (this is not an API
        route). Raises :class:`TransientError` when it cannot be reached. Not retried.
        """
        call = _Call("ping", "GET", {})
        started = time.monotonic()
        try:
            async with self._http().get(
                self._base_url + "/",
                timeout=aiohttp.ClientTimeout(total=_PING_TIMEOUT),
                allow_redirects=False,
            ) as response:
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            failure = exc
        else:
            elapsed = time.monotonic() - started
            log.info(
                "api call",
                endpoint="ping",
                method="GET",
                status=status,
                duration_ms=round(elapsed * 1000, 1),
            )
            return elapsed
        try:
            _map_outcome(call, failure)
        except ApiError as error:
            log.warning("backend unreachable", endpoint="ping", error=str(error))
            raise
        raise AssertionError("unreachable: _map_outcome raises for every failure")

    # --- one call, with retries ---------------------------------------------------------------

    async def _call(self, call: _Call, path: str, json_body: Any = None) -> tuple[Any, int]:
        data: bytes | None = None
        if json_body is not None:
            try:
                # allow_nan=False: NaN/Infinity are not JSON and a strict server refuses them.
                data = json.dumps(json_body, allow_nan=False, ensure_ascii=False).encode()
            except ValueError as exc:
                raise InvalidRequestError(
                    f"{call.describe()}: body is not valid JSON ({exc}); no call made",
                    endpoint=call.route,
                ) from None
        state = _CallState()
        policy = self._policies[call.endpoint]

        async def attempt(number: int) -> tuple[Any, int]:
            return await self._attempt(call, path, data, policy, number, state)

        # Bound, so that the retry module's lines carry the ids of the call too.
        with bind(**call.ids):
            return await call_with_retry(
                attempt, policy, endpoint=call.endpoint, stats=self._stats, stop=self._stopping
            )

    async def _attempt(
        self,
        call: _Call,
        path: str,
        data: bytes | None,
        policy: RetryPolicy,
        number: int,
        state: _CallState,
    ) -> tuple[Any, int]:
        headers = {"X-API-Key": self._api_key.get_secret_value(), "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        started = time.monotonic()
        outcome: _Answer | BaseException
        try:
            async with self._http().request(
                call.method,
                self._base_url + path,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=policy.timeout),
                allow_redirects=False,
            ) as response:
                outcome = _Answer(
                    response.status,
                    await _read_limited(response),
                    response.headers.get("Retry-After"),
                )
        except (TimeoutError, aiohttp.ClientError, OSError, _BodyTooLarge) as exc:
            outcome = exc
            # A refused connect sent nothing; anything later may have reached the server.
            if not isinstance(exc, aiohttp.ClientConnectorError):
                state.maybe_delivered = True
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        if self._on_call is not None:
            answered = outcome.status if isinstance(outcome, _Answer) else None
            cause = None
            if answered is None:
                cause = "timeout" if isinstance(outcome, TimeoutError) else "network"
            self._on_call(call.endpoint, answered, duration_ms / 1000, cause)
        fields: dict[str, Any] = {
            "endpoint": call.endpoint,
            "method": call.method,
            **call.ids,
            "attempt": number,
            "duration_ms": duration_ms,
        }
        try:
            payload = _map_outcome(call, outcome)
        except ApiError as error:
            if isinstance(error, TransientError) and error.cause == "5xx":
                state.maybe_delivered = True
            error.prior_attempt_unknown = state.maybe_delivered
            _log_failure(error, fields)
            raise
        assert isinstance(outcome, _Answer)  # exceptions always raise in _map_outcome
        log.debug("api call", status=outcome.status, **fields)  # INFO: failures only
        return payload, outcome.status


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > _MAX_BODY:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _log_failure(error: ApiError, fields: dict[str, Any]) -> None:
    fields = {**fields, "status": error.status}
    if isinstance(error, NoJobAvailable):
        log.debug("api call", **fields)  # the normal idle answer, not a failure
        return
    if isinstance(error, TransientError):
        fields["reason"] = error.cause
    detail = _short(_detail_text(error.detail))
    if detail:
        fields["detail"] = detail
    if isinstance(error, AuthenticationError):
        log.error("authentication failed", security_event=True, **fields)
        return
    log.warning("api call failed", error=type(error).__name__, **fields)


def _checked_ids(route: str, **ids: str) -> dict[str, str]:
    """The ids as given, once each is checked to be a UUID; else :class:`InvalidRequestError`
    naming the first bad one (nothing sent). Paths keep the caller's spelling (the server's own,
    upper case included): the worker compares ids canonically but never rewrites them."""
    checked: dict[str, str] = {}
    for name, value in ids.items():
        try:
            protocol.check_uuid(value)
            checked[name] = value
        except ValueError as exc:
            raise InvalidRequestError(
                f"{route}: {name} {_short(repr(value), 80)} {exc}; no call made", endpoint=route
            ) from None
    return checked
