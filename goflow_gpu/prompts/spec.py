"""Prompt spec models: what one ``prompts/<slug>.yaml`` holds, and what a job freezes.

A spec file is loaded into :class:`PromptSpec` (strict: an unknown key is an error); the shared
settings of the set (``prompts/_catalog.yaml``) into :class:`CatalogSettings`. What a job stores
and sends is a :class:`RenderedPrompt`: the exact texts and schema, independent of the files.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Variant = Literal["optimised", "greyscale"]


class Sampling(BaseModel):
    """Sampling settings of a spec. Temperature 0 keeps answers reproducible."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(ge=16, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)


class QARules(BaseModel):
    """Semantic checks that run after the output matched its JSON schema.

    ``box_fields``: keys whose values are boxes in the model's pixel space, Qwen's grounding
    format ``[x1, y1, x2, y2]`` (``bbox_2d``: top-left and bottom-right corners). Each is checked
    against the image as the model saw it (``box_tolerance`` is the share of the image side a
    box may overhang before it is rejected; a smaller overhang is clamped) and replaced by
    ``bounding_box`` ``{x, y, width, height}`` in the original image's pixels, the backend's
    format. A box field holding an object ``{x, y, width, height}`` (the format before
    ``bbox_2d``, frozen in jobs created with it) is checked the same way and converted under its
    own key; the default lists both keys, so a custom spec written before ``bbox_2d`` without a
    ``qa`` section keeps its boxes converted. ``confidence_fields``: keys whose numbers must lie
    in [0, 1].
    ``non_empty``: top-level fields that must hold a non-blank string or a non-empty list.
    ``distinct``: top-level lists whose items must not repeat.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    box_fields: list[str] = Field(default_factory=lambda: ["bbox_2d", "bounding_box"])
    confidence_fields: list[str] = Field(default_factory=lambda: ["confidence"])
    non_empty: list[str] = Field(default_factory=list)
    distinct: list[str] = Field(default_factory=list)
    box_tolerance: float = Field(default=0.02, ge=0.0, le=0.5)


class PromptSpec(BaseModel):
    """One analysis type: how to ask the model and how to check its answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str = Field(min_length=1, max_length=80, pattern=r"^[a-z0-9][a-z0-9-]*$")
    name: str = Field(min_length=1, max_length=120)
    version: int = Field(ge=0)
    variant: Variant
    user_prompt: str = Field(min_length=1)
    #: ``None`` = the set's shared system prompt; an override costs the image prefix cache.
    system_prompt: str | None = None
    json_schema: dict[str, Any]
    qa: QARules = Field(default_factory=QARules)
    sampling: Sampling
    description: str = ""


class CatalogSettings(BaseModel):
    """The shared part of a prompt set (``_catalog.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system_prompt: str = Field(min_length=1)
    description: str = ""


class RenderedPrompt(BaseModel):
    """Exactly what is sent for one analysis and reported as used; frozen per job in state."""

    model_config = ConfigDict(frozen=True)

    slug: str
    version: int
    variant: Variant
    system_prompt: str
    user_prompt: str
    json_schema: dict[str, Any]
    max_tokens: int
    temperature: float
