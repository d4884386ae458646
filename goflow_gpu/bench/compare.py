"""``--compare`` variants: runs back to back in one process, and the ratios between them.

- ``report-concurrency``: the same job at 50 ms simulated latency on the result route, POSTs one
  at a time against the bounded concurrency of the settings, plus the bounded run at 0 ms (the
  target: wall time at 50 ms at most 5 % above the same job at 0 ms);
- ``engine``: every engine installed here on the same job (``openai`` needs a server, so it is
  left out);
- ``layout``: see :mod:`goflow_gpu.bench.layout`;
- ``offline``: see :mod:`goflow_gpu.bench.offline`.

Each returns the runs it made and a comparison dict: ``name``, ``checks`` (``what``, ``value``,
``target``, ``met``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from goflow_gpu.bench.runner import BenchConfig, RunResult, run_job
from goflow_gpu.engines.base import Engine

REPORT_LATENCY = 0.05
REPORT_SLOWDOWN_TARGET = 1.05
OVERHEAD_TARGET = 0.05

COMPARISONS = ("layout", "report-concurrency", "engine", "offline")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / max(denominator, 1e-9)


async def compare_report_concurrency(
    engine: Engine, config: BenchConfig, workdir: Path
) -> tuple[list[RunResult], dict[str, Any]]:
    """One-at-a-time vs bounded concurrent POSTs at 50 ms, and bounded at 0 ms.

    Each run gets its own seed (same shape of job, pictures the engine has not seen), so no run
    finds the prefix cache warmed by another.
    """
    slow = dataclasses.replace(config, result_latency=REPORT_LATENCY)
    runs = [
        await run_job(
            engine,
            dataclasses.replace(slow, report_concurrency=1, seed=config.seed + 101),
            workdir / "report-1",
            label="report x1 @50ms",
        ),
        await run_job(
            engine,
            dataclasses.replace(slow, seed=config.seed + 102),
            workdir / "report-n",
            label=f"report x{config.report_concurrency} @50ms",
        ),
        await run_job(
            engine,
            dataclasses.replace(config, result_latency=0.0, seed=config.seed + 103),
            workdir / "report-0ms",
            label=f"report x{config.report_concurrency} @0ms",
        ),
    ]
    one, bounded, fast = (r.figures["wall_s"] for r in runs)
    slowdown = _ratio(bounded, fast)
    comparison = {
        "name": "report-concurrency",
        "runs": [r.label for r in runs],
        "checks": [
            {
                "what": "wall one-at-a-time / wall bounded (50 ms)",
                "value": _ratio(one, bounded),
                "target": "> 1",
                "met": one > bounded,
            },
            {
                "what": "wall bounded @50ms / wall bounded @0ms",
                "value": slowdown,
                "target": f"<= {REPORT_SLOWDOWN_TARGET}",
                "met": slowdown <= REPORT_SLOWDOWN_TARGET,
            },
        ],
    }
    return runs, comparison


async def compare_engines(
    engines: dict[str, Callable[[], Engine]],
    config: BenchConfig,
    workdir: Path,
    measured: tuple[RunResult, ...] = (),
) -> tuple[list[RunResult], dict[str, Any]]:
    """The same job on each engine (built, started, run and closed one after the other).

    ``measured`` are runs of this job already made (labelled with their engine's name); they
    enter the ratios but are not returned again.
    """
    runs: list[RunResult] = []
    for name, build in engines.items():
        engine = build()
        try:
            await engine.start()
            # The same seed as the baseline: a different engine has no cache to reuse.
            runs.append(await run_job(engine, config, workdir / f"engine-{name}", label=name))
        finally:
            await engine.close()
    checks = []
    every = [*measured, *runs]
    if every:
        fastest = min(every, key=lambda r: r.figures["wall_s"])
        for run in every:
            checks.append(
                {
                    "what": f"wall {run.label} / wall {fastest.label}",
                    "value": _ratio(run.figures["wall_s"], fastest.figures["wall_s"]),
                    "target": "",
                    "met": None,
                }
            )
    return runs, {"name": "engine", "runs": [r.label for r in every], "checks": checks}


def overhead_check(run: RunResult) -> dict[str, Any]:
    """The orchestration-overhead target of one run, as a comparison entry."""
    fraction = run.figures["overhead_fraction"]
    return {
        "name": "overhead",
        "runs": [run.label],
        "checks": [
            {
                "what": f"orchestration overhead / wall ({run.label})",
                "value": fraction,
                "target": f"<= {OVERHEAD_TARGET:.0%}",
                "met": fraction <= OVERHEAD_TARGET,
            },
            {
                "what": f"downloads / (media, variant) pairs ({run.label})",
                "value": _ratio(run.figures["downloads"], run.figures["downloads_expected"]),
                "target": "== 1",
                "met": run.figures["downloads"] == run.figures["downloads_expected"],
            },
        ],
    }
