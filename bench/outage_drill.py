"""Outage drill: the issue-11 scenarios at production timing, with figures for RELIABILITY.md.

    .venv/bin/python bench/outage_drill.py [--outage 60] [--media-outage 10]

1. A ``--outage`` seconds result-route outage (503, no Retry-After) opening after 20 results of
   a 10 x 25 job, with the contract's retry policies and the default job-level backoff: every
   result must be accepted exactly once, none as failed, ``completed`` after the last result.
2. A ``--media-outage`` seconds image-host outage from the start: no combination may fail.

A scripted engine (instant, schema-valid answers) stands in for the model, so the figures are
about the worker's handling of the backend, not inference. Prints one line per scenario and
exits non-zero when an invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from goflow_gpu.service import run_worker
from goflow_gpu.settings import load_settings
from goflow_gpu.simulator import Simulator
from tests.doubles import ScriptedEngine

KEY = "made-up-drill-key"


async def scenario(name: str, route: str, seconds: float, after: int) -> bool:
    async with Simulator(api_key=KEY, seed=7) as sim:
        manifest = sim.add_job(media=10, analyses=25)
        project = manifest["project"]["id"]
        sim.add_outage(route, seconds, after=after)
        with tempfile.TemporaryDirectory() as state:
            settings = load_settings(base_url=sim.base_url, state_dir=Path(state))
            started = time.monotonic()
            result = await run_worker(
                settings, burst=True, engine=ScriptedEngine(), handle_signals=False
            )
            took = time.monotonic() - started
        problems = sim.ledger.check_job(manifest)
        bodies = [v[0] for k, v in sim.ledger.results.items() if k[0] == project]
        failed = sum(1 for body in bodies if body["status"] == "failed")
        (window,) = sim.outages
        opened = window.opened_at - started if window.opened_at is not None else float("nan")
        answered = sum(1 for c in sim.ledger.calls if c.get("fault") == "outage")
        last_result = max(e["seq"] for e in sim.ledger.events if e["kind"] == "result")
        completed = next(
            e["seq"]
            for e in sim.ledger.events
            if e["kind"] == "status" and e["status"] == "completed"
        )
        ok = not problems and failed == 0 and result.exit_code == 0 and completed > last_result
        print(
            f"{name}: {'OK' if ok else 'FAILED'}: {seconds:g} s {route} outage opened at "
            f"{opened:.1f} s; job of {len(bodies)} results took {took:.1f} s "
            f"(exit {result.exit_code}); {answered} calls answered by the outage; "
            f"{failed} failed results; completed after the last result: "
            f"{completed > last_result}; ledger problems: {problems or 'none'}"
        )
        return ok


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=60.0, help="result-route outage, s")
    parser.add_argument("--media-outage", type=float, default=10.0, help="image-host outage, s")
    args = parser.parse_args()
    os.environ["GOFLOW_API_KEY"] = KEY
    ok = await scenario("result route", "result", args.outage, after=20)
    ok &= await scenario("image hosts", "media", args.media_outage, after=0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
