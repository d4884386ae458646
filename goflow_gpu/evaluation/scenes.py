"""Grading answers about labelled scenes: was the answer right, and how well did its boxes sit.

One grader for everything that asks a model about a simulator scene: the simulator's scene mode
grades what the worker reports (the demo prints it), the training script grades its held-out
scenes, and the trained model's accuracy test grades vLLM's and transformers' answers. All of
them grade the *wire* result (what the worker POSTs: boxes as ``bounding_box`` in the original
image's pixels, after QA), with the starter set's labels of the scene
(:func:`goflow_gpu.evaluation.starter.scene_labels`) and
:func:`~goflow_gpu.evaluation.scoring.score_fields` (exact fields, boxes matched one to one at
IoU >= 0.5 with the same name).

An answer is *right* when every labelled field scores 1 (for object detection: every shape
found, named and boxed, nothing extra). Object detection also counts, apart from where the boxes
sit, the shapes whose colour the description names (``colours``: "a red square" names red; the
description is the one place the catalog's schema carries colour) and the shapes whose kind the
objects list names (``kinds``). Kept apart because they fail apart: the tiny model shipped before
run16 named every colour and took some circles for squares (PROMPTS.md, "The trained tiny
model"), and one figure for both said "colours 75%" where the colours were right.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from goflow_gpu.evaluation.scoring import score_fields
from goflow_gpu.evaluation.starter import scene_labels
from goflow_gpu.simulator.images import SCENE_KINDS, SCENE_PALETTE, LabelledScene

_NAMED = re.compile(
    r"\b(" + "|".join(SCENE_PALETTE) + r")\s+(" + "|".join(SCENE_KINDS) + r")s?\b", re.IGNORECASE
)


@dataclass(frozen=True)
class SceneGrade:
    """The grade of one answer (``result`` None: failed or never reported)."""

    slug: str
    right: bool
    boxes_expected: int = 0
    boxes_matched: int = 0
    boxes_predicted: int = 0
    ious: tuple[float, ...] = ()
    """IoU of every matched box (each >= 0.5)."""
    shapes_drawn: int = 0
    colours_named: int = 0
    """Drawn shapes whose colour the description names (as a multiset)."""
    kinds_named: int = 0
    """Drawn shapes whose kind the objects list names (as a multiset, boxes aside)."""


def grade(
    slug: str, result: Mapping[str, Any] | None, scene: LabelledScene, schema: Mapping[str, Any]
) -> SceneGrade:
    """Grade ``result`` (the wire analysisResult, None when QA failed it) for ``scene``.

    ``schema``: the analysis's result schema (:func:`goflow_gpu.prompts.result.result_schema`).
    """
    labels = scene_labels(scene).get(slug)
    if labels is None:
        raise ValueError(
            f"scenes label no {slug!r} answer; labelled: {sorted(scene_labels(scene))}"
        )
    scores = score_fields(labels, result, schema)
    boxed = [s for s in scores if s.n_expected is not None and s.kind in ("box", "boxes")]
    extra: dict[str, int] = {}
    if slug == "object-detection":
        answer = result or {}
        text = str(answer.get("image_description", ""))
        colours = Counter(colour.lower() for colour, _ in _NAMED.findall(text))
        objects = answer.get("objects_detected") or []
        kinds = Counter(str(o.get("name", "")).lower() for o in objects if isinstance(o, dict))
        extra = {
            "shapes_drawn": len(scene.shapes),
            "colours_named": sum((Counter(s.colour for s in scene.shapes) & colours).values()),
            "kinds_named": sum((Counter(s.kind for s in scene.shapes) & kinds).values()),
        }
    return SceneGrade(
        slug=slug,
        right=result is not None and all(s.score == 1.0 for s in scores),
        boxes_expected=sum(s.n_expected or 0 for s in boxed),
        boxes_matched=sum(s.matched or 0 for s in boxed),
        boxes_predicted=sum(s.n_predicted or 0 for s in boxed),
        ious=tuple(pair[2] for s in boxed for pair in s.pairs),
        **extra,
    )


@dataclass
class GradeSummary:
    """Grades of one analysis over many scenes."""

    slug: str
    answers: int = 0
    right: int = 0
    boxes_expected: int = 0
    boxes_matched: int = 0
    boxes_predicted: int = 0
    shapes_drawn: int = 0
    colours_named: int = 0
    kinds_named: int = 0
    ious: list[float] = field(default_factory=list)

    def add(self, grade: SceneGrade) -> None:
        self.answers += 1
        self.right += int(grade.right)
        self.boxes_expected += grade.boxes_expected
        self.boxes_matched += grade.boxes_matched
        self.boxes_predicted += grade.boxes_predicted
        self.shapes_drawn += grade.shapes_drawn
        self.colours_named += grade.colours_named
        self.kinds_named += grade.kinds_named
        self.ious.extend(grade.ious)

    @property
    def right_rate(self) -> float:
        return self.right / self.answers if self.answers else 0.0

    @property
    def box_recall(self) -> float | None:
        """Share of the drawn boxes found at IoU >= 0.5 with the right name."""
        return self.boxes_matched / self.boxes_expected if self.boxes_expected else None

    @property
    def colour_rate(self) -> float | None:
        """Share of the drawn shapes whose colour the description names."""
        return self.colours_named / self.shapes_drawn if self.shapes_drawn else None

    @property
    def kind_rate(self) -> float | None:
        """Share of the drawn shapes whose kind the objects list names."""
        return self.kinds_named / self.shapes_drawn if self.shapes_drawn else None

    @property
    def mean_iou(self) -> float | None:
        """Mean IoU of the matched boxes."""
        return sum(self.ious) / len(self.ious) if self.ious else None

    def figures(self) -> dict[str, Any]:
        """The summary as JSON values."""
        return {
            "answers": self.answers,
            "right": self.right,
            "box_recall": self.box_recall,
            "mean_iou": self.mean_iou,
            "colour_rate": self.colour_rate,
            "kind_rate": self.kind_rate,
        }

    def line(self) -> str:
        """``object-detection: 41/50 right (82%), boxes 95% found, IoU 0.81, colours 99%,
        kinds 90%``"""
        parts = [f"{self.slug}: {self.right}/{self.answers} right ({self.right_rate:.0%})"]
        if self.box_recall is not None:
            parts.append(f"boxes {self.box_recall:.0%} found")
        if self.mean_iou is not None:
            parts.append(f"IoU {self.mean_iou:.2f}")
        if self.colour_rate is not None:
            parts.append(f"colours {self.colour_rate:.0%}")
        if self.kind_rate is not None:
            parts.append(f"kinds {self.kind_rate:.0%}")
        return ", ".join(parts)


def summarise(grades: Iterable[SceneGrade]) -> dict[str, GradeSummary]:
    """Per analysis slug, in first-seen order."""
    out: dict[str, GradeSummary] = {}
    for one in grades:
        out.setdefault(one.slug, GradeSummary(one.slug)).add(one)
    return out
