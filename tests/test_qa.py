"""QA of model answers, box geometry and retry prompts. Expected values are worked out by hand.

Answers are in the model's form (boxes as Qwen's ``bbox_2d`` corners in the pixels of the image
as the model saw it); passed results are in the wire's form (``bounding_box`` ``{x, y, width,
height}`` in the original image's pixels).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from goflow_gpu.errors import MediaError
from goflow_gpu.prompts import QARules, RenderedPrompt, load_catalog
from goflow_gpu.prompts.geometry import smart_resize
from goflow_gpu.prompts.qa import QAVerdict, check_output, retry_user_prompt

CATALOG = load_catalog()
SIZE = (1024, 768)  # (width, height) of the original image in the examples


def box(x: int, y: int, w: int, h: int) -> dict[str, int]:
    """A wire box: original pixels, top-left corner and size."""
    return {"x": x, "y": y, "width": w, "height": h}


def bb(x1: int, y1: int, x2: int, y2: int) -> list[int]:
    """A model box (``bbox_2d``): top-left and bottom-right corners in the model's pixels."""
    return [x1, y1, x2, y2]


def as_wire(answer: Any) -> Any:
    """``answer`` as QA reports it when the model saw the original size: every ``bbox_2d``
    replaced, in place, by ``bounding_box`` with the same corners."""
    if isinstance(answer, list):
        return [as_wire(item) for item in answer]
    if not isinstance(answer, dict):
        return answer
    out: dict[str, Any] = {}
    for key, value in answer.items():
        if key == "bbox_2d":
            x1, y1, x2, y2 = value
            out["bounding_box"] = box(x1, y1, x2 - x1, y2 - y1)
        else:
            out[key] = as_wire(value)
    return out


# One hand-written valid answer per shipped spec (not generated from the schemas).
EXAMPLES: dict[str, dict[str, Any]] = {
    "object-detection": {
        "objects_detected": [
            {"name": "car", "confidence": 0.95, "bbox_2d": bb(120, 80, 320, 230)},
            {"name": "person", "confidence": 0.87, "bbox_2d": bb(350, 120, 430, 300)},
        ],
        "image_description": "Street scene with a parked car and a person walking.",
    },
    "text-recognition": {
        "has_text": True,
        "text_blocks": [
            {"text": "OPEN", "confidence": 0.9, "bbox_2d": bb(10, 10, 110, 50)},
            {"text": "Mon-Fri 9-5", "confidence": 0.7, "bbox_2d": bb(10, 60, 190, 90)},
        ],
        "full_text": "OPEN Mon-Fri 9-5",
        "language": "English",
    },
    "image-description": {
        "description": "A red bicycle leans against a brick wall in afternoon light.",
        "main_subjects": ["bicycle", "brick wall"],
        "style": "photo",
    },
    "scene-classification": {
        "primary_scene": "urban-street",
        "secondary_scenes": ["transport"],
        "scene_label": "busy crossing",
        "confidence": 0.8,
    },
    "tags-keywords": {"tags": ["bicycle", "city", "red", "wall"], "main_tag": "bicycle"},
    "people-count": {
        "count": 2,
        "crowd_level": "small-group",
        "people": [
            {"confidence": 0.9, "bbox_2d": bb(100, 200, 180, 500)},
            {"confidence": 0.6, "bbox_2d": bb(400, 210, 470, 490)},
        ],
        "confidence": 0.85,
    },
    "logo-detection": {
        "has_logos": True,
        "logos": [{"brand": "unknown", "confidence": 0.4, "bbox_2d": bb(900, 20, 1000, 70)}],
    },
    "product-detection": {
        "products": [
            {
                "name": "running shoe",
                "category": "footwear",
                "brand": "unknown",
                "confidence": 0.75,
                "bbox_2d": bb(300, 400, 550, 550),
            }
        ]
    },
    "colour-palette": {
        "dominant_colours": [
            {"hex": "#1f3a5f", "name": "navy blue", "share": 45},
            {"hex": "#f2e9dc", "name": "cream", "share": 30},
        ],
        "overall_tone": "cool",
        "saturation": "moderate",
    },
    "image-quality": {
        "sharpness": "sharp",
        "exposure": "good",
        "noise": "low",
        "compression_artifacts": "none",
        "overall_score": 8,
        "issues": ["slight vignetting"],
        "usable_for_print": True,
    },
    "composition": {
        "orientation": "landscape",
        "framing": "wide",
        "rule_of_thirds": True,
        "symmetry": "none",
        "leading_lines": True,
        "balance": "balanced",
        "score": 7,
        "notes": "The road leads to the subject on the right third.",
    },
    "content-safety": {
        "safe_for_general_audience": True,
        "rating": "general",
        "categories": {
            "nudity": "none",
            "violence": "none",
            "gore": "none",
            "weapons": "none",
            "drugs": "none",
            "hate_symbols": "none",
            "self_harm": "none",
        },
        "confidence": 0.97,
        "notes": "",
    },
    "alt-text": {
        "alt_text": "Red bicycle against a brick wall.",
        "long_description": "",
        "contains_text": False,
        "decorative": False,
    },
    "text-legibility": {
        "has_text": True,
        "legibility": "fair",
        "contrast": "low",
        "smallest_text": "small",
        "score": 5,
        "low_contrast_regions": [{"bbox_2d": bb(0, 700, 400, 760)}],
        "issues": ["grey caption on grey background"],
    },
    "focal-point": {
        "focal_point": {
            "subject": "bicycle",
            "confidence": 0.8,
            "bbox_2d": bb(380, 250, 680, 550),
        },
        "strength": "clear",
        "safe_crop_note": "The left third can be cropped.",
    },
    "setting": {
        "environment": "outdoor",
        "time_of_day": "golden-hour",
        "weather": "clear",
        "season": "unknown",
        "lighting": "natural",
        "location_type": "side street",
        "confidence": 0.7,
    },
    "animal-detection": {
        "has_animals": True,
        "animals": [
            {
                "species": "domestic cat",
                "group": "mammal",
                "count": 1,
                "confidence": 0.9,
                "bbox_2d": bb(500, 500, 620, 590),
            }
        ],
    },
    "vehicle-detection": {
        "has_vehicles": False,
        "vehicles": [],
    },
    "food-recognition": {
        "has_food": True,
        "items": [{"name": "espresso", "category": "drink", "confidence": 0.8}],
        "cuisine": "Italian",
        "presentation": "restaurant",
    },
    "landmark-recognition": {"has_landmark": False, "landmarks": []},
    "document-type": {
        "is_document": True,
        "document_type": "receipt",
        "title": "",
        "language": "German",
        "orientation": "upright",
        "confidence": 0.88,
    },
    "copy-space": {
        "has_copy_space": True,
        "regions": [
            {
                "position": "top",
                "background": "plain",
                "text_colour": "dark",
                "bbox_2d": bb(0, 0, 1024, 200),
            }
        ],
        "score": 8,
    },
    "visual-clutter": {
        "clutter_level": "low",
        "score": 2,
        "subject_clear": True,
        "distractions": ["sign post"],
    },
    "scene-mood": {
        "mood": "calm",
        "secondary_moods": ["romantic"],
        "intensity": 2,
        "cues": ["warm low sun", "empty street"],
        "confidence": 0.6,
    },
    "compliance-flags": {
        "flags": {
            "alcohol": {"present": True, "confidence": 0.9},
            "tobacco": {"present": False, "confidence": 0.95},
            "weapons": {"present": False, "confidence": 0.99},
            "drugs": {"present": False, "confidence": 0.98},
            "gambling": {"present": False, "confidence": 0.97},
        },
        "requires_review": True,
        "notes": "A wine bottle on the table.",
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
) -> QAVerdict:
    prompt, rules = rendered(slug)
    return check_output(text, prompt, rules, original_size=original, model_size=model)


def od(**changes: Any) -> dict[str, Any]:
    answer = copy.deepcopy(EXAMPLES["object-detection"])
    answer.update(changes)
    return answer


# --- valid answers ---------------------------------------------------------------------------


def test_every_shipped_spec_has_an_example():
    assert set(EXAMPLES) == set(CATALOG.specs)


@pytest.mark.parametrize("slug", sorted(EXAMPLES))
def test_hand_written_example_passes(slug):
    verdict = check(json.dumps(EXAMPLES[slug]), slug)
    assert verdict.reasons == []
    assert verdict.passed
    # same pixel space: the same boxes, reported in the wire's form
    assert verdict.result == as_wire(EXAMPLES[slug])
    assert "bbox_2d" not in json.dumps(verdict.result)


def test_fenced_json_block_is_accepted():
    text = "```json\n" + json.dumps(EXAMPLES["object-detection"], indent=2) + "\n```"
    verdict = check(text)
    assert verdict.passed, verdict.reasons
    assert verdict.result == as_wire(EXAMPLES["object-detection"])


def test_plain_fence_without_language_is_accepted():
    verdict = check("```\n" + json.dumps(EXAMPLES["setting"]) + "\n```\n", "setting")
    assert verdict.passed, verdict.reasons


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
    text = json.dumps(od()).replace("0.95", "NaN")
    (reason,) = check(text).reasons
    assert "NaN is not allowed" in reason


def test_duplicate_keys_are_refused():
    text = '{"image_description": "a", "image_description": "b", "objects_detected": []}'
    (reason,) = check(text).reasons
    assert "duplicate key 'image_description'" in reason


def test_wrong_type():
    answer = od()
    answer["objects_detected"][0]["confidence"] = "high"
    verdict = check(json.dumps(answer))
    assert verdict.reasons == ['objects_detected[0].confidence: expected number, got string "high"']


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


def test_unexpected_field():
    answer = od(processing_time_seconds=1.0)
    assert check(json.dumps(answer)).reasons == [
        "(top level): unexpected field(s) processing_time_seconds"
    ]


def test_out_of_range_confidence_by_schema():
    answer = od()
    answer["objects_detected"][1]["confidence"] = 1.5
    assert check(json.dumps(answer)).reasons == [
        "objects_detected[1].confidence: 1.5 is above the maximum 1"
    ]


def test_out_of_range_confidence_by_rule_when_the_schema_has_no_bound():
    prompt = RenderedPrompt(
        slug="loose",
        version=1,
        variant="optimised",
        system_prompt="s",
        user_prompt="u",
        json_schema={"type": "object", "properties": {"confidence": {"type": "number"}}},
        max_tokens=64,
        temperature=0.0,
    )
    verdict = check_output(
        '{"confidence": 1.5}', prompt, QARules(), original_size=SIZE, model_size=SIZE
    )
    assert verdict.reasons == ["confidence: confidence 1.5 is outside [0, 1]"]
    verdict = check_output(
        '{"confidence": -0.1}', prompt, QARules(), original_size=SIZE, model_size=SIZE
    )
    assert verdict.reasons == ["confidence: confidence -0.1 is outside [0, 1]"]


def test_box_outside_the_image():
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(900, 100, 1200, 200)
    verdict = check(json.dumps(answer))
    assert not verdict.passed
    assert verdict.reasons == [
        "objects_detected[0].bbox_2d: [900, 100, 1200, 200] lies outside the image, which is "
        "1024x768 pixels as you see it (x from 0 to 1024, y from 0 to 768)"
    ]


def test_box_starting_past_the_edge_is_outside_even_within_tolerance():
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(1030, 10, 1035, 15)
    assert "outside the image" in check(json.dumps(answer)).reasons[0]


def test_box_with_swapped_corners_is_refused():
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(320, 80, 120, 230)
    answer["objects_detected"][1]["bbox_2d"] = bb(430, 300, 350, 120)
    assert check(json.dumps(answer)).reasons == [
        "objects_detected[0].bbox_2d: [320, 80, 120, 230] has x2 <= x1; give [x1, y1, x2, y2]: "
        "the top-left corner, then the bottom-right corner",
        "objects_detected[1].bbox_2d: [430, 300, 350, 120] has x2 <= x1 and y2 <= y1; give "
        "[x1, y1, x2, y2]: the top-left corner, then the bottom-right corner",
    ]


def test_empty_box_is_refused():
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(120, 80, 320, 80)
    (reason,) = check(json.dumps(answer)).reasons
    assert reason.startswith("objects_detected[0].bbox_2d: [120, 80, 320, 80] has y2 <= y1;")


def test_small_overhang_is_clamped_then_converted():
    # model image 1036x756 of a 1024x768 original; the box overhangs the right edge by 14 px,
    # within 2% of 1036 (20.72): clamp to x 1000..1036, y 0..100, then scale:
    # left 1000*1024/1036 = 988.42 -> 988, right 1036 -> 1024, bottom 100*768/756 = 101.59 -> 102
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(1000, 0, 1050, 100)
    verdict = check(json.dumps(answer), model=(1036, 756))
    assert verdict.passed, verdict.reasons
    assert verdict.result is not None
    assert verdict.result["objects_detected"][0]["bounding_box"] == box(988, 0, 36, 102)


def test_overhang_past_the_tolerance_is_refused():
    # 2% of 1036 is 20.72 px: x2 = 1057 overhangs by 21
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(1000, 0, 1057, 100)
    (reason,) = check(json.dumps(answer), model=(1036, 756)).reasons
    assert reason.startswith("objects_detected[0].bbox_2d: [1000, 0, 1057, 100] lies outside")
    assert "1036x756 pixels as you see it" in reason


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


def test_repeated_tags_are_rejected():
    answer = {"tags": ["city", "bike", "City"], "main_tag": "city"}
    assert check(json.dumps(answer), "tags-keywords").reasons == [
        'tags: "City" is listed more than once'
    ]


def test_boxes_are_converted_to_original_pixels_on_pass():
    # model 1036x756 (smart_resize of 1024x768); hand-computed: 518 -> 512, 378 -> 384,
    # right 618*1024/1036 = 610.83 -> 611, bottom 428*768/756 = 434.79 -> 435
    answer = od()
    answer["objects_detected"][0]["bbox_2d"] = bb(518, 378, 618, 428)
    verdict = check(json.dumps(answer), model=(1036, 756))
    assert verdict.passed, verdict.reasons
    assert verdict.result is not None
    first = verdict.result["objects_detected"][0]
    assert first["bounding_box"] == box(512, 384, 99, 51)
    assert list(first) == ["name", "confidence", "bounding_box"]  # renamed where it was
    assert answer["objects_detected"][0]["bbox_2d"] == bb(518, 378, 618, 428)  # not mutated


def test_every_box_field_of_every_example_is_reported_on_the_wire():
    # a model image half the original's size: every coordinate doubles on the wire
    for slug, example in EXAMPLES.items():
        verdict = check(json.dumps(example), slug, original=(2048, 1536), model=SIZE)
        assert verdict.passed, (slug, verdict.reasons)
        text = json.dumps(verdict.result)
        assert "bbox_2d" not in text
        assert text.count('"bounding_box"') == json.dumps(example).count('"bbox_2d"')
    verdict = check(json.dumps(od()), original=(2048, 1536), model=SIZE)
    assert verdict.result is not None
    assert [o["bounding_box"] for o in verdict.result["objects_detected"]] == [
        box(240, 160, 400, 300),
        box(700, 240, 160, 360),
    ]


def test_the_scripted_engines_default_answers_pass_qa():
    # Worker tests run the whole pipeline on tests.doubles.ScriptedEngine: its schema-made
    # answers must pass QA, boxes included, on a resized image.
    from tests.doubles import instance_for

    for slug in CATALOG.specs:
        answer = instance_for(CATALOG.specs[slug].json_schema)
        verdict = check(json.dumps(answer), slug, original=(640, 480), model=(644, 476))
        assert verdict.passed, (slug, verdict.reasons)


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
        model_size=(1036, 756),
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
