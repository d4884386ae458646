"""Test data shared by the engine tests."""

from __future__ import annotations

from typing import Any

# Bounded schemas: each value has a finite set of spellings, so even random weights finish.
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "outdoor": {"type": "boolean"},
            "mood": {"enum": ["happy", "sad", "neutral"]},
        },
        "required": ["outdoor", "mood"],
        "additionalProperties": False,
    },
]
