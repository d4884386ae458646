"""Boxes between the model's pixel space and the wire's: hand-worked cases and properties.

The model answers Qwen's ``bbox_2d`` corners ``[x1, y1, x2, y2]`` in the pixels of the image as
it saw it (``smart_resize`` of the original); the wire carries ``{x, y, width, height}`` in the
original image's pixels. Sizes are ``(width, height)``.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from goflow_gpu.errors import MediaError
from goflow_gpu.prompts.geometry import smart_resize, to_model_corners, to_wire_box


def box(x: int, y: int, w: int, h: int) -> dict[str, int]:
    return {"x": x, "y": y, "width": w, "height": h}


@pytest.mark.parametrize(
    ("model_size", "original_size", "corners", "expected"),
    [
        # 1024x768 seen as 1036x756: 518*1024/1036 = 511.97 -> 512, 378*768/756 = 384,
        # 618*1024/1036 = 610.83 -> 611, 428*768/756 = 434.79 -> 435
        ((1036, 756), (1024, 768), [518, 378, 618, 428], box(512, 384, 99, 51)),
        # halved for the model: everything doubles back
        ((2000, 1500), (4000, 3000), [10, 20, 40, 60], box(20, 40, 60, 80)),
        # 4000x3000 -> 1148x840: a quarter in, half the size
        ((1148, 840), (4000, 3000), [287, 210, 861, 630], box(1000, 750, 2000, 1500)),
        # upscaled tiny image 30x20 -> 84x56: the right-bottom quadrant
        ((84, 56), (30, 20), [42, 28, 84, 56], box(15, 10, 15, 10)),
        ((640, 480), (640, 480), [1, 2, 4, 6], box(1, 2, 3, 4)),
        # the whole image
        ((1036, 756), (1024, 768), [0, 0, 1036, 756], box(0, 0, 1024, 768)),
        # an overhang is clamped to the image
        ((1036, 756), (1024, 768), [1000, -5, 1050, 100], box(988, 0, 36, 102)),
        # a sliver thinner than an original pixel keeps one pixel: 84 -> 30 px wide,
        # 59*30/84 = 21.07 and 60*30/84 = 21.43 both round to 21; 10*20/56 = 3.57 -> 4 and
        # 20*20/56 = 7.14 -> 7
        ((84, 56), (30, 20), [59, 10, 60, 20], box(21, 4, 1, 3)),
        # ... and stays inside the image at the far edge: 83.5 -> 29.8 and 84 -> 30 round to 30
        ((84, 56), (30, 20), [83, 0, 84, 56], box(29, 0, 1, 20)),
    ],
)
def test_to_wire_box(model_size, original_size, corners, expected):
    assert to_wire_box(corners, model_size, original_size) == expected


@pytest.mark.parametrize(
    ("original_size", "model_size", "wire", "expected"),
    [
        ((1024, 768), (1036, 756), box(512, 384, 99, 51), [518, 378, 618, 428]),
        ((4000, 3000), (1148, 840), box(1000, 750, 2000, 1500), [287, 210, 861, 630]),
        ((30, 20), (84, 56), box(15, 10, 15, 10), [42, 28, 84, 56]),
        ((640, 480), (640, 480), box(1, 2, 3, 4), [1, 2, 4, 6]),
    ],
)
def test_to_model_corners(original_size, model_size, wire, expected):
    assert to_model_corners(wire, original_size, model_size) == expected


def test_float_corners_round_half_up():
    # a model without structured decoding may answer fractions: 10.5 -> 10.5 -> 11
    assert to_wire_box([10.5, 0.4, 20.49, 9.5], (100, 100), (100, 100)) == box(11, 0, 9, 10)


@pytest.mark.parametrize("corners", [[10, 10, 10, 20], [10, 20, 30, 5], [5, 5, 1, 1]])
def test_inverted_or_empty_corners_are_an_error(corners):
    with pytest.raises(ValueError, match="x1 < x2 and y1 < y2"):
        to_wire_box(corners, (100, 100), (100, 100))


def test_sizes_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        to_wire_box([0, 0, 1, 1], (0, 100), (100, 100))


# --- properties ------------------------------------------------------------------------------

# The pixel budgets of the shipped configs: default/h100/h200 (256..1280 tiles of 28x28),
# cpu-dev (64..256 tiles), and the smallest the processor allows (56x56..448x448).
BUDGETS = st.sampled_from(
    [(256 * 28 * 28, 1280 * 28 * 28), (64 * 28 * 28, 256 * 28 * 28), (56 * 56, 448 * 448)]
)


@st.composite
def seen_images(draw: st.DrawFn) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(original_size, model_size)``: a random image and the size Qwen resizes it to."""
    width = draw(st.integers(1, 6000))
    height = draw(st.integers(1, 6000))
    min_pixels, max_pixels = draw(BUDGETS)
    try:
        model_h, model_w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    except MediaError:
        assume(False)  # past 200:1, refused before any model sees it
        raise
    return (width, height), (model_w, model_h)


@st.composite
def spans(draw: st.DrawFn, side: int) -> tuple[int, int]:
    """``low < high`` on a side of ``side`` pixels, often thin, often at an edge."""
    low = draw(st.one_of(st.integers(0, side - 1), st.just(0), st.just(side - 1)))
    high = draw(
        st.one_of(st.integers(low + 1, side), st.just(low + 1), st.just(side), st.just(low + 2))
    )
    return low, min(high, side)


@st.composite
def model_boxes(draw: st.DrawFn) -> tuple[tuple[int, int], tuple[int, int], list[int]]:
    original, model = draw(seen_images())
    x1, x2 = draw(spans(model[0]))
    y1, y2 = draw(spans(model[1]))
    return original, model, [x1, y1, x2, y2]


@settings(max_examples=1000, deadline=None)
@given(case=model_boxes())
def test_model_to_wire_to_model_is_within_a_pixel(
    case: tuple[tuple[int, int], tuple[int, int], list[int]],
) -> None:
    original, model, corners = case
    wire = to_wire_box(corners, model, original)

    # the wire box is a real box inside the original image
    assert wire["width"] >= 1 and wire["height"] >= 1
    assert wire["x"] >= 0 and wire["x"] + wire["width"] <= original[0]
    assert wire["y"] >= 0 and wire["y"] + wire["height"] <= original[1]

    back = to_model_corners(wire, original, model)
    for axis, (start, end) in enumerate(((0, 2), (1, 3))):
        ratio = model[axis] / original[axis]  # model pixels per original pixel
        for i in (start, end):
            error = abs(back[i] - corners[i])
            if ratio <= 1.5:
                # every image the budget shrinks, or only rounds to the 28-px grid: 1 px
                assert error <= 1, (original, model, corners, wire, back)
            else:
                # an enlarged small image: the wire's integer original pixels are coarser than
                # the model's; half a pixel of each rounding, one original pixel for a sliver
                assert error <= max(1, math.floor(1.5 * ratio + 0.5)), (original, model, back)


@settings(max_examples=400, deadline=None)
@given(case=model_boxes())
def test_the_wire_box_of_an_image_the_budget_shrinks_is_exact_back(
    case: tuple[tuple[int, int], tuple[int, int], list[int]],
) -> None:
    # When the original has at least the model's pixels per side, the wire keeps every corner.
    original, model, corners = case
    assume(model[0] <= original[0] and model[1] <= original[1])
    wire = to_wire_box(corners, model, original)
    assert to_model_corners(wire, original, model) == corners
