"""One log pipeline on structlog: our lines and every library's, rendered the same way.

Every module logs through :func:`get_logger`::

    log = get_logger(__name__)
    log.info("api call", endpoint="POST result", status=201, duration_ms=12.5)

Fields go into the record as data, never into the message by hand. The correlation ids of the
job being worked on (``project_id``, and ``media_id`` / ``analysis_id`` where they apply) live in
structlog's context variables, set with :func:`bind`, so every line inside a job (asyncio tasks
included: each copies its context) carries them without threading them through every call.

The transport is the standard :mod:`logging` module, so aiohttp, asyncio, vLLM, torch,
transformers and Python warnings (:func:`logging.captureWarnings`) reach the same root handler
as our own lines. That handler's :class:`structlog.stdlib.ProcessorFormatter` runs one chain for
all of them: context ids, level, logger, time, then redaction of registered secrets
(:func:`register_secret`), ``X-API-Key``/``Authorization`` values and URL credentials, then
control-character escaping (nobody can forge a line), then the JSON or console renderer. Our
records keep their message as ``record.getMessage()`` and their fields in ``record.goflow_fields``
(what pytest's ``caplog`` shows).

Where the lines go (:func:`setup_logging`): off a terminal, or with ``-v``, everything goes to
stderr. On a terminal with console output, stderr shows only our lines (and progress bars);
library records go to ``libraries.log`` in the state directory (a temporary directory when
there is none), whose path is printed once, when its first line is written. stdout is never
used: it carries the commands' output only. vLLM is told not to install its own handler
(``VLLM_CONFIGURE_LOGGING=0``, set by the CLI unless the environment sets it), and handlers that
other libraries put on stdout/stderr (transformers has one) are taken off by
:func:`adopt_library_handlers`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import io
import logging
import logging.handlers
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from goflow_gpu.errors import ConfigError

OURS = "goflow_gpu"
"""Loggers under this name are the project's own; every other one is a library's."""
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")
LIBRARY_LOG = "libraries.log"
REDACTED = "***"

_SECRETS: set[str] = set()
_HEADER_SECRET = re.compile(
    r"(?i)((?:x-api-key|authorization|api[_-]?key)['\"]?\s*[:=]\s*['\"]?"
    r"(?:(?:bearer|basic|token)\s+)?)([^\s'\",}]+)"
)
_URL_CREDENTIALS = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)([^/@\s:]+(?::[^/@\s]*)?)@")
# C0/C1 controls (newlines, ESC) and the Unicode line/paragraph separators, which some log
# viewers also break lines on.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x80-\x9f\u2028\u2029]")
# Library loggers that chatter at INFO about every request or file; WARNING unless debugging.
_NOISY = ("aiohttp.access", "urllib3", "filelock", "PIL", "matplotlib", "httpx", "httpcore")


# -- redaction and escaping -----------------------------------------------------------------------


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


# -- context --------------------------------------------------------------------------------------


@contextlib.contextmanager
def bind(**ids: str | None) -> Iterator[None]:
    """Add correlation ids (``project_id=...``) to every log line inside the block.

    structlog's context variables: a task started inside the block keeps the ids, and leaving
    the block restores what was bound before (``None`` values are not bound).
    """
    with structlog.contextvars.bound_contextvars(**{k: v for k, v in ids.items() if v is not None}):
        yield


def current_context() -> Mapping[str, Any]:
    """The correlation ids bound right now."""
    return structlog.contextvars.get_contextvars()


# -- our loggers: structlog in front, a standard record behind -------------------------------------


def _to_record(_: WrappedLogger, __: str, event_dict: EventDict) -> dict[str, Any]:
    """Last processor of our loggers: the event becomes the record's message and the fields
    ride along as ``record.goflow_fields``; the root handler's formatter does the rest, for our
    records and the libraries' alike."""
    event = event_dict.pop("event", "")
    exc_info = event_dict.pop("exc_info", False)
    return {"msg": event, "exc_info": exc_info, "extra": {"goflow_fields": event_dict}}


structlog.configure(
    processors=[structlog.stdlib.filter_by_level, _to_record],
    logger_factory=structlog.stdlib.LoggerFactory(),
    wrapper_class=structlog.stdlib.BoundLogger,
    cache_logger_on_first_use=True,
)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger taking ``event, **fields``: ``.debug/.info/.warning/.error/.exception``."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


# -- the formatter chain (every record) -----------------------------------------------------------


def _record_fields(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Our records' fields into the event; bound context ids win over a field of the same name."""
    record = event_dict.get("_record")
    for key, value in (getattr(record, "goflow_fields", None) or {}).items():
        event_dict.setdefault(key, value)
    return event_dict


def _redact_and_escape(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Redact secrets everywhere; escape control characters everywhere but in a traceback,
    whose line breaks are its layout (and whose text is ours, not the outside world's)."""
    for key, value in event_dict.items():
        if key.startswith("_"):
            continue
        if key == "event" and isinstance(value, str):
            value = value.rstrip()  # a warning's text ends with a line break
        if key == "exception" and isinstance(value, str):
            event_dict[key] = redact(value)
        else:
            event_dict[key] = _clean(value)
    return event_dict


_FIRST = ("ts", "level", "logger", "event")


def _json_order(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """ts, level, logger, event first; then context ids and fields as they came."""
    ordered = {key: event_dict.pop(key) for key in _FIRST if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _console_brief(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A terminal line names only a library's logger (ours are known) and a short project id."""
    if str(event_dict.get("logger", "")).startswith(OURS):
        event_dict.pop("logger")
    if "project_id" in event_dict:
        event_dict["project_id"] = str(event_dict["project_id"])[:8]
    return event_dict


def formatter(fmt: str, *, colour: bool = False, clock: str = "%H:%M:%S") -> logging.Formatter:
    """The formatter of every handler: ``fmt`` is ``json`` or ``console``."""
    json_lines = fmt == "json"
    pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _record_fields,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(
            fmt="iso" if json_lines else clock, utc=json_lines, key="ts"
        ),
        structlog.processors.format_exc_info,
        _redact_and_escape,
    ]
    final: list[Processor]
    if json_lines:
        final = [_json_order, structlog.processors.JSONRenderer(ensure_ascii=False, default=str)]
    else:
        final = [
            _console_brief,
            structlog.dev.ConsoleRenderer(
                colors=colour,
                sort_keys=False,
                timestamp_key="ts",
                pad_event_to=28,
                exception_formatter=structlog.dev.plain_traceback,
            ),
        ]
    return structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        foreign_pre_chain=pre_chain,
    )


# -- where the lines go ---------------------------------------------------------------------------


def is_ours(name: str) -> bool:
    return name == OURS or name.startswith(OURS + ".")


class _Ours(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_ours(record.name)


class _Theirs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_ours(record.name)


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time, so progress bars that redirect it
    (rich) keep log lines above the bars instead of tearing them."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class LibraryFile(logging.Handler):
    """Library records on a terminal: into ``libraries.log``, opened on its first record.

    The directory is the state directory when the command has one, else a private temporary
    directory. When the file is opened, its path is announced once on the console handler
    (at INFO, so ``-q`` hides it); an engine-core process forked later writes to the same file
    and announces nothing. Rotated at 20 MB, three old files kept.
    """

    def __init__(self, directory: Path | None, announce_to: logging.Handler, level: int) -> None:
        super().__init__(level)
        self.directory = directory
        self.path: Path | None = None
        self._announce_to = announce_to
        self._pid = os.getpid()
        self._file: logging.Handler | None = None

    def _open(self) -> logging.Handler:
        directory = self.directory
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError:
                directory = None
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="goflow-gpu-logs-"))
        self.path = directory / LIBRARY_LOG
        handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=20_000_000, backupCount=3, encoding="utf-8"
        )
        handler.setFormatter(formatter("console", clock="%Y-%m-%d %H:%M:%S"))
        if os.getpid() == self._pid and self._announce_to.level <= logging.INFO:
            notice = logging.LogRecord(
                f"{OURS}.logs", logging.INFO, __file__, 0, "library logs go to a file", None, None
            )
            notice.goflow_fields = {"path": str(self.path), "show_here": "-v"}
            self._announce_to.handle(notice)
        return handler

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._file is None:
                self._file = self._open()
            self._file.emit(record)
        except Exception:  # noqa: BLE001 - logging must never take the worker down
            self.handleError(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


@dataclass
class _CliOptions:
    """What the command line asked for (``-q``, ``-v``, ``--log-level``): it wins over settings."""

    level: str | None = None
    verbose: bool = False


_CLI = _CliOptions()
_ACTIVE: dict[str, Any] = {"format": None, "library_file": None}


def parse_level(value: str, source: str = "log_level") -> int:
    """A level name (any case) as a number; :class:`ConfigError` naming ``source`` otherwise."""
    name = str(value).strip().lower()
    if name not in LEVELS:
        raise ConfigError(f"{source} {value!r} is not a log level: use one of {', '.join(LEVELS)}")
    return int(getattr(logging, name.upper()))


def parse_format(value: str, source: str = "log_format") -> str:
    """``auto``, ``json`` or ``console`` (any case); :class:`ConfigError` naming ``source``."""
    name = str(value).strip().lower()
    if name not in FORMATS:
        raise ConfigError(
            f"{source} {value!r} is not a log format: use one of {', '.join(FORMATS)}"
        )
    return name


def set_cli_options(*, level: str | None = None, verbose: bool = False) -> None:
    """Record the global command-line options; every later :func:`setup_logging` obeys them."""
    if level is not None:
        parse_level(level, "--log-level")
    _CLI.level = level
    _CLI.verbose = verbose


def active_format() -> str | None:
    """``json`` or ``console`` as the last :func:`setup_logging` chose (None before any)."""
    fmt: str | None = _ACTIVE["format"]
    return fmt


def library_log() -> Path | None:
    """The library log file, once it was opened (None when there is none)."""
    handler = _ACTIVE["library_file"]
    return handler.path if isinstance(handler, LibraryFile) else None


def adopt_library_handlers() -> None:
    """Take off the handlers libraries put on stdout/stderr (transformers installs one; vLLM
    does unless ``VLLM_CONFIGURE_LOGGING=0``), so their records reach the root handler and the
    one pipeline. File handlers an operator configured stay. Call after importing such a
    library; :func:`setup_logging` calls it too."""
    streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or is_ours(name):
            continue
        for handler in list(logger.handlers):
            if (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and id(handler.stream) in streams
            ):
                logger.removeHandler(handler)
                logger.propagate = True


_EMIT = logging.StreamHandler.emit.__code__


class _RealStderr(io.TextIOWrapper):
    """``sys.stderr`` while :class:`StderrCapture` runs: the real stderr, except for the
    handlers a library put on it while being imported (torch does, and logs through it before
    :func:`adopt_library_handlers` can take it off): what they write joins the captured output
    on descriptor 2 and takes the pipeline's path."""

    def write(self, text: str) -> int:
        caller = sys._getframe(1)
        if caller.f_code is _EMIT and not getattr(caller.f_locals.get("self"), "goflow_handler", 0):
            os.write(2, text.encode("utf-8", "backslashreplace"))
            return len(text)
        return super().write(text)


class StderrCapture:
    """What is written to file descriptor 2 without logging becomes log records.

    C and C++ code (torch's and glog's warnings), progress bars drawn by libraries, and the
    processes vLLM starts (they get our descriptor 2, and their own records have no handler
    there but Python's last resort) write to the descriptor, not through :mod:`logging`.
    :meth:`start` points descriptor 2 at an unlinked append-only file, moves ``sys.stderr`` to
    a copy of the real one, and a thread turns each new line of the file into a WARNING record
    of the ``stderr`` logger, which then takes the pipeline's path: JSON on stderr, or the
    library log on a terminal. A file rather than a pipe: a writer never blocks, even one that
    holds the GIL. :meth:`stop` reads what is left. For the command-line process only
    (:func:`goflow_gpu.cli.main`); ``faulthandler`` is pointed at the real stderr so a crash
    still shows.
    """

    POLL_S = 0.1
    TRUNCATE_AT = 16 * 1024 * 1024

    def __init__(self) -> None:
        self._log = logging.getLogger("stderr")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: IO[bytes] | None = None
        self._pending = b""

    def start(self) -> None:
        if self._thread is not None:
            return
        sys.stderr.flush()
        real = os.dup(2)
        fd, path = tempfile.mkstemp(prefix="goflow-gpu-stderr-")
        try:
            self._reader = open(path, "rb")  # noqa: SIM115 - closed by stop()
        finally:
            os.unlink(path)
        # Append mode: writers (this process and the ones it starts) always write at the end,
        # so the file can be emptied once read (see _drain) and a long `serve` stays small.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stderr = _RealStderr(
            open(real, "wb"),  # noqa: SIM115 - the process's stderr from now on
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
        )
        with contextlib.suppress(ValueError, OSError):
            if faulthandler.is_enabled():
                faulthandler.enable(sys.stderr)
        self._thread = threading.Thread(target=self._run, name="goflow-stderr", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self._drain()

    def _drain(self, final: bool = False) -> None:
        if self._reader is None:
            return
        chunk = self._reader.read()
        if chunk:
            self._pending += chunk
        elif self._reader.tell() > self.TRUNCATE_AT:
            # Everything written so far was read: start the file again. A line written between
            # the read above and the truncation is lost; at 16 MiB of stderr that is rare.
            os.ftruncate(2, 0)
            self._reader.seek(0)
        *lines, self._pending = self._pending.split(b"\n")
        self._pending = self._pending[-65536:]  # a bar that never ends its line stays bounded
        if final and self._pending:
            lines.append(self._pending)
            self._pending = b""
        for line in lines:
            # A progress bar redraws its line after each carriage return: keep its last state.
            last = line.rstrip(b"\r").rsplit(b"\r", 1)[-1]
            text = last.decode("utf-8", "backslashreplace").strip()
            if text:
                self._log.warning(text)

    def stop(self) -> None:
        """Read the last lines (a process that exits writes them late) and stop."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(2)
        self._drain(final=True)
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._thread = None


def setup_logging(
    fmt: str = "auto",
    level: str = "INFO",
    stream: IO[str] | None = None,
    *,
    log_dir: Path | None = None,
    level_source: str = "log_level",
) -> None:
    """Configure the root logger: JSON when not on a terminal (or ``fmt='json'``).

    ``level`` is the command's (settings' ``log_level``); ``-q``/``-v``/``--log-level`` win
    (:func:`set_cli_options`). On a terminal with console output and without ``-v``, library
    records go to ``log_dir/libraries.log`` (see :class:`LibraryFile`) at INFO or below, and the
    terminal shows our records only. Safe to call again: the previous handlers are replaced.
    Raises :class:`ConfigError` for an unknown level or format (naming ``level_source``).
    """
    chosen = parse_format(fmt)
    if _CLI.level is not None:
        level_no = parse_level(_CLI.level, "--log-level")
    else:
        level_no = parse_level(level, level_source)
    target: IO[str] = stream if stream is not None else _CurrentStderr()  # type: ignore[assignment]
    is_tty = bool(target.isatty())
    use_json = chosen == "json" or (chosen == "auto" and not is_tty)
    console: logging.Handler = logging.StreamHandler(target)
    console.setFormatter(formatter("json" if use_json else "console", colour=is_tty))
    console.setLevel(level_no)
    handlers = [console]
    root_level = level_no
    library: LibraryFile | None = None
    if is_tty and not use_json and not _CLI.verbose:
        console.addFilter(_Ours())
        library = LibraryFile(log_dir, console, min(level_no, logging.INFO))
        library.addFilter(_Theirs())
        handlers.append(library)
        root_level = min(level_no, logging.INFO)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "goflow_handler", False):
            root.removeHandler(old)
            old.close()
    for handler in handlers:
        setattr(handler, "goflow_handler", True)  # noqa: B010 - marks ours for replacement
        root.addHandler(handler)
    root.setLevel(root_level)
    _ACTIVE.update(format="json" if use_json else "console", library_file=library)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    adopt_library_handlers()
