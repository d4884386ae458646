"""``goflow-gpu bench``: measure a synthetic job against the embedded simulator."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from goflow_gpu import progress
from goflow_gpu.errors import ConfigError, GoFlowError


def bench(
    media: Annotated[int, typer.Option(min=1, help="Media items in the job.")] = 20,
    analyses: Annotated[
        int, typer.Option(min=1, help="Analyses in the job (the first N of 25 types).")
    ] = 25,
    engine: Annotated[
        str | None, typer.Option(help="vllm | transformers | openai. Default: vllm if installed.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Real weights (HF id or dir). Default: a tiny random-weight model."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML settings file (see configs/).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Where results and plots go.")] = Path(
        "bench-results"
    ),
    compare: Annotated[
        list[str] | None,
        typer.Option(
            help="Variants to run side by side: layout, report-concurrency, engine, offline "
            "(repeat the option or give a comma list)."
        ),
    ] = None,
    latency: Annotated[
        float, typer.Option(min=0.0, help="Simulated server latency on every API call (s).")
    ] = 0.0,
    faults: Annotated[
        str, typer.Option(help="Simulator faults, e.g. 'result:503=0.05' (see `simulate`).")
    ] = "",
    report_concurrency: Annotated[
        int | None, typer.Option(min=1, help="Concurrent result POSTs (default: settings).")
    ] = None,
    qa_retries: Annotated[int | None, typer.Option(min=0, help="QA retries per result.")] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            min=28 * 28,
            help="Visual-token budget per image in pixels (one token per 28x28); the layout "
            "comparison wants the image to dominate the prompt, e.g. 802816 (1024 tokens).",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Cap every request's token budget (random weights ramble)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the job, its images and faults.")] = 7,
) -> None:
    """Run synthetic jobs against the embedded simulator and report where the time goes.

    Runs a MEDIA x ANALYSES job through the real worker (downloads, inference, QA, reporting)
    with the chosen engine, and writes into --out: results.json, results.md (a table) and PNG
    plots (timeline per combination, throughput over time, latency distributions).

    Figures: wall time, combinations/s, engine busy fraction, orchestration overhead (engine
    idle while inference work remained), time to first result POST, QA pass -> POST accepted
    p50/p95, prompt / cached / generated tokens, cached share of the layout's maximum,
    downloads made, peak RSS, retries by cause.

    \b
    --compare variants (ratios printed and stored):
      layout              shared system prompt, image first, media-major  vs
                          per-analysis system prompt, text first, analysis-major
      report-concurrency  bounded concurrent POSTs vs one at a time, at 50 ms latency
      engine              every engine installed here on the same job
      offline             the worker vs vLLM's own LLM.generate on the same requests,
                          3 times each (vllm engine only; target worker/offline <= 1.10)

    \b
    Example:
      goflow-gpu bench --media 6 --analyses 8 --compare layout,report-concurrency --out /tmp/b
    """
    from goflow_gpu.bench.runner import BenchConfig
    from goflow_gpu.bench.suite import check_comparisons, run_suite
    from goflow_gpu.demo import demo_settings
    from goflow_gpu.engines import available_engines, create_engine
    from goflow_gpu.logs import setup_logging
    from goflow_gpu.simulator import parse_faults

    console = Console()
    try:
        comparisons = check_comparisons(compare or [])
        # The base URL is the simulator's, known only once it runs; the engine needs none.
        settings, _random = demo_settings(
            engine=engine, model=model, config=config, base_url="http://127.0.0.1:1",
            state_dir=out / "state",
        )  # fmt: skip
        if qa_retries is not None:
            settings = settings.model_copy(update={"qa_retries": qa_retries})
        if max_pixels is not None:
            settings = settings.model_copy(update={"max_pixels": max_pixels})
        setup_logging("console", os.environ.get("GOFLOW_LOG_LEVEL", "WARNING"))
        bench_config = BenchConfig(
            media=media,
            analyses=analyses,
            seed=seed,
            latency=latency,
            faults=faults,
            report_concurrency=report_concurrency or settings.report_concurrency,
            qa_retries=settings.qa_retries,
            max_tokens=max_tokens,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
            model_dir=settings.model if Path(settings.model).is_dir() else None,
        )
        try:
            parse_faults(faults, seed=seed)
        except ValueError as exc:
            raise ConfigError(f"--faults: {exc}") from None
        others = [name for name in available_engines() if name != "openai"]
        with contextlib.ExitStack() as stack:
            if progress.wanted(console, "console"):
                bars = stack.enter_context(progress.JobProgress(console))
                bench_config = dataclasses.replace(bench_config, observers=(bars,))
            asyncio.run(
                run_suite(
                    create_engine(settings),
                    bench_config,
                    out_dir=out,
                    compare=comparisons,
                    console=console,
                    engine_factory=lambda name: create_engine(settings, engine=name),
                    other_engines=others,
                )
            )
    except ConfigError as exc:
        console.print(f"[bold red]configuration error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except (GoFlowError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to ``app`` (the ``goflow-gpu`` CLI)."""
    app.command("bench")(bench)
