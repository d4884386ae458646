"""The OpenAI-compatible engine: ``POST {base}/v1/chat/completions`` to vLLM serve, SGLang, Ollama.

This is how one worker uses a remote inference server, and how a fleet scales past one node
(many replicas behind one URL). Requests run concurrently up to ``max_in_flight``; the server
batches them.

The request: the system prompt, then a user turn holding the image (a base64 JPEG data URL)
FIRST and the analysis text after it, so that servers with prefix caching reuse the image's KV
blocks; ``response_format`` with the analysis type's JSON schema (``strict``); ``max_tokens``,
``temperature`` and ``seed``. The image is resized here, before upload, to the size Qwen2.5-VL's
processor would pick for ``min_pixels``/``max_pixels`` (a multiple of 28 on both sides). A server
then has nothing left to resize whatever its own pixel settings (unless they are narrower), so
``image_size`` in the result is the space the model's box coordinates refer to.

Token log-probabilities (``request.logprobs``): the request then carries ``"logprobs": true``
(no ``top_logprobs``: only the written token's own), and the answer's
``choices[0].logprobs.content[]`` items (``token``, ``logprob``, ``bytes``) become
``result.token_logprobs``. What the value means is the server's business: vLLM serve gives its
``raw_logprobs`` (the model's logits before temperature and penalties, after the JSON grammar's
mask, see :meth:`~goflow_gpu.engines.vllm_engine.VllmEngine.sampling_params`) and writes the
stop token as ``"<|im_end|>"`` (kept with the text ``""``); a server that splits a character's
bytes over tokens is read through each item's ``bytes``. A server that ignores the flag gives
``None``.

Failures: connection errors, timeouts, 429 and 5xx are retried with backoff (Retry-After
honoured); when they outlast the retries the engine raises :class:`~goflow_gpu.errors.EngineError`
(the job stops resumably: a passing server fault must never become a failed result). A request
the server refuses (4xx) comes back as ``result.error`` with the server's reason;
a server that cannot be reached at all raises :class:`~goflow_gpu.errors.EngineError`, since no
other request can succeed either. The API key (optional, from the environment variable named by
``openai_api_key_env``) is sent as a bearer token and never logged.

Differences between servers that matter here (as of vLLM 0.1x, SGLang 0.4/0.5, Ollama 0.5+):

- **vLLM serve**: ``response_format`` ``json_schema`` and ``json_object`` both work (structured
  outputs backend, xgrammar by default; ``--structured-outputs-config`` sets
  ``disable_any_whitespace``). ``usage.prompt_tokens_details.cached_tokens`` is only filled when
  the server runs with ``--enable-prompt-tokens-details``; prefix caching itself is on by
  default. Image resizing follows ``--mm-processor-kwargs`` (min/max pixels). Start it with
  ``--limit-mm-per-prompt '{"image": 1, "video": 0}'``: the default video limit makes vLLM size
  its encoder cache and memory-profiling run for video items nobody sends. ``repetition_penalty``
  and ``top_p`` are sent explicitly (the server would otherwise apply the model's
  generation_config, 1.05 for Qwen2.5-VL), and ``--max-num-batched-tokens 16384`` on an
  H100/H200 matches the in-process engine's configs.
- **SGLang**: ``json_schema`` works (xgrammar by default), plus its own ``regex``/``ebnf``
  extensions. Cached prompt tokens are reported only with ``--enable-cache-report``; RadixAttention
  caches prefixes, images included. Qwen2.5-VL resizing uses the model's processor defaults.
- **Ollama** (``/v1`` compatibility layer): ``json_schema`` is mapped onto Ollama's ``format``
  (structured outputs); older versions only honour ``json_object``. No cached-token figures.
  Images must be base64 data URLs (no remote URLs); Ollama resizes images by its own rules, so
  sending an already-resized image is what keeps coordinates predictable. Model names look like
  ``qwen2.5vl:7b``; ``/v1/models`` lists them.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import io
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from goflow_gpu.engines.base import (
    Engine,
    InferenceRequest,
    InferenceResult,
    align_token_logprobs,
)
from goflow_gpu.engines.images import ImageCache, prepare_image
from goflow_gpu.errors import ConfigError, EngineError, MediaError, TransientError
from goflow_gpu.logs import get_logger, register_secret
from goflow_gpu.retry import RetryPolicy, call_with_retry, parse_retry_after

if TYPE_CHECKING:
    from goflow_gpu.settings import Settings

log = get_logger(__name__)

JPEG_QUALITY = 90
ENDPOINT = "POST chat/completions"
_SCHEMA_NAME = re.compile(r"[^a-zA-Z0-9_-]+")


class OpenAIEngine(Engine):
    """Any OpenAI-compatible chat-completions server (vLLM serve, SGLang, Ollama)."""

    name = "openai"
    supports_json_schema = True
    # Whether the server caches prefixes is its business; the layout here lets it.
    supports_prefix_caching = True
    reports_cached_tokens = False  # only some servers, behind a flag: see the module docstring

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        model_label: str = "qwen2.5vl",
        api_key: str | None = None,
        max_in_flight: int = 16,
        request_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        retries: int = 3,
        seed: int = 0,
        min_pixels: int = 256 * 28 * 28,
        max_pixels: int = 1280 * 28 * 28,
    ) -> None:
        self.base_url = _api_root(base_url)
        self.model = model
        self.model_label = model_label
        self._api_key = api_key or None
        register_secret(self._api_key)  # redacted from every log line, like the GoFlow key
        self.max_in_flight = max_in_flight
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.retry_policy = RetryPolicy(
            retries=retries, base=0.5, cap=10.0, timeout=request_timeout
        )
        self.seed = seed
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.served_model: str | None = None
        # The JPEG data URL of each image, encoded once for all its analyses.
        self.images: ImageCache[tuple[str, tuple[int, int]]] = ImageCache(
            self._encode_image, lambda encoded: len(encoded[0])
        )
        self._session: aiohttp.ClientSession | None = None
        self._semaphore = asyncio.Semaphore(max_in_flight)
        self._start_lock = asyncio.Lock()

    def __repr__(self) -> str:
        # Never show the key.
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.model!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIEngine:
        """Build the engine from settings (``openai_base_url`` is required)."""
        if not settings.openai_base_url:
            raise ConfigError(
                "engine 'openai' needs openai_base_url (GOFLOW_OPENAI_BASE_URL), "
                "e.g. http://127.0.0.1:8000/v1"
            )
        return cls(
            base_url=settings.openai_base_url,
            model=settings.model,
            model_label=settings.model_label,
            api_key=os.environ.get(settings.openai_api_key_env),
            max_in_flight=settings.max_in_flight,
            seed=settings.seed,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session and find the served model name. Idempotent.

        Raises :class:`EngineError` when the server cannot be reached or does not serve
        ``model`` (and serves more than one model to choose from).
        """
        async with self._start_lock:
            if self._session is not None and self.served_model is not None:
                return
            if self._session is None:
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                self._session = aiohttp.ClientSession(headers=headers)
            self.served_model = await self._resolve_model()
            log.info("openai engine ready", base_url=self.base_url, model=self.served_model)

    async def close(self) -> None:
        """Close the HTTP session. Idempotent."""
        session, self._session = self._session, None
        self.served_model = None
        if session is not None:
            await session.close()

    async def _resolve_model(self) -> str:
        url = f"{self.base_url}/models"
        try:
            body = await self._with_retry(lambda: self._get_json(url))
        except TransientError as exc:
            raise EngineError(
                f"cannot reach the OpenAI-compatible server at {self.base_url}: {exc}"
            ) from exc
        except EngineError as exc:
            # /models is optional in practice: fall back to the configured name.
            log.warning("model list unavailable", base_url=self.base_url, error=str(exc))
            return self.model
        served = [str(m.get("id")) for m in body.get("data", []) if isinstance(m, dict)]
        if self.model in served or not served:
            return self.model
        if len(served) == 1:
            log.info("using the only served model", configured=self.model, served=served[0])
            return served[0]
        raise EngineError(
            f"{self.base_url} does not serve model {self.model!r}; it serves: {', '.join(served)}"
        )

    # -- inference ------------------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """Send one request; at most ``max_in_flight`` run at once."""
        if self.served_model is None:
            await self.start()
        async with self._semaphore:
            started = time.monotonic()
            try:
                data_url, image_size = await self.images.aget(request.image_path)
            except MediaError as exc:
                return _failed(request, started, str(exc))
            body = self._body(request, data_url)
            url = f"{self.base_url}/chat/completions"
            try:
                answer = await self._with_retry(lambda: self._post_json(url, body))
            except TransientError as exc:
                # The server is down or overloaded past the retries: not this request's fault,
                # and a failed result would be lost for good. Stop the job (resumable); the
                # orchestrator restarts the worker and the request is asked again.
                if exc.cause == "network":
                    raise EngineError(
                        f"cannot reach the OpenAI-compatible server at {self.base_url}: {exc}"
                    ) from exc
                raise EngineError(
                    f"the OpenAI-compatible server at {self.base_url} kept failing: {exc}"
                ) from exc
            except EngineError as exc:
                return _failed(request, started, str(exc), image_size)
            return _parse_answer(request, answer, started, image_size)

    def _encode_image(self, path: Path) -> tuple[str, tuple[int, int]]:
        prepared = prepare_image(path, self.min_pixels, self.max_pixels)
        buffer = io.BytesIO()
        prepared.image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f"data:image/jpeg;base64,{encoded}", prepared.size

    def _body(self, request: InferenceRequest, data_url: str) -> dict[str, Any]:
        image_part = {"type": "image_url", "image_url": {"url": data_url}}
        text_part = {"type": "text", "text": request.user_prompt}
        user = [image_part, text_part] if request.image_first else [text_part, image_part]
        body: dict[str, Any] = {
            "model": self.served_model or self.model,
            "messages": [
                {"role": "system", "content": request.system_prompt},
                {"role": "user", "content": user},
            ],
            "max_tokens": request.sampling.max_tokens,
            "temperature": request.sampling.temperature,
            "top_p": request.sampling.top_p,
            # vLLM's server takes it as an extra sampling parameter; without it the server
            # applies the model's generation_config (1.05 for Qwen2.5-VL).
            "repetition_penalty": request.sampling.repetition_penalty,
            "seed": self.seed,
        }
        if request.logprobs:
            # The written token's own log-probability only (top_logprobs would add others).
            body["logprobs"] = True
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": _schema_name(request.json_schema),
                    "schema": request.json_schema,
                    "strict": True,
                },
            }
        return body

    # -- HTTP -----------------------------------------------------------------------------------

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.request_timeout, connect=self.connect_timeout)

    async def _get_json(self, url: str) -> dict[str, Any]:
        assert self._session is not None
        try:
            async with self._session.get(url, timeout=self._timeout()) as response:
                return await _read_json(response, "GET models")
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise _network_error("GET models", url, exc) from exc
        except TimeoutError as exc:
            raise TransientError(
                f"GET {url} timed out", endpoint="GET models", cause="timeout"
            ) from exc

    async def _post_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            raise EngineError("the OpenAI engine is closed")
        try:
            async with self._session.post(url, json=body, timeout=self._timeout()) as response:
                return await _read_json(response, ENDPOINT)
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise _network_error(ENDPOINT, url, exc) from exc
        except TimeoutError as exc:
            raise TransientError(
                f"POST {url} timed out after {self.request_timeout:g} s",
                endpoint=ENDPOINT,
                cause="timeout",
            ) from exc

    async def _with_retry(self, call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run ``call`` under the engine's retry policy (TransientError is retried)."""
        return await call_with_retry(lambda _attempt: call(), self.retry_policy, endpoint=ENDPOINT)


async def _read_json(response: aiohttp.ClientResponse, endpoint: str) -> dict[str, Any]:
    status = response.status
    if status == 429 or status >= 500:
        raise TransientError(
            f"{endpoint}: server answered {status}: {await _error_detail(response)}",
            endpoint=endpoint,
            status=status,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            cause="429" if status == 429 else "5xx",
        )
    if status >= 400:
        detail = await _error_detail(response)
        raise EngineError(f"{endpoint}: server refused the request ({status}): {detail}")
    try:
        body = await response.json(content_type=None)
    except ValueError as exc:
        raise EngineError(f"{endpoint}: the {status} answer is not JSON") from exc
    if not isinstance(body, dict):
        raise EngineError(f"{endpoint}: server answered {status} with a JSON {type(body).__name__}")
    return body


async def _error_detail(response: aiohttp.ClientResponse) -> str:
    text = (await response.text(errors="replace")).strip()
    return text[:500] or response.reason or "no detail"


def _network_error(endpoint: str, url: str, exc: BaseException) -> TransientError:
    return TransientError(
        f"{endpoint}: cannot connect to {url}: {type(exc).__name__}: {exc}",
        endpoint=endpoint,
        cause="network",
    )


def _api_root(base_url: str) -> str:
    """``http://h:8000``, ``http://h:8000/`` and ``http://h:8000/v1`` all give ``.../v1``."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else f"{root}/v1"


def _schema_name(schema: dict[str, Any]) -> str:
    # OpenAI's rule for json_schema.name: [a-zA-Z0-9_-], at most 64 characters.
    name = _SCHEMA_NAME.sub("_", str(schema.get("title") or "")).strip("_")[:64]
    return name or "analysis"


def _failed(
    request: InferenceRequest,
    started: float,
    error: str,
    image_size: tuple[int, int] | None = None,
) -> InferenceResult:
    return InferenceResult(
        request_id=request.request_id,
        text="",
        finish_reason="error",
        image_size=image_size,
        started_at=started,
        finished_at=time.monotonic(),
        error=error,
    )


def _parse_answer(
    request: InferenceRequest,
    answer: dict[str, Any],
    started: float,
    image_size: tuple[int, int],
) -> InferenceResult:
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return _failed(request, started, "the server's answer has no choices", image_size)
    choice = choices[0]
    message = choice.get("message") or {}
    text = message.get("content") if isinstance(message, dict) else None
    raw_usage = answer.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    text = text if isinstance(text, str) else ""
    return InferenceResult(
        request_id=request.request_id,
        text=text,
        finish_reason=str(choice.get("finish_reason") or "stop"),
        prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
        cached_tokens=_int_or_none(cached),
        generated_tokens=_int_or_none(usage.get("completion_tokens")),
        image_size=image_size,
        started_at=started,
        finished_at=time.monotonic(),
        token_logprobs=_token_logprobs(text, choice.get("logprobs")) if request.logprobs else None,
    )


def _token_logprobs(text: str, logprobs: object) -> list[tuple[str, float]] | None:
    """``choices[0].logprobs`` as ``(text, logprob)`` pairs that spell ``text``, else ``None``.

    The items' ``token`` texts are used when they spell the text. Otherwise, when every item
    has its ``bytes``, the texts are rebuilt from those: a character whose bytes are split over
    tokens belongs to the token that completes it (the others get ``""``).
    """
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    pieces: list[str] = []
    values: list[float] = []
    raw: list[bytes] | None = []
    for item in content:
        if not isinstance(item, dict):
            return None
        token, value = item.get("token"), item.get("logprob")
        if not isinstance(token, str) or not isinstance(value, int | float):
            return None
        if isinstance(value, bool):
            return None
        pieces.append(token)
        values.append(float(value))
        data = item.get("bytes")
        if raw is not None and isinstance(data, list) and all(_is_byte(b) for b in data):
            raw.append(bytes(data))
        else:
            raw = None
    aligned = align_token_logprobs(text, pieces, values)
    if aligned is None and raw is not None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        rebuilt = [decoder.decode(data) for data in raw]
        aligned = align_token_logprobs(text, rebuilt, values)
    return aligned


def _is_byte(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 256


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
