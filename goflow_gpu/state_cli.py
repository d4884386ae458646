"""``goflow-gpu state``: look at the local state (``show``), re-arm or give up parked jobs.

``show`` only reads: it opens the database read-only (:meth:`Store.open_readonly`), without the
directory lock a running worker holds for its whole life, so an operator can look at a job
exactly while it runs (or hangs). ``retry`` and ``abandon`` change the state, so they take the
lock like a worker does and refuse while one runs. None of them ever creates a database: a
directory without one is refused, with the nearby directories that have one.

``show --json`` prints one JSON document on stdout, for scripts (its shape is documented on
:func:`show_document` and in docs/OPERATIONS.md; fields are only ever added).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from goflow_gpu.errors import GoFlowError, StateError
from goflow_gpu.settings import Settings, load_settings

if TYPE_CHECKING:
    from goflow_gpu.store import ComboRow, JobRow, Store

state_app = typer.Typer(
    help=(
        "Inspect the local state (jobs, progress, prompt versions, failed combinations, "
        "rejected manifests), also beside a running worker; retry or abandon jobs parked as "
        "needs-attention."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

out = Console()
err = Console(stderr=True)

#: failed combinations listed by the text output (``--json`` lists them all)
FAILURES_SHOWN = 20
#: the version of the ``show --json`` document's shape (raised only if a field changes meaning)
JSON_FORMAT = 1

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (see configs/).", exists=False),
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(help="The worker's state directory [env GOFLOW_STATE_DIR].", show_default=False),
]
ProjectArg = Annotated[
    str,
    typer.Argument(
        help="Project id of the job (a UUID; any case), as listed by `goflow-gpu state show`.",
        show_default=False,
    ),
]


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """The command line's one mapping of errors to exit codes and one-line messages (a state
    that cannot be used, a missing one included, exits 4; bad settings 2)."""
    from goflow_gpu.cli import _errors as errors  # cli imports this module: import at call time

    with errors():
        yield


def _utc(ts: float | None) -> str:
    """A stored epoch time as a UTC ISO time (``?`` when missing)."""
    if ts is None:
        return "?"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else _utc(ts)


def _clean(text: str) -> str:
    """Text from the backend (names, reasons) with control characters escaped, so that it can
    neither move the cursor nor recolour the operator's terminal; everything else is kept."""
    if not any(unicodedata.category(ch) == "Cc" for ch in text):
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc" else ch
        for ch in text
    )


def _say(text: str) -> None:
    """A line of command output as it is: no markup, no highlighting, never wrapped (ids and
    reasons must be copied whole)."""
    out.print(_clean(text), markup=False, highlight=False, soft_wrap=True)


def _usage_error(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


# ---------------------------------------------------------------------- finding the state


def _state_dir(config: Path | None, state_dir: Path | None) -> tuple[Path, Settings]:
    settings = load_settings(config, state_dir=state_dir)
    return settings.state_dir.expanduser().resolve(), settings


def nearby_states(directory: Path, candidates: list[Path]) -> list[Path]:
    """State directories (holding a ``state.db``) an operator who typed ``directory`` may have
    meant, best first, at most three: the file's folder when the database itself was named,
    ``candidates`` (the configured and the default state directory), its sub-folders (the
    parent of the state was named), its siblings closest in name (a typo), its parent. Cheap:
    a bounded number of ``stat`` calls, nothing is opened."""
    from goflow_gpu.store import DB_NAME

    seen = {directory}
    found: list[Path] = []

    def consider(path: Path) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            path = path.expanduser().resolve()
            if path not in seen:
                seen.add(path)
                if (path / DB_NAME).is_file():
                    found.append(path)

    def folders(base: Path) -> list[Path]:
        try:
            return [p for p in itertools.islice(base.iterdir(), 500) if p.is_dir()]
        except OSError:
            return []

    if directory.is_file():
        consider(directory.parent)
    for path in candidates:
        consider(path)
    for path in sorted(folders(directory)):
        consider(path)
    siblings = folders(directory.parent) if directory.parent != directory else []
    for path in sorted(
        siblings,
        key=lambda p: -difflib.SequenceMatcher(None, p.name, directory.name).ratio(),
    ):
        consider(path)
    consider(directory.parent)
    return found[:3]


def _no_state(directory: Path, config: Path | None, settings: Settings) -> StateError:
    """The refusal for a directory without a state database, with what it may have meant."""
    from goflow_gpu.store import DB_NAME

    candidates = [settings.state_dir]
    with contextlib.suppress(GoFlowError):  # the directory the flag replaced (env, file)
        candidates.append(load_settings(config).state_dir)
    default = Settings.model_fields["state_dir"].default
    if isinstance(default, Path):
        candidates.append(default)
    guesses = nearby_states(directory, candidates)
    if guesses:
        hint = "did you mean --state-dir " + ", or ".join(str(p) for p in guesses) + "?"
    else:
        hint = (
            "pass --state-dir (or GOFLOW_STATE_DIR, or --config) naming the worker's state "
            "directory"
        )
    return StateError(
        f"no state here: {directory} has no goflow state database ({DB_NAME}; nothing was "
        f"created); {hint}"
    )


@contextlib.contextmanager
def _reading(config: Path | None, state_dir: Path | None) -> Iterator[tuple[Path, Store]]:
    """The state read-only, beside a running worker or not (no lock, nothing written)."""
    from goflow_gpu.store import DB_NAME, Store

    with _errors():
        directory, settings = _state_dir(config, state_dir)
        if not (directory / DB_NAME).is_file():
            raise _no_state(directory, config, settings)
        with Store.open_readonly(directory) as store:
            yield directory, store


@contextlib.contextmanager
def _writing(
    config: Path | None, state_dir: Path | None, command: str
) -> Iterator[tuple[Path, Store]]:
    """The state with the directory lock, for a command that changes it: refused while a worker
    holds the lock (exit 4), never created when missing (exit 4)."""
    from goflow_gpu.store import DB_NAME, Store

    with _errors():
        directory, settings = _state_dir(config, state_dir)
        if not (directory / DB_NAME).is_file():
            raise _no_state(directory, config, settings)
        try:
            store = Store.open(directory)
        except StateError as exc:
            if "in use by another worker" not in str(exc):
                raise
            raise StateError(
                f"{exc}; `goflow-gpu state {command}` changes the state, so it does not run "
                "beside a worker: stop the worker (SIGTERM drains it), run this again, then "
                "start the worker; `goflow-gpu state show` works while it runs"
            ) from None
        with store:
            yield directory, store


def _find_job(store: Store, directory: Path, project: str) -> JobRow:
    """The stored job with this id (any case), or exit 2 naming the state dir searched."""
    job = store.job(project.strip())
    if job is None:
        _usage_error(
            f"no job {project} in the state at {directory}; "
            "`goflow-gpu state show` lists the stored jobs"
        )
    return job


def _closed_text(job: JobRow) -> str:
    reason = f": {job.closed_reason}" if job.closed_reason else ""
    return f"job {job.project_id} is closed (since {_utc(job.closed_at)}){reason}"


# ---------------------------------------------------------------------- show


def _failure(row: ComboRow) -> dict[str, Any]:
    return {
        "media_id": row.key.media_id,
        "analysis_id": row.key.analysis_id,
        "analysis": row.plan.slug,
        "spec_version": row.plan.spec_version,
        "state": row.state,
        "result_status": row.result_status,
        "attempts": row.attempts,
        "reasons": row.reasons[-1] if row.reasons else [],
        "http_status": row.http_status,
        "server_detail": row.server_detail,
    }


def show_document(directory: Path, store: Store) -> dict[str, Any]:
    """What ``state show`` knows, as the ``--json`` document. Its shape (``format`` 1)::

        {"format": 1, "state_dir": "/abs/dir",
         "jobs": [{"project_id": str, "name": str | null,
                   "state": "open" | "closed", "needs_attention": bool,
                   "attention": {"reason": str, "since": ISO} | null,
                   "created_at": ISO, "closed_at": ISO | null, "closed_reason": str | null,
                   "statuses": {"processing": PHASE, "completed": PHASE}, "report": PHASE,
                   "combinations": int,
                   "counts": {"pending": int, "ready": int, "posting": int,
                              "reported": int, "rejected": int},
                   "failed": int,
                   "prompt_versions": {slug: [int, ...]},
                   "failures": [{"media_id", "analysis_id", "analysis" (slug), "spec_version",
                                 "state", "result_status", "attempts",
                                 "reasons" (the last attempt's), "http_status",
                                 "server_detail"}]}],
         "rejected_manifests": [{"id": int, "error": str, "received_at": ISO}]}

    Jobs oldest first; PHASE is ``no``, ``intent`` or ``sent``; times are UTC ISO 8601.
    ``failed`` counts the failed combinations (settled, and not a completed result the backend
    holds: QA or the engine gave up, or the backend refused the result; the same count as the
    job's report) and ``failures`` lists every one of them.
    """
    jobs = []
    for job in store.jobs():
        counts = store.counts(job.project_id)
        failures = [_failure(row) for row in store.failed_combos(job.project_id)]
        name = job.manifest.get("project", {}).get("name")
        jobs.append(
            {
                "project_id": job.project_id,
                "name": name if isinstance(name, str) else None,
                "state": job.state,
                "needs_attention": job.parked,
                "attention": (
                    {"reason": job.attention, "since": _iso(job.attention_at)}
                    if job.parked and job.attention is not None
                    else None
                ),
                "created_at": _iso(job.created_at),
                "closed_at": _iso(job.closed_at),
                "closed_reason": job.closed_reason,
                "statuses": {
                    "processing": job.status_processing,
                    "completed": job.status_completed,
                },
                "report": job.report,
                "combinations": sum(counts.values()),
                "counts": counts,
                "failed": len(failures),
                "prompt_versions": store.spec_versions(job.project_id),
                "failures": failures,
            }
        )
    rejected = [
        {"id": m["id"], "error": m["error"], "received_at": _iso(m["received_at"])}
        for m in store.rejected_manifests()
    ]
    return {
        "format": JSON_FORMAT,
        "state_dir": str(directory),
        "jobs": jobs,
        "rejected_manifests": rejected,
    }


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows as aligned columns, never truncated nor wrapped (ids are copied from here)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _failure_text(job_id: str, failure: dict[str, Any]) -> str:
    what = []
    if failure["result_status"] == "failed":
        reasons = "; ".join(str(r) for r in failure["reasons"]) or "no reason recorded"
        what.append(f"failed after {failure['attempts']} QA attempt(s): {reasons}")
    if failure["state"] == "rejected":
        what.append(
            f"refused by the backend (HTTP {failure['http_status']}): {failure['server_detail']}"
        )
    return (
        f"  {job_id}  media {failure['media_id']}  {failure['analysis']} "
        f"v{failure['spec_version']} [{failure['state']}]: {'; '.join(what)}"
    )


def _print_show(doc: dict[str, Any]) -> None:
    jobs = doc["jobs"]
    rejected = doc["rejected_manifests"]
    _say(f"state in {doc['state_dir']}: {len(jobs)} job(s)")
    if jobs:
        header = ["project", "name", "state", "combos", "by state", "failed", "statuses", "report"]
        rows = [header]
        for job in jobs:
            rows.append(
                [
                    job["project_id"],
                    _clean(job["name"] or "?"),
                    "needs-attention" if job["needs_attention"] else job["state"],
                    str(job["combinations"]),
                    ", ".join(f"{k} {v}" for k, v in job["counts"].items() if v) or "-",
                    str(job["failed"]),
                    f"processing:{job['statuses']['processing']} "
                    f"completed:{job['statuses']['completed']}",
                    job["report"],
                ]
            )
        _say("")
        for line in _columns(rows):
            _say(line)
        _say("")
        _say("prompt versions (per analysis, frozen when the job started):")
        for job in jobs:
            versions = ", ".join(
                f"{slug} v{'+v'.join(str(v) for v in numbers)}"
                for slug, numbers in job["prompt_versions"].items()
            )
            _say(f"  {job['project_id']}: {versions or '-'}")
    parked = [job for job in jobs if job["needs_attention"]]
    if parked:
        _say(
            f"{len(parked)} job(s) need attention (not resumed until "
            "`goflow-gpu state retry PROJECT` or `goflow-gpu state abandon PROJECT`):"
        )
        for job in parked:
            _say(
                f"  {job['project_id']} needs attention since {job['attention']['since']}: "
                f"{job['attention']['reason']}"
            )
    abandoned = [job for job in jobs if job["state"] == "closed" and job["closed_reason"]]
    if abandoned:
        _say(f"{len(abandoned)} job(s) closed without their report:")
        for job in abandoned:
            _say(f"  {job['project_id']} closed {job['closed_at']}: {job['closed_reason']}")
    failures = [(job["project_id"], f) for job in jobs for f in job["failures"]]
    if failures:
        more = len(failures) - FAILURES_SHOWN
        _say(
            f"{len(failures)} failed combination(s)"
            + (f", the first {FAILURES_SHOWN} (all of them: --json):" if more > 0 else ":")
        )
        for job_id, failure in failures[:FAILURES_SHOWN]:
            _say(_failure_text(job_id, failure))
    if rejected:
        _say(f"{len(rejected)} rejected manifest(s) kept for inspection (--json lists why)")


@state_app.command("show")
def state_show(
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON document (shape: docs/OPERATIONS.md) for scripts."
        ),
    ] = False,
) -> None:
    """List the jobs in the local state: progress, prompt versions, failed combinations.

    Read-only: it takes no lock and writes nothing, so it works while `goflow-gpu serve` or
    `run` uses the state directory (it shows the last committed state). Ids are printed whole.
    A job shown as `needs-attention` is parked: the backend refused one of its status or
    report PUTs, so the worker does not resume it by itself; it is listed with the full
    reason and since when (UTC): fix the cause, then `goflow-gpu state retry PROJECT`, or give
    it up with `goflow-gpu state abandon PROJECT`. Jobs closed without their report (abandoned)
    are listed with why; failed combinations with their media id, analysis and reasons.

    Exit 4 when the directory holds no state database (none is created; nearby directories
    that have one are suggested) or it cannot be read.
    """
    with _reading(config, state_dir) as (directory, store):
        doc = show_document(directory, store)
    if as_json:
        typer.echo(json.dumps(doc, ensure_ascii=False, indent=2))
    else:
        _print_show(doc)


# ---------------------------------------------------------------------- retry and abandon


@state_app.command("retry")
def state_retry(
    project: ProjectArg,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Re-arm a job parked as needs-attention, so the next `goflow-gpu run`/`serve` resumes it.

    A job is parked when the backend refused one of its status or report PUTs. Once the cause
    is fixed (see the reason in `goflow-gpu state show`), retry clears the mark: the next start
    resumes the job and re-sends the refused PUT. Nothing is sent now.

    Exit 2, changing nothing, for an unknown project id, a closed job, or an open job that is
    not parked (it resumes by itself). It changes the state, so it refuses to run while a
    worker uses the state directory (exit 4: stop the worker first); exit 4 too when the
    directory holds no state database.
    """
    with _writing(config, state_dir, "retry") as (directory, store):
        job = _find_job(store, directory, project)
        if job.state != "open":
            _usage_error(f"{_closed_text(job)}; there is nothing to retry")
        if not job.parked:
            _usage_error(
                f"job {job.project_id} is open and not parked: nothing to retry; "
                "the next `goflow-gpu run`/`serve` resumes it by itself"
            )
        store.rearm_job(job.project_id)
        _say(
            f"job {job.project_id} re-armed: the next `goflow-gpu run`/`serve` resumes it; "
            "it re-sends the refused PUT"
        )
        _say(f"  it was parked since {_utc(job.attention_at)}: {job.attention}")


@state_app.command("abandon")
def state_abandon(
    project: ProjectArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    reason: Annotated[
        str | None,
        typer.Option(help="Why, kept in the state as the job's closed reason.", show_default=False),
    ] = None,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Close an open job locally, without sending anything to the backend.

    For a parked job that cannot be fixed, or a job the backend no longer wants. The job is
    marked closed with the reason "abandoned by operator: ..." and is never resumed; results
    already reported stay reported, the others are never sent, and no status or report PUT is
    sent (the backend's view of the project is left as it is). Asks for confirmation unless
    --yes; without a terminal, pass --yes.

    Exit 2, changing nothing, for an unknown project id, a job already closed, or no
    confirmation; exit 1 when the confirmation is declined; exit 4 while a worker uses the
    state directory (stop it first) or when the directory holds no state database.
    """
    with _writing(config, state_dir, "abandon") as (directory, store):
        job = _find_job(store, directory, project)
        if job.state != "open":
            _usage_error(f"{_closed_text(job)}; there is nothing to abandon")
        counts = store.counts(job.project_id)
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    if not yes:
        parked = f" (needs attention: {job.attention})" if job.parked else ""
        _say(f"job {job.project_id}{parked}: combinations {summary}")
        try:
            confirmed = typer.confirm(
                f"Abandon job {job.project_id}? It is closed locally and never resumed; "
                "nothing is sent to the backend"
            )
        except typer.Abort:
            _usage_error(
                "no confirmation (no terminal or input, or interrupted): nothing changed; "
                "pass --yes to abandon without a prompt"
            )
        if not confirmed:
            out.print(f"job {job.project_id} not abandoned: nothing changed", highlight=False)
            raise typer.Exit(1)
    why = reason.strip() if reason and reason.strip() else "`goflow-gpu state abandon`"
    if job.parked:
        why += f" (it was parked: {job.attention})"
    # Re-open: the lock is not held while waiting for the answer, so check the job again.
    with _writing(config, state_dir, "abandon") as (directory, store):
        job = _find_job(store, directory, project)
        if job.state != "open":
            _usage_error(f"{_closed_text(job)}; there is nothing to abandon")
        store.close_job(job.project_id, reason=f"abandoned by operator: {why}")
        counts = store.counts(job.project_id)
    _say(
        f"job {job.project_id} abandoned: closed locally, it is never resumed. Nothing was "
        "sent to the backend."
    )
    _say("combinations: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
