"""Computed fields (prompts.derive): every rule on hand-made results, expected values by hand."""

from __future__ import annotations

from typing import Any

import pytest

from goflow_gpu.prompts.derive import apply_computed, computed_type, read_path
from goflow_gpu.prompts.spec import Computed


def computed(field: str, rule: str, source: str, **options: Any) -> Computed:
    return Computed.model_validate({"field": field, "rule": rule, "source": source, **options})


def derive(result: dict[str, Any], *entries: Computed) -> dict[str, Any]:
    apply_computed(result, list(entries))
    return result


# --- read_path -------------------------------------------------------------------------------

NODE: dict[str, Any] = {
    "title": "Menu",
    "meta": {"lang": "en", "page": {"number": 2}},
    "blocks": [{"text": "A", "n": 1}, {"text": "B"}, "not an object", {"text": None}],
    "flags": {"alcohol": "absent", "tobacco": "present"},
    "empty": [],
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("title", "Menu"),
        ("meta.lang", "en"),
        ("meta.page.number", 2),
        ("missing", None),
        ("meta.missing", None),
        ("title.deeper", None),  # a string has no keys
        ("missing.deeper", None),
        # an item without the key, or no object at all, reads None
        ("blocks[].text", ["A", "B", None, None]),
        ("blocks[].n", [1, None, None, None]),
        ("flags.*", ["absent", "present"]),
        ("meta.*", ["en", {"number": 2}]),
        ("title.*", []),  # not an object: nothing
        ("missing.*", []),
        ("missing[].text", []),
        ("title[].text", []),  # not a list: nothing
        ("empty[].text", []),
    ],
)
def test_read_path(source, expected):
    assert read_path(NODE, source) == expected


def test_read_path_returns_the_value_itself_not_a_copy():
    assert read_path(NODE, "blocks") is NODE["blocks"]


# --- the rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text", True),
        ("  \n", False),
        ("", False),
        (["a"], True),
        ([], False),
        ({"k": 1}, True),
        ({}, False),
        (None, False),
        (False, False),
        (True, True),
    ],
)
def test_non_empty(value, expected):
    result = derive({"v": value}, computed("has_v", "non_empty", "v"))
    assert result == {"v": value, "has_v": expected}


def test_non_empty_of_a_missing_field_is_false():
    assert derive({}, computed("has_v", "non_empty", "v")) == {"has_v": False}


@pytest.mark.parametrize(
    ("value", "at_most", "expected"),
    [
        ([], None, 0),
        ([1, 2, 3], None, 3),
        (list(range(25)), None, 25),
        ([], 20, 0),
        (list(range(19)), 20, 19),
        (list(range(20)), 20, None),  # full: the exact count is unknown
        ("abc", None, None),  # not a list
        (None, 20, None),
    ],
)
def test_count(value, at_most, expected):
    entry = computed("count", "count", "people", at_most=at_most)
    assert derive({"people": value}, entry)["count"] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(["harbour", "boat"], "harbour"), ([], None), ("harbour", None), (None, None)],
)
def test_first(value, expected):
    assert derive({"tags": value}, computed("main_tag", "first", "tags"))["main_tag"] == expected


def test_join_skips_what_is_not_a_text_and_empty_texts():
    result = {
        "blocks": [
            {"text": "SALE"},
            {"text": 50},
            {"other": "x"},
            {"text": ""},
            {"text": None},
            {"text": "today only"},
        ]
    }
    entry = computed("full_text", "join", "blocks[].text", separator="\n")
    assert derive(result, entry)["full_text"] == "SALE\ntoday only"


def test_join_separator_and_edge_cases():
    entry = computed("all", "join", "words", separator=", ")
    assert derive({"words": ["a", "b", "c"]}, entry)["all"] == "a, b, c"
    assert derive({"words": []}, entry)["all"] == ""
    assert derive({"words": "single"}, entry)["all"] == "single"  # a text joins to itself
    assert derive({}, entry)["all"] == ""
    default = computed("all", "join", "words")
    assert derive({"words": ["a", "b"]}, default)["all"] == "a\nb"  # the default separator


def test_map():
    entry = computed("score", "map", "quality", mapping={"weak": 3, "good": 7})
    assert derive({"quality": "good"}, entry)["score"] == 7
    assert derive({"quality": "weak"}, entry)["score"] == 3
    assert derive({"quality": "superb"}, entry)["score"] is None  # unknown value
    assert derive({"quality": 7}, entry)["score"] is None  # not a text
    assert derive({}, entry)["score"] is None


def test_map_to_booleans_keeps_false():
    entry = computed("has_text", "map", "legibility", mapping={"no-text": False, "fair": True})
    assert derive({"legibility": "no-text"}, entry)["has_text"] is False
    assert derive({"legibility": "fair"}, entry)["has_text"] is True


def test_all_in_over_the_values_of_an_object():
    entry = computed("safe", "all_in", "categories.*", values=["none"])
    assert derive({"categories": {"a": "none", "b": "none"}}, entry)["safe"] is True
    assert derive({"categories": {"a": "none", "b": "mild"}}, entry)["safe"] is False
    assert derive({"categories": {"a": "strong"}}, entry)["safe"] is False


def test_any_in_over_the_values_of_an_object():
    entry = computed("review", "any_in", "flags.*", values=["possible", "present"])
    assert derive({"flags": {"a": "absent", "b": "absent"}}, entry)["review"] is False
    assert derive({"flags": {"a": "absent", "b": "possible"}}, entry)["review"] is True
    assert derive({"flags": {"a": "present", "b": "possible"}}, entry)["review"] is True
    assert derive({"flags": {}}, entry)["review"] is False  # nothing flagged


def test_all_in_and_any_in_of_a_single_value():
    assert derive({"v": "none"}, computed("x", "all_in", "v", values=["none"]))["x"] is True
    assert derive({"v": "mild"}, computed("x", "any_in", "v", values=["none"]))["x"] is False


@pytest.mark.parametrize(
    ("levels", "expected"),
    [
        (["none", "none"], "none"),
        (["mild", "none"], "mild"),
        (["none", "strong", "mild"], "strong"),
        (["strong", "mild"], "strong"),  # the ranking of values, not the order of the source
        (["mild", "odd", 3], "mild"),  # unknown values and non-texts are not ranked
        (["odd"], None),
        ([], None),
    ],
)
def test_worst_is_ranked_by_the_order_of_values(levels, expected):
    categories = {f"c{i}": level for i, level in enumerate(levels)}
    entry = computed("worst", "worst", "categories.*", values=["none", "mild", "strong"])
    assert derive({"categories": categories}, entry)["worst"] == expected


def test_a_list_field_is_computed_in_every_item_from_that_item():
    result: dict[str, Any] = {
        "animals": [
            {"species": "cat", "points": [{"point": {"x": 1, "y": 2}}] * 3},
            {"species": "pigeon", "points": [{"point": {"x": 1, "y": 2}}] * 20},
            {"species": "fish", "points": []},
            {"species": "no points"},
            "not an object",
        ]
    }
    entry = computed("animals[].count", "count", "points", at_most=20)
    derive(result, entry)
    assert [a["count"] for a in result["animals"][:4]] == [3, None, 0, None]
    assert result["animals"][4] == "not an object"
    assert list(result["animals"][0]) == ["species", "points", "count"]


def test_a_list_field_of_a_missing_list_is_nothing():
    result: dict[str, Any] = {"other": 1}
    assert derive(result, computed("animals[].count", "count", "points")) == {"other": 1}


def test_a_later_field_reads_an_earlier_one():
    result = {"categories": {"nudity": "none", "violence": "mild"}}
    derive(
        result,
        computed("worst_level", "worst", "categories.*", values=["none", "mild", "strong"]),
        computed(
            "rating",
            "map",
            "worst_level",
            mapping={"none": "general", "mild": "mature", "strong": "restricted"},
        ),
    )
    assert result == {
        "categories": {"nudity": "none", "violence": "mild"},
        "worst_level": "mild",
        "rating": "mature",
    }
    assert list(result) == ["categories", "worst_level", "rating"]


def test_a_computed_field_replaces_a_field_of_the_same_name():
    result = {"tags": ["b", "a"], "main_tag": "stale"}
    assert derive(result, computed("main_tag", "first", "tags"))["main_tag"] == "b"


# --- computed_type ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (computed("x", "non_empty", "v"), {"type": "boolean"}),
        (computed("x", "all_in", "v.*", values=["none"]), {"type": "boolean"}),
        (computed("x", "any_in", "v.*", values=["present"]), {"type": "boolean"}),
        (computed("x", "count", "v"), {"type": "integer", "minimum": 0}),
        (
            computed("x", "count", "v", at_most=20),
            {"type": ["integer", "null"], "minimum": 0, "maximum": 19},
        ),
        (computed("x", "join", "v[].text"), {"type": "string"}),
        (
            computed("x", "worst", "v.*", values=["none", "mild", "strong"]),
            {"type": ["string", "null"], "enum": ["none", "mild", "strong", None]},
        ),
        (
            computed("x", "map", "v", mapping={"a": "low", "b": "high", "c": "low"}),
            {"type": "string", "enum": ["low", "high"]},
        ),
        (computed("x", "map", "v", mapping={"a": False, "b": True}), {"type": "boolean"}),
        (
            computed("x", "map", "v", mapping={"a": 3, "b": 9, "c": 0}),
            {"type": "integer", "minimum": 0, "maximum": 9},
        ),
        (computed("x", "map", "v", mapping={"a": 0.5, "b": 1}), {"type": "number"}),
        (computed("x", "map", "v", mapping={"a": 1, "b": "one"}), {"type": "number"}),
    ],
)
def test_computed_type(entry, expected):
    assert computed_type(entry, None) == expected


def test_computed_type_of_first_is_the_item_schema_or_null():
    entry = computed("main_tag", "first", "tags")
    item = {"type": "string", "maxLength": 30}
    assert computed_type(entry, item) == {"anyOf": [item, {"type": "null"}]}
    assert computed_type(entry, None) == {"anyOf": [{}, {"type": "null"}]}
