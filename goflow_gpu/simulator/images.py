"""Pictures the simulator serves, and the bad bodies its media faults send instead.

Pictures are real JPEGs drawn with Pillow (shapes, lines and a word), deterministic from a key
string, with varied sizes and aspect ratios. The greyscale variant is the same picture in mode L.
:func:`labelled_scene` draws simpler pictures (flat shapes, one word) with their exact ground
truth, for evaluating prompts against known answers.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from dataclasses import dataclass

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


def encode(image: Image.Image, variant: Variant, png: bool = False) -> bytes:
    """JPEG bytes of ``image`` in ``variant`` (``greyscale`` converts to mode L); with ``png``
    PNG bytes instead: lossless, so a scene's flat colours stay exact."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants are {VARIANTS}")
    out = io.BytesIO()
    picture = image.convert("L") if variant == "greyscale" else image
    if png:
        picture.save(out, "PNG")
    else:
        picture.save(out, "JPEG", quality=85)
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


# --- labelled scenes -------------------------------------------------------------------------
# Flat shapes and one word on a plain background, with exact ground truth for evaluating
# prompts (goflow_gpu.evaluation). Nothing is anti-aliased: every pixel has a palette colour,
# and every box is the tight box around the pixels actually drawn.

SCENE_PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "black": (0, 0, 0),
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (245, 210, 20),
    "green": (30, 150, 60),
    "blue": (30, 80, 210),
    "purple": (130, 50, 170),
}
"""The colour names scenes use, and their exact RGB values."""
SCENE_KINDS: tuple[str, ...] = ("circle", "square", "triangle")
SCENE_WORDS: tuple[str, ...] = (
    "OPEN", "SALE", "EXIT", "CAFE", "PARK", "MENU", "STOP", "TAXI", "HOTEL", "BOOKS", "FRESH",
)  # fmt: skip
_SCENE_BACKGROUNDS: tuple[str, ...] = ("white", "white", "grey", "black")
SCENE_FILLS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
SCENE_MAX_SHAPES = 3
"""The most shapes a scene holds (:func:`labelled_scene`'s default ``count`` is 1 to this)."""
_SCENE_SIZES: tuple[tuple[int, int], ...] = ((512, 384), (384, 512), (448, 448), (512, 288))

# A 5x7 block font of our own: glyphs drawn as filled cells, so the text is identical with any
# Pillow or FreeType version and its box is known exactly.
_GLYPHS: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
}

Box = tuple[int, int, int, int]
"""``(x, y, width, height)`` in image pixels."""


@dataclass(frozen=True)
class SceneShape:
    """One shape of a labelled scene: ``kind`` in :data:`SCENE_KINDS`, a palette colour name."""

    kind: str
    colour: str
    box: Box


@dataclass(frozen=True)
class LabelledScene:
    """A scene picture and its exact ground truth (boxes tight around the drawn pixels)."""

    image: Image.Image
    background: str
    shapes: tuple[SceneShape, ...]
    word: str
    word_colour: str
    word_box: Box
    colour_shares: tuple[tuple[str, float], ...]
    """(palette name, share of the pixels), largest share first."""

    @property
    def dominant_colour(self) -> str:
        return self.colour_shares[0][0]


def labelled_scene(
    key: str, size: tuple[int, int] | None = None, count: tuple[int, int] = (1, SCENE_MAX_SHAPES)
) -> LabelledScene:
    """Draw the scene for ``key`` (same key, size and ``count``, same picture): between
    ``count[0]`` and ``count[1]`` separate shapes (fewer where no room is left) and one word
    in block letters on a plain background. ``size`` defaults to one of a few landscape,
    portrait and square sizes, chosen by the key.

    A shape's side is 30-45% of the picture's short side: at the trained tiny model's pixel
    budget (168x168, 28 px a visual token) that is 38-63 px, one and a half to two tokens.
    Shapes of 15-28% (the first design, up to four) were under one token: the model learned
    roughly where each was, but a 6 px miss on a 25 px box is IoU < 0.5, and one token rarely
    showed a circle from a square. Larger shapes leave room for fewer (three at most; the
    first one shrinks until it fits beside the word, so every scene has one).
    """
    rng = random.Random(f"scene:{key}")
    width, height = size if size is not None else rng.choice(_SCENE_SIZES)
    if min(width, height) < 96:
        raise ValueError(f"a scene needs at least 96 pixels a side, got {width}x{height}")
    background = rng.choice(_SCENE_BACKGROUNDS)
    image = Image.new("RGB", (width, height), SCENE_PALETTE[background])
    draw = ImageDraw.Draw(image)
    taken: list[Box] = []

    word = rng.choice(SCENE_WORDS)
    word_colour = "white" if background == "black" else "black"
    cell = max(2, min(width // (6 * len(word) + 8), min(width, height) // 40))
    word_w, word_h = (6 * len(word) - 1) * cell, 7 * cell
    margin = max(4, min(width, height) // 32)
    origin = (
        rng.randint(margin, width - margin - word_w),
        rng.randint(margin, height - margin - word_h),
    )
    word_box = _draw_word(draw, image.size, word, origin, cell, SCENE_PALETTE[word_colour])
    taken.append(word_box)

    shapes: list[SceneShape] = []
    short = min(width, height)
    for _ in range(rng.randint(*count)):
        side = rng.randint(short * 30 // 100, short * 45 // 100)
        kind, colour = rng.choice(SCENE_KINDS), rng.choice(SCENE_FILLS)
        spot = _free_spot(rng, (width, height), side, margin, taken)
        while spot is None and not shapes and side > short // 8:
            side = side * 9 // 10  # the first shape always gets a place, a smaller one
            spot = _free_spot(rng, (width, height), side, margin, taken)
        if spot is None:
            continue  # no room left: fewer shapes, still deterministic
        box = _draw_shape(draw, image.size, kind, (*spot, side), SCENE_PALETTE[colour])
        taken.append((*spot, side, side))
        shapes.append(SceneShape(kind=kind, colour=colour, box=box))
    if not shapes:  # pragma: no cover - an eighth of the short side always fits beside a word
        raise RuntimeError(f"no shape fits in the scene {key!r}")
    return LabelledScene(
        image=image,
        background=background,
        shapes=tuple(shapes),
        word=word,
        word_colour=word_colour,
        word_box=word_box,
        colour_shares=_colour_shares(image),
    )


def _free_spot(
    rng: random.Random, size: tuple[int, int], side: int, margin: int, taken: list[Box]
) -> tuple[int, int] | None:
    """A random top-left corner for a ``side`` square clear of ``taken`` (100 tries), or None."""
    width, height = size
    for _attempt in range(100):
        x = rng.randint(margin, width - margin - side)
        y = rng.randint(margin, height - margin - side)
        if not any(_near((x, y, side, side), other, margin) for other in taken):
            return x, y
    return None


def _near(a: Box, b: Box, gap: int) -> bool:
    """True when the boxes overlap or come closer than ``gap`` pixels."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw + gap and bx < ax + aw + gap and ay < by + bh + gap and by < ay + ah + gap


def _drawn_box(mask: Image.Image) -> Box:
    left, top, right, bottom = mask.getbbox() or (0, 0, 0, 0)
    return left, top, right - left, bottom - top


def _draw_word(
    draw: ImageDraw.ImageDraw,
    size: tuple[int, int],
    word: str,
    origin: tuple[int, int],
    cell: int,
    colour: tuple[int, int, int],
) -> Box:
    mask = Image.new("L", size, 0)
    marks = ImageDraw.Draw(mask)
    x0, y0 = origin
    for index, letter in enumerate(word):
        for row, line in enumerate(_GLYPHS[letter]):
            for col, mark in enumerate(line):
                if mark == "#":
                    left = x0 + (index * 6 + col) * cell
                    top = y0 + row * cell
                    cell_box = (left, top, left + cell - 1, top + cell - 1)
                    draw.rectangle(cell_box, fill=colour)
                    marks.rectangle(cell_box, fill=255)
    return _drawn_box(mask)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    size: tuple[int, int],
    kind: str,
    square: tuple[int, int, int],
    colour: tuple[int, int, int],
) -> Box:
    x, y, side = square
    corners = (x, y, x + side - 1, y + side - 1)
    mask = Image.new("L", size, 0)
    for target, fill in ((draw, colour), (ImageDraw.Draw(mask), 255)):
        if kind == "circle":
            target.ellipse(corners, fill=fill)
        elif kind == "square":
            target.rectangle(corners, fill=fill)
        else:  # an upright triangle with its base along the bottom side
            points = [(x, y + side - 1), (x + side - 1, y + side - 1), (x + (side - 1) / 2, y)]
            target.polygon(points, fill=fill)
    return _drawn_box(mask)


def _colour_shares(image: Image.Image) -> tuple[tuple[str, float], ...]:
    names: dict[object, str] = {rgb: name for name, rgb in SCENE_PALETTE.items()}
    total = image.width * image.height
    counts = image.getcolors(maxcolors=256)
    if counts is None or any(rgb not in names for _, rgb in counts):
        raise RuntimeError("a scene holds a colour outside the palette")  # pragma: no cover
    shares = [(names[rgb], count / total) for count, rgb in counts]
    return tuple(sorted(shares, key=lambda item: (-item[1], item[0])))
