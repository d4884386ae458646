"""The ``goflow-gpu`` command line. Thin: parse, configure, call one entry point.

Exit codes: 0 ok (or drained on SIGTERM); 1 a job was skipped, abandoned or parked as
needs-attention; 2 bad configuration or usage (a broken prompt catalog included); 3 the backend
refused the API key; 4 the local state cannot be used; 5 the inference engine failed (dead or not
loadable; state kept, a restart resumes); 75 (EX_TEMPFAIL, ``run``) the backend or an image host
stayed down past ``outage_patience``: try again later, the state is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
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
)
state_app = typer.Typer(help="Inspect the local state (jobs, progress, rejected manifests).")
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
        f"{result.skipped} skipped, {result.unfinished} unfinished",
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
) -> None:
    """Run the worker forever: resume unfinished jobs, then poll next-job (with backoff).

    SIGTERM or Ctrl-C stops polling, lets in-flight requests finish and be reported, records
    the state and exits 0; the next start resumes the job where it stopped.
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
) -> None:
    """Burst mode: process jobs until next-job says there is none, then exit.

    Exit 0 when every job closed, 1 when a job had to be skipped (invalid manifest, kept in
    the state for inspection) or could not be finished, 3 when the key is refused.
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
    )


@state_app.command("show")
def state_show(
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """List the jobs in the local state with their progress (combinations by state)."""
    from goflow_gpu.store import Store

    with _errors():
        settings = load_settings(config, state_dir=state_dir)
        with Store.open(settings.state_dir) as store:
            table = Table(title=f"jobs in {settings.state_dir}")
            for column in ("project", "name", "state", "combos", "by state", "statuses", "report"):
                table.add_column(column)
            for job in store.jobs():
                counts = store.counts(job.project_id)
                project = job.manifest.get("project", {})
                table.add_row(
                    job.project_id,
                    str(project.get("name", "?")),
                    job.state,
                    str(sum(counts.values())),
                    ", ".join(f"{k} {v}" for k, v in counts.items() if v),
                    f"processing:{job.status_processing} completed:{job.status_completed}",
                    job.report,
                )
            out.print(table)
            rejected = store.rejected_manifests()
            if rejected:
                out.print(f"{len(rejected)} rejected manifest(s) kept for inspection")


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
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
