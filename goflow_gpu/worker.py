"""The worker: acquire a job, persist and plan it, run it, repeat.

``serve`` runs forever (idle polls back off with jitter up to a maximum interval); ``run`` is the
burst mode: it processes jobs until next-job says there is none, then returns. Unfinished jobs in
the local state are always resumed before a new job is taken.

Exit codes (``WorkerResult.exit_code``): 0 all jobs done (or drained on a signal); 1 a job had
to be skipped (its manifest failed validation) or parked (a status/report PUT was refused, 404
included: ``goflow-gpu state show`` says why); 75 (EX_TEMPFAIL)
work is unfinished because the backend or an image host stayed down past ``outage_patience``:
try again later, the state is kept and the next start resumes. The backend refusing the key is
raised as :class:`~goflow_gpu.errors.AuthenticationError` for the CLI to map (3), a dead engine
as :class:`~goflow_gpu.errors.EngineError` (5).

Nothing may fail between next-job's 200 and the job being stored: the prompt catalog is loaded
and checked before the first poll (a broken one stops the start); it is re-read between jobs,
and a broken re-read keeps the last good catalog. Any failure after a job was received stores
the manifest first (as refused, with the reason), so a job is never silently dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from goflow_gpu.client import GoFlowClient
from goflow_gpu.engines.base import Engine
from goflow_gpu.errors import (
    ApiError,
    AuthenticationError,
    GoFlowError,
    ManifestError,
    NoJobAvailable,
    StateError,
    TransientError,
)
from goflow_gpu.events import Events
from goflow_gpu.job import JobOptions, JobOutcome, JobParked, JobRunner
from goflow_gpu.logs import bind, get_logger
from goflow_gpu.media import MediaFetcher
from goflow_gpu.patience import OutageHook, PatienceExhausted, Stopped
from goflow_gpu.prompts import Catalog, load_catalog
from goflow_gpu.protocol import Manifest, parse_manifest
from goflow_gpu.retry import RetryPolicy, backoff_delay, sleep_unless_stopped
from goflow_gpu.store import Outcomes, PlannedCombo, Store

log = get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]

#: What an idle poll hands the retry module's backoff: no server delay asked (Retry-After) and
#: not a 5xx, so the plain schedule applies.
_IDLE = TransientError("next-job: no job to take now", endpoint="GET next-job", cause="idle")


def plan_job(manifest: Manifest, catalog: Catalog) -> list[PlannedCombo]:
    """Every media x analysis combination, media-major, with its prompt frozen from the catalog."""
    rendered = {}
    for analysis in manifest.analyses:
        spec = catalog.spec_for(analysis.slug, analysis.name)
        rendered[analysis.id] = (catalog.render(spec), spec.qa.model_dump(mode="json"))
    combos = []
    for media in manifest.media:
        for analysis in manifest.analyses:
            prompt, qa_rules = rendered[analysis.id]
            combos.append(
                PlannedCombo(
                    media_id=media.id,
                    analysis_id=analysis.id,
                    slug=analysis.slug,
                    variant=prompt.variant,
                    system_prompt=prompt.system_prompt,
                    user_prompt=prompt.user_prompt,
                    json_schema=prompt.json_schema,
                    spec_version=prompt.version,
                    max_tokens=prompt.max_tokens,
                    temperature=prompt.temperature,
                    qa_rules=qa_rules,
                )
            )
    return combos


#: Job outcomes a :class:`WorkerResult` keeps: ``serve`` runs for weeks, one job after another,
#: so it keeps the latest ones and counts every run instead of holding one outcome per job.
RECENT_JOBS = 100


@dataclass
class WorkerResult:
    """What one ``run``/``serve`` did: counts of every job run, and the latest outcomes."""

    jobs: deque[JobOutcome] = field(default_factory=lambda: deque(maxlen=RECENT_JOBS))
    job_runs: int = 0
    closed: int = 0
    parked: int = 0
    skipped: int = 0
    unfinished: int = 0
    drained: bool = False

    def add(self, outcome: JobOutcome) -> None:
        """Count one job run and keep its outcome among the latest :data:`RECENT_JOBS`."""
        self.jobs.append(outcome)
        self.job_runs += 1
        self.closed += outcome.closed
        self.parked += outcome.parked

    @property
    def exit_code(self) -> int:
        if self.drained:
            return 0  # asked to stop and did: skipped/parked jobs are in the log and state show
        if self.unfinished:
            return EXIT_TRY_LATER
        return 1 if (self.skipped or self.parked) else 0


#: ``run`` left work unfinished because a service stayed down: try again later (EX_TEMPFAIL).
EXIT_TRY_LATER = 75


class Worker:
    """Pulls jobs and runs them with one engine, one client, one store."""

    def __init__(
        self,
        *,
        store: Store,
        client: GoFlowClient,
        engine: Engine,
        fetcher: MediaFetcher,
        options: JobOptions,
        prompts_dir: Any = None,
        poll_min: float = 2.0,
        poll_max: float = 60.0,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        stopping: asyncio.Event | None = None,
        events: Events | None = None,
        catalog: Catalog | None = None,
        on_outage: OutageHook | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.engine = engine
        self.fetcher = fetcher
        self.options = options
        self.prompts_dir = prompts_dir
        self.poll_min = poll_min
        self.poll_max = poll_max
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.stopping = stopping if stopping is not None else asyncio.Event()
        self.events = events or Events()
        self.on_outage = on_outage
        # Loaded before the first poll: a broken catalog must stop the start, not a taken job.
        self.catalog = catalog if catalog is not None else load_catalog(prompts_dir)

    def stop(self) -> None:
        """Ask the worker to drain: no new jobs or requests; in-flight work is reported."""
        if not self.stopping.is_set():
            log.info("stop requested: draining")
        self.stopping.set()

    async def run(self, *, burst: bool) -> WorkerResult:
        """Process jobs; in burst mode return when the backend has none left."""
        result = WorkerResult()
        idle = 0
        refused: set[bytes] = set()  # digests of the invalid manifests seen in this run
        refused_again = 0
        # next-job outages: serve waits forever (its options have no patience), run up to the
        # patience (then exit 75).
        polls = self.options.outage("backend", self.stopping, self.on_outage)
        while not self.stopping.is_set():
            resumable = self.store.unfinished_jobs()
            if resumable:
                outcome = await self._run_job(resumable[0])
                result.add(outcome)
                if outcome.waited_out or (not outcome.closed and not outcome.parked):
                    if self.stopping.is_set():
                        continue
                    if burst:
                        # A service outage outlasted the patience: leave it for the next start.
                        result.unfinished += 1
                        break
                    await self._interruptible_sleep(self.poll_min)
                continue
            try:
                raw = await polls.call(self.client.next_job, what="GET next-job")
            except Stopped:
                break
            except PatienceExhausted as exc:
                log.error(
                    "next-job unavailable past the patience: try again later", reason=str(exc)
                )
                result.unfinished += 1
                break
            except NoJobAvailable:
                if burst:
                    log.info("no job available: burst finished")
                    break
                idle += 1
                await self._interruptible_sleep(self._idle_delay(idle))
                continue
            except AuthenticationError:
                raise
            except ApiError as exc:
                # A refusal or a broken answer: the backend's trouble. Restarting the process
                # (a crash loop) would not fix it; poll again later like after an outage.
                log.error(
                    "next-job failed; polling again later",
                    http_status=exc.status,
                    error=str(exc)[:500],
                )
                if burst:
                    result.unfinished += 1
                    break
                idle += 1
                await self._interruptible_sleep(self._idle_delay(idle))
                continue
            idle = 0
            verdict = self._accept(raw)
            if verdict == "accepted":
                continue  # the loop resumes it as the oldest unfinished job
            result.skipped += 1
            digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).digest()
            if verdict == "closed" or digest in refused:
                # The backend hands out the same job again (an invalid one, or one this worker
                # already closed): asking at once would only get it again. Burst mode stops;
                # serve mode backs off like when idle.
                if burst:
                    break
                idle = refused_again = refused_again + 1
                await self._interruptible_sleep(self._idle_delay(idle))
            refused.add(digest)
        result.drained = self.stopping.is_set()
        return result

    def _idle_delay(self, idle_polls: int) -> float:
        """The retry module's backoff (full jitter, doubling from poll_min up to poll_max), never
        shorter than poll_min: an idle worker must not hammer next-job."""
        policy = RetryPolicy(retries=0, base=self.poll_min, cap=self.poll_max)
        return max(self.poll_min, backoff_delay(policy, idle_polls, _IDLE, self.rng))

    async def _interruptible_sleep(self, seconds: float) -> None:
        await sleep_unless_stopped(seconds, self.stopping, self.sleep)

    def _accept(self, raw: Any) -> str:
        """Validate and persist a new job: ``accepted``, ``invalid`` (manifest skipped and kept
        for inspection) or ``closed`` (this worker already finished that job).

        Nothing between next-job's answer and the job being stored may lose the job: any
        failure here keeps the manifest with the reason (``state show`` lists it).
        """
        try:
            return self._store_job(raw)
        except ManifestError as exc:
            self.store.record_rejected_manifest(raw, str(exc))
            log.error(
                "job skipped: manifest invalid",
                problems=[f"{loc}: {msg} (got {val!r:.80})" for loc, val, msg in exc.problems],
            )
            return "invalid"
        except (GoFlowError, ValueError, KeyError, TypeError) as exc:
            reason = f"could not store the job: {type(exc).__name__}: {exc}"
            self.store.record_rejected_manifest(raw, reason[:2000])
            log.error("job skipped: kept as refused", reason=reason[:500])
            if isinstance(exc, StateError):
                raise  # the state itself is unusable: stop, the manifest is kept if it could be
            return "invalid"

    def _store_job(self, raw: Any) -> str:
        manifest = parse_manifest(raw)
        with bind(project_id=manifest.project.id):
            log.info(
                "job retrieved",
                client=manifest.client.name,
                client_id=manifest.client.id,
                project=manifest.project.name,
                media=len(manifest.media),
                analyses=len(manifest.analyses),
            )
            # every id, for whoever needs them (at INFO they would fill a screen per job)
            log.debug(
                "job ids",
                media_ids=[m.id for m in manifest.media],
                analysis_ids=[a.id for a in manifest.analyses],
            )
            known = self.store.job(manifest.project.id)  # canonical: any case matches
            if known is not None and known.state == "closed":
                log.error(
                    "job skipped: this worker already closed it; not running it twice",
                    report=known.report,
                )
                return "closed"
            if known is not None and known.parked:
                # Offered again while it waits for an operator: running it would re-send the
                # refused PUT; asking next-job at once would only get it again.
                log.error(
                    "job skipped: it is parked as needs-attention (goflow-gpu state show)",
                    reason=(known.attention or "")[:500],
                )
                return "closed"
            if known is not None:
                # An open job we already hold; our state is the truth and the loop resumes it.
                log.warning("job already known locally: resuming it")
                return "accepted"
            combos = plan_job(manifest, self._fresh_catalog())
            self.store.create_job(raw, combos)
            log.info("job persisted", combinations=len(combos))
        return "accepted"

    def _fresh_catalog(self) -> Catalog:
        """The catalog re-read between jobs (prompt edits ship without a restart); a broken
        re-read keeps the last good catalog and logs why."""
        try:
            self.catalog = load_catalog(self.prompts_dir)
        except GoFlowError as exc:
            log.error("prompt catalog re-read failed; keeping the last good one", error=str(exc))
        return self.catalog

    async def _run_job(self, project_id: str) -> JobOutcome:
        runner = JobRunner(
            store=self.store,
            client=self.client,
            engine=self.engine,
            fetcher=self.fetcher,
            project_id=project_id,
            options=self.options,
            stopping=self.stopping,
            events=self.events,
            on_outage=self.on_outage,
        )
        try:
            return await runner.run()
        except PatienceExhausted as exc:
            with bind(project_id=project_id):
                log.error(
                    "job unfinished: a service stayed down past the patience", reason=str(exc)
                )
            return self._interrupted(project_id, waited_out=True)
        except TransientError as exc:
            with bind(project_id=project_id):
                log.warning("job interrupted by backend trouble; will resume", reason=exc.cause)
            return self._interrupted(project_id)
        except JobParked as exc:
            self.store.park_job(project_id, str(exc))
            with bind(project_id=project_id):
                log.error(
                    "job parked: needs attention (goflow-gpu state show / state retry / "
                    "state abandon); moving on",
                    reason=str(exc)[:500],
                )
            outcome = self._interrupted(project_id)
            outcome.parked = True
            return outcome
        except BaseException:
            self._run_ended(project_id)
            raise

    def _interrupted(self, project_id: str, *, waited_out: bool = False) -> JobOutcome:
        counts = self.store.outcomes(project_id)
        self._run_ended(project_id, counts)
        outcome = JobOutcome.of(project_id, counts, 0.0, closed=False)
        outcome.waited_out = waited_out
        return outcome

    def _run_ended(self, project_id: str, counts: Outcomes | None = None) -> None:
        """The runner ends a job's events only when it finishes normally; observers (metrics)
        must learn that an interrupted or parked run is over too (with the store's counts when
        the store can still be read)."""
        if counts is None:
            counts = Outcomes()
        self.events.emit(
            "job_finished",
            project_id,
            closed=False,
            completed=counts.completed,
            failed=counts.failed,
        )
