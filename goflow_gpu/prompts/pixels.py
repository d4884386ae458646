"""Facts about an image computed from its pixels, merged into the result next to the model's.

Why computed and not asked: Qwen2.5-VL sees a copy resized to about one megapixel and answers in
words, so it cannot know the file's resolution, and its estimates of colour shares, blur,
brightness or contrast are guesses that change with the wording of a prompt. Each of these is a
few milliseconds of arithmetic on the decoded pixels, exact and repeatable, so the worker
computes them in code and the model is left the judgements only it can make.

How the pixels are prepared (:func:`load_pixels`): the file is decoded once with Pillow; a JPEG
is decoded at a reduced DCT scale (``Image.draft``) that still leaves a long side of at least
:data:`WORK_SIDE`. Every mode is brought to 8-bit sRGB: transparency is composited on white,
greyscale is repeated over the three channels, CMYK goes through Pillow's conversion (no ICC
colour management), 16-bit samples are scaled to 8 bits. The original size is kept for
``resolution`` and ``orientation``; everything else runs on a working copy resized (Lanczos) to
a long side of at most :data:`WORK_SIDE` (a smaller image is not enlarged), so a value does not
depend on how many megapixels the file has. Pixel sizes are the stored ones: the EXIF
orientation tag is not applied, the same as for the image the model sees and the boxes it
answers.

The methods:

* ``palette``: up to :data:`PALETTE_SAMPLE` pixels of the working copy, taken on a regular
  grid and grouped in bins of 16 levels a channel (each bin at the mean colour of its pixels,
  weighted by their count), are converted to CIELAB (sRGB gamma removed, D65 white), where the
  Euclidean distance (CIE76 delta E) follows perceived difference. Weighted k-means (k-means++
  start from a numpy Generator with a fixed seed, so the same image always gives the same
  palette) finds up to :data:`KMEANS_K` clusters; then clusters closer than
  :data:`MERGE_DELTA_E` are merged, and clusters under :data:`MIN_SHARE` of the pixels (or
  beyond :data:`MAX_COLOURS`) are dropped, their pixels going to the nearest remaining cluster,
  re-running k-means after each change. Each colour is the cluster's mean in Lab converted back
  to sRGB, named by the nearest anchor of :data:`NAMED_COLOURS`; shares are whole percentages
  summing to exactly 100 (largest-remainder rounding).
* ``brightness`` and ``contrast``: the Rec. 709 luma ``Y' = 0.2126 R' + 0.7152 G' + 0.0722 B'``
  of the gamma-encoded sRGB values (as photo tools report it, not linear luminance), on a
  0-100 scale; brightness is its mean, contrast its standard deviation (RMS contrast, at most
  50, for an image half black and half white).
* ``sharpness``: the variance of the 4-neighbour Laplacian of the luma (0-255) of the working
  copy. Blur finer than the working size (a few pixels of a 24 MP photo) is invisible there by
  design: the score rates the detail a viewer sees at screen size.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

FloatArray = npt.NDArray[np.float64]

#: Long side of the working copy every fact but ``resolution`` and ``orientation`` runs on.
WORK_SIDE: Final = 512
#: At most this many pixels of the working copy (a regular grid) go into the palette clustering.
PALETTE_SAMPLE: Final = 10_000
#: Sample pixels are binned by their top 8 - PALETTE_BIN_BITS bits a channel before clustering.
PALETTE_BIN_BITS: Final = 4
#: Clusters k-means starts from; the merging and dropping below leave at most MAX_COLOURS.
KMEANS_K: Final = 8
#: Most Lloyd iterations per k-means run (they converge in about 5 to 20).
KMEANS_ITERATIONS: Final = 30
#: k-means has converged when no centre moved more than this (delta E) in an iteration.
KMEANS_TOLERANCE: Final = 0.01
KMEANS_SEED: Final = 0
#: Most colours a palette lists.
MAX_COLOURS: Final = 5
#: Clusters with less than this fraction of the pixels are dropped (pixels go to the nearest).
MIN_SHARE: Final = 0.03
#: Clusters closer than this (CIE76 delta E in Lab) are one colour.
MERGE_DELTA_E: Final = 10.0
#: Two sides differing by less than this fraction of the longer one make a square image.
SQUARE_TOLERANCE: Final = 0.05
#: Laplacian variance (luma 0-255, working copy) below which an image is blurry, then soft.
#: Measured: crisp photos and graphics score about 800 to 10,000; a Gaussian blur of 1 working
#: pixel brings them to about 70-230 (soft), of 2 pixels to about 10-25, and a 4x upscale
#: (a small image enlarged) to about 50.
BLURRY_BELOW: Final = 50.0
SOFT_BELOW: Final = 200.0
#: Mean luma (0-100) below which an image is dark, above which it is bright.
DARK_BELOW: Final = 30
BRIGHT_ABOVE: Final = 70
#: RMS contrast (std of luma, 0-100 scale, at most 50) below which contrast is low, above high.
LOW_CONTRAST_BELOW: Final = 10
HIGH_CONTRAST_ABOVE: Final = 30

#: The plain colour names a palette entry can get, each with the sRGB colours (anchors) it
#: stands for: a colour gets the name of its nearest anchor by delta E in Lab. Fixed, so a name
#: means the same on every image. Lab distances from pure primaries are large (pure blue is far
#: from the mid blues of a sky or a shirt), so several names carry the everyday shades too;
#: the first anchor is the name's swatch.
NAMED_COLOURS: Final[dict[str, tuple[str, ...]]] = {
    "black": ("#000000",),
    "dark grey": ("#404040",),
    "grey": ("#808080", "#708090"),
    "light grey": ("#c0c0c0",),
    "white": ("#ffffff",),
    "red": ("#ff0000", "#d82020"),
    "dark red": ("#b00000",),
    "maroon": ("#800000",),
    "coral": ("#ff7f50", "#fa8072"),
    "orange": ("#ff8000", "#f09030"),
    "peach": ("#ffcba4",),
    "pink": ("#ffc0cb", "#ff69b4", "#e8a0b0"),
    "magenta": ("#ff00ff",),
    "purple": ("#800080", "#8040b0", "#4b0082"),
    "lavender": ("#c8b4e6", "#b090d8"),
    "navy blue": ("#000080", "#1c2454", "#191970"),
    "blue": ("#0000ff", "#3c3cc8", "#1e5adc", "#2080f0", "#4682b4", "#2a5f8a"),
    "light blue": ("#add8e6", "#87ceeb", "#80b4f0"),
    "cyan": ("#00ffff",),
    "turquoise": ("#40e0d0",),
    "teal": ("#008080",),
    "dark green": ("#005000", "#2a5020"),
    "green": ("#00a000", "#228b22", "#2e8b57", "#50a850"),
    "light green": ("#90ee90", "#a8c878"),
    "lime": ("#00ff00", "#a0d020"),
    "olive": ("#808000", "#6b8e23", "#556b2f"),
    "yellow": ("#ffff00", "#fff080"),
    "gold": ("#ffd700", "#e0b020"),
    "brown": ("#8b4513", "#a0522d", "#b86847"),
    "dark brown": ("#4a2c17",),
    "tan": ("#d2b48c", "#e0ac69"),
    "beige": ("#eedfc0", "#f5deb3", "#e0c8b8"),
}

# sRGB (linear) -> CIE XYZ, D65 white. The white point is the matrix's row sums, so sRGB white
# maps to a = b = 0 exactly.
_RGB_TO_XYZ: Final = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_XYZ_TO_RGB: Final = np.linalg.inv(_RGB_TO_XYZ)
_WHITE: Final = _RGB_TO_XYZ.sum(axis=1)
_LAB_DELTA: Final = 6.0 / 29.0
_LUMA: Final = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


class Pixels:
    """One decoded image, prepared once for every fact.

    ``original_size`` is ``(width, height)`` of the file; ``rgb`` the working copy, an
    ``(h, w, 3)`` uint8 array in sRGB with a long side of at most :data:`WORK_SIDE`. The luma
    and the palette sample are derived on first use.
    """

    def __init__(self, rgb: npt.NDArray[np.uint8], original_size: tuple[int, int]) -> None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.size == 0:
            raise ValueError(f"expected a non-empty (h, w, 3) uint8 array, got {rgb.shape}")
        self.rgb = rgb
        self.original_size = original_size

    @classmethod
    def from_image(cls, img: Image.Image, original_size: tuple[int, int] | None = None) -> Pixels:
        """Prepare a decoded Pillow image; ``original_size`` defaults to ``img.size``.

        Pass the file's size when ``img`` was decoded at a reduced scale.
        """
        size = original_size if original_size is not None else img.size
        rgb = _to_rgb(img)
        if max(rgb.size) > WORK_SIDE:
            scale = WORK_SIDE / max(rgb.size)
            target = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=1.0)
        return cls(np.asarray(rgb, dtype=np.uint8), size)

    @cached_property
    def luma(self) -> npt.NDArray[np.float32]:
        """Rec. 709 luma of the gamma-encoded working copy, ``(h, w)`` float32 in 0-255."""
        return self.rgb.astype(np.float32) @ _LUMA

    @cached_property
    def palette_sample(self) -> npt.NDArray[np.uint8]:
        """At most :data:`PALETTE_SAMPLE` pixels of the working copy, ``(n, 3)``, on a grid."""
        height, width = self.rgb.shape[:2]
        scale = min(1.0, math.sqrt(PALETTE_SAMPLE / (height * width)))
        rows = _grid(height, max(1, math.floor(height * scale)))
        cols = _grid(width, max(1, math.floor(width * scale)))
        return self.rgb[rows][:, cols].reshape(-1, 3)


def _grid(size: int, count: int) -> npt.NDArray[np.intp]:
    """``count`` indices spread evenly over ``range(size)``, each at the centre of its cell."""
    return ((np.arange(count) + 0.5) * (size / count)).astype(np.intp)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency is composited on white."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        img = _wide_grey_to_l(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """16-bit or 32-bit greyscale to 8-bit.

    16-bit modes are scaled by 1/257 (65535 -> 255); the 32-bit ones ("I", "F") carry no bit
    depth, so they are scaled the same only when a value exceeds 8 bits.
    """
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (values.size and float(values.max()) > 255.0):
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def load_pixels(path: Path) -> Pixels:
    """Decode ``path`` once into :class:`Pixels`.

    Raises ValueError naming the path when the file is missing or cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            original = img.size
            if img.format == "JPEG":
                # Decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the long side at
                # least WORK_SIDE: draft never goes below the requested size on either side.
                scale = min(1.0, WORK_SIDE / max(original))
                img.draft("RGB", (math.ceil(original[0] * scale), math.ceil(original[1] * scale)))
            img.load()
            return Pixels.from_image(img, original)
    except FileNotFoundError:
        raise ValueError(f"image file {path} does not exist") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image file {path} refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ValueError(f"image file {path} is not a decodable image") from None
    except Exception as exc:  # noqa: BLE001 - a decoder fed hostile bytes may raise anything
        raise ValueError(f"image file {path} is corrupt or cannot be decoded: {exc}") from None


# --- colour spaces -------------------------------------------------------------------------


def srgb_to_lab(rgb: npt.ArrayLike) -> FloatArray:
    """sRGB in 0-255 (``(..., 3)``) to CIELAB (D65): gamma removed, then XYZ, then Lab."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > _LAB_DELTA**3, np.cbrt(xyz), xyz / (3 * _LAB_DELTA**2) + 4.0 / 29.0)
    lightness = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([lightness, a, b], axis=-1)


def lab_to_srgb(lab: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """CIELAB (D65, ``(..., 3)``) to sRGB 0-255, clipped to the gamut and rounded."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = np.where(f > _LAB_DELTA, f**3, 3 * _LAB_DELTA**2 * (f - 4.0 / 29.0)) * _WHITE
    linear = np.clip(xyz @ _XYZ_TO_RGB.T, 0.0, 1.0)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.clip(np.rint(c * 255.0), 0, 255).astype(np.uint8)


def _hex_to_rgb(value: str) -> tuple[int, int, int]:
    return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)


_ANCHOR_NAMES: Final = tuple(name for name, hexes in NAMED_COLOURS.items() for _ in hexes)
_ANCHOR_LAB: Final = srgb_to_lab(
    [_hex_to_rgb(h) for hexes in NAMED_COLOURS.values() for h in hexes]
)


def colour_name(lab: npt.ArrayLike) -> str:
    """The name in :data:`NAMED_COLOURS` whose anchor is nearest (CIE76 delta E) to ``lab``."""
    distances = np.linalg.norm(_ANCHOR_LAB - np.asarray(lab, dtype=np.float64), axis=1)
    return _ANCHOR_NAMES[int(np.argmin(distances))]


# --- palette -------------------------------------------------------------------------------


def _kmeans_pp(points: FloatArray, weights: FloatArray, k: int) -> FloatArray:
    """k-means++ start over weighted points, from a Generator with a fixed seed."""
    rng = np.random.default_rng(KMEANS_SEED)
    centres = [points[rng.choice(len(points), p=weights / weights.sum())]]
    nearest = ((points - centres[0]) ** 2).sum(axis=1)
    while len(centres) < k:
        mass = weights * nearest
        total = mass.sum()
        if total <= 0.0:  # fewer distinct colours than k
            break
        centres.append(points[rng.choice(len(points), p=mass / total)])
        nearest = np.minimum(nearest, ((points - centres[-1]) ** 2).sum(axis=1))
    return np.array(centres)


def _weighted_bincount(
    labels: npt.NDArray[np.intp], weights: npt.NDArray[Any], size: int
) -> FloatArray:
    """The sum of ``weights`` per label ``0 .. size - 1``."""
    return np.asarray(np.bincount(labels, weights=weights, minlength=size), dtype=np.float64)


def _lloyd(
    points: FloatArray, weights: FloatArray, centres: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Weighted Lloyd iterations; returns the non-empty clusters' means and weights."""
    norms = (points**2).sum(axis=1)[:, None]
    weighted = (weights[:, None] * points).ravel()
    channels = np.arange(3)
    counts = np.zeros(len(centres))
    for _ in range(KMEANS_ITERATIONS):
        k = len(centres)
        distances = norms - 2.0 * points @ centres.T + (centres**2).sum(axis=1)[None, :]
        labels = distances.argmin(axis=1)
        totals = _weighted_bincount(labels, weights, k)
        slots = (labels[:, None] * 3 + channels).ravel()
        sums = _weighted_bincount(slots, weighted, 3 * k).reshape(k, 3)
        keep = totals > 0
        means = sums[keep] / totals[keep, None]
        counts = totals[keep]
        converged = len(means) == k and float(np.abs(means - centres).max()) < KMEANS_TOLERANCE
        centres = means
        if converged:
            break
    return centres, counts


def _cluster(points: FloatArray, weights: FloatArray) -> tuple[FloatArray, FloatArray]:
    """k-means, then merge near-identical clusters and drop small ones until none is left."""
    centres = _kmeans_pp(points, weights, min(KMEANS_K, len(points)))
    total = weights.sum()
    while True:
        centres, counts = _lloyd(points, weights, centres)
        if len(centres) == 1:
            return centres, counts
        gaps = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=2)
        np.fill_diagonal(gaps, np.inf)
        i, j = np.unravel_index(int(np.argmin(gaps)), gaps.shape)
        if gaps[i, j] < MERGE_DELTA_E:
            merged = (centres[i] * counts[i] + centres[j] * counts[j]) / (counts[i] + counts[j])
            centres = np.vstack([np.delete(centres, [i, j], axis=0), merged])
            continue
        smallest = int(np.argmin(counts))
        if counts[smallest] < MIN_SHARE * total or len(centres) > MAX_COLOURS:
            centres = np.delete(centres, smallest, axis=0)
            continue
        return centres, counts


def largest_remainder(weights: Iterable[float], total: int = 100) -> list[int]:
    """Whole shares of ``total`` proportional to ``weights``, summing to ``total`` exactly.

    Each gets the floor of its exact share; the units left go one each to the largest
    remainders (ties to the earlier weight).
    """
    values = [float(w) for w in weights]
    whole = sum(values)
    exact = [w * total / whole for w in values]
    shares = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _palette(pixels: Pixels) -> list[dict[str, Any]]:
    # Cluster bins of 16 sRGB levels a channel, each at the mean colour of its pixels, weighted
    # by their count: far fewer points than pixels (a photo's 10,000 become ~1,000), same means.
    sample = pixels.palette_sample.astype(np.int64)
    bins = sample >> PALETTE_BIN_BITS
    keys = (bins[:, 0] << 16) | (bins[:, 1] << 8) | bins[:, 2]
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    channels = [_weighted_bincount(inverse, sample[:, c], len(counts)) for c in range(3)]
    colours = np.stack(channels, axis=1) / counts[:, None]
    centres, weights = _cluster(srgb_to_lab(colours), counts.astype(np.float64))
    # Largest first; equal weights by Lab so the order never depends on k-means' labels.
    order = sorted(range(len(centres)), key=lambda i: (-weights[i], *centres[i].tolist()))
    shares = largest_remainder(weights[i] for i in order)
    palette = []
    for i, share in zip(order, shares, strict=True):
        r, g, b = (int(v) for v in lab_to_srgb(centres[i]))
        palette.append(
            {"hex": f"#{r:02x}{g:02x}{b:02x}", "name": colour_name(centres[i]), "share": share}
        )
    return palette


# --- the other facts -----------------------------------------------------------------------


def _orientation(pixels: Pixels) -> str:
    width, height = pixels.original_size
    if abs(width - height) < SQUARE_TOLERANCE * max(width, height):
        return "square"
    return "landscape" if width > height else "portrait"


def _resolution(pixels: Pixels) -> dict[str, Any]:
    width, height = pixels.original_size
    return {"width": width, "height": height, "megapixels": round(width * height / 1e6, 2)}


def laplacian_variance(luma: npt.NDArray[np.floating[Any]]) -> float:
    """Variance of the 4-neighbour Laplacian over the interior of a 2-D array (0 if too small)."""
    if luma.shape[0] < 3 or luma.shape[1] < 3:
        return 0.0
    centre = luma[1:-1, 1:-1].astype(np.float64)
    laplacian = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * centre
    return float(laplacian.var())


def _sharpness(pixels: Pixels) -> dict[str, Any]:
    score = laplacian_variance(pixels.luma)
    if score < BLURRY_BELOW:
        level = "blurry"
    elif score < SOFT_BELOW:
        level = "soft"
    else:
        level = "sharp"
    return {"level": level, "score": round(score, 1)}


def _brightness(pixels: Pixels) -> dict[str, Any]:
    mean = round(float(pixels.luma.mean(dtype=np.float64)) / 255.0 * 100.0)
    level = "dark" if mean < DARK_BELOW else "bright" if mean > BRIGHT_ABOVE else "balanced"
    return {"level": level, "mean": mean}


def _contrast(pixels: Pixels) -> dict[str, Any]:
    rms = round(float(pixels.luma.std(dtype=np.float64)) / 255.0 * 100.0)
    if rms < LOW_CONTRAST_BELOW:
        level = "low"
    elif rms > HIGH_CONTRAST_ABOVE:
        level = "high"
    else:
        level = "normal"
    return {"level": level, "rms": rms}


# --- the registry --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One computed fact: its name, its meaning for customers, its JSON schema and code."""

    name: str
    #: One customer-facing sentence: what the value means and how it is computed.
    description: str
    json_schema: dict[str, Any]
    compute: Callable[[Pixels], Any]


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _level(*levels: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(levels)}


def _percent(maximum: int = 100) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "maximum": maximum}


_FACT_LIST: Final = (
    Fact(
        "palette",
        "The image's 1 to 5 dominant colours, largest first, each with its share of the "
        "pixels in whole percent summing to 100 and the nearest plain colour name, found by "
        "k-means clustering in the CIELAB colour space.",
        {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_COLOURS,
            "items": _object(
                {
                    "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
                    "name": {"type": "string", "enum": list(NAMED_COLOURS)},
                    "share": {"type": "integer", "minimum": 1, "maximum": 100},
                }
            ),
        },
        _palette,
    ),
    Fact(
        "orientation",
        "Landscape, portrait or square (sides within "
        f"{round(SQUARE_TOLERANCE * 100)} % of each other) from the original pixel size.",
        _level("landscape", "portrait", "square"),
        _orientation,
    ),
    Fact(
        "resolution",
        "Width and height of the original image in pixels, and its megapixels to 2 decimals.",
        _object(
            {
                "width": {"type": "integer", "minimum": 1},
                "height": {"type": "integer", "minimum": 1},
                "megapixels": {"type": "number", "minimum": 0},
            }
        ),
        _resolution,
    ),
    Fact(
        "sharpness",
        "How much fine detail the image shows at screen size: the variance of the Laplacian "
        f"of its greyscale copy at {WORK_SIDE} px on the long side (blurry under "
        f"{BLURRY_BELOW:g}, soft under {SOFT_BELOW:g}, sharp above).",
        _object(
            {
                "level": _level("sharp", "soft", "blurry"),
                "score": {"type": "number", "minimum": 0},
            }
        ),
        _sharpness,
    ),
    Fact(
        "brightness",
        "Mean Rec. 709 luma of the gamma-encoded pixels from 0 (black) to 100 (white); dark "
        f"under {DARK_BELOW}, bright over {BRIGHT_ABOVE}.",
        _object({"level": _level("dark", "balanced", "bright"), "mean": _percent()}),
        _brightness,
    ),
    Fact(
        "contrast",
        "RMS contrast: the standard deviation of the luma on its 0-100 scale, from 0 (one flat "
        f"tone) to 50 (half black, half white); low under {LOW_CONTRAST_BELOW}, high over "
        f"{HIGH_CONTRAST_ABOVE}.",
        _object({"level": _level("low", "normal", "high"), "rms": _percent(50)}),
        _contrast,
    ),
)

#: Every computed fact by name.
FACTS: Final[dict[str, Fact]] = {fact.name: fact for fact in _FACT_LIST}


def compute_facts(path: Path, names: Iterable[str]) -> dict[str, Any]:
    """Decode ``path`` once and compute the named facts: ``{name: value}`` in the given order.

    Raises ValueError for an unknown name (listing the known ones) before reading the file,
    and for a file that cannot be decoded (naming it).
    """
    wanted = list(dict.fromkeys(names))
    unknown = [name for name in wanted if name not in FACTS]
    if unknown:
        raise ValueError(
            f"unknown computed fact(s) {', '.join(map(repr, unknown))}; known: {', '.join(FACTS)}"
        )
    if not wanted:
        return {}
    pixels = load_pixels(path)
    return {name: FACTS[name].compute(pixels) for name in wanted}


class FactCache:
    """The pixel facts of image files, each fact computed once per file.

    The worker asks from the event loop (:meth:`cached` first, then :meth:`get` in a thread,
    so a hit costs no thread hop), the evaluation directly. ``max_images`` bounds what is kept
    (``None``: everything): a job works media-major, so only its last few images are asked
    again. Thread-safe.
    """

    def __init__(self, max_images: int | None = 64) -> None:
        self.max_images = max_images
        self._facts: OrderedDict[Path, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, path: Path, names: Iterable[str]) -> dict[str, Any] | None:
        """The facts of ``path`` when every one of ``names`` is known already, else None."""
        with self._lock:
            known = self._facts.get(path)
            if known is None or not set(names) <= set(known):
                return None
            self._facts.move_to_end(path)
            return known

    def get(self, path: Path, names: Iterable[str]) -> dict[str, Any]:
        """The facts of ``path`` including ``names``, computing the missing ones."""
        wanted = set(names)
        with self._lock:
            known = dict(self._facts.get(path, {}))
        missing = sorted(wanted - set(known))
        if missing:
            known.update(compute_facts(path, missing))
        with self._lock:
            self._facts[path] = {**self._facts.get(path, {}), **known}
            self._facts.move_to_end(path)
            while self.max_images is not None and len(self._facts) > self.max_images:
                self._facts.popitem(last=False)
            return self._facts[path]
