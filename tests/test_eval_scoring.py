"""Scoring of labelled fields, run summaries, comparisons, label loading and reports.

Every expected score here is worked out by hand in the test (IoU, precision, recall, F1,
difflib ratios), never by calling the code under test.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from goflow_gpu.evaluation import (
    ALL,
    AnalysisScore,
    Answer,
    EvalSetError,
    LabelledImage,
    ScoringRules,
    compare,
    iou,
    load_labelled_set,
    score_fields,
    score_run,
    summarise,
    write_reports,
)

BOX_SCHEMA = {
    "type": "object",
    "properties": {k: {"type": "integer"} for k in ("x", "y", "width", "height")},
}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "flag": {"type": "boolean"},
        "level": {"type": "string", "enum": ["low", "mid", "high"]},
        "count": {"type": "integer", "minimum": 0},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "caption": {"type": "string"},
        # Qwen-native boxes in the model's schema; labels and results use wire bounding_box.
        "objects": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "confidence": {"type": "number"},
                    "bbox_2d": {
                        "type": "array",
                        "minItems": 4,
                        "maxItems": 4,
                        "items": {"type": "integer"},
                    },
                },
            },
        },
        "people": {
            "type": "array",
            "items": {"type": "object", "properties": {"bounding_box": BOX_SCHEMA}},
        },
        "focus": {
            "type": "object",
            "properties": {"subject": {"type": "string"}, "bounding_box": BOX_SCHEMA},
        },
        "colours": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "share": {"type": "integer"}},
            },
        },
    },
}


def box(x: float, y: float, w: float, h: float) -> dict[str, float]:
    return {"x": x, "y": y, "width": w, "height": h}


def one(expected: dict[str, Any], result: dict[str, Any] | None, **rules: float):
    scores = score_fields(expected, result, SCHEMA, ScoringRules(**rules))
    assert len(scores) == 1
    return scores[0]


# --- exact, number, text ----------------------------------------------------------------------


def test_exact_booleans_and_enums():
    assert one({"flag": True}, {"flag": True}).score == 1.0
    assert one({"flag": True}, {"flag": False}).score == 0.0
    assert one({"flag": True}, {"flag": 1}).score == 0.0  # 1 is not true in JSON
    assert one({"level": "mid"}, {"level": "mid"}).kind == "exact"
    assert one({"level": "mid"}, {"level": "mid"}).score == 1.0
    assert one({"level": "mid"}, {"level": "high"}).score == 0.0


def test_number_tolerance_edges():
    # Default: abs_tol 0, rel_tol 0.1 -> a count of 10 may be 9..11, a count of 0 must be 0.
    assert one({"count": 10}, {"count": 11}).score == 1.0
    assert one({"count": 10}, {"count": 9}).score == 1.0
    assert one({"count": 10}, {"count": 12}).score == 0.0
    assert one({"count": 0}, {"count": 0}).score == 1.0
    assert one({"count": 0}, {"count": 1}).score == 0.0
    # 0.55 - 0.5 is 0.05000000000000004 in floats: the edge is inclusive all the same.
    assert one({"score": 0.5}, {"score": 0.55}).score == 1.0
    assert one({"score": 0.5}, {"score": 0.56}).score == 0.0
    # abs_tol wins where it is larger: 5 +- 2.
    assert one({"count": 5}, {"count": 7}, abs_tol=2, rel_tol=0).score == 1.0
    assert one({"count": 5}, {"count": 8}, abs_tol=2, rel_tol=0).score == 0.0
    assert one({"count": 1}, {"count": True}).score == 0.0  # a boolean is no count
    assert one({"count": 3}, {"count": 3}).kind == "number"


def test_text_similarity_bounds():
    same = one({"caption": "A red  Circle"}, {"caption": " a red circle "})
    assert (same.kind, same.score) == ("text", 1.0)
    # "abcd" vs "abxy": 2 matching characters of 8 in all -> ratio 2 * 2 / 8 = 0.5.
    assert one({"caption": "abcd"}, {"caption": "abxy"}).score == pytest.approx(0.5)
    assert one({"caption": "aaaa"}, {"caption": "bbbb"}).score == 0.0
    assert one({"caption": "abcd"}, {"caption": 42}).score == 0.0


# --- sets, boxes, items -------------------------------------------------------------------------


def test_set_f1():
    # {a,b,c} vs {b,c,d}: 2 matched; P = 2/3, R = 2/3, F1 = 2/3.
    got = one({"tags": ["a", "b", "c"]}, {"tags": ["b", "c", "d"]})
    assert got.kind == "set"
    assert (got.matched, got.n_expected, got.n_predicted) == (2, 3, 3)
    assert got.precision == pytest.approx(2 / 3)
    assert got.recall == pytest.approx(2 / 3)
    assert got.score == pytest.approx(2 / 3)
    # Case and spaces do not matter; duplicates collapse: {b, c} -> P = 1, R = 2/3,
    # F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8.
    assert one({"tags": ["a", "b", "c"]}, {"tags": [" B", "b", "C"]}).score == pytest.approx(0.8)
    assert one({"tags": []}, {"tags": []}).score == 1.0
    assert one({"tags": []}, {"tags": ["x"]}).score == 0.0


def test_iou_by_hand():
    # Inside: 10x6 inside 10x10 -> 60 / 100.
    assert iou(box(0, 0, 10, 10), box(0, 0, 10, 6)) == pytest.approx(0.6)
    # Shifted 4 down: overlap 10x6 = 60, union 100 + 100 - 60 = 140.
    assert iou(box(0, 0, 10, 10), box(0, 4, 10, 10)) == pytest.approx(60 / 140)
    assert iou(box(0, 0, 10, 10), box(20, 20, 5, 5)) == 0.0


def test_boxes_precision_recall_f1():
    expected = {
        "objects": [
            {"name": "circle", "bounding_box": box(0, 0, 10, 10)},
            {"name": "square", "bounding_box": box(100, 100, 10, 10)},
        ]
    }
    result = {
        "objects": [
            # IoU with the circle: 10x6 inside 10x10 = 60 / 100 = 0.6 >= 0.5 -> matched.
            {"name": " Circle", "confidence": 0.9, "bounding_box": box(0, 0, 10, 6)},
            # IoU with the square: 4x10 inside 10x10 = 40 / 100 = 0.4 < 0.5 -> not matched.
            {"name": "square", "confidence": 0.8, "bounding_box": box(100, 100, 4, 10)},
            {"name": "triangle", "confidence": 0.5, "bounding_box": box(300, 300, 20, 20)},
        ]
    }
    got = one(expected, result)
    assert got.kind == "boxes"
    # 1 matched of 2 expected and 3 predicted: P = 1/3, R = 1/2, F1 = 2PR/(P+R) = 0.4.
    assert (got.matched, got.n_expected, got.n_predicted) == (1, 2, 3)
    assert got.precision == pytest.approx(1 / 3)
    assert got.recall == pytest.approx(1 / 2)
    assert got.score == pytest.approx(0.4)
    assert [(i, j) for i, j, _ in got.pairs] == [(0, 0)]
    assert got.pairs[0][2] == pytest.approx(0.6)


def test_boxes_need_equal_names_when_labelled():
    expected = {"objects": [{"name": "circle", "bounding_box": box(0, 0, 10, 10)}]}
    wrong_name = {"objects": [{"name": "square", "bounding_box": box(0, 0, 10, 10)}]}
    assert one(expected, wrong_name).score == 0.0
    unnamed = {"objects": [{"bounding_box": box(0, 0, 10, 10)}]}
    assert one({"objects": unnamed["objects"]}, wrong_name).score == 1.0  # name not labelled


def test_boxes_match_best_overlap_first():
    expected = {
        "people": [{"bounding_box": box(0, 0, 10, 10)}, {"bounding_box": box(2, 0, 10, 10)}]
    }
    # p0 = (1.5, 0, 10, 10): with e0 overlap 8.5x10 = 85, union 115 -> 0.739;
    #                        with e1 overlap 9.5x10 = 95, union 105 -> 0.905.
    # p1 = e0 exactly -> IoU 1.0 with e0; with e1 overlap 80, union 120 -> 0.667.
    # Best first: (e0, p1) at 1.0, then (e1, p0) at 0.905; both expected boxes matched.
    result = {
        "people": [{"bounding_box": box(1.5, 0, 10, 10)}, {"bounding_box": box(0, 0, 10, 10)}]
    }
    got = one(expected, result)
    assert got.score == 1.0
    assert [(i, j) for i, j, _ in got.pairs] == [(0, 1), (1, 0)]
    assert got.pairs[1][2] == pytest.approx(95 / 105)


def test_empty_box_lists():
    assert one({"people": []}, {"people": []}).score == 1.0
    extra = one({"people": []}, {"people": [{"bounding_box": box(0, 0, 5, 5)}]})
    assert (extra.kind, extra.score, extra.precision) == ("boxes", 0.0, 0.0)


def test_single_box_and_nested_paths():
    expected = {"focus": {"subject": "dog", "bounding_box": box(0, 0, 10, 10)}}
    hit = score_fields(
        expected, {"focus": {"subject": "dog", "bounding_box": box(0, 0, 10, 6)}}, SCHEMA
    )
    assert [(f.path, f.kind, f.score) for f in hit] == [
        ("focus.subject", "text", 1.0),
        ("focus.bounding_box", "box", 1.0),  # IoU 0.6
    ]
    miss = score_fields(
        expected, {"focus": {"subject": "dog", "bounding_box": box(0, 0, 4, 10)}}, SCHEMA
    )
    assert miss[1].score == 0.0  # IoU 0.4


def test_items_without_boxes_match_on_labelled_fields():
    # One expected colour, found among two predicted: P = 1/2, R = 1, F1 = 2/3.
    got = one(
        {"colours": [{"name": "white"}]},
        {"colours": [{"name": "White", "share": 80}, {"name": "black", "share": 20}]},
    )
    assert got.kind == "items"
    assert got.score == pytest.approx(2 / 3)
    # A labelled share must agree within tolerance (80 +- 8).
    assert (
        one(
            {"colours": [{"name": "white", "share": 80}]},
            {"colours": [{"name": "white", "share": 70}]},
        ).score
        == 0.0
    )


def test_missing_result_and_missing_fields_score_zero():
    expected = {
        "flag": False,
        "count": 0,
        "tags": [],
        "caption": "",
        "people": [],
        "focus": {"subject": "x"},
    }
    scores = score_fields(expected, None, SCHEMA)
    assert [f.path for f in scores] == [
        "flag",
        "count",
        "tags",
        "caption",
        "people",
        "focus.subject",
    ]
    assert [f.score for f in scores] == [0.0] * 6
    partial = score_fields({"flag": False, "count": 0}, {"flag": False}, SCHEMA)
    assert [f.score for f in partial] == [1.0, 0.0]


@pytest.mark.parametrize(
    ("label", "named"),
    [
        ({"focus": {"subjekt": "x"}}, "focus.subjekt"),
        ({"level": "medium"}, "level"),
        ({"count": "3"}, "count"),
        ({"tags": "a"}, "tags"),
        (
            {"objects": [{"name": "a", "colour": "red", "bounding_box": box(0, 0, 1, 1)}]},
            "objects[0].colour",
        ),
    ],
)
def test_labels_that_do_not_fit_the_schema_name_the_field(label: dict[str, Any], named: str):
    with pytest.raises(EvalSetError, match=named.replace("[", r"\[").replace("]", r"\]")):
        score_fields(label, {}, SCHEMA)


# --- summaries and comparisons ------------------------------------------------------------------


def _image(name: str, expected: dict[str, dict[str, Any]]) -> LabelledImage:
    return LabelledImage(name=name, path=Path(f"{name}.png"), size=(100, 100), expected=expected)


def test_summarise_rates_by_hand():
    labelled = [
        _image("img1", {"t": {"flag": True, "count": 2}}),
        _image("img2", {"t": {"flag": False}, "u": {"flag": True}}),
        _image("img3", {}),
    ]
    answers = [
        # flag right (1), count 3 vs 2: tolerance 0.2 -> wrong (0).
        Answer("img1", "t", True, True, {"flag": True, "count": 3}, 100, 10, 1.0),
        # valid JSON but refused by QA: its one labelled field counts 0.
        Answer("img2", "t", True, False, None, 200, 20, 2.0),
        # unlabelled image: only the rates and costs see it.
        Answer("img3", "t", False, False, None, None, 30, 3.0),
        # "u" is labelled on img2 only, and the run never answered img2 for it.
        Answer("img1", "u", True, True, {"flag": False}, 50, 5, 0.5),
    ]
    schemas = {"t": SCHEMA, "u": SCHEMA}
    summary = summarise(answers, labelled, schemas)
    assert set(summary) == {"t", "u", ALL}
    t = summary["t"]
    assert t.answers == 3
    assert t.schema_valid_rate == pytest.approx(2 / 3)
    assert t.qa_pass_rate == pytest.approx(1 / 3)
    assert (t.labelled, t.missing, t.fields) == (2, 0, 3)
    assert t.field_agreement == pytest.approx((1 + 0 + 0) / 3)
    assert t.field_means == {"flag": pytest.approx(0.5), "count": 0.0}
    assert t.prompt_tokens_per_answer == pytest.approx(150)  # (100 + 200) / 2 known counts
    assert t.generated_tokens_per_answer == pytest.approx(20)
    assert t.seconds_per_answer == pytest.approx(2.0)
    assert t.box_precision is None and t.box_recall is None
    u = summary["u"]
    assert (u.answers, u.labelled, u.missing, u.field_agreement) == (1, 1, 1, 0.0)
    everything = summary[ALL]
    assert everything.answers == 4
    assert everything.schema_valid_rate == pytest.approx(3 / 4)
    assert everything.qa_pass_rate == pytest.approx(2 / 4)
    assert everything.field_agreement == pytest.approx(1 / 4)  # scores 1, 0, 0, 0


def test_box_precision_and_recall_are_pooled():
    labelled = [
        _image(
            "a",
            {
                "t": {
                    "objects": [
                        {"bounding_box": box(0, 0, 10, 10)},
                        {"bounding_box": box(50, 50, 10, 10)},
                    ]
                }
            },
        ),
        _image("b", {"t": {"people": []}}),
    ]
    answers = [
        Answer(
            "a",
            "t",
            True,
            True,
            {
                "objects": [
                    {"bounding_box": box(0, 0, 10, 10)},
                    {"bounding_box": box(80, 80, 5, 5)},
                    {"bounding_box": box(90, 0, 5, 5)},
                ]
            },
        ),
        Answer("b", "t", True, True, {"people": [{"bounding_box": box(0, 0, 5, 5)}]}),
    ]
    row = summarise(answers, labelled, {"t": SCHEMA})["t"]
    # matched 1; expected 2 + 0; predicted 3 + 1 -> P = 1/4, R = 1/2.
    assert (row.box_matched, row.box_expected, row.box_predicted) == (1, 2, 4)
    assert row.box_precision == pytest.approx(0.25)
    assert row.box_recall == pytest.approx(0.5)


def _row(slug: str, agreement: float, qa: float, valid: float) -> AnalysisScore:
    return AnalysisScore(
        slug=slug,
        answers=10,
        schema_valid_rate=valid,
        qa_pass_rate=qa,
        labelled=10,
        missing=0,
        fields=20,
        field_agreement=agreement,
        box_matched=0,
        box_expected=0,
        box_predicted=0,
        box_precision=None,
        box_recall=None,
        prompt_tokens_per_answer=100.0,
        generated_tokens_per_answer=50.0,
        seconds_per_answer=1.0,
    )


def test_compare_orders_regressions_and_reports_the_worst_drop():
    baseline = {"a": _row("a", 0.8, 0.95, 0.9), "b": _row("b", 0.5, 1.0, 1.0)}
    candidate = {"a": _row("a", 0.6, 0.90, 1.0), "b": _row("b", 0.7, 1.0, 1.0)}
    result = compare(candidate, baseline)
    # a: agreement -0.2, QA -0.05, schema +0.1 (a gain); b: agreement +0.2.
    assert [(d.slug, d.metric) for d in result.regressions] == [
        ("a", "field_agreement"),
        ("a", "qa_pass_rate"),
    ]
    assert result.worst_drop == pytest.approx(0.2)
    found = result.delta("a", "schema_valid_rate")
    assert found is not None and found.delta == pytest.approx(0.1)
    missing = result.delta("a", "box_precision")
    assert missing is not None and missing.delta is None
    same = compare(baseline, baseline)
    assert same.regressions == () and same.worst_drop == 0.0


def test_compare_runs_end_to_end():
    labelled = [_image("i", {"t": {"flag": True}})]
    good = score_run("new", [Answer("i", "t", True, True, {"flag": True})], labelled, {"t": SCHEMA})
    bad = score_run("old", [Answer("i", "t", True, True, {"flag": False})], labelled, {"t": SCHEMA})
    assert compare(bad.summary, good.summary).worst_drop == pytest.approx(1.0)
    assert compare(good.summary, bad.summary).worst_drop == 0.0


# --- loading labelled sets ------------------------------------------------------------------------


def _png(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


def test_load_a_set(tmp_path: Path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.yaml").write_text("t:\n  flag: true\n  count: 2\n")
    _png(tmp_path / "b.jpg", (20, 10))
    (tmp_path / "b.json").write_text('{"t": {"tags": ["x"]}}')
    _png(tmp_path / "c.png")  # no labels: allowed
    (tmp_path / "README.md").write_text("ignored")
    images = load_labelled_set(tmp_path, {"t": SCHEMA})
    assert [(i.name, i.size) for i in images] == [("a", (40, 30)), ("b", (20, 10)), ("c", (40, 30))]
    assert images[0].expected == {"t": {"flag": True, "count": 2}}
    assert images[1].expected == {"t": {"tags": ["x"]}}
    assert images[2].expected == {} and images[2].label_file is None


@pytest.mark.parametrize(
    ("files", "bad", "message"),
    [
        ({"a.yaml": "t: {flag: true}"}, "a.yaml", "label file without an image"),
        ({"a.png": b"\x89PNG not really"}, "a.png", "unreadable image"),
        ({"a.png": None, "a.yaml": "- t\n- u\n"}, "a.yaml", "not a mapping"),
        ({"a.png": None, "a.yaml": "t: [1, 2]\n"}, "a.yaml", "t: not a mapping"),
        (
            {"a.png": None, "a.yaml": "objekt-detection: {flag: true}\n"},
            "a.yaml",
            "unknown analysis type 'objekt-detection'",
        ),
        (
            {"a.png": None, "a.yaml": "t:\n  focus: {subjekt: x}\n"},
            "a.yaml",
            "focus.subjekt: not a field",
        ),
        ({"a.png": None, "a.yaml": "t:\n  flag: [\n"}, "a.yaml", "invalid YAML"),
        ({"a.png": None, "a.json": '{"t": }'}, "a.json", "invalid JSON"),
        (
            {"a.png": None, "a.yaml": "t:\n  caption: 2024-01-01\n"},
            "a.yaml",
            "date is not a JSON value",
        ),
        ({"a.png": None, "a.jpg": None}, "a.png", "two images named 'a'"),
        ({"a.png": None, "a.yaml": "{}", "a.json": "{}"}, "a.yaml", "two label files"),
    ],
)
def test_label_loading_errors_name_the_file(
    tmp_path: Path, files: dict[str, str | bytes | None], bad: str, message: str
):
    for name, content in files.items():
        if content is None:
            _png(tmp_path / name)
        elif isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).write_text(content)
    schemas = {"t": SCHEMA, "object-detection": SCHEMA}
    with pytest.raises(EvalSetError) as caught:
        load_labelled_set(tmp_path, schemas)
    assert str(tmp_path / bad) in str(caught.value)
    assert message in str(caught.value)


def test_unknown_slug_suggests_the_close_one(tmp_path: Path):
    _png(tmp_path / "a.png")
    (tmp_path / "a.yaml").write_text("objekt-detection: {flag: true}\n")
    with pytest.raises(EvalSetError, match="did you mean 'object-detection'"):
        load_labelled_set(tmp_path, {"object-detection": SCHEMA})
    assert load_labelled_set(tmp_path)[0].expected  # without schemas nothing is checked


def test_empty_set_and_missing_directory(tmp_path: Path):
    (tmp_path / "README.md").write_text("no images")
    with pytest.raises(EvalSetError, match="empty set") as caught:
        load_labelled_set(tmp_path)
    assert str(tmp_path) in str(caught.value)
    with pytest.raises(EvalSetError, match="not a directory"):
        load_labelled_set(tmp_path / "nowhere")


# --- reports ----------------------------------------------------------------------------------


def test_reports_are_written_and_escaped(tmp_path: Path):
    image_path = _png(tmp_path / "pic.png", (100, 80))
    labelled = [
        LabelledImage(
            name="pic",
            path=image_path,
            size=(100, 80),
            expected={"t": {"objects": [{"name": "circle", "bounding_box": box(10, 10, 20, 20)}]}},
            label_file=None,
        )
    ]
    sneaky = "<script>alert('x')</script> & co"
    new = score_run(
        "new <prompts>",
        [
            Answer(
                "pic",
                "t",
                True,
                True,
                {"objects": [{"name": sneaky, "bounding_box": box(50, 40, 10, 10)}]},
                120,
                30,
                0.4,
            )
        ],
        labelled,
        {"t": SCHEMA},
    )
    old = score_run(
        "old",
        [
            Answer(
                "pic",
                "t",
                True,
                True,
                {"objects": [{"name": "circle", "bounding_box": box(11, 10, 20, 20)}]},
                110,
                25,
                0.3,
            )
        ],
        labelled,
        {"t": SCHEMA},
    )
    paths = write_reports(tmp_path / "out", labelled, new, old)
    assert set(paths) == {"json", "markdown", "html"}

    data = json.loads(paths["json"].read_text())
    assert data["candidate"]["name"] == "new <prompts>"
    assert data["candidate"]["summary"]["t"]["field_agreement"] == 0.0
    assert data["baseline"]["summary"]["t"]["field_agreement"] == 1.0
    assert data["comparison"]["worst_drop"] == pytest.approx(1.0)
    answer = data["candidate"]["answers"][0]
    assert answer["expected"] == labelled[0].expected["t"]
    assert answer["fields"][0]["kind"] == "boxes"

    markdown = paths["markdown"].read_text()
    assert "| t |" in markdown and "Biggest regressions" in markdown
    assert "field_agreement" in markdown

    page = paths["html"].read_text()
    encoded = base64.b64encode(image_path.read_bytes()).decode()
    assert f"data:image/png;base64,{encoded}" in page
    assert "<svg" in page and page.count("<rect") == 3  # expected, candidate, baseline
    assert "<script" not in page
    assert "&lt;script&gt;" in page and "&amp; co" in page
    assert "new &lt;prompts&gt;" in page


def test_reports_without_baseline(tmp_path: Path):
    image_path = _png(tmp_path / "pic.png")
    labelled = [LabelledImage("pic", image_path, (40, 30), {"t": {"flag": True}}, None)]
    run = score_run(
        "only", [Answer("pic", "t", True, True, {"flag": True})], labelled, {"t": SCHEMA}
    )
    paths = write_reports(tmp_path / "out", labelled, run)
    data = json.loads(paths["json"].read_text())
    assert data["baseline"] is None and data["comparison"] is None
    assert "baseline" not in paths["markdown"].read_text()
    assert "<svg" in paths["html"].read_text()


def test_a_date_label_is_refused_even_after_a_library_made_yaml_dates_strings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    # What lm-format-enforcer (imported with vLLM) does to every SafeLoader of the process.
    constructors = dict(yaml.SafeLoader.yaml_constructors)
    constructors["tag:yaml.org,2002:timestamp"] = constructors["tag:yaml.org,2002:str"]
    monkeypatch.setattr(yaml.SafeLoader, "yaml_constructors", constructors)
    assert isinstance(yaml.safe_load("a: 2024-01-01")["a"], str)
    _png(tmp_path / "a.png")
    (tmp_path / "a.yaml").write_text("t:\n  caption: 2024-01-01\n")
    with pytest.raises(EvalSetError, match="date is not a JSON value"):
        load_labelled_set(tmp_path, {"t": SCHEMA})
