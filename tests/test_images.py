"""Images prepared once per file (engines/images.py) and chat templates rendered once per prompt.

No model here: the cache's preparation function is counted by a wrapper, the chat template's
processor is a recording double.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from goflow_gpu.engines.base import InferenceRequest
from goflow_gpu.engines.chat import ChatTemplate
from goflow_gpu.engines.images import ImageCache, PreparedImage, prepare_image
from goflow_gpu.errors import MediaError

MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448


def _picture(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


class Counting:
    """prepare_image under fixed bounds, counting calls per path."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> PreparedImage:
        self.calls.append(path)
        return prepare_image(path, MIN_PIXELS, MAX_PIXELS)


def _cache(max_bytes: int = 10**9) -> tuple[ImageCache[PreparedImage], Counting]:
    counting = Counting()
    return ImageCache(counting, lambda p: p.nbytes, max_bytes), counting


def test_prepare_image_resizes_to_the_size_the_processor_picks(tmp_path: Path) -> None:
    # 1000 x 600 with at most 448*448 px: worked out by hand in test_engine_vllm (560 x 336).
    prepared = prepare_image(_picture(tmp_path / "a.png", (1000, 600), (200, 10, 10)), *BOUNDS)
    assert prepared.size == (560, 336)
    assert prepared.image.size == (560, 336)
    assert prepared.original_size == (1000, 600)
    assert prepared.image.mode == "RGB"
    assert prepared.nbytes == 560 * 336 * 3
    # Already at its size: kept as it is.
    kept = prepare_image(_picture(tmp_path / "b.png", (308, 504), (0, 0, 0)), *BOUNDS)
    assert kept.size == (308, 504) == kept.original_size


BOUNDS = (MIN_PIXELS, MAX_PIXELS)


def test_uuid_names_the_bytes_and_the_bounds_not_the_path(tmp_path: Path) -> None:
    red = _picture(tmp_path / "red.png", (120, 90), (255, 0, 0))
    same = tmp_path / "copy.png"
    same.write_bytes(red.read_bytes())
    blue = _picture(tmp_path / "blue.png", (120, 90), (0, 0, 255))
    uuid = prepare_image(red, *BOUNDS).uuid
    assert prepare_image(same, *BOUNDS).uuid == uuid
    assert prepare_image(blue, *BOUNDS).uuid != uuid
    assert prepare_image(red, MIN_PIXELS, 224 * 224).uuid != uuid


def test_a_missing_or_broken_file_is_a_media_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match=r"nope\.png does not exist"):
        prepare_image(tmp_path / "nope.png", *BOUNDS)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(MediaError, match=r"broken\.jpg is not a readable image"):
        prepare_image(broken, *BOUNDS)


def test_each_file_is_prepared_once_while_it_is_held(tmp_path: Path) -> None:
    cache, counting = _cache()
    path = _picture(tmp_path / "a.png", (640, 480), (1, 2, 3))
    first = cache.get(path)
    for _ in range(24):
        assert cache.get(path) is first
    assert counting.calls == [path]
    assert (cache.hits, cache.misses) == (24, 1)


def test_the_least_recently_used_image_goes_first_when_bytes_run_out(tmp_path: Path) -> None:
    paths = [_picture(tmp_path / f"{i}.png", (112, 84), (i, i, i)) for i in range(3)]
    one = 112 * 84 * 3
    cache, counting = _cache(max_bytes=2 * one)
    cache.get(paths[0])
    cache.get(paths[1])
    cache.get(paths[0])  # 0 is now the most recent
    cache.get(paths[2])  # evicts 1
    assert len(cache) == 2 and cache.nbytes == 2 * one
    cache.get(paths[0])
    cache.get(paths[1])  # prepared again
    assert counting.calls == [paths[0], paths[1], paths[2], paths[1]]


def test_an_image_larger_than_the_bound_is_served_but_not_kept(tmp_path: Path) -> None:
    cache, counting = _cache(max_bytes=100)
    path = _picture(tmp_path / "a.png", (112, 84), (9, 9, 9))
    assert cache.get(path).size == (112, 84)
    assert len(cache) == 0 and cache.nbytes == 0
    cache.get(path)
    assert len(counting.calls) == 2


def test_a_file_replaced_in_place_is_prepared_again(tmp_path: Path) -> None:
    cache, _ = _cache()
    path = _picture(tmp_path / "a.png", (112, 84), (255, 0, 0))
    before = cache.get(path)
    _picture(path, (168, 84), (0, 255, 0))
    os.utime(path, ns=(before_ns := os.stat(path).st_mtime_ns + 10**9, before_ns))
    after = cache.get(path)
    assert after.size == (168, 84) and after.uuid != before.uuid


def test_concurrent_asks_for_one_file_share_one_preparation(tmp_path: Path) -> None:
    cache, counting = _cache()
    path = _picture(tmp_path / "a.png", (1000, 600), (3, 4, 5))

    async def main() -> list[PreparedImage]:
        return list(await asyncio.gather(*(cache.aget(path) for _ in range(25))))

    results = asyncio.run(main())
    assert counting.calls == [path]
    assert all(r is results[0] for r in results)


def test_a_failed_preparation_reaches_every_waiter_and_is_not_kept(tmp_path: Path) -> None:
    cache, counting = _cache()
    path = tmp_path / "late.png"

    async def ask_all() -> list[Any]:
        return list(
            await asyncio.gather(*(cache.aget(path) for _ in range(5)), return_exceptions=True)
        )

    failures = asyncio.run(ask_all())
    assert all(isinstance(f, MediaError) and "late.png" in str(f) for f in failures)
    assert len(counting.calls) == 1
    _picture(path, (112, 84), (1, 1, 1))
    assert asyncio.run(cache.aget(path)).size == (112, 84)


class RecordingProcessor:
    """Stands in for the model's processor: renders messages into a string, counting calls."""

    def __init__(self) -> None:
        self.calls = 0

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls += 1
        assert kwargs == {"tokenize": False, "add_generation_prompt": True}
        return repr(messages)


def test_the_chat_template_runs_once_per_distinct_prompt() -> None:
    processor = RecordingProcessor()
    template = ChatTemplate(processor)
    image = Path("unused.png")
    requests = [
        InferenceRequest(f"m{m}:a{a}:0", image, "SYSTEM", f"analysis {a}")
        for m in range(4)
        for a in range(25)
    ]
    texts = [template.render(r) for r in requests]
    assert processor.calls == 25
    assert texts[0] == texts[25] != texts[1]
    # The layout is part of the key: the naive layout renders text before the image.
    naive = InferenceRequest("x", image, "SYSTEM", "analysis 0", image_first=False)
    assert template.render(naive) != texts[0]
    assert "'type': 'text'" in texts[0].split("'role': 'user'")[1].split("'type': 'image'")[1]
    assert processor.calls == 26
