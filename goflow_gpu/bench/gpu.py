"""The prepared GPU benchmark: ``python -m goflow_gpu.bench.gpu OUTDIR [options]``.

For a machine with one NVIDIA GPU and no network: random weights of the real Qwen2.5-VL-7B (or
3B) architecture (``load_format="dummy"``: the model is built from its config, nothing is
downloaded), the production pixel settings, a 20 x 25 job against the in-process simulator, the
same figures as ``goflow-gpu bench``, written into OUTDIR. Token budgets are capped (random
weights never stop on their own) and QA retries are off, so the run ends within minutes.

``--engine vllm`` (the default where vLLM imports) takes the engine settings of
``configs/h200-7b.yaml`` (scheduler budget, sequences, memory share) and adds the ``offline``
comparison: the same requests through vLLM's own ``LLM.generate``, three times each way, and the
cached-token share of the layout's maximum. ``--engine transformers`` runs the transformers
engine in bf16 (no prefix cache, no offline comparison). ``bench/gpu_bench.sh`` wraps it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from goflow_gpu.settings import Settings

#: the engine settings the vLLM run takes (a node like the production ones)
VLLM_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "h200-7b.yaml"


def default_engine() -> str:
    """vllm where it imports, else transformers."""
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m goflow_gpu.bench.gpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", type=Path, help="directory for results.json, results.md, plots")
    parser.add_argument(
        "--engine",
        choices=("vllm", "transformers"),
        default=None,
        help="default: vllm if it imports, else transformers",
    )
    parser.add_argument("--arch", choices=("7b", "3b"), default="7b")
    parser.add_argument("--media", type=int, default=20)
    parser.add_argument("--analyses", type=int, default=25)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--report-concurrency", type=int, default=8)
    return parser.parse_args(argv)


def gpu_settings(
    engine: str, model_dir: Path, args: argparse.Namespace
) -> tuple[Settings, list[str], str]:
    """The settings of the run, its comparisons, and a one-line description of its shape."""
    from goflow_gpu.settings import load_settings

    common: dict[str, Any] = {
        "model": str(model_dir),
        "model_label": f"qwen2.5vl-{args.arch}-random",
        "load_format": "dummy",
        "dtype": "bfloat16",
        "qa_retries": 0,
    }
    if engine == "vllm":
        settings = load_settings(VLLM_CONFIG, engine="vllm", log_format="console", **common)
        shape = (
            f"max_num_seqs {settings.max_num_seqs}, max_num_batched_tokens "
            f"{settings.max_num_batched_tokens}, in flight {settings.max_in_flight}"
        )
        return settings, ["offline"], shape
    settings = load_settings(
        None,
        engine="transformers",
        device="cuda",
        batch_size=args.batch_size,
        max_in_flight=2 * args.batch_size,
        **common,
    )
    return settings, [], f"batch {args.batch_size}"


def main(argv: list[str] | None = None) -> int:
    """Run the GPU benchmark; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from goflow_gpu.bench.runner import BenchConfig
    from goflow_gpu.bench.suite import run_suite
    from goflow_gpu.engines import create_engine
    from goflow_gpu.engines.tiny import build_random_model_dir
    from goflow_gpu.logs import setup_logging

    console = Console()
    setup_logging("console", "WARNING")
    engine = args.engine or default_engine()
    with tempfile.TemporaryDirectory(prefix="goflow-gpu-bench-") as tmp:
        model_dir = build_random_model_dir(Path(tmp) / f"qwen2.5-vl-{args.arch}", args.arch)
        settings, compare, shape = gpu_settings(engine, model_dir, args)
        config = BenchConfig(
            media=args.media,
            analyses=args.analyses,
            qa_retries=0,
            max_tokens=args.max_tokens,
            report_concurrency=args.report_concurrency,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
            model_dir=str(model_dir),
        )
        console.print(
            f"GPU bench: {engine}, random Qwen2.5-VL-{args.arch}, {args.media} x "
            f"{args.analyses}, max_tokens {args.max_tokens}, {shape}",
            highlight=False,
        )
        result = asyncio.run(
            run_suite(
                create_engine(settings), config, out_dir=args.out, compare=compare, console=console
            )
        )
    baseline = result.runs[0].figures
    return 0 if baseline["ledger_problems"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
