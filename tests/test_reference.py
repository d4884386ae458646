"""The generated reference of the analysis types (docs/ANALYSES.md) and the ``prompts
reference`` command. Expected markdown is written out by hand."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from goflow_gpu.prompts import pixels
from goflow_gpu.prompts.catalog import Catalog, load_catalog
from goflow_gpu.prompts.cli import app
from goflow_gpu.prompts.reference import (
    ReferenceError,
    render_reference,
    render_spec,
    result_rows,
)
from goflow_gpu.prompts.spec import PromptSpec
from tests.doubles import strict_object

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@dataclass(frozen=True)
class FakeFact:
    description: str
    json_schema: dict[str, Any]


obj = strict_object


CORNERS = {
    "type": "array",
    "minItems": 4,
    "maxItems": 4,
    "items": {"type": "integer", "minimum": 0, "maximum": 8192},
}
POINT = {
    "type": "array",
    "minItems": 2,
    "maxItems": 2,
    "items": {"type": "integer", "minimum": 0, "maximum": 8192},
}
FAKE_FACTS = {
    "resolution": FakeFact(
        "Width and height in pixels.",
        obj(width={"type": "integer", "minimum": 1}, height={"type": "integer", "minimum": 1}),
    )
}


@pytest.fixture
def fake_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry of pixel facts written here, independent of the real one's wording."""
    monkeypatch.setattr(pixels, "FACTS", FAKE_FACTS)


def pet_spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "slug": "pet-finder",
        "name": "Pet Finder",
        "version": 4,
        "variant": "optimised",
        "description": "Pets in the image,\nwith boxes.",
        "user_prompt": "Find the pets.",
        "json_schema": obj(
            pets={
                "type": "array",
                "maxItems": 3,
                "description": "The pets, most prominent first.",
                "items": obj(
                    kind={"type": "string", "enum": ["cat", "dog"], "description": "Cat or dog."},
                    bbox_2d={**CORNERS, "description": "The box around the pet."},
                    spots={
                        "type": "array",
                        "maxItems": 5,
                        "description": "Spots on its fur.",
                        "items": obj(point_2d={**POINT, "description": "Where the spot is."}),
                    },
                ),
            },
            mood={
                "type": "string",
                "enum": ["calm", "playful"],
                "description": "How the pets seem: calm | playful.",
            },
            note={"type": "string", "minLength": 1, "maxLength": 80, "description": "A remark."},
            names={
                "type": "array",
                "maxItems": 3,
                "items": {"type": "string", "maxLength": 12},
                "description": "Their names.",
            },
            focus={
                "description": "The pet the eye goes to, or null.",
                "anyOf": [
                    obj(label={"type": "string", "maxLength": 20, "description": "Its name."}),
                    {"type": "null"},
                ],
            },
        ),
        "qa": {
            "box_fields": ["bbox_2d"],
            "point_fields": ["point_2d"],
            "computed": [
                {
                    "field": "pets[].spot_count",
                    "rule": "count",
                    "source": "spots",
                    "at_most": 5,
                    "description": "How many spots; null when 5 were listed.",
                },
                {
                    "field": "has_pets",
                    "rule": "non_empty",
                    "source": "pets",
                    "description": "True when there is a pet.",
                },
                {
                    "field": "score",
                    "rule": "map",
                    "source": "mood",
                    "mapping": {"calm": 3, "playful": 8},
                    "description": "The mood as a number.",
                },
                {
                    "field": "first_name",
                    "rule": "first",
                    "source": "names",
                    "description": "The first name.",
                },
                {
                    "field": "calmest",
                    "rule": "worst",
                    "source": "pets[].kind",
                    "values": ["cat", "dog"],
                    "description": "Dog when there is one.",
                },
            ],
            "logprob_confidence": [
                {"field": "pets[].confidence", "value": "kind", "description": "Sure of kind."}
            ],
            "pixel_facts": {"size": "resolution"},
        },
        "sampling": {"max_tokens": 256},
    }
    spec.update(changes)
    return spec


WORKER_ROWS = [
    "| `processing_time_seconds` | number, at least 0 | worker | Seconds the worker spent on "
    "this analysis of this image (all tries). |",
    "| `qa_warnings` | array of string | worker | What QA repaired in the model's answer (an "
    "item dropped, a count range set from the points...); present only when something was "
    "repaired. |",
]

PET_SECTION = [
    '<a id="pet-finder"></a>',
    "",
    "## Pet Finder",
    "",
    "Slug `pet-finder`, version 4.",
    "",
    "Pets in the image, with boxes.",
    "",
    "| field | type | source | meaning |",
    "| --- | --- | --- | --- |",
    "| `pets` | array (at most 3) of object | model | The pets, most prominent first. |",
    "| `pets[].kind` | string, one of `cat`, `dog` | model | Cat or dog. |",
    "| `pets[].confidence` | number, 0 to 1, or null | log-probabilities of `kind` | Sure of kind. |",
    "| `pets[].bounding_box` | object {x, y, width, height}: integer pixels of the original image "
    "| model | The box around the pet. |",
    "| `pets[].spots` | array (at most 5) of object | model | Spots on its fur. |",
    "| `pets[].spots[].point` | object {x, y}: integer pixels of the original image | model "
    "| Where the spot is. |",
    "| `pets[].spot_count` | integer, 0 to 4, or null | computed (`count` of `spots`) "
    "| How many spots; null when 5 were listed. |",
    "| `mood` | string, one of `calm`, `playful` | model | How the pets seem: calm \\| playful. |",
    "| `note` | string, 1 to 80 characters | model | A remark. |",
    "| `names` | array (at most 3) of string, at most 12 characters | model | Their names. |",
    "| `focus` | object or null | model | The pet the eye goes to, or null. |",
    "| `focus.label` | string, at most 20 characters | model | Its name. |",
    "| `has_pets` | boolean | computed (`non_empty` of `pets`) | True when there is a pet. |",
    "| `score` | integer, one of `3`, `8` | computed (`map` of `mood`) | The mood as a number. |",
    "| `first_name` | string, at most 12 characters, or null | computed (`first` of `names`) "
    "| The first name. |",
    "| `calmest` | string, one of `cat`, `dog`, or null | computed (`worst` of `pets[].kind`) "
    "| Dog when there is one. |",
    "| `size` | object: `width` (integer, at least 1); `height` (integer, at least 1) "
    "| pixels (`resolution`) | Width and height in pixels. |",
    *WORKER_ROWS,
]


@pytest.mark.usefixtures("fake_facts")
def test_a_spec_renders_its_final_fields_in_result_order():
    spec = PromptSpec.model_validate(pet_spec())
    section = render_spec(spec, result_rows(spec))
    assert section.splitlines() == PET_SECTION


@pytest.mark.usefixtures("fake_facts")
def test_every_missing_description_is_listed_at_once():
    data = pet_spec()
    del data["json_schema"]["properties"]["pets"]["items"]["properties"]["kind"]["description"]
    data["json_schema"]["properties"]["note"]["description"] = "  "
    data["qa"]["computed"][1]["description"] = ""
    data["qa"]["logprob_confidence"][0]["description"] = ""
    data["qa"]["pixel_facts"]["brightness"] = "glow"
    spec = PromptSpec.model_validate(data)
    with pytest.raises(ReferenceError) as caught:
        result_rows(spec)
    assert caught.value.problems == [
        "pet-finder: qa.pixel_facts brightness: unknown pixel fact 'glow'",
        "pet-finder: json_schema property pets[].kind: no description (write one "
        "customer-facing line)",
        "pet-finder: qa.logprob_confidence pets[].confidence: no description (write one "
        "customer-facing line)",
        "pet-finder: json_schema property note: no description (write one customer-facing line)",
        "pet-finder: qa.computed has_pets: no description (write one customer-facing line)",
    ]


@pytest.mark.usefixtures("fake_facts")
def test_the_reference_lists_specs_by_slug_after_the_intro():
    first = PromptSpec.model_validate(pet_spec())
    second = PromptSpec.model_validate(
        pet_spec(
            slug="a-plain-one",
            name="A Plain One",
            version=1,
            description="",
            json_schema=obj(ok={"type": "boolean", "description": "Whether it is fine."}),
            qa={},
        )
    )
    catalog = Catalog("shared", {s.slug: s for s in (first, second)}, Path("/nowhere"))
    text = render_reference(catalog)
    lines = text.splitlines()
    assert lines[0].startswith("<!-- Generated by `goflow-gpu prompts reference`")
    assert "# Analysis types" in lines
    contents = lines.index("## Contents")
    assert lines[contents + 2 : contents + 5] == [
        "- [A Plain One](#a-plain-one) (`a-plain-one`, version 1)",
        "- [Pet Finder](#pet-finder) (`pet-finder`, version 4)",
        "",
    ]
    assert lines.index("## A Plain One") < lines.index("## Pet Finder")
    plain = lines.index("## A Plain One")
    assert lines[plain + 2 : plain + 8] == [
        "Slug `a-plain-one`, version 1.",
        "",
        "| field | type | source | meaning |",
        "| --- | --- | --- | --- |",
        "| `ok` | boolean | model | Whether it is fine. |",
        WORKER_ROWS[0],
    ]
    assert text.endswith("\n".join(PET_SECTION) + "\n")
    for words in ("analysisResult", "processing_time_seconds", "qa_warnings", "bounding_box"):
        assert words in "\n".join(lines[: lines.index("## Contents")])


def test_docs_analyses_is_current():
    """docs/ANALYSES.md is what `goflow-gpu prompts reference` writes for the shipped catalog."""
    expected = render_reference(load_catalog())
    current = (REPO / "docs" / "ANALYSES.md").read_text(encoding="utf-8")
    assert current == expected, "docs/ANALYSES.md is stale: run `goflow-gpu prompts reference`"


def write_catalog(directory: Path, spec: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_catalog.yaml").write_text("system_prompt: Answer in JSON.\n")
    (directory / f"{spec['slug']}.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return directory


def test_reference_command_writes_and_checks(tmp_path: Path):
    spec = pet_spec(qa={**pet_spec()["qa"], "pixel_facts": {}})
    catalog = write_catalog(tmp_path / "catalog", spec)
    out = tmp_path / "ANALYSES.md"
    result = runner.invoke(app, ["reference", "-d", str(catalog), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "| `pets[].bounding_box` |" in out.read_text()

    result = runner.invoke(app, ["reference", "-d", str(catalog), "-o", str(out), "--check"])
    assert result.exit_code == 0, result.output

    out.write_text(out.read_text().replace("Cat or dog.", "Cat or hamster."))
    result = runner.invoke(app, ["reference", "-d", str(catalog), "-o", str(out), "--check"])
    assert result.exit_code == 1
    assert "is not current (1 line(s) out, 1 line(s) in)" in result.output
    assert "-| `pets[].kind` | string, one of `cat`, `dog` | model | Cat or hamster. |" in (
        result.output
    )


def test_reference_command_refuses_missing_descriptions(tmp_path: Path):
    spec = pet_spec(qa={**pet_spec()["qa"], "pixel_facts": {}})
    del spec["json_schema"]["properties"]["mood"]["description"]
    catalog = write_catalog(tmp_path / "catalog", spec)
    out = tmp_path / "ANALYSES.md"
    result = runner.invoke(app, ["reference", "-d", str(catalog), "-o", str(out)])
    assert result.exit_code == 1
    assert "pet-finder: json_schema property mood: no description" in result.output
    assert not out.exists()
