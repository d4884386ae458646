"""The ``goflow-gpu`` command line. Thin: parse, configure, call one entry point.

Exit codes: 0 ok (or drained on SIGTERM); 1 a job was skipped or parked as needs-attention;
2 bad configuration or usage (a broken prompt catalog included); 3 the backend refused the API
key; 4 the local state cannot be used; 5 the inference engine failed (dead or not loadable; state
kept, a restart resumes); 75 (EX_TEMPFAIL, ``run``) the backend or an image host stayed down past
``outage_patience``: try again later, the state is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from goflow_gpu import progress
from goflow_gpu.bench.cli import register as register_bench
from goflow_gpu.doctor import register as register_doctor
from goflow_gpu.engines.cli import dev_app
from goflow_gpu.errors import (
    AuthenticationError,
    ConfigError,
    EngineError,
    GoFlowError,
    StateError,
)
from goflow_gpu.events import Events
from goflow_gpu.logs import setup_logging
from goflow_gpu.prompts.cli import app as prompts_app
from goflow_gpu.settings import Settings, load_settings
from goflow_gpu.simulator.cli import register as register_simulate

if TYPE_CHECKING:
    from goflow_gpu.store import JobRow, Store

app = typer.Typer(
    name="goflow-gpu",
    help=(
        "GPU worker for GoFlow media analysis. Pulls jobs from the GoFlow backend, runs every "
        "image x analysis through a locally hosted Qwen2.5-VL (vLLM), checks each answer "
        "against its JSON schema, and reports each result exactly once.\n\n"
        "Configuration: CLI flags > environment (GOFLOW_*) > --config YAML > defaults. "
        "The API key is read from GOFLOW_API_KEY only.\n\n"
        "Start with `goflow-gpu demo` (no GPU, no network needed)."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            shown = version("goflow-gpu")
        except PackageNotFoundError:  # run from a source tree that was never installed
            shown = "unknown (not installed)"
        typer.echo(f"goflow-gpu {shown}")
        raise typer.Exit(0)


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """GPU worker for GoFlow media analysis (see the commands below)."""


state_app = typer.Typer(
    help=(
        "Inspect the local state (jobs, progress, rejected manifests); retry or abandon jobs "
        "parked as needs-attention."
    )
)
app.add_typer(state_app, name="state")
app.add_typer(prompts_app, name="prompts")
app.add_typer(dev_app, name="dev")
register_simulate(app)
register_doctor(app)
register_bench(app)

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (see configs/).", exists=False),
]
BaseUrlOpt = Annotated[
    str | None, typer.Option(help="GoFlow backend URL [env GOFLOW_BASE_URL].", show_default=False)
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(help="Where jobs, results and images are kept [env GOFLOW_STATE_DIR]."),
]
EngineOpt = Annotated[
    str | None, typer.Option(help="vllm | transformers | openai [env GOFLOW_ENGINE].")
]
ModelOpt = Annotated[
    str | None, typer.Option(help="Model id in the HF cache, or a local dir [env GOFLOW_MODEL].")
]
MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        help="Serve /metrics, /healthz and /readyz on this port [env GOFLOW_METRICS_PORT]."
    ),
]
PromptsDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Prompt catalog folder; checked before any job is taken [env GOFLOW_PROMPTS_DIR].",
        show_default=False,
    ),
]
LogFormatOpt = Annotated[
    str | None,
    typer.Option(help="auto (JSON unless on a terminal) | json | console [env GOFLOW_LOG_FORMAT]."),
]


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Map the error tree to exit codes with one clear line, never a stack trace."""
    try:
        yield
    except ConfigError as exc:
        err.print(f"[bold red]configuration error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except AuthenticationError as exc:
        err.print(
            f"[bold red]authentication failed:[/] {exc}. Check GOFLOW_API_KEY; state is kept "
            "and the job resumes on the next start.",
            highlight=False,
        )
        raise typer.Exit(3) from None
    except StateError as exc:
        err.print(f"[bold red]state error:[/] {exc}", highlight=False)
        raise typer.Exit(4) from None
    except EngineError as exc:
        err.print(
            f"[bold red]engine failed:[/] {exc}. State is kept; a restart resumes the job.",
            highlight=False,
        )
        raise typer.Exit(5) from None
    except GoFlowError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


def _settings(config: Path | None, **flags: Any) -> Settings:
    settings = load_settings(config, **flags)
    setup_logging(settings.log_format, settings.log_level)
    return settings


def _work(burst: bool, config: Path | None, **flags: Any) -> None:
    from goflow_gpu.service import run_worker

    with _errors():
        settings = _settings(config, **flags)
        settings.require_api_key()
        events = Events()
        with contextlib.ExitStack() as stack:
            if progress.wanted(err, settings.log_format):
                events.subscribe(stack.enter_context(progress.JobProgress(err)))
            result = asyncio.run(run_worker(settings, burst=burst, events=events))
    err.print(
        f"{'drained' if result.drained else 'done'}: "
        f"{result.closed}/{result.job_runs} job runs closed, "
        f"{result.skipped} skipped, {result.parked} parked, {result.unfinished} unfinished",
        highlight=False,
    )
    raise typer.Exit(result.exit_code)


@app.command()
def serve(
    config: ConfigOpt = None,
    base_url: BaseUrlOpt = None,
    state_dir: StateDirOpt = None,
    engine: EngineOpt = None,
    model: ModelOpt = None,
    log_format: LogFormatOpt = None,
    metrics_port: MetricsPortOpt = None,
    prompts_dir: PromptsDirOpt = None,
) -> None:
    """Run the worker forever: resume unfinished jobs, then poll next-job (with backoff).

    SIGTERM or Ctrl-C stops polling and new inference, gives in-flight requests
    drain_timeout (GOFLOW_DRAIN_TIMEOUT, 20 s) to finish and be reported, records the state
    and exits 0; the next start resumes the job where it stopped. Backend and image-host
    outages are waited out (never a lost result); /readyz says what it waits for.
    """
    _work(
        False,
        config,
        base_url=base_url,
        state_dir=state_dir,
        engine=engine,
        model=model,
        log_format=log_format,
        metrics_port=metrics_port,
        prompts_dir=prompts_dir,
    )


@app.command()
def run(
    config: ConfigOpt = None,
    base_url: BaseUrlOpt = None,
    state_dir: StateDirOpt = None,
    engine: EngineOpt = None,
    model: ModelOpt = None,
    log_format: LogFormatOpt = None,
    metrics_port: MetricsPortOpt = None,
    prompts_dir: PromptsDirOpt = None,
) -> None:
    """Burst mode: process jobs until next-job says there is none, then exit.

    Exit 0 when every job closed; 1 when a job had to be skipped (invalid manifest, kept in
    the state for inspection) or was parked (a status/report PUT refused: `state show`); 75
    (try again later) when the backend or an image host stayed down past outage_patience
    (GOFLOW_OUTAGE_PATIENCE, 600 s), state kept; 3 when the key is refused; 5 when the engine
    failed.
    """
    _work(
        True,
        config,
        base_url=base_url,
        state_dir=state_dir,
        engine=engine,
        model=model,
        log_format=log_format,
        metrics_port=metrics_port,
        prompts_dir=prompts_dir,
    )


ProjectArg = Annotated[
    str,
    typer.Argument(
        help="Project id of the job (a UUID; any case), as listed by `goflow-gpu state show`.",
        show_default=False,
    ),
]


def _utc(ts: float | None) -> str:
    """A stored epoch time as a UTC ISO time (``?`` when missing)."""
    if ts is None:
        return "?"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _say(text: str) -> None:
    """A line of command output as it is: no markup, no highlighting, never wrapped (reasons
    come from the backend and must be copied whole)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def _usage_error(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _existing_store(config: Path | None, state_dir: Path | None) -> Iterator[tuple[Path, Store]]:
    """Open the state of an existing state directory; never create an empty database.

    Yields the state directory and the open store (which holds the directory lock). Exit 2
    when ``state.db`` does not exist; the usual exit codes for bad settings (2) and for a state
    that cannot be used or is locked by a running worker (4).
    """
    from goflow_gpu.store import DB_NAME, Store

    with _errors():
        settings = load_settings(config, state_dir=state_dir)
        directory = settings.state_dir.expanduser().resolve()
        db = directory / DB_NAME
        if not db.is_file():
            _usage_error(
                f"no state database at {db} (none was created): pass --state-dir or --config "
                "naming the worker's state directory"
            )
        with Store.open(directory) as store:
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


@state_app.command("show")
def state_show(
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """List the jobs in the local state with their progress (combinations by state).

    A job shown as `needs-attention` is parked: the backend refused one of its status or
    report PUTs, so the worker does not resume it by itself. Under the table each parked job is
    listed with the full reason and since when (UTC); fix the cause, then run
    `goflow-gpu state retry PROJECT`, or give it up with `goflow-gpu state abandon PROJECT`.
    Jobs closed without their report (abandoned) are listed with why.

    Exit 2 when the state directory holds no state database (none is created).
    """
    with _existing_store(config, state_dir) as (directory, store):
        table = Table(title=f"jobs in {directory}")
        for column in ("project", "name", "state", "combos", "by state", "statuses", "report"):
            table.add_column(column)
        jobs = store.jobs()
        for job in jobs:
            counts = store.counts(job.project_id)
            project = job.manifest.get("project", {})
            table.add_row(
                job.project_id,
                str(project.get("name", "?")),
                "needs-attention" if job.parked else job.state,
                str(sum(counts.values())),
                ", ".join(f"{k} {v}" for k, v in counts.items() if v),
                f"processing:{job.status_processing} completed:{job.status_completed}",
                job.report,
            )
        out.print(table)
        parked = [job for job in jobs if job.parked]
        if parked:
            _say(
                f"{len(parked)} job(s) need attention (not resumed until "
                "`goflow-gpu state retry PROJECT` or `goflow-gpu state abandon PROJECT`):"
            )
            for job in parked:
                _say(
                    f"  {job.project_id} needs attention since {_utc(job.attention_at)}: "
                    f"{job.attention}"
                )
        abandoned = [job for job in jobs if job.state == "closed" and job.closed_reason]
        if abandoned:
            _say(f"{len(abandoned)} job(s) closed without their report:")
            for job in abandoned:
                _say(f"  {job.project_id} closed {_utc(job.closed_at)}: {job.closed_reason}")
        rejected = store.rejected_manifests()
        if rejected:
            out.print(f"{len(rejected)} rejected manifest(s) kept for inspection")


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
    not parked (it resumes by itself). Run it while no worker uses the state directory (exit 4
    otherwise).
    """
    with _existing_store(config, state_dir) as (directory, store):
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
    confirmation; exit 1 when the confirmation is declined.
    """
    with _existing_store(config, state_dir) as (directory, store):
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
    with _existing_store(config, state_dir) as (directory, store):
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


@app.command()
def demo(
    media: Annotated[int, typer.Option(help="Media items in the demo job.", min=1)] = 2,
    analyses: Annotated[int, typer.Option(help="Analysis types in the demo job.", min=1)] = 4,
    engine: EngineOpt = None,
    model: Annotated[
        str | None,
        typer.Option(help="Real weights (HF id or dir). Default: a tiny random-weight model."),
    ] = None,
    config: ConfigOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Keep state, report and ledger here.")
    ] = None,
) -> None:
    """Run the whole job flow end to end against the embedded GoFlow simulator.

    Starts the simulator in-process, queues one job, and runs the real worker on it with the
    best engine available: vLLM on CUDA with real weights when --model or a config names them,
    otherwise a tiny random-weight Qwen2.5-VL built locally (its answers mean nothing: the demo
    shows the flow, the QA and the exactly-once reporting). Needs no GPU and no network.
    """
    from goflow_gpu.demo import run_demo

    with _errors():
        code = run_demo(
            media=media,
            analyses=analyses,
            engine=engine,
            model=model,
            config=config,
            out_dir=out_dir,
            console=out,
        )
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point.

    vLLM logs to stdout unless told otherwise (``VLLM_LOGGING_STREAM``), which put its lines in
    the middle of command output (``demo`` and ``prompts eval`` tables, ``--json`` output).
    Every command sends them to stderr, with the other logs, the engine-core processes included
    (they inherit the environment); an operator's own setting wins.
    """
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
