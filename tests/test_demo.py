"""The README's main job: `goflow-gpu demo` in a subprocess, checked through its ledger.

The demo's job is labelled scenes, and the simulator grades what the worker reported. By default
it runs the trained tiny model the package ships (its grades are judged in test_scene_model.py);
here ``--random-weights`` runs the flow with the random-weight model built on first use, so the
grades are counted, not judged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from goflow_gpu.demo import DemoOptions, demo_settings, demo_slugs
from tests.doubles import run_cli_offline


@pytest.mark.engine
def test_demo_runs_end_to_end_grades_and_reports_every_combination_once(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    done = run_cli_offline(
        tmp_path, "demo", "--media", "2", "--random-weights", "--out", out, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "random weights" in done.stdout
    assert "exactly-once check" in done.stdout
    assert "graded against the scenes' truth" in done.stdout
    ledger = json.loads((tmp_path / "out" / "ledger.json").read_text())
    results = ledger["results"]
    assert len(results) == 6
    assert all(len(bodies) == 1 for bodies in results.values())
    (statuses,) = ledger["statuses"].values()
    assert statuses == ["processing", "completed"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["report"]["details"]["total_combinations"] == 6
    # every answer of the three labelled analyses was graded, failed ones included
    grades = json.loads((tmp_path / "out" / "grades.json").read_text())
    assert list(grades) == ["object-detection", "text-recognition", "people-count"]
    assert all(g["answers"] == 2 for g in grades.values())
    # the tiny model was built into the cache dir, offline
    assert any((tmp_path / "cache" / "goflow-gpu").iterdir())


def test_demo_job_asks_the_learned_analyses_first() -> None:
    assert demo_slugs(DemoOptions(analyses=5)) == [
        "object-detection",
        "text-recognition",
        "people-count",
        "image-description",
        "scene-classification",
    ]
    assert demo_slugs(DemoOptions(scenes=False)) is None


def test_a_folder_trained_here_gets_the_cpu_engine_settings_and_its_pixel_budget(
    tmp_path: Path,
) -> None:
    model = tmp_path / "trained"
    model.mkdir()
    budget = {"min_pixels": 56 * 56, "max_pixels": 168 * 168}
    (model / "training.json").write_text(json.dumps({"pixel_budget": budget}))
    settings, tiny = demo_settings(
        engine="vllm", model=str(model), config=None, base_url="http://127.0.0.1:1",
        state_dir=tmp_path / "state",
    )  # fmt: skip
    assert tiny and settings.model == str(model)
    assert settings.model_label == "qwen2.5vl-tiny-scenes"
    assert (settings.min_pixels, settings.max_pixels) == (3136, 28224)
    assert settings.gpu_memory_utilization == 0.2 and settings.enforce_eager

    settings, tiny = demo_settings(
        engine="vllm", model="some/model", config=None, base_url="http://127.0.0.1:1",
        state_dir=tmp_path / "state",
    )  # fmt: skip
    assert not tiny and settings.model == "some/model"
    assert settings.gpu_memory_utilization == 0.9  # real weights: the worker's own defaults
