"""`goflow-gpu prompts try` end to end: a real engine (transformers, tiny random model) answers
one analysis; the command shows the raw output, the parsed result and the QA verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from goflow_gpu.cli import app


@pytest.mark.engine
def test_prompts_try_shows_raw_output_and_verdict(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "scene.png"
    Image.new("RGB", (320, 240), (30, 120, 200)).save(image)
    monkeypatch.setenv("GOFLOW_ENGINE", "transformers")
    monkeypatch.setenv("GOFLOW_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("GOFLOW_DEVICE", "cpu")
    result = CliRunner().invoke(app, ["prompts", "try", "scene-classification", str(image)])
    # Random weights do not produce the schema's JSON (transformers has no structured
    # decoding here): QA fails, with reasons, and the command says so with exit code 1.
    assert result.exit_code == 1, result.output
    for section in ("--- raw output ---", "--- parsed result ---", "--- qa verdict ---"):
        assert section in result.output
    verdict = result.output.split("--- qa verdict ---", 1)[1]
    assert "FAIL" in verdict
    assert "\n- " in verdict  # at least one reason listed


def test_prompts_try_unknown_image_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["prompts", "try", "scene-classification", str(tmp_path / "missing.png")]
    )
    assert result.exit_code == 2
    assert "missing.png" in result.output
