"""The simulator's scene mode: labelled scenes served as PNG, and grading what was reported.

Real HTTP on loopback with a plain aiohttp client, like tests/test_simulator.py. The expected
wire results are written here by hand from each scene's drawn boxes, not with the grader's own
label code, so a mistake there cannot hide itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from PIL import Image
from typer.testing import CliRunner

from goflow_gpu.protocol import parse_manifest
from goflow_gpu.simulator import Simulator
from goflow_gpu.simulator.images import LabelledScene, labelled_scene

KEY = "made-up-test-key"
API = "/api/v1/agent"


@contextlib.asynccontextmanager
async def running(**kwargs: Any) -> AsyncIterator[tuple[Simulator, aiohttp.ClientSession]]:
    sim = Simulator(KEY, **kwargs)
    async with sim, aiohttp.ClientSession() as http:
        yield sim, http


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with http.get(url) as response:
        return response.status, response.content_type, await response.read()


def scene_of(sim: Simulator, media_id: str) -> LabelledScene:
    scene = sim.scene_for(media_id)
    assert scene is not None
    return scene


def wire_box(box: tuple[int, int, int, int]) -> dict[str, int]:
    x, y, width, height = box
    return {"x": x, "y": y, "width": width, "height": height}


def overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0, width) * max(0, height)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def body(result: dict[str, Any], *, failed: bool = False) -> dict[str, Any]:
    """A result POST body, ``completed`` or ``failed`` (still carrying ``result``)."""
    return {
        "modelUsed": "hand-written",
        "userPromptUsed": "Describe the scene.",
        "systemPromptUsed": "You are an image analyst.",
        "status": "failed" if failed else "completed",
        "analysisResult": result,
    }


async def post(
    sim: Simulator,
    http: aiohttp.ClientSession,
    manifest: dict[str, Any],
    media: int,
    analysis: int,
    result: dict[str, Any],
    *,
    failed: bool = False,
) -> None:
    project = manifest["project"]["id"]
    mid, aid = manifest["media"][media]["id"], manifest["analyses"][analysis]["id"]
    url = f"{sim.base_url}{API}/projects/{project}/media/{mid}/analysis/{aid}"
    async with http.post(
        url, json=body(result, failed=failed), headers={"X-API-Key": KEY}
    ) as response:
        assert response.status == 201, await response.text()


# -- serving -----------------------------------------------------------------------------------


def test_scene_media_are_exactly_the_scene_pixels_as_png() -> None:
    async def run() -> None:
        async with running(seed=7) as (sim, http):
            manifest = sim.add_job(media=3, analyses=1, scenes=True)
            parse_manifest(manifest)  # the contract's validator accepts what we serve
            for item in manifest["media"]:
                mid = item["id"]
                assert item["filename"].endswith(".png")
                assert item["optimised_path"].endswith(f"/{mid}/optimised.png")
                assert item["greyscale_path"].endswith(f"/{mid}/greyscale.png")
                scene = scene_of(sim, mid)
                assert sim.scene_for(mid.upper()) is scene
                # The documented key: same seed and media id, same scene.
                assert scene.shapes == labelled_scene(f"7:{mid}").shapes
                assert sim.image_size(mid) == scene.image.size

                status, ctype, data = await fetch(http, item["optimised_path"])
                assert (status, ctype) == (200, "image/png")
                picture = Image.open(io.BytesIO(data))
                assert (picture.format, picture.mode) == ("PNG", "RGB")
                assert picture.tobytes() == scene.image.tobytes()

                status, ctype, data = await fetch(http, item["greyscale_path"])
                assert (status, ctype) == (200, "image/png")
                grey = Image.open(io.BytesIO(data))
                assert (grey.format, grey.mode) == ("PNG", "L")
                assert grey.tobytes() == scene.image.convert("L").tobytes()

                jpg = item["optimised_path"].removesuffix(".png") + ".jpg"
                assert (await fetch(http, jpg))[0] == 404  # one suffix per job
            first = await fetch(http, manifest["media"][0]["optimised_path"])

        async with running(seed=7) as (again, http):
            same = again.add_job(media=3, analyses=1, scenes=True)
            assert same["media"][0]["id"] == manifest["media"][0]["id"]
            assert await fetch(http, same["media"][0]["optimised_path"]) == first
            mid = same["media"][0]["id"]
            assert scene_of(again, mid).word_box == scene_of(sim, mid).word_box

    asyncio.run(run())


def test_a_plain_job_is_unchanged_beside_a_scene_job() -> None:
    async def run() -> None:
        async with running(seed=3) as (sim, http):
            sim.add_job(media=2, analyses=2, scenes=True)
            plain = sim.add_job(media=2, analyses=2)
            plain_bytes = await fetch(http, plain["media"][1]["greyscale_path"])
            item = plain["media"][0]
            assert item["filename"].endswith(".jpg")
            assert item["optimised_path"].endswith("/optimised.jpg")
            assert sim.scene_for(item["id"]) is None
            status, ctype, data = await fetch(http, item["optimised_path"])
            assert (status, ctype) == (200, "image/jpeg")
            assert Image.open(io.BytesIO(data)).format == "JPEG"
            png = item["optimised_path"].removesuffix(".jpg") + ".png"
            assert (await fetch(http, png))[0] == 404

        async with running(seed=3) as (other, http):
            other.add_job(media=2, analyses=2)  # the same ids drawn, no scenes
            twin = other.add_job(media=2, analyses=2)
            assert twin == {**plain, "media": twin["media"]}
            assert [m["id"] for m in twin["media"]] == [m["id"] for m in plain["media"]]
            assert await fetch(http, twin["media"][1]["greyscale_path"]) == plain_bytes

    asyncio.run(run())


def test_media_faults_still_apply_to_scene_jobs() -> None:
    async def run() -> None:
        async with running() as (sim, http):
            manifest = sim.add_job(media=3, scenes=True, media_faults={0: "404", 1: "truncated"})
            gone, cut, fine = manifest["media"]
            assert (await fetch(http, gone["optimised_path"]))[0] == 404
            async with http.get(cut["greyscale_path"]) as response:
                assert (response.status, response.content_type) == (200, "image/png")
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            assert (await fetch(http, fine["optimised_path"]))[:2] == (200, "image/png")
            faults = [c["fault"] for c in sim.ledger.calls if c["route"] == "media"]
            assert faults == ["404", "truncated", None]

    asyncio.run(run())


# -- grading -----------------------------------------------------------------------------------


def test_grade_says_which_answers_were_right() -> None:
    slugs = ["object-detection", "image-description", "text-recognition", "people-count"]

    async def run() -> None:
        async with running(seed=11) as (sim, http):
            manifest = sim.add_job(media=2, slugs=slugs, scenes=True)
            ids = [m["id"] for m in manifest["media"]]
            good, bad = scene_of(sim, ids[0]), scene_of(sim, ids[1])

            # Media 0: every answer right, written from the drawn shapes and word.
            await post(
                sim,
                http,
                manifest,
                0,
                0,
                {
                    "objects_detected": [
                        {"name": s.kind, "confidence": 0.9, "bounding_box": wire_box(s.box)}
                        for s in good.shapes
                    ],
                    "image_description": " and ".join(
                        f"a {s.colour} {s.kind}" for s in good.shapes
                    ),
                },
            )
            await post(sim, http, manifest, 0, 1, {"description": "Flat shapes and a word."})

            def text_of(scene: LabelledScene) -> dict[str, Any]:
                block = {"text": scene.word, "bounding_box": wire_box(scene.word_box)}
                return {"has_text": True, "text_blocks": [block], "full_text": scene.word}

            await post(sim, http, manifest, 0, 2, text_of(good))
            await post(
                sim,
                http,
                manifest,
                0,
                3,
                {"people": [], "count_bin": "0", "count": 0, "crowd_level": "none"},
            )

            # Media 1: one box moved far (off every drawn shape), text failed, people missing.
            own = bad.shapes[0].box
            w, h = own[2], own[3]
            width, height = bad.image.size
            moved = next(
                box
                for box in (
                    (x, y, w, h)
                    for x in range(0, width - w, w // 2)
                    for y in range(0, height - h, h // 2)
                )
                if overlap(box, own) == 0 and all(overlap(box, s.box) < 0.5 for s in bad.shapes)
            )
            objects = [
                {"name": s.kind, "bounding_box": wire_box(moved if i == 0 else s.box)}
                for i, s in enumerate(bad.shapes)
            ]
            await post(sim, http, manifest, 1, 0, {"objects_detected": objects})
            # A failed result is no answer, even with a right-looking analysisResult.
            await post(sim, http, manifest, 1, 2, text_of(bad), failed=True)

            summaries = sim.grade(manifest)
            assert list(summaries) == ["object-detection", "text-recognition", "people-count"]
            objects_found = summaries["object-detection"]
            shapes = len(good.shapes) + len(bad.shapes)
            assert (objects_found.answers, objects_found.right) == (2, 1)
            assert objects_found.boxes_expected == shapes
            assert objects_found.boxes_predicted == shapes
            assert objects_found.boxes_matched == shapes - 1  # the moved box is not found
            assert objects_found.mean_iou == 1.0  # the others sit exactly
            assert (objects_found.colours_named, objects_found.shapes_drawn) == (
                len(good.shapes),
                shapes,
            )
            assert objects_found.kinds_named == shapes  # every shape named what it is
            text = summaries["text-recognition"]
            assert (text.answers, text.right) == (2, 1)  # the failed one is not right
            assert (text.boxes_expected, text.boxes_matched, text.boxes_predicted) == (2, 1, 1)
            people = summaries["people-count"]
            assert (people.answers, people.right) == (2, 1)  # the missing one is not right
            assert people.line() == "people-count: 1/2 right (50%)"

            # Ids of any case, as served with upper_ids, grade the same.
            shouted = {
                **manifest,
                "project": {**manifest["project"], "id": manifest["project"]["id"].upper()},
                "media": [{**m, "id": m["id"].upper()} for m in manifest["media"]],
                "analyses": [{**a, "id": a["id"].upper()} for a in manifest["analyses"]],
            }
            assert sim.grade(shouted) == summaries

    asyncio.run(run())


def test_grade_refuses_a_job_that_is_not_a_scene_job() -> None:
    async def run() -> None:
        async with running() as (sim, _http):
            plain = sim.add_job(media=1, analyses=2)
            with pytest.raises(ValueError, match="not a scene job"):
                sim.grade(plain)
            mixed = sim.add_job(media=1, analyses=1, scenes=True)
            with pytest.raises(ValueError, match="not a scene job"):
                sim.grade({**mixed, "media": mixed["media"] + plain["media"]})

    asyncio.run(run())


# -- queueing scene jobs: admin route and CLI ------------------------------------------------


def test_admin_route_and_cli_queue_scene_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    from goflow_gpu.simulator.__main__ import app
    from goflow_gpu.simulator.cli import _serve

    assert "--scenes" in CliRunner().invoke(app, ["--help"]).output

    async def run() -> None:
        sim = Simulator(KEY)
        serving = asyncio.create_task(_serve(sim, "127.0.0.1", 0, 1, 2, 3, True))
        base_url = ""
        try:
            for _ in range(500):
                with contextlib.suppress(RuntimeError):
                    base_url = sim.base_url  # jobs are queued before the server idles
                    break
                await asyncio.sleep(0.01)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base_url}{API}/next-job", headers={"X-API-Key": KEY}) as r:
                    served = await r.json()
                assert [m["filename"] for m in served["media"]] == ["image-01.png", "image-02.png"]
                assert sim.scene_for(served["media"][0]["id"]) is not None
                async with http.post(f"{base_url}/_sim/jobs", json={"scenes": True}) as r:
                    queued = await r.json()
                assert queued["media"][0]["optimised_path"].endswith(".png")
                async with http.post(f"{base_url}/_sim/jobs", json={"scenes": "yes"}) as r:
                    assert r.status == 422
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving

    asyncio.run(run())
    assert "labelled scenes" in capsys.readouterr().out
