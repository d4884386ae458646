"""Progress bars for people at a terminal, fed by pipeline events.

One bar set per job: media fetched, combinations inferred (final verdicts), passed QA, and
reported. Quiet when the output is not a terminal or logs are JSON: machines read the logs.
The bars appear with the first job, after the engine has loaded.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from goflow_gpu.events import Event


def wanted(console: Console, log_format: str) -> bool:
    """Bars only for a person: a terminal, and logs not forced to JSON."""
    return console.is_terminal and log_format != "json"


class JobProgress:
    """An events observer that draws progress bars; use as a context manager."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._project: str | None = None
        self._media: set[str] = set()
        self._started = False

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._started:
            self.progress.stop()

    def _new_job(self, event: Event) -> None:
        if not self._started:
            # Drawn from the first job on, not while the engine loads: the display redirects
            # sys.stderr, and a library imported meanwhile (torch) would put its own handler on
            # that redirect, past the log pipeline and onto the screen.
            self.progress.start()
            self._started = True
        for task in self._tasks.values():
            self.progress.remove_task(task)
        total = int(event.data.get("combinations", 0))
        media = int(event.data.get("media", 0))
        label = event.project_id[:8]
        self._tasks = {
            "media": self.progress.add_task(f"{label} media", total=media),
            "inferred": self.progress.add_task(f"{label} inferred", total=total),
            "passed": self.progress.add_task(f"{label} passed QA", total=total),
            "reported": self.progress.add_task(
                f"{label} reported", total=total, completed=int(event.data.get("reported", 0))
            ),
        }
        self._project = event.project_id
        self._media = set()

    def __call__(self, event: Event) -> None:
        if event.kind == "job_started":
            self._new_job(event)
            return
        if event.project_id != self._project:
            return
        if event.kind == "media_ready" and event.media_id not in self._media:
            self._media.add(str(event.media_id))
            self.progress.advance(self._tasks["media"])
        elif event.kind == "qa_verdict" and event.data.get("final"):
            self.progress.advance(self._tasks["inferred"])
            if event.data.get("passed"):
                self.progress.advance(self._tasks["passed"])
        elif event.kind == "post_finished" and event.data.get("outcome") != "retry":
            self.progress.advance(self._tasks["reported"])
