"""Wire models of the GoFlow agent API (``goflow-api.md``), shared by the client and the simulator.

The four endpoints:

- ``GET  /api/v1/agent/next-job``                                        -> :class:`Manifest`
- ``PUT  /api/v1/agent/projects/{projectId}/status``                     <- :class:`StatusBody`
- ``POST /api/v1/agent/projects/{projectId}/media/{mediaId}/analysis/{analysisId}``
                                                                         <- :class:`ResultBody`
- ``PUT  /api/v1/agent/projects/{projectId}/reports``                    <- :class:`ReportBody`

Manifests are parsed leniently about *extra* keys (the backend may add fields) and strictly about
everything the worker relies on: UUIDs, required fields, non-empty and duplicate-free lists.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic.alias_generators import to_camel

from goflow_gpu.errors import ManifestError

API_PREFIX = "/api/v1/agent"

ProjectStatus = Literal["processing", "completed"]
ResultStatus = Literal["completed", "failed"]
Variant = Literal["optimised", "greyscale"]


def check_uuid(value: str) -> str:
    """Return ``value`` in canonical lower-case form if it is a UUID, else raise ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError("must be a UUID string")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ValueError("is not a UUID") from None
    canonical = str(parsed)
    if value.lower() != canonical:
        # Reject braces, urn: prefixes and missing hyphens: the backend's paths use this form.
        raise ValueError("is not a UUID in canonical 8-4-4-4-12 form")
    return canonical


Uuid = Annotated[str, AfterValidator(check_uuid)]
_SLUG = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)


class Client(_Wire):
    id: Uuid
    slug: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=500)


class Project(_Wire):
    id: Uuid
    slug: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=500)


class Media(_Wire):
    id: Uuid
    filename: str = Field(min_length=1, max_length=1000)
    optimised_path: str = Field(min_length=1, max_length=4000)
    greyscale_path: str = Field(min_length=1, max_length=4000)

    def url(self, variant: Variant) -> str:
        """The download URL of one image variant."""
        return self.optimised_path if variant == "optimised" else self.greyscale_path


class Analysis(_Wire):
    id: Uuid
    name: str = Field(min_length=1, max_length=500)
    slug: str = Field(min_length=1, max_length=200)

    @field_validator("slug")
    @classmethod
    def _slug_shape(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError("must be lower-case letters, digits and single hyphens")
        return value


def _unique_ids(items: list[Any], field: str) -> list[Any]:
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.id in seen:
            raise ValueError(f"duplicate id {item.id} at {field}[{index}]")
        seen.add(item.id)
    return items


class Manifest(_Wire):
    """One job: a project, its media and the analyses to run on every media item."""

    client: Client
    project: Project
    media: list[Media] = Field(min_length=1, max_length=10_000)
    analyses: list[Analysis] = Field(min_length=1, max_length=1_000)

    @field_validator("media")
    @classmethod
    def _media_unique(cls, value: list[Media]) -> list[Media]:
        return _unique_ids(value, "media")

    @field_validator("analyses")
    @classmethod
    def _analyses_unique(cls, value: list[Analysis]) -> list[Analysis]:
        return _unique_ids(value, "analyses")

    @property
    def job_id(self) -> str:
        """The job id is the project id (contract)."""
        return self.project.id

    @property
    def combinations(self) -> int:
        return len(self.media) * len(self.analyses)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(manifest)"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_manifest(raw: Any) -> Manifest:
    """Validate a next-job body. Raises :class:`ManifestError` naming each bad field and value."""
    if not isinstance(raw, dict):
        raise ManifestError(
            f"manifest must be a JSON object, got {type(raw).__name__}",
            [("(manifest)", raw, "must be a JSON object")],
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = [(_loc(tuple(err["loc"])), err.get("input"), err["msg"]) for err in exc.errors()]
        text = "; ".join(f"{loc}: {msg} (got {_short(val)})" for loc, val, msg in problems)
        raise ManifestError(f"invalid manifest: {text}", problems) from None


class StatusBody(BaseModel):
    """Body of the project status PUT."""

    model_config = ConfigDict(extra="forbid")
    status: ProjectStatus


class ResultBody(BaseModel):
    """Body of one analysis result POST. Python names are snake_case, the wire is camelCase."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )
    model_used: str = Field(min_length=1)
    user_prompt_used: str = Field(min_length=1)
    system_prompt_used: str = Field(min_length=1)
    status: ResultStatus
    analysis_result: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        """The JSON body as the backend expects it."""
        return self.model_dump(by_alias=True)


class ReportDetails(BaseModel):
    """The contract's required report details; more keys are allowed and kept."""

    model_config = ConfigDict(extra="allow")
    total_media_processed: int = Field(ge=0)
    total_analyses_completed: int = Field(ge=0)
    processing_time_minutes: float = Field(ge=0)
    success_rate: float = Field(ge=0, le=1)
    analysis_types_completed: list[str]
    key_findings: str


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")
    summary: str = Field(min_length=1)
    details: ReportDetails


class ReportBody(BaseModel):
    """Body of the final report PUT."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["quality_analysis"] = "quality_analysis"
    report: Report

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def status_path(project_id: str) -> str:
    return f"{API_PREFIX}/projects/{project_id}/status"


def result_path(project_id: str, media_id: str, analysis_id: str) -> str:
    return f"{API_PREFIX}/projects/{project_id}/media/{media_id}/analysis/{analysis_id}"


def report_path(project_id: str) -> str:
    return f"{API_PREFIX}/projects/{project_id}/reports"


NEXT_JOB_PATH = f"{API_PREFIX}/next-job"
