"""Facts computed from pixels: pictures drawn here, with answers worked out by hand.

Every picture is drawn with Pillow (flat rectangles, checkerboards, gradients), saved under
``tmp_path`` as PNG and, where the answer survives lossy compression, as JPEG. The expected
values come from the drawing (a red block over three quarters of the width is 75 % red), never
from the code under test. Sizes are ``(width, height)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter

from goflow_gpu.prompts.pixels import (
    FACTS,
    NAMED_COLOURS,
    Pixels,
    compute_facts,
    largest_remainder,
    load_pixels,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
YELLOW = (255, 255, 0)
HEX = re.compile(r"^#[0-9a-f]{6}$")


def save(img: Image.Image, tmp_path: Path, name: str, **options: Any) -> Path:
    path = tmp_path / name
    img.save(path, **options)
    return path


def bands(size: tuple[int, int], *parts: tuple[int, tuple[int, int, int]]) -> Image.Image:
    """Vertical bands, left to right: ``(width, colour)`` each."""
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    x = 0
    for width, colour in parts:
        draw.rectangle([x, 0, x + width - 1, size[1] - 1], fill=colour)
        x += width
    assert x == size[0]
    return img


def checkerboard(size: tuple[int, int], square: int) -> Image.Image:
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    for y in range(0, size[1], square):
        for x in range(0, size[0], square):
            if (x // square + y // square) % 2:
                draw.rectangle([x, y, x + square - 1, y + square - 1], fill=BLACK)
    return img


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def near(hex_colour: str, expected: tuple[int, int, int], tolerance: int) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(rgb(hex_colour), expected, strict=True))


def palette(path: Path) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = compute_facts(path, ["palette"])["palette"]
    return result


def check_palette_shape(colours: list[dict[str, Any]]) -> None:
    assert 1 <= len(colours) <= 5
    assert sum(c["share"] for c in colours) == 100
    shares = [c["share"] for c in colours]
    assert shares == sorted(shares, reverse=True)
    for colour in colours:
        assert set(colour) == {"hex", "name", "share"}
        assert HEX.match(colour["hex"])
        assert colour["name"] in NAMED_COLOURS
        assert colour["share"] >= 1


# --- palette -------------------------------------------------------------------------------


def test_palette_three_quarters_red_one_quarter_blue_png(tmp_path: Path) -> None:
    path = save(bands((400, 400), (300, RED), (100, BLUE)), tmp_path, "rb.png")
    colours = palette(path)
    assert [(c["name"], c["share"]) for c in colours] == [("red", 75), ("blue", 25)]
    assert near(colours[0]["hex"], RED, 2)
    assert near(colours[1]["hex"], BLUE, 2)


def test_palette_three_quarters_red_one_quarter_blue_jpeg(tmp_path: Path) -> None:
    img = bands((400, 400), (300, RED), (100, BLUE))
    colours = palette(save(img, tmp_path, "rb.jpg", quality=90))
    assert [c["name"] for c in colours] == ["red", "blue"]
    assert abs(colours[0]["share"] - 75) <= 1
    assert colours[0]["share"] + colours[1]["share"] == 100
    assert near(colours[0]["hex"], RED, 12)
    assert near(colours[1]["hex"], BLUE, 12)


@pytest.mark.parametrize(
    ("name", "options", "slack"), [("3.png", {}, 0), ("3.jpg", {"quality": 90}, 1)]
)
def test_palette_three_colours_fifty_thirty_twenty(
    tmp_path: Path, name: str, options: dict[str, Any], slack: int
) -> None:
    img = bands((400, 100), (200, WHITE), (120, BLACK), (80, YELLOW))
    colours = palette(save(img, tmp_path, name, **options))
    assert [c["name"] for c in colours] == ["white", "black", "yellow"]
    for colour, expected in zip(colours, (50, 30, 20), strict=True):
        assert abs(colour["share"] - expected) <= slack
    check_palette_shape(colours)


def test_palette_single_colour(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (300, 200), "#3366cc"), tmp_path, "one.png")
    colours = palette(path)
    assert len(colours) == 1
    assert colours[0]["share"] == 100
    assert colours[0]["name"] == "blue"
    assert near(colours[0]["hex"], (0x33, 0x66, 0xCC), 1)


def test_palette_near_duplicates_are_one_colour(tmp_path: Path) -> None:
    # 200 columns of #ff0000, 100 of #fe0101 (delta E about 1), 100 of blue
    img = bands((400, 400), (200, RED), (100, (0xFE, 0x01, 0x01)), (100, BLUE))
    colours = palette(save(img, tmp_path, "dup.png"))
    assert [(c["name"], c["share"]) for c in colours] == [("red", 75), ("blue", 25)]
    assert near(colours[0]["hex"], RED, 2)


def noisy_gradient(size: tuple[int, int] = (480, 320), seed: int = 7) -> Image.Image:
    """A photo-like picture: hue and light gradients plus Gaussian noise."""
    width, height = size
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    base = np.concatenate(
        [
            255 * np.broadcast_to(x, (height, width, 1)),
            255 * np.broadcast_to(y, (height, width, 1)),
            255 * np.broadcast_to(1 - x, (height, width, 1)),
        ],
        axis=2,
    )
    noise = np.random.default_rng(seed).normal(0.0, 20.0, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize(("name", "options"), [("g.png", {}), ("g.jpg", {"quality": 80})])
def test_palette_of_a_noisy_gradient(tmp_path: Path, name: str, options: dict[str, Any]) -> None:
    colours = palette(save(noisy_gradient(), tmp_path, name, **options))
    check_palette_shape(colours)
    assert len(colours) >= 2


def test_palette_is_deterministic(tmp_path: Path) -> None:
    path = save(noisy_gradient(), tmp_path, "g.jpg", quality=85)
    first = compute_facts(path, FACTS)
    assert compute_facts(path, FACTS) == first
    assert FACTS["palette"].compute(load_pixels(path)) == first["palette"]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    background=st.tuples(*[st.integers(0, 255)] * 3),
    rectangles=st.lists(
        st.tuples(
            st.integers(0, 63),
            st.integers(0, 47),
            st.integers(1, 64),
            st.integers(1, 48),
            st.tuples(*[st.integers(0, 255)] * 3),
        ),
        max_size=8,
    ),
)
def test_palette_shares_always_sum_to_100(
    tmp_path: Path,
    background: tuple[int, int, int],
    rectangles: list[tuple[int, int, int, int, tuple[int, int, int]]],
) -> None:
    img = Image.new("RGB", (64, 48), background)
    draw = ImageDraw.Draw(img)
    for x, y, w, h, colour in rectangles:
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
    check_palette_shape(FACTS["palette"].compute(Pixels.from_image(img)))


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ([1, 1, 1], [34, 33, 33]),
        ([75, 25], [75, 25]),
        ([0.5, 0.3, 0.2], [50, 30, 20]),
        ([2, 1], [67, 33]),
        ([0.333, 0.333, 0.334], [33, 33, 34]),
        ([7], [100]),
    ],
)
def test_largest_remainder(weights: list[float], expected: list[int]) -> None:
    assert largest_remainder(weights) == expected


# --- orientation and resolution ------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((400, 300), "landscape"),
        ((300, 400), "portrait"),
        ((400, 395), "square"),
        ((395, 400), "square"),
        ((400, 370), "landscape"),
        ((370, 400), "portrait"),
        ((400, 400), "square"),
    ],
)
def test_orientation(tmp_path: Path, size: tuple[int, int], expected: str) -> None:
    path = save(Image.new("RGB", size, "grey"), tmp_path, "o.png")
    assert compute_facts(path, ["orientation"]) == {"orientation": expected}


def test_resolution_is_of_the_original(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (1234, 567), "grey"), tmp_path, "r.jpg")
    assert compute_facts(path, ["resolution"]) == {
        "resolution": {"width": 1234, "height": 567, "megapixels": 0.7}
    }


def test_orientation_and_resolution_of_a_large_jpeg_decoded_at_reduced_scale(
    tmp_path: Path,
) -> None:
    # 3000 x 2000 decodes at 1/4 scale (750 x 500); the facts still report the file's size.
    path = save(Image.new("RGB", (3000, 2000), "grey"), tmp_path, "big.jpg")
    facts = compute_facts(path, ["orientation", "resolution"])
    assert facts == {
        "orientation": "landscape",
        "resolution": {"width": 3000, "height": 2000, "megapixels": 6.0},
    }
    assert load_pixels(path).rgb.shape == (341, 512, 3)


# --- sharpness -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), [("c.png", {}), ("c.jpg", {"quality": 90})])
def test_sharpness_of_a_checkerboard_and_its_blur(
    tmp_path: Path, name: str, options: dict[str, Any]
) -> None:
    board = checkerboard((640, 480), 10)
    sharp = compute_facts(save(board, tmp_path, name, **options), ["sharpness"])["sharpness"]
    blurred = board.filter(ImageFilter.GaussianBlur(6))
    blurry = compute_facts(save(blurred, tmp_path, "b" + name, **options), ["sharpness"])
    assert sharp["level"] == "sharp"
    assert blurry["sharpness"]["level"] == "blurry"
    assert blurry["sharpness"]["score"] < sharp["score"]


def test_sharpness_of_text(tmp_path: Path) -> None:
    img = Image.new("RGB", (600, 400), WHITE)
    draw = ImageDraw.Draw(img)
    for y in range(10, 390, 16):
        draw.text((10, y), "The quick brown fox jumps over the lazy dog 0123456789", fill=BLACK)
    sharp = compute_facts(save(img, tmp_path, "t.png"), ["sharpness"])["sharpness"]
    blurred = img.filter(ImageFilter.GaussianBlur(6))
    blurry = compute_facts(save(blurred, tmp_path, "bt.png"), ["sharpness"])["sharpness"]
    assert sharp["level"] == "sharp"
    assert blurry["level"] == "blurry"
    assert blurry["score"] < sharp["score"]


def test_a_flat_colour_is_blurry(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (300, 200), "#3366cc"), tmp_path, "flat.png")
    assert compute_facts(path, ["sharpness"]) == {"sharpness": {"level": "blurry", "score": 0.0}}


def test_sharpness_does_not_depend_on_the_file_resolution(tmp_path: Path) -> None:
    big = checkerboard((2000, 1500), 50).filter(ImageFilter.GaussianBlur(2))
    small = big.resize((1000, 750), Image.Resampling.LANCZOS)
    big_score = compute_facts(save(big, tmp_path, "big.png"), ["sharpness"])
    small_score = compute_facts(save(small, tmp_path, "small.png"), ["sharpness"])
    ratio = big_score["sharpness"]["score"] / small_score["sharpness"]["score"]
    assert 0.67 < ratio < 1.5
    assert big_score["sharpness"]["level"] == small_score["sharpness"]["level"] == "sharp"


# --- brightness and contrast ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("colour", "expected"),
    [
        (BLACK, {"level": "dark", "mean": 0}),
        (WHITE, {"level": "bright", "mean": 100}),
        ((128, 128, 128), {"level": "balanced", "mean": 50}),
        ((40, 40, 40), {"level": "dark", "mean": 16}),
        ((220, 220, 220), {"level": "bright", "mean": 86}),
    ],
)
def test_brightness(tmp_path: Path, colour: tuple[int, int, int], expected: dict[str, Any]) -> None:
    path = save(Image.new("RGB", (200, 150), colour), tmp_path, "b.png")
    assert compute_facts(path, ["brightness"]) == {"brightness": expected}


def test_brightness_weighs_green_most(tmp_path: Path) -> None:
    # Rec. 709 luma of pure green is 0.7152 -> 72; of pure blue 0.0722 -> 7.
    green = save(Image.new("RGB", (50, 50), (0, 255, 0)), tmp_path, "g.png")
    blue = save(Image.new("RGB", (50, 50), BLUE), tmp_path, "b.png")
    assert compute_facts(green, ["brightness"])["brightness"] == {"level": "bright", "mean": 72}
    assert compute_facts(blue, ["brightness"])["brightness"] == {"level": "dark", "mean": 7}


def test_contrast_of_flat_grey_is_low(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (200, 150), (128, 128, 128)), tmp_path, "g.png")
    assert compute_facts(path, ["contrast"]) == {"contrast": {"level": "low", "rms": 0}}


def test_contrast_of_half_black_half_white_is_high(tmp_path: Path) -> None:
    # Luma 0 and 100 in equal halves: mean 50, standard deviation 50.
    path = save(bands((200, 100), (100, BLACK), (100, WHITE)), tmp_path, "bw.png")
    facts = compute_facts(path, ["contrast", "brightness"])
    assert facts == {
        "contrast": {"level": "high", "rms": 50},
        "brightness": {"level": "balanced", "mean": 50},
    }


def test_contrast_of_two_close_greys_is_normal(tmp_path: Path) -> None:
    # Greys 100 and 160 in halves: luma 39.2 and 62.7, standard deviation 11.8 -> 12.
    path = save(bands((200, 100), (100, (100,) * 3), (100, (160,) * 3)), tmp_path, "gg.png")
    assert compute_facts(path, ["contrast"]) == {"contrast": {"level": "normal", "rms": 12}}


# --- inputs --------------------------------------------------------------------------------


def test_rgba_transparency_is_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle([100, 0, 199, 99], fill=(255, 0, 0, 255))
    colours = palette(save(img, tmp_path, "a.png"))
    assert sorted((c["name"], c["share"]) for c in colours) == [("red", 50), ("white", 50)]
    assert {c["hex"] for c in colours} == {"#ff0000", "#ffffff"}


def test_half_transparent_black_becomes_grey(tmp_path: Path) -> None:
    # Black at alpha 128 over white: 255 * (1 - 128/255) = 127 -> luma 50.
    path = save(Image.new("RGBA", (100, 100), (0, 0, 0, 128)), tmp_path, "half.png")
    assert compute_facts(path, ["brightness"])["brightness"]["mean"] == 50


def test_la_image(tmp_path: Path) -> None:
    path = save(Image.new("LA", (100, 100), (0, 0)), tmp_path, "la.png")
    assert compute_facts(path, ["brightness"])["brightness"] == {"level": "bright", "mean": 100}


def test_palette_mode_png(tmp_path: Path) -> None:
    img = bands((400, 400), (300, RED), (100, BLUE)).convert("P")
    path = save(img, tmp_path, "p.png")
    with Image.open(path) as check:
        assert check.mode == "P"
    colours = palette(path)
    assert [(c["name"], c["share"]) for c in colours] == [("red", 75), ("blue", 25)]


def test_palette_mode_png_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (100, 100), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    ImageDraw.Draw(img).rectangle([0, 0, 24, 99], fill=1)  # 25 % red, the rest index 0
    path = save(img, tmp_path, "pt.png", transparency=0)
    colours = palette(path)
    assert [(c["name"], c["share"]) for c in colours] == [("white", 75), ("red", 25)]


def test_greyscale_image(tmp_path: Path) -> None:
    img = bands((200, 100), (100, BLACK), (100, WHITE)).convert("L")
    path = save(img, tmp_path, "l.png")
    facts = compute_facts(path, ["palette", "brightness", "contrast"])
    assert sorted((c["name"], c["share"]) for c in facts["palette"]) == [
        ("black", 50),
        ("white", 50),
    ]
    assert facts["brightness"] == {"level": "balanced", "mean": 50}
    assert facts["contrast"] == {"level": "high", "rms": 50}


def test_sixteen_bit_greyscale(tmp_path: Path) -> None:
    values = np.zeros((100, 200), dtype=np.uint16)
    values[:, 100:] = 65535
    path = save(Image.fromarray(values), tmp_path, "16.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    facts = compute_facts(path, ["brightness", "contrast"])
    assert facts == {
        "brightness": {"level": "balanced", "mean": 50},
        "contrast": {"level": "high", "rms": 50},
    }


def test_dark_sixteen_bit_greyscale_is_scaled_from_sixteen_bits(tmp_path: Path) -> None:
    # 16-bit value 200 is 200 / 65535 of white: black, not the 8-bit 200.
    path = save(Image.fromarray(np.full((50, 50), 200, dtype=np.uint16)), tmp_path, "d16.png")
    with Image.open(path) as check:
        assert check.mode == "I;16"
    assert compute_facts(path, ["brightness"])["brightness"] == {"level": "dark", "mean": 0}


def test_cmyk_jpeg(tmp_path: Path) -> None:
    # CMYK red is (0, 255, 255, 0), blue (255, 255, 0, 0); 3/4 red, 1/4 blue.
    img = Image.new("CMYK", (400, 400), (0, 255, 255, 0))
    ImageDraw.Draw(img).rectangle([300, 0, 399, 399], fill=(255, 255, 0, 0))
    path = save(img, tmp_path, "cmyk.jpg", quality=90)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    colours = palette(path)
    assert [c["name"] for c in colours] == ["red", "blue"]
    assert abs(colours[0]["share"] - 75) <= 1


def test_corrupt_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        compute_facts(path, ["palette"])


def test_truncated_png_names_the_path(tmp_path: Path) -> None:
    whole = save(noisy_gradient(), tmp_path, "whole.png")
    path = tmp_path / "cut.png"
    path.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        compute_facts(path, ["brightness"])


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.png"
    with pytest.raises(ValueError, match=re.escape(str(path))):
        compute_facts(path, ["orientation"])


def test_unknown_fact_lists_the_known_ones(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (10, 10)), tmp_path, "x.png")
    with pytest.raises(ValueError, match="'dominant_mood'") as caught:
        compute_facts(path, ["palette", "dominant_mood"])
    for name in ("palette", "orientation", "resolution", "sharpness", "brightness", "contrast"):
        assert name in str(caught.value)


# --- the registry --------------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(FACTS) == {
        "palette",
        "orientation",
        "resolution",
        "sharpness",
        "brightness",
        "contrast",
    }
    for name, fact in FACTS.items():
        assert fact.name == name
        assert fact.description.endswith(".")
        jsonschema.Draft202012Validator.check_schema(fact.json_schema)


def test_named_colours_are_plain_and_fixed() -> None:
    assert 25 <= len(NAMED_COLOURS) <= 35
    for name in ("black", "white", "grey", "red", "blue", "green", "yellow", "brown"):
        assert name in NAMED_COLOURS
    for anchors in NAMED_COLOURS.values():
        assert anchors
        assert all(HEX.match(anchor) for anchor in anchors)


@pytest.mark.parametrize(
    "img",
    [
        noisy_gradient(),
        checkerboard((300, 500), 7),
        Image.new("RGB", (3, 2), "white"),
        Image.new("RGB", (1, 1), "black"),
        Image.new("RGB", (2000, 3), "orange"),
    ],
)
def test_every_value_matches_its_schema(tmp_path: Path, img: Image.Image) -> None:
    path = save(img, tmp_path, "s.png")
    facts = compute_facts(path, FACTS)
    assert list(facts) == list(FACTS)
    for name, value in facts.items():
        jsonschema.validate(value, FACTS[name].json_schema)


def test_the_fact_cache_computes_each_fact_of_a_file_once_and_forgets_the_oldest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from goflow_gpu.prompts import pixels

    files = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (40, 30), (200, 0, 0)).save(path)
        files.append(path)
    calls: list[tuple[str, list[str]]] = []
    real = pixels.compute_facts

    def counting(path: Path, names: Any) -> dict[str, Any]:
        calls.append((path.name, list(names)))
        return real(path, names)

    monkeypatch.setattr(pixels, "compute_facts", counting)
    cache = pixels.FactCache(max_images=2)
    assert cache.cached(files[0], ["orientation"]) is None
    assert cache.get(files[0], ["orientation"]) == {"orientation": "landscape"}
    assert cache.cached(files[0], ["orientation"]) == {"orientation": "landscape"}
    assert cache.cached(files[0], ["orientation", "resolution"]) is None
    assert cache.get(files[0], ["orientation", "resolution"])["resolution"]["width"] == 40
    cache.get(files[1], ["orientation"])
    cache.get(files[2], ["orientation"])  # the third file: the first is forgotten
    assert cache.cached(files[0], ["orientation"]) is None
    assert calls == [
        ("0.png", ["orientation"]),
        ("0.png", ["resolution"]),
        ("1.png", ["orientation"]),
        ("2.png", ["orientation"]),
    ]
