"""Structured logging in one place: context ids, redaction, JSON or console lines.

Every module logs through :func:`get_logger`::

    log = get_logger(__name__)
    log.info("api call", endpoint="POST result", status=201, duration_ms=12.5)

Fields go into the record as data, never into the message by hand. The correlation ids of the
job being worked on (``project_id``, and ``media_id`` / ``analysis_id`` where they apply) live in
context variables set with :func:`bind`, so every line inside a job carries them without
threading them through every call.

Redaction happens in a filter on the root handler: registered secrets (the API key, once loaded,
see :func:`register_secret`), ``X-API-Key``/``Authorization`` header values and URL credentials
are replaced by ``***`` in the message and in every field. Control characters from the outside
world (file names, server details) are escaped so nobody can forge a log line.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

_CONTEXT: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "goflow_log_context",
    default={},  # noqa: B039 - never mutated, replaced by bind()
)
_SECRETS: set[str] = set()
_HEADER_SECRET = re.compile(
    r"(?i)((?:x-api-key|authorization|api[_-]?key)['\"]?\s*[:=]\s*['\"]?"
    r"(?:(?:bearer|basic|token)\s+)?)([^\s'\",}]+)"
)
_URL_CREDENTIALS = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)([^/@\s:]+(?::[^/@\s]*)?)@")
# C0/C1 controls (newlines, ESC) and the Unicode line/paragraph separators, which some log
# viewers also break lines on.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x80-\x9f\u2028\u2029]")
REDACTED = "***"


def register_secret(value: str | None) -> None:
    """Remember a secret so that it is redacted wherever it would appear in a log record."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """Remove registered secrets, credential headers and URL credentials from ``text``."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _HEADER_SECRET.sub(lambda m: m.group(1) + REDACTED, text)
    return _URL_CREDENTIALS.sub(lambda m: m.group(1) + REDACTED + "@", text)


def sanitize(text: str) -> str:
    """Escape control characters (newlines, terminal escapes) so a value cannot forge lines."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    if code == 0x0A:
        return "\\n"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return sanitize(redact(value))
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_clean(v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return sanitize(redact(str(value)))


@contextlib.contextmanager
def bind(**ids: str | None) -> Iterator[None]:
    """Add correlation ids (``project_id=...``) to every log line inside the block."""
    merged = dict(_CONTEXT.get())
    merged.update({k: v for k, v in ids.items() if v is not None})
    token = _CONTEXT.set(merged)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> Mapping[str, str]:
    """The correlation ids bound right now."""
    return _CONTEXT.get()


class StructLogger:
    """A thin wrapper that takes ``event, **fields`` and stores fields on the record."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level, event, exc_info=exc_info, extra={"goflow_fields": fields}, stacklevel=3
            )

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, False, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, True, fields)

    def isEnabledFor(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)


def get_logger(name: str) -> StructLogger:
    return StructLogger(logging.getLogger(name))


class ContextFilter(logging.Filter):
    """Attach the bound correlation ids and clean (redact, escape) everything in the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = dict(getattr(record, "goflow_fields", {}) or {})
        context = dict(_CONTEXT.get())
        record.goflow_context = _clean(context)
        record.goflow_fields = _clean(fields)
        message = record.getMessage()
        record.msg = sanitize(redact(message))
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, cleaned, so formatters never print the raw one.
            record.goflow_exc = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
            record.exc_text = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, context ids, fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        payload.update(getattr(record, "goflow_context", {}))
        for key, value in getattr(record, "goflow_fields", {}).items():
            payload.setdefault(key, value)
        exc = getattr(record, "goflow_exc", None)
        if exc:
            payload["exception"] = exc
        return json.dumps(payload, default=str, ensure_ascii=False)


_COLOURS = {"DEBUG": "\x1b[2m", "INFO": "\x1b[36m", "WARNING": "\x1b[33m", "ERROR": "\x1b[31m"}


class ConsoleFormatter(logging.Formatter):
    """Readable lines for a terminal: time, level, event, then key=value pairs."""

    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = record.levelname
        level = f"{_COLOURS.get(level, '')}{level:<7}\x1b[0m" if self.colour else f"{level:<7}"
        pairs = dict(getattr(record, "goflow_context", {}))
        pairs.update(getattr(record, "goflow_fields", {}))
        if "project_id" in pairs:
            pairs["project_id"] = str(pairs["project_id"])[:8]
        tail = " ".join(f"{k}={v}" for k, v in pairs.items())
        line = f"{clock} {level} {record.getMessage()}" + (f"  {tail}" if tail else "")
        exc = getattr(record, "goflow_exc", None)
        return f"{line}\n{exc}" if exc else line


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time, so progress bars that redirect it
    (rich) keep log lines above the bars instead of tearing them."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def setup_logging(fmt: str = "auto", level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Configure the root logger once: JSON when not on a terminal (or ``fmt='json'``)."""
    target: IO[str] = stream if stream is not None else _CurrentStderr()  # type: ignore[assignment]
    is_tty = target.isatty()
    use_json = fmt == "json" or (fmt == "auto" and not is_tty)
    handler: logging.StreamHandler[IO[str]] = logging.StreamHandler(target)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if use_json else ConsoleFormatter(colour=is_tty))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "goflow_handler", False):
            root.removeHandler(old)
    setattr(handler, "goflow_handler", True)  # noqa: B010 - marks our handler for replacement
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party chatter stays at WARNING unless debugging.
    for noisy in ("aiohttp.access", "urllib3", "filelock", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
