"""The engine seam: one small interface between the worker and whatever runs the model.

An engine takes :class:`InferenceRequest` objects and answers each with an
:class:`InferenceResult`. The single abstract method is :meth:`Engine.infer` (one request, awaited
concurrently by the caller); engines that batch (vLLM, transformers) batch the concurrent calls
internally. :meth:`Engine.stream` is the stream form the design describes, built on ``infer``:
it keeps up to ``max_in_flight`` requests in the engine and yields results as they finish.

Heavy libraries (torch, vLLM, transformers) are imported inside the concrete engine modules,
never here, so the CLI and the protocol layer start without them.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request, passed explicitly to every engine.

    Engines differ in what they do with an unset value: vLLM's server and transformers apply the
    model's ``generation_config.json`` (Qwen2.5-VL ships ``repetition_penalty`` 1.05, top_p and
    top_k), vLLM's in-process engine does not. Every engine sends all of these, so the same
    request samples the same way everywhere. ``repetition_penalty`` 1.0 (none) is right for JSON:
    a penalty on repeated tokens fights the braces, quotes and keys that JSON repeats.
    """

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class InferenceRequest:
    """One media x analysis question to the model.

    The prompt layout is fixed by the engines: system text, then a user turn with the image
    FIRST and ``user_prompt`` after it, so that all analyses of one image share a token prefix
    that vLLM's prefix cache reuses (``image_first=False`` exists only for the benchmark's
    comparison against the naive layout).
    """

    request_id: str
    image_path: Path
    system_prompt: str
    user_prompt: str
    json_schema: dict[str, Any] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    group_key: tuple[str, str] = ("", "")  # (media id, variant): requests sharing a prefix
    image_first: bool = True
    #: ask the engine for the log-probability of each generated token
    #: (:attr:`InferenceResult.token_logprobs`); off by default, since it costs a little
    logprobs: bool = False


@dataclass
class InferenceResult:
    """The answer to one :class:`InferenceRequest`.

    ``error`` is set (and ``text`` empty) when the engine failed this one request; the worker
    treats that like a failed QA attempt. Token counts are ``None`` where the engine cannot tell.
    ``image_size`` is the (width, height) of the image as the model saw it (after the
    processor's resize); QA maps model-space boxes back to the original image with it.
    Times are ``time.monotonic()`` values.

    ``token_logprobs`` (only when the request asked, ``request.logprobs``): one
    ``(token text, log-probability)`` pair per generated token, in order, such that
    ``"".join(t for t, _ in token_logprobs) == text``. The log-probability is the natural log of
    the probability the model gave the token it wrote, given everything before it, from the
    model's own logits: before temperature, top-p and the repetition penalty. Engines with
    structured decoding apply the grammar's mask to the logits first (vLLM does, in-process and
    served): there the probability is renormalised over the tokens the JSON schema allows at
    that point, so a token the grammar forces reads as certain (log-probability 0). A token that
    spells no text of its own (the stop token, the first bytes of a character split over two
    tokens) has the text ``""``; its probability belongs to the next token that has text.
    ``None`` when not asked for, or when the engine could not give pieces that spell ``text``
    exactly (offsets into the text are never guessed). :mod:`goflow_gpu.prompts.confidence`
    turns them into the confidence of one value of the JSON answer.
    """

    request_id: str
    text: str
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    generated_tokens: int | None = None
    image_size: tuple[int, int] | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str | None = None
    token_logprobs: list[tuple[str, float]] | None = None

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished_at - self.started_at)


class Engine(abc.ABC):
    """Base class of the inference engines.

    Capabilities are class attributes, so the worker and the benchmark can ask without loading
    anything.
    """

    name: ClassVar[str] = "base"
    supports_json_schema: ClassVar[bool] = False
    supports_prefix_caching: ClassVar[bool] = False
    reports_cached_tokens: ClassVar[bool] = False

    #: how many requests the caller should keep in flight at once
    max_in_flight: int = 16
    #: the label reported as ``modelUsed``
    model_label: str = "unknown"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model. Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model and its memory. Idempotent; cancels nothing already finished."""

    @abc.abstractmethod
    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """Answer one request. Engine failures of this request come back as ``result.error``;
        an exception means the engine itself is broken (:class:`~goflow_gpu.errors.EngineError`).
        """

    async def stream(
        self, requests: AsyncIterable[InferenceRequest]
    ) -> AsyncIterator[InferenceResult]:
        """Yield results as they finish, keeping up to ``max_in_flight`` requests running."""
        pending: set[asyncio.Task[InferenceResult]] = set()
        source = aiter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.max_in_flight:
                    try:
                        request = await anext(source)
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    pending.add(asyncio.ensure_future(self.infer(request)))
                if not pending:
                    return
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# -- token log-probabilities (shared by the engines) --------------------------------------------


def align_token_logprobs(
    text: str, pieces: Sequence[str], logprobs: Sequence[float]
) -> list[tuple[str, float]] | None:
    """``(piece, logprob)`` pairs when ``pieces`` spell ``text``, else ``None``.

    Pieces after the point where ``text`` is fully spelled are tokens the engine left out of the
    text (the stop token, written as ``"<|im_end|>"`` by some servers): they are kept, one per
    generated token, with the text ``""``. Anything else that does not spell ``text`` exactly
    gives ``None``: wrong offsets would attach probabilities to the wrong values.
    """
    if len(pieces) != len(logprobs):
        return None
    kept: list[str] = []
    at = 0
    for piece in pieces:
        if at == len(text) and piece:
            kept.append("")  # after the text: a stop or special token the text leaves out
            continue
        if not text.startswith(piece, at):
            return None
        kept.append(piece)
        at += len(piece)
    if at != len(text):
        return None
    return [(piece, float(value)) for piece, value in zip(kept, logprobs, strict=True)]


def decoded_pieces(decode: Callable[[list[int]], str], token_ids: Sequence[int]) -> list[str]:
    """The text each token adds, found with the tokenizer's ``decode`` (one short call a token).

    Byte-level BPE splits some characters over several tokens; alone, each decodes to U+FFFD.
    Tokens are decoded from the last point where all characters were complete: while the text
    still ends in an unfinished character the tokens get ``""``, and the token that completes it
    gets the whole character. ``decode`` should skip special tokens, like the engine's text.
    """
    pieces: list[str] = []
    clean = 0  # index of the first token after the last complete character
    for index in range(len(token_ids)):
        window = decode(list(token_ids[clean : index + 1]))
        if window.endswith("\ufffd") and index + 1 < len(token_ids):
            pieces.append("")  # an unfinished character: wait for the token that completes it
            continue
        pieces.append(window)
        clean = index + 1
    return pieces
