"""``goflow-gpu simulate``: serve the embedded GoFlow simulator on a port until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer

from goflow_gpu.simulator.app import Simulator
from goflow_gpu.simulator.faults import parse_faults
from goflow_gpu.simulator.scripted import FixedAnswer, Outage, parse_answer, parse_outage


def simulate(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one).")] = 8787,
    jobs: Annotated[int, typer.Option(min=0, help="How many jobs to queue at start.")] = 1,
    media: Annotated[int, typer.Option(min=1, help="Media items per job.")] = 3,
    analyses: Annotated[
        int,
        typer.Option(min=1, help="Analyses per job: the first N analysis types (25 exist)."),
    ] = 4,
    faults: Annotated[
        str,
        typer.Option(
            help="Faults to inject, e.g. 'result:503=0.1,reset=0.02;status:500=0.1' "
            "(see above). Empty: none.",
        ),
    ] = "",
    seed: Annotated[
        int, typer.Option(help="Seed for ids, images and the fault draws (same seed, same run).")
    ] = 0,
    latency: Annotated[
        float, typer.Option(min=0.0, help="Seconds added to every call, like a distant backend.")
    ] = 0.0,
    outage: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ROUTE:SECONDS[:after=N][:status=CODE][:retry-after=S|date]",
            help="An outage window (repeatable), e.g. 'result:2:after=10:retry-after=1': "
            "after 10 accepted results, every result POST answers 503 for 2 s (see above).",
        ),
    ] = None,
    answer: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ROUTE:STATUS[:times=N][:accept][:media=ID][:analysis=ID][:detail=TEXT]",
            help="A fixed answer (repeatable), e.g. 'report:422:times=1' or "
            "'result:409:accept:detail=already exists' (see above).",
        ),
    ] = None,
    upper_ids: Annotated[
        bool,
        typer.Option(
            "--upper-ids", help="Serve manifests with upper-case client/project/media/analysis ids."
        ),
    ] = False,
    scenes: Annotated[
        bool,
        typer.Option(
            "--scenes",
            help="Queue scene jobs: each picture a labelled scene (PNG) with exact ground truth, "
            "so what the worker reports can be graded (Simulator.grade).",
        ),
    ] = False,
    reoffer_closed: Annotated[
        bool,
        typer.Option(
            "--reoffer-closed",
            help="Hand each job out once more, on the next poll, right after its report.",
        ),
    ] = False,
    duplicate_detail: Annotated[
        str | None,
        typer.Option(
            metavar="TEXT",
            help="The detail of the 400 for a result POSTed twice, e.g. 'analysis result for "
            "this media and analysis has already been submitted'.",
        ),
    ] = None,
) -> None:
    """Serve a local, strict GoFlow backend (the embedded simulator) until Ctrl-C.

    It implements the agent API of goflow-api.md: X-API-Key check, UUID and body validation
    with 422 details, duplicate-400 for a repeated result, 404s, a queue of generated jobs
    with real JPEG images (--scenes: labelled PNG scenes), and seeded fault injection. It
    checks the same key the worker sends, read from GOFLOW_API_KEY (it refuses to start
    without one). It prints its URL and the queued project ids; point the worker's base URL
    at it. Everything it accepted is at GET /_sim/ledger; POST /_sim/jobs {"media": 3,
    "analyses": 4, "scenes": false} queues another job; POST /_sim/outages and /_sim/answers
    {"spec": "..."} add an outage window or a fixed answer (same syntax as below); POST
    /_sim/reoffer {"project": ID} hands a job out again.

    \b
    Example:
      GOFLOW_API_KEY=made-up-key goflow-gpu simulate --jobs 2
      GOFLOW_API_KEY=made-up-key goflow-gpu simulate --faults 'result:503=0.1,429=0.05'
      GOFLOW_API_KEY=made-up-key goflow-gpu simulate --outage result:2:after=10:retry-after=1 \\
          --answer 'report:500:times=2' --upper-ids --reoffer-closed

    \b
    Fault syntax: ROUTE:KEY=VALUE,...;ROUTE:KEY=VALUE,...
      routes: next-job, status, result, report, media, or * for every API route
      keys:   429, 500, 503, reset, slow, drop   probability per call (0..1)
              latency=SECONDS                    added to every call on the route
              retry-after=1 | retry-after=date   Retry-After of 429s (seconds or HTTP-date)
              slow-seconds=SECONDS               how long 'slow' waits (default 5)
      drop = accept the call, then cut the connection (status, result, report only).

    \b
    Outage syntax (--outage, repeatable): ROUTE:SECONDS[:after=N][:status=CODE][:retry-after=S]
      routes: next-job, status, result, report, media (image downloads, any project)
      opens at the first call once the route accepted N calls (N results for result;
      default 0: the first call) and answers CODE (default 503) to every call for SECONDS;
      retry-after=2 or retry-after=date adds Retry-After (none by default).
      e.g. --outage result:2:after=10:retry-after=1   --outage media:0.5:status=502

    \b
    Answer syntax (--answer, repeatable): ROUTE:STATUS[:OPTION...], STATUS 400-599
      times=N          only the next N matching calls (default: every one)
      accept           record the call as accepted, then answer STATUS ("stored, then 409")
      media=ID         only calls about this media (result and media routes)
      analysis=ID      only calls about this analysis (result route)
      detail=TEXT      the answer's detail; must come last (takes the rest, colons too)
      e.g. --answer report:422   --answer result:409:accept:detail=already exists
           --answer result:400:media=<uuid>:analysis=<uuid>:times=1
    """
    key = os.environ.get("GOFLOW_API_KEY", "")
    if not key:
        typer.echo(
            "error: GOFLOW_API_KEY is not set. The simulator checks the same key the worker "
            "sends; set any made-up value in both, e.g. GOFLOW_API_KEY=dev-key.",
            err=True,
        )
        raise typer.Exit(2)
    try:
        fault_plan = parse_faults(faults, seed=seed)
    except ValueError as exc:
        typer.echo(f"error: --faults: {exc}", err=True)
        raise typer.Exit(2) from None
    windows: list[Outage] = []
    answers: list[FixedAnswer] = []
    try:
        for text in outage or []:
            windows.append(parse_outage(text))
    except ValueError as exc:
        typer.echo(f"error: --outage: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        for text in answer or []:
            answers.append(parse_answer(text))
    except ValueError as exc:
        typer.echo(f"error: --answer: {exc}", err=True)
        raise typer.Exit(2) from None
    if duplicate_detail is not None and not duplicate_detail.strip():
        typer.echo("error: --duplicate-detail: the text is empty", err=True)
        raise typer.Exit(2)
    simulator = Simulator(
        key,
        seed=seed,
        faults=fault_plan,
        latency=latency,
        duplicate_detail=duplicate_detail,
        upper_ids=upper_ids,
        reoffer_closed=reoffer_closed,
    )
    for window in windows:
        simulator.add_outage(
            window.route,
            window.seconds,
            after=window.after,
            status=window.status,
            retry_after=window.retry_after,
        )
    for fixed in answers:
        simulator.fix_answer(
            fixed.route,
            fixed.status,
            fixed.detail,
            media_id=fixed.media_id,
            analysis_id=fixed.analysis_id,
            times=fixed.times,
            accept=fixed.accept,
        )
    try:
        asyncio.run(_serve(simulator, host, port, jobs, media, analyses, scenes))
    except KeyboardInterrupt:
        typer.echo("simulator stopped")
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None


async def _serve(
    simulator: Simulator,
    host: str,
    port: int,
    jobs: int,
    media: int,
    analyses: int,
    scenes: bool = False,
) -> None:
    base_url = await simulator.start(host, port)
    try:
        typer.echo(f"GoFlow simulator listening on {base_url}")
        for _ in range(jobs):
            manifest = simulator.add_job(media, analyses, scenes=scenes)
            kind = ", labelled scenes" if scenes else ""
            typer.echo(
                f"queued project {manifest['project']['id']} ({media} media x {analyses}{kind})"
            )
        for window in simulator.outages:
            retry = f", Retry-After {window.retry_after}" if window.retry_after else ""
            typer.echo(
                f"outage: {window.route} answers {window.status}{retry} for {window.seconds:g} s "
                f"after {window.after} accepted"
            )
        for fixed in simulator.answers:
            typer.echo(f"fixed answer: {_describe(fixed)}")
        if simulator.upper_ids:
            typer.echo("manifests are served with upper-case ids")
        if simulator.reoffer_closed:
            typer.echo("each job is offered once more right after its report")
        typer.echo("ledger: GET /_sim/ledger; press Ctrl-C to stop")
        await asyncio.Event().wait()
    finally:
        await simulator.stop()


def _describe(fixed: FixedAnswer) -> str:
    scope = "".join(
        f" {name} {value}"
        for name, value in (("media", fixed.media_id), ("analysis", fixed.analysis_id))
        if value
    )
    times = "every call" if fixed.times is None else f"{fixed.times} call(s)"
    accepted = " (recorded first)" if fixed.accept else ""
    return f"{fixed.route}{scope} answers {fixed.status}{accepted} to {times}: {fixed.text}"


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command to ``app`` (the ``goflow-gpu`` CLI)."""
    app.command("simulate")(simulate)
