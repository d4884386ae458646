"""``goflow-gpu demo``: the whole flow on one machine, against the embedded simulator.

The real worker (``service.run_worker``), the real engine code path and the real HTTP client
run against the in-process GoFlow simulator. Without real weights the engine gets a tiny
random-weight Qwen2.5-VL built locally; structured decoding keeps its answers in the schema's
shape, bounded schemas and token budgets let most of them finish, and QA shows why the others
fail. The simulator's ledger then proves every combination was reported exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from goflow_gpu import logs, progress
from goflow_gpu.events import Events
from goflow_gpu.settings import Settings, load_settings
from goflow_gpu.simulator import Simulator

TINY_MODEL_VERSION = "1"


def tiny_model_cache() -> Path:
    """Where the demo keeps its tiny random model between runs."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "goflow-gpu" / f"tiny-qwen2.5-vl-v{TINY_MODEL_VERSION}"


def ensure_tiny_model() -> Path:
    """Build the tiny model once (a few seconds, offline) and reuse it."""
    from goflow_gpu.engines.tiny import build_tiny_model

    target = tiny_model_cache()
    if not (target / "config.json").exists():
        build_tiny_model(target)
    return target


def best_engine() -> str:
    """vLLM when its package is importable, else transformers."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def demo_settings(
    *,
    engine: str | None,
    model: str | None,
    config: Path | None,
    base_url: str,
    state_dir: Path,
) -> tuple[Settings, bool]:
    """Settings for the demo run, and whether the weights are random."""
    random_weights = model is None and config is None
    flags: dict[str, Any] = {
        "base_url": base_url,
        "state_dir": state_dir,
        "engine": engine or best_engine(),
        "log_format": "console",
        "log_level": "WARNING",
        "poll_interval_min": 0.2,
    }
    if random_weights:
        flags.update(
            model=str(ensure_tiny_model()),
            model_label="qwen2.5vl-tiny-random",
            gpu_memory_utilization=0.2,
            enforce_eager=True,
            max_model_len=4096,
            max_num_seqs=16,
            max_in_flight=24,  # as configs/cpu-dev.yaml: 1.5x max_num_seqs
            max_num_batched_tokens=4096,
            min_pixels=64 * 28 * 28,
            max_pixels=256 * 28 * 28,
            qa_retries=1,
            dtype="auto",
        )
    elif model is not None:
        flags["model"] = model
    return load_settings(config, **flags), random_weights


def run_demo(
    *,
    media: int,
    analyses: int,
    engine: str | None,
    model: str | None,
    config: Path | None,
    out_dir: Path | None,
    console: Console,
) -> int:
    """Run the demo; returns the exit code (0 when the ledger shows exactly-once delivery)."""
    workdir = out_dir or Path(tempfile.mkdtemp(prefix="goflow-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # A made-up key shared by the in-process simulator and worker only.
    key = "demo-" + secrets.token_hex(12)
    os.environ["GOFLOW_API_KEY"] = key
    return asyncio.run(_demo(media, analyses, engine, model, config, workdir, key, console))


async def _demo(
    media: int,
    analyses: int,
    engine: str | None,
    model: str | None,
    config: Path | None,
    workdir: Path,
    key: str,
    console: Console,
) -> int:
    from goflow_gpu.service import run_worker

    started = time.monotonic()
    async with Simulator(api_key=key, seed=7) as sim:
        manifest = sim.add_job(media=media, analyses=analyses)
        settings, random_weights = demo_settings(
            engine=engine,
            model=model,
            config=config,
            base_url=sim.base_url,
            state_dir=workdir / "state",
        )
        # Warnings and errors only (-v or --log-level show more): the screen keeps the bars and
        # the summary. On a terminal the libraries' lines (vLLM, torch, ...) go to a file in the
        # state directory, named in the summary.
        logs.setup_logging(settings.log_format, settings.log_level, log_dir=settings.state_dir)
        total = len(manifest["media"]) * len(manifest["analyses"])
        if random_weights:
            console.print(
                Panel(
                    "This demo runs a [bold]tiny Qwen2.5-VL with random weights[/] built on "
                    "this machine: its answers mean nothing. It shows the flow: download, "
                    "inference with structured decoding, QA, exactly-once reporting, status "
                    "and the final report. Use --model for real weights.",
                    title="goflow-gpu demo",
                )
            )
        console.print(
            f"simulator at {sim.base_url}: 1 job, {len(manifest['media'])} media x "
            f"{len(manifest['analyses'])} analyses = {total} combinations; engine "
            f"[bold]{settings.engine}[/], model {settings.model}"
        )
        project_id = manifest["project"]["id"]
        events = Events()
        with contextlib.ExitStack() as stack:
            if progress.wanted(console, settings.log_format):
                events.subscribe(stack.enter_context(progress.JobProgress(console)))
            result = await run_worker(settings, burst=True, handle_signals=False, events=events)
        problems = sim.ledger.check_job(manifest)
        snapshot = sim.ledger.snapshot()
    elapsed = time.monotonic() - started
    ledger_path = workdir / "ledger.json"
    ledger_path.write_text(json.dumps(snapshot, indent=2, default=str))
    report_path = workdir / "report.json"
    reports = sim.ledger.reports.get(project_id, [])
    report_path.write_text(json.dumps(reports[-1] if reports else None, indent=2))
    _summary(console, sim, manifest, elapsed, problems, report_path, ledger_path, result)
    return 0 if not problems and result.exit_code == 0 else 1


def _summary(
    console: Console,
    sim: Simulator,
    manifest: dict[str, Any],
    elapsed: float,
    problems: list[str],
    report_path: Path,
    ledger_path: Path,
    result: Any,
) -> None:
    project_id = manifest["project"]["id"]
    slugs = {a["id"]: a["slug"] for a in manifest["analyses"]}
    bodies = [(k, v[0]) for k, v in sim.ledger.results.items() if k[0] == project_id and v]
    passed = [b for _, b in bodies if b["status"] == "completed"]
    failed = [(k, b) for k, b in bodies if b["status"] == "failed"]
    table = Table(title="demo summary", show_header=False)
    table.add_row("combinations", str(len(manifest["media"]) * len(manifest["analyses"])))
    table.add_row("reported (accepted once)", str(len(bodies)))
    table.add_row("passed QA", str(len(passed)))
    table.add_row("failed (reported as failed)", str(len(failed)))
    table.add_row("statuses", ", ".join(sim.ledger.statuses.get(project_id, [])))
    table.add_row("report", str(report_path))
    table.add_row("simulator ledger", str(ledger_path))
    library_log = logs.library_log()
    if library_log is not None:  # on a terminal: vLLM's, torch's, ... lines (-v shows them)
        table.add_row("library log", str(library_log))
    table.add_row("wall time", f"{elapsed:.1f} s")
    table.add_row(
        "exactly-once check", "ok" if not problems else f"[red]{len(problems)} problem(s)[/]"
    )
    console.print(table)
    for key, body in failed[:20]:
        reasons = body["analysisResult"].get("reasons", [])
        console.print(
            f"  failed {slugs.get(key[2], key[2])} on media {key[1][:8]}: "
            f"{'; '.join(str(r) for r in reasons[:3])[:200]}",
            highlight=False,
        )
    for problem in problems:
        console.print(f"  [red]ledger:[/] {problem}")
