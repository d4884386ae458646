"""Secrets and transport security: the key never leaks, plain http is refused, certs are verified.

A faulty run (network faults, an image that 404s, an analysis that fails QA every time, then a
401 when the key is revoked) produces every artefact an operator or an attacker could read: the
log at DEBUG (JSON), the Prometheus text, every file of the state directory (SQLite bytes
included), the report and everything else the backend accepted, the exception texts, and the
output of the real CLI (``goflow-gpu run`` and ``goflow-gpu state show`` as child processes).
Each is searched for the key in plain, base64 and URL-encoded forms.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import io
import ipaddress
import json
import logging
import os
import ssl
import subprocess
import sys
import traceback
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from goflow_gpu import retry
from goflow_gpu.client import GoFlowClient
from goflow_gpu.engines.base import InferenceRequest
from goflow_gpu.errors import AuthenticationError, ConfigError
from goflow_gpu.events import Events
from goflow_gpu.logs import setup_logging
from goflow_gpu.metrics import Metrics
from goflow_gpu.retry import RetryStats
from goflow_gpu.service import run_worker
from goflow_gpu.settings import load_settings
from goflow_gpu.simulator import Faults, FaultSpec, Simulator, SimulatorThread
from tests.doubles import ScriptedEngine, http_server, instance_for

# Made up; '/', '+' and '=' make its URL-encoded and base64 forms differ from the plain one.
KEY = "made-up-S3cret/Key+for=leak-test-9b1e"
FAULTS = Faults(
    seed=7,
    routes={
        "result": FaultSpec(rate_503=0.10, rate_429=0.05, rate_reset=0.05, rate_drop=0.05),
        "status": FaultSpec(rate_503=0.2),
        "report": FaultSpec(rate_500=0.3),
        "next-job": FaultSpec(rate_503=0.2),
    },
)
QA_FAILING_FIELD = "objects_detected"  # only in object-detection's schema
# Lines that are about one media x analysis combination.
PER_COMBINATION = {
    "result reported",
    "result already accepted earlier",
    "analysis passed qa",
    "analysis failed qa",
    "qa failed",
}


def key_forms(key: str = KEY) -> dict[str, bytes]:
    """Every encoding of the key that a careless log line, header dump or URL might hold."""
    raw = key.encode()
    return {
        "plain": raw,
        "base64": base64.b64encode(raw).rstrip(b"="),
        "base64url": base64.urlsafe_b64encode(raw).rstrip(b"="),
        "url-encoded": urllib.parse.quote(key, safe="").encode(),
        "form-encoded": urllib.parse.quote_plus(key).encode(),
        "hex": binascii.hexlify(raw),
        "json-escaped": json.dumps(key).strip('"').encode(),
    }


def leaks(blob: bytes) -> list[str]:
    """The forms of the key found in ``blob`` (case-insensitive for the url and hex forms)."""
    lowered = blob.lower()
    found = []
    for name, form in key_forms().items():
        if form in blob or (
            name in ("url-encoded", "form-encoded", "hex") and form.lower() in lowered
        ):
            found.append(name)
    return found


def state_files(state: Path) -> dict[str, bytes]:
    """Every file under the state directory, by relative path."""
    files = {str(p.relative_to(state)): p.read_bytes() for p in state.rglob("*") if p.is_file()}
    assert any(name.endswith(".db") or ".db" in name for name in files), files.keys()
    return files


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("GOFLOW_API_KEY", KEY)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    retry.set_testing(True)
    yield
    retry.set_testing(False)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _script(request: InferenceRequest) -> str | None:
    if QA_FAILING_FIELD in json.dumps(request.json_schema):
        return "I see a car, probably."  # not JSON: fails QA on every attempt
    return None


@dataclass
class FaultyRun:
    """The artefacts of the in-process faulty run."""

    manifest: dict[str, Any]
    log: str
    metrics: bytes
    state: dict[str, bytes]
    ledger: dict[str, Any]
    exceptions: list[str] = field(default_factory=list)


def faulty_run(tmp_path: Path) -> FaultyRun:
    """Job 1 with faults, a 404 image and a QA failure; then the key is revoked (401)."""
    stream = io.StringIO()
    setup_logging("json", "DEBUG", stream=stream)
    events = Events()
    metrics = Metrics()
    events.subscribe(metrics.observe)
    state = tmp_path / "state"
    exceptions: list[str] = []

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        async with Simulator(api_key=KEY, seed=3, faults=FAULTS) as sim:
            manifest = sim.add_job(media=3, analyses=4, media_faults={0: "404"})
            settings = load_settings(
                base_url=sim.base_url,
                state_dir=state,
                poll_interval_min=0.01,
                poll_interval_max=0.05,
                log_level="DEBUG",
                keep_media=True,  # sweep the image cache too (a closed job's is pruned)
            )
            engine = ScriptedEngine(script=_script)
            result = await run_worker(
                settings, burst=True, engine=engine, handle_signals=False, events=events
            )
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            sim.add_job(media=1, analyses=1)
            sim.revoke_key()
            with pytest.raises(AuthenticationError) as caught:
                await run_worker(
                    settings, burst=True, engine=engine, handle_signals=False, events=events
                )
            error = caught.value
            exceptions.extend([str(error), repr(error), "".join(traceback.format_exception(error))])
            return manifest, sim.ledger.snapshot()

    manifest, ledger = asyncio.run(go())
    return FaultyRun(
        manifest=manifest,
        log=stream.getvalue(),
        metrics=metrics.render(),
        state=state_files(state),
        ledger=ledger,
        exceptions=exceptions,
    )


def test_the_leak_detector_finds_every_form_of_the_key() -> None:
    forms = key_forms()
    for name, form in forms.items():
        assert name in leaks(b"header: " + form + b"\n"), name
    assert len({forms["plain"], forms["base64"], forms["url-encoded"], forms["hex"]}) == 4
    assert leaks(b"X-API-Key: ***") == []


def test_no_artefact_of_a_faulty_run_contains_the_key(tmp_path: Path) -> None:
    run = faulty_run(tmp_path)
    project = run.manifest["project"]["id"]
    # The run really was faulty and produced each artefact.
    assert '"security_event": true' in run.log and "authentication failed" in run.log
    assert "analysis failed qa" in run.log and "media unavailable" in run.log
    assert '"reason": "5xx"' in run.log
    assert b"goflow_" in run.metrics
    assert len(run.ledger["reports"][project]) == 1
    assert any(name.endswith("db") for name in run.state)
    assert any(name.startswith("media/") for name in run.state)  # cached images swept too
    assert run.exceptions and "401" in run.exceptions[0]

    artefacts: dict[str, bytes] = {
        "log": run.log.encode(),
        "metrics": run.metrics,
        "ledger (results, statuses, report)": json.dumps(run.ledger).encode(),
        **{f"exception {i}": text.encode() for i, text in enumerate(run.exceptions)},
        **{f"state/{name}": data for name, data in run.state.items()},
    }
    found = {name: leaks(data) for name, data in artefacts.items() if leaks(data)}
    assert found == {}


def test_json_log_lines_are_json_and_carry_the_job_ids(tmp_path: Path) -> None:
    run = faulty_run(tmp_path)
    project = run.manifest["project"]["id"]
    lines = [json.loads(line) for line in run.log.splitlines() if line.strip()]  # all valid JSON
    assert all(isinstance(line, dict) and {"ts", "level", "event"} <= set(line) for line in lines)
    ours = [line for line in lines if line["logger"].startswith("goflow_gpu.")]
    ours = [line for line in ours if not line["logger"].startswith("goflow_gpu.simulator")]
    begin = next(i for i, line in enumerate(ours) if line["event"] == "job retrieved")
    end = next(i for i, line in enumerate(ours) if line["event"] == "job completed")
    inside = ours[begin : end + 1]
    assert len(inside) > 50
    assert [line["event"] for line in inside if line.get("project_id") != project] == []
    per_combination = [line for line in inside if line["event"] in PER_COMBINATION]
    result_calls = [line for line in inside if line.get("endpoint") == "result"]
    assert len(per_combination) >= 12 and len(result_calls) >= 12
    for line in per_combination + result_calls:
        assert line.get("media_id") and line.get("analysis_id"), line


# -- the real CLI in child processes ---------------------------------------------------------------


class _FakeChat(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that answers each schema with a valid instance (object
    detection excepted: it gets prose, which fails QA)."""

    def do_GET(self) -> None:
        self._send({"data": [{"id": "fake-vl"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        schema = body["response_format"]["json_schema"]["schema"]
        text = (
            "I see a car, probably."
            if QA_FAILING_FIELD in json.dumps(schema)
            else json.dumps(instance_for(schema))
        )
        self._send(
            {
                "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20},
            }
        )

    def _send(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet


@pytest.fixture
def fake_chat() -> Iterator[str]:
    with http_server(_FakeChat) as url:
        yield url


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("goflow-gpu")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "goflow_gpu"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_cli_output_and_state_of_a_faulty_run_never_contain_the_key(
    tmp_path: Path, fake_chat: str
) -> None:
    state = tmp_path / "state"
    env = {
        **os.environ,
        "GOFLOW_API_KEY": KEY,
        "GOFLOW_OPENAI_BASE_URL": fake_chat,
        "GOFLOW_MODEL": "fake-vl",
        "GOFLOW_LOG_LEVEL": "DEBUG",
        "GOFLOW_POLL_INTERVAL_MIN": "0.01",
        "GOFLOW_POLL_INTERVAL_MAX": "0.05",
        "COLUMNS": "250",  # so that `state show` prints whole ids
    }
    flags = ["--state-dir", str(state), "--engine", "openai", "--log-format", "json"]
    with SimulatorThread(Simulator(KEY, seed=8, faults=FAULTS)) as sim:
        manifest = sim.add_job(media=2, analyses=3, media_faults={1: "404"})
        first = _cli("run", "--base-url", sim.base_url, *flags, env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert sim.check_job(manifest) == []
        sim.add_job(media=1, analyses=1)
        sim.revoke_key()
        second = _cli("run", "--base-url", sim.base_url, *flags, env=env)
        ledger = sim.ledger_snapshot()
    shown = _cli("state", "show", "--state-dir", str(state), env=env)

    assert second.returncode == 3 and "authentication failed" in second.stderr
    assert "analysis failed qa" in first.stderr and "media unavailable" in first.stderr
    assert shown.returncode == 0 and manifest["project"]["id"] in shown.stdout
    artefacts: dict[str, bytes] = {
        "run 1 stdout+stderr": (first.stdout + first.stderr).encode(),
        "run 2 (401) stdout+stderr": (second.stdout + second.stderr).encode(),
        "state show": (shown.stdout + shown.stderr).encode(),
        "ledger": json.dumps(ledger).encode(),
        **{f"state/{name}": data for name, data in state_files(state).items()},
    }
    found = {name: leaks(data) for name, data in artefacts.items() if leaks(data)}
    assert found == {}


# -- transport security -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://goflow.example.com", "http://10.0.0.7:8080", "http://[2001:db8::1]"]
)
def test_plain_http_to_a_non_loopback_host_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="plain http"):
        load_settings(base_url=url)
    with pytest.raises(ConfigError, match="plain http"):
        GoFlowClient(url, SecretStr(KEY))
    # The same host over https, and plain http on loopback, are accepted.
    https = url.replace("http://", "https://")
    assert load_settings(base_url=https).base_url == https
    assert GoFlowClient("http://127.0.0.1:9", SecretStr(KEY)).base_url == "http://127.0.0.1:9"


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_a_self_signed_certificate_is_refused_and_the_key_never_sent(tmp_path: Path) -> None:
    cert, private = _self_signed(tmp_path)
    seen: list[str] = []

    async def next_job(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-API-Key", ""))
        return web.json_response({"job": "would be here"})

    async def go() -> None:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert, private)
        app = web.Application()
        app.router.add_get("/api/v1/agent/next-job", next_job)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
        await site.start()
        url = f"https://127.0.0.1:{runner.addresses[0][1]}"
        try:
            stats = RetryStats()
            async with GoFlowClient(url, SecretStr(KEY), stats=stats) as client:
                # A certificate problem is permanent: a configuration error, never retried.
                with pytest.raises(ConfigError) as caught:
                    await client.next_job()
            assert stats.total == 0
            message = str(caught.value)
            assert "certificate verify failed" in message.lower()
            assert "self-signed" in message.lower() or "self signed" in message.lower()
            assert leaks(message.encode()) == []
            assert seen == []  # the handshake failed before any request carried the key
            # Control: the same server is reached once its certificate is trusted.
            trusting = ssl.create_default_context(cafile=str(cert))
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusting)) as session,
                GoFlowClient(url, SecretStr(KEY), session=session) as client,
            ):
                assert await client.next_job() == {"job": "would be here"}
            assert seen == [KEY]
        finally:
            await runner.cleanup()

    asyncio.run(go())
