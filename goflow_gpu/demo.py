"""``goflow-gpu demo``: the whole flow on one machine, against the embedded simulator.

The real worker (``service.run_worker``), the real engine code path and the real HTTP client
run against the in-process GoFlow simulator. The job's pictures are labelled scenes, and the
simulator grades the answers it receives (right answers per analysis, boxes found, IoU,
colours). Without real weights the engine gets a tiny Qwen2.5-VL: the one trained on the
simulator's scenes (:mod:`goflow_gpu.engines.train`) when the package ships it, else a
random-weight one whose answers mean nothing (``--random-weights`` forces that one). The
simulator's ledger then proves every combination was reported exactly once.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from goflow_gpu import logs, progress
from goflow_gpu.engines.scene_answers import LEARNED_ANALYSES
from goflow_gpu.engines.scene_model import SCENE_MODEL, SCENE_MODEL_LABEL, read_training
from goflow_gpu.errors import ConfigError
from goflow_gpu.evaluation.scenes import GradeSummary
from goflow_gpu.events import Events
from goflow_gpu.settings import Settings, load_settings
from goflow_gpu.simulator import Simulator
from goflow_gpu.simulator.catalog import ANALYSIS_TYPES

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
    weights: str = "random",
) -> tuple[Settings, bool]:
    """Settings for the demo run, and whether the model is a tiny local one.

    Without ``model`` and ``config`` the model is a tiny one: ``weights="trained"`` the model
    trained on the simulator's scenes shipped in the package (at the pixel budget it was trained
    at), ``"random"`` a random-weight one built on first use. Those, and a ``model`` folder made
    by ``goflow-gpu dev train-tiny``, get the CPU-sized engine settings.
    """
    tiny = model is None and config is None
    flags: dict[str, Any] = {
        "base_url": base_url,
        "state_dir": state_dir,
        "engine": engine or best_engine(),
        "log_format": "console",
        "log_level": "WARNING",
        "poll_interval_min": 0.2,
    }
    if tiny and weights == "trained":
        flags.update(_TINY_ENGINE, model=str(scene_model()), model_label=SCENE_MODEL_LABEL)
    elif tiny:
        flags.update(
            _TINY_ENGINE,
            model=str(ensure_tiny_model()),
            model_label="qwen2.5vl-tiny-random",
            min_pixels=64 * 28 * 28,
            max_pixels=256 * 28 * 28,
        )
    elif model is not None and config is None and read_training(model) is not None:
        flags.update(_TINY_ENGINE, model=model, model_label=SCENE_MODEL_LABEL)
        tiny = True
    elif model is not None:
        flags["model"] = model
    return load_settings(config, **flags), tiny


_TINY_ENGINE: dict[str, Any] = {
    "gpu_memory_utilization": 0.2,
    "enforce_eager": True,
    "max_model_len": 4096,
    "max_num_seqs": 16,
    "max_in_flight": 24,  # as configs/cpu-dev.yaml: 1.5x max_num_seqs
    "max_num_batched_tokens": 4096,
    "qa_retries": 1,
    "dtype": "auto",
}


def _shipped() -> bool:
    return (SCENE_MODEL / "config.json").is_file()


def shipped_weights() -> str:
    """``"trained"`` when the package ships the trained tiny model, else ``"random"``."""
    return "trained" if _shipped() else "random"


def scene_model() -> Path:
    """The shipped trained model's folder; a clear error when the install lacks it."""
    if not _shipped():
        raise ConfigError(
            f"the trained tiny model is missing from {SCENE_MODEL}: reinstall goflow-gpu, "
            "rebuild it with `goflow-gpu dev train-tiny` (see its training.json), or run the "
            "demo with --random-weights"
        )
    return SCENE_MODEL


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs: the job's size, the engine and model, the weights and pictures."""

    media: int = 8
    analyses: int = len(LEARNED_ANALYSES)
    engine: str | None = None
    model: str | None = None
    config: Path | None = None
    random_weights: bool = False
    """The tiny random-weight model instead of the trained one (without model/config)."""
    scenes: bool = True
    """Labelled scenes as the job's pictures, and the answers graded."""


def demo_slugs(options: DemoOptions) -> list[str] | None:
    """The job's analysis slugs: in scene mode the learned ones first, then the simulator's
    order; None (the simulator's first N) otherwise."""
    if not options.scenes:
        return None
    order = list(LEARNED_ANALYSES) + [s for s, _ in ANALYSIS_TYPES if s not in LEARNED_ANALYSES]
    return order[: options.analyses]


def run_demo(options: DemoOptions, *, out_dir: Path | None, console: Console) -> int:
    """Run the demo; returns the exit code (0 when the ledger shows exactly-once delivery)."""
    workdir = out_dir or Path(tempfile.mkdtemp(prefix="goflow-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # A made-up key shared by the in-process simulator and worker only.
    key = "demo-" + secrets.token_hex(12)
    os.environ["GOFLOW_API_KEY"] = key
    return asyncio.run(_demo(options, workdir, key, console))


async def _demo(options: DemoOptions, workdir: Path, key: str, console: Console) -> int:
    from goflow_gpu.service import run_worker

    started = time.monotonic()
    async with Simulator(api_key=key, seed=7) as sim:
        manifest = sim.add_job(
            media=options.media,
            analyses=options.analyses,
            slugs=demo_slugs(options),
            scenes=options.scenes,
        )
        settings, tiny = demo_settings(
            engine=options.engine,
            model=options.model,
            config=options.config,
            base_url=sim.base_url,
            state_dir=workdir / "state",
            weights="random" if options.random_weights else shipped_weights(),
        )
        # Warnings and errors only (-v or --log-level show more): the screen keeps the bars and
        # the summary. On a terminal the libraries' lines (vLLM, torch, ...) go to a file in the
        # state directory, named in the summary.
        logs.setup_logging(settings.log_format, settings.log_level, log_dir=settings.state_dir)
        total = len(manifest["media"]) * len(manifest["analyses"])
        if tiny:
            console.print(Panel(_intro(settings), title="goflow-gpu demo"))
            note = stale_note(settings)
            if note is not None:
                console.print(f"[yellow]note:[/] {note}", highlight=False)
        console.print(
            f"simulator at {sim.base_url}: 1 job, {len(manifest['media'])} "
            f"{'labelled scenes' if options.scenes else 'media'} x "
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
        grades = sim.grade(manifest) if options.scenes else {}
    elapsed = time.monotonic() - started
    ledger_path = workdir / "ledger.json"
    ledger_path.write_text(json.dumps(snapshot, indent=2, default=str))
    report_path = workdir / "report.json"
    reports = sim.ledger.reports.get(project_id, [])
    report_path.write_text(json.dumps(reports[-1] if reports else None, indent=2))
    if grades:
        (workdir / "grades.json").write_text(
            json.dumps({slug: g.figures() for slug, g in grades.items()}, indent=2) + "\n"
        )
    _summary(console, sim, manifest, elapsed, problems, report_path, ledger_path, result)
    if grades:
        trained = settings.model_label == SCENE_MODEL_LABEL
        _grades(console, grades, learned=set(LEARNED_ANALYSES) if trained else None)
    return 0 if not problems and result.exit_code == 0 else 1


def stale_note(settings: Settings) -> str | None:
    """A warning when the model was trained here on other prompts than the catalog's now."""
    from goflow_gpu.engines.train import stale_specs
    from goflow_gpu.prompts.catalog import load_catalog

    record = read_training(settings.model)
    if record is None:
        return None
    lines = stale_specs(record, load_catalog(settings.prompts_dir))
    if not lines:
        return None
    return (
        f"the model learned other prompts than the catalog holds now ({'; '.join(lines)}): "
        "its grades may drop; `goflow-gpu dev train-tiny` retrains it (see its training.json)"
    )


def _intro(settings: Settings) -> str:
    if settings.model_label != SCENE_MODEL_LABEL:
        return (
            "This demo runs a [bold]tiny Qwen2.5-VL with random weights[/] built on this "
            "machine: its answers mean nothing. It shows the flow: download, inference with "
            "structured decoding, QA, exactly-once reporting, status and the final report. "
            "Use --model for real weights, or a folder made by `goflow-gpu dev train-tiny`."
        )
    return (
        "This demo runs a [bold]tiny Qwen2.5-VL trained on the simulator's scenes[/] (flat "
        "circles, squares and triangles in a few colours, one word in block letters). It "
        f"learned {', '.join(LEARNED_ANALYSES)} on such pictures, with the catalog's own "
        "prompts, and nothing else: its answers to other analyses, or about real photos, mean "
        "nothing. The simulator knows each scene's truth and grades the answers it receives."
    )


def _grades(console: Console, grades: dict[str, GradeSummary], learned: set[str] | None) -> None:
    table = Table(title="graded against the scenes' truth")
    for column in ("analysis", "right", "boxes found", "mean IoU", "colours", "kinds", ""):
        table.add_column(column)
    for slug, grade in grades.items():
        note = ""
        if learned is not None:
            note = "learned" if slug in learned else "not learned: chance"
        table.add_row(
            slug,
            f"{grade.right}/{grade.answers} ({grade.right_rate:.0%})",
            _share(grade.box_recall),
            "-" if grade.mean_iou is None else f"{grade.mean_iou:.2f}",
            _share(grade.colour_rate),
            _share(grade.kind_rate),
            note,
        )
    console.print(table)
    console.print(
        "right: every labelled field right (all shapes found, named and boxed at IoU >= 0.5, "
        "nothing extra); boxes found: share of the drawn boxes matched at IoU >= 0.5 with the "
        "right name; colours: drawn shapes whose colour the description names; kinds: drawn "
        "shapes the objects list names as what they are (circle, square or triangle).",
        highlight=False,
    )


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


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
