"""The metrics and health endpoints of a running worker (``--metrics-port``), over loopback."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from goflow_gpu import retry
from goflow_gpu.service import run_worker
from goflow_gpu.settings import load_settings
from goflow_gpu.simulator import Simulator
from tests.doubles import ScriptedEngine

KEY = "made-up-ops-key-0003"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_and_health_answer_during_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOFLOW_API_KEY", KEY)
    retry.set_testing(True)
    port = free_port()
    seen: dict[str, Any] = {}

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=8) as sim:
            manifest = sim.add_job(media=3, analyses=6)
            project = manifest["project"]["id"]
            settings = load_settings(base_url=sim.base_url, state_dir=tmp_path, metrics_port=port)
            engine = ScriptedEngine(delay=0.05, slots=2)
            worker = asyncio.create_task(
                run_worker(settings, burst=True, engine=engine, handle_signals=False)
            )
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http:
                while sum(1 for k in sim.ledger.results if k[0] == project) < 4:
                    await asyncio.sleep(0.02)
                async with http.get(base + "/healthz") as r:
                    seen["healthz"] = r.status
                async with http.get(base + "/readyz") as r:
                    seen["readyz"] = (r.status, await r.json())
                async with http.get(base + "/metrics") as r:
                    seen["metrics"] = (r.status, await r.text())
                await worker
            assert sim.ledger.check_job(manifest) == []

    try:
        asyncio.run(go())
    finally:
        retry.set_testing(False)
    assert seen["healthz"] == 200
    status, body = seen["readyz"]
    assert status == 200, body
    status, text = seen["metrics"]
    assert status == 200
    for name in (
        "goflow_jobs_started_total",
        "goflow_combinations_total",
        "goflow_api_calls_total",
        "goflow_inference_duration_seconds_bucket",
        "goflow_tokens_total",
        "goflow_retries_total",
        "goflow_media_total",
        'goflow_queue_depth{queue="inference"}',
        'goflow_queue_depth{queue="report"}',
    ):
        assert name in text, name
    posts = [
        line
        for line in text.splitlines()
        if line.startswith("goflow_api_calls_total{") and 'code="201"' in line
    ]
    assert posts, "no counted 201 answers"
    assert sum(float(line.rsplit(" ", 1)[1]) for line in posts) >= 4
    assert KEY not in text
