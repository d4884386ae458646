"""The prompt catalog: shipped specs, loader errors with file:line, lint, fallback, CLI."""

from __future__ import annotations

import json
import logging
import math
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from goflow_gpu.errors import GoFlowError
from goflow_gpu.prompts import (
    CatalogError,
    PromptSpec,
    RenderedPrompt,
    lint_catalog,
    load_catalog,
    shipped_catalog_dir,
)
from goflow_gpu.prompts.cli import app
from goflow_gpu.prompts.qa import check_output

REPO = Path(__file__).resolve().parents[1]

EXPECTED_SLUGS = {
    "object-detection",
    "text-recognition",
    "image-description",
    "scene-classification",
    "tags-keywords",
    "people-count",
    "logo-detection",
    "product-detection",
    "colour-palette",
    "image-quality",
    "composition",
    "content-safety",
    "alt-text",
    "text-legibility",
    "focal-point",
    "setting",
    "animal-detection",
    "vehicle-detection",
    "food-recognition",
    "landmark-recognition",
    "document-type",
    "copy-space",
    "visual-clutter",
    "scene-mood",
    "compliance-flags",
}
PROTECTED_WORDS = ("age", "gender", "race", "ethnicity", "religion", "health", "sexual")

SHARED = "system_prompt: You are a test analyst. Reply with JSON only.\n"
GOOD_SPEC = """\
slug: {slug}
name: Test Spec
version: 3
variant: optimised
user_prompt: Answer with "label" (at most 20 characters).
json_schema:
  type: object
  additionalProperties: false
  required: [label]
  properties:
    label: {{type: string, maxLength: 20}}
sampling:
  max_tokens: 64
  temperature: 0
"""


def write_catalog(directory: Path, files: dict[str, str], shared: str | None = SHARED) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if shared is not None:
        (directory / "_catalog.yaml").write_text(shared)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def problems_of(directory: Path) -> list[str]:
    with pytest.raises(CatalogError) as info:
        load_catalog(directory)
    assert isinstance(info.value, GoFlowError)
    return info.value.problems


# --- the shipped catalog ---------------------------------------------------------------------


def test_shipped_catalog_has_exactly_the_served_slugs():
    catalog = load_catalog()
    assert set(catalog.specs) == EXPECTED_SLUGS
    assert catalog.source.resolve() == (REPO / "prompts").resolve()
    assert shipped_catalog_dir().resolve() == (REPO / "prompts").resolve()


@pytest.mark.parametrize("slug", sorted(EXPECTED_SLUGS))
def test_shipped_spec_is_tight(slug):
    spec = load_catalog().specs[slug]
    Draft202012Validator.check_schema(spec.json_schema)
    assert spec.system_prompt is None, "specs share the catalog's system prompt"
    assert spec.sampling.temperature == 0
    assert 64 <= spec.sampling.max_tokens <= 4096  # tests/test_budget.py: >= the worst case
    for node in _subschemas(spec.json_schema):
        kind = node.get("type")
        if kind == "string" and "enum" not in node:
            if "pattern" in node:
                # xgrammar refuses a pattern with length bounds: the anchored pattern bounds it
                assert node["pattern"].startswith("^") and node["pattern"].endswith("$"), node
            else:
                assert 1 <= node["maxLength"] <= 300, node
        if kind == "array":
            # one point per counted thing goes to 20 (counting beyond ~10 needs the points)
            points = "point_2d" in (node.get("items") or {}).get("properties", {}) or (
                (node.get("items") or {}).get("maxItems") == 2
            )
            assert node["maxItems"] <= (20 if points else 10), node
        if kind in ("number", "integer"):
            assert "minimum" in node and "maximum" in node, node
        if kind == "object":
            assert node["additionalProperties"] is False, node
            assert set(node["required"]) == set(node["properties"]), node
            for name, sub in node["properties"].items():
                # customers read these in docs/ANALYSES.md
                assert sub.get("description", "").strip(), (slug, name)
                # uncalibrated numbers are never asked: confidences come from log-probabilities
                # and 0-10 scores are computed from the enum they mirror
                assert name not in ("confidence", "score"), (slug, name)


@pytest.mark.parametrize("slug", sorted(EXPECTED_SLUGS))
def test_shipped_spec_names_no_protected_attribute_field(slug):
    spec = load_catalog().specs[slug]
    names = [
        name.lower()
        for node in _subschemas(spec.json_schema)
        for name in node.get("properties", {})
    ]
    for name in names:
        for word in PROTECTED_WORDS:
            assert word not in name.split("_"), f"{slug}: field {name!r}"


BOX_SLUGS = {
    "copy-space",
    "focal-point",
    "landmark-recognition",
    "logo-detection",
    "object-detection",
    "product-detection",
    "text-legibility",
    "text-recognition",
    "vehicle-detection",
}


def test_box_specs_ask_for_qwens_own_grounding_format():
    catalog = load_catalog()
    with_boxes = {
        slug
        for slug, spec in catalog.specs.items()
        if any("bbox_2d" in n.get("properties", {}) for n in _subschemas(spec.json_schema))
    }
    assert with_boxes == BOX_SLUGS
    for slug, spec in catalog.specs.items():
        # the model is never asked for the wire's form: QA writes bounding_box
        assert "bounding_box" not in json.dumps(_without_descriptions(spec.json_schema)), slug
        assert "bounding_box" not in spec.user_prompt, slug
        assert "width" not in spec.user_prompt, slug
        if slug not in BOX_SLUGS:
            continue
        assert spec.qa.box_fields == ["bbox_2d"], slug
        assert "pixel coordinates of the image as you see it" in spec.user_prompt, slug
        assert '"bbox_2d"' in spec.user_prompt and "[x1, y1, x2, y2]" in spec.user_prompt, slug
        assert "top-left corner (x1, y1), then the bottom-right corner (x2, y2)" in " ".join(
            spec.user_prompt.split()
        ), slug
        (node,) = [
            n["properties"]["bbox_2d"]
            for n in _subschemas(spec.json_schema)
            if "bbox_2d" in n.get("properties", {})
        ]
        assert _without_descriptions(node) == {
            "type": "array",
            "minItems": 4,
            "maxItems": 4,
            "items": {"type": "integer", "minimum": 0, "maximum": 8192},
        }, slug


def test_the_shared_system_prompt_states_the_box_convention():
    text = " ".join(load_catalog().system_prompt.split())
    assert '"bbox_2d": [x1, y1, x2, y2]' in text
    assert "pixel coordinates of the image as you see it" in text
    assert "width" not in text


def test_object_detection_reports_the_contract_example():
    # The model answers names and corners in the image as it saw it; the confidences come from
    # the engine's log-probabilities of the names; QA reports the contract's example exactly.
    catalog = load_catalog()
    spec = catalog.specs["object-detection"]
    text = json.dumps(
        {
            "objects_detected": [
                {"name": "car", "bbox_2d": [120, 80, 320, 230]},
                {"name": "person", "bbox_2d": [350, 120, 430, 300]},
            ],
            "image_description": "Street scene with a car parked on the left and a person walking.",
        },
        separators=(",", ":"),
    )
    first, second = text.index('"car"') + 1, text.index('"person"') + 1
    tokens = [
        (text[:first], -0.01),
        ("car", math.log(0.95)),
        (text[first + 3 : second], -0.02),
        ("per", math.log(0.9)),
        ("son", math.log(0.87 / 0.9)),
        (text[second + 6 :], -0.03),
    ]
    verdict = check_output(
        text,
        catalog.render(spec),
        spec.qa,
        original_size=(1024, 768),
        model_size=(1024, 768),
        token_logprobs=tokens,
    )
    assert verdict.passed, verdict.reasons
    assert verdict.result == {
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
        "image_description": "Street scene with a car parked on the left and a person walking.",
    }
    assert [list(o) for o in verdict.result["objects_detected"]] == [
        ["name", "confidence", "bounding_box"]
    ] * 2
    assert "processing_time_seconds" not in spec.json_schema["required"]


def test_text_legibility_uses_the_greyscale_variant():
    specs = load_catalog().specs
    assert specs["text-legibility"].variant == "greyscale"
    assert {s.variant for k, s in specs.items() if k != "text-legibility"} == {"optimised"}


def test_shipped_catalog_lints_clean():
    errors, warnings = lint_catalog(None)
    assert errors == []
    assert warnings == []


def test_render_uses_the_shared_system_prompt_and_the_spec_texts():
    catalog = load_catalog()
    spec = catalog.specs["object-detection"]
    rendered = catalog.render(spec)
    assert isinstance(rendered, RenderedPrompt)
    assert rendered.system_prompt == catalog.system_prompt
    assert rendered.user_prompt == spec.user_prompt
    assert rendered.json_schema == spec.json_schema
    assert (rendered.max_tokens, rendered.temperature) == (1024, 0.0)
    assert (rendered.slug, rendered.version, rendered.variant) == (
        "object-detection",
        3,
        "optimised",
    )
    other = catalog.render(catalog.specs["alt-text"])
    assert other.system_prompt == rendered.system_prompt  # the prefix-sharing rule


def test_render_honours_a_system_prompt_override(tmp_path):
    spec = GOOD_SPEC.format(slug="own") + "system_prompt: Be terse.\n"
    catalog = load_catalog(write_catalog(tmp_path, {"own.yaml": spec}))
    assert catalog.render(catalog.specs["own"]).system_prompt == "Be terse."


def test_unknown_slug_gets_a_bounded_fallback_and_one_warning(caplog):
    catalog = load_catalog()
    with caplog.at_level(logging.WARNING):
        spec = catalog.spec_for("brand-new-analysis", "Brand New Analysis")
        again = catalog.spec_for("brand-new-analysis", "Brand New Analysis")
    assert spec.slug == "brand-new-analysis" and again.slug == spec.slug
    assert "Brand New Analysis" in spec.user_prompt
    schema = spec.json_schema
    Draft202012Validator.check_schema(schema)
    assert schema["properties"]["summary"]["maxLength"] == 500
    assert schema["properties"]["labels"]["maxItems"] == 10
    assert schema["additionalProperties"] is False
    warned = [r for r in caplog.records if "fallback" in r.getMessage()]
    assert len(warned) == 1
    rendered = catalog.render(spec)
    assert rendered.system_prompt == catalog.system_prompt
    assert rendered.version == 0


def test_known_slug_is_returned_as_is():
    catalog = load_catalog()
    assert catalog.spec_for("setting") is catalog.specs["setting"]


# --- broken catalogs: file:line messages -----------------------------------------------------


def test_bad_yaml_names_file_and_line(tmp_path):
    text = GOOD_SPEC.format(slug="bad") + "qa: [unclosed\n"
    directory = write_catalog(tmp_path, {"bad.yaml": text})
    problems = problems_of(directory)
    assert len(problems) == 1
    assert problems[0].startswith(f"{directory / 'bad.yaml'}:16: invalid YAML")


def test_unknown_key_names_file_line_and_allowed_keys(tmp_path):
    text = GOOD_SPEC.format(slug="extra").replace(
        "sampling:\n  max_tokens: 64\n", "sampling:\n  max_tokens: 64\n  top_p: 0.9\n"
    )
    directory = write_catalog(tmp_path, {"extra.yaml": text})
    (problem,) = problems_of(directory)
    assert problem.startswith(f"{directory / 'extra.yaml'}:14: unknown key 'top_p'")
    assert "max_tokens" in problem and "temperature" in problem


def test_unknown_top_level_key(tmp_path):
    text = "promt: typo\n" + GOOD_SPEC.format(slug="typo")
    directory = write_catalog(tmp_path, {"typo.yaml": text})
    (problem,) = problems_of(directory)
    assert problem.startswith(f"{directory / 'typo.yaml'}:1: unknown key 'promt'")


def test_invalid_schema_points_at_the_schema_line(tmp_path):
    text = GOOD_SPEC.format(slug="schema").replace(
        "label: {type: string, maxLength: 20}", "label: {type: text, maxLength: 20}"
    )
    directory = write_catalog(tmp_path, {"schema.yaml": text})
    (problem,) = problems_of(directory)
    assert problem.startswith(
        f"{directory / 'schema.yaml'}:11: json_schema: label: invalid JSON schema at 'type':"
    )
    assert "'text'" in problem


def test_negative_max_length_is_an_invalid_schema(tmp_path):
    text = GOOD_SPEC.format(slug="neg").replace("maxLength: 20", "maxLength: -1")
    directory = write_catalog(tmp_path, {"neg.yaml": text})
    (problem,) = problems_of(directory)
    assert problem.startswith(
        f"{directory / 'neg.yaml'}:11: json_schema: label: invalid JSON schema at 'maxLength':"
    )


def test_pattern_with_length_bounds_is_refused_as_vllm_would(tmp_path):
    text = GOOD_SPEC.format(slug="hexa").replace(
        "label: {type: string, maxLength: 20}",
        'label: {type: string, pattern: "^#[0-9a-f]{6}$", maxLength: 7}',
    )
    directory = write_catalog(tmp_path, {"hexa.yaml": text})
    (problem,) = problems_of(directory)
    assert problem.startswith(f"{directory / 'hexa.yaml'}:")
    assert "not supported by vLLM's structured decoding (xgrammar)" in problem


def test_unquoted_yaml_boolean_in_enum_is_caught(tmp_path):
    text = GOOD_SPEC.format(slug="enum").replace(
        "label: {type: string, maxLength: 20}", "label: {type: string, enum: [yes, maybe]}"
    )
    directory = write_catalog(tmp_path, {"enum.yaml": text})
    (problem,) = problems_of(directory)
    assert problem.startswith(f"{directory / 'enum.yaml'}:11: json_schema: label: enum value True")


def test_missing_variant(tmp_path):
    text = GOOD_SPEC.format(slug="novar").replace("variant: optimised\n", "")
    directory = write_catalog(tmp_path, {"novar.yaml": text})
    (problem,) = problems_of(directory)
    assert problem == (
        f"{directory / 'novar.yaml'}:1: variant: missing required key (one of: optimised, greyscale)"
    )


def test_unknown_variant(tmp_path):
    text = GOOD_SPEC.format(slug="colour").replace("variant: optimised", "variant: colour")
    directory = write_catalog(tmp_path, {"colour.yaml": text})
    (problem,) = problems_of(directory)
    assert problem.startswith(f"{directory / 'colour.yaml'}:4: variant:")
    assert "'optimised' or 'greyscale'" in problem


def test_wrong_type(tmp_path):
    text = GOOD_SPEC.format(slug="wrong").replace("version: 3", "version: three")
    directory = write_catalog(tmp_path, {"wrong.yaml": text})
    (problem,) = problems_of(directory)
    assert problem.startswith(f"{directory / 'wrong.yaml'}:3: version:")


def test_slug_must_match_the_file_name(tmp_path):
    directory = write_catalog(tmp_path, {"right.yaml": GOOD_SPEC.format(slug="wrong")})
    (problem,) = problems_of(directory)
    assert problem.startswith(f"{directory / 'right.yaml'}:1: slug 'wrong' does not match")


def test_duplicate_key_is_an_error(tmp_path):
    text = GOOD_SPEC.format(slug="dup") + "version: 4\n"
    directory = write_catalog(tmp_path, {"dup.yaml": text})
    (problem,) = problems_of(directory)
    assert problem == f"{directory / 'dup.yaml'}:15: duplicate key 'version' (first on line 3)"


def test_missing_shared_system_prompt(tmp_path):
    directory = write_catalog(tmp_path, {"ok.yaml": GOOD_SPEC.format(slug="ok")}, shared=None)
    (problem,) = problems_of(directory)
    assert problem.startswith(f"{directory / '_catalog.yaml'}:0: missing")


def test_every_problem_is_reported_at_once(tmp_path):
    directory = write_catalog(
        tmp_path,
        {
            "a.yaml": GOOD_SPEC.format(slug="a").replace("variant: optimised\n", ""),
            "b.yaml": GOOD_SPEC.format(slug="c"),
            "d.yaml": GOOD_SPEC.format(slug="d"),
        },
    )
    problems = problems_of(directory)
    assert [Path(p.split(":")[0]).name for p in problems] == ["a.yaml", "b.yaml"]


def test_a_good_custom_catalog_loads(tmp_path):
    catalog = load_catalog(write_catalog(tmp_path, {"mine.yaml": GOOD_SPEC.format(slug="mine")}))
    assert list(catalog.specs) == ["mine"]
    assert isinstance(catalog.specs["mine"], PromptSpec)
    assert catalog.system_prompt == "You are a test analyst. Reply with JSON only."


# --- lint warnings ---------------------------------------------------------------------------


def test_lint_warns_about_override_and_unbounded_schema(tmp_path):
    text = (
        GOOD_SPEC.format(slug="loose")
        .replace("label: {type: string, maxLength: 20}", "label: {type: string}")
        .replace("  additionalProperties: false\n", "")
        + "system_prompt: Something else.\n"
    )
    directory = write_catalog(tmp_path, {"loose.yaml": text})
    errors, warnings = lint_catalog(directory)
    assert errors == []
    file = directory / "loose.yaml"
    assert any(w.startswith(f"{file}:14: system_prompt override") for w in warnings), warnings
    assert f"{file}:10: json_schema: label: string without maxLength" in warnings
    assert f"{file}:6: json_schema: (top level): object without additionalProperties: false" in (
        warnings
    )


BOX_SPEC = """\
slug: boxes
name: Boxes
version: 1
variant: optimised
user_prompt: >-
  Answer with "label", "bounding_box" and "items" in pixel coordinates of the image as you see it.
json_schema:
  type: object
  additionalProperties: false
  required: [label, bounding_box, items]
  properties:
    label: {type: string, maxLength: 20}
    bounding_box:
      type: object
      additionalProperties: false
      required: [x, y]
      properties:
        x: {type: integer, minimum: 0, maximum: 10}
        y: {type: integer, minimum: 0, maximum: 10}
    items:
      type: array
      maxItems: 2
      items:
        type: object
        additionalProperties: false
        required: [bbox_2d, area_bbox_2d]
        properties:
          bbox_2d: {type: array, minItems: 4, maxItems: 4, items: {type: integer, minimum: 0,
                                                                   maximum: 100}}
          area_bbox_2d: {type: array, minItems: 4, maxItems: 4, items: {type: integer,
                                                                        minimum: 0, maximum: 9}}
qa:
  box_fields: [bbox_2d, area_bbox_2d, bounding_box]
sampling:
  max_tokens: 64
  temperature: 0
"""


def test_lint_warns_about_boxes_not_in_qwens_corner_format(tmp_path):
    directory = write_catalog(tmp_path, {"boxes.yaml": BOX_SPEC})
    errors, warnings = lint_catalog(directory)
    assert errors == []
    file = directory / "boxes.yaml"
    assert warnings == [
        f"{file}:13: json_schema: box field 'bounding_box' is not an array of exactly 4 integers "
        "[x1, y1, x2, y2], the bbox_2d format Qwen2.5-VL is trained on (QA still converts "
        "{x, y, width, height} objects)",
        f"{file}:23: json_schema: QA reports every corner box as 'bounding_box', so an object "
        "holds one box at most and no 'bounding_box' beside it; found bbox_2d, area_bbox_2d",
    ]


# --- packaging -------------------------------------------------------------------------------


def test_pyproject_ships_every_subpackage_and_the_catalog():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(config["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "goflow_gpu").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk <= packages, f"add to [tool.setuptools] packages: {sorted(on_disk - packages)}"
    assert config["package-dir"]["goflow_gpu.catalog"] == "prompts"
    assert "*.yaml" in config["package-data"]["goflow_gpu.catalog"]


# --- CLI -------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_list_shows_every_spec():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for slug in EXPECTED_SLUGS:
        assert slug in result.output
    assert "Text Legibility and Contrast" in result.output
    assert "greyscale" in result.output
    assert "25 specs" in result.output


def test_cli_validate_ok():
    result = runner.invoke(app, ["validate", "-d", str(REPO / "prompts")])
    assert result.exit_code == 0, result.output
    assert "0 error(s), 0 warning(s)" in result.output


def test_cli_validate_broken_dir_exits_1_with_file_line(tmp_path):
    text = GOOD_SPEC.format(slug="bad").replace("variant: optimised", "variant: sepia")
    directory = write_catalog(tmp_path, {"bad.yaml": text})
    result = runner.invoke(app, ["validate", "-d", str(directory)])
    assert result.exit_code == 1
    assert f"{directory / 'bad.yaml'}:4: variant:" in result.output
    assert "1 error(s)" in result.output


def test_cli_validate_warnings_only_exits_0(tmp_path):
    text = GOOD_SPEC.format(slug="warn") + "system_prompt: Different.\n"
    directory = write_catalog(tmp_path, {"warn.yaml": text})
    result = runner.invoke(app, ["validate", "-d", str(directory)])
    assert result.exit_code == 0, result.output
    assert f"warning: {directory / 'warn.yaml'}:15: system_prompt override" in result.output


def test_cli_render_prints_the_exact_texts():
    catalog = load_catalog()
    spec = catalog.specs["colour-palette"]
    result = runner.invoke(app, ["render", "colour-palette"])
    assert result.exit_code == 0, result.output
    assert catalog.system_prompt in result.output
    assert spec.user_prompt in result.output
    assert '"dominant_colours"' in result.output


def test_cli_render_json_is_machine_readable():
    catalog = load_catalog()
    result = runner.invoke(app, ["render", "text-legibility", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    spec = catalog.specs["text-legibility"]
    assert payload["system_prompt"] == catalog.system_prompt
    assert payload["user_prompt"] == spec.user_prompt
    assert payload["json_schema"] == spec.json_schema
    assert payload["variant"] == "greyscale"
    assert payload["max_tokens"] == spec.sampling.max_tokens


def test_cli_list_of_a_broken_dir_fails_with_the_problems(tmp_path):
    directory = write_catalog(tmp_path, {"x.yaml": GOOD_SPEC.format(slug="y")})
    result = runner.invoke(app, ["list", "--prompts-dir", str(directory)])
    assert result.exit_code == 1
    assert f"{directory / 'x.yaml'}:1: slug 'y'" in result.stderr
    assert "0 specs, 1 broken" in result.stdout


def test_cli_help_reads_like_documentation():
    for command in ("list", "validate", "render", "try"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0
        assert len(result.output) > 200, command


def _without_descriptions(node: Any) -> Any:
    """The schema as the grammar sees it: descriptions are for customers, not the model."""
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def _subschemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield schema
    for sub in (schema.get("properties") or {}).values():
        yield from _subschemas(sub)
    if isinstance(schema.get("items"), dict):
        yield from _subschemas(schema["items"])
    for branch in schema.get("anyOf") or []:
        yield from _subschemas(branch)
