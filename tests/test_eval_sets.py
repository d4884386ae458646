"""The shipped starter labelled set: reproducible from the simulator, loadable, and true.

The labels are checked against the pictures themselves (each box is the tight box around
non-background pixels), not only against the generator that wrote them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops

from goflow_gpu.evaluation import Answer, load_labelled_set, summarise
from goflow_gpu.evaluation.starter import build_starter_set, scene_key
from goflow_gpu.prompts import load_catalog
from goflow_gpu.prompts.result import result_schema
from goflow_gpu.simulator.images import SCENE_KINDS, SCENE_PALETTE, labelled_scene

STARTER = Path(__file__).resolve().parents[1] / "evalsets" / "starter"


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    catalog = load_catalog()
    return {slug: result_schema(spec.json_schema, spec.qa) for slug, spec in catalog.specs.items()}


def test_regenerating_reproduces_the_shipped_set(tmp_path: Path):
    written = build_starter_set(tmp_path)
    shipped = sorted(p.name for p in STARTER.iterdir())
    assert sorted(p.name for p in written) == shipped
    for name in shipped:
        fresh, kept = tmp_path / name, STARTER / name
        if name.endswith(".png"):
            with Image.open(fresh) as a, Image.open(kept) as b:
                assert (a.mode, a.size) == (b.mode, b.size), name
                assert a.tobytes() == b.tobytes(), f"{name}: pixels differ"
        else:
            assert fresh.read_text() == kept.read_text(), f"{name} differs; regenerate the set"


def test_the_set_is_small():
    pngs = sorted(STARTER.glob("*.png"))
    assert 1 <= len(pngs) <= 12
    assert sum(p.stat().st_size for p in pngs) < 60_000
    for png in pngs:
        with Image.open(png) as image:
            assert max(image.size) <= 512


def test_the_set_loads_against_the_shipped_catalog(schemas: dict[str, dict[str, Any]]):
    images = load_labelled_set(STARTER, schemas)
    assert [i.name for i in images] == [f"scene-{n:02d}" for n in range(12)]
    for image in images:
        assert image.label_file is not None
        assert {"object-detection", "text-recognition", "people-count"} <= set(image.expected)
        assert image.expected["people-count"]["count"] == 0


def test_labelled_boxes_are_tight_around_the_drawn_pixels():
    for image in load_labelled_set(STARTER):
        with Image.open(image.path) as opened:
            picture = opened.convert("RGB")
        background: tuple[int, int, int] = max(picture.getcolors(256) or [])[1]  # type: ignore[assignment]
        boxes = [
            (obj["name"], obj["bounding_box"])
            for obj in image.expected["object-detection"]["objects_detected"]
        ]
        boxes += [
            ("text", block["bounding_box"])
            for block in image.expected["text-recognition"]["text_blocks"]
        ]
        for name, box in boxes:
            assert name in (*SCENE_KINDS, "text")
            x, y, w, h = box["x"], box["y"], box["width"], box["height"]
            pad = 3  # scenes keep more room than this between things
            region = picture.crop((x - pad, y - pad, x + w + pad, y + h + pad))
            plain = Image.new("RGB", region.size, background)
            drawn = ImageChops.difference(region, plain).getbbox()
            assert drawn == (pad, pad, pad + w, pad + h), f"{image.name}: {name} {box}"


def test_scene_colours_come_from_the_palette_and_the_word_is_labelled():
    scene = labelled_scene(scene_key("starter", 3))
    colours = {rgb for _, rgb in scene.image.getcolors(256) or []}
    assert colours <= set(SCENE_PALETTE.values())
    assert scene.dominant_colour == scene.background
    assert abs(sum(share for _, share in scene.colour_shares) - 1.0) < 1e-9
    label = (STARTER / "scene-03.yaml").read_text()
    assert f"full_text: {scene.word}" in label


def test_scenes_are_deterministic_and_sized():
    a = labelled_scene("k", (300, 200))
    b = labelled_scene("k", (300, 200))
    assert a.image.tobytes() == b.image.tobytes() and a.shapes == b.shapes
    assert a.image.size == (300, 200)
    with pytest.raises(ValueError, match="96 pixels"):
        labelled_scene("k", (50, 200))
    scenes = [labelled_scene(f"n{i}") for i in range(40)]
    assert {len(scene.shapes) for scene in scenes} == {1, 2, 3}
    # Large enough to span more than one of the tiny model's tokens: 30-45% of the short side.
    shares = [
        max(shape.box[2:]) / min(scene.image.size) for scene in scenes for shape in scene.shapes
    ]
    assert all(0.125 <= share <= 0.45 for share in shares)
    assert sum(share >= 0.3 for share in shares) >= 0.95 * len(shares)
    # The smallest picture still has a shape of full size. (The first shape's shrink-to-fit
    # is a guard: of 3,000 scenes drawn at ten small sizes, none needed it.)
    assert all(
        min(labelled_scene(f"n{i}", (96, 96)).shapes[0].box[2:]) >= 96 * 30 // 100 - 1
        for i in range(40)
    )
    assert {len(labelled_scene(f"n{i}", count=(1, 1)).shapes) for i in range(10)} == {1}


def test_perfect_answers_score_one(schemas: dict[str, dict[str, Any]]):
    images = load_labelled_set(STARTER, schemas)
    answers = []
    for image in images:
        for slug, expected in image.expected.items():
            answers.append(Answer(image.name, slug, True, True, expected))
    summary = summarise(answers, images, schemas)
    for slug, row in summary.items():
        assert row.field_agreement == 1.0, slug
    assert summary["object-detection"].box_precision == 1.0
    assert summary["object-detection"].box_recall == 1.0
