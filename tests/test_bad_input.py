"""Bad input at the worker and CLI level: broken manifests, hostile names, bad media, a key
refused mid-job, refused results, a broken backend, unusable state. Each case must end with a
clear error naming the problem, nothing lost, and the rest of the work done.

Unit-level cases live next to their modules (``test_protocol.py`` manifest parsing,
``test_media.py`` each media fault, ``test_store.py`` state files, ``test_client.py`` answers);
this file checks what the whole worker does with them.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image
from pydantic import SecretStr

from goflow_gpu import retry
from goflow_gpu.client import GoFlowClient
from goflow_gpu.logs import setup_logging
from goflow_gpu.service import run_worker
from goflow_gpu.settings import Settings, load_settings
from goflow_gpu.simulator import Faults, FaultSpec, Simulator, SimulatorThread
from goflow_gpu.store import Store
from tests.doubles import ScriptedEngine

KEY = "made-up-bad-input-key-0003"
HARNESS = Path(__file__).with_name("crash_worker.py")
TEMPLATE: dict[str, Any] = {
    "client": {"id": "3fa85f64-5717-4562-b3fc-2c963f66afa6", "slug": "c", "name": "Client"},
    "project": {"id": "3fa85f64-5717-4562-b3fc-2c963f66afa7", "slug": "p", "name": "Project"},
    "media": [
        {
            "id": "3fa85f64-5717-4562-b3fc-2c963f66afa8",
            "filename": "image1.jpg",
            "optimised_path": "https://example.com/o/image1.jpg",
            "greyscale_path": "https://example.com/g/image1.jpg",
        }
    ],
    "analyses": [
        {
            "id": "3fa85f64-5717-4562-b3fc-2c963f66afaa",
            "name": "Objects",
            "slug": "object-detection",
        },
        {"id": "3fa85f64-5717-4562-b3fc-2c963f66afab", "name": "Text", "slug": "text-recognition"},
    ],
}


@pytest.fixture(autouse=True)
def _key_and_instant_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("GOFLOW_API_KEY", KEY)
    retry.set_testing(True)
    yield
    retry.set_testing(False)


@pytest.fixture
def logs() -> Iterator[Callable[[str], io.StringIO]]:
    """``logs(fmt)`` sends the worker's log lines to a StringIO in that format."""

    def capture(fmt: str) -> io.StringIO:
        stream = io.StringIO()
        setup_logging(fmt, "INFO", stream=stream)
        return stream

    yield capture
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "goflow_handler", False):
            root.removeHandler(handler)


def settings_for(base_url: str, state: Path, **extra: Any) -> Settings:
    return load_settings(
        base_url=base_url,
        state_dir=state,
        poll_interval_min=0.01,
        poll_interval_max=0.05,
        **extra,
    )


async def work(sim: Simulator, state: Path, **extra: Any) -> Any:
    settings = settings_for(sim.base_url, state, **extra)
    return await run_worker(settings, burst=True, engine=ScriptedEngine(), handle_signals=False)


async def serve_instead(sim: Simulator, manifest: dict[str, Any]) -> None:
    """Take the queued job generated for ``manifest`` and queue ``manifest`` (edited) instead."""
    async with GoFlowClient(sim.base_url, SecretStr(KEY)) as api:
        await api.next_job()
    sim.add_raw_job(manifest)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def cli(*args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """The real ``goflow-gpu`` command line (scripted engine) in a subprocess."""
    env = dict(
        os.environ,
        GOFLOW_API_KEY=KEY,
        GOFLOW_POLL_INTERVAL_MIN="0.01",
        GOFLOW_POLL_INTERVAL_MAX="0.05",
        ENGINE_DELAY=kwargs.pop("engine_delay", "0.001"),
    )
    command = [sys.executable, str(HARNESS), "cli", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=timeout, **kwargs
    )


# ---------------------------------------------------------------------- manifests


def _edit(change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    raw = copy.deepcopy(TEMPLATE)
    change(raw)
    return raw


BAD_MANIFESTS = {
    "missing project.name": (
        _edit(lambda m: m["project"].pop("name")),
        "project.name: Field required",
    ),
    "non-UUID media id": (
        _edit(lambda m: m["media"][0].update(id="image-1")),
        "media[0].id: Value error, is not a UUID (got 'image-1')",
    ),
    "duplicate analysis ids": (
        _edit(lambda m: m["analyses"][1].update(id=m["analyses"][0]["id"])),
        "duplicate id 3fa85f64-5717-4562-b3fc-2c963f66afaa at analyses[1]",
    ),
    "empty media": (_edit(lambda m: m.update(media=[])), "media: List should have at least 1"),
    "empty analyses": (
        _edit(lambda m: m.update(analyses=[])),
        "analyses: List should have at least 1",
    ),
    "project id of the wrong type": (
        _edit(lambda m: m["project"].update(id=12345)),
        "project.id: Input should be a valid string (got 12345)",
    ),
    "media item of the wrong type": (
        _edit(lambda m: m["media"].__setitem__(0, "image1.jpg")),
        "media[0]: Input should be a valid dictionary",
    ),
    "5 MB project name": (
        _edit(lambda m: m["project"].update(name="n" * 5_000_000)),
        "project.name: String should have at most 500 characters",
    ),
}


@pytest.mark.parametrize(("raw", "problem"), BAD_MANIFESTS.values(), ids=list(BAD_MANIFESTS))
def test_invalid_manifest_is_skipped_kept_logged_and_the_next_job_runs(
    tmp_path: Path, logs: Callable[[str], io.StringIO], raw: Any, problem: str
) -> None:
    stream = logs("json")

    async def go() -> Any:
        async with Simulator(api_key=KEY, seed=21) as sim:
            sim.add_raw_job(raw)
            good = sim.add_job(media=1, analyses=2)
            result = await work(sim, tmp_path)
            assert sim.ledger.check_job(good) == []
        return result

    result = run(go())
    assert result.skipped == 1 and result.exit_code == 1
    with Store.open(tmp_path) as store:
        (kept,) = store.rejected_manifests()
        assert kept["raw"] == raw  # kept whole, 5 MB included
        assert problem in kept["error"]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (skipped,) = [e for e in lines if e["event"] == "job skipped: manifest invalid"]
    assert skipped["level"] == "error"
    assert any(problem.split(" (got")[0] in p for p in skipped["problems"])
    assert max(len(line) for line in stream.getvalue().splitlines()) < 10_000  # no 5 MB line


def test_unknown_extra_fields_are_accepted_and_kept(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=22) as sim:
            manifest = sim.add_job(media=2, analyses=2)
            edited = copy.deepcopy(manifest)
            edited["priority"] = "high"
            edited["client"]["tier"] = {"level": 3}
            edited["media"][0]["exif"] = {"iso": 100}
            edited["analyses"][1]["version"] = 7
            await serve_instead(sim, edited)
            result = await work(sim, tmp_path)
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
        with Store.open(tmp_path) as store:
            job = store.job(manifest["project"]["id"])
            assert job is not None and job.manifest == edited  # stored as received

    run(go())


def test_a_huge_manifest_of_2000_media_is_handled(tmp_path: Path) -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=23, image_long_side=(16, 24)) as sim:
            manifest = sim.add_job(media=2000, analyses=1)
            started = time.monotonic()
            result = await work(sim, tmp_path)
            elapsed = time.monotonic() - started
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            project = manifest["project"]["id"]
            details = sim.ledger.reports[project][0]["report"]["details"]
            assert details["total_analyses_completed"] == 2000
            assert elapsed < 120, f"2000 combinations took {elapsed:.0f} s"

    run(go())


HOSTILE = "Evil\nFAKE-LINE level=error\r\x1b[2J\x1b]0;owned\x07\x00\x9b31m\x7f\u2028end"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_names_with_newlines_and_terminal_escapes_are_logged_safely(
    tmp_path: Path, logs: Callable[[str], io.StringIO], fmt: str
) -> None:
    stream = logs(fmt)

    async def go() -> dict[str, Any]:
        async with Simulator(api_key=KEY, seed=24) as sim:
            manifest = sim.add_job(media=1, analyses=2)
            edited = copy.deepcopy(manifest)
            edited["client"]["name"] = "Client " + HOSTILE
            edited["project"]["name"] = "Project " + HOSTILE
            edited["media"][0]["filename"] = "file " + HOSTILE + ".jpg"
            await serve_instead(sim, edited)
            result = await work(sim, tmp_path)
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            return edited

    edited = run(go())
    text = stream.getvalue()
    for raw_char in ("\r", "\x1b", "\x07", "\x00", "\x9b", "\x7f", "\u2028"):
        assert raw_char not in text, f"raw {raw_char!r} reached the log"
    lines = text.splitlines()
    assert not any(line.startswith("FAKE-LINE") for line in lines)
    retrieved = [line for line in lines if "job retrieved" in line]
    assert len(retrieved) == 1
    assert "Project Evil\\nFAKE-LINE" in retrieved[0].replace("\\\\", "\\")
    if fmt == "json":
        assert all(isinstance(json.loads(line), dict) for line in lines)
    with Store.open(tmp_path) as store:  # the data itself is kept exactly
        job = store.job(edited["project"]["id"])
        assert job is not None and job.manifest["project"]["name"] == edited["project"]["name"]


# ---------------------------------------------------------------------- media


def test_bad_media_fail_their_combinations_with_the_reason_and_the_rest_completes(
    tmp_path: Path,
) -> None:
    local = tmp_path / "local.jpg"
    Image.new("RGB", (64, 64), "red").save(local)
    state = tmp_path / "state"
    # Permanent problems only: a slow (timed-out) image is transient and waited out
    # (tests/test_outages.py), never failed.
    faults = Faults(routes={"media": FaultSpec(slow_seconds=3.0)})
    expected = {
        0: "not an image",
        1: "too many redirects",  # the loop grows its query: ?hop=1, 2, ...
        2: "corrupt",
        3: "scheme 'file' is not http or https",
        4: "scheme 'ftp' is not http or https",
    }

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=25, faults=faults) as sim:
            manifest = sim.add_job(
                media=6, analyses=2, media_faults={0: "html", 1: "redirect-loop", 2: "corrupt"}
            )
            edited = copy.deepcopy(manifest)
            for variant in ("optimised_path", "greyscale_path"):
                edited["media"][3][variant] = local.as_uri()
                edited["media"][4][variant] = manifest["media"][4][variant].replace(
                    "http://", "ftp://"
                )
            await serve_instead(sim, edited)
            result = await work(sim, state, media_timeout=1.0)
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            project = manifest["project"]["id"]
            ids = [m["id"] for m in manifest["media"]]
            got = {k: v[0] for k, v in sim.ledger.results.items() if k[0] == project}
            for index, words in expected.items():
                bodies = [b for k, b in got.items() if k[1] == ids[index]]
                assert [b["status"] for b in bodies] == ["failed", "failed"]
                for body in bodies:
                    assert words in " ".join(body["analysisResult"]["reasons"])
            healthy = [b["status"] for k, b in got.items() if k[1] == ids[5]]
            assert healthy == ["completed", "completed"]
            details = sim.ledger.reports[project][0]["report"]["details"]
            assert details["total_analyses_completed"] == 2
            assert len(details["failures"]) == 10
            # refused schemes: no request reached any server for those media
            asked = [c["path"] for c in sim.ledger.calls if c["route"] == "media"]
            assert not any(ids[3] in p or ids[4] in p for p in asked)

    run(go())


# ---------------------------------------------------------------------- backend answers


def test_401_mid_job_exits_3_keeps_the_state_and_resumes_later(tmp_path: Path) -> None:
    with SimulatorThread(Simulator(api_key=KEY, seed=26)) as sim:
        manifest = sim.add_job(media=3, analyses=5)
        project = manifest["project"]["id"]
        args = ("run", "--base-url", sim.base_url, "--state-dir", str(tmp_path))
        env = dict(os.environ, GOFLOW_API_KEY=KEY, ENGINE_DELAY="0.05")
        env.update(GOFLOW_POLL_INTERVAL_MIN="0.01", GOFLOW_LOG_FORMAT="json")
        proc = subprocess.Popen(
            [sys.executable, str(HARNESS), "cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(k.startswith(project) for k in sim.ledger_snapshot()["results"]) >= 3:
                break
            time.sleep(0.02)
        sim.revoke_key()
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 3, stderr[-2000:]
        assert "authentication failed" in stderr and "GOFLOW_API_KEY" in stderr
        assert KEY not in stderr
        accepted = sum(k.startswith(project) for k in sim.ledger_snapshot()["results"])
        assert 3 <= accepted < 15
        with Store.open(tmp_path) as store:
            job = store.job(project)
            assert job is not None and job.state == "open"
            assert store.counts(project)["reported"] == accepted  # nothing accepted is forgotten
        sim.restore_key()
        resumed = cli(*args)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert sim.check_job(manifest) == []


@pytest.mark.parametrize("status", [400, 422])
def test_a_refused_result_is_rejected_with_the_detail_and_never_retried(
    tmp_path: Path, status: int
) -> None:
    detail = f"analysisResult.objects_detected[0].confidence: must be <= 1 (case {status})"

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=27) as sim:
            manifest = sim.add_job(media=2, analyses=3)
            project = manifest["project"]["id"]
            media_id, analysis_id = manifest["media"][1]["id"], manifest["analyses"][0]["id"]
            sim.reject_result(media_id, analysis_id, status, detail)
            result = await work(sim, tmp_path)
            assert result.exit_code == 0
            problems = sim.ledger.check_job(manifest)
            assert len(problems) == 1 and "1 of 6" in problems[0]  # only the refused one
            assert sim.ledger.statuses[project] == ["processing", "completed"]
            path = f"/media/{media_id}/analysis/{analysis_id}"
            posts = [c for c in sim.ledger.calls if c["path"].endswith(path)]
            assert [c["status"] for c in posts] == [status]  # once, not in a loop
            (failure,) = sim.ledger.reports[project][0]["report"]["details"]["failures"]
            assert failure["state"] == "rejected" and failure["http_status"] == status
            assert detail in failure["server_detail"]
        with Store.open(tmp_path) as store:
            job = store.job(project)
            assert job is not None and job.state == "closed"
            (row,) = store.combos(project, states=("rejected",))
            assert row.key.media_id == media_id and detail in (row.server_detail or "")

    run(go())


def test_reject_result_knob_answers_the_chosen_status_and_detail() -> None:
    async def go() -> None:
        async with Simulator(api_key=KEY, seed=28) as sim:
            manifest = sim.add_job(media=1, analyses=1)
            ids = (manifest["media"][0]["id"], manifest["analyses"][0]["id"])
            with pytest.raises(ValueError, match="400 or 422"):
                sim.reject_result(*ids, 500, "no")
            sim.reject_result(*ids, 422, "bad shape")
            async with GoFlowClient(sim.base_url, SecretStr(KEY)) as api:
                from goflow_gpu.errors import UnprocessableError
                from goflow_gpu.protocol import ResultBody

                body = ResultBody(
                    model_used="m",
                    user_prompt_used="u",
                    system_prompt_used="s",
                    status="completed",
                    analysis_result={"x": 1},
                )
                with pytest.raises(UnprocessableError) as info:
                    await api.post_result(manifest["project"]["id"], *ids, body)
            assert "bad shape" in str(info.value.detail)
            assert sim.ledger.results == {}

    run(go())


class BrokenBackend:
    """A backend whose next-job answers 200 with ``body``, counting the calls."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.calls = 0

    async def __aenter__(self) -> str:
        async def next_job(request: web.Request) -> web.Response:
            self.calls += 1
            return web.Response(body=self.body, content_type="application/json")

        app = web.Application()
        app.router.add_get("/api/v1/agent/next-job", next_job)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"a string"'])
def test_next_job_that_is_not_a_json_object_is_a_clear_error_not_retried(
    tmp_path: Path, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        backend = BrokenBackend(body)
        async with backend as url:
            settings = settings_for(url, tmp_path)
            result = await run_worker(
                settings, burst=True, engine=ScriptedEngine(), handle_signals=False
            )
            # The backend's trouble, not a crash: run stops with "try again later".
            assert result.exit_code == 75
            assert backend.calls == 1

    with caplog.at_level(logging.ERROR):
        run(go())
    (record,) = [
        r for r in caplog.records if r.getMessage() == "next-job failed; polling again later"
    ]
    assert "next-job" in str(record.__dict__) and KEY not in caplog.text


@pytest.mark.parametrize("body", [b"{not json", b'{"jobs": [], "status": "ok"}'])
def test_serve_backs_off_on_a_broken_next_job_instead_of_crashing_or_spinning(
    tmp_path: Path, body: bytes
) -> None:
    async def go() -> None:
        backend = BrokenBackend(body)
        async with backend as url:
            settings = load_settings(
                base_url=url, state_dir=tmp_path, poll_interval_min=0.2, poll_interval_max=0.4
            )
            stop = asyncio.Event()
            task = asyncio.create_task(
                run_worker(
                    settings, burst=False, engine=ScriptedEngine(), handle_signals=False, stop=stop
                )
            )
            await asyncio.sleep(1.5)
            stop.set()
            result = await asyncio.wait_for(task, 10)
            assert result.drained
            assert 2 <= backend.calls <= 9, backend.calls  # polled again, with pauses

    run(go())


def test_burst_stops_when_next_job_repeats_the_same_invalid_manifest(tmp_path: Path) -> None:
    async def go() -> None:
        backend = BrokenBackend(b'{"jobs": [], "status": "ok"}')
        async with backend as url:
            result = await asyncio.wait_for(
                run_worker(
                    settings_for(url, tmp_path),
                    burst=True,
                    engine=ScriptedEngine(),
                    handle_signals=False,
                ),
                20,
            )
            assert result.exit_code == 1
            assert backend.calls == 2
        with Store.open(tmp_path) as store:
            kept = store.rejected_manifests()
            assert kept[0]["raw"] == {"jobs": [], "status": "ok"}
            assert "client: Field required" in kept[0]["error"]

    run(go())


# ---------------------------------------------------------------------- local state


def test_corrupt_state_database_exits_4_and_is_left_byte_identical(tmp_path: Path) -> None:
    with SimulatorThread(Simulator(api_key=KEY, seed=29)) as sim:
        sim.add_job(media=1, analyses=2)
        assert cli("run", "--base-url", sim.base_url, "--state-dir", str(tmp_path)).returncode == 0
        db = tmp_path / "state.db"
        data = bytearray(db.read_bytes())
        data[100:] = bytes((i * 13 + 5) % 256 for i in range(len(data) - 100))
        db.write_bytes(bytes(data))
        for extra in ("state.db-wal", "state.db-shm"):
            (tmp_path / extra).unlink(missing_ok=True)
        sim.add_job(media=1, analyses=2)
        polls = sum(c["route"] == "next-job" for c in sim.ledger_snapshot()["calls"])
        done = cli("run", "--base-url", sim.base_url, "--state-dir", str(tmp_path))
        assert done.returncode == 4, done.stderr[-2000:]
        assert "state error" in done.stderr and "refusing to use or overwrite it" in done.stderr
        assert "Traceback" not in done.stderr
        assert db.read_bytes() == bytes(data)
        # refused before taking a job: the queued job is still the backend's to hand out
        assert sum(c["route"] == "next-job" for c in sim.ledger_snapshot()["calls"]) == polls


def test_second_worker_on_the_same_state_dir_exits_4_naming_the_first(tmp_path: Path) -> None:
    with SimulatorThread(Simulator(api_key=KEY, seed=30)) as sim:
        env = dict(os.environ, GOFLOW_API_KEY=KEY, GOFLOW_POLL_INTERVAL_MIN="0.05")
        first = subprocess.Popen(
            [sys.executable, str(HARNESS), "cli", "serve", "--base-url", sim.base_url,
             "--state-dir", str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not any(c["route"] == "next-job" for c in sim.ledger_snapshot()["calls"]):
                assert time.monotonic() < deadline and first.poll() is None
                time.sleep(0.05)
            second = cli("run", "--base-url", sim.base_url, "--state-dir", str(tmp_path))
            assert second.returncode == 4, second.stderr[-2000:]
            message = " ".join(second.stderr.split())  # rich wraps long lines
            assert f"is in use by another worker (pid {first.pid})" in message
        finally:
            first.send_signal(signal.SIGTERM)
            first.communicate(timeout=30)
        assert first.returncode == 0


def _cli_in_child(args: list[str], *, as_nobody: bool) -> tuple[int, str]:
    """Run the CLI in a forked child (as "nobody" if asked); return its exit code and stderr.

    Forked, not exec'd: "nobody" may not be allowed to start this interpreter at all.
    """
    from goflow_gpu import cli as cli_module
    from goflow_gpu import service  # noqa: F401 - imported lazily by the CLI: import it here,
    # before the fork, since "nobody" may not be allowed to read the standard library either

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_fd)
            if as_nobody:
                os.setgid(65534)
                os.setuid(65534)
            sys.stderr = captured = io.StringIO()
            try:
                cli_module.app(args=args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            os.write(write_fd, f"{code}\n{captured.getvalue()}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        code_text, _, stderr = pipe.read().decode().partition("\n")
    os.waitpid(pid, 0)
    return int(code_text), stderr


def test_read_only_state_dir_exits_4_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    base = Path(tempfile.mkdtemp(prefix="goflow-ro-"))
    state = base / "state"
    try:
        base.chmod(0o755)
        state.mkdir()
        state.chmod(0o555)
        # The openai engine: its model is the server's, so the start gets past the model
        # check (run first, before the state is touched) to the state directory.
        monkeypatch.setenv("GOFLOW_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
        args = ["run", "--base-url", "http://127.0.0.1:9", "--state-dir", str(state),
                "--engine", "openai"]  # fmt: skip
        # root ignores permission bits: the CLI runs as "nobody" then.
        code, stderr = _cli_in_child(args, as_nobody=os.geteuid() == 0)
        assert code == 4, stderr[-2000:]
        assert f"state directory {state} is not writable" in " ".join(stderr.split())
        assert list(state.iterdir()) == []
    finally:
        state.chmod(0o755)
        state.rmdir()
        base.rmdir()
