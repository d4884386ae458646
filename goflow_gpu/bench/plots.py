"""PNG plots of benchmark runs (matplotlib, Agg backend, imported lazily).

- ``timeline-<label>.png``: one row per combination: inference (each attempt), the wait from the
  passing QA verdict to the POST, and the POST itself;
- ``throughput.png``: accepted results over time, one line per run;
- ``latency.png``: distributions of inference time per request and of QA pass -> POST accepted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from goflow_gpu.bench.figures import inference_intervals, qa_to_post_latencies
from goflow_gpu.bench.runner import RunResult
from goflow_gpu.events import Event


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _start(events: list[Event]) -> float:
    return next((e.t for e in events if e.kind == "job_started"), events[0].t if events else 0.0)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"


def timeline(run: RunResult, path: Path) -> Path:
    """Per combination: inference, QA-pass-to-POST wait and POST, against seconds into the job."""
    plt = _pyplot()
    events = run.events
    t0 = _start(events)
    rows: dict[tuple[str | None, str | None], int] = {}
    bars: dict[str, list[tuple[int, float, float]]] = {"inference": [], "wait": [], "post": []}
    opened: dict[tuple[Any, ...], float] = {}
    for event in events:
        combo = (event.media_id, event.analysis_id)
        if event.media_id is None or event.analysis_id is None:
            continue
        row = rows.setdefault(combo, len(rows))
        if event.kind == "inference_started":
            opened[("i", *combo, event.data.get("attempt"))] = event.t
        elif event.kind == "inference_finished":
            began = opened.pop(("i", *combo, event.data.get("attempt")), event.t)
            bars["inference"].append((row, began - t0, event.t - began))
        elif event.kind == "qa_verdict" and event.data.get("final"):
            opened[("q", *combo)] = event.t
        elif event.kind == "post_started":
            began = opened.pop(("q", *combo), event.t)
            bars["wait"].append((row, began - t0, event.t - began))
            opened[("p", *combo)] = event.t
        elif event.kind == "post_finished":
            began = opened.pop(("p", *combo), event.t)
            bars["post"].append((row, began - t0, event.t - began))
    fig, ax = plt.subplots(figsize=(10, max(3.0, min(12.0, 0.02 * len(rows) + 2))))
    colours = {"inference": "tab:blue", "wait": "tab:grey", "post": "tab:green"}
    names = {"inference": "inference", "wait": "QA done -> POST", "post": "POST"}
    for kind, items in bars.items():
        if items:
            ax.barh(
                [row for row, _, _ in items],
                [max(width, 1e-4) for _, _, width in items],
                left=[start for _, start, _ in items],
                height=0.8,
                color=colours[kind],
                label=names[kind],
            )
    ax.set_xlabel("seconds since job start")
    ax.set_ylabel("combination (first inference order)")
    ax.invert_yaxis()
    ax.set_title(f"timeline: {run.label} ({run.engine})")
    if rows:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def throughput(runs: list[RunResult], path: Path) -> Path:
    """Accepted results over time, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        t0 = _start(run.events)
        times = sorted(
            e.t - t0
            for e in run.events
            if e.kind == "post_finished" and e.data.get("outcome") in ("accepted", "duplicate")
        )
        ax.step([0.0, *times], list(range(len(times) + 1)), where="post", label=run.label)
    ax.set_xlabel("seconds since job start")
    ax.set_ylabel("results accepted")
    ax.set_title("throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def latency(runs: list[RunResult], path: Path) -> Path:
    """Histograms of inference seconds per request and of QA pass -> POST accepted."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for run in runs:
        infer = [f - s for s, f in inference_intervals(run.events)]
        post = qa_to_post_latencies(run.events)
        if infer:
            left.hist(infer, bins=30, alpha=0.5, label=run.label)
        if post:
            right.hist(post, bins=30, alpha=0.5, label=run.label)
    left.set_title("inference time per request")
    left.set_xlabel("seconds")
    right.set_title("QA pass -> POST accepted")
    right.set_xlabel("seconds")
    for ax in (left, right):
        ax.set_ylabel("count")
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(out_dir: Path, runs: list[RunResult]) -> list[Path]:
    """All plots of ``runs`` into ``out_dir``; returns the files written.

    Runs without pipeline events (the offline batch API's) have nothing to plot.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [run for run in runs if run.events]
    paths = [timeline(run, out_dir / f"timeline-{_safe(run.label)}.png") for run in runs]
    if runs:
        paths.append(throughput(runs, out_dir / "throughput.png"))
        paths.append(latency(runs, out_dir / "latency.png"))
    return paths
