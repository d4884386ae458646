"""Image helpers shared by the engines: loading with mapped errors, visual token counts.

The resize rule itself (what size the model sees) is
:func:`goflow_gpu.prompts.geometry.smart_resize`, shared with QA's box conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from goflow_gpu.errors import MediaError

if TYPE_CHECKING:
    from PIL import Image

#: one visual token covers a square of this many pixels per side (14 px patch x 2 x 2 merge)
QWEN_FACTOR = 28


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


def visual_tokens(width: int, height: int, *, factor: int = QWEN_FACTOR) -> int:
    """How many visual tokens an already resized ``width`` x ``height`` image becomes."""
    return (width // factor) * (height // factor)
