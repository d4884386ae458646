"""The media fetcher against a real HTTP server on loopback (a small aiohttp app per test).

The server counts requests per path and keeps the headers it received, so the tests check what
actually went over the wire: how many downloads, which headers, no request at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import struct
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image, ImageDraw

from goflow_gpu.errors import ConfigError, MediaError, StateError, TransientError
from goflow_gpu.media import FetchedImage, MediaFetcher, MediaLimits
from goflow_gpu.protocol import Media
from goflow_gpu.retry import RetryPolicy
from goflow_gpu.store import Store

T = TypeVar("T")
FAST_RETRY = RetryPolicy(retries=2, base=0.01, cap=0.02)
LIMITS = MediaLimits(max_bytes=200_000, max_pixels=1_000_000, timeout=5.0, max_redirects=5)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def make_jpeg(width: int = 320, height: int = 240) -> bytes:
    noise = random.Random(7).randbytes(width * height * 3)
    img = Image.frombytes("RGB", (width, height), noise)
    ImageDraw.Draw(img).rectangle((10, 10, 100, 80), fill=(200, 30, 30))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def fixed(make: Callable[[], web.StreamResponse]) -> Callable[[web.Request], Awaitable[Any]]:
    """An async handler that answers every request with ``make()``."""

    async def handler(_: web.Request) -> web.StreamResponse:
        return make()

    return handler


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_png_bomb(width: int, height: int) -> bytes:
    """A valid one-colour 1-bit PNG of width x height pixels: tiny on disk, huge decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


JPEG = make_jpeg()
JPEG_SIZE = (320, 240)
BOMB = make_png_bomb(20_000, 20_000)  # 400 million pixels in a few kB


class Origin:
    """A media host: routes below, plus what it saw."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        r = app.router
        r.add_get("/img/{name}.jpg", self.image)
        r.add_get("/missing.jpg", fixed(lambda: web.Response(status=404, text="no such image")))
        r.add_get(
            "/page.jpg",
            fixed(lambda: web.Response(text="<html>login</html>", content_type="text/html")),
        )
        r.add_get("/octet.jpg", fixed(lambda: web.Response(body=JPEG)))
        r.add_get("/truncated.jpg", fixed(lambda: self._jpeg(JPEG[: len(JPEG) // 2])))
        r.add_get("/corrupt.jpg", fixed(lambda: self._jpeg(random.Random(3).randbytes(5000))))
        r.add_get("/bomb.png", fixed(lambda: web.Response(body=BOMB, content_type="image/png")))
        r.add_get("/big.jpg", fixed(lambda: self._jpeg(b"\xff" * 300_000)))
        r.add_get("/big-stream.jpg", self.big_stream)
        r.add_get("/loop-a.jpg", fixed(lambda: self._redirect("/loop-b.jpg")))
        r.add_get("/loop-b.jpg", fixed(lambda: self._redirect("/loop-a.jpg")))
        r.add_get("/hop/{n}", self.hop)
        r.add_get("/to-ftp.jpg", fixed(lambda: self._redirect("ftp://127.0.0.1/x.jpg")))
        r.add_get("/slow.jpg", self.slow)
        r.add_get("/flaky.jpg", self.flaky)
        r.add_get("/down.jpg", fixed(lambda: web.Response(status=500, text="boom")))
        return app

    @web.middleware
    async def _record(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.hits[request.path] += 1
        self.headers.append(dict(request.headers))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await handler(request)
        finally:
            self.in_flight -= 1

    @staticmethod
    def _jpeg(data: bytes) -> web.Response:
        return web.Response(body=data, content_type="image/jpeg")

    @staticmethod
    def _redirect(location: str) -> web.Response:
        return web.Response(status=302, headers={"Location": location})

    async def image(self, request: web.Request) -> web.Response:
        return self._jpeg(JPEG)

    async def hop(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        return self._jpeg(JPEG) if n == 0 else self._redirect(f"/hop/{n - 1}")

    async def big_stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()  # no Content-Length: only the streaming check can stop it
        await resp.prepare(request)
        try:
            for _ in range(100):
                await resp.write(b"\xff" * 10_000)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass
        return resp

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return self._jpeg(JPEG)

    async def flaky(self, request: web.Request) -> web.Response:
        if self.hits[request.path] == 1:
            return web.Response(status=503, text="busy")
        return self._jpeg(JPEG)


@asynccontextmanager
async def serving(origin: Origin) -> AsyncIterator[TestServer]:
    server = TestServer(origin.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


def media(optimised: str, greyscale: str | None = None) -> Media:
    return Media(
        id=str(uuid.uuid4()),
        filename="x.jpg",
        optimised_path=optimised,
        greyscale_path=greyscale or optimised,
    )


PROJECT = str(uuid.uuid4())


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store.open(tmp_path / "state") as s:
        yield s


async def fetch_one(
    store: Store, origin: Origin, path: str, limits: MediaLimits = LIMITS, **kw: Any
) -> tuple[FetchedImage | MediaError, Media]:
    async with serving(origin) as server:
        m = media(str(server.make_url(path)))
        fetcher = MediaFetcher(store, limits, retry_policy=FAST_RETRY, **kw)
        try:
            return await fetcher.fetch(PROJECT, m, "optimised"), m
        except MediaError as exc:
            return exc, m
        finally:
            await fetcher.close()


def failure(store: Store, path: str, limits: MediaLimits = LIMITS) -> tuple[str, Origin, Media]:
    origin = Origin()
    result, m = run(fetch_one(store, origin, path, limits))
    assert isinstance(result, MediaError), result
    reason = str(result)
    row = store.media(PROJECT, m.id, "optimised")
    assert row is not None
    assert (row.ok, row.error) == (False, reason)
    assert list((store.path.parent / "media").rglob("*.part-*")) == []  # no temp file left
    return reason, origin, m


# ---------------------------------------------------------------------- success and cache


def test_downloads_validates_and_records(store: Store) -> None:
    origin = Origin()
    result, m = run(fetch_one(store, origin, "/img/a.jpg"))
    assert isinstance(result, FetchedImage)
    assert result.downloaded is True
    assert (result.width, result.height) == JPEG_SIZE
    assert result.nbytes == len(JPEG)
    assert result.path == store.path.parent / "media" / PROJECT / f"{m.id}-optimised"
    assert result.path.read_bytes() == JPEG
    assert result.sha256 == hashlib.sha256(JPEG).hexdigest()
    row = store.media(PROJECT, m.id, "optimised")
    assert row is not None
    assert (row.ok, row.path, row.sha256) == (True, result.path, result.sha256)
    assert store.downloads(PROJECT) == 1
    assert origin.hits["/img/a.jpg"] == 1


def test_no_credentials_or_cookies_are_sent(store: Store) -> None:
    origin = Origin()
    result, _ = run(fetch_one(store, origin, "/img/a.jpg"))
    assert isinstance(result, FetchedImage)
    sent = {k.lower() for k in origin.headers[0]}
    assert sent.isdisjoint({"x-api-key", "authorization", "cookie", "proxy-authorization"})


def test_a_session_carrying_the_api_key_is_refused(store: Store) -> None:
    async def main() -> str:
        async with aiohttp.ClientSession(headers={"X-API-Key": "made-up-key-123"}) as session:
            with pytest.raises(ConfigError) as info:
                MediaFetcher(store, LIMITS, session=session)
            return str(info.value)

    message = run(main())
    assert "x-api-key" in message
    assert "made-up-key-123" not in message


def test_cached_image_is_reused_after_reopening_the_store(tmp_path: Path) -> None:
    origin = Origin()

    async def main() -> tuple[FetchedImage, FetchedImage, FetchedImage]:
        async with serving(origin) as server:
            m = media(str(server.make_url("/img/a.jpg")))
            with Store.open(tmp_path) as s1:
                f1 = MediaFetcher(s1, LIMITS, retry_policy=FAST_RETRY)
                first = await f1.fetch(PROJECT, m, "optimised")
                again = await f1.fetch(PROJECT, m, "optimised")
                await f1.close()
            with Store.open(tmp_path) as s2:  # a restart
                f2 = MediaFetcher(s2, LIMITS, retry_policy=FAST_RETRY)
                resumed = await f2.fetch(PROJECT, m, "optimised")
                await f2.close()
                assert s2.downloads(PROJECT) == 1
            return first, again, resumed

    first, again, resumed = run(main())
    assert first.downloaded is True
    assert (again.downloaded, resumed.downloaded) == (False, False)
    assert resumed.path == first.path
    assert resumed.sha256 == first.sha256
    assert origin.hits["/img/a.jpg"] == 1


@pytest.mark.parametrize("damage", ["delete", "alter"])
def test_missing_or_altered_cache_file_is_downloaded_again(store: Store, damage: str) -> None:
    origin = Origin()

    async def main() -> FetchedImage:
        async with serving(origin) as server:
            m = media(str(server.make_url("/img/a.jpg")))
            fetcher = MediaFetcher(store, LIMITS, retry_policy=FAST_RETRY)
            first = await fetcher.fetch(PROJECT, m, "optimised")
            if damage == "delete":
                first.path.unlink()
            else:
                first.path.write_bytes(b"tampered")
            second = await fetcher.fetch(PROJECT, m, "optimised")
            await fetcher.close()
            return second

    second = run(main())
    assert second.downloaded is True
    assert second.path.read_bytes() == JPEG
    assert origin.hits["/img/a.jpg"] == 2
    assert store.downloads(PROJECT) == 2


def test_concurrent_fetches_of_one_image_make_one_request(store: Store) -> None:
    origin = Origin()
    origin.delay = 0.2

    async def main() -> list[FetchedImage]:
        async with serving(origin) as server:
            m = media(str(server.make_url("/img/a.jpg")))
            fetcher = MediaFetcher(store, LIMITS, retry_policy=FAST_RETRY)
            try:
                return await asyncio.gather(
                    *(fetcher.fetch(PROJECT, m, "optimised") for _ in range(6))
                )
            finally:
                await fetcher.close()

    results = run(main())
    assert origin.hits["/img/a.jpg"] == 1
    assert len({r.path for r in results}) == 1
    assert store.downloads(PROJECT) == 1


def test_one_caller_cancelling_does_not_cancel_the_shared_download(store: Store) -> None:
    origin = Origin()
    origin.delay = 0.3

    async def main() -> FetchedImage:
        async with serving(origin) as server:
            m = media(str(server.make_url("/img/a.jpg")))
            fetcher = MediaFetcher(store, LIMITS, retry_policy=FAST_RETRY)
            try:
                quitter = asyncio.create_task(fetcher.fetch(PROJECT, m, "optimised"))
                stayer = asyncio.create_task(fetcher.fetch(PROJECT, m, "optimised"))
                await asyncio.sleep(0.1)
                quitter.cancel()
                return await stayer
            finally:
                await fetcher.close()

    assert run(main()).downloaded is True
    assert store.downloads(PROJECT) == 1


def test_downloads_are_bounded_by_the_concurrency(store: Store) -> None:
    origin = Origin()
    origin.delay = 0.15

    async def main() -> list[FetchedImage]:
        async with serving(origin) as server:
            items = [media(str(server.make_url(f"/img/{i}.jpg"))) for i in range(6)]
            fetcher = MediaFetcher(store, LIMITS, concurrency=2, retry_policy=FAST_RETRY)
            try:
                return await asyncio.gather(
                    *(fetcher.fetch(PROJECT, m, "greyscale") for m in items)
                )
            finally:
                await fetcher.close()

    results = run(main())
    assert len(results) == 6
    assert origin.max_in_flight == 2
    assert sum(origin.hits.values()) == 6


def test_redirects_are_followed_up_to_the_limit(store: Store) -> None:
    origin = Origin()
    result, _ = run(fetch_one(store, origin, "/hop/5"))
    assert isinstance(result, FetchedImage)
    assert origin.hits["/hop/0"] == 1
    reason, _, _ = failure(store, "/hop/6")
    assert reason.endswith("/hop/6: too many redirects (more than 5)")


def test_a_5xx_is_retried(store: Store) -> None:
    origin = Origin()
    result, _ = run(fetch_one(store, origin, "/flaky.jpg"))
    assert isinstance(result, FetchedImage)
    assert origin.hits["/flaky.jpg"] == 2


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("file:///etc/passwd", "file"),
        ("ftp://127.0.0.1/pub/a.jpg", "ftp"),
        ("data:image/png;base64,iVBORw0KGgo=", "data"),
    ],
)
def test_non_http_schemes_are_refused_without_a_request(
    store: Store, url: str, scheme: str
) -> None:
    origin = Origin()

    async def main() -> str:
        async with serving(origin):
            fetcher = MediaFetcher(store, LIMITS, retry_policy=FAST_RETRY)
            try:
                with pytest.raises(MediaError) as info:
                    await fetcher.fetch(PROJECT, media(url), "optimised")
                return str(info.value)
            finally:
                await fetcher.close()

    reason = run(main())
    assert f"scheme '{scheme}' is not http or https" in reason
    assert reason.startswith("refused media URL")
    assert sum(origin.hits.values()) == 0


def test_credentials_in_the_url_are_refused(store: Store) -> None:
    async def main() -> str:
        fetcher = MediaFetcher(store, LIMITS)
        try:
            with pytest.raises(MediaError) as info:
                await fetcher.fetch(PROJECT, media("http://user:pw@127.0.0.1:9/a.jpg"), "optimised")
            return str(info.value)
        finally:
            await fetcher.close()

    reason = run(main())
    assert reason == "refused media URL http://127.0.0.1:9/a.jpg: it carries credentials"


def test_404(store: Store) -> None:
    reason, origin, _ = failure(store, "/missing.jpg")
    assert reason.endswith("/missing.jpg: HTTP 404 Not Found")
    assert origin.hits["/missing.jpg"] == 1  # not retried


def test_html_instead_of_an_image(store: Store) -> None:
    reason, _, _ = failure(store, "/page.jpg")
    assert reason.endswith("/page.jpg: not an image: content-type text/html")


def test_octet_stream_is_not_an_image(store: Store) -> None:
    reason, _, _ = failure(store, "/octet.jpg")
    assert reason.endswith("not an image: content-type application/octet-stream")


def test_truncated_jpeg(store: Store) -> None:
    reason, _, _ = failure(store, "/truncated.jpg")
    assert "/truncated.jpg: corrupt or truncated image" in reason
    assert "truncated" in reason.split(":", 3)[-1]


def test_corrupt_bytes(store: Store) -> None:
    reason, _, _ = failure(store, "/corrupt.jpg")
    assert "/corrupt.jpg: not a decodable image" in reason


def test_decompression_bomb_is_refused_naming_the_pixels(store: Store) -> None:
    reason, _, _ = failure(store, "/bomb.png", MediaLimits(max_bytes=200_000, max_pixels=10**9))
    assert "/bomb.png: decompression bomb refused" in reason
    assert "400000000 pixels" in reason  # 20000 x 20000, caught by Pillow's own check


def test_pixel_limit_is_checked_from_the_header(store: Store) -> None:
    limits = MediaLimits(max_bytes=200_000, max_pixels=50_000)
    reason, _, _ = failure(store, "/img/a.jpg", limits)
    assert reason.endswith(
        "/img/a.jpg: image too large: 320x240 = 76800 pixels > limit 50000 "
        "(possible decompression bomb; not decoded)"
    )
    # And the 20000x20000 bomb under our own limit, below Pillow's threshold or not.
    reason, _, _ = failure(store, "/bomb.png", limits)
    assert "400000000 pixels" in reason


def test_oversized_body_by_content_length(store: Store) -> None:
    reason, _, _ = failure(store, "/big.jpg")
    assert reason.endswith("/big.jpg: too large: Content-Length 300000 bytes > limit 200000")


def test_oversized_body_while_streaming(store: Store) -> None:
    reason, _, _ = failure(store, "/big-stream.jpg")
    assert reason.endswith("/big-stream.jpg: too large: more than 200000 bytes (download stopped)")


def test_redirect_loop(store: Store) -> None:
    reason, _, _ = failure(store, "/loop-a.jpg")
    assert "/loop-a.jpg: redirect loop (" in reason
    assert reason.count("/loop-a.jpg") == 3  # the start, the loop, and its return


def test_redirect_to_another_scheme_is_refused(store: Store) -> None:
    reason, _, _ = failure(store, "/to-ftp.jpg")
    assert "redirected to a refused URL" in reason
    assert "scheme 'ftp'" in reason


def transient(
    store: Store, path: str, limits: MediaLimits = LIMITS
) -> tuple[TransientError, Origin]:
    """A fetch that fails in a passing way: TransientError (the job waits the host out), never
    a MediaError, and nothing recorded as the image's failure."""
    origin = Origin()
    with pytest.raises(TransientError) as info:
        run(fetch_one(store, origin, path, limits))
    assert store.conn.execute("SELECT COUNT(*) FROM media").fetchone()[0] == 0
    assert list((store.path.parent / "media").rglob("*.part-*")) == []  # no temp file left
    return info.value, origin


def test_timeout_is_transient_not_a_bad_image(store: Store) -> None:
    limits = MediaLimits(max_bytes=200_000, max_pixels=1_000_000, timeout=0.2)
    error, origin = transient(store, "/slow.jpg", limits)
    assert str(error).endswith("/slow.jpg: timed out after 0.2 s")
    assert error.cause == "timeout"
    assert origin.hits["/slow.jpg"] == 3  # first try + FAST_RETRY's 2 retries


def test_persistent_5xx_is_transient_after_the_retries(store: Store) -> None:
    error, origin = transient(store, "/down.jpg")
    assert str(error).endswith("/down.jpg: HTTP 500 Internal Server Error")
    assert (error.status, error.cause) == (500, "5xx")
    assert origin.hits["/down.jpg"] == 3


def test_query_strings_are_not_shown_in_reasons(store: Store) -> None:
    reason, _, _ = failure(store, "/missing.jpg?sig=made-up-token-42")
    assert "made-up-token-42" not in reason
    assert "/missing.jpg?...: HTTP 404" in reason


def test_a_failed_image_is_tried_again_later(store: Store) -> None:
    origin = Origin()

    async def main() -> FetchedImage:
        async with serving(origin) as server:
            m = media(str(server.make_url("/flaky.jpg")))
            no_retry = RetryPolicy(retries=0)
            fetcher = MediaFetcher(store, LIMITS, retry_policy=no_retry)
            try:
                with pytest.raises(TransientError, match="HTTP 503"):
                    await fetcher.fetch(PROJECT, m, "optimised")
                return await fetcher.fetch(PROJECT, m, "optimised")
            finally:
                await fetcher.close()

    assert run(main()).downloaded is True
    assert origin.hits["/flaky.jpg"] == 2


def test_an_unusable_cache_folder_is_a_state_error_not_a_bad_image(store: Store) -> None:
    (store.path.parent / "media").write_text("a file where the cache folder should be")
    origin = Origin()

    async def main() -> str:
        async with serving(origin) as server:
            fetcher = MediaFetcher(store, LIMITS, retry_policy=FAST_RETRY)
            try:
                with pytest.raises(StateError) as info:
                    await fetcher.fetch(
                        PROJECT, media(str(server.make_url("/img/a.jpg"))), "optimised"
                    )
                return str(info.value)
            finally:
                await fetcher.close()

    assert "cannot create media cache folder" in run(main())
    assert sum(origin.hits.values()) == 0
