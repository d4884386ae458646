"""Pipeline events: the one seam through which metrics, progress bars and the benchmark watch a
job without the pipeline knowing about any of them.

The job runner calls :meth:`Events.emit`; each registered observer gets every
:class:`Event`. Observers must be quick and must not raise (an observer that raises is logged
and dropped, never allowed to break a job).

Kinds (``data`` keys in brackets):
``job_started`` [combinations, media, analyses, reported (already terminal, on a resume)],
``media_ready`` [variant, downloaded, error], ``inference_started`` [attempt],
``inference_finished`` [attempt, prompt_tokens, cached_tokens, generated_tokens, error],
``qa_verdict`` [passed, attempt, final], ``post_started``, ``post_finished`` [http_status,
result_status, outcome: accepted|duplicate|rejected|retry], ``status_sent`` [status],
``report_sent``, ``job_finished`` [closed, completed, failed], ``queues`` [inference, report:
their depths, sampled every second while a job runs].
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from goflow_gpu.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Event:
    kind: str
    project_id: str
    media_id: str | None = None
    analysis_id: str | None = None
    t: float = field(default_factory=time.monotonic)
    data: dict[str, Any] = field(default_factory=dict)


Observer = Callable[[Event], None]


class Events:
    """A list of observers and an ``emit`` that shields the pipeline from them."""

    def __init__(self, observers: list[Observer] | None = None) -> None:
        self.observers: list[Observer] = list(observers or [])

    def subscribe(self, observer: Observer) -> None:
        self.observers.append(observer)

    def emit(
        self,
        kind: str,
        project_id: str,
        media_id: str | None = None,
        analysis_id: str | None = None,
        **data: Any,
    ) -> None:
        if not self.observers:
            return
        event = Event(kind, project_id, media_id, analysis_id, time.monotonic(), data)
        for observer in list(self.observers):
            try:
                observer(event)
            except Exception:
                log.exception("event observer failed; dropping it", kind=kind)
                self.observers.remove(observer)
