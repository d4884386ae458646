"""Catalog v2 through the whole worker: repairs, log-probability confidences, pixel facts and the
re-ask of a cut-off answer, asserted on what the backend accepted (the simulator's ledger)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from goflow_gpu.engines.base import InferenceRequest, InferenceResult
from goflow_gpu.prompts import load_catalog
from goflow_gpu.service import run_worker
from goflow_gpu.simulator import Simulator
from tests.doubles import ScriptedEngine
from tests.test_worker import KEY, _instant_retries, accepted, run, settings_for

__all__ = ["_instant_retries"]  # the autouse fixture: the key, instant retry sleeps

OBJECTS = {
    "objects_detected": [
        {"name": "car", "bbox_2d": [10, 10, 60, 50]},
        {"name": "kite", "bbox_2d": [20, 20, 8000, 40]},  # far off the image: dropped
        {"name": "dog", "bbox_2d": [5, 30, 25, 60]},
    ],
    "image_description": "A car, a kite and a dog.",
}
LOGPROB = -0.1  # every character of the scripted answers is one token with this log-probability


class LogprobEngine(ScriptedEngine):
    """The scripted engine, with one token per character and ``finish_reason`` from a script."""

    def __init__(self, answers: dict[str, list[tuple[str, str]]]) -> None:
        super().__init__()
        #: part of the request id (an analysis id) -> [(text, finish_reason)] per ask, in order
        self.answers = answers

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        result = await super().infer(request)
        key = next((k for k in self.answers if k in request.request_id), None)
        queue = self.answers.get(key or "")
        if queue:
            result.text, result.finish_reason = queue.pop(0)
        if request.logprobs:
            result.token_logprobs = [(char, LOGPROB) for char in result.text]
        return result


def _slug_ids(manifest: dict[str, Any]) -> dict[str, str]:
    return {a["slug"]: a["id"] for a in manifest["analyses"]}


def test_repairs_confidences_and_pixel_facts_reach_the_backend(tmp_path: Path) -> None:
    engine = LogprobEngine({})
    slugs = ["object-detection", "colour-palette", "people-count"]

    def script(request: InferenceRequest) -> str | None:
        schema = json.dumps(request.json_schema)
        if "objects_detected" in schema:
            return json.dumps(OBJECTS, separators=(",", ":"))
        if "count_bin" in schema:  # 2 people pointed at, but the range says 7-10
            return '{"people":[{"point_2d":[10,10]},{"point_2d":[30,20]}],"count_bin":"7-10"}'
        return None

    engine.script = script

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=5) as sim:
            manifest = sim.add_job(media=1, analyses=3, slugs=slugs)
            result = await run_worker(
                settings_for(sim, tmp_path), burst=True, engine=engine, handle_signals=False
            )
            assert result.exit_code == 0
            assert sim.ledger.check_job(manifest) == []
            project = manifest["project"]["id"]
            ids = _slug_ids(manifest)
            bodies = {k[2]: v for k, v in accepted(sim, project).items()}
            assert all(len(v) == 1 for v in bodies.values())  # exactly once
            objects = bodies[ids["object-detection"]][0]["analysisResult"]
            car, dog = math.exp(3 * LOGPROB), math.exp(3 * LOGPROB)
            assert [(o["name"], o["confidence"]) for o in objects["objects_detected"]] == [
                ("car", round(car, 3)),
                ("dog", round(dog, 3)),
            ]
            assert [list(o) for o in objects["objects_detected"]] == [
                ["name", "confidence", "bounding_box"]
            ] * 2
            (warning,) = objects["qa_warnings"]
            assert warning.startswith("dropped objects_detected[1]: ")
            people = bodies[ids["people-count"]][0]["analysisResult"]
            assert (people["count_bin"], people["count"], people["crowd_level"]) == (
                "2-3",
                2,
                "small-group",
            )
            assert people["qa_warnings"] == [
                "count_bin: '7-10' disagreed with 2 point(s); set to '2-3'"
            ]
            palette = bodies[ids["colour-palette"]][0]["analysisResult"]
            colours = palette["dominant_colours"]
            assert 1 <= len(colours) <= 5
            assert sum(c["share"] for c in colours) == 100
            assert "qa_warnings" not in palette
            details = sim.ledger.reports[project][0]["report"]["details"]["per_analysis"]
            assert details["object-detection"]["repaired_by_qa"] == 1
            assert details["people-count"]["repaired_by_qa"] == 1
            assert details["colour-palette"]["repaired_by_qa"] == 0
            assert details["object-detection"]["spec_versions"] == [
                load_catalog().specs["object-detection"].version
            ]
        by_kind = {
            "objects": [r for r in engine.history if "objects_detected" in str(r.json_schema)],
            "palette": [r for r in engine.history if "overall_tone" in str(r.json_schema)],
        }
        assert [r.logprobs for r in by_kind["objects"]] == [True]  # it has a confidence
        assert [r.logprobs for r in by_kind["palette"]] == [False]  # nothing to rate

    run(go)


def test_an_answer_cut_off_at_the_budget_is_asked_again_with_a_larger_one(tmp_path: Path) -> None:
    budget = load_catalog().specs["object-detection"].sampling.max_tokens
    whole = json.dumps(
        {"objects_detected": [{"name": "car", "bbox_2d": [10, 10, 60, 50]}],
         "image_description": "A car."},
        separators=(",", ":"),
    )  # fmt: skip
    engine = LogprobEngine(
        {"object-detection": [('{"objects_detected":[{"name":"ca', "length"), (whole, "stop")]}
    )
    engine.script = None

    async def go() -> None:
        async with Simulator(api_key=KEY, seed=6) as sim:
            manifest = sim.add_job(media=1, analyses=1, slugs=["object-detection"])
            # the request id holds the analysis id; the engine's answers are keyed by slug
            analysis_id = manifest["analyses"][0]["id"]
            engine.answers = {analysis_id: engine.answers["object-detection"]}
            result = await run_worker(
                settings_for(sim, tmp_path, qa_retries=2),
                burst=True,
                engine=engine,
                handle_signals=False,
            )
            assert result.exit_code == 0
            project = manifest["project"]["id"]
            ((body,),) = accepted(sim, project).values()
            assert body["status"] == "completed"
            assert body["analysisResult"]["objects_detected"][0]["name"] == "car"
        budgets = [r.sampling.max_tokens for r in engine.history]
        assert budgets == [budget, 2 * budget]
        assert "cut off" in engine.history[1].user_prompt

    run(go)
