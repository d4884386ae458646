"""The project's resize rule against the references: qwen-vl-utils and the model's processor.

``prompts.geometry.smart_resize`` decides the size every engine hands the model and the space QA
converts boxes from. It is checked here against Qwen's own ``qwen_vl_utils.smart_resize`` and
transformers' Qwen2-VL rule on random sizes and budgets, and against the token grid that the
model's image processor (the one vLLM runs for Qwen2.5-VL) produces for images the engines
prepared: the processor must find nothing left to resize.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from goflow_gpu.engines.images import prepare_image, visual_tokens
from goflow_gpu.errors import MediaError
from goflow_gpu.prompts.geometry import smart_resize

pytestmark = pytest.mark.engine

sides = st.integers(min_value=1, max_value=6000)
budgets = st.sampled_from(
    [(56 * 56, 448 * 448), (256 * 28 * 28, 1280 * 28 * 28), (4 * 28 * 28, 16384 * 28 * 28)]
)


@settings(max_examples=3000, deadline=None)
@given(height=sides, width=sides, budget=budgets)
def test_the_rule_is_qwen_vl_utils_rule(height: int, width: int, budget: tuple[int, int]) -> None:
    from qwen_vl_utils import smart_resize as reference

    try:
        expected = reference(height, width, 28, *budget)
    except ValueError:
        with pytest.raises(MediaError):
            smart_resize(height, width, 28, *budget)
        return
    assert smart_resize(height, width, 28, *budget) == expected


@settings(max_examples=3000, deadline=None)
@given(height=st.integers(28, 6000), width=st.integers(28, 6000), budget=budgets)
def test_the_rule_is_the_processors_rule(height: int, width: int, budget: tuple[int, int]) -> None:
    # transformers' copy differs from qwen-vl-utils only for sides under 14 px (never rounded
    # up to one tile before the budget check); from one tile up the three agree.
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as processor

    if max(height, width) / min(height, width) > 200:
        return
    assert smart_resize(height, width, 28, *budget) == processor(height, width, 28, *budget)


@settings(max_examples=3000, deadline=None)
@given(height=st.integers(28, 6000), width=st.integers(28, 6000), budget=budgets)
def test_the_rule_is_idempotent(height: int, width: int, budget: tuple[int, int]) -> None:
    # The engines resize before the model's processor does; it must then keep the size, except
    # where rounding took the ratio past 200:1 (prepare_image hands those over unresized).
    if max(height, width) / min(height, width) > 200:
        return
    once = smart_resize(height, width, 28, *budget)
    if max(once) / min(once) > 200:
        with pytest.raises(MediaError, match="aspect ratio"):
            smart_resize(*once, 28, *budget)
        return
    assert smart_resize(*once, 28, *budget) == once


# (5615, 29): the rule's own output (5628 x 28) is past 200:1; the original is handed over.
SIZES = [(1000, 600), (640, 480), (300, 500), (120, 90), (1, 1), (4000, 50), (5615, 29)]


@pytest.mark.parametrize("size", SIZES)
def test_the_processor_gives_the_prepared_image_the_token_grid_of_the_rule(
    tiny_model_dir: Path, tmp_path: Path, size: tuple[int, int]
) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)  # type: ignore[no-untyped-call]
    image_processor = processor.image_processor
    min_pixels, max_pixels = 56 * 56, 448 * 448
    path = tmp_path / "picture.png"
    Image.new("RGB", size, (30, 120, 200)).save(path)
    prepared = prepare_image(path, min_pixels, max_pixels)
    budget = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for image in (prepared.image, Image.open(path).convert("RGB")):  # prepared, and original
        out = image_processor(images=[image], size=budget, return_tensors="np")
        _, grid_h, grid_w = (int(v) for v in out["image_grid_thw"][0])
        patch = int(image_processor.patch_size)
        assert (grid_w * patch, grid_h * patch) == prepared.size
        assert grid_h * grid_w // 4 == visual_tokens(*prepared.size)
