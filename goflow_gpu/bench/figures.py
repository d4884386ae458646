"""Figures of one job run, computed from the pipeline's events alone.

The runner records every :class:`~goflow_gpu.events.Event` of a run (:class:`EventLog`);
:func:`compute_figures` turns that list into the numbers the benchmark reports. Pure functions
over a list, so a hand-written event sequence checks them.

Definitions (all times in seconds, from ``job_started`` to ``job_finished``):

- ``busy_fraction``: time with at least one inference request in flight / wall time.
- ``overhead_s``: time the engine had nothing in flight while inference work remained, i.e.
  between ``job_started`` and the last ``inference_finished`` (downloads before the first
  request, gaps the feeder or the slots left). The reporting tail after the last inference is
  not engine overhead: the engine has nothing left to do then.
- ``first_post_s``: from ``job_started`` to the first POST the backend accepted.
- ``qa_to_post_*``: per combination, from its passing QA verdict to its accepted POST.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from goflow_gpu.events import Event


class EventLog:
    """An events observer that keeps every event of a run, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by the union of ``(start, end)`` intervals."""
    total = 0.0
    current_start: float | None = None
    current_end = 0.0
    for start, end in sorted(intervals):
        if current_start is None or start > current_end:
            if current_start is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_start is not None:
        total += current_end - current_start
    return total


def inference_intervals(events: Sequence[Event]) -> list[tuple[float, float]]:
    """``(started, finished)`` of every inference request (one per attempt)."""
    open_at: dict[tuple[str | None, str | None, Any], float] = {}
    spans = []
    for event in events:
        key = (event.media_id, event.analysis_id, event.data.get("attempt"))
        if event.kind == "inference_started":
            open_at[key] = event.t
        elif event.kind == "inference_finished" and key in open_at:
            spans.append((open_at.pop(key), event.t))
    return spans


def qa_to_post_latencies(events: Sequence[Event]) -> list[float]:
    """Seconds from each combination's passing QA verdict to its accepted POST."""
    passed_at: dict[tuple[str | None, str | None], float] = {}
    latencies = []
    for event in events:
        key = (event.media_id, event.analysis_id)
        if event.kind == "qa_verdict" and event.data.get("passed"):
            passed_at[key] = event.t
        elif (
            event.kind == "post_finished"
            and event.data.get("outcome") in ("accepted", "duplicate")
            and key in passed_at
        ):
            latencies.append(event.t - passed_at.pop(key))
    return latencies


def _first(events: Sequence[Event], kind: str) -> Event | None:
    return next((e for e in events if e.kind == kind), None)


def _last(events: Sequence[Event], kind: str) -> Event | None:
    return next((e for e in reversed(events) if e.kind == kind), None)


def compute_figures(events: Sequence[Event]) -> dict[str, Any]:
    """The run's figures (see the module docstring); raises ValueError without a started job."""
    started = _first(events, "job_started")
    if started is None:
        raise ValueError("no job_started event: the run did not start a job")
    finished = _last(events, "job_finished")
    end = finished.t if finished is not None else max(e.t for e in events)
    t0 = started.t
    wall = max(end - t0, 1e-9)
    combinations = int(started.data.get("combinations", 0))

    spans = [(max(s, t0), min(f, end)) for s, f in inference_intervals(events)]
    busy = union_length(spans)
    last_inference = _last(events, "inference_finished")
    work_end = last_inference.t if last_inference is not None else t0
    overhead = max(0.0, (work_end - t0) - busy)

    accepted = [
        e
        for e in events
        if e.kind == "post_finished" and e.data.get("outcome") in ("accepted", "duplicate")
    ]
    latencies = qa_to_post_latencies(events)
    done = [e for e in events if e.kind == "inference_finished"]

    def total(name: str) -> int:
        return sum(int(e.data.get(name) or 0) for e in done)

    return {
        "wall_s": wall,
        "combinations": combinations,
        "combinations_per_s": combinations / wall,
        "requests": len(done),
        "engine_busy_s": busy,
        "busy_fraction": busy / wall,
        "overhead_s": overhead,
        "overhead_fraction": overhead / wall,
        "first_post_s": accepted[0].t - t0 if accepted else None,
        "qa_to_post_p50_s": percentile(latencies, 50),
        "qa_to_post_p95_s": percentile(latencies, 95),
        "posts_accepted": len(accepted),
        "completed": finished.data.get("completed") if finished is not None else None,
        "failed": finished.data.get("failed") if finished is not None else None,
        "prompt_tokens": total("prompt_tokens"),
        "cached_tokens": total("cached_tokens"),
        "generated_tokens": total("generated_tokens"),
        "inference_errors": sum(1 for e in done if e.data.get("error")),
    }
