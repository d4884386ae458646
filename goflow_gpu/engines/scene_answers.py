"""The answers a labelled scene decides, in the catalog's own schemas, as the model writes them.

The trained tiny model (:mod:`goflow_gpu.engines.train`) learns these answers for
:data:`LEARNED_ANALYSES`, and the demo grades what it reports against the same scene
(:mod:`goflow_gpu.evaluation.scenes`). Answers are compact JSON in the schema's key order, as
vLLM's xgrammar writes under ``disable_any_whitespace``, with boxes as Qwen2.5-VL's ``bbox_2d``
corners in the pixels of the image the model sees (:func:`~goflow_gpu.prompts.geometry.smart_resize`
at the model's pixel budget).

Choices a reader would otherwise guess at:

- objects are the drawn shapes, named by their kind (``circle``/``square``/``triangle``, as the
  starter set labels them), listed top to bottom then left to right (the prompt asks for "most
  prominent first"; the shapes' sizes differ too little for a size order to be learnable, so
  reading order is the one a tiny model can keep);
- the object-detection description names every shape with its colour and the word, on the
  background's colour: it is how the model learns, and the demo checks, colour;
- the word is the only text block; its language is ``"English"``;
- nobody is in a scene: people-count answers an empty list and ``"0"``.
"""

from __future__ import annotations

import json
from typing import Any

from goflow_gpu.prompts.geometry import smart_resize, to_model_corners
from goflow_gpu.simulator.images import Box, LabelledScene, SceneShape

LEARNED_ANALYSES: tuple[str, ...] = ("object-detection", "text-recognition", "people-count")
"""The catalog analysis types the trained tiny model was taught."""


def model_size(scene: LabelledScene, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` of the scene as the model sees it at this pixel budget."""
    width, height = scene.image.size
    new_h, new_w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    return new_w, new_h


def reading_order(shapes: tuple[SceneShape, ...]) -> list[SceneShape]:
    """Shapes top to bottom, then left to right (by the top-left corner of the box)."""
    return sorted(shapes, key=lambda s: (s.box[1], s.box[0]))


def described_things(scene: LabelledScene) -> list[tuple[str, Box]]:
    """The phrases of :func:`describe` that each name one boxed thing, with its box, in the
    order written: ``"red circle"`` for each shape, then ``"word OPEN"``."""
    things = [(f"{s.colour} {s.kind}", s.box) for s in reading_order(scene.shapes)]
    things.append((f"word {scene.word}", scene.word_box))
    return things


def describe(scene: LabelledScene) -> str:
    """``"A red circle, a blue square and the word OPEN on a white background."``"""
    *shapes, (word, _) = described_things(scene)
    parts = [f"{_article(phrase)} {phrase}" for phrase, _ in shapes]
    parts.append(f"the {word}")
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    ground = f"{_article(scene.background)} {scene.background} background"
    return f"{listed[0].upper()}{listed[1:]} on {ground}."


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def scene_answers(
    scene: LabelledScene, min_pixels: int, max_pixels: int
) -> dict[str, dict[str, Any]]:
    """The model's answer per learned analysis slug (JSON values, model-space boxes)."""
    size = model_size(scene, min_pixels, max_pixels)

    def corners(box: Box) -> list[int]:
        x, y, width, height = box
        wire = {"x": x, "y": y, "width": width, "height": height}
        return to_model_corners(wire, scene.image.size, size)

    objects = [{"name": s.kind, "bbox_2d": corners(s.box)} for s in reading_order(scene.shapes)]
    return {
        "object-detection": {"objects_detected": objects, "image_description": describe(scene)},
        "text-recognition": {
            "text_blocks": [{"text": scene.word, "bbox_2d": corners(scene.word_box)}],
            "language": "English",
        },
        "people-count": {"people": [], "count_bin": "0"},
    }


def compact(answer: dict[str, Any]) -> str:
    """The answer as the model writes it: compact JSON, keys in the given order."""
    return json.dumps(answer, separators=(",", ":"), ensure_ascii=False)
