"""QA of model answers, box geometry and retry prompts. Expected values are worked out by hand.

Answers are in the model's form (boxes as Qwen's ``bbox_2d`` corners, points as ``point_2d``
and lists of points as ``points_2d``, in the pixels of the image as the model saw it); passed
results are in the wire's form (``bounding_box`` ``{x, y, width, height}``, ``point`` ``{x, y}``
and ``points`` ``[{x, y}, ...]`` in the original image's pixels), finished with log-probability confidences (``null`` without token log-probabilities),
computed fields and pixel facts.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from goflow_gpu.errors import MediaError
from goflow_gpu.prompts import QARules, RenderedPrompt, load_catalog
from goflow_gpu.prompts.geometry import smart_resize
from goflow_gpu.prompts.qa import QAVerdict, check_output, retry_user_prompt

CATALOG = load_catalog()
SIZE = (1024, 768)  # (width, height) of the original image in the examples
RESIZED = (1036, 756)  # smart_resize of 1024x768: the image the model sees


def box(x: int, y: int, w: int, h: int) -> dict[str, int]:
    """A wire box: original pixels, top-left corner and size."""
    return {"x": x, "y": y, "width": w, "height": h}


def bb(x1: int, y1: int, x2: int, y2: int) -> list[int]:
    """A model box (``bbox_2d``): top-left and bottom-right corners in the model's pixels."""
    return [x1, y1, x2, y2]


def pt(x: int, y: int) -> dict[str, dict[str, int]]:
    """A wire point item: ``{"point": {x, y}}`` in original pixels."""
    return {"point": {"x": x, "y": y}}


def xy(x: int, y: int) -> dict[str, int]:
    """A wire point ``{x, y}`` in original pixels (an item of ``points``)."""
    return {"x": x, "y": y}


def mp(x: int, y: int) -> dict[str, list[int]]:
    """A model point item: ``{"point_2d": [x, y]}`` in the model's pixels."""
    return {"point_2d": [x, y]}


# Pixel facts made up by hand (QA copies them into the result; tests/test_pixels.py checks
# how they are computed).
PALETTE = [
    {"hex": "#1f3a5f", "name": "navy blue", "share": 55},
    {"hex": "#f2e9dc", "name": "beige", "share": 30},
    {"hex": "#b22222", "name": "red", "share": 15},
]
HAND_FACTS: dict[str, Any] = {
    "palette": PALETTE,
    "orientation": "landscape",
    "resolution": {"width": 1024, "height": 768, "megapixels": 0.79},
    "sharpness": {"level": "sharp", "score": 412.5},
    "brightness": {"level": "balanced", "mean": 48},
    "contrast": {"level": "normal", "rms": 21},
}

# One hand-written valid answer per shipped spec, in the model's form (not generated from the
# schemas).
EXAMPLES: dict[str, dict[str, Any]] = {
    "alt-text": {
        "visible_text": "",
        "alt_text": "Red bicycle against a brick wall.",
        "long_description": "",
        "decorative": False,
    },
    "animal-detection": {
        "animals": [
            {
                "species": "domestic cat",
                "group": "mammal",
                "points_2d": [[560, 545], [700, 600]],
                "count_bin": "2-3",
            }
        ]
    },
    "colour-palette": {"overall_tone": "cool", "saturation": "moderate"},
    "compliance-flags": {
        "cues": ["wine bottle on the table"],
        "flags": {
            "alcohol": "present",
            "tobacco": "absent",
            "weapons": "absent",
            "drugs": "absent",
            "gambling": "absent",
        },
        "notes": "A wine bottle on the table.",
    },
    "composition": {
        "framing": "wide",
        "rule_of_thirds": True,
        "symmetry": "none",
        "leading_lines": True,
        "balance": "balanced",
        "notes": "The road leads to the subject on the right third.",
        "quality": "good",
    },
    "content-safety": {
        "categories": {
            "nudity": "none",
            "violence": "none",
            "gore": "none",
            "weapons": "none",
            "drugs": "none",
            "hate_symbols": "none",
            "self_harm": "none",
        },
        "notes": "",
    },
    "copy-space": {
        "regions": [
            {
                "position": "top",
                "background": "plain",
                "text_colour": "dark",
                "bbox_2d": bb(0, 0, 1024, 200),
            }
        ],
        "suitability": "good",
    },
    "document-type": {
        "title": "",
        "language": "German",
        "orientation": "upright",
        "document_type": "receipt",
    },
    "focal-point": {
        "focal_point": {"subject": "bicycle", "bbox_2d": bb(380, 250, 680, 550)},
        "strength": "strong",
        "safe_crop_note": "The left third can be cropped.",
    },
    "food-recognition": {
        "items": [{"name": "espresso", "category": "drink"}],
        "cuisine": "Italian",
        "presentation": "restaurant",
    },
    "image-description": {
        "main_subjects": ["bicycle", "brick wall"],
        "description": "A red bicycle leans against a brick wall in afternoon light.",
        "style": "photo",
    },
    "image-quality": {
        "issues": ["noise"],
        "focus": "in-focus",
        "exposure": "good",
        "overall": "good",
    },
    "landmark-recognition": {
        "landmarks": [
            {
                "name": "Eiffel Tower",
                "basis": "iconic-shape",
                "city": "Paris",
                "country": "France",
                "bbox_2d": bb(400, 40, 620, 700),
            }
        ]
    },
    "logo-detection": {
        "logos": [{"brand": "unknown", "basis": "uncertain", "bbox_2d": bb(900, 20, 1000, 70)}]
    },
    "object-detection": {
        "objects_detected": [
            {"name": "car", "bbox_2d": bb(120, 80, 320, 230)},
            {"name": "person", "bbox_2d": bb(350, 120, 430, 300)},
        ],
        "image_description": "Street scene with a parked car and a person walking.",
    },
    "people-count": {"people": [mp(140, 350), mp(435, 350)], "count_bin": "2-3"},
    "product-detection": {
        "products": [
            {
                "name": "running shoe",
                "category": "footwear",
                "brand": "",
                "basis": "uncertain",
                "bbox_2d": bb(300, 400, 550, 550),
            }
        ]
    },
    "scene-classification": {
        "cues": ["zebra crossing", "traffic lights"],
        "primary_scene": "urban-street",
        "secondary_scenes": ["transport"],
        "scene_label": "busy crossing",
    },
    "scene-mood": {
        "cues": ["warm low sun", "empty street"],
        "mood": "calm",
        "secondary_moods": ["romantic"],
        "intensity": "subtle",
    },
    "setting": {
        "environment": "outdoor",
        "time_of_day": "golden-hour",
        "weather": "clear",
        "season": "unknown",
        "lighting": "natural",
        "location_type": "side street",
    },
    "tags-keywords": {"tags": ["bicycle", "city", "red", "wall"]},
    "text-legibility": {
        "low_contrast_regions": [{"bbox_2d": bb(0, 700, 400, 760)}],
        "issues": ["grey caption on grey background"],
        "contrast": "low",
        "smallest_text": "small",
        "legibility": "fair",
    },
    "text-recognition": {
        "text_blocks": [
            {"text": "OPEN", "bbox_2d": bb(10, 10, 110, 50)},
            {"text": "Mon-Fri 9-5", "bbox_2d": bb(10, 60, 190, 90)},
        ],
        "language": "English",
    },
    "vehicle-detection": {"vehicles": []},
    "visual-clutter": {
        "distractions": ["sign post"],
        "subject_clear": True,
        "clutter_level": "low",
    },
}

# What QA makes of each example when the model saw the original size (so boxes and points keep
# their coordinates), without token log-probabilities, with HAND_FACTS: written out by hand,
# keys in the order QA gives them (a confidence right after the value it rates; computed
# fields, then pixel facts, at the end of their object).
EXPECTED: dict[str, dict[str, Any]] = {
    "alt-text": {
        "visible_text": "",
        "alt_text": "Red bicycle against a brick wall.",
        "long_description": "",
        "decorative": False,
        "contains_text": False,
    },
    "animal-detection": {
        "animals": [
            {
                "species": "domestic cat",
                "confidence": None,
                "group": "mammal",
                "points": [xy(560, 545), xy(700, 600)],
                "count_bin": "2-3",
                "count": 2,
            }
        ],
        "has_animals": True,
    },
    "colour-palette": {
        "overall_tone": "cool",
        "saturation": "moderate",
        "dominant_colours": PALETTE,
    },
    "compliance-flags": {
        "cues": ["wine bottle on the table"],
        "flags": {
            "alcohol": "present",
            "tobacco": "absent",
            "weapons": "absent",
            "drugs": "absent",
            "gambling": "absent",
        },
        "notes": "A wine bottle on the table.",
        "requires_review": True,
    },
    "composition": {
        "framing": "wide",
        "rule_of_thirds": True,
        "symmetry": "none",
        "leading_lines": True,
        "balance": "balanced",
        "notes": "The road leads to the subject on the right third.",
        "quality": "good",
        "score": 7,
        "orientation": "landscape",
    },
    "content-safety": {
        "categories": {
            "nudity": "none",
            "violence": "none",
            "gore": "none",
            "weapons": "none",
            "drugs": "none",
            "hate_symbols": "none",
            "self_harm": "none",
        },
        "notes": "",
        "worst_level": "none",
        "rating": "general",
        "safe_for_general_audience": True,
    },
    "copy-space": {
        "regions": [
            {
                "position": "top",
                "background": "plain",
                "text_colour": "dark",
                "bounding_box": box(0, 0, 1024, 200),
            }
        ],
        "suitability": "good",
        "has_copy_space": True,
        "score": 9,
    },
    "document-type": {
        "title": "",
        "language": "German",
        "orientation": "upright",
        "document_type": "receipt",
        "confidence": None,
        "is_document": True,
    },
    "focal-point": {
        "focal_point": {"subject": "bicycle", "bounding_box": box(380, 250, 300, 300)},
        "strength": "strong",
        "safe_crop_note": "The left third can be cropped.",
    },
    "food-recognition": {
        "items": [{"name": "espresso", "confidence": None, "category": "drink"}],
        "cuisine": "Italian",
        "presentation": "restaurant",
        "has_food": True,
    },
    "image-description": {
        "main_subjects": ["bicycle", "brick wall"],
        "description": "A red bicycle leans against a brick wall in afternoon light.",
        "style": "photo",
    },
    "image-quality": {
        "issues": ["noise"],
        "focus": "in-focus",
        "exposure": "good",
        "overall": "good",
        "overall_score": 7,
        "resolution": {"width": 1024, "height": 768, "megapixels": 0.79},
        "sharpness": {"level": "sharp", "score": 412.5},
        "brightness": {"level": "balanced", "mean": 48},
        "contrast": {"level": "normal", "rms": 21},
    },
    "landmark-recognition": {
        "landmarks": [
            {
                "name": "Eiffel Tower",
                "confidence": None,
                "basis": "iconic-shape",
                "city": "Paris",
                "country": "France",
                "bounding_box": box(400, 40, 220, 660),
            }
        ],
        "has_landmark": True,
    },
    "logo-detection": {
        "logos": [
            {
                "brand": "unknown",
                "confidence": None,
                "basis": "uncertain",
                "bounding_box": box(900, 20, 100, 50),
            }
        ],
        "has_logos": True,
    },
    "object-detection": {
        "objects_detected": [
            {"name": "car", "confidence": None, "bounding_box": box(120, 80, 200, 150)},
            {"name": "person", "confidence": None, "bounding_box": box(350, 120, 80, 180)},
        ],
        "image_description": "Street scene with a parked car and a person walking.",
    },
    "people-count": {
        "people": [pt(140, 350), pt(435, 350)],
        "count_bin": "2-3",
        "count": 2,
        "crowd_level": "small-group",
    },
    "product-detection": {
        "products": [
            {
                "name": "running shoe",
                "confidence": None,
                "category": "footwear",
                "brand": "",
                "basis": "uncertain",
                "bounding_box": box(300, 400, 250, 150),
            }
        ],
        "has_products": True,
    },
    "scene-classification": {
        "cues": ["zebra crossing", "traffic lights"],
        "primary_scene": "urban-street",
        "confidence": None,
        "secondary_scenes": ["transport"],
        "scene_label": "busy crossing",
    },
    "scene-mood": {
        "cues": ["warm low sun", "empty street"],
        "mood": "calm",
        "confidence": None,
        "secondary_moods": ["romantic"],
        "intensity": "subtle",
    },
    "setting": {
        "environment": "outdoor",
        "confidence": None,
        "time_of_day": "golden-hour",
        "weather": "clear",
        "season": "unknown",
        "lighting": "natural",
        "location_type": "side street",
    },
    "tags-keywords": {"tags": ["bicycle", "city", "red", "wall"], "main_tag": "bicycle"},
    "text-legibility": {
        "low_contrast_regions": [{"bounding_box": box(0, 700, 400, 60)}],
        "issues": ["grey caption on grey background"],
        "contrast": "low",
        "smallest_text": "small",
        "legibility": "fair",
        "has_text": True,
        "score": 5,
    },
    "text-recognition": {
        "text_blocks": [
            {"text": "OPEN", "confidence": None, "bounding_box": box(10, 10, 100, 40)},
            {"text": "Mon-Fri 9-5", "confidence": None, "bounding_box": box(10, 60, 180, 30)},
        ],
        "language": "English",
        "full_text": "OPEN\nMon-Fri 9-5",
        "has_text": True,
    },
    "vehicle-detection": {"vehicles": [], "has_vehicles": False},
    "visual-clutter": {
        "distractions": ["sign post"],
        "subject_clear": True,
        "clutter_level": "low",
        "score": 3,
    },
}


def rendered(slug: str) -> tuple[RenderedPrompt, QARules]:
    spec = CATALOG.specs[slug]
    return CATALOG.render(spec), spec.qa


def check(
    text: str,
    slug: str = "object-detection",
    original: tuple[int, int] = SIZE,
    model: tuple[int, int] = SIZE,
    *,
    facts: Mapping[str, Any] | None = HAND_FACTS,
    token_logprobs: list[tuple[str, float]] | None = None,
) -> QAVerdict:
    prompt, rules = rendered(slug)
    return check_output(
        text,
        prompt,
        rules,
        original_size=original,
        model_size=model,
        token_logprobs=token_logprobs,
        facts=facts,
    )


def od(**changes: Any) -> dict[str, Any]:
    answer = copy.deepcopy(EXAMPLES["object-detection"])
    answer.update(changes)
    return answer


def in_order(value: Any) -> Any:
    """``value`` with the order of every object's keys made visible (dicts compare unordered)."""
    if isinstance(value, dict):
        return [(key, in_order(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [in_order(item) for item in value]
    return value


OUTSIDE = (
    "lies outside the image, which is 1024x768 pixels as you see it "
    "(x from 0 to 1024, y from 0 to 768)"
)
OUTSIDE_RESIZED = (
    "lies outside the image, which is 1036x756 pixels as you see it "
    "(x from 0 to 1036, y from 0 to 756)"
)


# --- valid answers ---------------------------------------------------------------------------


def test_every_shipped_spec_has_an_example_and_its_expected_result():
    assert set(EXAMPLES) == set(CATALOG.specs)
    assert set(EXPECTED) == set(CATALOG.specs)


@pytest.mark.parametrize("slug", sorted(EXAMPLES))
def test_hand_written_example_passes(slug):
    verdict = check(json.dumps(EXAMPLES[slug]), slug)
    assert verdict.reasons == []
    assert verdict.warnings == []
    assert verdict.passed
    # same pixel space: the same boxes and points, reported in the wire's form
    assert verdict.result == EXPECTED[slug]
    assert in_order(verdict.result) == in_order(EXPECTED[slug])
    text = json.dumps(verdict.result)
    assert "bbox_2d" not in text
    assert "point_2d" not in text
    assert "points_2d" not in text
    assert "qa_warnings" not in text


def test_fenced_json_block_is_accepted():
    text = "```json\n" + json.dumps(EXAMPLES["object-detection"], indent=2) + "\n```"
    verdict = check(text)
    assert verdict.passed, verdict.reasons
    assert verdict.result == EXPECTED["object-detection"]


def test_plain_fence_without_language_is_accepted():
    verdict = check("```\n" + json.dumps(EXAMPLES["setting"]) + "\n```\n", "setting")
    assert verdict.passed, verdict.reasons
    assert verdict.result == EXPECTED["setting"]


# --- rejected answers ------------------------------------------------------------------------


def test_not_json():
    verdict = check("I can see a car and a person.")
    assert not verdict.passed and verdict.result is None
    assert verdict.reasons == ["the answer is not valid JSON: Expecting value at line 1 column 1"]


def test_empty_answer():
    assert check("  \n").reasons == ["the answer is empty; answer with one JSON object"]


def test_prose_around_json():
    verdict = check("Here is the result: " + json.dumps(EXAMPLES["object-detection"]) + " Done.")
    assert not verdict.passed
    assert verdict.reasons[0].startswith("the answer has text around the JSON object")


def test_prose_around_a_fenced_block():
    text = "Sure!\n```json\n" + json.dumps(EXAMPLES["object-detection"]) + "\n```"
    verdict = check(text)
    assert not verdict.passed
    assert "text around the JSON object" in verdict.reasons[0]


def test_two_fenced_blocks():
    block = "```json\n" + json.dumps(EXAMPLES["object-detection"]) + "\n```"
    assert not check(block + "\n" + block).passed


def test_truncated_answer():
    text = json.dumps(EXAMPLES["object-detection"])[:-10]
    (reason,) = check(text).reasons
    assert "ends early" in reason


def test_top_level_must_be_an_object():
    assert check("[1, 2]").reasons == ["the answer must be a JSON object, got array"]


def test_nan_is_not_json():
    text = json.dumps(od()).replace("120", "NaN", 1)
    (reason,) = check(text).reasons
    assert "NaN is not allowed" in reason


def test_duplicate_keys_are_refused():
    text = '{"image_description": "a", "image_description": "b", "objects_detected": []}'
    (reason,) = check(text).reasons
    assert "duplicate key 'image_description'" in reason


def test_wrong_type():
    answer = od()
    answer["objects_detected"][0]["name"] = 5
    verdict = check(json.dumps(answer))
    assert verdict.reasons == ["objects_detected[0].name: expected string, got integer 5"]


def test_missing_field():
    answer = od()
    del answer["image_description"]
    assert check(json.dumps(answer)).reasons == ["image_description: missing required field"]


def test_missing_nested_field():
    answer = od()
    del answer["objects_detected"][1]["bbox_2d"]
    assert check(json.dumps(answer)).reasons == [
        "objects_detected[1].bbox_2d: missing required field"
    ]


def test_box_with_three_numbers_is_refused_by_the_schema():
    answer = od()
    answer["objects_detected"][1]["bbox_2d"] = [350, 120, 80]
    assert check(json.dumps(answer)).reasons == [
        "objects_detected[1].bbox_2d: too few items (3, at least 4)"
    ]


def test_box_as_the_old_object_is_refused_by_the_schema():
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = box(120, 80, 200, 150)
    (reason,) = check(json.dumps(answer)).reasons
    assert reason.startswith("objects_detected[0].bbox_2d: expected array, got object")


def test_point_with_three_numbers_is_refused_by_the_schema():
    answer = copy.deepcopy(EXAMPLES["people-count"])
    answer["people"][1]["point_2d"] = [435, 350, 1]
    assert check(json.dumps(answer), "people-count").reasons == [
        "people[1].point_2d: too many items (3, at most 2)"
    ]


def test_unexpected_field():
    answer = od(processing_time_seconds=1.0)
    assert check(json.dumps(answer)).reasons == [
        "(top level): unexpected field(s) processing_time_seconds"
    ]


def test_a_confidence_the_model_writes_is_an_unexpected_field():
    # object-detection no longer asks for a confidence: it comes from log-probabilities
    answer = od()
    answer["objects_detected"][1]["confidence"] = 0.87
    assert check(json.dumps(answer)).reasons == [
        "objects_detected[1]: unexpected field(s) confidence"
    ]


def test_out_of_range_confidence_by_schema():
    prompt = _loose({"confidence": {"type": "number", "minimum": 0, "maximum": 1}})
    verdict = check_output(
        '{"confidence": 1.5}', prompt, QARules(), original_size=SIZE, model_size=SIZE
    )
    assert verdict.reasons == ["confidence: 1.5 is above the maximum 1"]


def test_out_of_range_confidence_by_rule_when_the_schema_has_no_bound():
    prompt = _loose({"confidence": {"type": "number"}})
    verdict = check_output(
        '{"confidence": 1.5}', prompt, QARules(), original_size=SIZE, model_size=SIZE
    )
    assert verdict.reasons == ["confidence: confidence 1.5 is outside [0, 1]"]
    verdict = check_output(
        '{"confidence": -0.1}', prompt, QARules(), original_size=SIZE, model_size=SIZE
    )
    assert verdict.reasons == ["confidence: confidence -0.1 is outside [0, 1]"]


def test_a_top_level_box_outside_the_image_fails_the_answer():
    # focal_point is an object, not an item of a list: nothing to drop, so it is a reason
    answer = copy.deepcopy(EXAMPLES["focal-point"])
    answer["focal_point"]["bbox_2d"] = bb(900, 100, 1200, 200)
    verdict = check(json.dumps(answer), "focal-point")
    assert not verdict.passed and verdict.result is None
    assert verdict.reasons == [f"focal_point.bbox_2d: [900, 100, 1200, 200] {OUTSIDE}"]


def test_a_top_level_box_with_swapped_corners_fails_the_answer():
    answer = copy.deepcopy(EXAMPLES["focal-point"])
    answer["focal_point"]["bbox_2d"] = bb(680, 550, 380, 250)
    assert check(json.dumps(answer), "focal-point").reasons == [
        "focal_point.bbox_2d: [680, 550, 380, 250] has x2 <= x1 and y2 <= y1; give "
        "[x1, y1, x2, y2]: the top-left corner, then the bottom-right corner"
    ]


def test_a_top_level_box_overhanging_past_the_tolerance_fails_the_answer():
    # 2% of 1036 is 20.72 px: x2 = 1057 overhangs by 21
    answer = copy.deepcopy(EXAMPLES["focal-point"])
    answer["focal_point"]["bbox_2d"] = bb(1000, 0, 1057, 100)
    assert check(json.dumps(answer), "focal-point", model=RESIZED).reasons == [
        f"focal_point.bbox_2d: [1000, 0, 1057, 100] {OUTSIDE_RESIZED}"
    ]


def test_no_focal_point_is_null_and_passes():
    answer = {"focal_point": None, "strength": "none", "safe_crop_note": ""}
    verdict = check(json.dumps(answer), "focal-point")
    assert verdict.passed, verdict.reasons
    assert verdict.result == answer


def test_an_object_whose_box_lies_outside_the_image_is_dropped():
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(900, 100, 1200, 200)
    verdict = check(json.dumps(answer))
    assert verdict.passed, verdict.reasons
    warning = (
        "dropped objects_detected[0]: objects_detected[0].bbox_2d: [900, 100, 1200, 200] " + OUTSIDE
    )
    assert verdict.warnings == [warning]
    assert verdict.result == {
        "objects_detected": [
            {"name": "person", "confidence": None, "bounding_box": box(350, 120, 80, 180)}
        ],
        "image_description": "Street scene with a parked car and a person walking.",
        "qa_warnings": [warning],
    }


def test_a_box_starting_past_the_edge_is_outside_even_within_tolerance():
    answer = od()
    answer["objects_detected"][1]["bbox_2d"] = bb(1030, 10, 1035, 15)
    verdict = check(json.dumps(answer))
    assert verdict.warnings == [
        f"dropped objects_detected[1]: objects_detected[1].bbox_2d: [1030, 10, 1035, 15] {OUTSIDE}"
    ]
    assert verdict.result is not None
    assert [o["name"] for o in verdict.result["objects_detected"]] == ["car"]


def test_objects_whose_corners_are_swapped_are_dropped():
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(320, 80, 120, 230)
    answer["objects_detected"][1]["bbox_2d"] = bb(430, 300, 350, 120)
    verdict = check(json.dumps(answer))
    assert verdict.passed, verdict.reasons
    warnings = [
        "dropped objects_detected[0]: objects_detected[0].bbox_2d: [320, 80, 120, 230] has "
        "x2 <= x1; give [x1, y1, x2, y2]: the top-left corner, then the bottom-right corner",
        "dropped objects_detected[1]: objects_detected[1].bbox_2d: [430, 300, 350, 120] has "
        "x2 <= x1 and y2 <= y1; give [x1, y1, x2, y2]: the top-left corner, then the "
        "bottom-right corner",
    ]
    assert verdict.warnings == warnings
    assert verdict.result == {
        "objects_detected": [],
        "image_description": "Street scene with a parked car and a person walking.",
        "qa_warnings": warnings,
    }


def test_an_object_with_an_empty_box_is_dropped():
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(120, 80, 320, 80)
    verdict = check(json.dumps(answer))
    assert verdict.warnings == [
        "dropped objects_detected[0]: objects_detected[0].bbox_2d: [120, 80, 320, 80] has "
        "y2 <= y1; give [x1, y1, x2, y2]: the top-left corner, then the bottom-right corner"
    ]


def test_small_overhang_is_clamped_then_converted():
    # model image 1036x756 of a 1024x768 original; the box overhangs the right edge by 14 px,
    # within 2% of 1036 (20.72): clamp to x 1000..1036, y 0..100, then scale:
    # left 1000*1024/1036 = 988.42 -> 988, right 1036 -> 1024, bottom 100*768/756 = 101.59 -> 102
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(1000, 0, 1050, 100)
    verdict = check(json.dumps(answer), model=RESIZED)
    assert verdict.passed, verdict.reasons
    assert verdict.warnings == []
    assert verdict.result is not None
    assert verdict.result["objects_detected"][0]["bounding_box"] == box(988, 0, 36, 102)


def test_an_object_overhanging_past_the_tolerance_is_dropped():
    # 2% of 1036 is 20.72 px: x2 = 1057 overhangs by 21
    answer = od()
    answer["objects_detected"][1]["bbox_2d"] = bb(1000, 0, 1057, 100)
    verdict = check(json.dumps(answer), model=RESIZED)
    assert verdict.passed, verdict.reasons
    warning = (
        "dropped objects_detected[1]: objects_detected[1].bbox_2d: [1000, 0, 1057, 100] "
        + OUTSIDE_RESIZED
    )
    assert verdict.warnings == [warning]
    # the car's box in original pixels: 120*1024/1036 = 118.61 -> 119, 80*768/756 = 81.27 ->
    # 81, 320*1024/1036 = 316.29 -> 316, 230*768/756 = 233.65 -> 234
    assert verdict.result == {
        "objects_detected": [
            {"name": "car", "confidence": None, "bounding_box": box(119, 81, 197, 153)}
        ],
        "image_description": "Street scene with a parked car and a person walking.",
        "qa_warnings": [warning],
    }


def test_too_many_items():
    item = EXAMPLES["object-detection"]["objects_detected"][0]
    answer = od(objects_detected=[item] * 11)
    assert check(json.dumps(answer)).reasons == [
        "objects_detected: too many items (11, at most 10)"
    ]


def test_text_too_long_and_bad_enum_are_both_reported():
    answer = copy.deepcopy(EXAMPLES["image-description"])
    answer["description"] = "x" * 301
    answer["style"] = "painting"
    assert check(json.dumps(answer), "image-description").reasons == [
        "description: text too long (301 characters, at most 300)",
        'style: "painting" is not one of "photo", "illustration", "graphic", "screenshot", '
        '"document", "3d-render", "other"',
    ]


def test_blank_required_text_is_rejected():
    verdict = check(json.dumps(od(image_description="   ")))
    assert verdict.reasons == ["image_description: must not be empty"]


def test_blank_alt_text_is_rejected():
    answer = copy.deepcopy(EXAMPLES["alt-text"])
    answer["alt_text"] = " \t"
    assert check(json.dumps(answer), "alt-text").reasons == ["alt_text: must not be empty"]


def test_repeated_tags_are_dropped_with_a_warning():
    verdict = check(json.dumps({"tags": ["city", "bike", "City"]}), "tags-keywords")
    assert verdict.passed, verdict.reasons
    warning = 'dropped tags[2]: "City" repeats an earlier item'
    assert verdict.warnings == [warning]
    assert verdict.result == {
        "tags": ["city", "bike"],
        "main_tag": "city",
        "qa_warnings": [warning],
    }


def test_boxes_are_converted_to_original_pixels_on_pass():
    # model 1036x756 (smart_resize of 1024x768); hand-computed: 518 -> 512, 378 -> 384,
    # right 618*1024/1036 = 610.83 -> 611, bottom 428*768/756 = 434.79 -> 435
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(518, 378, 618, 428)
    verdict = check(json.dumps(answer), model=RESIZED)
    assert verdict.passed, verdict.reasons
    assert verdict.result is not None
    first = verdict.result["objects_detected"][0]
    assert first["bounding_box"] == box(512, 384, 99, 51)
    assert list(first) == ["name", "confidence", "bounding_box"]  # renamed where it was
    assert answer["objects_detected"][0]["bbox_2d"] == bb(518, 378, 618, 428)  # not mutated


def test_every_box_and_point_of_every_example_is_reported_on_the_wire():
    # a model image half the original's size: every coordinate doubles on the wire
    for slug, example in EXAMPLES.items():
        verdict = check(json.dumps(example), slug, original=(2048, 1536), model=SIZE)
        assert verdict.passed, (slug, verdict.reasons)
        assert verdict.warnings == [], slug
        text = json.dumps(verdict.result)
        assert "bbox_2d" not in text and "point_2d" not in text and "points_2d" not in text
        assert text.count('"bounding_box"') == json.dumps(example).count('"bbox_2d"')
        assert text.count('"point"') == json.dumps(example).count('"point_2d"')
        assert text.count('"points"') == json.dumps(example).count('"points_2d"')
    verdict = check(json.dumps(od()), original=(2048, 1536), model=SIZE)
    assert verdict.result is not None
    assert [o["bounding_box"] for o in verdict.result["objects_detected"]] == [
        box(240, 160, 400, 300),
        box(700, 240, 160, 360),
    ]
    people = check(
        json.dumps(EXAMPLES["people-count"]), "people-count", original=(2048, 1536), model=SIZE
    )
    assert people.result is not None
    assert people.result["people"] == [pt(280, 700), pt(870, 700)]
    animals = check(
        json.dumps(EXAMPLES["animal-detection"]),
        "animal-detection",
        original=(2048, 1536),
        model=SIZE,
    )
    assert animals.result is not None
    assert animals.result["animals"][0]["points"] == [xy(1120, 1090), xy(1400, 1200)]


def _drawn_image(tmp_path: Path, size: tuple[int, int]) -> Path:
    """A small PNG: a red block on the left third, blue elsewhere, a white bar at the top."""
    img = Image.new("RGB", size, (0, 0, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, size[0] // 3 - 1, size[1] - 1], fill=(255, 0, 0))
    draw.rectangle([0, 0, size[0] - 1, size[1] // 8 - 1], fill=(255, 255, 255))
    path = tmp_path / "drawn.png"
    img.save(path)
    return path


def test_the_scripted_engines_default_answers_pass_qa(tmp_path):
    # Worker tests run the whole pipeline on tests.doubles.ScriptedEngine: its schema-made
    # answers must pass QA, boxes and points included, on a resized image, with nothing to
    # repair; the pixel facts come from a drawn image, as the worker computes them.
    from goflow_gpu.prompts.pixels import compute_facts
    from tests.doubles import instance_for

    wanted = {fact for spec in CATALOG.specs.values() for fact in spec.qa.pixel_facts.values()}
    facts = compute_facts(_drawn_image(tmp_path, (640, 480)), sorted(wanted))
    for slug, spec in CATALOG.specs.items():
        answer = instance_for(spec.json_schema)
        verdict = check(json.dumps(answer), slug, (640, 480), (644, 476), facts=facts)
        assert verdict.passed, (slug, verdict.reasons)
        assert verdict.warnings == [], (slug, verdict.warnings)
        assert verdict.result is not None
        for name, fact in spec.qa.pixel_facts.items():
            assert verdict.result[name] == facts[fact], (slug, name)


def test_the_scripted_engine_picks_the_count_bin_of_the_points_it_gives():
    from tests.doubles import instance_for

    answer = instance_for(CATALOG.specs["people-count"].json_schema)
    assert answer == {"people": [{"point_2d": [10, 12]}], "count_bin": "1"}
    answer = instance_for(CATALOG.specs["animal-detection"].json_schema)
    assert answer == {
        "animals": [{"species": "a", "group": "mammal", "points_2d": [[10, 12]], "count_bin": "1"}]
    }

    def schema(points: int) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["points", "count_bin"],
            "properties": {
                "points": {"type": "array", "minItems": points, "items": {"type": "string"}},
                "count_bin": {"type": "string", "enum": ["0", "1", "2-3", "4-6", "more than 6"]},
            },
        }

    assert instance_for(schema(5))["count_bin"] == "4-6"
    assert instance_for(schema(7))["count_bin"] == "more than 6"
    assert instance_for(schema(0))["count_bin"] == "0"


def _loose(properties: dict[str, Any]) -> RenderedPrompt:
    return RenderedPrompt(
        slug="loose",
        version=1,
        variant="optimised",
        system_prompt="s",
        user_prompt="u",
        json_schema={"type": "object", "properties": properties},
        max_tokens=64,
        temperature=0.0,
    )


def test_box_checks_do_not_rely_on_the_schema():
    prompt = _loose({"bbox_2d": {}})
    for value in ([1, 2, 3], [1, 2, "3", 4], "0 0 10 10", [True, 0, 5, 5]):
        verdict = check_output(
            json.dumps({"bbox_2d": value}), prompt, QARules(), original_size=SIZE, model_size=SIZE
        )
        assert verdict.reasons == [
            "bbox_2d: a box is 4 integers [x1, y1, x2, y2]: top-left, then bottom-right corner"
        ], value


def test_a_corner_box_beside_a_bounding_box_is_refused():
    prompt = _loose({"bbox_2d": {}, "bounding_box": {}, "tag": {}})
    answer = {"bbox_2d": bb(1, 2, 3, 4), "bounding_box": "elsewhere", "tag": "x"}
    rules = QARules(box_fields=["bbox_2d"])
    verdict = check_output(json.dumps(answer), prompt, rules, original_size=SIZE, model_size=SIZE)
    assert verdict.reasons == ["bbox_2d: remove bounding_box; give each box once, as bbox_2d"]


def test_a_job_frozen_with_object_boxes_still_converts_them():
    # Prompt versions before bbox_2d asked for {x, y, width, height}; a job created with them
    # keeps that schema and these rules after an upgrade, and must still report right boxes.
    old_box = {
        "type": "object",
        "additionalProperties": False,
        "required": ["x", "y", "width", "height"],
        "properties": {k: {"type": "integer"} for k in ("x", "y", "width", "height")},
    }
    prompt = _loose({"bounding_box": old_box})
    rules = QARules.model_validate({"box_fields": ["bounding_box"], "box_tolerance": 0.02})
    verdict = check_output(
        json.dumps({"bounding_box": box(518, 378, 100, 50)}),
        prompt,
        rules,
        original_size=SIZE,
        model_size=RESIZED,
    )
    assert verdict.passed, verdict.reasons
    assert verdict.result == {"bounding_box": box(512, 384, 99, 51)}
    verdict = check_output(
        json.dumps({"bounding_box": box(900, 100, 300, 100)}),
        prompt,
        rules,
        original_size=SIZE,
        model_size=SIZE,
    )
    assert verdict.reasons == [
        "bounding_box: the box x=900 y=100 width=300 height=100 lies outside the image, which "
        "is 1024x768 pixels as you see it (use pixel coordinates of that image)"
    ]


# --- repairs and finishing steps (catalog v2) ------------------------------------------------
#
# What QA repairs instead of re-asking (each repair is a warning, in the verdict and in the
# result's qa_warnings), and what it adds to a passing answer: log-probability confidences,
# computed fields and pixel facts. Every expected value is worked out by hand.


def test_two_identical_detections_are_one():
    # IoU of [120, 80, 320, 230] (200x150 = 30000) and [122, 82, 320, 230] (198x148 = 29304,
    # inside the first): 29304 / 30000 = 0.977 >= 0.9, same name: the second is dropped
    answer = od()
    answer["objects_detected"] = [
        {"name": "car", "bbox_2d": bb(120, 80, 320, 230)},
        {"name": "car", "bbox_2d": bb(122, 82, 320, 230)},
    ]
    verdict = check(json.dumps(answer))
    assert verdict.passed, verdict.reasons
    # the item as QA holds it, cut at 57 characters
    warning = (
        'dropped objects_detected[1]: {"name": "car", "confidence": null, "bounding_box": '
        '{"x":... repeats an earlier item'
    )
    assert verdict.warnings == [warning]
    assert verdict.result == {
        "objects_detected": [
            {"name": "car", "confidence": None, "bounding_box": box(120, 80, 200, 150)}
        ],
        "image_description": "Street scene with a parked car and a person walking.",
        "qa_warnings": [warning],
    }


def test_same_name_in_distant_boxes_is_two_objects():
    answer = od()
    answer["objects_detected"] = [
        {"name": "car", "bbox_2d": bb(120, 80, 320, 230)},
        {"name": "car", "bbox_2d": bb(600, 80, 800, 230)},
    ]
    verdict = check(json.dumps(answer))
    assert verdict.passed, verdict.reasons
    assert verdict.warnings == []
    assert verdict.result == {
        "objects_detected": [
            {"name": "car", "confidence": None, "bounding_box": box(120, 80, 200, 150)},
            {"name": "car", "confidence": None, "bounding_box": box(600, 80, 200, 150)},
        ],
        "image_description": "Street scene with a parked car and a person walking.",
    }


def test_overlapping_boxes_below_the_iou_threshold_are_two_objects():
    # [0, 0, 100, 100] and [0, 0, 100, 89]: IoU 8900 / 10000 = 0.89 < 0.9
    answer = od()
    answer["objects_detected"] = [
        {"name": "car", "bbox_2d": bb(0, 0, 100, 100)},
        {"name": "car", "bbox_2d": bb(0, 0, 100, 89)},
    ]
    verdict = check(json.dumps(answer))
    assert verdict.warnings == []
    assert verdict.result is not None
    assert len(verdict.result["objects_detected"]) == 2


def test_a_different_name_in_the_same_box_is_another_object():
    answer = od()
    answer["objects_detected"] = [
        {"name": "car", "bbox_2d": bb(120, 80, 320, 230)},
        {"name": "van", "bbox_2d": bb(120, 80, 320, 230)},
    ]
    verdict = check(json.dumps(answer))
    assert verdict.warnings == []
    assert verdict.result is not None
    assert [o["name"] for o in verdict.result["objects_detected"]] == ["car", "van"]


def test_a_repeated_secondary_scene_is_dropped():
    answer = copy.deepcopy(EXAMPLES["scene-classification"])
    answer["secondary_scenes"] = ["transport", "aerial", "transport"]
    verdict = check(json.dumps(answer), "scene-classification")
    assert verdict.warnings == ['dropped secondary_scenes[2]: "transport" repeats an earlier item']
    assert verdict.result is not None
    assert verdict.result["secondary_scenes"] == ["transport", "aerial"]


# counts: the bin is set from the points, the evidence


def people(*points: list[int], count_bin: str) -> str:
    return json.dumps({"people": [{"point_2d": p} for p in points], "count_bin": count_bin})


def test_people_count_bin_that_disagrees_with_the_points_is_repaired():
    verdict = check(people([10, 10], [20, 10], [30, 10], count_bin="7-10"), "people-count")
    assert verdict.passed, verdict.reasons
    warning = "count_bin: '7-10' disagreed with 3 point(s); set to '2-3'"
    assert verdict.warnings == [warning]
    assert verdict.result == {
        "people": [pt(10, 10), pt(20, 10), pt(30, 10)],
        "count_bin": "2-3",
        "count": 3,
        "crowd_level": "small-group",  # mapped from the repaired bin
        "qa_warnings": [warning],
    }


def test_no_people_and_bin_one_becomes_zero():
    verdict = check(people(count_bin="1"), "people-count")
    warning = "count_bin: '1' disagreed with 0 point(s); set to '0'"
    assert verdict.result == {
        "people": [],
        "count_bin": "0",
        "count": 0,
        "crowd_level": "none",
        "qa_warnings": [warning],
    }


TWENTY = [[10 * i + 5, 20] for i in range(20)]  # x 5, 15, ..., 195


def test_twenty_people_and_more_than_twenty_is_kept_with_an_unknown_count():
    verdict = check(people(*TWENTY, count_bin="more than 20"), "people-count")
    assert verdict.passed, verdict.reasons
    assert verdict.warnings == []
    assert verdict.result == {
        "people": [pt(10 * i + 5, 20) for i in range(20)],
        "count_bin": "more than 20",
        "count": None,  # the list is full: there may be more
        "crowd_level": "crowd",
    }


def test_twenty_people_in_a_small_bin_become_eleven_to_twenty():
    verdict = check(people(*TWENTY, count_bin="4-6"), "people-count")
    warning = "count_bin: '4-6' disagreed with 20 point(s); set to '11-20'"
    assert verdict.warnings == [warning]
    assert verdict.result is not None
    assert verdict.result["count_bin"] == "11-20"
    assert verdict.result["count"] is None
    assert verdict.result["crowd_level"] == "group"
    assert verdict.result["qa_warnings"] == [warning]


def test_twenty_people_and_eleven_to_twenty_agree():
    verdict = check(people(*TWENTY, count_bin="11-20"), "people-count")
    assert verdict.warnings == []
    assert verdict.result is not None
    assert (verdict.result["count_bin"], verdict.result["count"]) == ("11-20", None)


def test_people_points_are_converted_to_original_pixels():
    # model 1036x756 of a 1024x768 original: x * 1024/1036, y * 768/756, rounded half up
    # [100, 100] -> 98.84 -> 99, 101.59 -> 102; [518, 378] -> 512, 384 exactly;
    # [1036, 756] (the far corner) -> 1024, 768 -> the last pixel 1023, 767;
    # [1050, 10] overhangs by 14 px < 2% of 1036: clamped to 1036 -> 1023; 10 -> 10.16 -> 10
    text = people([100, 100], [518, 378], [1036, 756], [1050, 10], count_bin="4-6")
    verdict = check(text, "people-count", model=RESIZED)
    assert verdict.passed, verdict.reasons
    assert verdict.result == {
        "people": [pt(99, 102), pt(512, 384), pt(1023, 767), pt(1023, 10)],
        "count_bin": "4-6",
        "count": 4,
        "crowd_level": "small-group",
    }


def test_a_person_far_outside_the_image_is_dropped_and_the_bin_follows():
    verdict = check(people([100, 100], [2000, 100], count_bin="2-3"), "people-count", model=RESIZED)
    assert verdict.passed, verdict.reasons
    warnings = [
        f"dropped people[1]: people[1].point_2d: [2000, 100] {OUTSIDE_RESIZED}",
        "count_bin: '2-3' disagreed with 1 point(s); set to '1'",
    ]
    assert verdict.warnings == warnings
    assert verdict.result == {
        "people": [pt(99, 102)],
        "count_bin": "1",
        "count": 1,
        "crowd_level": "single",
        "qa_warnings": warnings,
    }


def test_a_point_outside_the_image_at_the_top_level_fails_the_answer():
    prompt = _loose({"point_2d": {}})
    verdict = check_output(
        '{"point_2d": [2000, 100]}', prompt, QARules(), original_size=SIZE, model_size=SIZE
    )
    assert verdict.reasons == [f"point_2d: [2000, 100] {OUTSIDE}"]


def animal(species: str, group: str, points: list[list[int]], count_bin: str) -> dict[str, Any]:
    return {
        "species": species,
        "group": group,
        "points_2d": points,
        "count_bin": count_bin,
    }


def test_animal_bins_are_checked_and_counted_per_species():
    answer = {
        "animals": [
            animal("domestic cat", "mammal", [[100, 100], [200, 100], [300, 100]], "1"),
            animal("pigeon", "bird", TWENTY, "more than 20"),
            animal("goldfish", "fish", TWENTY, "4-6"),
        ]
    }
    verdict = check(json.dumps(answer), "animal-detection")
    assert verdict.passed, verdict.reasons
    warnings = [
        "animals[0].count_bin: '1' disagreed with 3 point(s); set to '2-3'",
        "animals[2].count_bin: '4-6' disagreed with 20 point(s); set to '11-20'",
    ]
    assert verdict.warnings == warnings
    twenty = [xy(10 * i + 5, 20) for i in range(20)]
    assert verdict.result == {
        "animals": [
            {
                "species": "domestic cat",
                "confidence": None,
                "group": "mammal",
                "points": [xy(100, 100), xy(200, 100), xy(300, 100)],
                "count_bin": "2-3",
                "count": 3,
            },
            {
                "species": "pigeon",
                "confidence": None,
                "group": "bird",
                "points": twenty,
                "count_bin": "more than 20",
                "count": None,
            },
            {
                "species": "goldfish",
                "confidence": None,
                "group": "fish",
                "points": twenty,
                "count_bin": "11-20",
                "count": None,
            },
        ],
        "has_animals": True,
        "qa_warnings": warnings,
    }


def test_an_animal_point_outside_the_image_drops_that_point_only():
    answer = {"animals": [animal("sheep", "mammal", [[100, 100], [5000, 100]], "2-3")]}
    verdict = check(json.dumps(answer), "animal-detection")
    assert verdict.passed, verdict.reasons
    warnings = [
        f"dropped animals[0].points_2d[1]: [5000, 100] {OUTSIDE}",
        "animals[0].count_bin: '2-3' disagreed with 1 point(s); set to '1'",
    ]
    assert verdict.warnings == warnings
    assert verdict.result is not None
    assert verdict.result["animals"] == [
        {
            "species": "sheep",
            "confidence": None,
            "group": "mammal",
            "points": [xy(100, 100)],
            "count_bin": "1",
            "count": 1,
        }
    ]


def test_no_animals():
    verdict = check('{"animals": []}', "animal-detection")
    assert verdict.result == {"animals": [], "has_animals": False}


# exclusions


def test_the_primary_scene_repeated_among_the_secondary_ones_is_removed():
    answer = copy.deepcopy(EXAMPLES["scene-classification"])
    answer["secondary_scenes"] = ["urban-street", "transport"]
    verdict = check(json.dumps(answer), "scene-classification")
    assert verdict.passed, verdict.reasons
    warning = "secondary_scenes: removed 'urban-street', already given as primary_scene"
    assert verdict.warnings == [warning]
    assert verdict.result == {
        "cues": ["zebra crossing", "traffic lights"],
        "primary_scene": "urban-street",
        "confidence": None,
        "secondary_scenes": ["transport"],
        "scene_label": "busy crossing",
        "qa_warnings": [warning],
    }


def test_the_main_mood_repeated_among_the_secondary_ones_is_removed():
    answer = copy.deepcopy(EXAMPLES["scene-mood"])
    answer["secondary_moods"] = ["calm"]
    verdict = check(json.dumps(answer), "scene-mood")
    assert verdict.warnings == ["secondary_moods: removed 'calm', already given as mood"]
    assert verdict.result is not None
    assert verdict.result["secondary_moods"] == []


# computed fields


@pytest.mark.parametrize(
    ("slug", "answer", "computed"),
    [
        ("alt-text", {**EXAMPLES["alt-text"], "visible_text": "OPEN"}, {"contains_text": True}),
        ("alt-text", {**EXAMPLES["alt-text"], "visible_text": "  "}, {"contains_text": False}),
        ("logo-detection", {"logos": []}, {"has_logos": False}),
        ("vehicle-detection", {"vehicles": []}, {"has_vehicles": False}),
        (
            "vehicle-detection",
            {"vehicles": [{"type": "bus", "colour": "red", "bbox_2d": bb(10, 10, 500, 300)}]},
            {"has_vehicles": True},
        ),
        ("landmark-recognition", {"landmarks": []}, {"has_landmark": False}),
        ("product-detection", {"products": []}, {"has_products": False}),
        (
            "food-recognition",
            {"items": [], "cuisine": "", "presentation": "none"},
            {"has_food": False},
        ),
        (
            "copy-space",
            {"regions": [], "suitability": "none"},
            {"has_copy_space": False, "score": 0},
        ),
        (
            "copy-space",
            {"regions": [], "suitability": "poor"},
            {"has_copy_space": False, "score": 3},
        ),
        (
            "text-recognition",
            {"text_blocks": [], "language": ""},
            {"full_text": "", "has_text": False},
        ),
        ("tags-keywords", {"tags": ["harbour", "boat", "sunset"]}, {"main_tag": "harbour"}),
        ("composition", {**EXAMPLES["composition"], "quality": "weak"}, {"score": 3}),
        ("composition", {**EXAMPLES["composition"], "quality": "strong"}, {"score": 9}),
        ("image-quality", {**EXAMPLES["image-quality"], "overall": "poor"}, {"overall_score": 2}),
        (
            "visual-clutter",
            {**EXAMPLES["visual-clutter"], "clutter_level": "extreme"},
            {"score": 9},
        ),
        (
            "document-type",
            {**EXAMPLES["document-type"], "document_type": "none", "orientation": "not-applicable"},
            {"is_document": False},
        ),
        (
            "text-legibility",
            {
                "low_contrast_regions": [],
                "issues": [],
                "contrast": "none",
                "smallest_text": "none",
                "legibility": "no-text",
            },
            {"has_text": False, "score": 0},
        ),
        (
            "text-legibility",
            {**EXAMPLES["text-legibility"], "legibility": "excellent"},
            {"has_text": True, "score": 9},
        ),
    ],
)
def test_computed_fields(slug, answer, computed):
    verdict = check(json.dumps(answer), slug)
    assert verdict.passed, verdict.reasons
    assert verdict.result is not None
    assert {name: verdict.result[name] for name in computed} == computed
    # computed fields come after the answer's own fields, in the order the spec lists them
    keys = list(verdict.result)
    assert [key for key in keys if key in computed] == list(computed)
    assert min(keys.index(key) for key in computed) >= len(answer)


def test_full_text_joins_the_blocks_one_per_line():
    answer = {
        "text_blocks": [
            {"text": "SALE", "bbox_2d": bb(10, 10, 200, 80)},
            {"text": "50% off", "bbox_2d": bb(10, 90, 200, 130)},
            {"text": "today only", "bbox_2d": bb(10, 140, 200, 170)},
        ],
        "language": "English",
    }
    verdict = check(json.dumps(answer), "text-recognition")
    assert verdict.result is not None
    assert verdict.result["full_text"] == "SALE\n50% off\ntoday only"
    assert verdict.result["has_text"] is True


def test_full_text_leaves_out_a_dropped_block():
    answer = {
        "text_blocks": [
            {"text": "SALE", "bbox_2d": bb(10, 10, 200, 80)},
            {"text": "ghost", "bbox_2d": bb(2000, 10, 2100, 80)},
        ],
        "language": "English",
    }
    verdict = check(json.dumps(answer), "text-recognition")
    assert verdict.result is not None
    assert verdict.result["full_text"] == "SALE"
    assert verdict.warnings == [
        f"dropped text_blocks[1]: text_blocks[1].bbox_2d: [2000, 10, 2100, 80] {OUTSIDE}"
    ]


CATEGORIES = ("nudity", "violence", "gore", "weapons", "drugs", "hate_symbols", "self_harm")


@pytest.mark.parametrize(
    ("levels", "worst", "rating", "safe"),
    [
        ({}, "none", "general", True),
        ({"violence": "mild"}, "mild", "mature", False),
        ({"nudity": "mild", "weapons": "strong", "drugs": "mild"}, "strong", "restricted", False),
        ({"self_harm": "strong"}, "strong", "restricted", False),
    ],
)
def test_content_safety_rating_comes_from_the_worst_category(levels, worst, rating, safe):
    categories = {name: levels.get(name, "none") for name in CATEGORIES}
    answer = {"categories": categories, "notes": "" if not levels else "shown"}
    verdict = check(json.dumps(answer), "content-safety")
    assert verdict.passed, verdict.reasons
    assert verdict.result == {
        "categories": categories,
        "notes": answer["notes"],
        "worst_level": worst,
        "rating": rating,
        "safe_for_general_audience": safe,
    }


FLAGS = ("alcohol", "tobacco", "weapons", "drugs", "gambling")


@pytest.mark.parametrize(
    ("flags", "review"),
    [
        ({}, False),
        ({"gambling": "possible"}, True),
        ({"tobacco": "present"}, True),
        ({"alcohol": "possible", "drugs": "present"}, True),
    ],
)
def test_compliance_requires_review_when_any_flag_is_possible_or_present(flags, review):
    answer = {
        "cues": [],
        "flags": {name: flags.get(name, "absent") for name in FLAGS},
        "notes": "",
    }
    verdict = check(json.dumps(answer), "compliance-flags")
    assert verdict.passed, verdict.reasons
    assert verdict.result == {**answer, "requires_review": review}


# confidences from token log-probabilities

OD_TEXT = (
    '{"objects_detected": [{"name": "car", "bbox_2d": [120, 80, 320, 230]}, '
    '{"name": "person", "bbox_2d": [350, 120, 430, 300]}], '
    '"image_description": "Street scene."}'
)
# Split by hand. The token '"car' spells the name with its opening quote and counts whole;
# "person" is spelled by 'per' and 'son",' (which runs past the name and counts whole too);
# the tokens that end right before a name or start right after it do not count.
OD_TOKENS = [
    ('{"objects_detected": [{"name": ', -0.001),
    ('"car', -0.05),
    ('", "bbox_2d": [120, 80, 320, 230]}, {"name": "', -0.01),
    ("per", -0.3),
    ('son",', -0.12),
    (' "bbox_2d": [350, 120, 430, 300]}], "image_description": "Street scene."}', -0.2),
]


def test_object_confidences_come_from_the_name_tokens():
    assert "".join(piece for piece, _ in OD_TOKENS) == OD_TEXT
    verdict = check(OD_TEXT, token_logprobs=OD_TOKENS)
    assert verdict.passed, verdict.reasons
    assert verdict.result == {
        "objects_detected": [
            {
                "name": "car",
                "confidence": round(math.exp(-0.05), 3),  # 0.951
                "bounding_box": box(120, 80, 200, 150),
            },
            {
                "name": "person",
                "confidence": round(math.exp(-0.3 - 0.12), 3),  # 0.657
                "bounding_box": box(350, 120, 80, 180),
            },
        ],
        "image_description": "Street scene.",
    }
    for item in verdict.result["objects_detected"]:
        assert list(item) == ["name", "confidence", "bounding_box"]
    assert [o["confidence"] for o in verdict.result["objects_detected"]] == [0.951, 0.657]


def test_object_confidences_are_null_without_token_logprobs():
    verdict = check(OD_TEXT)
    assert verdict.result is not None
    for item in verdict.result["objects_detected"]:
        assert list(item) == ["name", "confidence", "bounding_box"]
        assert item["confidence"] is None


def test_a_dropped_object_takes_its_confidence_with_it():
    text = (
        '{"objects_detected": [{"name": "dog", "bbox_2d": [900, 100, 1200, 200]}, '
        '{"name": "car", "bbox_2d": [120, 80, 320, 230]}, '
        '{"name": "person", "bbox_2d": [350, 120, 430, 300]}], '
        '"image_description": "Street scene."}'
    )
    tokens = [
        ('{"objects_detected": [{"name": "', 0.0),
        ("dog", -1.5),
        ('", "bbox_2d": [900, 100, 1200, 200]}, {"name": ', 0.0),
        ('"car', -0.05),
        ('", "bbox_2d": [120, 80, 320, 230]}, {"name": "', -0.01),
        ("per", -0.3),
        ('son",', -0.12),
        (' "bbox_2d": [350, 120, 430, 300]}], "image_description": "Street scene."}', -0.2),
    ]
    assert "".join(piece for piece, _ in tokens) == text
    verdict = check(text, token_logprobs=tokens)
    assert verdict.passed, verdict.reasons
    warning = (
        f"dropped objects_detected[0]: objects_detected[0].bbox_2d: [900, 100, 1200, 200] {OUTSIDE}"
    )
    # the confidences were read on the answer as written: the car keeps the car's, not the dog's
    assert verdict.result == {
        "objects_detected": [
            {"name": "car", "confidence": 0.951, "bounding_box": box(120, 80, 200, 150)},
            {"name": "person", "confidence": 0.657, "bounding_box": box(350, 120, 80, 180)},
        ],
        "image_description": "Street scene.",
        "qa_warnings": [warning],
    }


def test_a_top_level_confidence_follows_the_value_it_rates():
    text = '{"cues": [], "primary_scene": "office", "secondary_scenes": [], "scene_label": "desk"}'
    tokens = [
        ('{"cues": [], "primary_scene": "', -0.02),
        ("off", -0.7),
        ("ice", -0.01),
        ('", "secondary_scenes": [], "scene_label": "desk"}', -0.3),
    ]
    assert "".join(piece for piece, _ in tokens) == text
    verdict = check(text, "scene-classification", token_logprobs=tokens)
    assert verdict.result is not None
    assert in_order(verdict.result) == in_order(
        {
            "cues": [],
            "primary_scene": "office",
            "confidence": round(math.exp(-0.71), 3),  # 0.492
            "secondary_scenes": [],
            "scene_label": "desk",
        }
    )
    assert verdict.result["confidence"] == 0.492


# pixel facts


def test_colour_palette_takes_its_colours_from_the_pixel_facts(tmp_path):
    from goflow_gpu.prompts.pixels import compute_facts

    img = Image.new("RGB", (400, 400), (0, 0, 255))
    ImageDraw.Draw(img).rectangle([0, 0, 299, 399], fill=(255, 0, 0))  # 3/4 red, 1/4 blue
    img.save(tmp_path / "rb.png")
    facts = compute_facts(tmp_path / "rb.png", ["palette"])
    verdict = check(json.dumps(EXAMPLES["colour-palette"]), "colour-palette", facts=facts)
    assert verdict.passed, verdict.reasons
    assert verdict.result is not None
    assert list(verdict.result) == ["overall_tone", "saturation", "dominant_colours"]
    colours = verdict.result["dominant_colours"]
    assert colours == facts["palette"]
    assert [(c["name"], c["share"]) for c in colours] == [("red", 75), ("blue", 25)]


def test_a_pixel_fact_that_was_not_computed_is_a_callers_bug():
    with pytest.raises(ValueError, match="pixel fact 'palette' for 'dominant_colours' was not"):
        check(json.dumps(EXAMPLES["colour-palette"]), "colour-palette", facts=None)
    with pytest.raises(ValueError, match="pixel fact 'orientation' for 'orientation' was not"):
        check(json.dumps(EXAMPLES["composition"]), "composition", facts={"palette": PALETTE})


def test_image_quality_takes_four_pixel_facts_after_its_score():
    verdict = check(json.dumps(EXAMPLES["image-quality"]), "image-quality")
    assert verdict.result is not None
    assert list(verdict.result) == [
        "issues",
        "focus",
        "exposure",
        "overall",
        "overall_score",
        "resolution",
        "sharpness",
        "brightness",
        "contrast",
    ]


# the final shape


def test_no_qa_warnings_key_when_nothing_was_repaired():
    verdict = check(json.dumps(EXAMPLES["object-detection"]))
    assert verdict.warnings == []
    assert verdict.result is not None
    assert list(verdict.result) == ["objects_detected", "image_description"]


# The contract's example analysis result (goflow-api.md, "Analysis result"), copied verbatim.
SEED_RESULT: dict[str, Any] = {
    "objects_detected": [
        {
            "name": "car",
            "confidence": 0.95,
            "bounding_box": {"x": 120, "y": 80, "width": 200, "height": 150},
        },
        {
            "name": "person",
            "confidence": 0.87,
            "bounding_box": {"x": 350, "y": 120, "width": 80, "height": 180},
        },
    ],
    "image_description": "Street scene with a car parked on the left and a person walking on "
    "the right.",
    "processing_time_seconds": 12.5,
}


def keys_at_every_level(value: Any, where: str = "") -> list[tuple[str, list[str]]]:
    """``(path, the object's keys in order)`` of every object in ``value``."""
    found: list[tuple[str, list[str]]] = []
    if isinstance(value, dict):
        found.append((where, list(value)))
        for key, item in value.items():
            found.extend(keys_at_every_level(item, f"{where}.{key}"))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(keys_at_every_level(item, f"{where}[{index}]"))
    return found


def test_object_detection_result_has_the_shape_of_the_contracts_example():
    # the model's answer for the contract's scene, in the same pixel space, with name tokens
    # whose probabilities are the example's confidences
    description = SEED_RESULT["image_description"]
    text = (
        '{"objects_detected": [{"name": "car", "bbox_2d": [120, 80, 320, 230]}, '
        '{"name": "person", "bbox_2d": [350, 120, 430, 300]}], '
        f'"image_description": "{description}"}}'
    )
    tokens = [
        ('{"objects_detected": [{"name": "', 0.0),
        ("car", math.log(0.95)),
        ('", "bbox_2d": [120, 80, 320, 230]}, {"name": "', 0.0),
        ("person", math.log(0.87)),
        ('", "bbox_2d": [350, 120, 430, 300]}], "image_description": "', 0.0),
        (description, -0.5),
        ('"}', 0.0),
    ]
    assert "".join(piece for piece, _ in tokens) == text
    verdict = check(text, token_logprobs=tokens)
    assert verdict.passed, verdict.reasons
    seed = {k: v for k, v in SEED_RESULT.items() if k != "processing_time_seconds"}
    assert keys_at_every_level(verdict.result) == keys_at_every_level(seed)
    assert verdict.result == seed


# --- repeats and their warnings ---------------------------------------------------------------


def test_a_repeated_food_item_is_dropped_with_or_without_logprobs():
    # the same item twice: dropped without log-probabilities (both confidences null), but kept
    # with them, because the two copies are spelled by different tokens
    text = (
        '{"items": [{"name": "espresso", "category": "drink"}, '
        '{"name": "espresso", "category": "drink"}], "cuisine": "", "presentation": "home"}'
    )
    tokens = [
        ('{"items": [{"name": "', 0.0),
        ("espresso", -0.1),
        ('", "category": "drink"}, {"name": "', 0.0),
        ("espresso", -0.9),
        ('", "category": "drink"}], "cuisine": "", "presentation": "home"}', 0.0),
    ]
    assert "".join(piece for piece, _ in tokens) == text
    assert check(text, "food-recognition").warnings != []  # without: dropped
    verdict = check(text, "food-recognition", token_logprobs=tokens)
    assert verdict.result is not None
    assert verdict.result["items"] == [
        {"name": "espresso", "confidence": round(math.exp(-0.1), 3), "category": "drink"}
    ]


def test_warnings_name_items_by_their_place_in_the_answer_as_written():
    answer = od()
    answer["objects_detected"] = [
        {"name": "dog", "bbox_2d": bb(900, 100, 1200, 200)},  # off the image: dropped
        {"name": "car", "bbox_2d": bb(120, 80, 320, 230)},
        {"name": "car", "bbox_2d": bb(122, 82, 320, 230)},  # the repeat, [2] as written
    ]
    verdict = check(json.dumps(answer))
    assert verdict.warnings[0].startswith("dropped objects_detected[0]: ")
    assert verdict.warnings[1].startswith("dropped objects_detected[2]: ")


# --- geometry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "kwargs", "expected"),
    [
        # 768/28 = 27.43 -> 27*28 = 756; 1024/28 = 36.57 -> 37*28 = 1036; 783216 px fits
        (768, 1024, {}, (756, 1036)),
        # 4004*3000 > 1003520: scale sqrt(12e6/1003520) = 3.458;
        # 4000/3.458/28 = 41.3 -> 41*28 = 1148; 3000/3.458/28 = 30.98 -> 30*28 = 840
        (4000, 3000, {}, (1148, 840)),
        # 28*28 < 3136: scale sqrt(3136/600) = 2.286; 20*2.286/28 = 1.63 -> 2 -> 56;
        # 30*2.286/28 = 2.45 -> 3 -> 84
        (20, 30, {}, (56, 84)),
        # 1092*1932 > 1003520: scale sqrt(2073600/1003520) = 1.4375;
        # 1080/1.4375/28 = 26.8 -> 728; 1920/1.4375/28 = 47.7 -> 1316
        (1080, 1920, {"min_pixels": 256 * 28 * 28}, (728, 1316)),
        (448, 448, {}, (448, 448)),
        # max 448*448: 1000x1000 -> scale sqrt(1e6/200704) = 2.232; 1000/2.232/28 = 16 -> 448
        (1000, 1000, {"max_pixels": 448 * 448}, (448, 448)),
    ],
)
def test_smart_resize(height, width, kwargs, expected):
    assert smart_resize(height, width, **kwargs) == expected


def test_smart_resize_refuses_extreme_aspect_ratios_and_empty_images():
    with pytest.raises(MediaError):
        smart_resize(10, 3000)
    with pytest.raises(MediaError):
        smart_resize(0, 100)


# --- retry -----------------------------------------------------------------------------------


def test_retry_prompt_appends_the_reasons():
    reasons = ["image_description: missing required field", "objects_detected: too many items"]
    text = retry_user_prompt("Find the objects.", reasons)
    assert text.startswith("Find the objects.\n\n")
    for reason in reasons:
        assert f"- {reason}" in text
    assert "previous answer was rejected" in text


def test_retry_prompt_caps_long_reason_lists():
    reasons = [f"field{i}: bad" for i in range(15)]
    text = retry_user_prompt("Q", reasons)
    assert "- field9: bad" in text
    assert "field10" not in text
    assert "and 5 more" in text


def test_degenerate_nesting_and_huge_numbers_fail_qa_with_a_reason() -> None:
    from goflow_gpu.prompts.qa import parse_json_output

    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json_output('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(ValueError, match="too large"):
        parse_json_output('{"a": [1, {"b": 1e400}]}')


def test_tokens_that_do_not_spell_the_answer_give_no_confidence():
    # an engine whose token texts differ from the answer (stripped, re-decoded) must not rate
    # values by the wrong characters: the confidences are null, the answer still passes
    text = json.dumps({"objects_detected": [{"name": "car", "bbox_2d": bb(10, 10, 50, 50)}],
                       "image_description": "A car."})  # fmt: skip
    tokens = [(text[:-1], -0.5)]  # one character short
    verdict = check(text, token_logprobs=tokens)
    assert verdict.passed, verdict.reasons
    assert verdict.result is not None
    assert verdict.result["objects_detected"][0]["confidence"] is None
