"""Image geometry of Qwen2.5-VL: the size the model sees, and boxes back to original pixels.

Qwen2.5-VL's processor resizes every image so that both sides are multiples of ``factor`` (the
14-pixel patch times the 2x2 merge = 28) and the pixel count lies in ``[min_pixels,
max_pixels]``, keeping the aspect ratio as well as the rounding allows. The model answers box
coordinates in the pixel space of that resized image, so QA converts them to the original
media's pixels before checking and reporting.
"""

from __future__ import annotations

import math
from typing import Any

from goflow_gpu.errors import MediaError

IMAGE_FACTOR = 28
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


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


def to_original_box(
    box: dict[str, Any], model_size: tuple[int, int], original_size: tuple[int, int]
) -> dict[str, int]:
    """Map ``box`` ``{x, y, width, height}`` from model pixels to original pixels.

    Sizes are ``(width, height)``. The corners are scaled and rounded, and width and height are
    taken between the rounded corners, so adjacent boxes stay adjacent after conversion.
    """
    model_w, model_h = model_size
    orig_w, orig_h = original_size
    if model_w <= 0 or model_h <= 0:
        raise ValueError(f"model image size must be positive, got {model_w}x{model_h}")
    sx = orig_w / model_w
    sy = orig_h / model_h
    left = _round_half_up(box["x"] * sx)
    top = _round_half_up(box["y"] * sy)
    right = _round_half_up((box["x"] + box["width"]) * sx)
    bottom = _round_half_up((box["y"] + box["height"]) * sy)
    return {"x": left, "y": top, "width": right - left, "height": bottom - top}


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)
