"""The token-budget lint: worst-case answers, budget verdicts, the ``prompts budget`` command.

Worst-case instances are written out by hand here. With the tiny model's tokenizer, expected
token counts come from tokenizing the hand-written JSON in the test itself, with Qwen's rule for
digits (one token each) spelled out below, not from budget.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from goflow_gpu.prompts.budget import (
    NUMBER_TOKENS,
    SAMPLE_TEXT,
    check_spec,
    check_specs,
    load_tokenizer,
    render_json,
    sample_string,
    worst_case,
)
from goflow_gpu.prompts.catalog import load_catalog
from goflow_gpu.prompts.cli import app
from goflow_gpu.prompts.spec import PromptSpec
from tests.doubles import strict_object

runner = CliRunner()


def chars(text: str) -> int:
    """A stand-in tokenizer: one token per character, so the costliest choice is the longest."""
    return len(text)


obj = strict_object


# --- worst-case instances (character counter) ------------------------------------------------


def test_sample_text_is_dense_latin_with_digits_and_punctuation():
    assert re.search(r"[A-Z]{3}", SAMPLE_TEXT)
    assert re.search(r"\d", SAMPLE_TEXT)
    assert re.search(r"[,.;:()/#+!'-]", SAMPLE_TEXT)
    assert SAMPLE_TEXT.isprintable() and '"' not in SAMPLE_TEXT and "\\" not in SAMPLE_TEXT
    assert sample_string(3) == "Lot"
    assert sample_string(len(SAMPLE_TEXT) + 4) == SAMPLE_TEXT + "Lot "


def test_worst_case_of_scalars():
    schema = obj(
        note={"type": "string", "maxLength": 10},
        level={"type": "string", "enum": ["low", "medium", "high"]},
        count={"type": "integer", "minimum": -5, "maximum": 100},
        debt={"type": "integer", "minimum": -1000, "maximum": 10},
        flag={"type": "boolean"},
        nothing={"type": "null"},
        fixed={"const": "v2"},
        price={"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.01},
    )
    case = worst_case(schema, chars)
    assert render_json(case.instance) == (
        '{"note":"Lot 7B: Fr","level":"medium","count":100,"debt":-1000,"flag":false,'
        '"nothing":null,"fixed":"v2","price":10.99}'
    )
    assert case.errors == [] and case.warnings == [] and case.extra_tokens == 0


def test_worst_case_of_arrays_objects_and_branches():
    schema = obj(
        items={
            "type": "array",
            "maxItems": 2,
            "items": obj(name={"type": "string", "maxLength": 3}, box={
                "type": "array", "minItems": 4, "maxItems": 4,
                "items": {"type": "integer", "minimum": 0, "maximum": 8192},
            }),
        },
        focus={"anyOf": [obj(subject={"type": "string", "maxLength": 5}), {"type": "null"}]},
        maybe={"type": ["string", "null"], "maxLength": 2},
        pair={"type": "array", "prefixItems": [{"const": "x"}], "items": False, "maxItems": 3},
        ref={"$ref": "#/$defs/tag"},
        empty={"type": "array", "maxItems": 0, "items": {"type": "string"}},
    )  # fmt: skip
    schema["$defs"] = {"tag": {"type": "string", "enum": ["a", "bb"]}}
    case = worst_case(schema, chars)
    assert render_json(case.instance) == (
        '{"items":[{"name":"Lot","box":[8192,8192,8192,8192]},'
        '{"name":"Lot","box":[8192,8192,8192,8192]}],'
        '"focus":{"subject":"Lot 7"},"maybe":"Lo","pair":["x"],"ref":"bb","empty":[]}'
    )
    assert case.errors == [] and case.warnings == []


def test_numbers_without_a_token_bound_count_a_fixed_number_with_a_warning():
    schema = obj(
        confidence={"type": "number", "minimum": 0, "maximum": 1},
        scores={"type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0}},
    )
    case = worst_case(schema, chars)
    assert render_json(case.instance) == '{"confidence":0,"scores":[0,0]}'
    # each unbounded number costs NUMBER_TOKENS instead of the 1 of its placeholder 0
    assert case.extra_tokens == 3 * (NUMBER_TOKENS - 1)
    assert (
        case.tokens(chars) == len('{"confidence":0,"scores":[0,0]}') + 3 * (NUMBER_TOKENS - 1) + 1
    )
    assert len(case.warnings) == 2
    assert case.warnings[0].startswith("confidence: number without multipleOf")
    assert case.warnings[1].startswith("scores[]: integer without both minimum and maximum")
    assert case.errors == []


def test_unbounded_parts_are_errors_listed_together():
    schema = obj(
        text={"type": "string"},
        tags={"type": "array", "items": {"type": "string", "maxLength": 5}},
        anything={},
        inner=obj(deep={"type": "string"}),
    )
    case = worst_case(schema, chars)
    assert case.errors == [
        "text: string without maxLength, so its length is unbounded",
        "tags: array without maxItems, so its length is unbounded",
        "anything: allows any value, so no answer length is bounded",
        "inner.deep: string without maxLength, so its length is unbounded",
    ]


def test_pattern_strings_and_open_objects_are_warnings():
    schema = {
        "type": "object",
        "properties": {"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
    }
    case = worst_case(schema, chars)
    assert case.instance == {"hex": sample_string(64)}
    assert [w.split(":")[0] for w in case.warnings] == ["(top level)", "hex"]


# --- budgets with the tiny model's tokenizer -------------------------------------------------


def qwen_like_count(directory: Path, text: str) -> int:
    """Tokens of ``text`` with the tiny tokenizer, each digit charged as its own token (Qwen
    splits numbers into digits; the tiny BPE merges some), plus the end-of-turn token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    total = 0
    for start, end in encoded["offset_mapping"]:
        piece = text[start:end]
        digits = sum(ch.isdigit() for ch in piece)
        total += 1 if digits == 0 else digits + (0 if digits == len(piece) else 1)
    return total + 1


BUDGET_SCHEMA = obj(
    name={"type": "string", "maxLength": 12, "description": "what it is"},
    bbox_2d={
        "type": "array",
        "minItems": 4,
        "maxItems": 4,
        "items": {"type": "integer", "minimum": 0, "maximum": 8192},
    },
    tone={"type": "string", "enum": ["red", "very dark green"]},
)
BUDGET_WORST = '{"name":"Lot 7B: Fres","bbox_2d":[8192,8192,8192,8192],"tone":"very dark green"}'


def budget_spec(max_tokens: int, retry: int | None = None) -> PromptSpec:
    qa: dict[str, Any] = {"box_fields": ["bbox_2d"]}
    if retry is not None:
        qa["retry_max_tokens"] = retry
    return PromptSpec.model_validate(
        {
            "slug": "hand-made",
            "name": "Hand made",
            "version": 1,
            "variant": "optimised",
            "user_prompt": "Name it, box it, colour it.",
            "json_schema": BUDGET_SCHEMA,
            "qa": qa,
            "sampling": {"max_tokens": max_tokens, "temperature": 0},
        }
    )


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir, "tiny")


@pytest.mark.engine
def test_digits_cost_one_token_each_as_in_qwen(tiny_tokenizer: Any):
    assert tiny_tokenizer.count("8192") == 4
    assert tiny_tokenizer.count("[8192,0]") == 8


@pytest.mark.engine
def test_budget_below_the_worst_case_is_refused(tiny_model_dir: Path, tiny_tokenizer: Any):
    expected = qwen_like_count(tiny_model_dir, BUDGET_WORST)
    enough = check_spec(budget_spec(expected), tiny_tokenizer.count)
    assert render_json(enough.answer) == BUDGET_WORST
    assert enough.worst_case == expected
    assert enough.headroom == 0 and not enough.refused and enough.errors == []

    short = check_spec(budget_spec(expected - 1), tiny_tokenizer.count)
    assert short.refused and short.headroom == -1
    assert short.errors == [
        f"sampling.max_tokens {expected - 1} is below the worst case of {expected} tokens, so "
        f"the longest answer the schema allows is cut off: set max_tokens >= {expected} or "
        "lower the schema's maxItems / maxLength"
    ]


@pytest.mark.engine
def test_retry_budget_below_the_budget_is_refused(tiny_model_dir: Path, tiny_tokenizer: Any):
    expected = qwen_like_count(tiny_model_dir, BUDGET_WORST)
    assert not check_spec(
        budget_spec(expected + 10, retry=expected + 10), tiny_tokenizer.count
    ).refused
    low = check_spec(budget_spec(expected + 10, retry=expected + 9), tiny_tokenizer.count)
    assert low.refused
    assert low.errors[0].startswith(f"qa.retry_max_tokens {expected + 9} is below")


SHARED = "system_prompt: You look at one image and answer in JSON.\n"


def write_spec_catalog(directory: Path, max_tokens: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_catalog.yaml").write_text(SHARED)
    data = budget_spec(max_tokens).model_dump(mode="json", exclude_defaults=True)
    (directory / "hand-made.yaml").write_text(json.dumps(data))  # JSON is YAML
    return directory


@pytest.mark.engine
def test_budget_command_exit_codes(tmp_path: Path, tiny_model_dir: Path):
    expected = qwen_like_count(tiny_model_dir, BUDGET_WORST)
    ok = write_spec_catalog(tmp_path / "ok", expected)
    result = runner.invoke(app, ["budget", "-d", str(ok), "--tokenizer", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert f"tokenizer: {tiny_model_dir}" in result.output
    assert "hand-made" in result.output and "1 spec(s), 0 refused" in result.output

    short = write_spec_catalog(tmp_path / "short", expected - 1)
    args = ["budget", "-d", str(short), "--tokenizer", str(tiny_model_dir), "--show", "hand-made"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "REFUSED" in result.output and "1 spec(s), 1 refused" in result.output
    assert BUDGET_WORST in result.output

    result = runner.invoke(app, ["budget", "-d", str(ok), "--tokenizer", str(tmp_path)])
    assert result.exit_code == 1
    assert "no tokenizer in" in result.output


@pytest.mark.engine
def test_shipped_catalog_budgets(tiny_tokenizer: Any):
    """No shipped spec's budget is below its worst case (counted with the tiny tokenizer)."""
    budgets = check_specs(load_catalog().specs.values(), tiny_tokenizer.count)
    print("\nslug: worst case / max_tokens (headroom)")
    for item in budgets:
        print(f"{item.slug}: {item.worst_case} / {item.max_tokens} ({item.headroom})")
    refused = [
        f"{item.slug}: worst case {item.worst_case}, max_tokens {item.max_tokens}: {item.errors}"
        for item in budgets
        if item.refused
    ]
    assert not refused, "budgets to raise:\n" + "\n".join(refused)
