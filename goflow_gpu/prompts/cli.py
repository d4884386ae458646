"""``goflow-gpu prompts``: tools for prompt authors: list, validate, render and try specs."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from goflow_gpu.errors import GoFlowError
from goflow_gpu.prompts.catalog import Catalog, CatalogError, lint_catalog, load_catalog
from goflow_gpu.prompts.spec import PromptSpec, QARules, RenderedPrompt

if TYPE_CHECKING:
    from goflow_gpu.settings import Settings

app = typer.Typer(
    help=(
        "Tools for prompt authors. Each analysis type is one YAML file in the prompt catalog "
        "(prompts/<slug>.yaml, plus _catalog.yaml with the shared system prompt). List the "
        "specs, validate a catalog before shipping it, render the exact texts a job sends, and "
        "try a spec on an image with the configured engine. How to write a spec: PROMPTS.md."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        "-d",
        help="Catalog directory to use instead of the shipped one (or settings' prompts_dir).",
        show_default=False,
    ),
]


def _load(directory: Path | None) -> Catalog:
    try:
        return load_catalog(directory)
    except CatalogError as exc:
        for problem in exc.problems:
            typer.echo(problem, err=True)
        typer.echo(
            f"the catalog has {len(exc.problems)} problem(s); "
            "run `goflow-gpu prompts validate` for details",
            err=True,
        )
        raise typer.Exit(1) from None


def _spec(catalog: Catalog, slug: str) -> PromptSpec:
    if slug not in catalog.specs:
        typer.echo(
            f"note: '{slug}' is not in the catalog ({catalog.source}); "
            "showing the generic fallback spec the worker would use",
            err=True,
        )
    return catalog.spec_for(slug)


@app.command("list")
def list_specs(directory: DirOpt = None) -> None:
    """List the specs of the catalog: slug, name, image variant and version."""
    catalog = _load(directory)
    table = Table(title=f"prompt catalog: {catalog.source}", title_justify="left")
    for column in ("slug", "name", "variant", "version"):
        table.add_column(column, no_wrap=True)
    for slug in sorted(catalog.specs):
        spec = catalog.specs[slug]
        table.add_row(spec.slug, spec.name, spec.variant, str(spec.version))
    Console(width=120).print(table)
    typer.echo(f"{len(catalog.specs)} specs")


@app.command("validate")
def validate(
    directory: Annotated[
        Path | None,
        typer.Argument(help="Catalog directory to check. Default: the shipped catalog."),
    ] = None,
) -> None:
    """Check a catalog the way the worker loads it, and lint it.

    Errors (exit code 1), one per line as FILE:LINE: message: invalid YAML, unknown or missing
    keys, wrong types, an invalid JSON schema (draft 2020-12), a missing or unknown image
    variant, a slug that differs from the file name, duplicate slugs.

    Warnings (exit code 0 when there are only warnings): a system-prompt override (the image
    prefix is no longer shared, so each such analysis prefills the image again), unbounded
    schema parts (strings without maxLength, arrays without maxItems, numbers without minimum
    and maximum, objects that allow extra or optional properties), fields the user prompt never
    names, boxes without the coordinate space in the prompt, temperature above 0.
    """
    errors, warnings = lint_catalog(directory)
    for line in errors:
        typer.echo(line)
    for line in warnings:
        typer.echo(f"warning: {line}")
    typer.echo(f"{len(errors)} error(s), {len(warnings)} warning(s)")
    if errors:
        raise typer.Exit(1)


@app.command("render")
def render(
    slug: Annotated[str, typer.Argument(help="The analysis slug, e.g. object-detection.")],
    directory: DirOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (machine-readable).")
    ] = False,
) -> None:
    """Show exactly what a job sends for SLUG: system text, user text, schema and sampling.

    These are the texts reported as systemPromptUsed / userPromptUsed. The image goes first in
    the user turn, before the user text. An unknown slug shows the generic fallback spec.
    """
    catalog = _load(directory)
    spec = _spec(catalog, slug)
    rendered = catalog.render(spec)
    if as_json:
        payload = rendered.model_dump(mode="json")
        payload["qa"] = spec.qa.model_dump(mode="json")
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    typer.echo(
        f"{rendered.slug} v{rendered.version}  variant={rendered.variant}  "
        f"max_tokens={rendered.max_tokens}  temperature={rendered.temperature}"
    )
    shared = "override" if spec.system_prompt else "shared"
    typer.echo(f"\n--- system prompt ({shared}) ---\n{rendered.system_prompt}")
    typer.echo(f"\n--- user prompt (after the image) ---\n{rendered.user_prompt}")
    typer.echo(f"\n--- json schema ---\n{json.dumps(rendered.json_schema, indent=2)}")
    typer.echo(f"\n--- qa rules ---\n{json.dumps(spec.qa.model_dump(mode='json'), indent=2)}")


@app.command("try")
def try_spec(
    slug: Annotated[str, typer.Argument(help="The analysis slug, e.g. object-detection.")],
    image: Annotated[
        Path, typer.Argument(help="An image file (JPEG, PNG, ...).", exists=True, dir_okay=False)
    ],
    directory: DirOpt = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML settings file.")
    ] = None,
    engine: Annotated[
        str | None, typer.Option(help="vllm | transformers | openai [env GOFLOW_ENGINE].")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model id or local dir [env GOFLOW_MODEL].")
    ] = None,
) -> None:
    """Run one analysis of IMAGE with the configured engine and show what QA makes of it.

    Prints the raw model output, the parsed result (boxes converted to the image's own pixels)
    and the QA verdict with its reasons. Greyscale specs get a greyscale copy of IMAGE, as the
    worker would. Exit code 0 when QA passes, 1 when it fails, 2 for configuration errors.
    """
    from goflow_gpu.settings import load_settings

    try:
        settings = load_settings(config, engine=engine, model=model)
    except GoFlowError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    catalog = _load(directory if directory is not None else settings.prompts_dir)
    spec = _spec(catalog, slug)
    rendered = catalog.render(spec)
    try:
        outcome = asyncio.run(_run_once(settings, rendered, spec.qa, image))
    except GoFlowError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    raw, verdict_passed, reasons, result = outcome
    shown_raw = raw if raw.strip() else f"(blank) {raw[:80]!r}"
    typer.echo(f"--- raw output ---\n{shown_raw}")
    typer.echo(f"\n--- parsed result ---\n{json.dumps(result, indent=2, ensure_ascii=False)}")
    typer.echo("\n--- qa verdict ---\n" + ("PASS" if verdict_passed else "FAIL"))
    for reason in reasons:
        typer.echo(f"- {reason}")
    if not verdict_passed:
        raise typer.Exit(1)


async def _run_once(
    settings: Settings, rendered: RenderedPrompt, rules: QARules, image: Path
) -> tuple[str, bool, list[str], dict[str, Any] | None]:
    from PIL import Image, UnidentifiedImageError

    from goflow_gpu.engines import create_engine
    from goflow_gpu.engines.base import InferenceRequest, Sampling
    from goflow_gpu.errors import MediaError
    from goflow_gpu.prompts.qa import judge, parse_json_output

    with tempfile.TemporaryDirectory(prefix="goflow-try-") as tmp:
        try:
            with Image.open(image) as img:
                original = img.size
                path = image
                if rendered.variant == "greyscale" and img.mode != "L":
                    path = Path(tmp) / "greyscale.png"
                    img.convert("L").save(path)
        except (OSError, UnidentifiedImageError) as exc:
            raise MediaError(f"cannot open image {image}: {exc}") from None
        engine = create_engine(settings)
        await engine.start()
        try:
            result = await engine.infer(
                InferenceRequest(
                    request_id=f"try:{rendered.slug}",
                    image_path=path,
                    system_prompt=rendered.system_prompt,
                    user_prompt=rendered.user_prompt,
                    json_schema=rendered.json_schema,
                    sampling=Sampling(
                        max_tokens=rendered.max_tokens, temperature=rendered.temperature
                    ),
                    group_key=("try", rendered.variant),
                )
            )
        finally:
            await engine.close()
    verdict = judge(
        result,
        rendered,
        rules,
        original_size=original,
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
    )
    shown = verdict.result
    if shown is None:
        try:
            shown = parse_json_output(result.text)
        except ValueError:
            shown = None
    return result.text, verdict.passed, verdict.reasons, shown
