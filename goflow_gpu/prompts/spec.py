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


ComputeRule = Literal["non_empty", "count", "first", "join", "map", "all_in", "any_in", "worst"]


class Computed(BaseModel):
    """A result field computed in code from other fields of the answer, never asked.

    A field that is a function of others (``has_text`` of the text blocks, ``main_tag`` of the
    tags, ``safe_for_general_audience`` of the categories) is computed, so it cannot contradict
    its evidence, and the model spends no tokens on it. Paths: ``field`` and ``source`` are
    dotted keys of the result; ``list[]`` in ``field`` computes the field in every item of
    ``list`` with ``source`` read from that item; ``source`` may end in ``[].key`` (that key of
    every item) or ``.*`` (every value of an object). Rules (``v`` = the source value):

    - ``non_empty``: true when v holds something (a non-blank text, a non-empty list);
    - ``count``: the number of items of v; ``null`` when the list is full (``at_most`` items),
      since the exact count is then unknown;
    - ``first``: the first item of v, ``null`` when there is none;
    - ``join``: the texts of v joined with ``separator``;
    - ``map``: ``mapping[v]`` (an enum to a number or another enum);
    - ``all_in`` / ``any_in``: whether every / some value of v is one of ``values``;
    - ``worst``: the value of v ranked last in ``values`` (e.g. none < possible < present).

    Computed fields are added in the order listed, so a later one may read an earlier one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str = Field(pattern=r"^[a-z_][a-z0-9_]*(\[\]\.[a-z_][a-z0-9_]*)?$")
    rule: ComputeRule
    source: str = Field(pattern=r"^[a-z_][a-z0-9_]*((\[\])?\.[a-z_][a-z0-9_]*|\.\*)*$")
    values: list[str] = Field(default_factory=list)
    mapping: dict[str, str | int | float | bool] = Field(default_factory=dict)
    separator: str = "\n"
    at_most: int | None = Field(default=None, ge=1)
    description: str = ""


class LogprobConfidence(BaseModel):
    """A confidence computed from the engine's token log-probabilities, never asked.

    ``field`` (``confidence`` or ``list[].confidence``) is set to the joint probability of the
    tokens that spell the answer's value at ``value`` (a key of the same object or item), rounded
    to 3 decimals, inserted right after that value (see :mod:`goflow_gpu.prompts.confidence`).
    ``null`` when the engine returned no log-probabilities.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str = Field(pattern=r"^[a-z_][a-z0-9_]*(\[\]\.[a-z_][a-z0-9_]*)?$")
    value: str = Field(pattern=r"^[a-z_][a-z0-9_]*$")
    description: str = ""


class CountCheck(BaseModel):
    """Cross-field check of a count bin against the points the model listed.

    ``bin`` is an enum field whose values read ``"0"``, ``"2-5"`` or ``"more than 20"``;
    ``points`` is the list (at most ``at_most`` items). When the list is not full, the bin must
    hold its length; when it is full, the bin must be at least ``at_most``. A disagreeing bin is
    repaired from the points (the evidence) with a warning. ``list[]`` paths check every item.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bin: str
    points: str
    at_most: int = Field(ge=1)


class Exclusion(BaseModel):
    """Cross-field check: the list ``within`` must not repeat the value of ``value`` (a primary
    scene among the secondary ones); a repeat is removed with a warning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    within: str
    value: str


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

    What code repairs instead of re-asking (each repair is a warning in the result's
    ``qa_warnings`` and counted in the report): a box or point inside a list item that is
    degenerate or lies outside the image is dropped with its item; a repeated item of a
    ``distinct`` list is dropped (items with boxes repeat when their other fields are equal and
    the boxes overlap with IoU >= 0.9); ``counts`` and ``exclusions`` repair cross-field
    disagreements. What cannot be repaired (bad JSON, a schema violation, a top-level box off
    the image, an empty required text) is re-asked; an answer cut off at the token limit is
    re-asked with ``retry_max_tokens``.

    ``point_fields``: keys of Qwen points ``[x, y]`` (``point_2d``) in the model's pixels,
    replaced by ``point`` ``{x, y}`` in original pixels; a key starting with ``points``
    (``points_2d``) holds a list of such points and becomes ``points``. Count checks and
    computed fields read the converted result, so they name ``points``/``point``.

    Added to a passing answer: ``logprob_confidence`` fields (rated on the answer as written),
    then ``computed`` fields, then ``pixel_facts``. All of this is frozen with a job, so a spec
    edit never changes a running job.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    box_fields: list[str] = Field(default_factory=lambda: ["bbox_2d", "bounding_box"])
    confidence_fields: list[str] = Field(default_factory=lambda: ["confidence"])
    non_empty: list[str] = Field(default_factory=list)
    distinct: list[str] = Field(default_factory=list)
    box_tolerance: float = Field(default=0.02, ge=0.0, le=0.5)
    point_fields: list[str] = Field(default_factory=lambda: ["point_2d", "points_2d"])
    counts: list[CountCheck] = Field(default_factory=list)
    exclusions: list[Exclusion] = Field(default_factory=list)
    computed: list[Computed] = Field(default_factory=list)
    logprob_confidence: list[LogprobConfidence] = Field(default_factory=list)
    #: result field -> fact name of :data:`goflow_gpu.prompts.pixels.FACTS`.
    pixel_facts: dict[str, str] = Field(default_factory=dict)
    #: the token budget of a re-ask after an answer was cut off at ``max_tokens`` (``None``:
    #: twice the spec's budget).
    retry_max_tokens: int | None = Field(default=None, ge=16, le=16384)


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
