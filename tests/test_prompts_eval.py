"""``goflow-gpu prompts eval`` end to end: the real CLI, the real OpenAI-compatible engine, a
scripted model server on loopback that answers from the labels with known, injected errors.

The set is two pictures whose sizes the Qwen resize rule keeps (448 x 336 and 336 x 448 under
a 448 x 448 px budget), so the model's pixel space is the picture's own and every box below is
worked out by hand. The server tells the pictures apart by size and the analyses by their user
prompt (a baseline catalog adds a marker sentence to object-detection).

Injected errors and the scores they must give (computed here by hand, not by the scorer):

- candidate object-detection, picture A: circle right, square shifted 40 px right (expected
  200..280 x 50..130, answered 240..320: intersection 40 x 80 = 3200, union 6400 + 6400 - 3200
  = 9600, IoU 1/3 < 0.5: no match) -> boxes F1 = 1/2; picture B: triangle right -> 1.
  Field agreement (0.5 + 1) / 2 = 0.75; box precision 2 matched / 3 answered, recall 2 / 3.
- people-count, picture A: count 0, crowd none (right); picture B: broken JSON -> schema-valid
  1/2, QA pass 1/2, its two labelled fields 0: agreement (1 + 1 + 0 + 0) / 4 = 0.5.
- all: (0.5 + 1 + 1 + 1 + 0 + 0) / 6 = 0.5833.
- the baseline answers object-detection perfectly: agreement 1.0, so the candidate's drop of
  0.25 on object-detection field_agreement fails --max-regression 0.05 (exit 1).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from PIL import Image
from typer.testing import CliRunner

from goflow_gpu.cli import app
from goflow_gpu.prompts.catalog import load_catalog
from tests.doubles import tiny_vllm_config

MARKER = "Be precise about every box."
A_SIZE, B_SIZE = (448, 336), (336, 448)

LABELS = {
    "A": {
        "object-detection": {
            "objects_detected": [
                {"name": "circle", "bounding_box": {"x": 10, "y": 20, "width": 100, "height": 100}},
                {"name": "square", "bounding_box": {"x": 200, "y": 50, "width": 80, "height": 80}},
            ]
        },
        "people-count": {"count": 0, "crowd_level": "none"},
    },
    "B": {
        "object-detection": {
            "objects_detected": [
                {"name": "triangle", "bounding_box": {"x": 30, "y": 30, "width": 90, "height": 60}}
            ]
        },
        "people-count": {"count": 0, "crowd_level": "none"},
    },
}


def _objects(*items: tuple[str, list[int]]) -> str:
    objects = [{"name": n, "bbox_2d": box} for n, box in items]
    return json.dumps({"objects_detected": objects, "image_description": "Flat shapes."})


PERFECT = {
    "A": _objects(("circle", [10, 20, 110, 120]), ("square", [200, 50, 280, 130])),
    "B": _objects(("triangle", [30, 30, 120, 90])),
}
CANDIDATE = {
    "A": _objects(("circle", [10, 20, 110, 120]), ("square", [240, 50, 320, 130])),
    "B": PERFECT["B"],
}
PEOPLE = {
    "A": json.dumps({"people": [], "count_bin": "0"}),  # count 0, crowd none: computed
    "B": '{"people": [], "count_bin": ',  # cut off: not JSON
}


class ScriptedModelServer:
    """An OpenAI-compatible chat server on its own thread and loop, answering from tables."""

    def __init__(self, prompts: dict[str, str]) -> None:
        self.prompts = prompts  # user prompt text -> "object-detection" | "baseline-od" | ...
        self.asked: list[tuple[str, str]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = ""

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> ScriptedModelServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "scripted"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        user = body["messages"][1]["content"]
        url = next(p["image_url"]["url"] for p in user if p["type"] == "image_url")
        text = next(p["text"] for p in user if p["type"] == "text")
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
            picture = {A_SIZE: "A", B_SIZE: "B"}[image.size]
        analysis = self.prompts[text]
        self.asked.append((picture, analysis))
        answer = {
            "object-detection": CANDIDATE,
            "baseline-od": PERFECT,
            "people-count": PEOPLE,
        }[analysis][picture]
        return web.json_response(
            {
                "choices": [{"message": {"content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 300, "completion_tokens": 40},
            }
        )


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    folder = tmp_path / "set"
    folder.mkdir()
    for name, size in (("A", A_SIZE), ("B", B_SIZE)):
        Image.new("RGB", size, (250, 250, 250)).save(folder / f"{name}.png")
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(LABELS[name]))
    return folder


@pytest.fixture
def baseline_catalog(tmp_path: Path) -> Path:
    shipped = load_catalog(None).source
    folder = tmp_path / "baseline-prompts"
    shutil.copytree(shipped, folder)
    spec = folder / "object-detection.yaml"
    data = yaml.safe_load(spec.read_text())
    data["user_prompt"] = data["user_prompt"] + " " + MARKER
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


@pytest.fixture
def server(baseline_catalog: Path) -> Iterator[ScriptedModelServer]:
    shipped = load_catalog(None)
    baseline = load_catalog(baseline_catalog)
    prompts = {
        shipped.render(shipped.specs["object-detection"]).user_prompt: "object-detection",
        shipped.render(shipped.specs["people-count"]).user_prompt: "people-count",
        baseline.render(baseline.specs["object-detection"]).user_prompt: "baseline-od",
    }
    with ScriptedModelServer(prompts) as running:
        yield running


def _config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "eval.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "engine": "openai",
                "openai_base_url": url,
                "model": "scripted",
                "min_pixels": 56 * 56,
                "max_pixels": 448 * 448,
            }
        )
    )
    return config


def test_eval_scores_match_the_injected_errors(
    tmp_path: Path, labelled: Path, server: ScriptedModelServer
) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["prompts", "eval", str(labelled), "--config", str(_config(tmp_path, server.url)),
         "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(server.asked) == sorted(
        (p, a) for p in "AB" for a in ("object-detection", "people-count")
    )
    data = json.loads((out / "results.json").read_text())
    summary = data["candidate"]["summary"]
    od, people, every = summary["object-detection"], summary["people-count"], summary["all"]
    assert od["field_agreement"] == pytest.approx(0.75)
    assert od["box_precision"] == pytest.approx(2 / 3)
    assert od["box_recall"] == pytest.approx(2 / 3)
    assert (od["schema_valid_rate"], od["qa_pass_rate"]) == (1.0, 1.0)
    assert people["field_agreement"] == pytest.approx(0.5)
    assert (people["schema_valid_rate"], people["qa_pass_rate"]) == (0.5, 0.5)
    assert every["field_agreement"] == pytest.approx(3.5 / 6)
    assert od["prompt_tokens_per_answer"] == 300
    html = (out / "report.html").read_text()
    assert "data:image/" in html and "<svg" in html
    assert "object-detection" in (out / "report.md").read_text()


def test_a_regression_against_the_baseline_fails_the_gate(
    tmp_path: Path, labelled: Path, server: ScriptedModelServer, baseline_catalog: Path
) -> None:
    out = tmp_path / "ab"
    args = ["prompts", "eval", str(labelled), "--config", str(_config(tmp_path, server.url)),
            "--baseline", str(baseline_catalog), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--max-regression", "0.05"])
    assert result.exit_code == 1, result.output
    assert "REGRESSION: object-detection field_agreement dropped by 0.250" in result.output
    data = json.loads((out / "results.json").read_text())
    assert data["comparison"]["worst_drop"] == pytest.approx(0.25)
    # The same drop is within a looser limit.
    looser = CliRunner().invoke(app, [*args, "--max-regression", "0.3"])
    assert looser.exit_code == 0, looser.output


def test_a_label_that_does_not_fit_the_catalog_is_refused_naming_the_file(
    tmp_path: Path, labelled: Path, server: ScriptedModelServer
) -> None:
    (labelled / "A.yaml").write_text(yaml.safe_dump({"people-count": {"headcount": 0}}))
    result = CliRunner().invoke(
        app,
        ["prompts", "eval", str(labelled), "--config", str(_config(tmp_path, server.url)),
         "--out", str(tmp_path / "x")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "A.yaml" in result.output and "headcount" in result.output
    assert server.asked == []  # refused before any model call


@pytest.mark.engine
def test_eval_runs_the_starter_set_through_the_tiny_vllm_model(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The real path on the random tiny model: scores mean nothing, every pair must be asked."""
    starter = Path(__file__).resolve().parents[1] / "evalsets" / "starter"
    subset = tmp_path / "set"
    subset.mkdir()
    for name in ("scene-00", "scene-01"):
        for suffix in (".png", ".yaml"):
            shutil.copy(starter / f"{name}{suffix}", subset / f"{name}{suffix}")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_vllm_config(tiny_model_dir, max_in_flight=24)))
    out = tmp_path / "out"
    # A real process: vLLM's engine core writes to the file descriptors, not to a captured
    # sys.stdout, and its log lines must go to stderr, leaving stdout to the command's output.
    result = subprocess.run(
        [sys.executable, "-m", "goflow_gpu", "prompts", "eval", str(subset),
         "--config", str(config), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_STREAM"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reports:" in result.stdout and "object-detection" in result.stdout
    noisy = [line for line in result.stdout.splitlines() if "INFO" in line or "WARN" in line]
    assert noisy == [], noisy[:5]
    assert "EngineCore" in result.stderr  # vLLM did log, where logs belong
    data = json.loads((out / "results.json").read_text())
    labelled_pairs = sum(
        len(yaml.safe_load((subset / f"{n}.yaml").read_text())) for n in ("scene-00", "scene-01")
    )
    summary = data["candidate"]["summary"]
    assert summary["all"]["answers"] == labelled_pairs
    assert summary["all"]["missing"] == 0
    assert summary["all"]["prompt_tokens_per_answer"] > 0
    assert 0.0 <= summary["all"]["field_agreement"] <= 1.0
    assert (out / "report.html").stat().st_size > 0


def test_eval_refuses_an_unknown_analysis_before_asking_anything(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["prompts", "eval", str(Path(__file__).resolve().parents[1] / "evalsets" / "starter"),
         "--analysis", "object-detektion", "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "no analysis 'object-detektion'" in result.output
    assert "did you mean 'object-detection' or" in result.output
    assert not (tmp_path / "out").exists()
