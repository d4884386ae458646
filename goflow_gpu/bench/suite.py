"""A whole benchmark: the baseline run, the requested comparisons, results, table and plots.

:func:`run_suite` is the one entry point of ``goflow-gpu bench`` and of the GPU script. It
loads the engine once (load time reported apart), runs the baseline job, then each comparison,
and writes ``results.json``, ``results.md`` and the PNG plots into the output directory.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from goflow_gpu.bench.compare import (
    COMPARISONS,
    compare_engines,
    compare_report_concurrency,
    overhead_check,
)
from goflow_gpu.bench.layout import compare_layout
from goflow_gpu.bench.offline import compare_offline
from goflow_gpu.bench.plots import write_plots
from goflow_gpu.bench.prefix import PrefixCounter
from goflow_gpu.bench.report import write_results
from goflow_gpu.bench.runner import BenchConfig, RunResult, run_job, start_engine
from goflow_gpu.engines.base import Engine
from goflow_gpu.errors import ConfigError

EngineFactory = Callable[[str], Engine]


@dataclasses.dataclass
class SuiteResult:
    """Everything a suite produced (also written to ``out_dir``)."""

    runs: list[RunResult]
    comparisons: list[dict[str, Any]]
    files: list[Path]


def check_comparisons(names: list[str]) -> list[str]:
    """Validate ``--compare`` names (comma lists allowed); raises :class:`ConfigError`."""
    flat = [n.strip() for name in names for n in name.split(",") if n.strip()]
    unknown = [n for n in flat if n not in COMPARISONS]
    if unknown:
        raise ConfigError(
            f"unknown comparison {', '.join(unknown)}: choose from {', '.join(COMPARISONS)}"
        )
    return list(dict.fromkeys(flat))


def print_comparison(console: Console, comparison: dict[str, Any]) -> None:
    """One line per check: the ratio, its target and whether it was met."""
    for check in comparison["checks"]:
        value = check.get("value")
        shown = "n/a" if value is None else f"{value:.3f}"
        met = {True: "met", False: "NOT met", None: ""}[check.get("met")]
        target = f" (target {check['target']}: {met})" if check.get("target") else ""
        console.print(
            f"{comparison['name']}: {check['what']} = ratio {shown}{target}", highlight=False
        )


async def run_suite(
    engine: Engine,
    config: BenchConfig,
    *,
    out_dir: Path,
    compare: list[str],
    console: Console,
    engine_factory: EngineFactory | None = None,
    other_engines: list[str] | None = None,
) -> SuiteResult:
    """Run the baseline job and the comparisons with ``engine`` (closed at the end).

    ``engine_factory(name)`` builds the other engines of the ``engine`` comparison, named in
    ``other_engines``.
    """
    compare = check_comparisons(compare)
    runs: list[RunResult] = []
    comparisons: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="goflow-bench-") as tmp:
        work = Path(tmp)
        try:
            extra["engine_load_s"] = await start_engine(engine)
            console.print(
                f"engine {engine.name} loaded in {extra['engine_load_s']:.1f} s; running "
                f"{config.media} x {config.analyses} against the simulator",
                highlight=False,
            )
            baseline = await run_job(engine, config, work / "baseline", label="baseline")
            runs.append(baseline)
            comparisons.append(overhead_check(baseline))
            print_comparison(console, comparisons[-1])
            if "report-concurrency" in compare:
                more, comparison = await compare_report_concurrency(engine, config, work)
                runs += more
                comparisons.append(comparison)
                print_comparison(console, comparison)
            if "layout" in compare:
                counter = (
                    PrefixCounter(
                        config.model_dir,
                        min_pixels=config.min_pixels,
                        max_pixels=config.max_pixels,
                    )
                    if config.model_dir and engine.reports_cached_tokens
                    else None
                )
                comparison = await compare_layout(
                    engine,
                    media=config.media,
                    analyses=config.analyses,
                    seed=config.seed + 1,  # pictures the engine has not seen yet
                    image_long_side=config.image_long_side,
                    workdir=work / "layout",
                    max_tokens=config.max_tokens,
                    counter=counter,
                )
                comparisons.append(comparison)
                print_comparison(console, comparison)
            if "offline" in compare:
                more, comparison = await compare_offline(engine, config, work)
                runs += more
                comparisons.append(comparison)
                print_comparison(console, comparison)
        finally:
            await engine.close()
        if "engine" in compare:
            factories: dict[str, Callable[[], Engine]] = {}
            for name in other_engines or []:
                if name != engine.name and engine_factory is not None:
                    factories[name] = lambda name=name: engine_factory(name)  # type: ignore[misc]
            more, comparison = await compare_engines(
                factories,
                config,
                work,
                measured=(dataclasses.replace(baseline, label=engine.name),),
            )
            runs += more
            comparisons.append(comparison)
            print_comparison(console, comparison)
    paths = write_results(out_dir, runs, comparisons, extra)
    try:
        plots = write_plots(out_dir, runs)
    except ImportError as exc:  # the GPU machine may lack matplotlib; the numbers still count
        console.print(f"plots skipped: {exc}", highlight=False)
        plots = []
    console.print(paths["markdown"].read_text(), highlight=False, markup=False)
    console.print(f"results in {out_dir}", highlight=False)
    return SuiteResult(runs, comparisons, [*paths.values(), *plots])
