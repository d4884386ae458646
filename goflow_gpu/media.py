"""Fetching the images of a job: validated, size-limited, cached on disk, each downloaded once.

:meth:`MediaFetcher.fetch` returns a :class:`FetchedImage` for one (project, media, variant) or
raises :class:`~goflow_gpu.errors.MediaError` whose text names the URL and what is wrong with it.

What it guarantees:

- **Once per job.** A downloaded image is written to
  ``<state dir>/media/<project>/<media>-<variant>`` (temp file, fsync, atomic rename) and
  recorded in the store with its SHA-256. Later fetches, also after a restart, reuse it when the
  file is still there and its hash matches; otherwise it is downloaded again. Concurrent
  fetches of the same key share one download.
- **Bounded.** At most ``concurrency`` downloads run at once; each attempt has a total timeout.
- **Validated before use.** Only ``http``/``https`` URLs without credentials (others are
  refused without a request); only status 200; ``Content-Type: image/*``; the byte limit is
  enforced from Content-Length and while streaming; redirects are followed by hand (each target
  checked, loops detected, at most ``max_redirects``); the pixel count is checked from the image
  header before decoding (decompression bombs, Pillow's own check mapped too); then the whole
  image is decoded once so truncated or corrupt files are caught here, not in the engine.
- **No secrets sent.** Media hosts are third parties: requests carry no API key, no
  Authorization header and no cookies. A shared session that carries such headers is refused.
- **Retried a little, never failed for a passing fault.** Network errors, timeouts, 408, 425,
  429 and 5xx are retried with :func:`goflow_gpu.retry.call_with_retry` (:data:`MEDIA_RETRY`);
  past that a :class:`~goflow_gpu.errors.TransientError` is raised (not a ``MediaError``), and
  the job waits the host's outage out. Only permanent failures (404/410 and other 4xx, not an
  image, too large, a bomb, a refused URL) raise :class:`MediaError`.

A local disk problem (cache folder unwritable, disk full) raises
:class:`~goflow_gpu.errors.StateError` instead: it is not the image's fault.

A failure is recorded in the store (:meth:`Store.record_media_error`) so that ``state show`` and
the report can say why; it is tried again on a later fetch (for example after a restart).
URLs are shown in reasons and logs without their query string, which often holds access tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from PIL import Image, UnidentifiedImageError
from yarl import URL

from goflow_gpu.answers import is_transient_status
from goflow_gpu.errors import ConfigError, MediaError, StateError, TransientError
from goflow_gpu.logs import get_logger
from goflow_gpu.protocol import Media
from goflow_gpu.retry import RetryPolicy, call_with_retry, parse_retry_after
from goflow_gpu.store import Store

log = get_logger(__name__)

#: Media hosts get a couple of quick retries; a missing image must not hold a job up for long.
MEDIA_RETRY: Final = RetryPolicy(retries=2, base=0.25, cap=2.0, retry_after_max=5.0)
#: Formats the engines can take; anything else is refused before it reaches a decoder.
IMAGE_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_SECRET_HEADERS: Final = frozenset({"x-api-key", "authorization", "proxy-authorization", "cookie"})
_CHUNK: Final = 64 * 1024


@dataclass(frozen=True)
class MediaLimits:
    """What an acceptable image is: bytes on the wire, pixels, time per attempt, redirects."""

    max_bytes: int
    max_pixels: int
    timeout: float = 30.0
    max_redirects: int = 5


@dataclass(frozen=True)
class FetchedImage:
    """A validated image on local disk. ``downloaded`` is False for a cache hit."""

    path: Path
    width: int
    height: int
    nbytes: int
    sha256: str
    downloaded: bool


@dataclass
class _Inflight:
    task: asyncio.Task[FetchedImage]
    waiters: int = 0


def display_url(url: str) -> str:
    """The URL as shown in reasons and logs: no credentials, no query string or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return repr(url[:200])
    netloc = host + port
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if parts.query:
        shown += "?..."
    return shown[:500]


def check_media_url(url: str) -> None:
    """Refuse, without any request, a URL that is not plain http(s) to a host."""
    shown = display_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise MediaError(f"refused media URL {shown}: malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(
            f"refused media URL {shown}: scheme {scheme or '(none)'!r} is not http or https"
        )
    if not parts.hostname:
        raise MediaError(f"refused media URL {shown}: no host")
    if parts.username or parts.password:
        raise MediaError(f"refused media URL {shown}: it carries credentials")


class MediaFetcher:
    """Downloads, validates and caches job images (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        limits: MediaLimits,
        *,
        concurrency: int = 8,
        session: aiohttp.ClientSession | None = None,
        retry_policy: RetryPolicy | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"download concurrency must be >= 1, got {concurrency}")
        if session is not None:
            _check_session(session)
        self._store = store
        self._limits = limits
        self._session = session
        self._own_session = session is None
        self._semaphore = asyncio.Semaphore(concurrency)
        self._policy = retry_policy or dataclasses.replace(MEDIA_RETRY, timeout=limits.timeout)
        self._inflight: dict[tuple[str, str, str], _Inflight] = {}
        self._stopping = stopping

    async def fetch(self, project_id: str, media: Media, variant: str) -> FetchedImage:
        """The validated image of one (project, media, variant), from cache or downloaded once.

        Raises :class:`MediaError` with a reason naming the URL and the problem.
        """
        key = (project_id, media.id, variant)
        entry = self._inflight.get(key)
        if entry is None:
            task = asyncio.create_task(
                self._fetch_once(project_id, media, variant), name=f"media-{media.id}-{variant}"
            )
            entry = _Inflight(task)
            self._inflight[key] = entry
            task.add_done_callback(lambda t: self._forget(key, t))
        entry.waiters += 1
        try:
            # Shielded: one caller giving up must not cancel the download the others wait on.
            return await asyncio.shield(entry.task)
        except asyncio.CancelledError:
            if entry.waiters == 1 and not entry.task.done():
                entry.task.cancel()  # nobody else wants it
            raise
        finally:
            entry.waiters -= 1

    def _forget(self, key: tuple[str, str, str], task: asyncio.Task[FetchedImage]) -> None:
        entry = self._inflight.get(key)
        if entry is not None and entry.task is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here: a caller that gave up may never await it

    def forget(self, project_id: str) -> None:
        """Delete a closed job's cached images. Blocking file work: call it off the event loop.

        A closed job is never resumed, so its cache only takes disk space; a worker that runs
        for weeks would otherwise fill its disk with every job's images.
        """
        folder = self._store.state_dir / "media" / project_id
        if folder.parent != self._store.state_dir / "media" or not folder.is_dir():
            return
        shutil.rmtree(folder, ignore_errors=True)
        log.info("cached images of the closed job removed", project_id=project_id)

    async def close(self) -> None:
        """Cancel downloads still running and close the session this fetcher created."""
        tasks = [e.task for e in self._inflight.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ one key

    async def _fetch_once(self, project_id: str, media: Media, variant: str) -> FetchedImage:
        url = media.url(variant)  # type: ignore[arg-type]
        cached = await self._from_cache(project_id, media.id, variant)
        if cached is not None:
            return cached
        started = time.monotonic()
        try:
            check_media_url(url)
            async with self._semaphore:
                image = await self._download(project_id, media.id, variant, url)
        except MediaError as exc:
            self._store.record_media_error(project_id, media.id, variant, str(exc))
            log.warning(
                "media fetch failed",
                media_id=media.id,
                variant=variant,
                url=display_url(url),
                reason=str(exc),
                ms=round((time.monotonic() - started) * 1000, 1),
            )
            raise
        log.info(
            "media downloaded",
            media_id=media.id,
            variant=variant,
            bytes=image.nbytes,
            width=image.width,
            height=image.height,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return image

    async def _from_cache(
        self, project_id: str, media_id: str, variant: str
    ) -> FetchedImage | None:
        row = self._store.media(project_id, media_id, variant)
        if row is None or not row.ok or row.path is None:
            return None
        path = row.path
        if row.width is None or row.height is None or row.nbytes is None:
            return None
        digest = await asyncio.to_thread(_sha256_of, path)
        if digest is None or digest != row.sha256:
            log.warning(
                "cached image missing or changed; downloading again",
                media_id=media_id,
                variant=variant,
                path=str(path),
            )
            return None
        log.debug("media cache hit", media_id=media_id, variant=variant)
        return FetchedImage(path, row.width, row.height, row.nbytes, digest, downloaded=False)

    async def _download(
        self, project_id: str, media_id: str, variant: str, url: str
    ) -> FetchedImage:
        final = self._store.media_path(project_id, media_id, variant)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create media cache folder {final.parent}: {exc}") from None
        # A process killed mid-download leaves its temp file behind; this key's download is ours
        # alone (shared in-flight, one worker per state dir), so any earlier one is stale.
        # A prefix match, not glob(): a per-image glob pattern would fill Python's regex cache.
        prefix = f".{final.name}.part-"
        for stale in final.parent.iterdir():
            if stale.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()

        async def attempt(_: int) -> tuple[Path, int, str]:
            return await self._attempt(url, final)

        # A TransientError that outlasts these retries propagates: the job waits out the host's
        # outage (patience.Outage) instead of failing the image's combinations for good.
        tmp, nbytes, digest = await call_with_retry(
            attempt, self._policy, endpoint="media", stop=self._stopping
        )
        try:
            width, height = await asyncio.to_thread(
                _validate_image, tmp, display_url(url), self._limits.max_pixels
            )
            try:
                await asyncio.to_thread(_commit, tmp, final)
            except OSError as exc:
                raise StateError(f"cannot store image {final}: {exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._store.record_media(
            project_id,
            media_id,
            variant,
            path=final,
            size=(width, height),
            nbytes=nbytes,
            sha256=digest,
        )
        return FetchedImage(final, width, height, nbytes, digest, downloaded=True)

    def _session_for_media(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No cookies, no proxy/netrc credentials from the environment, no default headers.
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=self._limits.timeout),
            )
        return self._session

    async def _attempt(self, url: str, final: Path) -> tuple[Path, int, str]:
        """One try: follow redirects by hand, then stream the body into a temp file."""
        session = self._session_for_media()
        shown = display_url(url)
        try:
            async with asyncio.timeout(self._limits.timeout):
                current = url
                chain = [url]
                for _ in range(self._limits.max_redirects + 1):
                    async with session.get(current, allow_redirects=False, auth=None) as resp:
                        if resp.status in _REDIRECTS:
                            current = _next_hop(resp, shown, chain)
                            chain.append(current)
                            continue
                        return await self._read_body(resp, shown, final)
                raise MediaError(
                    f"{shown}: too many redirects (more than {self._limits.max_redirects})"
                )
        except TimeoutError:
            raise TransientError(
                f"{shown}: timed out after {self._limits.timeout:g} s",
                endpoint="media",
                cause="timeout",
            ) from None
        except aiohttp.InvalidURL as exc:
            raise MediaError(f"{shown}: invalid URL ({exc})") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            # Waiting does not fix a certificate: permanent for this image.
            reason = exc.certificate_error
            raise MediaError(f"{shown}: TLS certificate failed verification ({reason})") from None
        except aiohttp.ClientError as exc:
            raise TransientError(
                f"{shown}: network error: {type(exc).__name__}: {exc}",
                endpoint="media",
                cause="network",
            ) from None

    async def _read_body(
        self, resp: aiohttp.ClientResponse, shown: str, final: Path
    ) -> tuple[Path, int, str]:
        status = resp.status
        if status != 200:
            if is_transient_status(status):
                raise TransientError(
                    f"{shown}: HTTP {status} {resp.reason or ''}".rstrip(),
                    endpoint="media",
                    status=status,
                    cause=str(status) if status < 500 else "5xx",
                    retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                )
            raise MediaError(f"{shown}: HTTP {status} {resp.reason or ''}".rstrip())
        ctype = resp.headers.get("Content-Type")
        if not ctype:
            raise MediaError(f"{shown}: not an image: no content-type")
        if not resp.content_type.startswith("image/"):
            raise MediaError(f"{shown}: not an image: content-type {resp.content_type}")
        limit = self._limits.max_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise MediaError(
                f"{shown}: too large: Content-Length {resp.content_length} bytes > limit {limit}"
            )
        tmp = final.with_name(f".{final.name}.part-{secrets.token_hex(4)}")
        digest = hashlib.sha256()
        nbytes = 0
        try:
            with _open_for_write(tmp) as out:
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    nbytes += len(chunk)
                    if nbytes > limit:
                        raise MediaError(
                            f"{shown}: too large: more than {limit} bytes (download stopped)"
                        )
                    digest.update(chunk)
                    _write(out, chunk, tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        if nbytes == 0:
            tmp.unlink()
            raise MediaError(f"{shown}: empty body")
        return tmp, nbytes, digest.hexdigest()


def _next_hop(resp: aiohttp.ClientResponse, shown: str, chain: list[str]) -> str:
    location = resp.headers.get("Location")
    if not location:
        raise MediaError(f"{shown}: redirect {resp.status} without a Location header")
    target = str(resp.url.join(URL(location)))
    try:
        check_media_url(target)
    except MediaError as exc:
        raise MediaError(f"{shown}: redirected to a refused URL: {exc}") from None
    if target in chain:
        loop = " -> ".join(display_url(u) for u in [*chain, target])
        raise MediaError(f"{shown}: redirect loop ({loop})")
    return target


def _check_session(session: aiohttp.ClientSession) -> None:
    """A shared session must not carry credentials to third-party media hosts."""
    carried = sorted(h.lower() for h in session.headers if h.lower() in _SECRET_HEADERS)
    if carried or session.auth is not None:
        what = ", ".join(carried) or "basic auth"
        raise ConfigError(
            f"the media session carries credentials ({what}); media hosts must get none: "
            "give the fetcher its own session"
        )


def _validate_image(path: Path, shown: str, max_pixels: int) -> tuple[int, int]:
    """Check the header's pixel count, then decode fully. Runs in a worker thread."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            width, height = img.size
            pixels = width * height
            if pixels > max_pixels:
                raise MediaError(
                    f"{shown}: image too large: {width}x{height} = {pixels} pixels > limit "
                    f"{max_pixels} (possible decompression bomb; not decoded)"
                )
            img.load()
    except Image.DecompressionBombError as exc:
        raise MediaError(f"{shown}: decompression bomb refused: {exc}") from None
    except UnidentifiedImageError:
        raise MediaError(
            f"{shown}: not a decodable image (corrupt, or not one of {', '.join(IMAGE_FORMATS)})"
        ) from None
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder fed hostile bytes may raise anything
        raise MediaError(f"{shown}: corrupt or truncated image: {exc}") from None
    return width, height


def _open_for_write(path: Path) -> BinaryIO:
    # A local disk problem (full, read-only) is a state problem, not a bad image.
    try:
        return path.open("wb")
    except OSError as exc:
        raise StateError(f"cannot write image file {path}: {exc}") from None


def _write(out: BinaryIO, chunk: bytes, path: Path) -> None:
    try:
        out.write(chunk)
    except OSError as exc:
        raise StateError(f"cannot write image file {path}: {exc}") from None


def _commit(tmp: Path, final: Path) -> None:
    """Make the file durable, then move it into place atomically."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _sha256_of(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()
