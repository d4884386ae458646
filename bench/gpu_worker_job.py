"""One full 20 x 25 job through the real worker on a GPU machine, with random weights of the
real Qwen2.5-VL architecture (no download): transformers engine, in-process simulator.

    python bench/gpu_worker_job.py OUTDIR [--arch 7b] [--max-tokens 32] [--batch-size 32]

Random weights cannot answer, so QA fails every answer and each combination is reported as
failed: the figures measure the pipeline and the GPU (prefill of ~1k visual tokens per request,
a short decode), not answer quality. ``--max-tokens`` caps every request so rambling random
output cannot dominate. Writes OUTDIR/gpu_worker_job.json and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", default="7b", choices=["3b", "7b"])
    parser.add_argument("--media", type=int, default=20)
    parser.add_argument("--analyses", type=int, default=25)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model-dir", type=Path, help="real weights instead of random ones")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    (args.out / "gpu_worker_job.json").write_text(text)
    print(text)
    return 0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from goflow_gpu import retry
    from goflow_gpu.engines.base import Engine, InferenceRequest, InferenceResult, Sampling
    from goflow_gpu.engines.hf import TransformersEngine
    from goflow_gpu.engines.tiny import build_random_model_dir
    from goflow_gpu.events import Event, Events
    from goflow_gpu.service import run_worker
    from goflow_gpu.settings import load_settings
    from goflow_gpu.simulator import Simulator

    key = "made-up-gpu-bench-key"
    os.environ["GOFLOW_API_KEY"] = key
    retry.STATS.reset()
    work = Path(tempfile.mkdtemp(prefix="goflow-gpu-bench-"))
    dummy = args.model_dir is None
    model_dir = args.model_dir or build_random_model_dir(work / "model", arch=args.arch)

    class Capped(Engine):
        """Caps max_tokens; everything else is the real transformers engine."""

        name = "transformers"

        def __init__(self, inner: TransformersEngine) -> None:
            self.inner = inner
            self.max_in_flight = inner.max_in_flight
            self.model_label = inner.model_label

        async def start(self) -> None:
            await self.inner.start()

        async def close(self) -> None:
            await self.inner.close()

        async def infer(self, request: InferenceRequest) -> InferenceResult:
            capped = Sampling(max_tokens=args.max_tokens, temperature=request.sampling.temperature)
            return await self.inner.infer(replace(request, sampling=capped))

    seen: dict[str, Any] = {"inference": [], "first_post": None, "prompt": 0, "generated": 0}
    started: dict[tuple[str | None, str | None, int], float] = {}
    t0 = time.monotonic()

    def observe(event: Event) -> None:
        ident = (event.media_id, event.analysis_id, int(event.data.get("attempt", 0)))
        if event.kind == "inference_started":
            started[ident] = event.t
        elif event.kind == "inference_finished":
            seen["inference"].append(event.t - started.pop(ident, event.t))
            seen["prompt"] += event.data.get("prompt_tokens") or 0
            seen["generated"] += event.data.get("generated_tokens") or 0
        elif event.kind == "post_finished" and seen["first_post"] is None:
            seen["first_post"] = event.t - t0

    async with Simulator(api_key=key, seed=1, image_long_side=(800, 1280)) as sim:
        manifest = sim.add_job(media=args.media, analyses=args.analyses)
        settings = load_settings(
            base_url=sim.base_url,
            state_dir=work / "state",
            engine="transformers",
            model=str(model_dir),
            load_format="dummy" if dummy else "auto",
            dtype="bfloat16" if torch.cuda.is_available() else "float32",
            batch_size=args.batch_size,
            max_in_flight=2 * args.batch_size,
            qa_retries=0,
            log_level="WARNING",
        )
        inner = TransformersEngine.from_settings(settings)
        t0 = time.monotonic()
        outcome = await run_worker(
            settings,
            burst=True,
            engine=Capped(inner),
            handle_signals=False,
            events=Events([observe]),
        )
        wall = time.monotonic() - t0
        problems = sim.ledger.check_job(manifest)
    lat = sorted(seen["inference"])
    combos = args.media * args.analyses
    return {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "arch": args.arch,
        "engine": "transformers (random weights, bf16)",
        "job": f"{args.media} x {args.analyses}",
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "wall_seconds_incl_engine_load": round(wall, 2),
        "combinations_per_second": round(combos / wall, 3),
        "time_to_first_post_s": round(seen["first_post"] or 0, 2),
        "inference_latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "inference_latency_p95_s": round(lat[int(len(lat) * 0.95)], 3) if lat else None,
        "prompt_tokens": seen["prompt"],
        "generated_tokens": seen["generated"],
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
        if torch.cuda.is_available()
        else None,
        "exit_code": outcome.exit_code,
        "ledger_problems": problems,
        "retries_by_cause": dict(retry.STATS.by_cause),
    }


if __name__ == "__main__":
    sys.exit(main())
