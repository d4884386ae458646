"""``goflow-gpu prompts``: tools for prompt authors: list, validate, render, try and eval specs."""

from __future__ import annotations

import asyncio
import functools
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


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")]
EngineOpt = Annotated[
    str | None, typer.Option(help="vllm | transformers | openai [env GOFLOW_ENGINE].")
]
ModelOpt = Annotated[str | None, typer.Option(help="Model id or local dir [env GOFLOW_MODEL].")]
OpenAIOpt = Annotated[
    str | None,
    typer.Option(
        "--openai-base-url",
        help="An OpenAI-compatible server (vLLM serve, SGLang, Ollama) to ask instead of a local "
        "model; implies --engine openai [env GOFLOW_OPENAI_BASE_URL].",
        show_default=False,
    ),
]


def _engine_settings(
    config: Path | None, engine: str | None, model: str | None, openai_base_url: str | None
) -> Settings:
    """Settings for a command that runs an engine; configuration errors exit 2."""
    from goflow_gpu.settings import load_settings

    if openai_base_url is not None and engine is None:
        engine = "openai"
    try:
        return load_settings(config, engine=engine, model=model, openai_base_url=openai_base_url)
    except GoFlowError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from None


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
    config: ConfigOpt = None,
    engine: EngineOpt = None,
    model: ModelOpt = None,
    openai_base_url: OpenAIOpt = None,
) -> None:
    """Run one analysis of IMAGE with the configured engine and show what QA makes of it.

    Prints the raw model output, the parsed result (boxes converted to the image's own pixels)
    and the QA verdict with its reasons. Greyscale specs get a greyscale copy of IMAGE, as the
    worker would. Exit code 0 when QA passes, 1 when it fails, 2 for configuration errors.
    """
    settings = _engine_settings(config, engine, model, openai_base_url)
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
    from goflow_gpu.engines import create_engine
    from goflow_gpu.evaluation.runner import Images, ask
    from goflow_gpu.prompts.qa import parse_json_output

    with tempfile.TemporaryDirectory(prefix="goflow-try-") as tmp:
        images = Images(Path(tmp))
        images.size(image)  # an unreadable image fails before the engine loads
        engine = create_engine(settings)
        await engine.start()
        try:
            asked = await ask(
                engine,
                rendered,
                rules,
                image,
                images,
                min_pixels=settings.min_pixels,
                max_pixels=settings.max_pixels,
                request_id=f"try:{rendered.slug}",
            )
        finally:
            await engine.close()
    shown = asked.verdict.result
    if shown is None:
        try:
            shown = parse_json_output(asked.result.text)
        except ValueError:
            shown = None
    return asked.result.text, asked.verdict.passed, asked.verdict.reasons, shown


@app.command("eval")
def eval_catalog(
    labelled_set: Annotated[
        Path,
        typer.Argument(
            help="A labelled set: images plus one <name>.yaml of expected answers per image "
            "(e.g. evalsets/starter).",
            exists=True,
            file_okay=False,
        ),
    ],
    directory: DirOpt = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="A second catalog directory (e.g. the one in production) to run side by side.",
            exists=True,
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where results.json, report.md, report.html go.")
    ] = Path("eval-results"),
    max_regression: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="With --baseline: exit 1 when a field-agreement, QA-pass or schema-valid rate "
            "of any analysis drops by more than this.",
        ),
    ] = 0.05,
    config: ConfigOpt = None,
    engine: EngineOpt = None,
    model: ModelOpt = None,
    openai_base_url: OpenAIOpt = None,
) -> None:
    """Score the catalog's answers on a labelled set; with --baseline, against another catalog.

    Every labelled (image, analysis) pair is asked once per catalog with the configured engine,
    checked by QA as in a job (boxes converted to the image's own pixels), and compared with
    its labels. Per analysis: schema-valid rate, QA pass rate, field agreement (exact for enums
    and booleans, 10% for numbers, set F1 for lists, boxes matched at IoU >= 0.5 with
    precision and recall, a similarity for free text), tokens and seconds per answer. Writes
    results.json, report.md and report.html (images with predicted and expected boxes) into
    --out. Exit code 0, 1 when the candidate regressed past --max-regression, 2 for
    configuration or labelled-set errors.

    \b
    Example:
      goflow-gpu prompts eval evalsets/starter -d my-prompts --baseline prompts --out /tmp/ab
    """
    from goflow_gpu.evaluation import load_labelled_set, score_run, write_reports
    from goflow_gpu.evaluation.scoring import compare

    settings = _engine_settings(config, engine, model, openai_base_url)
    candidate = _load(directory if directory is not None else settings.prompts_dir)
    runs: list[tuple[str, Catalog]] = [(_catalog_name(candidate, "candidate"), candidate)]
    if baseline is not None:
        base = _load(baseline)
        runs.append((_catalog_name(base, "baseline"), base))
    try:
        labelled = load_labelled_set(labelled_set, _schemas(candidate))
        answers = asyncio.run(_evaluate(settings, runs, labelled))
        scored = [
            score_run(name, answers[name], labelled, _schemas(catalog)) for name, catalog in runs
        ]
    except GoFlowError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    comparison = compare(scored[0].summary, scored[1].summary) if len(scored) > 1 else None
    paths = write_reports(out, labelled, scored[0], scored[1] if len(scored) > 1 else None)
    _print_scores(scored, comparison)
    typer.echo(f"reports: {paths['markdown']}, {paths['html']}, {paths['json']}")
    if comparison is not None and comparison.worst_drop > max_regression:
        worst = comparison.regressions[0]
        typer.echo(
            f"REGRESSION: {worst.slug} {worst.metric} dropped by {-(worst.delta or 0.0):.3f} "
            f"(limit {max_regression})",
            err=True,
        )
        raise typer.Exit(1)


def _catalog_name(catalog: Catalog, role: str) -> str:
    return f"{role} ({catalog.source})"


def _schemas(catalog: Catalog) -> dict[str, dict[str, Any]]:
    return {slug: catalog.render(spec).json_schema or {} for slug, spec in catalog.specs.items()}


async def _evaluate(
    settings: Settings, runs: list[tuple[str, Catalog]], labelled: list[Any]
) -> dict[str, list[Any]]:
    """Each catalog's answers on ``labelled``, with one engine, a progress bar on a terminal.

    Between two catalogs the engine's caches are emptied where it has them (vLLM), so the second
    run's seconds per answer are not flattered by the first run's prefix cache.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from goflow_gpu.engines import create_engine
    from goflow_gpu.evaluation.runner import run_catalog

    console = Console(stderr=True)
    engine = create_engine(settings)
    results: dict[str, list[Any]] = {}
    await engine.start()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="goflow-eval-") as tmp,
            Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                disable=not console.is_terminal,
            ) as progress,
        ):
            for name, catalog in runs:
                total = sum(
                    1 for item in labelled for slug in item.expected if slug in catalog.specs
                )
                task = progress.add_task(name, total=total)
                reset = getattr(engine, "reset_caches", None)
                if reset is not None:
                    await reset()
                results[name] = await run_catalog(
                    engine,
                    catalog,
                    labelled,
                    Path(tmp),
                    min_pixels=settings.min_pixels,
                    max_pixels=settings.max_pixels,
                    on_answer=functools.partial(_advance, progress, task),
                )
    finally:
        await engine.close()
    return results


def _advance(progress: Any, task: Any, _answer: Any) -> None:
    progress.advance(task)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _print_scores(scored: list[Any], comparison: Any) -> None:
    """One table per run, analyses as rows (the reports hold every figure)."""
    for run in scored:
        table = Table(title=run.name, title_justify="left")
        for column in ("analysis", "answers", "schema-valid", "QA pass", "agreement", "box P/R",
                       "tokens in/out", "s/answer"):  # fmt: skip
            table.add_column(column, no_wrap=True)
        for slug, row in run.summary.items():
            boxes = (
                "-"
                if row.box_precision is None
                else f"{_percent(row.box_precision)}/{_percent(row.box_recall)}"
            )
            tokens_in, tokens_out = row.prompt_tokens_per_answer, row.generated_tokens_per_answer
            tokens = "-" if tokens_in is None else f"{tokens_in:.0f}/{tokens_out or 0:.0f}"
            seconds = "-" if row.seconds_per_answer is None else f"{row.seconds_per_answer:.2f}"
            table.add_row(
                slug,
                str(row.answers),
                _percent(row.schema_valid_rate),
                _percent(row.qa_pass_rate),
                "-" if row.field_agreement is None else f"{row.field_agreement:.3f}",
                boxes,
                tokens,
                seconds,
            )
        Console(width=130).print(table)
    if comparison is not None:
        if not comparison.regressions:
            typer.echo("no regressions against the baseline")
        for item in comparison.regressions[:10]:
            typer.echo(
                f"regression: {item.slug} {item.metric} {item.baseline:.3f} -> "
                f"{item.candidate:.3f} ({item.delta:+.3f})"
            )
