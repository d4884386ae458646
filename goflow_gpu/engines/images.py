"""Image helpers shared by the engines: loading with mapped errors, and Qwen2-VL's resize rule.

Qwen2-VL / Qwen2.5-VL resize every image so both sides are multiples of 28 px (14 px patches,
merged 2 x 2 into one visual token) and the pixel count lies within ``[min_pixels,
max_pixels]``, keeping the aspect ratio as closely as that allows. :func:`smart_resize` states
that rule, so an engine can tell the caller what size the model saw without running the
processor (QA maps model-space boxes back with it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from goflow_gpu.errors import MediaError

if TYPE_CHECKING:
    from PIL import Image

#: one visual token covers a square of this many pixels per side (14 px patch x 2 x 2 merge)
QWEN_FACTOR = 28
_MAX_ASPECT = 200


def load_image(path: Path) -> Image.Image:
    """Open ``path`` as an RGB PIL image, fully decoded.

    Raises :class:`MediaError` naming the file when it is missing or not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise MediaError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"image file {path} is not a readable image: {exc}") from None


def smart_resize(
    width: int,
    height: int,
    *,
    min_pixels: int,
    max_pixels: int,
    factor: int = QWEN_FACTOR,
) -> tuple[int, int]:
    """The (width, height) Qwen2-VL's processor resizes a ``width`` x ``height`` image to.

    Both sides become multiples of ``factor``; the area is brought into ``[min_pixels,
    max_pixels]`` by scaling both sides by the same factor (rounded down when shrinking, up
    when growing). Raises ``ValueError`` for an empty image or an aspect ratio over 200.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(width, height) / min(width, height) > _MAX_ASPECT:
        raise ValueError(f"aspect ratio of {width}x{height} is over {_MAX_ASPECT}")
    w = round(width / factor) * factor
    h = round(height / factor) * factor
    if w * h > max_pixels:
        scale = math.sqrt(width * height / max_pixels)
        w = max(factor, math.floor(width / scale / factor) * factor)
        h = max(factor, math.floor(height / scale / factor) * factor)
    elif w * h < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        w = math.ceil(width * scale / factor) * factor
        h = math.ceil(height * scale / factor) * factor
    return w, h


def visual_tokens(width: int, height: int, *, factor: int = QWEN_FACTOR) -> int:
    """How many visual tokens an already resized ``width`` x ``height`` image becomes."""
    return (width // factor) * (height // factor)
