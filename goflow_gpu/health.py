"""The ops HTTP server of ``serve``: ``/metrics``, ``/healthz`` and ``/readyz``.

::

    readiness = Readiness()
    server = await start_ops_server("0.0.0.0", settings.metrics_port, metrics, readiness)
    readiness.engine_loaded = True        # the service sets these as it goes
    readiness.state_open = True
    readiness.backend_ok()                # after any call the backend answered (404 idle too)
    ...
    await server.stop()

- ``GET /metrics``: :meth:`Metrics.render`, Prometheus text format.
- ``GET /healthz``: 200 whenever the event loop answers (liveness: a wedged loop gets no answer
  and the orchestrator restarts the worker).
- ``GET /readyz``: 200 only when the engine is loaded, the state is open, the backend answered
  within ``Readiness.freshness`` seconds and no job is waiting out an outage (the check then
  says which service and why); otherwise 503. Both carry a JSON body naming each check,
  so whoever reads a failed probe sees which one failed.

The server runs on the worker's own event loop: it must stay cheap (no blocking work in handlers).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from goflow_gpu.errors import ConfigError
from goflow_gpu.logs import get_logger
from goflow_gpu.metrics import CONTENT_TYPE, Metrics

__all__ = ["ApiCallHook", "OpsServer", "Readiness", "api_call_hook", "start_ops_server"]

log = get_logger(__name__)

#: A backend that has not answered for this long makes the worker not ready. The idle poll backs
#: off to about a minute, so a healthy idle worker refreshes well within it.
DEFAULT_FRESHNESS = 300.0


@dataclass
class Readiness:
    """What ``/readyz`` reports; the service sets the fields as the worker starts and runs.

    ``last_backend_ok`` is a ``clock()`` reading (monotonic) of the last call the backend answered;
    it counts as fresh for ``freshness`` seconds.
    """

    engine_loaded: bool = False
    state_open: bool = False
    last_backend_ok: float | None = None
    last_backend_error: str | None = None
    freshness: float = DEFAULT_FRESHNESS
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    #: services the worker is waiting for (an outage past the client's retries): name -> why
    waiting: dict[str, str] = field(default_factory=dict)

    def outage(self, service: str, reason: str | None) -> None:
        """A job's calls to ``service`` are paused (``reason``) or resumed (``None``)."""
        if reason is None:
            self.waiting.pop(service, None)
        else:
            self.waiting[service] = reason

    def backend_ok(self) -> None:
        """Record that the backend just answered (any answer of the contract, 404 idle included)."""
        self.last_backend_ok = self.clock()
        self.last_backend_error = None

    def backend_failed(self, reason: str | None = None) -> None:
        """Record a call that got no usable answer; readiness lapses when the last success ages.

        One failure does not flip readiness at once: retries usually recover, and a flapping
        probe would take the worker out of rotation for nothing.
        """
        self.last_backend_error = reason or "backend call failed"

    def checks(self) -> dict[str, dict[str, Any]]:
        """Each check with ``ok`` and a ``detail`` a person can act on."""
        return {
            "engine_loaded": _check(
                self.engine_loaded,
                "engine loaded" if self.engine_loaded else "engine not loaded yet",
            ),
            "state_open": _check(
                self.state_open, "state open" if self.state_open else "local state not open"
            ),
            "backend_reachable": self._backend_check(),
            "not_waiting": _check(
                not self.waiting,
                "no outage"
                if not self.waiting
                else "waiting for "
                + "; ".join(f"{name} ({why})" for name, why in sorted(self.waiting.items())),
            ),
        }

    def ready(self) -> bool:
        """True when every check passes."""
        return all(c["ok"] for c in self.checks().values())

    def _backend_check(self) -> dict[str, Any]:
        if self.last_backend_ok is None:
            detail = "no successful backend call yet"
            if self.last_backend_error:
                detail += f" (last error: {self.last_backend_error})"
            return _check(False, detail)
        age = self.clock() - self.last_backend_ok
        if age > self.freshness:
            detail = f"last successful backend call {age:.0f} s ago (limit {self.freshness:.0f} s)"
            if self.last_backend_error:
                detail += f"; last error: {self.last_backend_error}"
            return _check(False, detail)
        return _check(True, f"backend answered {age:.0f} s ago")


def _check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": ok, "detail": detail}


#: ``(endpoint, http_status or None, seconds, cause or None)``, called once per API call attempt.
ApiCallHook = Callable[[str, int | None, float, str | None], None]


def api_call_hook(metrics: Metrics, readiness: Readiness) -> ApiCallHook:
    """One callback for the client's per-attempt hook: counts the call and keeps readiness.

    Any HTTP answer below 500 proves the backend reachable (a 404 idle answer included); a 5xx
    or no answer at all (``status`` None, ``cause`` "network"/"timeout") is a failure.
    """

    def hook(endpoint: str, status: int | None, seconds: float, cause: str | None) -> None:
        metrics.api_call(endpoint, status, seconds, cause)
        if status is not None and status < 500:
            readiness.backend_ok()
        else:
            what = f"HTTP {status}" if status is not None else (cause or "no answer")
            readiness.backend_failed(f"{endpoint}: {what}")

    return hook


class OpsServer:
    """A running ops server. ``port`` is the bound port (useful when 0 was asked for)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:9108``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening and close open connections. Safe to call twice."""
        await self._runner.cleanup()


async def start_ops_server(
    host: str, port: int, metrics: Metrics, readiness: Readiness
) -> OpsServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (``port`` 0: a free one).

    Raises :class:`ConfigError` when the address cannot be bound.
    """

    async def metrics_handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        checks = readiness.checks()
        ready = all(c["ok"] for c in checks.values())
        failing = [name for name, c in checks.items() if not c["ok"]]
        body = {"ready": ready, "failing": failing, "checks": checks}
        return web.json_response(body, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # No access log: probes every few seconds would drown the job's lines.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen for metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None
    # runner.addresses holds the bound socket names: the real port when 0 was asked for.
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    ops = OpsServer(runner, host, bound)
    log.info("ops server listening", url=ops.url, paths="/metrics /healthz /readyz")
    return ops
