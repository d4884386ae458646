"""The prompt catalog: a directory of spec files plus the set's shared system prompt.

Layout of a catalog directory::

    _catalog.yaml        system_prompt (shared by every spec), description
    <slug>.yaml          one PromptSpec per analysis type; the file name stem is the slug

:func:`load_catalog` reads and checks everything and raises one :class:`CatalogError` listing
every problem as ``FILE:LINE: message``: the worker takes a catalog whole or not at all, since
a job must never meet a spec that was left out. :func:`inspect_catalog` is the authors' view of
the same reading: the specs that load, and the problems of each file that does not, so one
broken file does not hide the others from ``prompts list`` and ``prompts render``.
:func:`lint_catalog` adds warnings for choices that work but cost: a system-prompt override (the
image prefix is no longer shared between analyses) and unbounded schemas. The worker reloads the
catalog between jobs, never inside one: what a job uses is frozen in :class:`RenderedPrompt`
copies.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from goflow_gpu.errors import GoFlowError
from goflow_gpu.logs import get_logger
from goflow_gpu.prompts.geometry import WIRE_BOX_KEY
from goflow_gpu.prompts.schemacheck import schema_errors, schema_warnings, walk_schemas
from goflow_gpu.prompts.spec import (
    CatalogSettings,
    PromptSpec,
    QARules,
    RenderedPrompt,
    Sampling,
)
from goflow_gpu.prompts.yamlsrc import PathKey, YamlSource, YamlSyntaxError, parse_yaml

log = get_logger(__name__)
_M = TypeVar("_M", bound=BaseModel)

CATALOG_FILE = "_catalog.yaml"
FALLBACK_VERSION = 0

GENERIC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["summary", "labels", "confidence"],
    "properties": {
        "summary": {"type": "string", "minLength": 1, "maxLength": 500},
        "labels": {
            "type": "array",
            "maxItems": 10,
            "items": {"type": "string", "minLength": 1, "maxLength": 40},
        },
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
}

_warned_fallback: set[str] = set()
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class CatalogError(GoFlowError):
    """A catalog that cannot be used. ``problems`` holds one ``FILE:LINE: message`` per problem."""

    def __init__(self, problems: list[str], directory: Path | None = None) -> None:
        where = f" in {directory}" if directory is not None else ""
        head = f"{len(problems)} problem(s) in the prompt catalog{where}"
        super().__init__(head + ":\n" + "\n".join(problems))
        self.problems = problems


@dataclass
class Catalog:
    """A loaded prompt set: the shared system prompt and every spec by slug."""

    system_prompt: str
    specs: dict[str, PromptSpec]
    source: Path
    description: str = ""

    def spec_for(self, slug: str, name: str | None = None) -> PromptSpec:
        """The spec of ``slug``; an unknown slug gets a generic spec (warned once per process)."""
        spec = self.specs.get(slug)
        if spec is not None:
            return spec
        if slug not in _warned_fallback:
            _warned_fallback.add(slug)
            log.warning(
                "unknown analysis slug, using the generic fallback spec",
                slug=slug,
                analysis_name=name,
                catalog=str(self.source),
            )
        return fallback_spec(slug, name)

    def render(self, spec: PromptSpec) -> RenderedPrompt:
        """The exact texts, schema and sampling for ``spec`` (what a job freezes)."""
        return RenderedPrompt(
            slug=spec.slug,
            version=spec.version,
            variant=spec.variant,
            system_prompt=spec.system_prompt or self.system_prompt,
            user_prompt=spec.user_prompt,
            json_schema=spec.json_schema,
            max_tokens=spec.sampling.max_tokens,
            temperature=spec.sampling.temperature,
        )


def fallback_spec(slug: str, name: str | None = None) -> PromptSpec:
    """A bounded, generic spec for an analysis type the catalog does not know."""
    label = _CONTROL.sub(" ", name or slug).strip()[:80] or slug
    user_prompt = (
        f'Analyse this image for the analysis type "{label}" ({slug}). Answer with one JSON '
        'object: "summary" (what you see that matters for this analysis, at most 500 '
        'characters), "labels" (up to 10 short labels, each at most 40 characters) and '
        '"confidence" (a number from 0 to 1).'
    )
    return PromptSpec(
        slug=slug,
        name=label,
        version=FALLBACK_VERSION,
        variant="optimised",
        user_prompt=user_prompt,
        json_schema=GENERIC_SCHEMA,
        qa=QARules(non_empty=["summary"]),
        sampling=Sampling(max_tokens=384, temperature=0.0),
        description="generic fallback for a slug the catalog does not know",
    )


def shipped_catalog_dir() -> Path:
    """Where the catalog shipped with goflow-gpu lives.

    Installed from a wheel or editable, the package ``goflow_gpu.catalog`` maps to it; in a bare
    source checkout it is the top-level ``prompts/`` next to the package.
    """
    spec = importlib.util.find_spec("goflow_gpu.catalog")
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            path = Path(location)
            if (path / CATALOG_FILE).is_file():
                return path
    return Path(__file__).resolve().parents[2] / "prompts"


def load_catalog(directory: Path | None = None) -> Catalog:
    """Load and check a catalog (``None`` = the shipped one). Raises :class:`CatalogError`
    listing every problem when anything is wrong: a catalog is used whole or not at all."""
    report = inspect_catalog(directory)
    if report.errors or report.catalog is None:
        raise CatalogError(report.errors, report.directory)
    return report.catalog


def lint_catalog(directory: Path | None = None) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of a catalog, each line ``FILE:LINE: message``."""
    report = inspect_catalog(directory)
    return report.errors, report.warnings()


@dataclass
class CatalogReport:
    """A catalog as its authors see it: what loads, and every problem of what does not.

    ``catalog`` holds the specs that load (``None`` when the catalog as a whole cannot be used:
    no directory, a broken ``_catalog.yaml``); ``broken`` the problems of each spec file left
    out, by file stem (the slug it would have); ``errors`` every problem in file order, the
    catalog's own included. Never give a partial catalog to the worker: :func:`load_catalog`.
    """

    directory: Path
    catalog: Catalog | None
    errors: list[str]
    broken: dict[str, list[str]]
    _entries: dict[str, _Entry]

    def where(self, slug: str, path: PathKey = ()) -> str:
        """``FILE:LINE`` of ``path`` in the spec file of ``slug`` (a loaded spec)."""
        return self._entries[slug].where(path)

    def warnings(self) -> list[str]:
        """Lint warnings of the specs that load, each ``FILE:LINE: message``."""
        return [line for entry in self._entries.values() for line in _spec_warnings(entry)]


def inspect_catalog(directory: Path | None = None) -> CatalogReport:
    """Read a catalog (``None`` = the shipped one) keeping each spec file's problems to itself."""
    scan = _scan(directory)
    catalog = None
    if scan.settings is not None:
        catalog = Catalog(
            system_prompt=scan.settings.system_prompt,
            specs={slug: entry.spec for slug, entry in scan.specs.items()},
            source=scan.directory,
            description=scan.settings.description,
        )
    return CatalogReport(scan.directory, catalog, scan.errors, scan.broken, scan.specs)


# --- reading -------------------------------------------------------------------------------


@dataclass
class _Entry:
    spec: PromptSpec
    file: Path
    source: YamlSource

    def where(self, path: PathKey) -> str:
        return f"{self.file}:{self.source.line_of(path)}"


@dataclass
class _Scan:
    directory: Path
    settings: CatalogSettings | None = None
    specs: dict[str, _Entry] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    broken: dict[str, list[str]] = field(default_factory=dict)


def _scan(directory: Path | None) -> _Scan:
    root = Path(directory) if directory is not None else shipped_catalog_dir()
    scan = _Scan(directory=root)
    if not root.is_dir():
        scan.errors.append(f"{root}:0: catalog directory not found")
        return scan
    shared = root / CATALOG_FILE
    if shared.is_file():
        loaded = _load_model(shared, CatalogSettings, scan.errors)
        if loaded is not None:
            scan.settings = loaded[0]
    else:
        scan.errors.append(f"{shared}:0: missing: the shared system prompt of the set lives here")
    files = sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml"))
    for file in files:
        if file.name.startswith("_"):
            continue
        before = len(scan.errors)
        entry = _read_spec(file, scan)
        if len(scan.errors) == before and entry is not None:
            scan.specs[entry.spec.slug] = entry
        elif len(scan.errors) > before:
            scan.broken.setdefault(file.stem, []).extend(scan.errors[before:])
    if not files:
        scan.errors.append(f"{root}:0: no spec files (*.yaml) in the catalog directory")
    return scan


def _read_spec(file: Path, scan: _Scan) -> _Entry | None:
    """One spec file, its problems appended to ``scan.errors``; ``None`` when it has any."""
    if file.suffix == ".yml":
        scan.errors.append(f"{file}:1: spec files end in .yaml (rename to {file.stem}.yaml)")
        return None
    loaded_spec = _load_model(file, PromptSpec, scan.errors)
    if loaded_spec is None:
        return None
    spec, source = loaded_spec
    entry = _Entry(spec, file, source)
    before = len(scan.errors)
    if spec.slug != file.stem:
        scan.errors.append(
            f"{entry.where(('slug',))}: slug '{spec.slug}' does not match the file name "
            f"(expected '{file.stem}', or rename the file to {spec.slug}.yaml)"
        )
    if spec.slug in scan.specs:
        other = scan.specs[spec.slug].file
        scan.errors.append(f"{entry.where(('slug',))}: duplicate slug '{spec.slug}' ({other})")
    for path, message in schema_errors(spec.json_schema):
        scan.errors.append(f"{entry.where(('json_schema', *path))}: json_schema: {message}")
    if len(scan.errors) == before:
        scan.errors.extend(_finishing_errors(entry))
    return entry if len(scan.errors) == before else None


# The answer's keys as QA converts them: checks and computed fields read the converted result.
_WIRE_NAMES = {"bbox_2d": WIRE_BOX_KEY, "point_2d": "point", "points_2d": "points"}


def _finishing_errors(entry: _Entry) -> list[str]:
    """Computed fields, log-probability confidences, pixel facts and cross-field checks that
    name fields the answer does not have (a typo would otherwise only show in results)."""
    from goflow_gpu.prompts.pixels import FACTS  # numpy: only when a catalog is checked

    spec, qa = entry.spec, entry.spec.qa
    known = _answer_fields(spec.json_schema)
    out: list[str] = []

    def need(path: str, where: tuple[Any, ...], what: str) -> None:
        if path.split(".", 1)[0].split("[]", 1)[0] not in known and path not in known:
            out.append(
                f"{entry.where(('qa', *where))}: {what} '{path}' is not a field of the answer"
            )

    for index, computed in enumerate(qa.computed):
        where = ("computed", index)
        if computed.field in known:
            out.append(
                f"{entry.where(('qa', *where, 'field'))}: '{computed.field}' is computed, so it "
                "must not be asked too (remove it from json_schema)"
            )
        if "[]." in computed.field:
            need(computed.field.split("[].", 1)[0], (*where, "field"), "list")
            base = computed.field.split("[].", 1)[0] + "[]."
            need(base + computed.source, (*where, "source"), "source")
        else:
            need(computed.source, (*where, "source"), "source")
        if computed.rule == "map":
            enum = _enum_of(spec.json_schema, computed.source, known)
            missing = [v for v in enum if v not in computed.mapping]
            if missing:
                out.append(
                    f"{entry.where(('qa', *where, 'mapping'))}: mapping lacks "
                    f"{', '.join(map(repr, missing))} of {computed.source}"
                )
        known[computed.field] = {}
    for index, rated in enumerate(qa.logprob_confidence):
        base = rated.field.split("[].", 1)[0] + "[]." if "[]." in rated.field else ""
        need(base + rated.value, ("logprob_confidence", index, "value"), "value")
    for name, fact in qa.pixel_facts.items():
        if fact not in FACTS:
            out.append(
                f"{entry.where(('qa', 'pixel_facts', name))}: unknown pixel fact '{fact}' "
                f"(known: {', '.join(sorted(FACTS))})"
            )
        if name in known:
            out.append(
                f"{entry.where(('qa', 'pixel_facts', name))}: '{name}' is computed from pixels, "
                "so it must not be asked too (remove it from json_schema)"
            )
    for index, check in enumerate(qa.counts):
        need(check.bin, ("counts", index, "bin"), "bin")
        need(check.points, ("counts", index, "points"), "points")
    for index, rule in enumerate(qa.exclusions):
        need(rule.within, ("exclusions", index, "within"), "list")
        need(rule.value, ("exclusions", index, "value"), "value")
    return out


def _answer_fields(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The answer's fields by path (``a``, ``a[].b``, ``a.b``), under their converted names."""
    found: dict[str, dict[str, Any]] = {}

    def visit(node: dict[str, Any], prefix: str) -> None:
        for name, sub in (node.get("properties") or {}).items():
            if not isinstance(sub, dict):
                continue
            path = prefix + _WIRE_NAMES.get(name, name)
            found[path] = sub
            if sub.get("type") == "object":
                visit(sub, path + ".")
            items = sub.get("items")
            if sub.get("type") == "array" and isinstance(items, dict):
                visit(items, path + "[].")
            for branch in sub.get("anyOf") or []:
                if isinstance(branch, dict) and branch.get("type") == "object":
                    visit(branch, path + ".")

    visit(schema, "")
    return found


def _enum_of(schema: dict[str, Any], path: str, known: dict[str, dict[str, Any]]) -> list[Any]:
    node = known.get(path) or {}
    if path.endswith(".*"):
        parent = known.get(path[:-2]) or {}
        values = [v.get("enum") for v in (parent.get("properties") or {}).values()]
        return sorted({e for enum in values if enum for e in enum}, key=str)
    return list(node.get("enum") or [])


def _load_model(file: Path, model: type[_M], errors: list[str]) -> tuple[_M, YamlSource] | None:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(f"{file}:0: cannot read: {exc}")
        return None
    try:
        source = parse_yaml(text)
    except YamlSyntaxError as exc:
        errors.append(f"{file}:{exc.line}: {exc.message}")
        return None
    for line, message in source.problems:
        errors.append(f"{file}:{line}: {message}")
    if not isinstance(source.data, dict):
        errors.append(f"{file}:1: the file must be a mapping of key: value")
        return None
    try:
        value = model.model_validate(source.data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            errors.append(f"{file}:{source.line_of(loc)}: {_message(model, loc, err)}")
        return None
    if source.problems:  # duplicate keys: already reported, and the data may not be meant
        return None
    return value, source


def _message(model: type[BaseModel], loc: tuple[Any, ...], err: Any) -> str:
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key '{loc[-1]}'{hint}"
    if kind == "missing":
        if loc == ("variant",):
            return "variant: missing required key (one of: optimised, greyscale)"
        return f"{dotted}: missing required key"
    return f"{dotted}: {err['msg']}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        current = fields[part].annotation
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


# --- lint ------------------------------------------------------------------------------------


def _spec_warnings(entry: _Entry) -> list[str]:
    spec = entry.spec
    out: list[str] = []
    if spec.system_prompt is not None:
        out.append(
            f"{entry.where(('system_prompt',))}: system_prompt override: this analysis no longer "
            "shares the image prefix with the others, so vLLM prefills the image again for it; "
            "put analysis-specific text in user_prompt instead"
        )
    for path, message in schema_warnings(spec.json_schema):
        out.append(f"{entry.where(('json_schema', *path))}: json_schema: {message}")
    for name in spec.json_schema.get("required", []):
        if f'"{name}"' not in spec.user_prompt and name not in spec.user_prompt:
            out.append(
                f"{entry.where(('user_prompt',))}: user_prompt does not mention the field "
                f"'{name}'; a model without structured decoding cannot guess it"
            )
    has_box = any(
        name in spec.qa.box_fields
        for _, node in walk_schemas(spec.json_schema)
        for name in (node.get("properties") or {})
    )
    if has_box and "pixel coordinates" not in spec.user_prompt:
        out.append(
            f"{entry.where(('user_prompt',))}: the schema has boxes but user_prompt does not say "
            "they are 'pixel coordinates of the image as you see it'"
        )
    out.extend(_box_warnings(entry))
    if spec.sampling.temperature != 0:
        out.append(
            f"{entry.where(('sampling', 'temperature'))}: temperature {spec.sampling.temperature} "
            "makes answers differ between runs and retries"
        )
    return out


def _box_warnings(entry: _Entry) -> list[str]:
    """Box fields that are not Qwen's corner format, and objects whose boxes would collide."""
    spec = entry.spec
    out: list[str] = []
    for path, node in walk_schemas(spec.json_schema):
        properties = node.get("properties") or {}
        corners = []
        for name, sub in properties.items():
            if name not in spec.qa.box_fields:
                continue
            where = entry.where(("json_schema", *path, "properties", name))
            if _is_corner_box(sub):
                corners.append(name)
            else:
                out.append(
                    f"{where}: json_schema: box field '{name}' is not an array of exactly 4 "
                    "integers [x1, y1, x2, y2], the bbox_2d format Qwen2.5-VL is trained on "
                    "(QA still converts {x, y, width, height} objects)"
                )
        others = (
            [WIRE_BOX_KEY] if WIRE_BOX_KEY in properties and WIRE_BOX_KEY not in corners else []
        )
        if corners and (len(corners) > 1 or others):
            where = entry.where(("json_schema", *path))
            out.append(
                f"{where}: json_schema: QA reports every corner box as '{WIRE_BOX_KEY}', so an "
                f"object holds one box at most and no '{WIRE_BOX_KEY}' beside it; found "
                f"{', '.join(corners + others)}"
            )
    return out


def _is_corner_box(schema: Any) -> bool:
    if not isinstance(schema, dict) or schema.get("type") != "array":
        return False
    items = schema.get("items")
    return (
        schema.get("minItems") == 4
        and schema.get("maxItems") == 4
        and isinstance(items, dict)
        and items.get("type") == "integer"
    )
