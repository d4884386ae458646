"""Image geometry of Qwen2.5-VL: the size the model sees, and boxes back to original pixels.

Qwen2.5-VL's processor resizes every image so that both sides are multiples of ``factor`` (the
14-pixel patch times the 2x2 merge = 28) and the pixel count lies in ``[min_pixels,
max_pixels]``, keeping the aspect ratio as well as the rounding allows. The model answers box
coordinates in the pixel space of that resized image: Qwen's grounding format ``bbox_2d``
``[x1, y1, x2, y2]``, the top-left and bottom-right corners. QA checks them there and converts
them with :func:`to_wire_box` to the backend's ``{x, y, width, height}`` in the original media's
pixels; :func:`to_model_corners` is the way back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from goflow_gpu.errors import MediaError

IMAGE_FACTOR = 28
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200
#: The key the backend reads a box under: ``{x, y, width, height}`` in original pixels.
WIRE_BOX_KEY = "bounding_box"
WIRE_POINT_KEY = "point"
WIRE_POINTS_KEY = "points"


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """The ``(height, width)`` the Qwen2.5-VL processor resizes an image to.

    Rule: round each side to the nearest multiple of ``factor``; if the area is then above
    ``max_pixels``, scale both sides down by ``sqrt(area / max_pixels)`` and round down to
    multiples of ``factor``; if below ``min_pixels``, scale up by ``sqrt(min_pixels / area)``
    and round up. Raises :class:`MediaError` for empty images and extreme aspect ratios.
    """
    if height <= 0 or width <= 0:
        raise MediaError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(
            f"image aspect ratio of {width}x{height} is above {MAX_ASPECT_RATIO}:1, "
            "which Qwen2.5-VL refuses"
        )
    new_h = max(factor, _round_half_even_to(height, factor))
    new_w = max(factor, _round_half_even_to(width, factor))
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


def _round_half_even_to(value: int, factor: int) -> int:
    # Python's round() (half to even) is what the reference processor uses; keep it for parity.
    return round(value / factor) * factor


def to_wire_box(
    corners: Sequence[float], model_size: tuple[int, int], original_size: tuple[int, int]
) -> dict[str, int]:
    """Model-space corners ``[x1, y1, x2, y2]`` -> the wire's ``{x, y, width, height}``.

    ``corners`` are the top-left and bottom-right corners in pixels of the image the model saw
    (Qwen2.5-VL's ``bbox_2d``), with ``x1 < x2`` and ``y1 < y2``; the result is in the original
    image's pixels. Sizes are ``(width, height)``. Each corner is clamped to the model image,
    scaled and rounded half up; width and height are taken between the rounded corners, so
    adjacent boxes stay adjacent. The result covers at least one pixel each way and lies inside
    the original image.
    """
    return _scale_box(corners, model_size, original_size, "model")


def to_wire_point(
    point: Sequence[float], model_size: tuple[int, int], original_size: tuple[int, int]
) -> dict[str, int]:
    """A model-space point ``[x, y]`` (Qwen2.5-VL's ``point_2d``) -> the wire's ``{x, y}`` in
    the original image's pixels: clamped to the model image, scaled, rounded half up, and kept
    inside the original image (a point on the far edge lands on its last pixel)."""
    (from_w, from_h), (to_w, to_h) = model_size, original_size
    if min(from_w, from_h, to_w, to_h) <= 0:
        raise ValueError(f"image sizes must be positive, got {model_size} and {original_size}")
    x = _scaled(min(max(point[0], 0), from_w), from_w, to_w)
    y = _scaled(min(max(point[1], 0), from_h), from_h, to_h)
    return {"x": min(x, to_w - 1), "y": min(y, to_h - 1)}


def to_model_corners(
    box: dict[str, Any], original_size: tuple[int, int], model_size: tuple[int, int]
) -> list[int]:
    """The wire's ``{x, y, width, height}`` (original pixels) -> model-space ``[x1, y1, x2, y2]``.

    The inverse of :func:`to_wire_box` up to rounding: one pixel of the coarser of the two
    images. Same rules: clamped to the image, at least one pixel each way.
    """
    corners = (box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"])
    wire = _scale_box(corners, original_size, model_size, "original")
    return [wire["x"], wire["y"], wire["x"] + wire["width"], wire["y"] + wire["height"]]


def _scale_box(
    corners: Sequence[float], from_size: tuple[int, int], to_size: tuple[int, int], name: str
) -> dict[str, int]:
    from_w, from_h = from_size
    to_w, to_h = to_size
    if min(from_w, from_h, to_w, to_h) <= 0:
        raise ValueError(f"image sizes must be positive, got {from_size} and {to_size}")
    x1, y1, x2, y2 = corners
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"{name} box {list(corners)} needs x1 < x2 and y1 < y2")
    left, right = _scale_span(x1, x2, from_w, to_w)
    top, bottom = _scale_span(y1, y2, from_h, to_h)
    return {"x": left, "y": top, "width": right - left, "height": bottom - top}


def _scale_span(low: float, high: float, from_side: int, to_side: int) -> tuple[int, int]:
    """``[low, high]`` on a side of ``from_side`` pixels, on a side of ``to_side`` pixels."""
    start = _scaled(min(max(low, 0), from_side), from_side, to_side)
    end = _scaled(min(max(high, 0), from_side), from_side, to_side)
    # At least one pixel, inside the side: a sliver that rounds to nothing keeps one pixel.
    end = min(max(end, start + 1), to_side)
    start = min(start, end - 1)
    return start, end


def _scaled(value: float, from_side: int, to_side: int) -> int:
    """``value * to_side / from_side`` rounded half up; exact for integers (no float ties)."""
    if isinstance(value, int):
        return (2 * value * to_side + from_side) // (2 * from_side)
    return math.floor(value * to_side / from_side + 0.5)


def iou(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Intersection over union of two ``{x, y, width, height}`` boxes (0 when both are empty).

    QA uses it to tell the same detection listed twice; the evaluation to match predicted boxes
    with labelled ones."""
    ax1, ay1, aw, ah = (float(a[k]) for k in ("x", "y", "width", "height"))
    bx1, by1, bw, bh = (float(b[k]) for k in ("x", "y", "width", "height"))
    inter_w = max(0.0, min(ax1 + aw, bx1 + bw) - max(ax1, bx1))
    inter_h = max(0.0, min(ay1 + ah, by1 + bh) - max(ay1, by1))
    inter = inter_w * inter_h
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0
