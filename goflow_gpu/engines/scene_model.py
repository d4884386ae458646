"""The tiny Qwen2.5-VL trained on the simulator's scenes, shipped with the package.

``SCENE_MODEL`` is its folder (built by ``goflow-gpu dev train-tiny``, see
:mod:`goflow_gpu.engines.train`). A folder made by that command holds ``training.json``: the
command, the settings, and the pixel budget the model was trained at. A model is only right at
that budget (its boxes are in the pixels of the image as it saw it in training), so
:func:`trained_pixel_budget` lets the settings adopt it when none is configured.

Light on purpose (json and pathlib): the settings import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCENE_MODEL = Path(__file__).resolve().parent.parent / "models" / "qwen2.5-vl-tiny-scenes"
"""The shipped trained model's folder."""
SCENE_MODEL_LABEL = "qwen2.5vl-tiny-scenes"
TRAINING_FILE = "training.json"
"""What a model folder trained here records about how it was made."""


def read_training(model: str | Path) -> dict[str, Any] | None:
    """``training.json`` of a local model folder; None for a hub id or a model not trained
    here."""
    path = Path(model) / TRAINING_FILE
    try:
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def trained_pixel_budget(model: str | Path) -> tuple[int, int] | None:
    """``(min_pixels, max_pixels)`` the model in this folder was trained at, if it says."""
    data = read_training(model)
    budget = (data or {}).get("pixel_budget")
    if not isinstance(budget, dict):
        return None
    low, high = budget.get("min_pixels"), budget.get("max_pixels")
    if isinstance(low, int) and isinstance(high, int) and 0 < low <= high:
        return low, high
    return None
