"""Prometheus metrics of one worker, fed by pipeline events.

::

    metrics = Metrics()
    events.subscribe(metrics.observe)          # everything a job does
    metrics.set_queue_depth("report", 3)       # the runner's queues, when it likes
    metrics.api_call("result", 201, 0.042)     # per API call (needs a client hook, see below)
    body = metrics.render()                    # Prometheus text format, for GET /metrics

Each :class:`Metrics` owns its own ``CollectorRegistry`` (never the process-global one), so tests
and benchmarks can create as many as they like.

Metric names (all prefixed ``goflow_``)::

    jobs_started_total                          job_started events
    jobs_total{outcome=closed|paused}           job_finished events
    combinations_total{outcome=completed|failed|rejected|unknown}
                                                a combination whose result POST ended: accepted
                                                (or duplicate) with a passing / failing QA
                                                verdict, or refused by the backend
    qa_verdicts_total{verdict=pass|fail}        every QA check, retries included
    result_posts_total{outcome=accepted|duplicate|rejected|retry}
    status_updates_total{status}                project status PUTs that succeeded
    reports_sent_total                          final reports sent
    api_calls_total{endpoint,code}              each API attempt; code is the HTTP status or the
                                                transport failure (network, timeout)
    api_call_duration_seconds{endpoint}         histogram of the same
    retries_total{cause}                        read from RetryStats at scrape time
    retries_by_endpoint_total{endpoint}         (idem)
    retries_exhausted_total{endpoint}           calls that ran out of retries (idem)
    inference_duration_seconds                  histogram, inference_started -> finished, per
                                                (media, analysis, attempt)
    inference_errors_total                      finished inferences that carried an error
    tokens_total{kind=prompt|cached|generated}
    media_total{source=downloaded|cache|error}  media_ready events
    queue_depth{queue}                          inference / report queues (``queues`` events)
    last_job_completed_timestamp_seconds        unix time of the last closed job

The combination outcome is taken from the ``result_status`` key of ``post_finished`` when the
runner sends one; otherwise from the QA verdict or media failure this process saw for that
combination; ``unknown`` when it saw neither (a job resumed after a restart). Observers must not
raise (see :mod:`goflow_gpu.events`); unknown kinds are ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from goflow_gpu.events import Event
from goflow_gpu.retry import STATS, RetryStats

__all__ = ["CONTENT_TYPE", "INFERENCE_BUCKETS", "Metrics", "RetryCollector"]

#: The content type of :meth:`Metrics.render`'s output: the classic text format, which every
#: prometheus_client since 0.18 writes (newer ones name the constant differently).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds: a cached-prefix request on a GPU takes well under a second; a long answer under load
#: on a busy node can take minutes.
INFERENCE_BUCKETS: Final = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
_API_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_KINDS: Final = ("prompt", "cached", "generated")

_Combo = tuple[str, str | None, str | None]


class RetryCollector:
    """Exposes a :class:`RetryStats` as counters, read at scrape time (no double bookkeeping)."""

    def __init__(self, stats: RetryStats) -> None:
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        return self._families(RetryStats())

    def collect(self) -> Iterable[Metric]:
        return self._families(self.stats)

    @staticmethod
    def _families(stats: RetryStats) -> list[Metric]:
        specs = (
            ("goflow_retries", "Retries scheduled, by cause.", "cause", stats.by_cause),
            (
                "goflow_retries_by_endpoint",
                "Retries scheduled, by endpoint.",
                "endpoint",
                stats.by_endpoint,
            ),
            (
                "goflow_retries_exhausted",
                "API calls that ran out of retries, by endpoint.",
                "endpoint",
                stats.exhausted,
            ),
        )
        families: list[Metric] = []
        for name, doc, label, counter in specs:
            family = CounterMetricFamily(name, doc, labels=[label])
            # A copy: the pipeline may add to the Counter while a scrape reads it.
            for value, count in sorted(dict(counter).items()):
                family.add_metric([value], count)
            families.append(family)
        return families


class Metrics:
    """The worker's metrics in a private registry; :meth:`observe` is the events observer.

    ``retry_stats`` is read at scrape time (default: the process-wide ``retry.STATS``);
    ``wall_clock`` gives unix time for the last-completion gauge (a seam for tests).
    """

    def __init__(
        self,
        *,
        retry_stats: RetryStats | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry()
        self._wall_clock = wall_clock
        # Started inferences by (project, media, analysis) and attempt -> monotonic start time.
        self._inflight: dict[tuple[_Combo, object], float] = {}
        # What this process learned about each combination's result before its POST ended.
        self._verdicts: dict[_Combo, str] = {}
        self._failed_media: set[tuple[str, str | None]] = set()
        reg = self.registry
        self.jobs_started = Counter("goflow_jobs_started", "Jobs started.", registry=reg)
        self.jobs = Counter(
            "goflow_jobs", "Job runs that ended, by outcome.", ["outcome"], registry=reg
        )
        self.combinations = Counter(
            "goflow_combinations",
            "Media x analysis combinations whose result POST ended, by outcome.",
            ["outcome"],
            registry=reg,
        )
        self.qa_verdicts = Counter(
            "goflow_qa_verdicts", "QA checks of model answers.", ["verdict"], registry=reg
        )
        self.result_posts = Counter(
            "goflow_result_posts", "Result POSTs that ended, by outcome.", ["outcome"], registry=reg
        )
        self.status_updates = Counter(
            "goflow_status_updates", "Project status updates sent.", ["status"], registry=reg
        )
        self.reports_sent = Counter("goflow_reports_sent", "Final reports sent.", registry=reg)
        self.api_calls = Counter(
            "goflow_api_calls",
            "GoFlow API call attempts, by endpoint and HTTP status (or transport failure).",
            ["endpoint", "code"],
            registry=reg,
        )
        self.api_duration = Histogram(
            "goflow_api_call_duration_seconds",
            "Duration of GoFlow API call attempts.",
            ["endpoint"],
            buckets=_API_BUCKETS,
            registry=reg,
        )
        self.inference = Histogram(
            "goflow_inference_duration_seconds",
            "Time from submitting one inference request to its answer.",
            buckets=INFERENCE_BUCKETS,
            registry=reg,
        )
        self.inference_errors = Counter(
            "goflow_inference_errors", "Inference requests that ended in an error.", registry=reg
        )
        self.tokens = Counter(
            "goflow_tokens", "Tokens processed by the engine, by kind.", ["kind"], registry=reg
        )
        self.media = Counter(
            "goflow_media",
            "Images made ready for inference, by source (or error).",
            ["source"],
            registry=reg,
        )
        self.queue_depth = Gauge(
            "goflow_queue_depth", "Items waiting in a pipeline queue.", ["queue"], registry=reg
        )
        self.last_job_completed = Gauge(
            "goflow_last_job_completed_timestamp_seconds",
            "Unix time at which the last job was closed (0: none yet).",
            registry=reg,
        )
        reg.register(RetryCollector(retry_stats if retry_stats is not None else STATS))
        # Children with zero values, so dashboards see every series from the first scrape.
        for kind in _TOKEN_KINDS:
            self.tokens.labels(kind)
        for outcome in ("closed", "paused"):
            self.jobs.labels(outcome)
        for outcome in ("completed", "failed", "rejected"):
            self.combinations.labels(outcome)

    # -- feeding ----------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """The :class:`~goflow_gpu.events.Events` observer: count one pipeline event."""
        handler = self._handlers.get(event.kind)
        if handler is not None:
            handler(self, event)

    def set_queue_depth(self, name: str, value: int) -> None:
        """Set the current depth of the runner's queue ``name``."""
        self.queue_depth.labels(name).set(value)

    def api_call(
        self, endpoint: str, status: int | None, seconds: float, cause: str | None = None
    ) -> None:
        """Count one API call attempt: ``status`` is the HTTP status, or ``None`` when no answer
        came (``cause`` then says why: ``"network"``, ``"timeout"``)."""
        code = str(status) if status is not None else (cause or "error")
        self.api_calls.labels(endpoint, code).inc()
        self.api_duration.labels(endpoint).observe(max(seconds, 0.0))

    def render(self) -> bytes:
        """All metrics in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    # -- one handler per event kind ----------------------------------------------------------

    def _job_started(self, event: Event) -> None:
        self.jobs_started.inc()

    def _job_finished(self, event: Event) -> None:
        closed = bool(event.data.get("closed"))
        self.jobs.labels("closed" if closed else "paused").inc()
        # Whatever was in flight for this job will not finish in this run; forget it.
        self._forget(event.project_id, inflight_only=not closed)
        if closed:
            self.last_job_completed.set(self._wall_clock())

    def _media_ready(self, event: Event) -> None:
        if event.data.get("error"):
            self.media.labels("error").inc()
            self._failed_media.add((event.project_id, event.media_id))
        else:
            self.media.labels("downloaded" if event.data.get("downloaded") else "cache").inc()

    def _inference_started(self, event: Event) -> None:
        self._inflight[(_combo(event), event.data.get("attempt"))] = event.t

    def _inference_finished(self, event: Event) -> None:
        started = self._inflight.pop((_combo(event), event.data.get("attempt")), None)
        if started is not None:
            self.inference.observe(max(event.t - started, 0.0))
        if event.data.get("error"):
            self.inference_errors.inc()
        for kind in _TOKEN_KINDS:
            value = event.data.get(f"{kind}_tokens")
            if isinstance(value, int) and value > 0:
                self.tokens.labels(kind).inc(value)

    def _qa_verdict(self, event: Event) -> None:
        passed = bool(event.data.get("passed"))
        self.qa_verdicts.labels("pass" if passed else "fail").inc()
        if event.data.get("final", passed):
            self._verdicts[_combo(event)] = "completed" if passed else "failed"

    def _post_finished(self, event: Event) -> None:
        outcome = str(event.data.get("outcome", "unknown"))
        self.result_posts.labels(outcome).inc()
        if outcome == "retry":
            return  # the combination is not done yet
        combo = _combo(event)
        verdict = self._verdicts.pop(combo, None)
        if outcome == "rejected":
            self.combinations.labels("rejected").inc()
            return
        status = event.data.get("result_status")
        if status not in ("completed", "failed"):
            failed_media = (event.project_id, event.media_id) in self._failed_media
            status = verdict or ("failed" if failed_media else "unknown")
        self.combinations.labels(str(status)).inc()

    def _status_sent(self, event: Event) -> None:
        self.status_updates.labels(str(event.data.get("status", "unknown"))).inc()

    def _report_sent(self, event: Event) -> None:
        self.reports_sent.inc()

    def _queues(self, event: Event) -> None:
        for name, depth in event.data.items():
            self.set_queue_depth(name, int(depth))

    def _forget(self, project_id: str, *, inflight_only: bool) -> None:
        for key in [k for k in self._inflight if k[0][0] == project_id]:
            del self._inflight[key]
        if inflight_only:
            return
        for combo in [c for c in self._verdicts if c[0] == project_id]:
            del self._verdicts[combo]
        self._failed_media = {m for m in self._failed_media if m[0] != project_id}

    _handlers: Final[dict[str, Callable[[Metrics, Event], None]]] = {
        "job_started": _job_started,
        "job_finished": _job_finished,
        "media_ready": _media_ready,
        "inference_started": _inference_started,
        "inference_finished": _inference_finished,
        "qa_verdict": _qa_verdict,
        "post_finished": _post_finished,
        "status_sent": _status_sent,
        "report_sent": _report_sent,
        "queues": _queues,
    }


def _combo(event: Event) -> _Combo:
    return (event.project_id, event.media_id, event.analysis_id)
