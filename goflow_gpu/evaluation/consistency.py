"""Fields of one result that contradict each other, found without any label.

A result can pass its schema and still say two incompatible things: ``has_text: false`` beside
three text blocks, colour shares summing to 130, a primary scene repeated among the secondary
ones, ``safe_for_general_audience: true`` beside a ``strong`` violence rating. Catalog v2
computes such fields from their evidence, so its results cannot contradict themselves in these
ways; the checks here measure that, on any catalog's results (they read field names the
shipped catalogs share), and ``prompts eval`` reports the share of consistent answers per
analysis next to the share QA had to repair.

Each check names the fields it compares; :func:`problems` returns one line per contradiction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: (flag, list): the flag says whether the list has items.
FLAG_LISTS: tuple[tuple[str, str], ...] = (
    ("has_text", "text_blocks"),
    ("has_animals", "animals"),
    ("has_vehicles", "vehicles"),
    ("has_food", "items"),
    ("has_landmark", "landmarks"),
    ("has_logos", "logos"),
    ("has_products", "products"),
    ("has_copy_space", "regions"),
)
#: (primary, secondaries): the primary value is not repeated among the secondary ones.
PRIMARY_SECONDARY: tuple[tuple[str, str], ...] = (
    ("primary_scene", "secondary_scenes"),
    ("mood", "secondary_moods"),
)
#: (count, list): a count up to the list's length agrees with it.
COUNT_LISTS: tuple[tuple[str, str], ...] = (("count", "people"),)
_FLAGGED = ("present", "possible")


def problems(result: Mapping[str, Any]) -> list[str]:
    """Every contradiction between fields of ``result`` (an analysisResult)."""
    found: list[str] = []
    for flag, name in FLAG_LISTS:
        value, items = result.get(flag), result.get(name)
        if isinstance(value, bool) and isinstance(items, list) and value != bool(items):
            found.append(f"{flag} is {str(value).lower()} but {name} has {len(items)} item(s)")
    for primary, name in PRIMARY_SECONDARY:
        value, items = result.get(primary), result.get(name)
        if isinstance(value, str) and isinstance(items, list) and value in items:
            found.append(f"{primary} {value!r} is repeated in {name}")
    for count_key, name in COUNT_LISTS:
        count, items = result.get(count_key), result.get(name)
        if isinstance(count, int) and isinstance(items, list) and count < len(items):
            found.append(f"{count_key} {count} is below the {len(items)} {name} listed")
    colours = result.get("dominant_colours")
    if isinstance(colours, list) and colours:
        shares = [c.get("share") for c in colours if isinstance(c, Mapping)]
        numbers = [s for s in shares if isinstance(s, (int, float))]
        if len(numbers) == len(shares) and sum(numbers) != 100:
            found.append(f"dominant_colours shares sum to {sum(numbers)}, not 100")
    tags, main = result.get("tags"), result.get("main_tag")
    if isinstance(tags, list) and isinstance(main, str) and main not in tags:
        found.append(f"main_tag {main!r} is not one of the tags")
    found.extend(_safety(result))
    found.extend(_review(result))
    blocks, full = result.get("text_blocks"), result.get("full_text")
    if isinstance(blocks, list) and isinstance(full, str):
        missing = [
            b["text"]
            for b in blocks
            if isinstance(b, Mapping) and isinstance(b.get("text"), str) and b["text"] not in full
        ]
        if missing:
            found.append(f"full_text lacks {len(missing)} of the text blocks")
    return found


def _safety(result: Mapping[str, Any]) -> list[str]:
    categories = result.get("categories")
    safe = result.get("safe_for_general_audience")
    if not isinstance(categories, Mapping) or not isinstance(safe, bool):
        return []
    flagged = sorted(k for k, v in categories.items() if isinstance(v, str) and v != "none")
    if safe and flagged:
        return [f"safe_for_general_audience is true but {', '.join(flagged)} not none"]
    if not safe and not flagged:
        return ["safe_for_general_audience is false but every category is none"]
    return []


def _review(result: Mapping[str, Any]) -> list[str]:
    flags = result.get("flags")
    review = result.get("requires_review")
    if not isinstance(flags, Mapping) or not isinstance(review, bool):
        return []
    raised = sorted(name for name, value in flags.items() if _raised(value))
    if raised and not review:
        return [f"requires_review is false but {', '.join(raised)} flagged"]
    if review and not raised:
        return ["requires_review is true but no flag is raised"]
    return []


def _raised(value: Any) -> bool:
    """A compliance flag that is up: ``present``/``possible`` (v2) or ``present: true`` (v1)."""
    if isinstance(value, str):
        return value in _FLAGGED
    return isinstance(value, Mapping) and value.get("present") is True


__all__ = ["problems"]
