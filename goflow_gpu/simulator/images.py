"""Pictures the simulator serves, and the bad bodies its media faults send instead.

Pictures are real JPEGs drawn with Pillow (shapes, lines and a word), deterministic from a key
string, with varied sizes and aspect ratios. The greyscale variant is the same picture in mode L.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib

from PIL import Image, ImageDraw, ImageFont

Variant = str  # "optimised" | "greyscale"
VARIANTS: tuple[str, ...] = ("optimised", "greyscale")

# width:height ratios, landscape and portrait, as cameras and phones produce them.
_ASPECTS: tuple[tuple[int, int], ...] = ((4, 3), (3, 2), (16, 9), (1, 1), (3, 4), (2, 3), (9, 16))
_WORDS: tuple[str, ...] = ("SALE", "EXIT", "CAFE", "OPEN", "GOFLOW", "PARK", "MENU", "HOTEL")

BOMB_SIDE = 20_000
"""Width and height of the decompression bomb: 400 million pixels in a few kilobytes."""
OVERSIZED_BYTES = 40 * 1024 * 1024
"""Length of the oversized body."""


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def picture_size(key: str, long_side: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of the picture for ``key``: long side within ``long_side``."""
    rng = random.Random(f"size:{key}")
    low, high = long_side
    side = rng.randint(low, high)
    aw, ah = rng.choice(_ASPECTS)
    if aw >= ah:
        return side, max(1, round(side * ah / aw))
    return max(1, round(side * aw / ah)), side


def render(key: str, long_side: tuple[int, int]) -> Image.Image:
    """Draw the RGB picture for ``key`` (same key, same picture)."""
    width, height = picture_size(key, long_side)
    rng = random.Random(f"draw:{key}")
    image = Image.new("RGB", (width, height), _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 9)):
        x0, x1 = sorted(rng.randrange(width) for _ in range(2))
        y0, y1 = sorted(rng.randrange(height) for _ in range(2))
        shape = rng.choice(("rectangle", "ellipse", "line"))
        if shape == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=_colour(rng), outline=_colour(rng))
        elif shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=_colour(rng))
        else:
            draw.line((x0, y0, x1, y1), fill=_colour(rng), width=rng.randint(2, 12))
    text = f"{rng.choice(_WORDS)} {rng.randint(1, 999)}"
    font = ImageFont.load_default(size=max(12, min(width, height) // 8))
    draw.text((width // 10, height // 2), text, fill=_colour(rng), font=font)
    return image


def encode(image: Image.Image, variant: Variant) -> bytes:
    """JPEG bytes of ``image`` in ``variant`` (``greyscale`` converts to mode L)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants are {VARIANTS}")
    out = io.BytesIO()
    (image.convert("L") if variant == "greyscale" else image).save(out, "JPEG", quality=85)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def bomb_png() -> bytes:
    """A valid PNG of ``BOMB_SIDE`` squared pixels of one colour, a few tens of kilobytes.

    Written chunk by chunk (1-bit palette, every row zero) so that making it never holds the
    decoded pixels in memory; decoding it would take hundreds of megabytes.
    """
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 1, 3, 0, 0, 0)
    row = bytes(1 + (BOMB_SIDE + 7) // 8)  # filter byte 0, then all pixels palette index 0
    packer = zlib.compressobj(9)
    parts = [packer.compress(row) for _ in range(BOMB_SIDE)]
    parts.append(packer.flush())
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"PLTE", bytes((200, 40, 40))),
            _png_chunk(b"IDAT", b"".join(parts)),
            _png_chunk(b"IEND", b""),
        )
    )


def corrupt(key: str) -> bytes:
    """Bytes that start like a JPEG but are noise: no decoder can read them."""
    rng = random.Random(f"corrupt:{key}")
    return b"\xff\xd8\xff\xe0" + bytes(rng.randrange(256) for _ in range(4096))


HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>Sign in</title></head>"
    b"<body><h1>Please sign in to view this image</h1></body></html>"
)
"""What a misconfigured CDN or login wall answers instead of an image."""
