"""Manifest validation (errors name the field and the value) and wire shapes."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from goflow_gpu.errors import ManifestError
from goflow_gpu.protocol import ReportBody, ResultBody, parse_manifest

GOOD: dict[str, Any] = {
    "client": {"id": "3fa85f64-5717-4562-b3fc-2c963f66afa6", "slug": "c", "name": "Client"},
    "project": {"id": "3fa85f64-5717-4562-b3fc-2c963f66afa7", "slug": "p", "name": "Project"},
    "media": [
        {
            "id": "3fa85f64-5717-4562-b3fc-2c963f66afa8",
            "filename": "image1.jpg",
            "optimised_path": "https://example.com/o/1.jpg",
            "greyscale_path": "https://example.com/g/1.jpg",
        }
    ],
    "analyses": [
        {
            "id": "3fa85f64-5717-4562-b3fc-2c963f66afaa",
            "name": "Object Detection",
            "slug": "object-detection",
        },
        {
            "id": "3fa85f64-5717-4562-b3fc-2c963f66afab",
            "name": "Text Recognition",
            "slug": "text-recognition",
        },
    ],
}


def bad(mutate: Any) -> ManifestError:
    raw = copy.deepcopy(GOOD)
    mutate(raw)
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw)
    return info.value


def test_contract_example_parses() -> None:
    m = parse_manifest(GOOD)
    assert m.job_id == "3fa85f64-5717-4562-b3fc-2c963f66afa7"
    assert m.combinations == 2
    assert m.media[0].url("greyscale") == "https://example.com/g/1.jpg"


def test_extra_fields_are_accepted() -> None:
    raw = copy.deepcopy(GOOD)
    raw["priority"] = 3
    raw["media"][0]["width"] = 100
    assert parse_manifest(raw).media[0].filename == "image1.jpg"


def test_missing_field_is_named() -> None:
    exc = bad(lambda r: r["media"][0].pop("greyscale_path"))
    assert "media[0].greyscale_path" in str(exc)
    assert exc.problems[0][0] == "media[0].greyscale_path"


def test_non_uuid_named_with_value() -> None:
    exc = bad(lambda r: r["analyses"][1].update(id="not-a-uuid"))
    assert "analyses[1].id" in str(exc) and "'not-a-uuid'" in str(exc)


def test_uppercase_uuid_is_refused_as_non_canonical() -> None:
    exc = bad(lambda r: r["project"].update(id="{3FA85F64-5717-4562-B3FC-2C963F66AFA7}"))
    assert "project.id" in str(exc)


def test_duplicate_ids_rejected() -> None:
    exc = bad(lambda r: r["analyses"].append(dict(r["analyses"][0])))
    assert "analyses" in str(exc) and "duplicate id" in str(exc)


@pytest.mark.parametrize("field", ["media", "analyses"])
def test_empty_lists_rejected(field: str) -> None:
    exc = bad(lambda r: r.update({field: []}))
    assert field in str(exc) and "at least 1" in str(exc)


def test_wrong_types_and_non_object() -> None:
    exc = bad(lambda r: r.update(media="x"))
    assert "media" in str(exc)
    with pytest.raises(ManifestError, match="must be a JSON object"):
        parse_manifest(["not", "an", "object"])


def test_result_body_is_camel_case_on_the_wire() -> None:
    body = ResultBody(
        model_used="qwen2.5vl",
        user_prompt_used="u",
        system_prompt_used="s",
        status="completed",
        analysis_result={"a": 1},
    ).wire()
    assert set(body) == {
        "modelUsed",
        "userPromptUsed",
        "systemPromptUsed",
        "status",
        "analysisResult",
    }
    assert ResultBody.model_validate(body).model_used == "qwen2.5vl"


def test_report_body_requires_contract_details() -> None:
    with pytest.raises(ValueError, match="key_findings"):
        ReportBody.model_validate(
            {
                "type": "quality_analysis",
                "report": {
                    "summary": "s",
                    "details": {
                        "total_media_processed": 1,
                        "total_analyses_completed": 1,
                        "processing_time_minutes": 1.0,
                        "success_rate": 1.0,
                        "analysis_types_completed": [],
                    },
                },
            }
        )
