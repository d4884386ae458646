"""Durable local state of the worker: one SQLite file (``state.db``) in the state directory.

It keeps every job manifest as received, every media x analysis combination with its state,
the outbox of result POSTs, which project statuses were sent, the final report, manifests that
were refused, and the media cache index. The database runs in WAL mode with
``synchronous=FULL`` and foreign keys on; every state change is one transaction, so a crash
(even ``kill -9``) leaves either the state before or the state after a change, never a mix.

Combination state machine
-------------------------
::

    pending ──mark_ready──▶ ready ──mark_posting──▶ posting ──mark_reported──▶ reported
      │ ▲                                           │  ▲ │
      └─┘ record_attempt                            │  └─┘ mark_posting (re-POST)
                                                    └──────mark_rejected─────▶ rejected

- ``pending``: created with the job (prompt texts, schema and sampling frozen then). Each
  inference/QA try is recorded by :meth:`Store.record_attempt` (count + reasons per attempt).
- ``ready``: a terminal verdict was reached; the exact POST body (``ResultBody`` wire JSON,
  status ``completed`` or ``failed``) is stored. Nothing was sent yet.
- ``posting``: the intent to POST was recorded *before* the call (the outbox); the outcome is
  unknown until it is recorded. ``post_attempts`` counts the intents.
- ``reported``: the server has the result: 200/201, or a duplicate-400 after an attempt whose
  outcome is unknown. Terminal.
- ``rejected``: a definite refusal (a 4xx other than 401/403/408/425/429; a duplicate answer
  with no unknown prior attempt): a visible failure kept with the server's detail, never
  retried in a loop. Terminal. Transient failures never lead here.

Any other transition (``reported -> posting``, ``pending -> posting``, ...) raises
:class:`~goflow_gpu.errors.StateError`: it is a bug, and the exactly-once rules rest on refusing it.

Recovery after a crash, by the state found on restart:

- ``pending``: nothing was sent; run inference again (attempts so far are kept).
- ``ready``: nothing was sent; POST the stored body (never rebuild it).
- ``posting``: the outcome of the last POST is unknown; POST the stored body again
  (``mark_posting`` again). 200/201 -> ``reported``; a duplicate-400 now means the earlier
  POST was accepted -> ``reported``; another 400/422 -> ``rejected``.
- ``reported`` / ``rejected``: done; never touched again.

Job-level state
---------------
A job is ``open`` from :meth:`Store.create_job` until :meth:`Store.close_job` (``closed``).
Each project status (``processing``, ``completed``) and the report move ``no -> intent -> sent``
at most once each, in order: ``completed`` needs ``processing`` sent and every combination
terminal; the report needs ``completed`` sent. An ``intent`` found on restart means the call's
outcome is unknown: send it again (the PUTs are idempotent) and record ``sent``; recording
``intent`` again is allowed for that, ``sent`` is never undone.

A job can also be *parked* (open, ``attention`` holds why): a status or report PUT was refused
by the backend (see :mod:`goflow_gpu.answers`), or re-sent too often after unknown outcomes
(``put_resends``, counted across restarts). A parked job is not resumed (:meth:`unfinished_jobs`
skips it) until an operator re-arms it (:meth:`rearm_job`, ``goflow-gpu state retry``) or closes
it (:meth:`close_job` with a reason, ``goflow-gpu state abandon``).

Project ids are stored in canonical (lower-case) form; lookups compare case-insensitively.

Errors of sqlite3 (disk full, I/O, corruption) are mapped to :class:`StateError` here.

Off the event loop, committed in groups
---------------------------------------
Every commit waits for an fsync (``synchronous=FULL``): about 1 ms on a local SSD, several on a
network disk, three or four per combination. On the worker's event loop that time is taken from
feeding the engine (vLLM's output handler runs on the same loop). The job's hot path therefore
calls ``await store.run(store.mark_posting, key)``: the call runs on the store's own writer
thread, and the calls queued while that thread was committing run together in ONE transaction
(each in its own savepoint, so one refused transition fails only its caller) with one fsync.
A caller resumes only after the commit that holds its change, so every rule above still holds:
the POST intent is durable before the POST is sent, a verdict before it is reported. Calls
made directly (not through :meth:`Store.run`) are still synchronous; a lock serialises them
with the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import queue
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar, cast

from goflow_gpu.errors import StateError
from goflow_gpu.logs import get_logger

log = get_logger(__name__)

COMBO_STATES: Final = ("pending", "ready", "posting", "reported", "rejected")
TERMINAL_STATES: Final = ("reported", "rejected")
RESULT_STATUSES: Final = ("completed", "failed")
PHASES: Final = ("no", "intent", "sent")
METRIC_KEYS: Final = ("inference_seconds", "prompt_tokens", "cached_tokens", "generated_tokens")

DB_NAME = "state.db"
LOCK_NAME = "state.lock"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Ordered, named migrations. Never edit one that has shipped: append a new one.
MIGRATIONS: Final[tuple[tuple[str, str], ...]] = (
    (
        "initial",
        """
        CREATE TABLE jobs (
            project_id        TEXT PRIMARY KEY,
            manifest          TEXT NOT NULL,
            state             TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed')),
            created_at        REAL NOT NULL,
            closed_at         REAL,
            status_processing TEXT NOT NULL DEFAULT 'no'
                              CHECK (status_processing IN ('no', 'intent', 'sent')),
            status_completed  TEXT NOT NULL DEFAULT 'no'
                              CHECK (status_completed IN ('no', 'intent', 'sent')),
            report            TEXT NOT NULL DEFAULT 'no' CHECK (report IN ('no', 'intent', 'sent')),
            report_body       TEXT
        );
        CREATE TABLE combos (
            project_id        TEXT NOT NULL REFERENCES jobs(project_id) ON DELETE CASCADE,
            media_id          TEXT NOT NULL,
            analysis_id       TEXT NOT NULL,
            seq               INTEGER NOT NULL,
            slug              TEXT NOT NULL,
            variant           TEXT NOT NULL,
            state             TEXT NOT NULL DEFAULT 'pending' CHECK (state IN
                              ('pending', 'ready', 'posting', 'reported', 'rejected')),
            attempts          INTEGER NOT NULL DEFAULT 0,
            reasons           TEXT NOT NULL DEFAULT '[]',
            system_prompt     TEXT NOT NULL,
            user_prompt       TEXT NOT NULL,
            json_schema       TEXT NOT NULL,
            spec_version      INTEGER NOT NULL,
            max_tokens        INTEGER NOT NULL,
            temperature       REAL NOT NULL,
            qa_rules          TEXT NOT NULL DEFAULT '{}',
            body              TEXT,
            result_status     TEXT CHECK (result_status IN ('completed', 'failed')),
            post_attempts     INTEGER NOT NULL DEFAULT 0,
            http_status       INTEGER,
            server_detail     TEXT,
            inference_seconds REAL,
            prompt_tokens     INTEGER,
            cached_tokens     INTEGER,
            generated_tokens  INTEGER,
            updated_at        REAL NOT NULL,
            PRIMARY KEY (project_id, media_id, analysis_id)
        );
        CREATE INDEX combos_by_state ON combos (project_id, state);
        CREATE TABLE rejected_manifests (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            raw         TEXT NOT NULL,
            error       TEXT NOT NULL,
            received_at REAL NOT NULL
        );
        CREATE TABLE media (
            project_id  TEXT NOT NULL,
            media_id    TEXT NOT NULL,
            variant     TEXT NOT NULL,
            ok          INTEGER NOT NULL CHECK (ok IN (0, 1)),
            path        TEXT,
            width       INTEGER,
            height      INTEGER,
            nbytes      INTEGER,
            sha256      TEXT,
            error       TEXT,
            updated_at  REAL NOT NULL,
            PRIMARY KEY (project_id, media_id, variant)
        );
        CREATE TABLE media_downloads (
            project_id  TEXT PRIMARY KEY,
            count       INTEGER NOT NULL
        );
        """,
    ),
    (
        "needs-attention",
        """
        ALTER TABLE jobs ADD COLUMN attention TEXT;
        ALTER TABLE jobs ADD COLUMN attention_at REAL;
        ALTER TABLE jobs ADD COLUMN put_resends INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN closed_reason TEXT;
        """,
    ),
)

# One job by id, compared canonically: new rows are stored lower-case (the first test uses the
# primary key), rows an older version stored in the server's case still match.
_JOB_BY_ID: Final = "SELECT * FROM jobs WHERE project_id = lower(?) OR lower(project_id) = lower(?)"

# Legal combination transitions: method name -> (states it may start from, state it leads to).
_TRANSITIONS: Final[dict[str, tuple[tuple[str, ...], str]]] = {
    "record_attempt": (("pending",), "pending"),
    "mark_ready": (("pending",), "ready"),
    "mark_posting": (("ready", "posting"), "posting"),
    "mark_reported": (("posting",), "reported"),
    "mark_rejected": (("posting",), "rejected"),
}


@dataclass(frozen=True)
class ComboKey:
    """Identifies one media x analysis combination of a job."""

    project_id: str
    media_id: str
    analysis_id: str

    def __str__(self) -> str:
        return f"{self.project_id}/{self.media_id}/{self.analysis_id}"


@dataclass(frozen=True)
class PlannedCombo:
    """A combination as planned at job creation; its prompt and sampling are frozen then."""

    media_id: str
    analysis_id: str
    slug: str
    variant: str
    system_prompt: str
    user_prompt: str
    json_schema: dict[str, Any]
    spec_version: int
    max_tokens: int
    temperature: float
    qa_rules: dict[str, Any] = field(default_factory=dict)


def outcome_of(state: str, result_status: str | None) -> str:
    """Where a combination stands for the job's figures: ``completed`` (the backend holds a
    completed result), ``failed`` (settled otherwise: QA or the engine gave up, or the backend
    refused the result) or ``left`` (not settled yet). The one definition behind every count
    of completed and failed combinations (:class:`Outcomes`)."""
    if state not in TERMINAL_STATES:
        return "left"
    return "completed" if state == "reported" and result_status == "completed" else "failed"


@dataclass
class ComboRow:
    """One stored combination: its plan, frozen at job creation, and what happened to it since
    (see the state machine in the module docstring)."""

    key: ComboKey
    plan: PlannedCombo
    state: str
    attempts: int
    reasons: list[list[str]]  # one list of reasons per attempt
    body: dict[str, Any] | None
    result_status: str | None
    post_attempts: int
    http_status: int | None
    server_detail: str | None
    inference_seconds: float | None
    prompt_tokens: int | None
    cached_tokens: int | None
    generated_tokens: int | None

    @property
    def outcome(self) -> str:
        """``completed``, ``failed`` or ``left``: see :func:`outcome_of`."""
        return outcome_of(self.state, self.result_status)

    @property
    def passed(self) -> bool:
        """The backend holds a completed result for this combination."""
        return self.outcome == "completed"


@dataclass(frozen=True)
class Outcomes:
    """How many of a job's combinations completed, failed, or are left: the one count used by
    the job's end, the worker's summary and the final report."""

    completed: int = 0
    failed: int = 0
    left: int = 0

    @property
    def total(self) -> int:
        """Every combination counted."""
        return self.completed + self.failed + self.left

    @classmethod
    def of_rows(cls, rows: Iterable[ComboRow]) -> Outcomes:
        """Count loaded rows."""
        return cls.of_groups((row.state, row.result_status, 1) for row in rows)

    @classmethod
    def of_groups(cls, groups: Iterable[tuple[str, str | None, int]]) -> Outcomes:
        """Count ``(state, result_status, how many)`` groups, such as a SQL ``GROUP BY``."""
        counted = dict.fromkeys(("completed", "failed", "left"), 0)
        for state, result_status, n in groups:
            counted[outcome_of(state, result_status)] += n
        return cls(**counted)


@dataclass
class JobRow:
    """One stored job with its status and report progress (``no`` / ``intent`` / ``sent``)."""

    project_id: str
    manifest: dict[str, Any]
    state: str
    created_at: float
    closed_at: float | None
    status_processing: str
    status_completed: str
    report: str
    report_body: dict[str, Any] | None
    attention: str | None = None  # why the job is parked (needs-attention), None when not
    attention_at: float | None = None
    put_resends: int = 0  # status/report PUTs re-sent after an unknown outcome, across restarts
    closed_reason: str | None = None  # why a job was closed without its report (abandoned)

    @property
    def parked(self) -> bool:
        """Open but waiting for an operator (``state retry`` / ``state abandon``)."""
        return self.state == "open" and self.attention is not None


@dataclass(frozen=True)
class MediaRow:
    """The cache entry of one (project, media, variant): a stored image or the reason it failed."""

    project_id: str
    media_id: str
    variant: str
    ok: bool
    path: Path | None
    width: int | None
    height: int | None
    nbytes: int | None
    sha256: str | None
    error: str | None
    updated_at: float


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=False)


def _sqlite_reason(exc: sqlite3.Error) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, sqlite3.OperationalError) and "full" in text.lower():
        return f"{text} (no space left for the state database)"
    return text


T = TypeVar("T")

#: at most this many queued calls share one commit (bounds one transaction's size and latency)
MAX_GROUP = 64


class _GroupWriter:
    """The store's writer thread: runs queued calls, those queued together in one commit."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="goflow-state-writer", daemon=True)
        self._thread.start()
        self.commits = 0
        self.calls = 0

    def submit(self, call: Callable[[], Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Call(call, loop, future))
        return future

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[_Call]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self._store._tx(f"{len(batch)} grouped changes"):
                for item in batch:
                    try:
                        outcomes.append((True, item.call()))
                    except Exception as exc:  # noqa: BLE001 - handed to that call's awaiter
                        outcomes.append((False, exc))
        except Exception as exc:  # noqa: BLE001 - the commit failed: nothing of it is durable
            outcomes = [(False, exc)] * len(batch)
        self.commits += 1
        self.calls += len(batch)
        for item, (ok, value) in zip(batch, outcomes, strict=True):
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                item.loop.call_soon_threadsafe(_settle, item.future, ok, value)


@dataclass(frozen=True)
class _Call:
    call: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return  # the change is committed all the same; its caller stopped waiting
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class Store:
    """The SQLite state of one worker. Open with :meth:`Store.open`; one Store per directory.

    Methods are synchronous; :meth:`run` runs one on the writer thread for the event loop (see
    "Off the event loop, committed in groups" above).
    """

    def __init__(self, state_dir: Path, conn: sqlite3.Connection, lock_fd: int | None) -> None:
        """Use :meth:`open` (or :meth:`open_readonly`, no lock: ``lock_fd`` None); this only
        wires an already opened, locked and migrated database."""
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self._conn: sqlite3.Connection | None = conn
        self._lock_fd: int | None = lock_fd
        self._mutex = threading.RLock()
        self._depth = 0  # open transactions of the thread holding _mutex (>1: savepoints)
        self._writer: _GroupWriter | None = None

    async def run(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``method(*args, **kwargs)`` (a method of this store) on the writer thread.

        Resumes once the change is committed; calls queued together share one commit.
        """
        if self._writer is None:
            self._writer = _GroupWriter(self)
        future = self._writer.submit(functools.partial(method, *args, **kwargs))
        return cast("T", await future)

    @property
    def group_stats(self) -> tuple[int, int]:
        """(commits, calls) made by the writer thread so far."""
        writer = self._writer
        return (writer.commits, writer.calls) if writer is not None else (0, 0)

    # ------------------------------------------------------------------ opening and closing

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        """Create the directory if needed, lock it for this process, check and migrate the db.

        Raises :class:`StateError` when the directory cannot be created or written, another
        worker holds it, or ``state.db`` is not a usable SQLite database (left untouched).
        """
        state_dir = Path(state_dir).expanduser().resolve()
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot create state directory {state_dir}: {exc.strerror or exc}"
            ) from None
        if not state_dir.is_dir():
            raise StateError(f"state directory {state_dir} is not a directory")
        lock_fd = _acquire_lock(state_dir)
        try:
            conn = _connect(state_dir / DB_NAME)
        except BaseException:
            _release_lock(lock_fd)
            raise
        store = cls(state_dir, conn, lock_fd)
        log.debug("state opened", path=str(store.path))
        return store

    @classmethod
    def open_readonly(cls, state_dir: Path) -> Store:
        """Open an existing state database for reading only: no lock, no migration, no writes.

        For ``state show`` beside a running worker: the worker holds the directory lock for its
        whole life, and an operator needs to look exactly then. The connection is SQLite's
        ``mode=ro`` (every write fails) and ``query_only``; under WAL it reads a consistent
        snapshot without blocking the worker nor being blocked by it. Nothing is created:
        :class:`StateError` when ``state.db`` is missing, not SQLite, or not a goflow state of a
        schema this version reads (an older one is upgraded by the next ``run``/``serve``,
        never here). SQLite may leave empty ``state.db-wal``/``-shm`` files next to a database
        no worker has open (it needs them to read a WAL database); the database is untouched.
        """
        state_dir = Path(state_dir).expanduser().resolve()
        store = cls(state_dir, _connect_readonly(state_dir / DB_NAME), None)
        log.debug("state opened read-only", path=str(store.path))
        return store

    def close(self) -> None:
        """Close the database and release the directory lock. Safe to call twice.

        Changes queued for the writer thread are committed first.
        """
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            _release_lock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection (for inspection and tests; change state through the methods)."""
        if self._conn is None:
            raise StateError(f"state database {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _tx(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; sqlite3 errors become StateError naming the operation.

        Inside another transaction of the same thread (a grouped commit) it is a savepoint: its
        changes are undone alone when it fails, and made durable by the outer commit.
        """
        with self._mutex:
            conn = self.conn
            nested = self._depth > 0
            begin, commit = (
                (f"SAVEPOINT s{self._depth}", f"RELEASE s{self._depth}")
                if nested
                else ("BEGIN IMMEDIATE", "COMMIT")
            )
            undo = (
                (f"ROLLBACK TO s{self._depth}", f"RELEASE s{self._depth}")
                if nested
                else ("ROLLBACK",)
            )
            try:
                conn.execute(begin)
            except sqlite3.Error as exc:
                raise StateError(
                    f"state database {self.path}: {what}: {_sqlite_reason(exc)}"
                ) from None
            self._depth += 1
            try:
                yield conn
                conn.execute(commit)
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    for statement in undo:
                        conn.execute(statement)
                if isinstance(exc, sqlite3.Error):
                    raise StateError(
                        f"state database {self.path}: {what}: {_sqlite_reason(exc)}"
                    ) from None
                raise
            finally:
                self._depth -= 1

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._mutex:
            try:
                return self.conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise StateError(
                    f"state database {self.path}: read: {_sqlite_reason(exc)}"
                ) from None

    # ------------------------------------------------------------------ jobs

    def record_rejected_manifest(self, raw: Any, error: str) -> int:
        """Keep a manifest that failed validation, for inspection. Returns its row id."""
        try:
            text = _dumps(raw)
        except (TypeError, ValueError):
            text = repr(raw)
        with self._tx("record rejected manifest") as conn:
            cur = conn.execute(
                "INSERT INTO rejected_manifests (raw, error, received_at) VALUES (?, ?, ?)",
                (text, error, time.time()),
            )
            row_id = cur.lastrowid
        assert row_id is not None
        return row_id

    def rejected_manifests(self) -> list[dict[str, Any]]:
        """Every refused manifest: ``{"id", "raw", "error", "received_at"}``, oldest first."""
        out = []
        for row in self._query("SELECT * FROM rejected_manifests ORDER BY id"):
            try:
                raw: Any = json.loads(row["raw"])
            except ValueError:
                raw = row["raw"]
            out.append(
                {
                    "id": row["id"],
                    "raw": raw,
                    "error": row["error"],
                    "received_at": row["received_at"],
                }
            )
        return out

    def create_job(self, manifest_raw: dict[str, Any], combos: list[PlannedCombo]) -> None:
        """Store the manifest and all its combinations (``pending``) in ONE transaction.

        Raises :class:`StateError` if the job already exists (resume it instead) or any row
        cannot be inserted; then nothing at all is stored.
        """
        project_id = _project_id_of(manifest_raw)
        if self.job(project_id) is not None:
            raise StateError(f"job {project_id} already exists in {self.path}; resume it instead")
        now = time.time()
        with self._tx(f"create job {project_id}") as conn:
            conn.execute(
                "INSERT INTO jobs (project_id, manifest, created_at) VALUES (?, ?, ?)",
                (project_id, _dumps(manifest_raw), now),
            )
            conn.executemany(
                """INSERT INTO combos (project_id, media_id, analysis_id, seq, slug, variant,
                       system_prompt, user_prompt, json_schema, spec_version, max_tokens,
                       temperature, qa_rules, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [
                    (
                        project_id,
                        c.media_id,
                        c.analysis_id,
                        seq,
                        c.slug,
                        c.variant,
                        c.system_prompt,
                        c.user_prompt,
                        _dumps(c.json_schema),
                        c.spec_version,
                        c.max_tokens,
                        c.temperature,
                        _dumps(c.qa_rules),
                        now,
                    )
                    for seq, c in enumerate(combos)
                ],
            )
        log.debug("job stored", project_id=project_id, combinations=len(combos))

    def job(self, project_id: str) -> JobRow | None:
        """The stored job, or ``None`` if there is none with this id (compared canonically:
        case-insensitive, so ``3FA8...`` finds ``3fa8...``)."""
        rows = self._query(_JOB_BY_ID, (project_id, project_id))
        return _job_row(rows[0]) if rows else None

    def unfinished_jobs(self) -> list[str]:
        """Project ids of open jobs that are not parked, oldest first (resumed before any new
        job is taken)."""
        rows = self._query(
            "SELECT project_id FROM jobs WHERE state = 'open' AND attention IS NULL "
            "ORDER BY created_at, rowid"
        )
        return [r["project_id"] for r in rows]

    def parked_jobs(self) -> list[JobRow]:
        """Open jobs parked as needs-attention, oldest first."""
        return [
            _job_row(r)
            for r in self._query(
                "SELECT * FROM jobs WHERE state = 'open' AND attention IS NOT NULL "
                "ORDER BY created_at, rowid"
            )
        ]

    def park_job(self, project_id: str, reason: str) -> None:
        """Park an open job as needs-attention: it is not resumed until :meth:`rearm_job`."""
        with self._tx(f"park job {project_id}") as conn:
            job = self._job_in_tx(conn, project_id)
            if job["state"] != "open":
                raise StateError(f"job {project_id} is closed; it cannot be parked")
            conn.execute(
                "UPDATE jobs SET attention = ?, attention_at = ? WHERE project_id = ?",
                (reason[:2000], time.time(), job["project_id"]),
            )
        log.warning("job parked: needs attention", project_id=project_id, reason=reason[:500])

    def rearm_job(self, project_id: str) -> JobRow:
        """Clear a parked job's attention so the next start resumes it (``state retry``)."""
        with self._tx(f"re-arm job {project_id}") as conn:
            job = self._job_in_tx(conn, project_id)
            if job["state"] != "open":
                raise StateError(f"job {project_id} is closed; there is nothing to retry")
            conn.execute(
                "UPDATE jobs SET attention = NULL, attention_at = NULL, put_resends = 0 "
                "WHERE project_id = ?",
                (job["project_id"],),
            )
        log.info("job re-armed", project_id=project_id)
        found = self.job(project_id)
        assert found is not None
        return found

    def jobs(self) -> list[JobRow]:
        """Every stored job, oldest first."""
        return [_job_row(r) for r in self._query("SELECT * FROM jobs ORDER BY created_at, rowid")]

    def close_job(self, project_id: str, reason: str | None = None) -> None:
        """Mark an open job closed: normally after its report was sent; with ``reason`` when it
        is closed without one (abandoned by the backend or by an operator)."""
        with self._tx(f"close job {project_id}") as conn:
            job = self._job_in_tx(conn, project_id)
            if job["state"] != "open":
                raise StateError(f"job {project_id} is already closed")
            conn.execute(
                "UPDATE jobs SET state = 'closed', closed_at = ?, closed_reason = ? "
                "WHERE project_id = ?",
                (time.time(), reason, job["project_id"]),
            )
        log.info("job closed", project_id=project_id, reason=reason)

    def _job_in_tx(self, conn: sqlite3.Connection, project_id: str) -> sqlite3.Row:
        row = conn.execute(_JOB_BY_ID, (project_id, project_id)).fetchone()
        if row is None:
            raise StateError(f"unknown job {project_id}")
        return row  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ statuses and report

    def reset_put_resends(self, project_id: str) -> None:
        """A status/report PUT ended in a known outage (not a crash): start counting re-sends
        after unknown outcomes from zero again."""
        with self._tx(f"reset put resends {project_id}") as conn:
            job = self._job_in_tx(conn, project_id)
            conn.execute(
                "UPDATE jobs SET put_resends = 0 WHERE project_id = ?", (job["project_id"],)
            )

    def mark_status(self, project_id: str, status: str, phase: str) -> int:
        """Record the intent to send a project status, or that it was sent (at most once each).

        ``completed`` requires ``processing`` sent and every combination reported or rejected.
        Recording ``intent`` over an ``intent`` (a re-send after an unknown outcome) counts in
        ``put_resends``; returns that count, so callers can bound re-sends across restarts.
        """
        if status not in ("processing", "completed"):
            raise StateError(f"unknown project status {status!r}")
        column = f"status_{status}"
        with self._tx(f"status {status} {phase} for job {project_id}") as conn:
            job = self._job_in_tx(conn, project_id)
            _check_phase(f"status {status} of job {project_id}", job[column], phase)
            if status == "completed" and phase == "intent":
                if job["status_processing"] != "sent":
                    raise StateError(
                        f"status completed of job {project_id} before status processing was sent"
                    )
                left = conn.execute(
                    "SELECT COUNT(*) FROM combos WHERE project_id = ? "
                    "AND state NOT IN ('reported', 'rejected')",
                    (job["project_id"],),
                ).fetchone()[0]
                if left:
                    raise StateError(
                        f"status completed of job {project_id} while {left} combinations "
                        "are not reported yet"
                    )
            resends = job["put_resends"] + (job[column] == phase == "intent")
            conn.execute(
                f"UPDATE jobs SET {column} = ?, put_resends = ? "  # noqa: S608 - fixed names
                "WHERE project_id = ?",
                (phase, resends, job["project_id"]),
            )
        log.debug("status recorded", project_id=project_id, status=status, phase=phase)
        return int(resends)

    def mark_report(self, project_id: str, phase: str, body: dict[str, Any] | None = None) -> int:
        """Record the report's intent (with its body, kept for a re-send) or that it was sent.

        Returns ``put_resends`` like :meth:`mark_status`."""
        with self._tx(f"report {phase} for job {project_id}") as conn:
            job = self._job_in_tx(conn, project_id)
            _check_phase(f"report of job {project_id}", job["report"], phase)
            if phase == "intent":
                if job["status_completed"] != "sent":
                    raise StateError(f"report of job {project_id} before status completed was sent")
                if body is None and job["report_body"] is None:
                    raise StateError(f"report intent of job {project_id} needs the report body")
            text = _dumps(body) if body is not None else job["report_body"]
            resends = job["put_resends"] + (job["report"] == phase == "intent")
            conn.execute(
                "UPDATE jobs SET report = ?, report_body = ?, put_resends = ? WHERE project_id = ?",
                (phase, text, resends, job["project_id"]),
            )
        log.debug("report recorded", project_id=project_id, phase=phase)
        return int(resends)

    # ------------------------------------------------------------------ combinations

    def combos(self, project_id: str, states: Iterable[str] | None = None) -> list[ComboRow]:
        """The job's combinations in planned (media-major) order, optionally only some states."""
        sql = "SELECT * FROM combos WHERE project_id = ?"
        params: list[Any] = [project_id]
        if states is not None:
            wanted = list(states)
            for state in wanted:
                _check_state_name(state)
            if not wanted:
                return []
            sql += f" AND state IN ({','.join('?' * len(wanted))})"
            params += wanted
        return [_combo_row(r) for r in self._query(sql + " ORDER BY seq", params)]

    def combo(self, key: ComboKey) -> ComboRow:
        """One combination; :class:`StateError` if it is not part of the stored job."""
        rows = self._query(
            "SELECT * FROM combos WHERE project_id = ? AND media_id = ? AND analysis_id = ?",
            (key.project_id, key.media_id, key.analysis_id),
        )
        if not rows:
            raise StateError(f"combination {key} is not part of a stored job")
        return _combo_row(rows[0])

    def counts(self, project_id: str) -> dict[str, int]:
        """Number of combinations in each state (every state present, zeros included)."""
        out = dict.fromkeys(COMBO_STATES, 0)
        for row in self._query(
            "SELECT state, COUNT(*) AS n FROM combos WHERE project_id = ? GROUP BY state",
            (project_id,),
        ):
            out[row["state"]] = row["n"]
        return out

    def outcomes(self, project_id: str) -> Outcomes:
        """The job's completed / failed / left counts, counted in SQLite (no row is loaded)."""
        return Outcomes.of_groups(
            (row["state"], row["result_status"], row["n"])
            for row in self._query(
                "SELECT state, result_status, COUNT(*) AS n FROM combos WHERE project_id = ? "
                "GROUP BY state, result_status",
                (project_id,),
            )
        )

    def spec_versions(self, project_id: str) -> dict[str, list[int]]:
        """The prompt spec versions the job's combinations were planned with, per analysis slug
        (frozen at job creation; more than one only if the job mixes them)."""
        out: dict[str, list[int]] = {}
        for row in self._query(
            "SELECT slug, spec_version, MIN(seq) AS first FROM combos WHERE project_id = ? "
            "GROUP BY slug, spec_version ORDER BY first",
            (project_id,),
        ):
            out.setdefault(row["slug"], []).append(row["spec_version"])
        return {slug: sorted(versions) for slug, versions in out.items()}

    def failed_combos(self, project_id: str) -> list[ComboRow]:
        """The job's failed combinations (:func:`outcome_of`: settled, and not a completed
        result the backend holds), in planned order; only those rows are read."""
        rows = self._query(
            "SELECT * FROM combos WHERE project_id = ? AND (state = 'rejected' OR "
            "(state = 'reported' AND result_status IS NOT 'completed')) ORDER BY seq",
            (project_id,),
        )
        return [row for row in map(_combo_row, rows) if row.outcome == "failed"]

    def _transition(
        self,
        method: str,
        key: ComboKey,
        sets: Callable[[sqlite3.Row], dict[str, Any]] | dict[str, Any],
    ) -> sqlite3.Row:
        """Move one combination along the state machine in one transaction; returns the new row.

        ``sets`` gives the columns to write, or computes them from the current row (inside the
        same transaction, so a read-modify-write cannot interleave).
        """
        sources, target = _TRANSITIONS[method]
        where = "WHERE project_id = ? AND media_id = ? AND analysis_id = ?"
        ids = (key.project_id, key.media_id, key.analysis_id)
        with self._tx(f"{method} {key}") as conn:
            row = conn.execute(f"SELECT * FROM combos {where}", ids).fetchone()  # noqa: S608
            if row is None:
                raise StateError(f"{method}: combination {key} is not part of a stored job")
            if row["state"] not in sources:
                raise StateError(
                    f"illegal transition of combination {key}: {row['state']} -> {target} "
                    f"({method}); allowed from {', '.join(sources)}"
                )
            if method == "mark_posting":
                job = self._job_in_tx(conn, key.project_id)
                if job["state"] != "open":
                    raise StateError(f"mark_posting: job {key.project_id} is closed")
            values = sets(row) if callable(sets) else dict(sets)
            values.update(state=target, updated_at=time.time())
            assignments = ", ".join(f"{col} = ?" for col in values)
            conn.execute(
                f"UPDATE combos SET {assignments} {where}",  # noqa: S608 - column names are ours
                (*values.values(), *ids),
            )
            new = conn.execute(f"SELECT * FROM combos {where}", ids).fetchone()  # noqa: S608
        return new  # type: ignore[no-any-return]

    def record_attempt(
        self, key: ComboKey, reasons: list[str], metrics: dict[str, Any] | None = None
    ) -> int:
        """Record one failed inference/QA try (its reasons); stays ``pending``. Returns attempts."""
        extra = _metric_columns(metrics)
        clean = [str(r) for r in reasons]

        def sets(row: sqlite3.Row) -> dict[str, Any]:
            return {
                "attempts": row["attempts"] + 1,
                "reasons": _dumps([*json.loads(row["reasons"]), clean]),
                **extra,
            }

        return int(self._transition("record_attempt", key, sets)["attempts"])

    def mark_ready(
        self,
        key: ComboKey,
        body: dict[str, Any],
        result_status: str,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """``pending -> ready``: the final POST body is stored; nothing was sent yet."""
        if result_status not in RESULT_STATUSES:
            raise StateError(f"mark_ready {key}: result status must be completed or failed")
        if body.get("status") != result_status:
            raise StateError(
                f"mark_ready {key}: body status {body.get('status')!r} != {result_status!r}"
            )
        sets: dict[str, Any] = {"body": _dumps(body), "result_status": result_status}
        sets.update(_metric_columns(metrics))
        self._transition("mark_ready", key, sets)

    def mark_posting(self, key: ComboKey) -> None:
        """``ready|posting -> posting``: the POST intent, recorded BEFORE the call."""
        self._transition(
            "mark_posting", key, lambda row: {"post_attempts": row["post_attempts"] + 1}
        )

    def mark_reported(self, key: ComboKey, http_status: int, detail: str | None = None) -> None:
        """``posting -> reported``: the server has it (2xx, or duplicate-400 after an unknown)."""
        _check_http_status(key, http_status)
        self._transition(
            "mark_reported", key, {"http_status": http_status, "server_detail": detail}
        )

    def mark_rejected(self, key: ComboKey, http_status: int | None, detail: str) -> None:
        """``posting -> rejected``: a visible failure with the server's detail; never retried.

        ``http_status`` is ``None`` when no answer decided it: the call was refused before
        sending (e.g. a body that cannot be encoded) or every retry round failed in transit.
        """
        if http_status is not None:
            _check_http_status(key, http_status)
        self._transition(
            "mark_rejected", key, {"http_status": http_status, "server_detail": detail}
        )

    # ------------------------------------------------------------------ media cache

    def media_path(self, project_id: str, media_id: str, variant: str) -> Path:
        """Where the cached image lives: ``<state dir>/media/<project>/<media>-<variant>``."""
        for what, value in (
            ("project id", project_id),
            ("media id", media_id),
            ("variant", variant),
        ):
            if not _SAFE_NAME.match(value) or ".." in value:
                raise StateError(f"{what} {value!r} cannot be used in a file name")
        return self.state_dir / "media" / project_id / f"{media_id}-{variant}"

    def record_media(
        self,
        project_id: str,
        media_id: str,
        variant: str,
        *,
        path: Path,
        size: tuple[int, int],
        nbytes: int,
        sha256: str,
    ) -> None:
        """Record a downloaded, validated image and count the download."""
        now = time.time()
        with self._tx(f"record media {project_id}/{media_id}/{variant}") as conn:
            conn.execute(
                """INSERT OR REPLACE INTO media (project_id, media_id, variant, ok, path, width,
                       height, nbytes, sha256, error, updated_at)
                   VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, NULL, ?)""",
                (project_id, media_id, variant, str(path), size[0], size[1], nbytes, sha256, now),
            )
            conn.execute(
                """INSERT INTO media_downloads (project_id, count) VALUES (?, 1)
                   ON CONFLICT (project_id) DO UPDATE SET count = count + 1""",
                (project_id,),
            )

    def record_media_error(self, project_id: str, media_id: str, variant: str, reason: str) -> None:
        """Record why an image could not be used (its combinations fail with this reason)."""
        with self._tx(f"record media error {project_id}/{media_id}/{variant}") as conn:
            conn.execute(
                """INSERT OR REPLACE INTO media (project_id, media_id, variant, ok, error,
                       updated_at) VALUES (?, ?, ?, 0, ?, ?)""",
                (project_id, media_id, variant, reason, time.time()),
            )

    def media(self, project_id: str, media_id: str, variant: str) -> MediaRow | None:
        """The cache entry (image or error) of one (project, media, variant), if any."""
        rows = self._query(
            "SELECT * FROM media WHERE project_id = ? AND media_id = ? AND variant = ?",
            (project_id, media_id, variant),
        )
        if not rows:
            return None
        r = rows[0]
        return MediaRow(
            project_id=r["project_id"],
            media_id=r["media_id"],
            variant=r["variant"],
            ok=bool(r["ok"]),
            path=Path(r["path"]) if r["path"] is not None else None,
            width=r["width"],
            height=r["height"],
            nbytes=r["nbytes"],
            sha256=r["sha256"],
            error=r["error"],
            updated_at=r["updated_at"],
        )

    def downloads(self, project_id: str) -> int:
        """How many image downloads were actually made for this project (all variants)."""
        rows = self._query("SELECT count FROM media_downloads WHERE project_id = ?", (project_id,))
        return int(rows[0]["count"]) if rows else 0


# ---------------------------------------------------------------------- helpers


def _acquire_lock(state_dir: Path) -> int:
    """Take the directory lock (held for the Store's life) and write our pid into it."""
    lock_path = state_dir / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StateError(
            f"state directory {state_dir} is not writable: cannot open {LOCK_NAME}: "
            f"{exc.strerror or exc}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        except OSError:
            pid = "unknown"
        os.close(fd)
        raise StateError(
            f"state directory {state_dir} is in use by another worker (pid {pid})"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StateError(f"cannot lock state directory {state_dir}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError as exc:
        _release_lock(fd)
        raise StateError(
            f"state directory {state_dir} is not writable: {exc.strerror or exc}"
        ) from None
    return fd


def _release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def _check_db_file(path: Path) -> None:
    """Refuse a file that is not SQLite before sqlite3 touches it (it is never rewritten)."""
    try:
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateError(f"cannot read state database {path}: {exc.strerror or exc}") from None
    if head and head != _SQLITE_MAGIC:
        raise StateError(
            f"state database {path} is not a SQLite database; refusing to use or overwrite it "
            "(move it away to start with empty state)"
        )


def _connect(path: Path) -> sqlite3.Connection:
    _check_db_file(path)
    if not os.access(path.parent, os.W_OK):
        raise StateError(f"state directory {path.parent} is not writable")
    try:
        # Used from the event loop's thread and the store's writer thread, never at once: every
        # use holds Store._mutex.
        conn = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
    except sqlite3.Error as exc:
        reason = _sqlite_reason(exc)
        if _looks_unwritable(reason):
            raise StateError(f"state directory {path.parent} is not writable: {reason}") from None
        raise StateError(f"cannot open state database {path}: {reason}") from None
    conn.row_factory = sqlite3.Row
    try:
        check = conn.execute("PRAGMA quick_check").fetchall()
        if [tuple(r) for r in check] != [("ok",)]:
            problems = "; ".join(str(r[0]) for r in check[:3])
            raise StateError(
                f"state database {path} is corrupt ({problems}); refusing to use or overwrite it "
                "(move it away to start with empty state)"
            )
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StateError(f"state database {path}: cannot enable WAL (journal mode {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        reason = _sqlite_reason(exc)
        if isinstance(exc, sqlite3.OperationalError) and _looks_unwritable(reason):
            raise StateError(f"state directory {path.parent} is not writable: {reason}") from None
        raise StateError(
            f"state database {path} cannot be used ({reason}); refusing to use or overwrite it "
            "(move it away to start with empty state)"
        ) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing state database; see :meth:`Store.open_readonly`."""
    if not path.is_file():
        raise StateError(f"no state database at {path}")
    _check_db_file(path)
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    try:
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, timeout=5.0, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StateError(
            f"cannot open state database {path} read-only: {_sqlite_reason(exc)}"
        ) from None
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA query_only = ON")
        _check_schema_readonly(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StateError(f"state database {path} cannot be read ({_sqlite_reason(exc)})") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _check_schema_readonly(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a database whose migrations are not exactly this version's (nothing is migrated:
    the reader must not write; the worker's next start upgrades an older one)."""
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if has_table is None:
        raise StateError(f"{path} is not a goflow state database (it has no schema_migrations)")
    applied = {r[0]: r[1] for r in conn.execute("SELECT id, name FROM schema_migrations")}
    known = {i: name for i, (name, _) in enumerate(MIGRATIONS, start=1)}
    for number, name in sorted(applied.items()):
        if known.get(number) != name:
            raise StateError(
                f"state database {path} has migration {number} ({name}) unknown to this "
                "goflow-gpu version; it was written by a newer one"
            )
    missing = [f"{number} ({name})" for number, name in known.items() if number not in applied]
    if missing:
        raise StateError(
            f"state database {path} was written by an older goflow-gpu (migrations "
            f"{', '.join(missing)} not applied); reading it needs the upgrade that the next "
            "`goflow-gpu run` or `serve` makes (it is not made by a read-only command)"
        )


def _looks_unwritable(reason: str) -> bool:
    text = reason.lower()
    return "readonly" in text or "read-only" in text or "unable to open" in text


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Apply the missing migrations in order, each in its own transaction with its record."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "id INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    applied = {r[0]: r[1] for r in conn.execute("SELECT id, name FROM schema_migrations")}
    known = {i: name for i, (name, _) in enumerate(MIGRATIONS, start=1)}
    for number, name in applied.items():
        if number not in known:
            raise StateError(
                f"state database {path} has migration {number} ({name}) unknown to this "
                "goflow-gpu version; it was written by a newer one"
            )
        if known[number] != name:
            raise StateError(
                f"state database {path}: migration {number} is {name!r}, expected {known[number]!r}"
            )
    for number, (name, sql) in enumerate(MIGRATIONS, start=1):
        if number in applied:
            continue
        # executescript would commit first; one script with its own BEGIN keeps it atomic.
        script = (
            f"BEGIN IMMEDIATE;\n{sql}\n"
            f"INSERT INTO schema_migrations (id, name, applied_at) "
            f"VALUES ({number}, '{name}', {time.time()!r});\nCOMMIT;"
        )
        try:
            conn.executescript(script)
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        log.info("state migrated", migration=number, name=name)


def _project_id_of(manifest_raw: dict[str, Any]) -> str:
    """The job's key: ``project.id`` in canonical (lower-case) form, whatever the server's case."""
    project = manifest_raw.get("project") if isinstance(manifest_raw, dict) else None
    pid = project.get("id") if isinstance(project, dict) else None
    if not isinstance(pid, str) or not pid:
        raise StateError("create_job: the manifest has no project.id")
    return pid.lower()


def _check_phase(what: str, current: str, phase: str) -> None:
    if phase == "intent":
        if current == "sent":
            raise StateError(f"{what} was already sent; refusing to send it again")
    elif phase == "sent":
        if current != "intent":
            raise StateError(f"{what}: 'sent' recorded without an intent (was {current!r})")
    else:
        raise StateError(f"{what}: unknown phase {phase!r} (intent or sent)")


def _check_state_name(state: str) -> None:
    if state not in COMBO_STATES:
        raise StateError(f"unknown combination state {state!r}")


def _check_http_status(key: ComboKey, status: int) -> None:
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise StateError(f"combination {key}: {status!r} is not an HTTP status code")


def _metric_columns(metrics: dict[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    unknown = set(metrics) - set(METRIC_KEYS)
    if unknown:
        raise StateError(f"unknown metrics {sorted(unknown)}; known: {', '.join(METRIC_KEYS)}")
    return {k: v for k, v in metrics.items() if v is not None}


def _job_row(r: sqlite3.Row) -> JobRow:
    return JobRow(
        project_id=r["project_id"],
        manifest=json.loads(r["manifest"]),
        state=r["state"],
        created_at=r["created_at"],
        closed_at=r["closed_at"],
        status_processing=r["status_processing"],
        status_completed=r["status_completed"],
        report=r["report"],
        report_body=json.loads(r["report_body"]) if r["report_body"] is not None else None,
        attention=r["attention"],
        attention_at=r["attention_at"],
        put_resends=r["put_resends"],
        closed_reason=r["closed_reason"],
    )


def _combo_row(r: sqlite3.Row) -> ComboRow:
    return ComboRow(
        key=ComboKey(r["project_id"], r["media_id"], r["analysis_id"]),
        plan=PlannedCombo(
            media_id=r["media_id"],
            analysis_id=r["analysis_id"],
            slug=r["slug"],
            variant=r["variant"],
            system_prompt=r["system_prompt"],
            user_prompt=r["user_prompt"],
            json_schema=json.loads(r["json_schema"]),
            spec_version=r["spec_version"],
            max_tokens=r["max_tokens"],
            temperature=r["temperature"],
            qa_rules=json.loads(r["qa_rules"]),
        ),
        state=r["state"],
        attempts=r["attempts"],
        reasons=json.loads(r["reasons"]),
        body=json.loads(r["body"]) if r["body"] is not None else None,
        result_status=r["result_status"],
        post_attempts=r["post_attempts"],
        http_status=r["http_status"],
        server_detail=r["server_detail"],
        inference_seconds=r["inference_seconds"],
        prompt_tokens=r["prompt_tokens"],
        cached_tokens=r["cached_tokens"],
        generated_tokens=r["generated_tokens"],
    )
