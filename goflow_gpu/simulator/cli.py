"""``goflow-gpu simulate``: serve the embedded GoFlow simulator on a port until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer

from goflow_gpu.simulator.app import Simulator
from goflow_gpu.simulator.faults import parse_faults


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
) -> None:
    """Serve a local, strict GoFlow backend (the embedded simulator) until Ctrl-C.

    It implements the agent API of goflow-api.md: X-API-Key check, UUID and body validation
    with 422 details, duplicate-400 for a repeated result, 404s, a queue of generated jobs
    with real JPEG images, and seeded fault injection. It checks the same key the worker
    sends, read from GOFLOW_API_KEY (it refuses to start without one). It prints its URL and
    the queued project ids; point the worker's base URL at it. Everything it accepted is at
    GET /_sim/ledger; POST /_sim/jobs {"media": 3, "analyses": 4} queues another job.

    \b
    Example:
      GOFLOW_API_KEY=made-up-key goflow-gpu simulate --jobs 2
      GOFLOW_API_KEY=made-up-key goflow-gpu simulate --faults 'result:503=0.1,429=0.05'

    \b
    Fault syntax: ROUTE:KEY=VALUE,...;ROUTE:KEY=VALUE,...
      routes: next-job, status, result, report, media, or * for every API route
      keys:   429, 500, 503, reset, slow, drop   probability per call (0..1)
              latency=SECONDS                    added to every call on the route
              retry-after=1 | retry-after=date   Retry-After of 429s (seconds or HTTP-date)
              slow-seconds=SECONDS               how long 'slow' waits (default 5)
      drop = accept the call, then cut the connection (status, result, report only).
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
    simulator = Simulator(key, seed=seed, faults=fault_plan, latency=latency)
    try:
        asyncio.run(_serve(simulator, host, port, jobs, media, analyses))
    except KeyboardInterrupt:
        typer.echo("simulator stopped")
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None


async def _serve(
    simulator: Simulator, host: str, port: int, jobs: int, media: int, analyses: int
) -> None:
    base_url = await simulator.start(host, port)
    try:
        typer.echo(f"GoFlow simulator listening on {base_url}")
        for _ in range(jobs):
            manifest = simulator.add_job(media, analyses)
            typer.echo(f"queued project {manifest['project']['id']} ({media} media x {analyses})")
        typer.echo("ledger: GET /_sim/ledger; press Ctrl-C to stop")
        await asyncio.Event().wait()
    finally:
        await simulator.stop()


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command to ``app`` (the ``goflow-gpu`` CLI)."""
    app.command("simulate")(simulate)
