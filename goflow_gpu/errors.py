"""The exception tree of goflow-gpu.

Every error the worker raises is a :class:`GoFlowError`. Foreign exceptions (aiohttp, sqlite3,
jsonschema, vLLM, PIL) are mapped to this tree at the boundary where they occur, so the rest of
the code only ever catches these::

    GoFlowError
    ├── ConfigError                  bad settings at startup (CLI exit code 2)
    ├── ApiError                     a backend call failed (endpoint, status, detail)
    │   ├── AuthenticationError      401: bad or missing key; security event, never retried
    │   ├── NoJobAvailable           404 on next-job: nothing to do now, poll again later
    │   ├── NotFoundError            404 elsewhere: unknown project, media or analysis
    │   ├── InvalidRequestError      400: the request was refused as it was
    │   │   └── DuplicateSubmission  400 whose detail says the combination was already submitted
    │   ├── ConflictError            409: the backend has this already, or a lock refuses it
    │   ├── UnprocessableError       422: the body was understood but invalid (server's detail kept)
    │   ├── ProtocolError            a 2xx whose body is not what the contract says
    │   └── TransientError           network error, timeout, 429, 5xx: retryable
    ├── ManifestError                a job manifest that fails validation (names field and value)
    ├── MediaError                   an image that could not be fetched or failed validation
    ├── EngineError                  the inference engine failed to load or to answer
    ├── PatienceExhausted            a service stayed down longer than the patience (patience.py)
    └── StateError                   the local state cannot be used (corrupt, locked, unwritable)

What is retryable is decided in exactly one place, :func:`is_retryable`; what every answer means
to the job (refused, landed, park, ...) in :mod:`goflow_gpu.answers`.
"""

from __future__ import annotations

from typing import Any


class GoFlowError(Exception):
    """Base of every error raised by goflow-gpu."""


class ConfigError(GoFlowError):
    """The configuration cannot work (missing key, insecure URL, bad value)."""


class ApiError(GoFlowError):
    """A call to the GoFlow backend failed.

    ``endpoint`` is the route template (``"POST result"``, ...), ``status`` the HTTP status code
    (``None`` for network errors) and ``detail`` the server's explanation, when it gave one.
    The message never contains the API key: nothing that builds it has access to the key.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        status: int | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.detail = detail
        # True when an earlier attempt of the same call may have reached the server (network
        # error after connecting, timeout, 5xx): a "duplicate" answer then means it landed.
        self.prior_attempt_unknown = False

    @property
    def detail_text(self) -> str:
        """The server's detail as text ('' when it gave none)."""
        if self.detail is None:
            return ""
        return self.detail if isinstance(self.detail, str) else str(self.detail)


class AuthenticationError(ApiError):
    """401: the key is missing or wrong. Never retried."""


class NoJobAvailable(ApiError):
    """404 on next-job: the queue is empty for now."""


class NotFoundError(ApiError):
    """404: the project, media or analysis is unknown to the backend."""


class InvalidRequestError(ApiError):
    """400: the backend refused the request as it was. Not retried."""


class DuplicateSubmission(InvalidRequestError):
    """400 saying this was already submitted (:func:`goflow_gpu.answers.speaks_of_duplicate`).

    ``prior_attempt_unknown`` is true when an earlier attempt of the same call may have reached
    the server (network error, timeout, 5xx): the duplicate is then most likely our own result.
    """


class ConflictError(ApiError):
    """409: the backend already has this, or something (a lock) refuses it now."""


class UnprocessableError(ApiError):
    """422: the body was well-formed but failed the backend's validation. Not retried."""


class ProtocolError(ApiError):
    """The backend answered 2xx with a body that does not follow the contract."""


class TransientError(ApiError):
    """A failure that may go away: network error, timeout, 429 or 5xx.

    ``retry_after`` is the server's Retry-After in seconds, already parsed, when it sent one.
    ``cause`` is a short machine-readable reason used in logs and metrics
    (``"network"``, ``"timeout"``, ``"429"``, ``"5xx"``).
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        status: int | None = None,
        detail: Any = None,
        retry_after: float | None = None,
        cause: str = "network",
    ) -> None:
        super().__init__(message, endpoint=endpoint, status=status, detail=detail)
        self.retry_after = retry_after
        self.cause = cause


class ManifestError(GoFlowError):
    """A job manifest failed validation. ``problems`` lists ``(field path, bad value, message)``."""

    def __init__(self, message: str, problems: list[tuple[str, Any, str]] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class MediaError(GoFlowError):
    """An image could not be fetched or is not acceptable (status, type, size, pixels)."""


class EngineError(GoFlowError):
    """The inference engine could not be loaded or failed to answer."""


class StateError(GoFlowError):
    """The local state directory or database cannot be used."""


def is_retryable(exc: BaseException) -> bool:
    """The one predicate that decides whether a failed backend call may be tried again."""
    return isinstance(exc, TransientError)


# The exit codes of every command, in one place: ``cli._errors()`` maps the error tree to them,
# the worker returns 1 and 75 itself, and ``--help`` prints this table. (code, meaning) pairs.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "ok (or drained on SIGTERM)"),
    (1, "a job was skipped or parked as needs-attention; any other error"),
    (2, "bad configuration or usage (a broken prompt catalog, a model that cannot be used)"),
    (3, "the backend refused the API key (GOFLOW_API_KEY)"),
    (4, "the local state cannot be used (corrupt, locked, unwritable)"),
    (5, "the inference engine failed while running; state kept, a restart resumes"),
    (75, "run: the backend or an image host stayed down past outage_patience; try again later"),
    (130, "interrupted (Ctrl-C)"),
)


def exit_code(exc: BaseException) -> int:
    """The exit code (see :data:`EXIT_CODES`) of a command that stops on ``exc``."""
    for kind, code in (
        (ConfigError, 2),
        (AuthenticationError, 3),
        (StateError, 4),
        (EngineError, 5),
    ):
        if isinstance(exc, kind):
            return code
    return 1
