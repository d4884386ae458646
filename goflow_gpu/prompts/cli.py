"""``goflow-gpu prompts``: tools for prompt authors: list, validate, render, try and eval specs."""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import functools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from goflow_gpu.errors import GoFlowError
from goflow_gpu.prompts.catalog import (
    Catalog,
    CatalogReport,
    fallback_spec,
    inspect_catalog,
    shipped_catalog_dir,
)
from goflow_gpu.prompts.result import result_schema
from goflow_gpu.prompts.spec import PromptSpec, QARules, RenderedPrompt

if TYPE_CHECKING:
    from goflow_gpu.settings import Settings

app = typer.Typer(
    help=(
        "Tools for prompt authors. Each analysis type is one YAML file in the prompt catalog "
        "(prompts/<slug>.yaml, plus _catalog.yaml with the shared system prompt). List the "
        "specs, validate a catalog before shipping it, render the exact texts a job sends, "
        "try a spec on an image with the configured engine, check token budgets, generate the "
        "customer reference (docs/ANALYSES.md) and lock versions. How to write a spec: "
        "PROMPTS.md."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

PromptsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--prompts-dir",
        "-d",
        help="The prompt catalog directory. Default: settings' prompts_dir (GOFLOW_PROMPTS_DIR "
        "or the --config file), else the shipped catalog. Each command names the catalog it "
        "used on stderr.",
        show_default=False,
    ),
]
FallbackOpt = Annotated[
    bool,
    typer.Option(
        "--fallback",
        help="For a slug the catalog lacks, use the generic fallback spec the worker would "
        "use (instead of exit 2).",
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


# --- which catalog ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogChoice:
    """The catalog a command uses and where that choice came from.

    Every prompt command resolves it the same way as the worker (``-d``, else settings'
    ``prompts_dir`` from GOFLOW_PROMPTS_DIR or the config file, else the shipped catalog), so
    what an author lists, renders and validates is what ``serve`` would load.
    """

    directory: Path | None  # None: the shipped catalog
    origin: str

    @property
    def path(self) -> Path:
        return (self.directory if self.directory is not None else shipped_catalog_dir()).resolve()

    @property
    def shipped(self) -> bool:
        return self.path == shipped_catalog_dir().resolve()


def _choose(
    directory: Path | None, config: Path | None, settings: Settings | None = None
) -> CatalogChoice:
    """Resolve the catalog and name it on stderr (stdout stays the command's output)."""
    if directory is not None:
        choice = CatalogChoice(directory, "-d")
    else:
        if settings is None:
            from goflow_gpu.settings import load_settings

            try:
                settings = load_settings(config)
            except GoFlowError as exc:
                typer.echo(f"configuration error: {exc}", err=True)
                raise typer.Exit(2) from None
        if settings.prompts_dir is None:
            choice = CatalogChoice(None, "shipped")
        elif any(name.upper() == "GOFLOW_PROMPTS_DIR" for name in os.environ):
            choice = CatalogChoice(settings.prompts_dir, "GOFLOW_PROMPTS_DIR")
        else:
            choice = CatalogChoice(settings.prompts_dir, f"prompts_dir in {config or 'settings'}")
    label = choice.origin
    if choice.shipped and choice.origin != "shipped":
        label += ", the shipped catalog"
    typer.echo(f"catalog: {choice.path} ({label})", err=True)
    return choice


def _load(directory: Path | None) -> Catalog:
    """The whole catalog, or exit 1 listing every problem: for commands that judge the set
    (budget, reference, lock, eval), which must not pass over a spec that does not load."""
    report = inspect_catalog(directory)
    if report.errors or report.catalog is None:
        _fail(
            report.errors,
            f"the catalog has {len(report.errors)} problem(s); "
            "run `goflow-gpu prompts validate` for details",
        )
    return report.catalog


def _inspect(directory: Path | None) -> tuple[Catalog, CatalogReport]:
    """The specs that load, for commands about single specs (list, render, try): a broken spec
    file is reported but does not hide the others. Exit 1 when the catalog as a whole cannot
    be used (no directory, a broken _catalog.yaml)."""
    report = inspect_catalog(directory)
    if report.catalog is None:
        _fail(
            report.errors,
            f"the catalog cannot be used ({len(report.errors)} problem(s)); "
            "run `goflow-gpu prompts validate` for details",
        )
    return report.catalog, report


def _spec(catalog: Catalog, report: CatalogReport, slug: str, fallback: bool) -> PromptSpec:
    """The spec of ``slug``; a broken one exits 1 with its problems, an unknown one exits 2
    with the closest slugs, unless ``fallback`` asks for the worker's generic spec."""
    spec = catalog.specs.get(slug)
    if spec is not None:
        if report.broken:
            names = ", ".join(sorted(report.broken))
            typer.echo(
                f"note: {len(report.broken)} other spec file(s) do not load ({names}); "
                "run `goflow-gpu prompts validate`",
                err=True,
            )
        return spec
    if slug in report.broken:
        _fail(report.broken[slug], f"the spec file of '{slug}' does not load")
    if fallback:
        typer.echo(
            f"note: '{slug}' is not in the catalog ({catalog.source}); showing the generic "
            "fallback spec the worker would use for it",
            err=True,
        )
        return fallback_spec(slug)
    hint = _suggest(slug, sorted({*catalog.specs, *report.broken}))
    typer.echo(
        f"error: no analysis '{slug}' in the catalog ({catalog.source}); {hint} "
        "(--fallback shows the generic spec the worker would use for it)",
        err=True,
    )
    raise typer.Exit(2)


@app.command("list")
def list_specs(directory: PromptsDirOpt = None, config: ConfigOpt = None) -> None:
    """List the specs of the catalog: slug, name, image variant and version.

    A spec file that does not load is listed as BROKEN, its problems printed on stderr, and
    the exit code is 1 (0 when every spec loads), so a script notices.
    """
    catalog, report = _inspect(_choose(directory, config).directory)
    table = Table(title=f"prompt catalog: {catalog.source}", title_justify="left")
    for column in ("slug", "name", "variant", "version"):
        table.add_column(column, no_wrap=True)
    for slug in sorted({*catalog.specs, *report.broken}):
        spec = catalog.specs.get(slug)
        if spec is None:
            table.add_row(slug, f"BROKEN ({len(report.broken[slug])} problem(s))", "-", "-")
        else:
            table.add_row(spec.slug, spec.name, spec.variant, str(spec.version))
    Console(width=120).print(table)
    for problems in report.broken.values():
        for problem in problems:
            typer.echo(problem, err=True)
    if report.broken:
        typer.echo(f"{len(catalog.specs)} specs, {len(report.broken)} broken (see stderr)")
        raise typer.Exit(1)
    typer.echo(f"{len(catalog.specs)} specs")


@app.command("validate")
def validate(
    legacy_directory: Annotated[
        Path | None,
        typer.Argument(
            metavar="[DIRECTORY]",
            help="Deprecated: use -d DIRECTORY. The catalog directory to check.",
            show_default=False,
        ),
    ] = None,
    directory: PromptsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Check a catalog the way the worker loads it, and lint it.

    Errors (exit code 1), one per line as FILE:LINE: message: invalid YAML, unknown or missing
    keys, wrong types, an invalid JSON schema (draft 2020-12), a schema no answer can satisfy
    (a required field not in properties while additionalProperties is false or whose schema is
    false, minItems > maxItems, minLength > maxLength, minimum > maximum, an empty enum, ...),
    a missing or unknown image variant, a slug that differs from the file name, duplicate
    slugs; a spec whose content changed while its version did not (against the catalog's
    _catalog.lock; the shipped catalog must have one). Schema errors name the field, e.g.
    objects[].name.

    Warnings (exit code 0 when there are only warnings): a system-prompt override (the image
    prefix is no longer shared, so each such analysis prefills the image again), unbounded
    schema parts (strings without maxLength, arrays without maxItems, numbers without minimum
    and maximum, objects that allow extra or optional properties), fields the user prompt never
    names, boxes without the coordinate space in the prompt, temperature above 0, a version
    the lock does not hold yet (run `goflow-gpu prompts lock`).
    """
    if legacy_directory is not None:
        if directory is not None and directory != legacy_directory:
            typer.echo("error: give the catalog directory once, with -d", err=True)
            raise typer.Exit(2)
        typer.echo(
            "note: `prompts validate DIRECTORY` is deprecated; use `prompts validate -d DIRECTORY`",
            err=True,
        )
        directory = legacy_directory
    choice = _choose(directory, config)
    report = inspect_catalog(choice.directory)
    errors, warnings = list(report.errors), report.warnings()
    if report.catalog is not None:
        lock_errors, lock_warnings = _lock_findings(report, report.catalog, choice)
        errors += lock_errors
        warnings += lock_warnings
    for line in errors:
        typer.echo(line)
    for line in warnings:
        typer.echo(f"warning: {line}")
    typer.echo(f"{len(errors)} error(s), {len(warnings)} warning(s)")
    if errors:
        raise typer.Exit(1)


def _lock_findings(
    report: CatalogReport, catalog: Catalog, choice: CatalogChoice
) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of the catalog's lock, as FILE:LINE lines (the spec's version).

    The same :func:`~goflow_gpu.prompts.lock.audit_lock` as ``prompts lock --check``; only
    the severity differs: content changed under the same version, or a lock that is missing
    (shipped catalog) or unreadable, is an error; an entry the lock does not hold yet is a
    warning (``prompts lock`` records it, ``lock --check`` refuses it). A custom catalog without
    a lock has nothing to check.
    """
    from goflow_gpu.prompts.lock import LOCK_FILE, audit_lock

    path = report.directory / LOCK_FILE
    if not choice.shipped and not path.is_file():
        return [], []
    audit = audit_lock(catalog, path, required=choice.shipped, ignore=report.broken)

    def where(slug: str) -> str:
        return report.where(slug, ("version",)) if slug in catalog.specs else f"{path}:0"

    errors = [*audit.unusable]
    errors += [f"{where(slug)}: {why}" for slug, why in audit.refused.items()]
    warnings = [f"{where(slug)}: {slug}: {why}" for slug, why in audit.stale.items()]
    return errors, warnings


@app.command("render")
def render(
    slug: Annotated[str, typer.Argument(help="The analysis slug, e.g. object-detection.")],
    directory: PromptsDirOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (machine-readable).")
    ] = False,
    fallback: FallbackOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Show exactly what a job sends for SLUG: system text, user text, schema and sampling.

    These are the texts reported as systemPromptUsed / userPromptUsed. The image goes first in
    the user turn, before the user text. An unknown slug is an error (exit 2, with the closest
    slugs) unless --fallback, which shows the generic spec the worker would use for it. Other
    spec files that do not load are named on stderr but do not stop SLUG.
    """
    catalog, report = _inspect(_choose(directory, config).directory)
    spec = _spec(catalog, report, slug, fallback)
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
    directory: PromptsDirOpt = None,
    fallback: FallbackOpt = False,
    config: ConfigOpt = None,
    engine: EngineOpt = None,
    model: ModelOpt = None,
    openai_base_url: OpenAIOpt = None,
) -> None:
    """Run one analysis of IMAGE with the configured engine and show what QA makes of it.

    Prints the raw model output, the parsed result (boxes converted to the image's own pixels)
    and the QA verdict with its reasons. Greyscale specs get a greyscale copy of IMAGE, as the
    worker would. An unknown slug is an error (with the closest slugs) unless --fallback. Exit
    code 0 when QA passes, 1 when it fails, 2 for configuration errors and unknown slugs.
    """
    settings = _engine_settings(config, engine, model, openai_base_url)
    catalog, report = _inspect(_choose(directory, config, settings).directory)
    spec = _spec(catalog, report, slug, fallback)
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
    directory: PromptsDirOpt = None,
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
    every_analysis: Annotated[
        bool,
        typer.Option(
            "--every-analysis",
            help="Ask every analysis of the catalog for every image, labelled or not: the "
            "unlabelled ones count for the schema-valid, QA-pass, repaired and consistent "
            "rates (not for agreement).",
        ),
    ] = False,
    analysis: Annotated[
        list[str] | None,
        typer.Option(
            "--analysis",
            "-a",
            help="Score only this analysis slug (repeat for more); default: every labelled one.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    engine: EngineOpt = None,
    model: ModelOpt = None,
    openai_base_url: OpenAIOpt = None,
) -> None:
    """Score the catalog's answers on a labelled set; with --baseline, against another catalog.

    Every labelled (image, analysis) pair is asked once per catalog with the configured engine,
    checked by QA as in a job (boxes converted to the image's own pixels), and compared with
    its labels. Per analysis: schema-valid rate, QA pass rate, the share of passed answers QA
    repaired and the share whose fields agree with each other, field agreement (exact for enums
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
    candidate = _load(_choose(directory, config, settings).directory)
    runs: list[tuple[str, Catalog]] = [(_catalog_name(candidate, "candidate"), candidate)]
    if baseline is not None:
        typer.echo(f"baseline catalog: {baseline.resolve()} (--baseline)", err=True)
        base = _load(baseline)
        runs.append((_catalog_name(base, "baseline"), base))
    try:
        labelled = load_labelled_set(labelled_set, _schemas(candidate))
        if analysis:
            labelled = _only(labelled, analysis, candidate)
        answers = asyncio.run(_evaluate(settings, runs, labelled, every_analysis=every_analysis))
        # The set is labelled for the candidate's results; a baseline with other result
        # fields (an older catalog) is scored on the fields it shares with them.
        scored = [
            score_run(name, answers[name], labelled, _schemas(catalog), strict=index == 0)
            for index, (name, catalog) in enumerate(runs)
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


def _suggest(slug: str, known: list[str]) -> str:
    """``did you mean 'x'?`` for a mistyped slug, else where the slugs are listed."""
    close = difflib.get_close_matches(slug, known, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"'{name}'" for name in close) + "?"
    return "`goflow-gpu prompts list` shows the slugs"


def _only(labelled: list[Any], slugs: list[str], catalog: Catalog) -> list[Any]:
    """The labelled set with only ``slugs``' labels; an unknown slug is an error (exit 2)."""
    from goflow_gpu.evaluation.labels import EvalSetError

    for slug in slugs:
        if slug not in catalog.specs:
            hint = _suggest(slug, sorted(catalog.specs))
            raise EvalSetError(f"--analysis: no analysis '{slug}' in the catalog; {hint}")
    return [
        dataclasses.replace(image, expected={k: v for k, v in image.expected.items() if k in slugs})
        for image in labelled
    ]


def _fail(problems: list[str], summary: str) -> NoReturn:
    """Print each problem and a summary line on stderr, then exit 1."""
    for problem in problems:
        typer.echo(problem, err=True)
    typer.echo(summary, err=True)
    raise typer.Exit(1)


def _catalog_name(catalog: Catalog, role: str) -> str:
    return f"{role} ({catalog.source})"


def _schemas(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """The result schema of each analysis: labels describe results, not the model's answers."""
    return {slug: result_schema(spec.json_schema, spec.qa) for slug, spec in catalog.specs.items()}


async def _evaluate(
    settings: Settings,
    runs: list[tuple[str, Catalog]],
    labelled: list[Any],
    *,
    every_analysis: bool = False,
) -> dict[str, list[Any]]:
    """Each catalog's answers on ``labelled``, with one engine, a progress bar on a terminal.

    Between two catalogs the engine's caches are emptied where it has them (vLLM), so the second
    run's seconds per answer are not flattered by the first run's prefix cache.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from goflow_gpu.engines import create_engine
    from goflow_gpu.evaluation.runner import pairs_to_ask, run_catalog

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
                total = len(pairs_to_ask(catalog, labelled, every_analysis=every_analysis))
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
                    every_analysis=every_analysis,
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
        for column in ("analysis", "answers", "schema-valid", "QA pass", "repaired",
                       "consistent", "agreement", "box P/R", "tokens in/out",
                       "s/answer"):  # fmt: skip
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
                _percent(row.repaired_rate),
                _percent(row.consistent_rate),
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


# --- budget, reference, lock -------------------------------------------------------------------


def _project_root() -> Path | None:
    """The source checkout the shipped catalog lives in (with docs/), or ``None`` (a wheel)."""
    from goflow_gpu.prompts.catalog import shipped_catalog_dir

    root = shipped_catalog_dir().resolve().parent
    return root if (root / "pyproject.toml").is_file() and (root / "docs").is_dir() else None


@app.command("budget")
def budget(
    directory: PromptsDirOpt = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help="A local model folder whose tokenizer counts the tokens, e.g. "
            "/models/Qwen2.5-VL-7B-Instruct. Default: settings' model when it is such a folder, "
            "else the tiny test model's tokenizer (built on first use; a conservative count).",
            show_default=False,
        ),
    ] = None,
    show: Annotated[
        str | None,
        typer.Option(
            "--show", help="Also print the worst-case answer of this slug.", show_default=False
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Check each spec's token budget against the longest answer its JSON schema allows.

    The worst case fills every property, every array to maxItems and every string to maxLength
    with dense Latin-script sample text (OCR-like: capitals, digits, punctuation), takes the
    costliest enum value, integer bound and anyOf branch, renders it as the compact JSON vLLM's
    structured decoding writes, and counts it with the tokenizer, plus the end-of-turn token.
    Text in other scripts can need more tokens: such an answer is cut off and re-asked with
    qa.retry_max_tokens.

    A spec is REFUSED when sampling.max_tokens is below its worst case, when
    qa.retry_max_tokens is below max_tokens, or when its schema has no bound (a string without
    maxLength, an array without maxItems). Numbers without multipleOf have no token bound: they
    count 12 tokens each, with a warning. Exit code 0, 2 when any spec is refused, 1 when the
    catalog does not load.
    """
    from goflow_gpu.prompts.budget import (
        check_specs,
        default_tokenizer_dir,
        load_tokenizer,
        render_json,
    )

    catalog = _load(_choose(directory, config).directory)
    try:
        if tokenizer is not None:
            folder, label = tokenizer, f"{tokenizer}"
        else:
            folder, label = default_tokenizer_dir(_configured_model(config))
        counter = load_tokenizer(folder, label)
    except GoFlowError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    budgets = check_specs(catalog.specs.values(), counter.count)
    typer.echo(f"tokenizer: {counter.label}")
    table = Table(title=f"token budgets: {catalog.source}", title_justify="left")
    for column in ("slug", "worst case", "max_tokens", "headroom", "retry", "verdict"):
        numeric = column not in ("slug", "verdict")
        table.add_column(column, no_wrap=True, justify="right" if numeric else "left")
    for item in budgets:
        verdict = "REFUSED" if item.refused else ("ok, warnings" if item.warnings else "ok")
        table.add_row(
            item.slug,
            "-" if item.worst_case is None else str(item.worst_case),
            str(item.max_tokens),
            "-" if item.headroom is None else f"{item.headroom:+d}",
            "-" if item.retry_max_tokens is None else str(item.retry_max_tokens),
            verdict,
        )
    Console(width=120).print(table)
    for item in budgets:
        for line in item.errors:
            typer.echo(f"{item.slug}: {line}")
        for line in item.warnings:
            typer.echo(f"warning: {item.slug}: {line}")
    for item in budgets:
        if item.slug == show:
            typer.echo(f"--- worst-case answer of {item.slug} ---\n{render_json(item.answer)}")
    refused = [item.slug for item in budgets if item.refused]
    typer.echo(f"{len(budgets)} spec(s), {len(refused)} refused")
    if refused:
        raise typer.Exit(2)


def _configured_model(config: Path | None) -> str | None:
    """Settings' model (flags, env, YAML), or ``None`` when the settings do not load."""
    from goflow_gpu.settings import load_settings

    try:
        return load_settings(config).model
    except GoFlowError:
        if config is not None:
            raise
        return None


@app.command("reference")
def reference(
    directory: PromptsDirOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where to write the markdown. Default: docs/ANALYSES.md of the source checkout.",
            show_default=False,
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option("--check", help="Write nothing; exit 1 when the file is not current."),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Generate the customer-facing reference of the analysis types (docs/ANALYSES.md).

    One section per spec: name, slug, version, description and a table of the fields of its
    final analysisResult in result order, with JSON type, source (model, computed, pixels,
    log-probabilities, worker) and meaning. Meanings come from the specs: each json_schema
    property's description, each qa.computed / qa.logprob_confidence entry's description, the
    pixel fact registry. A field without a description is an error (all are listed, exit 1).
    CI checks the checked-in file is current (--check). The default --out is for the shipped
    catalog only: another catalog's reference needs an explicit --out.
    """
    from goflow_gpu.prompts.reference import ReferenceError, render_reference

    choice = _choose(directory, config)
    catalog = _load(choice.directory)
    if out is None and not choice.shipped:
        typer.echo(
            f"error: docs/ANALYSES.md describes the shipped catalog, not {choice.path}: pass "
            "--out for this one",
            err=True,
        )
        raise typer.Exit(2)
    target = out if out is not None else _default_doc("ANALYSES.md")
    try:
        text = render_reference(catalog)
    except ReferenceError as exc:
        _fail(exc.problems, f"{len(exc.problems)} problem(s): the reference was not written")
    if check:
        _check_current(target, text, "goflow-gpu prompts reference")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {target} ({len(catalog.specs)} analysis types)")


def _default_doc(name: str) -> Path:
    root = _project_root()
    if root is None:
        typer.echo(f"error: not in a source checkout: pass the path of {name} with --out", err=True)
        raise typer.Exit(2)
    return root / "docs" / name


def _check_current(target: Path, text: str, command: str) -> None:
    """Exit 1 with a diff summary when ``target`` does not hold ``text``."""
    import difflib

    current = target.read_text(encoding="utf-8") if target.is_file() else ""
    if current == text:
        typer.echo(f"{target} is current")
        return
    diff = list(
        difflib.unified_diff(
            current.splitlines(), text.splitlines(), str(target), "generated", lineterm="", n=0
        )
    )
    removed = sum(1 for line in diff if line.startswith("-") and not line.startswith("---"))
    added = sum(1 for line in diff if line.startswith("+") and not line.startswith("+++"))
    state = "missing" if not target.is_file() else f"{removed} line(s) out, {added} line(s) in"
    typer.echo(f"{target} is not current ({state}); run `{command}`", err=True)
    for line in diff[:40]:
        typer.echo(line, err=True)
    if len(diff) > 40:
        typer.echo(f"... {len(diff) - 40} more diff line(s)", err=True)
    raise typer.Exit(1)


@app.command("lock")
def lock(
    directory: PromptsDirOpt = None,
    check: Annotated[
        bool, typer.Option("--check", help="Write nothing; exit 1 when the lock is not current.")
    ] = False,
    changelog: Annotated[
        Path | None,
        typer.Option(
            "--changelog",
            help="The changelog that must have an entry per (slug, version). Default: "
            "docs/ANALYSES-CHANGELOG.md of the source checkout for the shipped catalog; none "
            "for another catalog.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Rewrite even where content changed under the same version. Only for a "
            "version that has never shipped.",
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Record each spec's version and content hash in the catalog's _catalog.lock.

    The hash covers everything of a spec that shapes results: the prompts (with the shared
    system prompt), json_schema (its descriptions too: they go to the engine), qa rules,
    sampling and variant; not the name, the spec's description or the descriptions of computed
    fields and confidences. REFUSED (exit 1, nothing written) when a spec's content changed but
    its version did not, or a version went down: raise `version` and add an entry for it to the
    changelog. Also refused when the changelog lacks an entry for a spec's current version.
    """
    from goflow_gpu.prompts.lock import (
        LOCK_FILE,
        LockError,
        audit_lock,
        missing_changelog_entries,
        update_lock,
    )

    choice = _choose(directory, config)
    catalog = _load(choice.directory)
    if changelog is None and choice.shipped and _project_root() is not None:
        changelog = _default_doc("ANALYSES-CHANGELOG.md")
    path = catalog.source / LOCK_FILE
    if check:
        # The same audit as `prompts validate`, every finding an error here.
        audit = audit_lock(catalog, path, required=True, changelog=changelog)
        if audit.problems():
            _fail(audit.problems(), f"{path} is not current; run `goflow-gpu prompts lock`")
        typer.echo(f"{path} is current ({len(catalog.specs)} specs)")
        return
    try:
        missing = missing_changelog_entries(catalog, changelog) if changelog else []
        if missing:
            raise LockError(missing)
        state = update_lock(catalog, path, force=force)
    except LockError as exc:
        _fail(exc.problems, f"{len(exc.problems)} problem(s): {path} was not written")
    if state.changed:
        typer.echo(f"wrote {path}: {', '.join(state.changed)} updated")
    else:
        typer.echo(f"{path} is current ({len(state.entries)} specs)")
