"""The ``goflow-gpu`` command line. Thin: parse, configure, call one entry point.

Exit codes: :data:`goflow_gpu.errors.EXIT_CODES` (printed at the end of ``--help``); a fatal
error is mapped to its code by :func:`goflow_gpu.errors.exit_code` in :func:`_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from goflow_gpu import logs, progress
from goflow_gpu.bench.cli import register as register_bench
from goflow_gpu.config_cli import app as config_app
from goflow_gpu.doctor import register as register_doctor
from goflow_gpu.engines.cli import dev_app
from goflow_gpu.errors import EXIT_CODES, ConfigError, GoFlowError, exit_code
from goflow_gpu.events import Events
from goflow_gpu.logs import setup_logging
from goflow_gpu.prompts.cli import app as prompts_app
from goflow_gpu.settings import Settings, load_settings
from goflow_gpu.simulator.cli import register as register_simulate
from goflow_gpu.state_cli import state_app

#: The exit-code table as --help prints it (``\b``: Click keeps the lines as they are).
EXIT_CODES_HELP = "\b\nExit codes (every command):\n" + "\n".join(
    f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES
)

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
    epilog=EXIT_CODES_HELP,
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
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Log warnings and errors only.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Log debug lines, and the libraries' lines (vLLM, torch, ...) on stderr too "
            "instead of in the log file a terminal run writes them to.",
        ),
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option(
            help="debug | info | warning | error; wins over -q/-v and GOFLOW_LOG_LEVEL.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """GPU worker for GoFlow media analysis (see the commands below).

    Sets up the one log pipeline before any command runs, so that whatever is logged before
    the command reads its settings (and a fatal error) already takes its final form: the level
    from the flags, else GOFLOW_LOG_LEVEL; the format from GOFLOW_LOG_FORMAT or the command's
    own --log-format. The command sets it up again once its settings are read; the flags keep
    winning (:func:`goflow_gpu.logs.set_cli_options`).
    """
    if quiet and verbose:
        _usage_line("-q/--quiet and -v/--verbose contradict each other: pass one")
    level = log_level or ("warning" if quiet else "debug" if verbose else None)
    try:
        logs.set_cli_options(level=level, verbose=verbose)
    except ConfigError as exc:
        _usage_line(str(exc))
    log_format = _early_log_format()
    try:
        logs.setup_logging(
            log_format,
            os.environ.get("GOFLOW_LOG_LEVEL") or "info",
            level_source="GOFLOW_LOG_LEVEL",
        )
    except ConfigError as exc:
        logs.setup_logging(log_format, "info")  # so that the error line takes the chosen form
        _fatal_line("configuration error", str(exc), 2)
        raise typer.Exit(2) from None


def _early_log_format() -> str:
    """The log format before the command reads its settings: its --log-format when given (read
    off the command line: the group's callback runs before the command parses it), else
    GOFLOW_LOG_FORMAT, else auto. A bad value is left for the command to refuse."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--log-format" and i + 1 < len(args):
            value = args[i + 1]
            break
        if arg.startswith("--log-format="):
            value = arg.split("=", 1)[1]
            break
    else:
        value = os.environ.get("GOFLOW_LOG_FORMAT", "auto")
    return value if value.strip().lower() in logs.FORMATS else "auto"


def _usage_line(message: str) -> NoReturn:
    """A usage error as one plain line on stderr, exit 2 (Click's own would print a usage
    block and a box around it)."""
    _fatal_line("usage error", message, 2)
    raise typer.Exit(2)


app.add_typer(state_app, name="state")
app.add_typer(prompts_app, name="prompts")
app.add_typer(dev_app, name="dev")
app.add_typer(config_app, name="config")
register_simulate(app)
register_doctor(app)
register_bench(app)

out = Console()
err = Console(stderr=True)


def _setting_flag(name: str, help_text: str, *, shown_default: str | None = None) -> Any:
    """A flag that sets the setting ``name``: its help shows the default from :class:`Settings`
    (``shown_default`` words a default that is no value, such as "off") and names the variable
    ``GOFLOW_<NAME>``. The flag's own default stays ``None``, "not given", so that an absent
    flag never hides the environment or the YAML file; hence the default is written into the
    help rather than given to Typer."""
    if shown_default is None:
        shown_default = str(Settings.model_fields[name].default)
    return typer.Option(
        help=f"{help_text} [default: {shown_default}; env GOFLOW_{name.upper()}]",
        show_default=False,
    )


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML settings file (see configs/); flags and GOFLOW_* variables override it.",
        exists=False,
    ),
]
BaseUrlOpt = Annotated[str | None, _setting_flag("base_url", "GoFlow backend URL.")]
StateDirOpt = Annotated[
    Path | None, _setting_flag("state_dir", "Where jobs, results and images are kept.")
]
#: demo's --engine: its default is the best engine installed here, not the setting's.
EngineOpt = Annotated[
    str | None, typer.Option(help="vllm | transformers | openai [env GOFLOW_ENGINE].")
]
WorkerEngineOpt = Annotated[str | None, _setting_flag("engine", "vllm | transformers | openai.")]
ModelOpt = Annotated[
    str | None,
    _setting_flag(
        "model",
        "Qwen2.5-VL weights: a Hugging Face id (from the HF cache) or a local directory; "
        "checked before anything is loaded (exit 2 when it cannot be used).",
    ),
]
MetricsPortOpt = Annotated[
    int | None,
    _setting_flag(
        "metrics_port", "Serve /metrics, /healthz and /readyz on this port.", shown_default="off"
    ),
]
PromptsDirOpt = Annotated[
    Path | None,
    _setting_flag(
        "prompts_dir",
        "Prompt catalog folder; checked before any job is taken.",
        shown_default="the shipped catalog",
    ),
]
LogFormatOpt = Annotated[
    str | None,
    _setting_flag("log_format", "auto (JSON unless on a terminal) | json | console."),
]

#: What serve and run print under their options: where the key comes from, and the exit codes.
WORKER_EPILOG = (
    "The API key is read from the environment variable GOFLOW_API_KEY only (no flag, no config "
    "file). Every other setting: flag > GOFLOW_<NAME> > --config YAML > default.\n\n"
    + EXIT_CODES_HELP
)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Map the error tree to exit codes (:func:`goflow_gpu.errors.exit_code`) with one line.

    Never a stack trace, never wrapped: off a terminal the line is plain text (a log collector
    or ``2> file`` gets it whole), on a terminal the kind is in colour; in JSON mode it is one
    JSON object like every other line of stderr. The message is redacted and its control
    characters escaped like any log line.
    """
    try:
        yield
    except GoFlowError as exc:
        code = exit_code(exc)
        kind, hint = _FATAL.get(code, ("error", ""))
        _fatal_line(kind, f"{exc}{hint}", code)
        raise typer.Exit(code) from None


#: How a fatal error of each exit code is introduced, and what the operator can do about it.
_FATAL: dict[int, tuple[str, str]] = {
    2: ("configuration error", ""),
    3: (
        "authentication failed",
        ". Check GOFLOW_API_KEY; state is kept and the job resumes on the next start.",
    ),
    4: ("state error", ""),
    5: ("engine failed", ". State is kept; a restart resumes the job."),
}


def _fatal_line(kind: str, message: str, code: int) -> None:
    """Write the one line of a fatal error (see :func:`_errors`)."""
    text = logs.sanitize(logs.redact(message))
    if logs.active_format() == "json":
        logs.get_logger(__name__).error("fatal error", kind=kind, message=text, exit_code=code)
        return
    sys.stdout.flush()
    if err.is_terminal:
        err.print(f"[bold red]{kind}:[/] {escape(text)}", highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(f"{kind}: {text}\n")
        sys.stderr.flush()


def _settings(config: Path | None, **flags: Any) -> Settings:
    settings = load_settings(config, **flags)
    setup_logging(settings.log_format, settings.log_level, log_dir=settings.state_dir)
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
    # The command's output (stdout), not a log line: stderr may have to hold only JSON.
    out.print(
        f"{'drained' if result.drained else 'done'}: "
        f"{result.closed}/{result.job_runs} job runs closed, "
        f"{result.skipped} skipped, {result.parked} parked, {result.unfinished} unfinished",
        highlight=False,
    )
    raise typer.Exit(result.exit_code)


WorkerCommand = Callable[[Path | None, dict[str, Any]], None]


def _worker_options(command: WorkerCommand) -> Callable[..., None]:
    """Give a worker command (serve, run) the one option set both share.

    ``command`` is called with ``--config`` and the other flags as a dict of setting name to
    value (``None``: not given). Each flag but --config is the :class:`Settings` field of the
    same name, which is how the dict is read off the signature below.
    """

    def with_options(
        config: ConfigOpt = None,
        base_url: BaseUrlOpt = None,
        state_dir: StateDirOpt = None,
        engine: WorkerEngineOpt = None,
        model: ModelOpt = None,
        log_format: LogFormatOpt = None,
        metrics_port: MetricsPortOpt = None,
        prompts_dir: PromptsDirOpt = None,
    ) -> None:
        given = locals()
        command(config, {name: given[name] for name in given if name in Settings.model_fields})

    # Typer names the command and takes its help from the function it is given.
    with_options.__name__ = command.__name__
    with_options.__doc__ = command.__doc__
    return with_options


@app.command(epilog=WORKER_EPILOG)
@_worker_options
def serve(config: Path | None, flags: dict[str, Any]) -> None:
    """Run the worker forever: resume unfinished jobs, then poll next-job (with backoff).

    SIGTERM or Ctrl-C stops polling and new inference, gives in-flight requests
    drain_timeout (GOFLOW_DRAIN_TIMEOUT, 20 s) to finish and be reported, records the state
    and exits 0; the next start resumes the job where it stopped. Backend and image-host
    outages are waited out (never a lost result); /readyz says what it waits for.
    """
    _work(False, config, **flags)


@app.command(epilog=WORKER_EPILOG)
@_worker_options
def run(config: Path | None, flags: dict[str, Any]) -> None:
    """Burst mode: process jobs until next-job says there is none, then exit.

    Exit 0 when every job closed; 1 when a job had to be skipped (invalid manifest, kept in
    the state for inspection) or was parked (a status/report PUT refused: `state show`); 75
    (try again later) when the backend or an image host stayed down past outage_patience
    (GOFLOW_OUTAGE_PATIENCE, 600 s), state kept.
    """
    _work(True, config, **flags)


@app.command()
def demo(
    media: Annotated[int, typer.Option(help="Media items in the demo job.", min=1)] = 8,
    analyses: Annotated[
        int,
        typer.Option(
            help="Analysis types in the demo job (with scenes: the 3 learned ones first).", min=1
        ),
    ] = 3,
    engine: EngineOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Real weights (HF id or dir), or a folder made by `dev train-tiny`. "
            "Default: a tiny local model."
        ),
    ] = None,
    config: ConfigOpt = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights", help="A tiny random-weight model instead of the trained one."
        ),
    ] = False,
    scenes: Annotated[
        bool,
        typer.Option(
            "--scenes/--no-scenes",
            help="Labelled scenes as pictures, and every answer graded against their truth.",
        ),
    ] = True,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Keep state, report, ledger and grades here.")
    ] = None,
) -> None:
    """Run the whole job flow end to end against the embedded GoFlow simulator.

    Starts the simulator in-process, queues one job, and runs the real worker on it with the
    best engine available (vLLM, else transformers). The job's pictures are labelled scenes
    (flat shapes and one word) and the answers to object-detection, text-recognition and
    people-count are graded against each scene's truth: right answers, boxes found at IoU >=
    0.5, mean IoU, colours named. Without --model or a config the model is a tiny local
    Qwen2.5-VL: the one trained on the scenes when the package ships it, else random weights;
    --model takes a folder made by `goflow-gpu dev train-tiny`. The ledger check proves every
    combination was reported exactly once. Needs no GPU and no network.
    """
    from goflow_gpu.demo import DemoOptions, run_demo

    options = DemoOptions(
        media=media,
        analyses=analyses,
        engine=engine,
        model=model,
        config=config,
        random_weights=random_weights,
        scenes=scenes,
    )
    with _errors():
        code = run_demo(options, out_dir=out_dir, console=out)
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point.

    vLLM installs its own log handler when it is imported, on stdout by default, which put its
    lines in the middle of command output and plain text in a JSON log. ``VLLM_CONFIGURE_LOGGING
    =0`` keeps it from doing so: its records then go through the one pipeline (:mod:`logs`), the
    engine-core processes' included (they inherit the environment). Should an operator turn
    vLLM's handler back on, ``VLLM_LOGGING_STREAM`` still keeps it off stdout. An operator's
    own values win. What reaches file descriptor 2 outside :mod:`logging` (C++ warnings, the
    engine-core processes' output, libraries' progress bars) is turned into log records too
    (:class:`goflow_gpu.logs.StderrCapture`), so stderr holds only the pipeline's lines.
    """
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    capture = logs.StderrCapture()
    capture.start()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        capture.stop()
