"""One job, from its stored manifest to its closed report: the streaming pipeline.

Stages, joined by bounded queues so that downloads, inference, QA and reporting overlap and the
engine never waits for HTTP::

    feeder ──(media-major)──> infer queue ──> N inference slots ──(QA)──> report queue ──> M posters
      │  fetches each (media, variant) once, concurrently                 │
      └─ a media item that cannot be fetched fails its combinations ──────┘

- The feeder walks the plan media-major (all analyses of one image together: vLLM's prefix cache
  then prefills each image once), feeding each image's combinations as its download completes
  (downloads run ahead, bounded by the fetcher).
- An inference slot asks the engine, checks the answer (QA) and re-asks with the QA reasons
  appended until it passes or the retries are spent; the verdict and the exact POST body are
  stored (``ready``) before the combination goes to the report queue. An engine error is not a
  QA failure: the request is tried again (``engine_retries``) without using a QA attempt and
  without telling the model; if the engine keeps failing that one request the combination
  fails with ``engine_error``; an engine that raises (dead) stops the job, which resumes on the
  next start.
- A poster records the POST intent (``posting``), POSTs, and records the outcome, as
  :mod:`goflow_gpu.answers` decides it: only a definite refusal from the server is terminal.
- Status ``processing`` is sent (once, durably) right before the first inference request or the
  first result POST, whichever comes first; ``completed`` and then the report once every
  combination is ``reported`` or ``rejected``.

Outages: a transient failure that outlasts the client's retries pauses the job's calls to that
service (:class:`~goflow_gpu.patience.Outage`, one for the backend, one for the image hosts):
every poster waits for the same probe, inference goes on, nothing becomes terminal, and
``completed`` waits. After ``outage_patience`` (``run`` only) the job stops unfinished.

Draining (SIGTERM): the feeder stops, queued rows go back untouched (still ``pending``), QA
re-asks stop, in-flight requests get ``drain_timeout`` seconds and are then aborted (their rows
stay ``pending``, no attempt used), posters POST what is ready until then, each once (no retry
sleeps), and every backoff wakes at once. The job stays open in the state store and is resumed
by the next start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from goflow_gpu.answers import Decision, Endpoint, decide
from goflow_gpu.client import GoFlowClient
from goflow_gpu.engines.base import Engine, InferenceRequest, InferenceResult, Sampling
from goflow_gpu.errors import (
    ApiError,
    AuthenticationError,
    GoFlowError,
    MediaError,
    StateError,
    TransientError,
)
from goflow_gpu.events import Events
from goflow_gpu.logs import bind, get_logger
from goflow_gpu.media import FetchedImage, MediaFetcher
from goflow_gpu.patience import Outage, OutageHook, PatienceExhausted, Stopped
from goflow_gpu.prompts import QARules, RenderedPrompt
from goflow_gpu.prompts.qa import QAVerdict, judge, retry_user_prompt
from goflow_gpu.protocol import (
    Manifest,
    ProjectStatus,
    ReportBody,
    ResultBody,
    ResultStatus,
    parse_manifest,
)
from goflow_gpu.reporting import build_report
from goflow_gpu.retry import sleep_unless_stopped
from goflow_gpu.store import TERMINAL_STATES, ComboKey, ComboRow, Outcomes, Store

if TYPE_CHECKING:
    from goflow_gpu.prompts.pixels import FactCache

log = get_logger(__name__)

_DONE = None  # queue sentinel


@dataclass
class JobOptions:
    """The knobs of one job run (from Settings)."""

    qa_retries: int = 2
    inference_slots: int = 16
    report_concurrency: int = 8
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1280 * 28 * 28
    keep_media: bool = False  # keep a closed job's cached images
    outage_patience: float | None = None  # None: wait for a service forever (serve)
    outage_backoff_min: float = 1.0
    outage_backoff_max: float = 60.0
    drain_timeout: float = 20.0
    engine_retries: int = 2
    #: status/report PUTs re-sent after an unknown outcome (across restarts) before the job is
    #: parked: a crash loop around one PUT must not re-send it forever.
    max_put_resends: int = 5

    def outage(self, service: str, stopping: asyncio.Event, on_change: OutageHook | None) -> Outage:
        """The job-level backoff of one service, with these options' patience and bounds."""
        return Outage(
            service,
            stopping=stopping,
            patience=self.outage_patience,
            base=self.outage_backoff_min,
            cap=self.outage_backoff_max,
            on_change=on_change,
        )


@dataclass
class JobOutcome:
    """What happened to one job in this run."""

    project_id: str
    closed: bool
    total: int
    completed: int
    failed: int
    seconds: float
    parked: bool = False  # a status/report PUT was refused: the job needs attention
    waited_out: bool = False  # a service stayed down past the patience: try again later

    @classmethod
    def of(cls, project_id: str, counts: Outcomes, seconds: float, *, closed: bool) -> JobOutcome:
        """The outcome of a run that ended with these counts (the store's one count)."""
        return cls(project_id, closed, counts.total, counts.completed, counts.failed, seconds)


class JobParked(GoFlowError):
    """A status or report PUT was refused for good: the job needs an operator's attention."""


class JobRunner:
    """Runs one stored job to completion (or until asked to drain)."""

    def __init__(
        self,
        *,
        store: Store,
        client: GoFlowClient,
        engine: Engine,
        fetcher: MediaFetcher,
        project_id: str,
        options: JobOptions,
        stopping: asyncio.Event,
        events: Events | None = None,
        on_outage: OutageHook | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.engine = engine
        self.fetcher = fetcher
        self.options = options
        self.stopping = stopping
        self.events = events or Events()
        job = store.job(project_id)
        if job is None:
            raise StateError(f"job {project_id} is not in the state store")
        self.project_id = job.project_id
        self.manifest: Manifest = parse_manifest(job.manifest)
        self._media = {m.id: m for m in self.manifest.media}
        self._analysis_ids = {a.id for a in self.manifest.analyses}
        # Canonical id -> the server's own spelling, for paths (ids compare case-insensitively).
        self._spelling = _spellings(job.manifest)
        # Statuses already sent, kept here so the hot path never re-reads the job row.
        self._sent = {
            status
            for status, phase in (
                ("processing", job.status_processing),
                ("completed", job.status_completed),
            )
            if phase == "sent"
        }
        self._processing_lock = asyncio.Lock()
        self._infer_q: asyncio.Queue[ComboRow | None] = asyncio.Queue(
            maxsize=max(2, 2 * options.inference_slots)
        )
        self._report_q: asyncio.Queue[ComboKey | None] = asyncio.Queue()
        self._fatal: BaseException | None = None
        self._backend = options.outage("backend", stopping, on_outage)
        self._image_hosts = options.outage("image hosts", stopping, on_outage)
        self._intents: set[str] = set()  # status intents recorded by this run
        self._put_failure: BaseException | None = None  # a status PUT's definite failure
        self._in_flight: set[asyncio.Future[InferenceResult]] = set()
        self._aborting = False  # the drain timeout passed: in-flight requests were aborted
        self._post_cutoff = asyncio.Event()  # the drain timeout passed: no new POSTs
        self._facts: FactCache | None = None  # pixel facts by image file, made when needed

    # -- status -------------------------------------------------------------------------------

    async def _ensure_status(self, status: ProjectStatus) -> None:
        """Send a project status at most once, recording intent before and success after.

        Raises :class:`Stopped` when the worker stops; a definite failure of the PUT (parked,
        patience exhausted) is raised to every task that waits for it, without
        sending it again.
        """
        # Always through the lock (uncontended it does not yield): it is fair, so slots that
        # waited for "processing" go first and the media-major order holds.
        async with self._processing_lock:
            if status in self._sent:
                return
            if self._put_failure is not None:
                raise self._put_failure
            if self.stopping.is_set():
                raise Stopped
            try:
                if status == "completed" and "processing" not in self._sent:
                    await self._send_status("processing")
                await self._send_status(status)
            except (ApiError, JobParked, PatienceExhausted) as exc:
                self._put_failure = exc
                raise

    async def _send_status(self, status: ProjectStatus) -> None:
        if status not in self._intents:
            # Once per run: an intent found from an earlier run is a re-send after an unknown
            # outcome (counted, bounded); the tasks of this run never count.
            resends = self.store.mark_status(self.project_id, status, "intent")
            self._intents.add(status)
            self._check_resends(resends, f"status {status}")
        pid = self._wire(self.project_id)
        try:
            await self._put(lambda: self.client.set_status(pid, status), f"PUT status {status}")
        except ApiError as exc:
            self._settle_put("status", f"status {status}", exc)
        self.store.mark_status(self.project_id, status, "sent")
        self._sent.add(status)
        log.info("project status sent", status=status)
        self.events.emit("status_sent", self.project_id, status=status)

    async def _put(self, call: Callable[[], Awaitable[None]], what: str) -> None:
        """A status/report PUT through the backend's outage; an outage that stopped it is no
        crash loop, so it resets the re-send count (only consecutive crashes accumulate)."""
        try:
            await self._backend.call(call, what=what)
        except (Stopped, PatienceExhausted):
            self.store.reset_put_resends(self.project_id)
            raise

    def _check_resends(self, resends: int, what: str) -> None:
        if resends > self.options.max_put_resends:
            raise JobParked(
                f"{what} was re-sent {resends} times after its outcome was unknown (a crash or "
                "lost answer each time); not sending it again by itself"
            )

    def _settle_put(self, endpoint: Endpoint, what: str, exc: ApiError) -> None:
        """A status/report PUT got a non-transient answer: return when it counts as sent,
        else raise what the worker acts on (auth, park)."""
        if isinstance(exc, AuthenticationError):
            raise exc
        decision = decide(endpoint, exc.status, exc.detail_text, prior_unknown=True)
        if decision is Decision.LANDED:
            log.warning(
                "backend says it has this already: counted as sent",
                call=what,
                http_status=exc.status,
                detail=exc.detail_text[:500],
            )
            return
        raise JobParked(f"{what} refused: HTTP {exc.status}: {exc.detail_text[:1000]}") from exc

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> JobOutcome:
        started = time.monotonic()
        with bind(project_id=self.project_id):
            counts = self.store.counts(self.project_id)
            log.info(
                "job started",
                client=self.manifest.client.name,
                project=self.manifest.project.name,
                media=len(self.manifest.media),
                analyses=len(self.manifest.analyses),
                states=counts,
            )
            self.events.emit(
                "job_started",
                self.project_id,
                combinations=self.manifest.combinations,
                media=len(self.manifest.media),
                analyses=len(self.manifest.analyses),
                reported=sum(counts.get(state, 0) for state in TERMINAL_STATES),
            )
            # Work left over from an earlier run: verdicts not yet (surely) reported.
            for row in self.store.combos(self.project_id, states=("ready", "posting")):
                self._report_q.put_nowait(row.key)
            slots = [
                asyncio.create_task(self._inference_slot(), name=f"infer-{i}")
                for i in range(self.options.inference_slots)
            ]
            posters = [
                asyncio.create_task(self._poster(), name=f"post-{i}")
                for i in range(self.options.report_concurrency)
            ]
            feeder = asyncio.create_task(self._feeder(), name="feeder")
            helpers = [
                asyncio.create_task(self._sample_queues(), name="queue-sampler"),
                asyncio.create_task(self._drain_watchdog(), name="drain-watchdog"),
            ]
            try:
                await self._supervise(feeder, slots, posters)
            finally:
                for task in [feeder, *slots, *posters, *helpers]:
                    task.cancel()
                await asyncio.gather(feeder, *slots, *posters, *helpers, return_exceptions=True)
                self._emit_queue_depths()
                for outage in (self._backend, self._image_hosts):
                    outage.forget()  # readiness must not keep waiting for a job that ended
            if self._fatal is not None:
                raise self._fatal
            return await self._finish(started)

    async def _supervise(
        self,
        feeder: asyncio.Task[None],
        slots: list[asyncio.Task[None]],
        posters: list[asyncio.Task[None]],
    ) -> None:
        """Wait for feeder -> slots -> posters to drain in order; stop early on a fatal error."""

        async def drain() -> None:
            await feeder
            for _ in slots:
                await self._infer_q.put(_DONE)
            await asyncio.gather(*slots)
            await self._report_q.join()
            for _ in posters:
                self._report_q.put_nowait(_DONE)
            await asyncio.gather(*posters)

        drainer = asyncio.create_task(drain())
        every = [feeder, *slots, *posters]
        while not drainer.done():
            await asyncio.wait([drainer, *every], return_when=asyncio.FIRST_COMPLETED)
            for task in every:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    self._fatal = task.exception()
                    drainer.cancel()
                    await asyncio.gather(drainer, return_exceptions=True)
                    return
            every = [t for t in every if not t.done()]
        await drainer

    async def _drain_watchdog(self) -> None:
        """On stop: give in-flight requests ``drain_timeout`` seconds, then abort them and let
        no new POST start (the rows stay ``pending`` / ``ready`` for the next start)."""
        await self.stopping.wait()
        running = set(self._in_flight)
        log.info(
            "draining: no new inference, in-flight requests get the drain timeout",
            in_flight=len(running),
            drain_timeout_s=self.options.drain_timeout,
        )
        deadline = time.monotonic() + self.options.drain_timeout
        if running:
            await asyncio.wait(running, timeout=self.options.drain_timeout)
        self._aborting = True  # from now on no request starts, and what still runs is aborted
        left = [f for f in self._in_flight if not f.done()]
        if left:
            log.warning("drain timeout: aborting in-flight requests", aborted=len(left))
        for future in left:
            future.cancel()
        # Ready verdicts are POSTed (once each) until the drain timeout, then left for later.
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        self._post_cutoff.set()

    def _emit_queue_depths(self) -> None:
        self.events.emit(
            "queues",
            self.project_id,
            inference=self._infer_q.qsize(),
            report=self._report_q.qsize(),
        )

    async def _sample_queues(self, every: float = 1.0) -> None:
        """Queue depths for metrics: a growing report queue means the backend is the
        bottleneck, a growing inference queue the engine."""
        while True:
            self._emit_queue_depths()
            await asyncio.sleep(every)

    async def _feeder(self) -> None:
        pending = self.store.combos(self.project_id, states=("pending",))
        if not pending:
            return
        groups: dict[tuple[str, str], list[ComboRow]] = {}
        media_order = {m.id: i for i, m in enumerate(self.manifest.media)}
        for row in sorted(pending, key=lambda r: media_order.get(r.key.media_id, 0)):
            groups.setdefault((row.key.media_id, row.plan.variant), []).append(row)
        downloads = {
            key: asyncio.create_task(self._fetch(*key), name=f"fetch-{key[0][:8]}-{key[1]}")
            for key in groups
        }
        remaining = list(groups)  # plan order
        try:
            while remaining:
                key = await self._next_download(remaining, downloads)
                remaining.remove(key)
                if self.stopping.is_set():
                    log.info("draining: no new inference requests")
                    return
                fetched = await downloads[key]
                if fetched is None:
                    continue  # stopped while its host was down: the rows stay pending
                rows = groups[key]
                if isinstance(fetched, MediaError):
                    for row in rows:
                        await self._fail_media(row, str(fetched))
                    continue
                for row in rows:
                    if self.stopping.is_set():
                        return
                    await self._infer_q.put(row)
        finally:
            for task in downloads.values():
                task.cancel()

    async def _next_download(
        self,
        remaining: list[tuple[str, str]],
        downloads: dict[tuple[str, str], asyncio.Task[Any]],
    ) -> tuple[str, str]:
        """The next (media, variant) to feed: the plan's next one (media-major, for the prefix
        cache) once downloaded; while the image hosts are in an outage, any downloaded one in
        plan order, so one image whose host is down does not hold up the images after it."""
        while True:
            head = remaining[0]
            if downloads[head].done() or self.stopping.is_set():
                return head  # when stopping, the feeder returns before using it
            if self._image_hosts.active:
                ready = next((k for k in remaining if downloads[k].done()), None)
                if ready is not None:
                    return ready
            waiting: list[asyncio.Future[Any]] = [
                downloads[k] for k in remaining if not downloads[k].done()
            ]
            stop = asyncio.ensure_future(self.stopping.wait())
            try:
                # Wake on any finished download or the stop, and now and then to notice an
                # outage of the image hosts.
                await asyncio.wait(
                    [*waiting, stop], timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stop.cancel()

    async def _fetch(self, media_id: str, variant: str) -> FetchedImage | MediaError | None:
        """One image, waiting out its host's outages; ``None`` when stopped while waiting.

        Only a permanent failure (404/410, not an image, too large, a bomb, a refused URL) is a
        :class:`MediaError`; transient ones never fail a combination.
        """
        media = self._media[media_id]
        with bind(media_id=media_id):
            try:
                image = await self._image_hosts.call(
                    lambda: self.fetcher.fetch(self.project_id, media, variant),
                    what=f"image {media_id} ({variant})",
                )
            except Stopped:
                return None
            except MediaError as exc:
                log.warning("media unavailable", variant=variant, reason=str(exc))
                self.events.emit(
                    "media_ready", self.project_id, media_id, variant=variant, error=str(exc)
                )
                return exc
            self.events.emit(
                "media_ready",
                self.project_id,
                media_id,
                variant=variant,
                downloaded=image.downloaded,
                error=None,
            )
            return image

    async def _fail_media(self, row: ComboRow, reason: str) -> None:
        body = self._body(
            row,
            status="failed",
            result={"error": "media_unavailable", "reasons": [reason]},
            user_prompt=row.plan.user_prompt,
            seconds=0.0,
        )
        await self.store.run(self.store.record_attempt, row.key, [reason])
        await self.store.run(self.store.mark_ready, row.key, body, "failed")
        await self._report_q.put(row.key)

    # -- inference + QA -------------------------------------------------------------------------

    async def _inference_slot(self) -> None:
        while True:
            row = await self._infer_q.get()
            if row is None:
                return
            if self.stopping.is_set():
                continue  # queued rows go back untouched: still pending in the store
            with bind(media_id=row.key.media_id, analysis_id=row.key.analysis_id):
                try:
                    await self._ensure_status("processing")
                except Stopped:
                    continue
                if self.stopping.is_set():
                    continue  # stopped while waiting for the status: no new inference
                await self._infer_one(row)

    async def _ask(self, request: InferenceRequest, row: ComboRow) -> InferenceResult | None:
        """The engine's answer, trying a failed request again (``engine_retries``) without
        using a QA attempt. ``None`` when it was aborted by the drain (the row stays pending).

        An exception of the engine (:class:`~goflow_gpu.errors.EngineError`: it is dead)
        propagates and stops the job.
        """
        key = row.key
        result: InferenceResult | None = None
        for engine_try in range(self.options.engine_retries + 1):
            if self._aborting or (engine_try and self.stopping.is_set()):
                return None
            if engine_try and not await sleep_unless_stopped(0.5 * engine_try, self.stopping):
                return None
            self.events.emit(
                "inference_started",
                key.project_id,
                key.media_id,
                key.analysis_id,
                attempt=row.attempts + 1,
            )
            future = asyncio.ensure_future(self.engine.infer(request))
            self._in_flight.add(future)
            try:
                result = await future
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._aborting and (current is None or not current.cancelling()):
                    return None  # aborted by the drain timeout, not by our own cancellation
                raise
            finally:
                self._in_flight.discard(future)
            self.events.emit(
                "inference_finished",
                key.project_id,
                key.media_id,
                key.analysis_id,
                attempt=row.attempts + 1,
                prompt_tokens=result.prompt_tokens,
                cached_tokens=result.cached_tokens,
                generated_tokens=result.generated_tokens,
                error=result.error,
            )
            if result.error is None:
                return result
            if self._aborting or self.stopping.is_set() or result.finish_reason == "abort":
                return None
            log.warning(
                "engine failed a request", error=result.error[:500], engine_try=engine_try + 1
            )
        return result

    async def _infer_one(self, row: ComboRow) -> None:
        image = await self.store.run(
            self.store.media, self.project_id, row.key.media_id, row.plan.variant
        )
        if image is None or image.path is None or image.width is None or image.height is None:
            raise StateError(f"image of {row.key} vanished from the cache")
        original = (image.width, image.height)
        rendered = RenderedPrompt(
            slug=row.plan.slug,
            version=row.plan.spec_version,
            variant=row.plan.variant,
            system_prompt=row.plan.system_prompt,
            user_prompt=row.plan.user_prompt,
            json_schema=row.plan.json_schema,
            max_tokens=row.plan.max_tokens,
            temperature=row.plan.temperature,
        )
        rules = QARules.model_validate(row.plan.qa_rules)
        facts: dict[str, Any] | None = None
        max_tokens = row.plan.max_tokens
        # A resumed combination whose tries were all spent before a crash keeps its last reasons;
        # one with tries left is re-asked with them, as it would have been without the stop.
        last = row.reasons[-1] if row.reasons else ["no attempt was made"]
        verdict = QAVerdict(passed=False, result=None, reasons=list(last))
        user_prompt = row.plan.user_prompt
        if row.attempts and row.reasons:
            user_prompt = retry_user_prompt(row.plan.user_prompt, row.reasons[-1])
        attempts_left = self.options.qa_retries + 1 - row.attempts
        started = time.monotonic()
        totals = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}
        raw_text = ""
        asked = False
        while attempts_left > 0:
            if asked and self.stopping.is_set():
                log.debug("draining: QA re-ask left for the next start", attempts=row.attempts)
                return  # stays pending with its attempts recorded
            asked = True
            request = InferenceRequest(
                request_id=f"{row.key.media_id}:{row.key.analysis_id}:{row.attempts + 1}",
                image_path=image.path,
                system_prompt=row.plan.system_prompt,
                user_prompt=user_prompt,
                json_schema=row.plan.json_schema,
                sampling=Sampling(max_tokens=max_tokens, temperature=row.plan.temperature),
                group_key=(row.key.media_id, row.plan.variant),
                logprobs=bool(rules.logprob_confidence),
            )
            result = await self._ask(request, row)
            if result is None:
                return  # aborted or stopped: no attempt used, the row stays pending
            for name in totals:
                totals[name] += getattr(result, name) or 0
            if result.error is not None:
                await self._engine_failed(
                    row, result.error, user_prompt, time.monotonic() - started
                )
                await self._report_q.put(row.key)
                return
            attempts_left -= 1
            raw_text = result.text
            key = row.key
            try:
                if rules.pixel_facts and facts is None:
                    # After the answer, not before the ask: a thread hop before it would let
                    # other slots overtake and break the media-major order of the asks.
                    facts = await self._pixel_facts(image.path, rules)
                verdict = judge(
                    result,
                    rendered,
                    rules,
                    original_size=original,
                    min_pixels=self.options.min_pixels,
                    max_pixels=self.options.max_pixels,
                    facts=facts,
                )
            except Exception as exc:  # one odd answer must not stop the job
                # Deterministic decoding would give the same answer after a restart: a crash
                # here would repeat forever. The answer fails QA with the reason instead.
                log.exception("qa could not check an answer", slug=row.plan.slug)
                verdict = QAVerdict(
                    passed=False, result=None, reasons=[f"qa error: {type(exc).__name__}"]
                )
            self.events.emit(
                "qa_verdict",
                key.project_id,
                key.media_id,
                key.analysis_id,
                passed=verdict.passed,
                attempt=row.attempts + 1,
                final=verdict.passed or attempts_left == 0,
            )
            if verdict.passed:
                break
            attempts = await self.store.run(
                self.store.record_attempt, row.key, verdict.reasons, metrics=None
            )
            row.attempts = attempts
            log.debug("qa failed", attempt=attempts, reasons=verdict.reasons[:5])
            if attempts_left > 0:
                user_prompt = retry_user_prompt(row.plan.user_prompt, verdict.reasons)
                if result.finish_reason == "length":
                    # Cut off at the budget: the same budget would cut it off again.
                    max_tokens = max(max_tokens, rules.retry_max_tokens or 2 * row.plan.max_tokens)
        seconds = time.monotonic() - started
        metrics: dict[str, Any] = {"inference_seconds": seconds, **totals}
        if verdict.passed and verdict.result is not None:
            body = self._body(row, "completed", verdict.result, user_prompt, seconds)
            await self.store.run(self.store.mark_ready, row.key, body, "completed", metrics=metrics)
            log.debug("analysis passed qa", slug=row.plan.slug, seconds=round(seconds, 3))
        else:
            failure = {
                "error": "qa_failed",
                "reasons": verdict.reasons[:20],
                "attempts": row.attempts,
                "raw_output": raw_text[:2000],
            }
            body = self._body(row, "failed", failure, user_prompt, seconds)
            await self.store.run(self.store.mark_ready, row.key, body, "failed", metrics=metrics)
            log.warning("analysis failed qa", slug=row.plan.slug, reasons=verdict.reasons[:5])
        await self._report_q.put(row.key)

    async def _pixel_facts(self, path: Path, rules: QARules) -> dict[str, Any]:
        """The image's pixel facts the rules name, computed once per image (off the loop)."""
        if self._facts is None:
            from goflow_gpu.prompts.pixels import FactCache  # numpy: only when a spec needs it

            self._facts = FactCache()
        names = rules.pixel_facts.values()
        known = self._facts.cached(path, names)
        if known is None:
            known = await asyncio.to_thread(self._facts.get, path, names)
        return known

    async def _engine_failed(
        self, row: ComboRow, error: str, user_prompt: str, seconds: float
    ) -> None:
        """The engine kept failing this one request: a visible failure, not a QA verdict."""
        failure = {
            "error": "engine_error",
            "reasons": [error[:1000]],
            "engine_tries": self.options.engine_retries + 1,
        }
        body = self._body(row, "failed", failure, user_prompt, seconds)
        await self.store.run(
            self.store.mark_ready, row.key, body, "failed", metrics={"inference_seconds": seconds}
        )
        log.error("engine failed this request every time", slug=row.plan.slug, error=error[:500])

    def _body(
        self,
        row: ComboRow,
        status: ResultStatus,
        result: dict[str, Any],
        user_prompt: str,
        seconds: float,
    ) -> dict[str, Any]:
        payload = dict(result)
        payload["processing_time_seconds"] = round(seconds, 3)
        return ResultBody(
            model_used=self.engine.model_label,
            user_prompt_used=user_prompt,
            system_prompt_used=row.plan.system_prompt,
            status=status,
            analysis_result=payload,
        ).wire()

    # -- reporting ------------------------------------------------------------------------------

    async def _poster(self) -> None:
        while True:
            key = await self._report_q.get()
            try:
                if key is None:
                    return
                with bind(media_id=key.media_id, analysis_id=key.analysis_id):
                    await self._post(key)
            finally:
                self._report_q.task_done()

    async def _post(self, key: ComboKey) -> None:
        """POST one stored verdict until the backend accepts or definitely refuses it."""
        self._check_ids(key)
        if self._post_cutoff.is_set():
            return  # draining past the drain timeout: left ``ready`` for the next start
        try:
            await self._ensure_status("processing")
        except Stopped:
            return
        row = await self.store.run(self.store.combo, key)
        if row.state in TERMINAL_STATES:
            return
        assert row.body is not None
        body = ResultBody.model_validate(row.body)
        # A crash or lost answer after an earlier intent: that POST may have landed.
        unknown = row.state == "posting"
        ids = (self._wire(key.project_id), self._wire(key.media_id), self._wire(key.analysis_id))

        async def one_round() -> int:
            nonlocal unknown
            await self.store.run(self.store.mark_posting, key)  # durable before the POST
            self.events.emit("post_started", *_ids(key))
            try:
                return await self.client.post_result(*ids, body)
            except ApiError as exc:
                # A refused connect or a 429 delivered nothing; a timeout, a cut or a 5xx may have.
                unknown = unknown or exc.prior_attempt_unknown
                if isinstance(exc, TransientError):
                    self._posted(row, exc.status, "retry")
                raise

        try:
            code = await self._backend.call(one_round, what="POST result")
        except Stopped:
            log.debug("draining: result left for the next start", slug=row.plan.slug)
            return  # stays ``posting``: a duplicate answer next time means it landed
        except AuthenticationError:
            raise
        except ApiError as exc:
            await self._settle_result(row, exc, prior_unknown=unknown)
            return
        await self.store.run(self.store.mark_reported, key, code)
        self._posted(row, code, "accepted")
        log.debug("result reported", slug=row.plan.slug, status=row.result_status, http_status=code)

    async def _settle_result(self, row: ComboRow, exc: ApiError, *, prior_unknown: bool) -> None:
        """A result POST got a definite answer that is not a success (see answers.TABLE)."""
        key = row.key
        status = exc.status
        detail = exc.detail_text[:1000] or str(exc)[:1000]
        if status is None:
            # The client refused to send it (an unencodable body): nothing can fix that.
            await self.store.run(self.store.mark_rejected, key, None, detail)
            log.error("result refused before sending", slug=row.plan.slug, detail=detail)
            self._posted(row, None, "rejected")
            return
        decision = decide("result", status, exc.detail_text, prior_unknown=prior_unknown)
        if decision is Decision.LANDED:
            await self.store.run(
                self.store.mark_reported, key, status, f"duplicate after unknown outcome: {detail}"
            )
            log.debug("result already accepted earlier", slug=row.plan.slug, http_status=status)
            self._posted(row, status, "duplicate")
            return
        await self.store.run(self.store.mark_rejected, key, status, detail)
        log.error("result refused", slug=row.plan.slug, http_status=status, detail=detail)
        self._posted(row, status, "rejected")

    def _posted(self, row: ComboRow, http_status: int | None, outcome: str) -> None:
        self.events.emit(
            "post_finished",
            *_ids(row.key),
            result_status=row.result_status,
            http_status=http_status,
            outcome=outcome,
        )

    def _check_ids(self, key: ComboKey) -> None:
        """Refuse a call whose ids are not a combination of this job's manifest (a bug)."""
        if (
            key.project_id != self.project_id
            or key.media_id not in self._media
            or key.analysis_id not in self._analysis_ids
        ):
            log.error("refusing a call for a combination not in this job", key=str(key))
            raise StateError(f"combination {key} is not part of job {self.project_id}")

    def _wire(self, canonical: str) -> str:
        """An id as the server spelled it in the manifest (paths use the server's spelling)."""
        return self._spelling.get(canonical, canonical)

    # -- the end --------------------------------------------------------------------------------

    async def _finish(self, started: float) -> JobOutcome:
        rows = self.store.combos(self.project_id)
        counts = Outcomes.of_rows(rows)
        seconds = time.monotonic() - started
        if counts.left:
            return self._paused(counts, seconds)
        if self.stopping.is_set():
            # Bounded drain: completed and the report (up to a minute with retries) wait for
            # the next start, which finds every combination settled and sends them first.
            return self._paused(counts, seconds)
        try:
            await self._ensure_status("completed")
            await self._send_report(rows)
        except Stopped:
            return self._paused(counts, seconds)
        self.store.close_job(self.project_id)
        if not self.options.keep_media:
            # The job is done: its cached images only take disk space from now on.
            await asyncio.to_thread(self.fetcher.forget, self.project_id)
        log.info(
            "job completed",
            combinations=counts.total,
            completed=counts.completed,
            failed=counts.failed,
            seconds=round(seconds, 2),
            per_second=round(counts.total / seconds, 2) if seconds > 0 else None,
        )
        return self._ended(counts, seconds, closed=True)

    def _paused(self, counts: Outcomes, seconds: float) -> JobOutcome:
        log.info("job paused", left=counts.left)
        return self._ended(counts, seconds, closed=False)

    def _ended(self, counts: Outcomes, seconds: float, *, closed: bool) -> JobOutcome:
        self.events.emit(
            "job_finished",
            self.project_id,
            closed=closed,
            completed=counts.completed,
            failed=counts.failed,
        )
        return JobOutcome.of(self.project_id, counts, seconds, closed=closed)

    async def _send_report(self, rows: list[ComboRow]) -> None:
        job = self.store.job(self.project_id)
        assert job is not None
        if job.report == "sent":
            return
        if job.report == "intent" and job.report_body:
            # Resend exactly what an interrupted run built; a rebuilt one would count the
            # downtime in processing_time_minutes.
            report = ReportBody.model_validate(job.report_body)
            resends = self.store.mark_report(self.project_id, "intent")
        else:
            wall = time.time() - job.created_at
            report = build_report(
                self.manifest, rows, wall_seconds=wall, model=self.engine.model_label
            )
            resends = self.store.mark_report(self.project_id, "intent", report.wire())
        self._check_resends(resends, "the report")
        pid = self._wire(self.project_id)
        try:
            await self._put(lambda: self.client.put_report(pid, report), "PUT report")
        except ApiError as exc:
            self._settle_put("report", "the report", exc)
        self.store.mark_report(self.project_id, "sent")
        log.info("report sent", summary=report.report.summary)
        self.events.emit("report_sent", self.project_id)


def _spellings(raw: dict[str, Any]) -> dict[str, str]:
    """Canonical (lower-case) id -> the id as the manifest spells it."""
    out: dict[str, str] = {}
    project = raw.get("project")
    if isinstance(project, dict) and isinstance(project.get("id"), str):
        out[project["id"].lower()] = project["id"]
    for section in ("media", "analyses"):
        for item in raw.get(section) or []:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                out[item["id"].lower()] = item["id"]
    return out


def _ids(key: ComboKey) -> tuple[str, str, str]:
    return key.project_id, key.media_id, key.analysis_id
