"""Images as the engines hand them to the model: decoded and resized once, kept in a small LRU.

A job asks up to 25 questions about each picture, and the worker feeds them media-major, so the
same file arrives at the engine many times in a row. Decoding a 1-2 MP JPEG or PNG, resizing it
and letting vLLM hash its pixels again for every analysis costs tens of milliseconds each, on the
CPU cores that also feed the GPU. :class:`ImageCache` does that work once per file:

- :func:`prepare_image` decodes the file, resizes it with Qwen2.5-VL's rule
  (:func:`goflow_gpu.prompts.geometry.smart_resize`, bicubic like the model's processor) and
  names it by a digest of the file's bytes and the pixel bounds. The model's processor then has
  nothing left to resize (the rule is idempotent on its own output, except where rounding takes
  a long thin image past the 200:1 ratio the processor accepts: that one is handed over at its
  original size and the processor resizes it to the same size), so ``size`` is exactly the
  space the model's box coordinates refer to, and vLLM can take ``uuid`` as the item's
  ``multi_modal_uuids`` entry instead of hashing the pixels of every request.
- :class:`ImageCache` keeps prepared images by (path, mtime, size), least recently used first
  out, bounded in bytes of decoded pixels; concurrent asks for one file while it is being
  prepared wait for that one preparation (:meth:`ImageCache.aget`).

What an engine keeps per image can differ (the OpenAI engine keeps the JPEG data URL it
uploads), so the cache stores whatever ``prepare(path)`` returns, with its size in bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from goflow_gpu.errors import MediaError
from goflow_gpu.prompts.geometry import IMAGE_FACTOR, MAX_ASPECT_RATIO, smart_resize

if TYPE_CHECKING:
    from PIL import Image

#: one visual token covers a square of this many pixels per side (14 px patch x 2 x 2 merge)
QWEN_FACTOR = IMAGE_FACTOR

#: default bound of an engine's image cache: ~40 images at the production budget of 1280 tokens
#: (1280 x 28 x 28 x 3 bytes = 3 MiB each), several times what a media-major feed has in flight
DEFAULT_CACHE_BYTES = 128 * 1024 * 1024

V = TypeVar("V")


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


@dataclass(frozen=True)
class PreparedImage:
    """An image as the model sees it: ``image`` is ``size`` (width, height), RGB."""

    image: Image.Image
    size: tuple[int, int]
    original_size: tuple[int, int]
    uuid: str

    @property
    def nbytes(self) -> int:
        return self.size[0] * self.size[1] * 3


def prepare_image(path: Path, min_pixels: int | None, max_pixels: int | None) -> PreparedImage:
    """Decode ``path`` and resize it to the size Qwen2.5-VL's processor picks.

    Without bounds (``None``) the image keeps its size and the processor's own bounds apply.
    ``uuid`` digests the file's bytes and the bounds: two files with the same bytes are the same
    item, one file under other bounds is another. Raises :class:`MediaError` naming the file.
    """
    from PIL import Image

    try:
        digest = hashlib.blake2b(path.read_bytes(), digest_size=16)
    except FileNotFoundError:
        raise MediaError(f"image file {path} does not exist") from None
    except OSError as exc:
        raise MediaError(f"image file {path} cannot be read: {exc}") from None
    digest.update(f"|{min_pixels}|{max_pixels}".encode())
    image = load_image(path)
    original = image.size
    if min_pixels is None or max_pixels is None:
        return PreparedImage(image, original, original, digest.hexdigest())
    height, width = smart_resize(image.height, image.width, IMAGE_FACTOR, min_pixels, max_pixels)
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        # Rounding pushed a long thin image (e.g. 5615 x 29 -> 5628 x 28) past the ratio the
        # processor accepts: hand it the original, which it accepts and resizes to this size.
        return PreparedImage(image, (width, height), original, digest.hexdigest())
    if (width, height) != original:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return PreparedImage(image, (width, height), original, digest.hexdigest())


class ImageCache(Generic[V]):
    """What ``prepare(path)`` made of each image file, least recently used out beyond ``max_bytes``.

    ``weigh(value)`` gives a value's size in bytes. Keys are the path with the file's mtime and
    size, so a file replaced in place is prepared again. :meth:`get` is thread-safe (engines call
    it from worker threads); :meth:`aget` is the event loop's form, which also makes concurrent
    callers for one file share one preparation. Failures are raised to every waiter and not kept.
    """

    def __init__(
        self,
        prepare: Callable[[Path], V],
        weigh: Callable[[V], int],
        max_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self._prepare = prepare
        self._weigh = weigh
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int, int], tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int, int], asyncio.Future[V]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        try:
            stat = os.stat(path)
        except OSError:
            return (str(path), -1, -1)  # prepare() raises the MediaError that names it
        return (str(path), stat.st_mtime_ns, stat.st_size)

    def _lookup(self, key: tuple[str, int, int]) -> tuple[bool, V | None]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False, None
            self._entries.move_to_end(key)
            self.hits += 1
            return True, entry[0]

    def _store(self, key: tuple[str, int, int], value: V) -> None:
        size = self._weigh(value)
        with self._lock:
            self.misses += 1
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def get(self, path: Path) -> V:
        """The prepared value of ``path``, prepared now when not held."""
        key = self._key(path)
        found, value = self._lookup(key)
        if found:
            return value  # type: ignore[return-value]
        value = self._prepare(path)
        self._store(key, value)
        return value

    async def aget(self, path: Path) -> V:
        """:meth:`get` for the event loop: preparation runs in a thread, once per file at a time."""
        key = self._key(path)
        found, value = self._lookup(key)
        if found:
            return value  # type: ignore[return-value]
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._prepare_and_store, key, path))
            self._pending[key] = pending
            pending.add_done_callback(lambda done: self._settled(key, done))
        # shield: one caller's cancellation must not cancel the others' preparation
        return await asyncio.shield(pending)

    def _settled(self, key: tuple[str, int, int], done: asyncio.Future[V]) -> None:
        self._pending.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every waiter may have been cancelled

    def _prepare_and_store(self, key: tuple[str, int, int], path: Path) -> V:
        value = self._prepare(path)
        self._store(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def prepared_image_cache(
    min_pixels: int | None, max_pixels: int | None, max_bytes: int = DEFAULT_CACHE_BYTES
) -> ImageCache[PreparedImage]:
    """The cache the in-process engines use: :func:`prepare_image` under the given bounds."""
    return ImageCache(
        lambda path: prepare_image(path, min_pixels, max_pixels),
        lambda prepared: prepared.nbytes,
        max_bytes,
    )
