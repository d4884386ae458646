"""The ledger: everything the simulator accepted, in order, so tests can check exactly-once.

Project, media and analysis ids are canonical lower-case UUIDs, whatever case the manifest was
served in or the client wrote in a path.

"Accepted" means the server decided on a 2xx and changed its state, even when the connection was
then cut (accept-then-drop) or the client had already gone (a slow answer past its timeout).
Such events carry ``"delivered": False``: the server knows the client never saw the answer, so a
client that repeats the call is behaving correctly, and :meth:`Ledger.check_job` excuses it.
"""

from __future__ import annotations

import copy
import time
from typing import Any

ResultKey = tuple[str, str, str]


class Ledger:
    """Accepted statuses, results and reports by project, an ordered event list, and every call."""

    def __init__(self) -> None:
        self.results: dict[ResultKey, list[dict[str, Any]]] = {}
        self.statuses: dict[str, list[str]] = {}
        self.reports: dict[str, list[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []

    # -- recording (the simulator's side) ---------------------------------------------------

    def _event(self, kind: str, project: str, **extra: Any) -> dict[str, Any]:
        event = {"seq": len(self.events) + 1, "kind": kind, "project": project, "delivered": True}
        event.update(extra)
        event["ts"] = time.time()
        self.events.append(event)
        return event

    def record_job(self, project: str) -> dict[str, Any]:
        """A manifest was served by next-job."""
        return self._event("job", project)

    def record_status(self, project: str, status: str) -> dict[str, Any]:
        self.statuses.setdefault(project, []).append(status)
        return self._event("status", project, status=status)

    def record_result(
        self, project: str, media: str, analysis: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        self.results.setdefault((project, media, analysis), []).append(body)
        return self._event(
            "result", project, media=media, analysis=analysis, status=body.get("status")
        )

    def record_report(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        self.reports.setdefault(project, []).append(body)
        return self._event("report", project)

    def record_call(
        self, route: str, method: str, path: str, status: int | None, fault: str | None, ts: float
    ) -> None:
        """One HTTP call as it ended: ``status`` is ``None`` when no answer was decided (reset)."""
        self.calls.append(
            {
                "route": route,
                "method": method,
                "path": path,
                "status": status,
                "fault": fault,
                "ts": ts,
            }
        )

    # -- reading (the tests' side) ----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able deep copy; result keys become ``"project/media/analysis"``."""
        return copy.deepcopy(
            {
                "results": {"/".join(key): bodies for key, bodies in self.results.items()},
                "statuses": self.statuses,
                "reports": self.reports,
                "events": self.events,
                "calls": self.calls,
            }
        )

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> Ledger:
        """Rebuild a ledger from :meth:`snapshot` output (e.g. fetched from ``/_sim/ledger``)."""
        ledger = cls()
        for key, bodies in data["results"].items():
            project, media, analysis = key.split("/")
            ledger.results[(project, media, analysis)] = copy.deepcopy(bodies)
        ledger.statuses = copy.deepcopy(data["statuses"])
        ledger.reports = copy.deepcopy(data["reports"])
        ledger.events = copy.deepcopy(data["events"])
        ledger.calls = copy.deepcopy(data["calls"])
        return ledger

    def check_job(self, manifest: dict[str, Any]) -> list[str]:
        """Invariant violations of one served job, as sentences; an empty list means correct.

        Checked: every media x analysis accepted exactly once and nothing else accepted for the
        project; statuses exactly ``processing`` then ``completed``; ``processing`` before the
        first result; ``completed`` after the last result; exactly one report, after
        ``completed``. A repeated status or report is excused only when every earlier copy was
        never delivered to the client (dropped, or answered after the client gave up).

        The manifest's ids may be in any case (``Simulator(upper_ids=True)`` serves them upper
        case); the ledger is keyed on canonical lower-case ids.
        """
        project = str(manifest["project"]["id"]).lower()
        media = [str(item["id"]).lower() for item in manifest["media"]]
        analyses = [str(item["id"]).lower() for item in manifest["analyses"]]
        problems = self._check_results(project, media, analyses)

        events = [e for e in self.events if e["project"] == project]
        results = [e for e in events if e["kind"] == "result"]
        statuses = [e for e in events if e["kind"] == "status"]
        reports = [e for e in events if e["kind"] == "report"]

        effective = [e["status"] for e in _effective(statuses, "status")]
        if effective != ["processing", "completed"]:
            problems.append(
                f"project {project}: statuses were {effective} (not counting repeats of calls "
                "whose answer was lost), expected ['processing', 'completed']"
            )
        processing = next((e["seq"] for e in statuses if e["status"] == "processing"), None)
        completed = next((e["seq"] for e in statuses if e["status"] == "completed"), None)
        if results:
            first, last = results[0], results[-1]
            if processing is None or processing > first["seq"]:
                problems.append(
                    f"project {project}: the first result (event {first['seq']}, media "
                    f"{first['media']}, analysis {first['analysis']}) was accepted before "
                    "status 'processing'"
                )
            if completed is not None and completed < last["seq"]:
                problems.append(
                    f"project {project}: status 'completed' (event {completed}) was accepted "
                    f"before the last result (event {last['seq']})"
                )
        effective_reports = _effective(reports, None)
        if len(effective_reports) != 1:
            problems.append(
                f"project {project}: {len(effective_reports)} reports accepted (not counting "
                "repeats of calls whose answer was lost), expected exactly 1"
            )
        if reports and (completed is None or reports[0]["seq"] < completed):
            problems.append(
                f"project {project}: the report (event {reports[0]['seq']}) was accepted before "
                "status 'completed'"
            )
        return problems

    def _check_results(self, project: str, media: list[str], analyses: list[str]) -> list[str]:
        problems: list[str] = []
        expected = {(project, m, a) for m in media for a in analyses}
        missing = sorted(key for key in expected if not self.results.get(key))
        if missing:
            _, m, a = missing[0]
            problems.append(
                f"project {project}: {len(missing)} of {len(expected)} media x analysis "
                f"combinations were never accepted (first: media {m} x analysis {a})"
            )
        for key in sorted(expected):
            count = len(self.results.get(key, []))
            if count > 1:
                problems.append(
                    f"project {project}: media {key[1]} x analysis {key[2]} was accepted "
                    f"{count} times, expected once"
                )
        stray = sorted(k for k in self.results if k[0] == project and k not in expected)
        if stray:
            problems.append(
                f"project {project}: {len(stray)} results accepted for combinations not in the "
                f"manifest (first: media {stray[0][1]} x analysis {stray[0][2]})"
            )
        return problems


def _effective(events: list[dict[str, Any]], field: str | None) -> list[dict[str, Any]]:
    """Events minus undelivered ones that the client later repeated (same ``field`` value)."""
    out = []
    for index, event in enumerate(events):
        value = event.get(field) if field else None
        repeated = any(
            (later.get(field) if field else None) == value for later in events[index + 1 :]
        )
        if event["delivered"] or not repeated:
            out.append(event)
    return out
