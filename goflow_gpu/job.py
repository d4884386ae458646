"""One job, from its stored manifest to its closed report: the streaming pipeline.

Stages, joined by bounded queues so that downloads, inference, QA and reporting overlap and the
engine never waits for HTTP::

    feeder ──(media-major)──> infer queue ──> N inference slots ──(QA)──> report queue ──> M posters
      │  fetches each (media, variant) once, concurrently                 │
      └─ a media item that cannot be fetched fails its combinations ──────┘

- The feeder walks the plan media-major (all analyses of one image together: vLLM's prefix cache
  then prefills each image once), awaiting each image's download (downloads run ahead,
  bounded by the fetcher).
- An inference slot asks the engine, checks the answer (QA) and re-asks with the QA reasons
  appended until it passes or the retries are spent; the verdict and the exact POST body are
  stored (``ready``) before the combination goes to the report queue.
- A poster records the POST intent (``posting``), POSTs, and records the outcome. Transient
  failures past the client's retries put the combination back in the queue after a pause: a
  combination is POSTed until the backend accepts or refuses it.
- Status ``processing`` is sent (once, durably) right before the first inference request or the
  first result POST, whichever comes first; ``completed`` and then the report once every
  combination is ``reported`` or ``rejected``.

Draining (SIGTERM): the feeder stops, in-flight requests finish and are reported, the job stays
open in the state store and is resumed by the next start.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from goflow_gpu.client import GoFlowClient
from goflow_gpu.engines.base import Engine, InferenceRequest, Sampling
from goflow_gpu.errors import (
    DuplicateSubmission,
    GoFlowError,
    InvalidRequestError,
    MediaError,
    NotFoundError,
    StateError,
    TransientError,
    UnprocessableError,
)
from goflow_gpu.events import Events
from goflow_gpu.logs import bind, get_logger
from goflow_gpu.media import FetchedImage, MediaFetcher
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
from goflow_gpu.store import TERMINAL_STATES, ComboKey, ComboRow, Store

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
    repost_pause: float = 5.0
    max_post_rounds: int = 4  # rounds of the client's retries before a POST is given up
    keep_media: bool = False  # keep a closed job's cached images


@dataclass
class JobOutcome:
    """What happened to one job in this run."""

    project_id: str
    closed: bool
    total: int
    completed: int
    failed: int
    seconds: float
    abandoned: bool = False  # the backend no longer knows the project


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
    ) -> None:
        self.store = store
        self.client = client
        self.engine = engine
        self.fetcher = fetcher
        self.project_id = project_id
        self.options = options
        self.stopping = stopping
        self.events = events or Events()
        job = store.job(project_id)
        if job is None:
            raise StateError(f"job {project_id} is not in the state store")
        self.manifest: Manifest = parse_manifest(job.manifest)
        self._media = {m.id: m for m in self.manifest.media}
        self._processing_lock = asyncio.Lock()
        self._infer_q: asyncio.Queue[ComboRow | None] = asyncio.Queue(
            maxsize=max(2, 2 * options.inference_slots)
        )
        self._report_q: asyncio.Queue[ComboKey | None] = asyncio.Queue()
        self._fatal: BaseException | None = None

    # -- status -------------------------------------------------------------------------------

    async def _ensure_status(self, status: ProjectStatus) -> None:
        """Send a project status at most once, recording intent before and success after."""
        async with self._processing_lock:
            job = self.store.job(self.project_id)
            assert job is not None
            phase = job.status_processing if status == "processing" else job.status_completed
            if phase == "sent":
                return
            if status == "completed" and job.status_processing != "sent":
                await self._send_status("processing")
            await self._send_status(status)

    async def _send_status(self, status: ProjectStatus) -> None:
        self.store.mark_status(self.project_id, status, "intent")
        await self.client.set_status(self.project_id, status)
        self.store.mark_status(self.project_id, status, "sent")
        log.info("project status sent", status=status)
        self.events.emit("status_sent", self.project_id, status=status)

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
            sampler = asyncio.create_task(self._sample_queues(), name="queue-sampler")
            try:
                await self._supervise(feeder, slots, posters)
            finally:
                for task in [feeder, *slots, *posters, sampler]:
                    task.cancel()
                await asyncio.gather(feeder, *slots, *posters, sampler, return_exceptions=True)
                self._emit_queue_depths()
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
            groups.setdefault((row.key.media_id, row.variant), []).append(row)
        downloads = {
            key: asyncio.create_task(self._fetch(*key), name=f"fetch-{key[0][:8]}-{key[1]}")
            for key in groups
        }
        try:
            for key, rows in groups.items():
                if self.stopping.is_set():
                    log.info("draining: no new inference requests", left=len(rows))
                    return
                fetched = await downloads[key]
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

    async def _fetch(self, media_id: str, variant: str) -> FetchedImage | MediaError:
        with bind(media_id=media_id):
            try:
                image = await self.fetcher.fetch(self.project_id, self._media[media_id], variant)
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
            user_prompt=row.user_prompt,
            seconds=0.0,
        )
        self.store.record_attempt(row.key, [reason])
        self.store.mark_ready(row.key, body, "failed")
        await self._report_q.put(row.key)

    # -- inference + QA -------------------------------------------------------------------------

    async def _inference_slot(self) -> None:
        while True:
            row = await self._infer_q.get()
            if row is None:
                return
            with bind(media_id=row.key.media_id, analysis_id=row.key.analysis_id):
                await self._ensure_status("processing")
                await self._infer_one(row)

    async def _infer_one(self, row: ComboRow) -> None:
        image = self.store.media(self.project_id, row.key.media_id, row.variant)
        if image is None or image.path is None or image.width is None or image.height is None:
            raise StateError(f"image of {row.key} vanished from the cache")
        original = (image.width, image.height)
        rendered = RenderedPrompt(
            slug=row.slug,
            version=row.spec_version,
            variant=row.variant,
            system_prompt=row.system_prompt,
            user_prompt=row.user_prompt,
            json_schema=row.json_schema,
            max_tokens=row.max_tokens,
            temperature=row.temperature,
        )
        rules = QARules.model_validate(row.qa_rules)
        user_prompt = row.user_prompt
        started = time.monotonic()
        totals = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}
        # A resumed combination whose tries were all spent before a crash keeps its last reasons.
        last = row.reasons[-1] if row.reasons else ["no attempt was made"]
        verdict = QAVerdict(passed=False, result=None, reasons=list(last))
        attempts_left = self.options.qa_retries + 1 - row.attempts
        raw_text = ""
        while attempts_left > 0:
            attempts_left -= 1
            request = InferenceRequest(
                request_id=f"{row.key.media_id}:{row.key.analysis_id}:{row.attempts + 1}",
                image_path=image.path,
                system_prompt=row.system_prompt,
                user_prompt=user_prompt,
                json_schema=row.json_schema,
                sampling=Sampling(max_tokens=row.max_tokens, temperature=row.temperature),
                group_key=(row.key.media_id, row.variant),
            )
            key = row.key
            self.events.emit(
                "inference_started",
                key.project_id,
                key.media_id,
                key.analysis_id,
                attempt=row.attempts + 1,
            )
            result = await self.engine.infer(request)
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
            for name in totals:
                totals[name] += getattr(result, name) or 0
            raw_text = result.text
            try:
                verdict = judge(
                    result,
                    rendered,
                    rules,
                    original_size=original,
                    min_pixels=self.options.min_pixels,
                    max_pixels=self.options.max_pixels,
                )
            except Exception as exc:  # one odd answer must not stop the job
                # Deterministic decoding would give the same answer after a restart: a crash
                # here would repeat forever. The answer fails QA with the reason instead.
                log.exception("qa could not check an answer", slug=row.slug)
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
            attempts = self.store.record_attempt(row.key, verdict.reasons, metrics=None)
            row.attempts = attempts
            log.info("qa failed", attempt=attempts, reasons=verdict.reasons[:5])
            if attempts_left > 0:
                user_prompt = retry_user_prompt(row.user_prompt, verdict.reasons)
        seconds = time.monotonic() - started
        metrics: dict[str, Any] = {"inference_seconds": seconds, **totals}
        if verdict.passed and verdict.result is not None:
            body = self._body(row, "completed", verdict.result, user_prompt, seconds)
            self.store.mark_ready(row.key, body, "completed", metrics=metrics)
            log.info("analysis passed qa", slug=row.slug, seconds=round(seconds, 3))
        else:
            failure = {
                "error": "qa_failed",
                "reasons": verdict.reasons[:20],
                "attempts": row.attempts,
                "raw_output": raw_text[:2000],
            }
            body = self._body(row, "failed", failure, user_prompt, seconds)
            self.store.mark_ready(row.key, body, "failed", metrics=metrics)
            log.warning("analysis failed qa", slug=row.slug, reasons=verdict.reasons[:5])
        await self._report_q.put(row.key)

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
            system_prompt_used=row.system_prompt,
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
        self._check_ids(key)
        await self._ensure_status("processing")
        row = self.store.combo(key)
        if row.state in TERMINAL_STATES:
            return
        unknown_before = row.state == "posting"  # a crash or lost answer after the intent
        self.store.mark_posting(key)
        rounds = row.post_attempts + 1  # this call's round, counted across restarts
        self.events.emit("post_started", *_ids(key))
        assert row.body is not None
        body = ResultBody.model_validate(row.body)
        try:
            code = await self.client.post_result(
                key.project_id, key.media_id, key.analysis_id, body
            )
        except DuplicateSubmission as exc:
            if unknown_before or exc.prior_attempt_unknown:
                self.store.mark_reported(key, 400, "duplicate after unknown outcome: accepted")
                log.info("result already accepted earlier", slug=row.slug)
                self._posted(row, 400, "duplicate")
            else:
                self.store.mark_rejected(key, 400, _detail(exc))
                log.error("result refused as duplicate", slug=row.slug, detail=_detail(exc))
                self._posted(row, 400, "rejected")
            return
        except (UnprocessableError, InvalidRequestError, NotFoundError) as exc:
            # exc.status is None when the client refused to send (an unencodable body).
            self.store.mark_rejected(key, exc.status, _detail(exc))
            log.error("result refused", slug=row.slug, status=exc.status, detail=_detail(exc))
            self._posted(row, exc.status, "rejected")
            return
        except TransientError as exc:
            if rounds >= self.options.max_post_rounds:
                # Every retry of every round failed in transit: a visible failure (contract:
                # "individual failures are acceptable but must be visible"), so the job can end.
                detail = f"gave up after {rounds} rounds of retries: {exc.cause}: {exc}"
                self.store.mark_rejected(key, exc.status, detail[:1000])
                log.error("result post failed for good", slug=row.slug, rounds=rounds)
                self._posted(row, exc.status, "rejected")
                return
            # The client's retries are spent and the outcome is unknown: another round after a
            # pause. When draining, leave it for the next start (it stays ``posting``, so a
            # duplicate-400 then counts as accepted).
            log.warning(
                "result post failed, will retry",
                slug=row.slug,
                reason=exc.cause,
                round=rounds,
                pause=self.options.repost_pause,
                draining=self.stopping.is_set(),
            )
            self._posted(row, exc.status, "retry")
            if not self.stopping.is_set():
                await asyncio.sleep(self.options.repost_pause)
                self._report_q.put_nowait(key)
            return
        self.store.mark_reported(key, code)
        self._posted(row, code, "accepted")
        log.info("result reported", slug=row.slug, status=row.result_status, http_status=code)

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
            or key.analysis_id not in {a.id for a in self.manifest.analyses}
        ):
            log.error("refusing a call for a combination not in this job", key=str(key))
            raise StateError(f"combination {key} is not part of job {self.project_id}")

    # -- the end --------------------------------------------------------------------------------

    async def _finish(self, started: float) -> JobOutcome:
        rows = self.store.combos(self.project_id)
        completed = sum(1 for r in rows if r.state == "reported" and r.result_status == "completed")
        left = [r for r in rows if r.state not in TERMINAL_STATES]
        seconds = time.monotonic() - started
        if left:
            log.info("job paused", left=len(left))
            failed = len(rows) - completed - len(left)
            self.events.emit(
                "job_finished", self.project_id, closed=False, completed=completed, failed=failed
            )
            return JobOutcome(self.project_id, False, len(rows), completed, failed, seconds)
        await self._ensure_status("completed")
        job = self.store.job(self.project_id)
        assert job is not None
        if job.report != "sent":
            if job.report == "intent" and job.report_body:
                # Resend exactly what an interrupted run built; a rebuilt one would count the
                # downtime in processing_time_minutes.
                report = ReportBody.model_validate(job.report_body)
            else:
                wall = time.time() - job.created_at
                report = build_report(
                    self.manifest, rows, wall_seconds=wall, model=self.engine.model_label
                )
                self.store.mark_report(self.project_id, "intent", report.wire())
            await self.client.put_report(self.project_id, report)
            self.store.mark_report(self.project_id, "sent")
            log.info("report sent", summary=report.report.summary)
            self.events.emit("report_sent", self.project_id)
        self.store.close_job(self.project_id)
        if not self.options.keep_media:
            # The job is done: its cached images only take disk space from now on.
            await asyncio.to_thread(self.fetcher.forget, self.project_id)
        failed = len(rows) - completed
        log.info(
            "job completed",
            combinations=len(rows),
            completed=completed,
            failed=failed,
            seconds=round(seconds, 2),
            per_second=round(len(rows) / seconds, 2) if seconds > 0 else None,
        )
        self.events.emit(
            "job_finished", self.project_id, closed=True, completed=completed, failed=failed
        )
        return JobOutcome(self.project_id, True, len(rows), completed, failed, seconds)


def _ids(key: ComboKey) -> tuple[str, str, str]:
    return key.project_id, key.media_id, key.analysis_id


def _detail(exc: GoFlowError) -> str:
    detail = getattr(exc, "detail", None)
    text = str(detail) if detail is not None else str(exc)
    return text[:1000]
