"""What the trained model is taught about a scene, and how answers about scenes are graded.

The scene below is built by hand (not drawn), so every expected value is worked out here from
its boxes: 336x252 px at the training budget of 168*168 px is seen as 168x140 px (sides
rounded to 28, 84672 px scaled down by sqrt(3) and floored to multiples of 28), so x scales by
1/2 and y by 140/252 = 5/9.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from PIL import Image

from goflow_gpu.engines.scene_answers import (
    LEARNED_ANALYSES,
    compact,
    describe,
    model_size,
    scene_answers,
)
from goflow_gpu.evaluation.scenes import grade, summarise
from goflow_gpu.prompts.catalog import load_catalog
from goflow_gpu.prompts.qa import check_output
from goflow_gpu.prompts.result import result_schema
from goflow_gpu.simulator.images import LabelledScene, SceneShape, labelled_scene

LOW, HIGH = 56 * 56, 168 * 168

SCENE = LabelledScene(
    image=Image.new("RGB", (336, 252), (255, 255, 255)),
    background="white",
    shapes=(
        SceneShape(kind="circle", colour="orange", box=(200, 144, 72, 72)),
        SceneShape(kind="square", colour="red", box=(100, 36, 60, 54)),
    ),
    word="OPEN",
    word_colour="black",
    word_box=(20, 180, 90, 27),
    colour_shares=(("white", 0.9), ("orange", 0.05), ("red", 0.05)),
)

# Model-space corners worked out by hand (x / 2, y * 5 / 9, rounded half up).
SQUARE = [50, 20, 80, 50]  # y: 36 -> 20, 90 -> 50
CIRCLE = [100, 80, 136, 120]  # x: 200 -> 100, 272 -> 136; y: 144 -> 80, 216 -> 120
WORD = [10, 100, 55, 115]  # x: 20 -> 10, 110 -> 55; y: 180 -> 100, 207 -> 115


def test_the_scene_is_seen_at_the_training_budget() -> None:
    assert model_size(SCENE, LOW, HIGH) == (168, 140)


def test_answers_are_the_catalog_schemas_in_reading_order_with_model_space_boxes() -> None:
    answers = scene_answers(SCENE, LOW, HIGH)
    assert set(answers) == set(LEARNED_ANALYSES)
    assert answers["object-detection"] == {
        "objects_detected": [
            {"name": "square", "bbox_2d": SQUARE},  # higher up: first
            {"name": "circle", "bbox_2d": CIRCLE},
        ],
        "image_description": (
            "A red square, an orange circle and the word OPEN on a white background."
        ),
    }
    assert answers["text-recognition"] == {
        "text_blocks": [{"text": "OPEN", "bbox_2d": WORD}],
        "language": "English",
    }
    assert answers["people-count"] == {"people": [], "count_bin": "0"}


def test_answers_are_written_as_compact_json_in_schema_key_order() -> None:
    text = compact(scene_answers(SCENE, LOW, HIGH)["text-recognition"])
    assert (
        text == '{"text_blocks":[{"text":"OPEN","bbox_2d":[10,100,55,115]}],"language":"English"}'
    )


def test_every_taught_answer_passes_the_worker_qa_and_grades_right() -> None:
    """Taught answers and grades agree: the teacher's answers for drawn scenes go through QA
    (model space -> original pixels) and come out right, boxes within rounding."""
    catalog = load_catalog(None)
    grades = []
    for n in range(12):
        scene = labelled_scene(f"grading-{n}")
        for slug, answer in scene_answers(scene, LOW, HIGH).items():
            spec = catalog.specs[slug]
            verdict = check_output(
                compact(answer),
                catalog.render(spec),
                spec.qa,
                original_size=scene.image.size,
                model_size=model_size(scene, LOW, HIGH),
            )
            assert verdict.passed, (slug, verdict.reasons)
            grades.append(grade(slug, verdict.result, scene, _schema(slug)))
    summary = summarise(grades)
    assert list(summary) == list(LEARNED_ANALYSES)
    assert all(s.right == s.answers == 12 for s in summary.values())
    assert summary["object-detection"].colour_rate == 1.0
    assert summary["object-detection"].kind_rate == 1.0
    iou = summary["text-recognition"].mean_iou
    assert iou is not None and iou > 0.85  # 168 px of model space: a pixel or two lost


def _schema(slug: str) -> dict[str, Any]:
    spec = load_catalog(None).specs[slug]
    return result_schema(spec.json_schema, spec.qa)


def _box(x: int, y: int, width: int, height: int) -> dict[str, int]:
    return {"x": x, "y": y, "width": width, "height": height}


RIGHT_OBJECTS = {
    "objects_detected": [
        {"name": "square", "bounding_box": _box(101, 37, 58, 52), "confidence": None},
        {"name": "circle", "bounding_box": _box(200, 144, 72, 72), "confidence": None},
    ],
    "image_description": "An orange circle and a red square on white.",
}


def test_a_right_wire_answer_is_right_whatever_its_order() -> None:
    result = grade("object-detection", RIGHT_OBJECTS, SCENE, _schema("object-detection"))
    assert result.right
    assert (result.boxes_expected, result.boxes_matched, result.boxes_predicted) == (2, 2, 2)
    assert result.shapes_drawn == result.colours_named == result.kinds_named == 2
    assert min(result.ious) > 0.9


@pytest.mark.parametrize(
    ("change", "matched", "colours", "kinds"),
    [
        # the circle's box moved by its own width: no longer found, still named a circle
        (lambda r: r["objects_detected"][1]["bounding_box"].update(x=272), 1, 2, 2),
        # right box, wrong name: not a match (a circle must be called a circle), one kind missed
        (lambda r: r["objects_detected"][1].update(name="triangle"), 1, 2, 1),
        # both shapes called squares: the kind counts as a multiset, one square is drawn
        (lambda r: r["objects_detected"][1].update(name="square"), 1, 2, 1),
        # a colour wrong in the description: boxes fine, one colour missed
        (lambda r: r.update(image_description="A blue circle and a red square."), 2, 1, 2),
        # the right colours on the wrong kinds: a colour is a colour (the kinds are the list's)
        (lambda r: r.update(image_description="An orange square and a red circle."), 2, 2, 2),
        # a colour without a shape after it is not a shape's colour
        (lambda r: r.update(image_description="Orange and red things."), 2, 0, 2),
    ],
)
def test_a_wrong_part_makes_the_answer_wrong(
    change: Any, matched: int, colours: int, kinds: int
) -> None:
    result = copy.deepcopy(RIGHT_OBJECTS)
    change(result)
    graded = grade("object-detection", result, SCENE, _schema("object-detection"))
    assert graded.boxes_matched == matched
    assert graded.colours_named == colours
    assert graded.kinds_named == kinds
    assert not graded.right or matched == 2  # a colour is not a labelled field


def test_an_extra_object_or_a_failed_answer_is_not_right() -> None:
    extra: dict[str, Any] = copy.deepcopy(RIGHT_OBJECTS)
    extra["objects_detected"].append({"name": "square", "bounding_box": _box(0, 0, 10, 10)})
    graded = grade("object-detection", extra, SCENE, _schema("object-detection"))
    assert not graded.right and graded.boxes_predicted == 3
    failed = grade("people-count", None, SCENE, _schema("people-count"))
    assert not failed.right


def test_people_count_is_right_only_for_nobody() -> None:
    nobody = {"people": [], "count_bin": "0", "count": 0, "crowd_level": "none"}
    assert grade("people-count", nobody, SCENE, _schema("people-count")).right
    someone = {"people": [{"point": {"x": 5, "y": 5}}], "count_bin": "1", "count": 1}
    assert not grade("people-count", someone, SCENE, _schema("people-count")).right


def test_a_slug_scenes_do_not_label_is_refused() -> None:
    with pytest.raises(ValueError, match="scenes label no 'scene-mood'"):
        grade("scene-mood", {}, SCENE, {})


def test_describe_uses_articles_and_reading_order() -> None:
    assert describe(SCENE) == (
        "A red square, an orange circle and the word OPEN on a white background."
    )
    assert json.loads(compact({"a": describe(SCENE)}))["a"].endswith("background.")
