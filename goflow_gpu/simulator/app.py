"""The simulator: a strict GoFlow backend on aiohttp.web, with a job queue, images and faults.

Every call on a route (``next-job``, ``status``, ``result``, ``report``, ``media``) goes through
one wrapper that, in order: checks ``X-API-Key`` (401; not on media), adds the configured latency,
answers an open outage window of the route, draws this call's random fault for its route, applies
the faults that happen before the backend decides (429, 500, 503, reset, slow), runs the handler,
replaces an accepted answer by a fixed one (``accept=True``), and for accept-then-drop cuts the
connection after the handler has recorded its decision in the ledger. Each call is recorded in
``ledger.calls`` with the fault it got (``None`` when none).

Handlers check, in order: path UUIDs (422), that the project / media / analysis exist and belong
together (404), that the body is JSON (400), the body's fields (422), then answer a matching fixed
answer, then duplicates (400, wording set by ``duplicate_detail``); only then do they record.

Every kind of fault, with its ``ledger.calls`` fault label:

- random, per call, seeded (:mod:`~goflow_gpu.simulator.faults`, ``faults=``/``set_faults``):
  ``429`` (with Retry-After), ``500``, ``503``, ``reset`` (connection cut, nothing recorded),
  ``slow`` (answers after ``slow_seconds``), ``drop`` (recorded, then the connection is cut),
  and ``latency`` on every call;
- outage windows (:meth:`Simulator.add_outage`, label ``outage``): a route answers one error
  status, with or without Retry-After, for a while, once it has accepted N calls; outage calls
  do not consume a random-fault draw;
- fixed answers (:meth:`Simulator.fix_answer`, :meth:`Simulator.reject_result`, label
  ``fixed``): one route or one media x analysis answers a chosen error, a number of times or
  forever, either instead of recording or after recording (``accept``: "stored, then 409");
- media faults (``add_job(media_faults=...)``, label = the fault, see ``MEDIA_FAULTS``);
  they apply to scene jobs too;
- backend quirks: ``duplicate_detail`` (the duplicate-400 wording), ``upper_ids`` (manifests
  with upper-case ids; the ledger stays lower-case), :meth:`Simulator.reoffer` and
  ``reoffer_closed`` (a finished job handed out again), :meth:`Simulator.forget_project` (404s),
  :meth:`Simulator.revoke_key` (401s), :meth:`Simulator.add_raw_job` (bad manifests).

Scene jobs (``add_job(scenes=True)``) serve labelled scenes
(:func:`~goflow_gpu.simulator.images.labelled_scene`) as PNG instead of random JPEGs, so what
the worker reports can be graded against exact ground truth with :meth:`Simulator.grade`.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from email.utils import formatdate
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiohttp import web

from goflow_gpu.simulator import images
from goflow_gpu.simulator.faults import (
    ROUTES,
    FaultKind,
    FaultPlan,
    Faults,
    FaultSpec,
    parse_faults,
)
from goflow_gpu.simulator.jobs import SimJob, build_job, new_id
from goflow_gpu.simulator.ledger import Ledger
from goflow_gpu.simulator.scripted import (
    FixedAnswer,
    Outage,
    parse_answer,
    parse_outage,
    status_phrase,
)
from goflow_gpu.simulator.validation import (
    Problem,
    check_path_uuids,
    check_report_body,
    check_result_body,
    check_status_body,
    parse_json,
)

if TYPE_CHECKING:
    from goflow_gpu.evaluation.scenes import GradeSummary

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API = "/api/v1/agent"
# The ledger event a handler recorded (the wrapper marks it undelivered when the answer is lost).
_EVENT: web.RequestKey[dict[str, Any]] = web.RequestKey("goflow_sim_event")
# A media item's fault, shown in ledger.calls instead of the (absent) route fault.
_NOTE: web.RequestKey[str] = web.RequestKey("goflow_sim_note", str)
# The index of a matching ``accept`` fixed answer, applied if the handler accepts the call.
_ACCEPT_FIX: web.RequestKey[int] = web.RequestKey("goflow_sim_accept_fix", int)
_CHUNK = bytes(1024 * 1024)


def _detail(status: int, detail: str | list[Problem], **headers: str) -> web.Response:
    return web.json_response({"detail": detail}, status=status, headers=headers or None)


def _abort(request: web.Request) -> web.Response:
    """Cut the connection without an answer; the returned response is never written."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=204)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _json_body(request: web.Request) -> tuple[Any, web.Response | None]:
    text = await request.text()
    try:
        return parse_json(text), None
    except ValueError as exc:
        return None, _detail(400, f"request body is not valid JSON: {exc}")


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes and wrong methods answer JSON like the backend, not aiohttp's text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _detail(exc.status, exc.reason)


class Simulator:
    """A strict, in-process GoFlow backend (see ``goflow-api.md``) for tests, demos and benches.

    ``seed`` makes ids and images reproducible; ``faults`` (drawn with ``faults.seed``) injects
    failures per route; ``latency`` seconds are added to every call; pictures have their long
    side within ``image_long_side``. ``duplicate_detail`` is the ``detail`` of the 400 for a
    result submitted twice (default: a sentence with "duplicate submission" and the ids);
    ``upper_ids`` serves manifests with upper-case client/project/media/analysis ids;
    ``reoffer_closed`` hands each job out once more right after its report was accepted.
    Scene jobs (``add_job(scenes=True)``) serve labelled scenes and are graded by :meth:`grade`.
    Outage windows and fixed answers are added with :meth:`add_outage` and :meth:`fix_answer`.
    Use as ``async with Simulator(key) as sim:`` or :meth:`start` / :meth:`stop`; from sync
    code, wrap it in a ``SimulatorThread``.
    """

    def __init__(
        self,
        api_key: str,
        *,
        seed: int = 0,
        faults: Faults | None = None,
        latency: float = 0.0,
        image_long_side: tuple[int, int] = (480, 1024),
        duplicate_detail: str | None = None,
        upper_ids: bool = False,
        reoffer_closed: bool = False,
    ) -> None:
        if not api_key:
            raise ValueError("the simulator needs a non-empty API key to check callers against")
        low, high = image_long_side
        if not 16 <= low <= high:
            raise ValueError(
                f"image_long_side={image_long_side} must be (low, high), 16 <= low <= high"
            )
        if latency < 0:
            raise ValueError(f"latency={latency} must not be negative")
        self._api_key = api_key.encode()
        self._revoked = False
        self._seed = seed
        self._ids = random.Random(seed)
        self._receipts = random.Random(f"{seed}:receipts")
        self._plan = FaultPlan(faults)
        self.latency = latency
        self.image_long_side = image_long_side
        self.ledger = Ledger()
        self.duplicate_detail = duplicate_detail
        self.upper_ids = upper_ids
        self.reoffer_closed = reoffer_closed
        self._queue: deque[_Offer | _Raw] = deque()
        self._projects: dict[str, SimJob] = {}
        self._images: dict[tuple[str, str], bytes] = {}
        # Media of scene jobs, and their scenes once drawn; kept past forget_project so grading
        # still works.
        self._scene_media: set[str] = set()
        self._scenes: dict[str, images.LabelledScene] = {}
        self._outages: list[Outage] = []
        self._answers: list[FixedAnswer] = []
        self._accepted: dict[str, int] = dict.fromkeys(ROUTES, 0)
        self._reoffered: set[str] = set()
        self._jobs_made = 0
        self._client = {"id": new_id(self._ids), "slug": "sim-client", "name": "Simulated Client"}
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self.app = self._build_app()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        if self._base_url is None:
            raise RuntimeError("the simulator is not started: call start() first")
        return self._base_url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already started")
        # Short shutdown: slow-fault handlers may be sleeping; stop() should not wait for them.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        self._base_url = f"http://{_reachable(host)}:{runner.addresses[0][1]}"
        return self._base_url

    async def stop(self) -> None:
        """Close the server; the ledger stays readable."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- test controls -----------------------------------------------------------------------

    def add_job(
        self,
        media: int = 3,
        analyses: int = 4,
        *,
        slugs: list[str] | None = None,
        media_faults: dict[int, str] | None = None,
        scenes: bool = False,
    ) -> dict[str, Any]:
        """Queue a generated job and return its manifest exactly as next-job will serve it.

        ``analyses`` takes the first N of ``ANALYSIS_TYPES`` (repeating with ``-2`` suffixes past
        25) unless ``slugs`` names them. ``media_faults`` maps a media index to one of
        ``MEDIA_FAULTS``; it applies to both variants of that item. With ``upper_ids`` the
        manifest's ids are upper case (the media URLs keep the lower-case ones).

        With ``scenes`` every media item is the labelled scene of :meth:`scene_for`, served as
        PNG (lossless, so its flat colours stay exact; URLs and filenames end in ``.png``) in
        the scene's own size, not ``image_long_side``; the greyscale variant is its mode-L copy.
        Grade what was reported with :meth:`grade`.
        """
        self._jobs_made += 1
        job = build_job(
            self._ids,
            number=self._jobs_made,
            client=self._client,
            base_url=self.base_url,
            media=media,
            analyses=analyses,
            slugs=slugs,
            media_faults=media_faults,
            scenes=scenes,
        )
        if scenes:
            self._scene_media.update(item["id"] for item in job.manifest["media"])
        self._projects[job.project_id] = job
        self._queue.append(_Offer(job, self.upper_ids))
        return _served(job, upper=self.upper_ids)

    def add_raw_job(self, raw: Any) -> None:
        """Queue any JSON value as the next next-job body (for bad-manifest tests).

        The backend does not know raw jobs: calls about their project answer 404.
        """
        self._queue.append(_Raw(raw))

    def reject_result(
        self, media_id: str, analysis_id: str, status: int = 422, detail: str = "rejected"
    ) -> None:
        """Answer every valid POST of this media x analysis with ``status`` (400 or 422) and
        ``detail``, as a backend whose stricter validation refuses that one result.

        A shortcut for ``fix_answer("result", status, detail, media_id=..., analysis_id=...)``.
        """
        if status not in (400, 422):
            raise ValueError(f"reject_result: status must be 400 or 422, got {status}")
        self.fix_answer("result", status, detail, media_id=media_id, analysis_id=analysis_id)

    def add_outage(
        self,
        route: str,
        seconds: float,
        *,
        after: int = 0,
        status: int = 503,
        retry_after: str | None = None,
    ) -> None:
        """Take ``route`` down for ``seconds`` once it has accepted ``after`` calls.

        The window opens at the first call on the route that arrives once ``after`` calls were
        accepted there (for ``result``: results recorded in the ledger, any project; for the
        other routes: 2xx answers of the route's handler; ``after=0``: the first call), while no
        other window of the route is open (windows of one route never overlap; each opens
        once). For ``seconds`` of ``time.monotonic()`` time from then, every call on the route
        (after the key check; any project for ``media``) answers ``status`` with
        ``{"detail": "... (simulated outage)"}``, and with ``Retry-After`` only when
        ``retry_after`` is given: whole seconds such as ``"2"``, or ``"date"`` for the HTTP-date
        at which the window closes. See :attr:`outages` for when windows opened and close.
        """
        self._outages.append(
            Outage(route, seconds, after=after, status=status, retry_after=retry_after)
        )

    @property
    def outages(self) -> tuple[Outage, ...]:
        """Every outage window in the order added, as read-only snapshots (``opened_at`` and
        ``closes_at`` are ``time.monotonic()`` values, ``None`` until the window opens)."""
        return tuple(self._outages)

    def fix_answer(
        self,
        route: str,
        status: int,
        detail: str | None = None,
        *,
        media_id: str | None = None,
        analysis_id: str | None = None,
        times: int | None = None,
        accept: bool = False,
    ) -> None:
        """Answer matching calls on ``route`` with ``status`` (400-599) and ``{"detail": ...}``.

        ``detail`` defaults to the status's phrase with "(simulated fixed answer)". For
        ``result``, ``media_id`` / ``analysis_id`` narrow it to calls about that media /
        analysis (``media_id`` also works on ``media``); ids match case-insensitively. ``times``
        limits how many calls get it (``None``: all). It answers after the key check and the
        request's own validation (path UUIDs, 404s, JSON, fields: a malformed request still
        gets its real error) and before the backend records anything. With ``accept=True`` the
        call is handled normally instead (recorded in the ledger, as a backend that stored it)
        and an accepted (2xx) answer is replaced by the fixed one, e.g. "409 already exists";
        a call that was not accepted keeps its real answer and does not use up ``times``.
        When several fixed answers match a call, the one added last (and not used up) wins.
        """
        self._answers.append(
            FixedAnswer(
                route,
                status,
                detail,
                media_id=media_id,
                analysis_id=analysis_id,
                times=times,
                accept=accept,
            )
        )

    @property
    def answers(self) -> tuple[FixedAnswer, ...]:
        """Every fixed answer in the order added (read-only; ``used`` counts answers given)."""
        return tuple(self._answers)

    def reoffer(self, project_id: str, *, upper: bool = False) -> None:
        """Queue the manifest of this known job again, as the very next next-job answer (a
        backend handing out a finished job again); ``upper`` serves it with upper-case ids.
        Calls about it keep working: it is the same project."""
        job = self._project(project_id)
        if job is None:
            raise ValueError(f"reoffer: project {project_id} is not a job of this simulator")
        self._queue.appendleft(_Offer(job, upper))

    def forget_project(self, project_id: str) -> None:
        """From now on calls about this project answer 404, as for a project deleted upstream."""
        self._projects.pop(project_id.lower(), None)

    def set_faults(self, faults: Faults | None) -> None:
        """Replace the faults; the seeded draws start again from the beginning."""
        self._plan = FaultPlan(faults)

    def revoke_key(self) -> None:
        """From now on every API call answers 401."""
        self._revoked = True

    def restore_key(self) -> None:
        """Undo :meth:`revoke_key`: the original key works again (to test resuming after 401)."""
        self._revoked = False

    def check_job(self, manifest: dict[str, Any]) -> list[str]:
        """Shortcut for ``self.ledger.check_job(manifest)`` (ids of any case)."""
        return self.ledger.check_job(manifest)

    def scene_for(self, media_id: str) -> images.LabelledScene | None:
        """The labelled scene served for ``media_id`` (any case), or ``None`` when the item is
        not of a scene job. The key is ``"SEED:MEDIA_ID"``: same seed and id, same scene."""
        media_id = media_id.lower()
        if media_id not in self._scene_media:
            return None
        scene = self._scenes.get(media_id)
        if scene is None:
            scene = self._scenes[media_id] = images.labelled_scene(f"{self._seed}:{media_id}")
        return scene

    def grade(self, manifest: dict[str, Any]) -> dict[str, GradeSummary]:
        """Grade what the backend accepted for a scene job against its scenes' ground truth.

        Every media x analysis whose slug the scenes label
        (:func:`~goflow_gpu.evaluation.starter.scene_labels`; others are skipped) is graded by
        :func:`~goflow_gpu.evaluation.scenes.grade` with the result schema of the shipped
        catalog's spec: the first accepted result counts (the contract allows one per media x
        analysis), ``completed`` with its ``analysisResult``, ``failed`` or never accepted as
        no answer (not right). Media with a media fault are graded too: a worker that could not
        fetch the picture did not answer it. Summaries are keyed by slug in analysis order.
        Raises ``ValueError`` when ``manifest`` is not of a scene job of this simulator.
        """
        # Imported here: grading needs the catalog and scoring, serving a job does not.
        from goflow_gpu.evaluation.scenes import grade, summarise
        from goflow_gpu.evaluation.starter import scene_labels
        from goflow_gpu.prompts.catalog import load_catalog
        from goflow_gpu.prompts.result import result_schema

        project = str(manifest["project"]["id"]).lower()
        scenes: list[tuple[str, images.LabelledScene]] = []
        for item in manifest["media"]:
            scene = self.scene_for(str(item["id"]))
            if scene is None:
                raise ValueError(
                    f"grade: project {project} is not a scene job of this simulator "
                    "(queue one with add_job(scenes=True))"
                )
            scenes.append((str(item["id"]).lower(), scene))
        if not scenes:
            raise ValueError(f"grade: project {project} has no media to grade")
        labelled = scene_labels(scenes[0][1])  # the same slugs for every scene
        specs = load_catalog(None).specs
        grades = []
        for analysis in manifest["analyses"]:
            slug, aid = str(analysis["slug"]), str(analysis["id"]).lower()
            if slug not in labelled or slug not in specs:
                continue
            schema = result_schema(specs[slug].json_schema, specs[slug].qa)
            for mid, scene in scenes:
                first = (self.ledger.results.get((project, mid, aid)) or [{}])[0]
                completed = first.get("status") == "completed"
                result = first.get("analysisResult") if completed else None
                grades.append(grade(slug, result, scene, schema))
        return summarise(grades)

    # -- plumbing ----------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[_json_errors], client_max_size=8 * 1024 * 1024)
        api = self._api
        app.router.add_get(f"{API}/next-job", api("next-job", self._next_job))
        app.router.add_put(f"{API}/projects/{{project}}/status", api("status", self._status))
        app.router.add_post(
            f"{API}/projects/{{project}}/media/{{media}}/analysis/{{analysis}}",
            api("result", self._result),
        )
        app.router.add_put(f"{API}/projects/{{project}}/reports", api("report", self._report))
        app.router.add_get(
            "/media/{project}/{media}/{file}", api("media", self._media, needs_key=False)
        )
        app.router.add_get("/_sim/ledger", self._admin_ledger)
        app.router.add_post("/_sim/jobs", self._admin_jobs)
        app.router.add_post("/_sim/faults", self._admin_faults)
        app.router.add_post("/_sim/revoke-key", self._admin_revoke)
        app.router.add_get("/_sim/outages", self._admin_outages)
        app.router.add_post("/_sim/outages", self._admin_add_outage)
        app.router.add_post("/_sim/answers", self._admin_add_answer)
        app.router.add_post("/_sim/reoffer", self._admin_reoffer)
        return app

    def _key_ok(self, request: web.Request) -> bool:
        given = request.headers.get("X-API-Key", "").encode()
        return not self._revoked and hmac.compare_digest(given, self._api_key)

    def _api(self, route: str, handler: Handler, *, needs_key: bool = True) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            started = time.time()
            fault: FaultKind | None = None
            status: int | None = None
            label: str | None = None
            try:
                if needs_key and not self._key_ok(request):
                    status = 401
                    return _detail(401, "missing or invalid X-API-Key header")
                # Receive the whole request first, as a server does before it works on it: a
                # client that gives up during a slow answer must not take its body with it.
                await request.read()
                spec = self._plan.spec(route)
                if self.latency + spec.latency:
                    await asyncio.sleep(self.latency + spec.latency)
                outage = self._outage_answer(route)
                if outage is not None:
                    status, label = outage.status, "outage"
                    return outage
                fault = self._plan.draw(route)
                early = await self._early_fault(request, fault, spec)
                if early is not None:
                    status = None if fault == "reset" else early.status
                    return early
                if fault == "slow" and route == "next-job" and _client_gone(request):
                    # Nobody is left to receive the job: keep it queued rather than lose it.
                    return _abort(request)
                response = await handler(request)
                status = response.status
                accepted = 200 <= response.status < 300
                if accepted:
                    self._accepted[route] += 1
                event = request.get(_EVENT)
                if fault == "drop":
                    if event is not None:
                        event["delivered"] = False
                    return _abort(request)
                if event is not None and _client_gone(request):
                    event["delivered"] = False
                fix = request.get(_ACCEPT_FIX)
                if accepted and fix is not None and not self._answers[fix].exhausted:
                    response = self._use_answer(request, fix)
                    status = response.status
                return response
            finally:
                note = request.get(_NOTE)
                self.ledger.record_call(
                    route, request.method, request.path_qs, status, label or note or fault, started
                )

        return wrapped

    async def _early_fault(
        self, request: web.Request, fault: FaultKind | None, spec: FaultSpec
    ) -> web.Response | None:
        if fault == "429":
            retry = (
                formatdate(int(time.time()) + 2, usegmt=True)
                if spec.retry_after == "date"
                else spec.retry_after
            )
            return _detail(429, "too many requests (simulated)", **{"Retry-After": retry})
        if fault == "500":
            return _detail(500, "internal server error (simulated)")
        if fault == "503":
            return _detail(503, "service unavailable (simulated)")
        if fault == "reset":
            return _abort(request)
        if fault == "slow":
            await asyncio.sleep(spec.slow_seconds)
        return None

    def _project(self, project_id: str) -> SimJob | None:
        return self._projects.get(project_id.lower())

    def _outage_answer(self, route: str) -> web.Response | None:
        """The answer of the route's open outage window (opening a due one), or ``None``."""
        now = time.monotonic()
        mine = [i for i, o in enumerate(self._outages) if o.route == route]
        current = next((i for i in mine if self._outages[i].is_open(now)), None)
        if current is None:
            current = next(
                (
                    i
                    for i in mine
                    if self._outages[i].opened_at is None
                    and self._accepted[route] >= self._outages[i].after
                ),
                None,
            )
            if current is None:
                return None
            self._outages[current] = replace(self._outages[current], opened_at=now)
        outage = self._outages[current]
        self._outages[current] = outage = replace(outage, answered=outage.answered + 1)
        headers: dict[str, str] = {}
        if outage.retry_after == "date":
            wall_close = time.time() + outage.seconds - (now - (outage.opened_at or now))
            headers["Retry-After"] = formatdate(
                max(math.ceil(wall_close), int(time.time()) + 1), usegmt=True
            )
        elif outage.retry_after is not None:
            headers["Retry-After"] = outage.retry_after
        return _detail(
            outage.status, f"{status_phrase(outage.status)} (simulated outage)", **headers
        )

    def _fixed_answer(
        self,
        request: web.Request,
        route: str,
        media_id: str | None = None,
        analysis_id: str | None = None,
    ) -> web.Response | None:
        """A handler's hook after validation: the matching fixed answer, if it answers now.

        An ``accept`` one is only noted here; the wrapper applies it if the call is accepted.
        """
        for index in range(len(self._answers) - 1, -1, -1):
            if self._answers[index].matches(route, media_id, analysis_id):
                if self._answers[index].accept:
                    request[_ACCEPT_FIX] = index
                    return None
                return self._use_answer(request, index)
        return None

    def _use_answer(self, request: web.Request, index: int) -> web.Response:
        answer = self._answers[index]
        self._answers[index] = replace(answer, used=answer.used + 1)
        request[_NOTE] = "fixed"
        return _detail(answer.status, answer.text)

    # -- API handlers ------------------------------------------------------------------------

    async def _next_job(self, request: web.Request) -> web.Response:
        fixed = self._fixed_answer(request, "next-job")
        if fixed is not None:
            return fixed
        if not self._queue:
            return _detail(404, "no job available")
        item = self._queue.popleft()
        if isinstance(item, _Raw):
            project = item.raw.get("project") if isinstance(item.raw, dict) else None
            pid = project.get("id") if isinstance(project, dict) else None
            self.ledger.record_job(str(pid) if pid is not None else "")
            return web.json_response(item.raw)
        self.ledger.record_job(item.job.project_id)
        return web.json_response(_served(item.job, upper=item.upper))

    async def _project_put(
        self, request: web.Request, route: str, check: Callable[[Any], list[Any]]
    ) -> tuple[SimJob, Any] | web.Response:
        """The project of a status/report PUT and its checked body, or the error answer."""
        pid = request.match_info["project"]
        problems = check_path_uuids({"projectId": pid})
        if problems:
            return _detail(422, problems)
        job = self._project(pid)
        if job is None:
            return _detail(404, f"project {pid} not found")
        body, error = await _json_body(request)
        if error is not None:
            return error
        problems = check(body)
        if problems:
            return _detail(422, problems)
        fixed = self._fixed_answer(request, route)
        if fixed is not None:
            return fixed
        return job, body

    async def _status(self, request: web.Request) -> web.Response:
        checked = await self._project_put(request, "status", check_status_body)
        if isinstance(checked, web.Response):
            return checked
        job, body = checked
        request[_EVENT] = self.ledger.record_status(job.project_id, body["status"])
        return web.json_response({"status": body["status"]})

    async def _result(self, request: web.Request) -> web.Response:
        pid, mid, aid = (request.match_info[k] for k in ("project", "media", "analysis"))
        problems = check_path_uuids({"projectId": pid, "mediaId": mid, "analysisId": aid})
        if problems:
            return _detail(422, problems)
        job = self._project(pid)
        if job is None:
            return _detail(404, f"project {pid} not found")
        mid, aid = mid.lower(), aid.lower()
        if mid not in job.media_ids:
            return _detail(404, f"media {mid} not found in project {job.project_id}")
        if aid not in job.analysis_ids:
            return _detail(404, f"analysis {aid} not found in project {job.project_id}")
        body, error = await _json_body(request)
        if error is not None:
            return error
        problems = check_result_body(body)
        if problems:
            return _detail(422, problems)
        fixed = self._fixed_answer(request, "result", mid, aid)
        if fixed is not None:
            return fixed
        key = (job.project_id, mid, aid)
        if self.ledger.results.get(key):
            return _detail(
                400,
                self.duplicate_detail
                or f"duplicate submission: media {mid} x analysis {aid} of project "
                f"{job.project_id} was already submitted",
            )
        request[_EVENT] = self.ledger.record_result(*key, body)
        return web.json_response({"id": new_id(self._receipts), "status": "created"}, status=201)

    async def _report(self, request: web.Request) -> web.Response:
        checked = await self._project_put(request, "report", check_report_body)
        if isinstance(checked, web.Response):
            return checked
        job, body = checked
        request[_EVENT] = self.ledger.record_report(job.project_id, body)
        if self.reoffer_closed and job.project_id not in self._reoffered:
            self._reoffered.add(job.project_id)
            self._queue.appendleft(_Offer(job, self.upper_ids))
        return web.json_response({"id": new_id(self._receipts), "status": "created"}, status=201)

    # -- media -------------------------------------------------------------------------------

    async def _media(self, request: web.Request) -> web.StreamResponse:
        pid, mid, file = (request.match_info[k] for k in ("project", "media", "file"))
        mid = mid.lower()
        job = self._project(pid)
        suffix = job.suffix if job is not None else ".jpg"
        variant = file.removesuffix(suffix)
        if (
            job is None
            or mid not in job.media_ids
            or variant not in images.VARIANTS
            or (not file.endswith(suffix))
        ):
            return _detail(404, f"no such media: {request.path}")
        content_type = "image/png" if job.scenes else "image/jpeg"
        fixed = self._fixed_answer(request, "media", mid)
        if fixed is not None:
            return fixed
        fault = job.media_faults.get(mid)
        if fault is not None:
            request[_NOTE] = fault
        if fault == "404":
            return _detail(404, f"media {mid} not found")
        if fault == "html":
            return web.Response(body=images.HTML_PAGE, content_type="text/html")
        if fault == "corrupt":
            return web.Response(body=images.corrupt(mid), content_type="image/jpeg")
        if fault == "bomb":
            return web.Response(
                body=await asyncio.to_thread(images.bomb_png), content_type="image/png"
            )
        if fault == "oversized":
            return await self._oversized(request)
        if fault == "redirect-loop":
            hop = request.query.get("hop", "0")
            hop = str(int(hop) + 1) if hop.isdigit() else "1"
            return web.Response(status=302, headers={"Location": f"{request.path}?hop={hop}"})
        if fault == "slow":
            await asyncio.sleep(self._plan.spec("media").slow_seconds)
        body = await self.image_bytes(mid, variant)
        if fault == "truncated":
            return await self._truncated(request, body, content_type)
        return web.Response(body=body, content_type=content_type)

    async def image_bytes(self, media_id: str, variant: str) -> bytes:
        """The image served for one media item and variant (generated once, then cached): a
        JPEG, or a PNG of the scene for media of a scene job."""
        key = (media_id, variant)
        if key not in self._images:
            png = media_id in self._scene_media
            if png:
                scene = await asyncio.to_thread(self.scene_for, media_id)
                assert scene is not None  # a scene key exists
                picture = scene.image
            else:
                picture = await asyncio.to_thread(
                    images.render, f"{self._seed}:{media_id}", self.image_long_side
                )
            for name in images.VARIANTS:
                self._images[(media_id, name)] = await asyncio.to_thread(
                    images.encode, picture, name, png
                )
        return self._images[key]

    def image_size(self, media_id: str) -> tuple[int, int]:
        """``(width, height)`` of the pictures of ``media_id`` (both variants)."""
        scene = self.scene_for(media_id)
        if scene is not None:
            return scene.image.size
        return images.picture_size(f"{self._seed}:{media_id}", self.image_long_side)

    @staticmethod
    async def _truncated(
        request: web.Request, body: bytes, content_type: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        _abort(request)
        return response

    @staticmethod
    async def _oversized(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = images.OVERSIZED_BYTES
        await response.prepare(request)
        head = images.encode(images.render("oversized", (64, 64)), "optimised")
        sent = 0
        try:
            await response.write(head)
            sent = len(head)
            while sent < images.OVERSIZED_BYTES:
                chunk = _CHUNK[: images.OVERSIZED_BYTES - sent]
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
        except ConnectionError:
            pass  # the client stopped reading, as a careful client should: nothing to clean up
        return response

    # -- admin (no key: local control of the simulator) ---------------------------------------

    async def _admin_ledger(self, request: web.Request) -> web.Response:
        return web.json_response(self.ledger.snapshot())

    async def _admin_jobs(self, request: web.Request) -> web.Response:
        body, error = await _json_body(request)
        if error is not None:
            return error
        if not isinstance(body, dict):
            return _detail(422, 'body must be a JSON object like {"media": 3, "analyses": 4}')
        try:
            faults = {int(k): str(v) for k, v in dict(body.get("media_faults") or {}).items()}
            scenes = body.get("scenes", False)
            if not isinstance(scenes, bool):
                raise TypeError(f"scenes must be true or false, got {scenes!r}")
            manifest = self.add_job(
                int(body.get("media", 3)),
                int(body.get("analyses", 4)),
                slugs=body.get("slugs"),
                media_faults=faults,
                scenes=scenes,
            )
        except (TypeError, ValueError) as exc:
            return _detail(422, f"cannot make that job: {exc}")
        return web.json_response(manifest)

    async def _admin_faults(self, request: web.Request) -> web.Response:
        body, error = await _json_body(request)
        if error is not None:
            return error
        try:
            if not isinstance(body, dict):
                raise ValueError('body must be {"spec": "...", "seed": 0}')
            self.set_faults(parse_faults(str(body.get("spec", "")), seed=int(body.get("seed", 0))))
        except (TypeError, ValueError) as exc:
            return _detail(422, str(exc))
        return web.json_response({"status": "ok"})

    async def _admin_revoke(self, request: web.Request) -> web.Response:
        self.revoke_key()
        return web.json_response({"status": "revoked"})

    def _outages_json(self) -> web.Response:
        return web.json_response([{**asdict(o), "closes_at": o.closes_at} for o in self._outages])

    async def _admin_outages(self, request: web.Request) -> web.Response:
        return self._outages_json()

    async def _admin_add_outage(self, request: web.Request) -> web.Response:
        """``{"spec": "result:2:after=10:retry-after=1"}`` (the ``--outage`` syntax)."""
        error = await _add_from_spec(
            request,
            "ROUTE:SECONDS[:after=N]...",
            lambda spec: self._outages.append(parse_outage(spec)),
        )
        return error or self._outages_json()

    async def _admin_add_answer(self, request: web.Request) -> web.Response:
        """``{"spec": "result:409:accept:detail=already exists"}`` (the ``--answer`` syntax)."""
        error = await _add_from_spec(
            request,
            "ROUTE:STATUS[:times=N]...",
            lambda spec: self._answers.append(parse_answer(spec)),
        )
        return error or web.json_response([asdict(a) for a in self._answers])

    async def _admin_reoffer(self, request: web.Request) -> web.Response:
        """``{"project": "<id>", "upper": false}``: see :meth:`reoffer`."""
        body, error = await _json_body(request)
        if error is not None:
            return error
        if not isinstance(body, dict) or not isinstance(body.get("project"), str):
            return _detail(422, 'body must be {"project": "<project id>", "upper": false}')
        try:
            self.reoffer(body["project"], upper=bool(body.get("upper", False)))
        except ValueError as exc:
            return _detail(404, str(exc))
        return web.json_response({"status": "queued"})


async def _add_from_spec(
    request: web.Request, usage: str, add: Callable[[str], None]
) -> web.Response | None:
    """Read ``{"spec": "..."}`` and ``add`` it; the error answer (422 naming the problem), or
    ``None`` when it was added."""
    body, error = await _json_body(request)
    if error is not None:
        return error
    if not isinstance(body, dict) or not isinstance(body.get("spec"), str):
        return _detail(422, f'body must be {{"spec": "{usage}"}}')
    try:
        add(body["spec"])
    except ValueError as exc:
        return _detail(422, str(exc))
    return None


class _Raw:
    """A queued raw next-job body (kept apart from generated jobs)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw


@dataclass(frozen=True)
class _Offer:
    """A queued known job, served with upper-case ids when ``upper``."""

    job: SimJob
    upper: bool


def _reachable(host: str) -> str:
    """The address clients should use: a wildcard bind is reached through loopback."""
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = host == ""
    if wildcard:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _served(job: SimJob, *, upper: bool) -> dict[str, Any]:
    """A copy of the job's manifest as next-job serves it: ids upper-cased when ``upper``."""
    manifest = copy.deepcopy(job.manifest)
    if upper:
        for item in (manifest["client"], manifest["project"], *manifest["media"]):
            item["id"] = str(item["id"]).upper()
        for item in manifest["analyses"]:
            item["id"] = str(item["id"]).upper()
    return manifest
