"""The analysis types the simulator offers, and how a job's analysis list is drawn from them."""

from __future__ import annotations

ANALYSIS_TYPES: tuple[tuple[str, str], ...] = (
    ("object-detection", "Object Detection"),
    ("text-recognition", "Text Recognition"),
    ("image-description", "Image Description"),
    ("scene-classification", "Scene Classification"),
    ("tags-keywords", "Tags and Keywords"),
    ("people-count", "People Count"),
    ("logo-detection", "Logo Detection"),
    ("product-detection", "Product Detection"),
    ("colour-palette", "Colour Palette"),
    ("image-quality", "Image Quality"),
    ("composition", "Composition"),
    ("content-safety", "Content Safety"),
    ("alt-text", "Alt Text"),
    ("text-legibility", "Text Legibility"),
    ("focal-point", "Focal Point"),
    ("setting", "Setting"),
    ("animal-detection", "Animal Detection"),
    ("vehicle-detection", "Vehicle Detection"),
    ("food-recognition", "Food Recognition"),
    ("landmark-recognition", "Landmark Recognition"),
    ("document-type", "Document Type"),
    ("copy-space", "Copy Space"),
    ("visual-clutter", "Visual Clutter"),
    ("scene-mood", "Scene Mood"),
    ("compliance-flags", "Compliance Flags"),
)
"""``(slug, name)`` of every analysis type, in the order jobs take them."""

_NAMES = dict(ANALYSIS_TYPES)


def name_for(slug: str) -> str:
    """The human name of ``slug``; unknown slugs get one derived from their words."""
    return _NAMES.get(slug) or slug.replace("-", " ").replace("_", " ").title()


def first_analyses(count: int) -> list[tuple[str, str]]:
    """The first ``count`` analysis types; past 25 the list repeats with suffixes ``-2``, ``-3``.

    Large counts exist to test jobs bigger than the catalogue; every slug stays unique.
    """
    if count < 1:
        raise ValueError(f"a job needs at least one analysis, got {count}")
    out: list[tuple[str, str]] = []
    for index in range(count):
        slug, name = ANALYSIS_TYPES[index % len(ANALYSIS_TYPES)]
        round_ = index // len(ANALYSIS_TYPES) + 1
        out.append((slug, name) if round_ == 1 else (f"{slug}-{round_}", f"{name} {round_}"))
    return out


def named(slugs: list[str]) -> list[tuple[str, str]]:
    """``(slug, name)`` for explicitly chosen slugs (unknown ones allowed, names derived)."""
    if not slugs:
        raise ValueError("slugs must name at least one analysis")
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"slugs must be unique, got {slugs}")
    return [(slug, name_for(slug)) for slug in slugs]
