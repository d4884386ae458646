"""``goflow-gpu dev``: developer commands that build local model directories (no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

dev_app = typer.Typer(
    help="Developer tools: build local model directories for tests, the demo and benchmarks.",
    no_args_is_help=True,
)


@dev_app.command("tiny-model")
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Where to write the model (created).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build a tiny random-weight Qwen2.5-VL (a few MB) that vLLM and transformers load.

    Its answers mean nothing: it exists to run the whole flow on a laptop. No network needed.
    """
    from goflow_gpu.engines.tiny import build_tiny_model, directory_size

    path = build_tiny_model(directory, seed=seed)
    size_mb = directory_size(path) / 1e6
    typer.echo(f"tiny Qwen2.5-VL (random weights) written to {path} ({size_mb:.1f} MB)")


@dev_app.command("random-arch")
def random_arch(
    directory: Annotated[Path, typer.Argument(help="Where to write the config (created).")],
    arch: Annotated[str, typer.Option(help="Architecture: 3b or 7b.")] = "7b",
) -> None:
    """Write a weightless model dir of the real Qwen2.5-VL-3B/7B shapes.

    Load it with ``load_format: dummy`` (random weights) to benchmark the real architecture
    without downloading weights. The tokenizer is the tiny one, so the text means nothing.
    """
    from goflow_gpu.engines.tiny import build_random_model_dir

    name: Literal["3b", "7b"]
    if arch.lower() == "3b":
        name = "3b"
    elif arch.lower() == "7b":
        name = "7b"
    else:
        typer.echo(f"unknown --arch {arch!r}: choose 3b or 7b", err=True)
        raise typer.Exit(2)
    path = build_random_model_dir(directory, arch=name)
    typer.echo(f"Qwen2.5-VL-{name.upper()} architecture (no weights) written to {path}")


@dev_app.command("train-tiny")
def train_tiny(
    directory: Annotated[Path, typer.Argument(help="Where to write the trained model (created).")],
    steps: Annotated[int, typer.Option(help="Optimizer steps (batches of --batch scenes).")] = 1150,
    batch: Annotated[int, typer.Option(help="Scenes per step.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the data order and the initial weights.")] = 0,
    eval_every: Annotated[int, typer.Option(help="Grade held-out scenes every N steps.")] = 400,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-3,
    warmup: Annotated[int, typer.Option(help="Warm-up steps before the cosine decay.")] = 100,
    mix: Annotated[
        list[str] | None,
        typer.Option(
            "--mix",
            metavar="SLUG=SHARE",
            help="Share of the batches that ask this analysis (repeat for each; default "
            "object-detection=0.65, text-recognition=0.3, people-count=0.05).",
        ),
    ] = None,
    layout_weight: Annotated[
        float,
        typer.Option(
            help="Weight of the layout loss (each image token: its row, column, what covers it "
            "and that shape's box; a training-only head). 0 trains on the answers alone."
        ),
    ] = 0.2,
    attention_weight: Annotated[
        float,
        typer.Option(
            help="Weight of the attention loss (while the answer writes about a shape or the "
            "word, one head per block looks at its image tokens). 0 leaves attention free."
        ),
    ] = 0.5,
    shapes: Annotated[
        str | None,
        typer.Option(
            metavar="LO-HI",
            help="Fewest and most shapes in a training scene (and the held-out ones); default "
            "what the simulator draws, 1-3. Fewer first is a cheap curriculum: 1-1, then 1-3.",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="cpu, or cuda on a GPU node (same recipe, minutes not hours).")
    ] = "cpu",
    continue_from: Annotated[
        Path | None,
        typer.Option(
            "--continue-from",
            help="Start from a folder this command wrote (its weights and tokenizer), on "
            "scenes it has not seen; its record is kept in the new training.json.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    prompts_dir: Annotated[
        Path | None,
        typer.Option("--prompts-dir", "-d", help="Prompt catalog to learn (default: shipped)."),
    ] = None,
) -> None:
    """Train the tiny Qwen2.5-VL on the simulator's labelled scenes (no network).

    It learns object-detection (shapes named and boxed), text-recognition (the word and its
    box) and people-count (nobody) with the catalog's real prompts and schemas, and prints
    the loss and held-out grades as it goes. The defaults take about an hour on 2 CPU cores;
    training.json in the folder records the exact command. `goflow-gpu demo --model DIR`
    grades the result. scripts/rebuild-scene-model.sh chains such runs from random weights
    (one shape per scene first, then more), each continuing the one before.
    """
    import shlex
    import sys

    from goflow_gpu.engines.train import TrainConfig, train

    shares = TrainConfig().mix if not mix else _parse_mix(mix)
    cfg = TrainConfig(
        mix=shares,
        steps=steps,
        batch=batch,
        seed=seed,
        eval_every=eval_every,
        lr=lr,
        warmup=warmup,
        layout_weight=layout_weight,
        attention_weight=attention_weight,
        shapes=TrainConfig().shapes if shapes is None else _parse_shapes(shapes),
        device=device,
    )
    command = "goflow-gpu " + shlex.join(sys.argv[1:])
    final = train(
        directory,
        cfg,
        catalog_dir=prompts_dir,
        command=command,
        echo=typer.echo,
        continue_from=continue_from,
    )
    typer.echo(f"trained model written to {directory}")
    for summary in final.values():
        typer.echo(f"  {summary.line()}")


def _parse_shapes(text: str) -> tuple[int, int]:
    """``"1-3"`` -> (1, 3), ``"2"`` -> (2, 2); exit 2 naming the value unless
    1 <= LO <= HI <= the most shapes a scene holds."""
    from goflow_gpu.simulator.images import SCENE_MAX_SHAPES

    low, dash, high = text.partition("-")
    try:
        bounds = (int(low), int(high if dash else low))
    except ValueError:
        bounds = (0, 0)
    if not 1 <= bounds[0] <= bounds[1] <= SCENE_MAX_SHAPES:
        typer.echo(
            f"--shapes {text!r}: expected LO-HI with 1 <= LO <= HI <= {SCENE_MAX_SHAPES}"
            f" (e.g. 1-{SCENE_MAX_SHAPES})",
            err=True,
        )
        raise typer.Exit(2)
    return bounds


def _parse_mix(items: list[str]) -> dict[str, float]:
    """``["object-detection=0.8", ...]`` -> shares; exit 2 naming a malformed or unknown item."""
    from goflow_gpu.engines.scene_answers import LEARNED_ANALYSES

    shares: dict[str, float] = {}
    for item in items:
        slug, _, share = item.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if slug not in LEARNED_ANALYSES or value <= 0:
            typer.echo(
                f"--mix {item!r}: expected SLUG=SHARE with a share above 0 and a slug among "
                f"{', '.join(LEARNED_ANALYSES)}",
                err=True,
            )
            raise typer.Exit(2)
        shares[slug] = value
    return shares
