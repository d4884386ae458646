"""The vLLM engine: an in-process ``AsyncLLM`` that batches every concurrent :meth:`infer` call.

vLLM's scheduler does continuous batching across all requests in flight, so the worker simply
awaits many :meth:`VllmEngine.infer` calls at once (see :meth:`Engine.stream`). What makes a job
cheap is the prompt layout: the shared system prompt, then the image, then the analysis text.
With automatic prefix caching on, the 2nd..nth analysis of an image reuse the KV blocks of the
image (``cached_tokens`` in the result shows it).

Settings used: ``model`` (a hub id from the Hugging Face cache or a local directory), ``dtype``,
``max_model_len``, ``max_num_seqs``, ``gpu_memory_utilization`` (on vLLM's CPU build it sizes the
KV cache in RAM), ``tensor_parallel_size``, ``data_parallel_size``, ``seed``, ``load_format``
(``dummy`` = random weights of the real architecture), ``enforce_eager``, ``min_pixels`` /
``max_pixels`` (the image processor's resize bounds) and ``max_in_flight``.

Per request, the main process does as little as it can, since its CPU time is taken from
feeding the engine: each image file is decoded and resized once (:mod:`~goflow_gpu.engines.images`,
an LRU bounded in bytes) and handed over at the size the processor picks, named by a content
digest in ``multi_modal_uuids`` so vLLM neither re-hashes its pixels nor re-runs the image
processor for the 2nd..25th analysis; each chat template is rendered once per distinct prompt
(:class:`~goflow_gpu.engines.chat.ChatTemplate`).

Structured outputs use xgrammar with ``disable_any_whitespace``: the JSON comes out compact, so
the token budget is spent on content rather than padding.

Token log-probabilities (``request.logprobs``, see :meth:`VllmEngine.sampling_params`): vLLM's
``logprobs=0``, i.e. the sampled token's own log-probability at each position and no
alternatives, in vLLM's default ``logprobs_mode`` ``raw_logprobs``.

vLLM is imported inside :meth:`VllmEngine.start`, never at module import, so the CLI starts
without it. vLLM's exceptions are mapped here: a failure of one request becomes
``result.error``; a dead or unloadable engine raises :class:`~goflow_gpu.errors.EngineError`.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import time
import uuid
from typing import TYPE_CHECKING, Any

from goflow_gpu.engines.base import (
    Engine,
    InferenceRequest,
    InferenceResult,
    align_token_logprobs,
    decoded_pieces,
)
from goflow_gpu.engines.chat import ChatTemplate
from goflow_gpu.engines.images import PreparedImage, prepared_image_cache
from goflow_gpu.errors import EngineError, MediaError
from goflow_gpu.logs import adopt_library_handlers, get_logger

if TYPE_CHECKING:
    from goflow_gpu.settings import Settings

log = get_logger(__name__)


#: Every vLLM name this engine imports, as (module, name). The GPU image imports them all at build
#: time (``check_vllm_imports``), CI imports them against the CPU build of the same vLLM line, and
#: a test keeps this list equal to the imports in this file: a renamed API fails a build or CI,
#: not a node at 3 a.m.
VLLM_NAMES: tuple[tuple[str, str], ...] = (
    ("vllm.config", "StructuredOutputsConfig"),
    ("vllm.engine.arg_utils", "AsyncEngineArgs"),
    ("vllm.sampling_params", "RequestOutputKind"),
    ("vllm.sampling_params", "SamplingParams"),
    ("vllm.sampling_params", "StructuredOutputsParams"),
    ("vllm.v1.engine.async_llm", "AsyncLLM"),
    ("vllm.v1.engine.exceptions", "EngineDeadError"),
)


def check_vllm_imports() -> str:
    """Import every name of :data:`VLLM_NAMES`; returns vLLM's version, raises ImportError naming
    the first one that is missing."""
    import importlib

    import vllm

    for module, name in VLLM_NAMES:
        if not hasattr(importlib.import_module(module), name):
            raise ImportError(f"vLLM {vllm.__version__} has no {module}.{name}")
    return str(vllm.__version__)


class VllmEngine(Engine):
    """Qwen2.5-VL on an in-process vLLM ``AsyncLLM`` (continuous batching, prefix caching)."""

    name = "vllm"
    supports_json_schema = True
    supports_prefix_caching = True
    reports_cached_tokens = True

    def __init__(
        self,
        *,
        model: str,
        model_label: str = "qwen2.5vl",
        dtype: str = "auto",
        max_model_len: int = 16384,
        max_num_seqs: int = 64,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        seed: int = 0,
        load_format: str = "auto",
        enforce_eager: bool = False,
        min_pixels: int = 256 * 28 * 28,
        max_pixels: int = 1280 * 28 * 28,
        max_in_flight: int = 64,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.model_label = model_label
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.data_parallel_size = data_parallel_size
        self.seed = seed
        self.load_format = load_format
        self.enforce_eager = enforce_eager
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_in_flight = max_in_flight
        self.max_num_batched_tokens = max_num_batched_tokens
        self._llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self._template: ChatTemplate | None = None  # the processor's chat template, once loaded
        self._tokenizer: Any = None  # the processor's tokenizer, once loaded (token texts)
        self.images = prepared_image_cache(min_pixels, max_pixels)
        self._start_lock = asyncio.Lock()
        self._closed = False
        self._in_flight: set[str] = set()
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]

    @classmethod
    def from_settings(cls, settings: Settings) -> VllmEngine:
        """Build the engine from settings; nothing is loaded until :meth:`start`."""
        return cls(
            model=settings.model,
            model_label=settings.model_label,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            data_parallel_size=settings.data_parallel_size,
            seed=settings.seed,
            load_format=settings.load_format,
            enforce_eager=settings.enforce_eager,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
            max_in_flight=settings.max_in_flight,
            max_num_batched_tokens=settings.max_num_batched_tokens,
        )

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of vLLM's ``AsyncEngineArgs`` this engine is built with.

        Spelled out rather than left to vLLM's defaults, which differ by entry point:
        ``AsyncLLM.from_engine_args`` runs under ``UsageContext.ENGINE_CONTEXT``, for which
        ``EngineArgs.get_batch_defaults`` has no entry, so ``max_num_batched_tokens`` would fall
        back to ``SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS`` (2048: at most one ~1000-1280
        token image per scheduler step) where ``LLM()`` gets 16384 on an H100/H200. The configs
        set it per GPU (``max_num_batched_tokens``). ``video: 0`` keeps vLLM from sizing the
        encoder cache and the memory-profiling run for video items nobody sends.
        """
        kwargs: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "seed": self.seed,
            "load_format": self.load_format,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": True,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            "mm_processor_kwargs": {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
            "disable_log_stats": True,
        }
        if self.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        return kwargs

    def data_parallel_rank(self, request: InferenceRequest) -> int | None:
        """With data parallelism, the rank that serves every request of one (media, variant).

        vLLM's in-process client balances by load, which would spread the 25 analyses of one
        image over the ranks and encode and prefill the image on each; a stable hash of the
        group key sends them all to one rank, where the prefix cache holds the image.
        """
        if self.data_parallel_size <= 1:
            return None
        digest = hashlib.blake2b("\0".join(request.group_key).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.data_parallel_size

    @property
    def scheduler_budget(self) -> int | None:
        """``max_num_batched_tokens`` as the started engine resolved it (None before start)."""
        llm = self._llm
        if llm is None:
            return None
        return int(llm.vllm_config.scheduler_config.max_num_batched_tokens)

    @property
    def unfinished_requests(self) -> int:
        """Requests vLLM holds right now (queued or running); 0 when not started (metrics)."""
        llm = self._llm
        return int(llm.get_num_unfinished_requests()) if llm is not None else 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model into an ``AsyncLLM``. Idempotent; raises :class:`EngineError`."""
        async with self._start_lock:
            if self._llm is not None:
                return
            if self._closed:
                raise EngineError("the vLLM engine was closed; create a new one")
            began = time.monotonic()
            # Loading takes seconds to minutes: keep the event loop (heartbeats, downloads) alive.
            # AsyncLLM starts its output handler on the first request when built off the loop.
            await asyncio.to_thread(self._load)
            log.info(
                "vllm engine ready",
                model=self.model,
                load_seconds=round(time.monotonic() - began, 1),
            )

    def _load(self) -> None:
        # The engine is stored on self, never returned: the executor's futures and frames that
        # carried a return value outlive the call, and would pin the AsyncLLM after close().
        processor, args = self._prepare()
        self._template = ChatTemplate(processor)
        self._tokenizer = getattr(processor, "tokenizer", None)
        self._llm = _build_async_llm(self.model, args)

    def structured_outputs_config(self) -> Any:
        """xgrammar with compact JSON: the token budget goes to content, not whitespace padding."""
        from vllm.config import StructuredOutputsConfig

        return StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)

    def _prepare(self) -> tuple[Any, Any]:
        try:
            from transformers import AutoProcessor
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401 - import it here
        except ImportError as exc:
            raise EngineError(f"the vllm engine needs vllm and transformers: {exc}") from exc
        # Handlers vLLM (when VLLM_CONFIGURE_LOGGING is on) and transformers put on stdout or
        # stderr bypass the one pipeline (goflow_gpu.logs): their records go through it instead.
        adopt_library_handlers()
        args = AsyncEngineArgs(
            **self.engine_kwargs(), structured_outputs_config=self.structured_outputs_config()
        )
        try:
            # The chat template lives with the processor (chat_template.json), not the tokenizer.
            processor = AutoProcessor.from_pretrained(self.model)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise EngineError(f"cannot load the processor of model {self.model!r}: {exc}") from exc
        return processor, args

    async def close(self) -> None:
        """Shut the engine (and its engine-core process) down and free its memory. Idempotent.

        Requests still running end with ``result.error`` ("aborted: the engine was closed").
        """
        self._closed = True
        async with self._start_lock:
            llm, self._llm, self._template = self._llm, None, None
            self._tokenizer = None
            self.images.clear()
            if llm is None:
                return
            if self._in_flight:
                await _abort_quietly(llm, list(self._in_flight))
            # Stop the output handler before the engine core goes away; otherwise it sees the
            # dead core and logs an error on every normal shutdown.
            handler = getattr(llm, "output_handler", None)
            if isinstance(handler, asyncio.Task):
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
            await asyncio.to_thread(llm.shutdown)
            del llm
            gc.collect()
            _empty_device_cache()
            log.info("vllm engine closed", model=self.model)

    async def reset_caches(self) -> None:
        """Empty vLLM's prefix and multimodal caches and this engine's image cache (benchmarks:
        each measured run starts cold). Call only with no request in flight."""
        self.images.clear()
        llm = self._llm
        if llm is not None:
            await llm.reset_prefix_cache()
            await llm.reset_mm_cache()

    # -- inference ------------------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """Answer one request; concurrent calls are batched by vLLM's scheduler.

        Cancelling the awaiting task aborts the request inside vLLM, freeing its KV blocks.
        """
        started = time.monotonic()
        if self._llm is None:
            await self.start()
        llm, template = self._llm, self._template
        if llm is None or template is None:  # closed while starting
            raise EngineError("the vLLM engine is closed")
        try:
            image = await self.images.aget(request.image_path)
        except MediaError as exc:
            return InferenceResult(
                request.request_id, "", "error", started_at=started,
                finished_at=time.monotonic(), error=str(exc),
            )  # fmt: skip
        image_size = image.size
        prompt = self.prompt(request, image, template)
        params = self.sampling_params(request)
        # vLLM needs unique ids; the worker's ids may repeat across QA retries of one combination.
        vllm_id = f"{request.request_id}-{self._id_prefix}-{next(self._ids)}"
        final: Any = None
        from vllm.v1.engine.exceptions import EngineDeadError

        self._in_flight.add(vllm_id)
        try:
            rank = self.data_parallel_rank(request)
            extra = {"data_parallel_rank": rank} if rank is not None else {}
            async for output in llm.generate(prompt, params, vllm_id, **extra):
                final = output
        except asyncio.CancelledError:
            # generate() aborts on cancellation itself; abort again by our id in case the
            # cancellation landed before its collector existed (abort of an unknown id is a no-op).
            await asyncio.shield(_abort_quietly(llm, vllm_id))
            raise
        except EngineDeadError as exc:
            raise EngineError(f"the vLLM engine died: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any other vLLM failure is this request's
            return InferenceResult(
                request.request_id, "", "error", image_size=image_size, started_at=started,
                finished_at=time.monotonic(), error=f"vLLM rejected the request: {_describe(exc)}",
            )  # fmt: skip
        finally:
            self._in_flight.discard(vllm_id)
        finished = time.monotonic()
        if final is None or not final.outputs:
            return InferenceResult(
                request.request_id, "", "error", image_size=image_size, started_at=started,
                finished_at=finished, error="vLLM returned no output",
            )  # fmt: skip
        completion = final.outputs[0]
        if completion.finish_reason == "abort":
            return InferenceResult(
                request.request_id, completion.text, "abort", image_size=image_size,
                started_at=started, finished_at=finished,
                error="aborted: the engine was closed while the request ran",
            )  # fmt: skip
        return InferenceResult(
            request_id=request.request_id,
            text=completion.text,
            finish_reason=str(completion.finish_reason or "stop"),
            prompt_tokens=len(final.prompt_token_ids or ()),
            cached_tokens=final.num_cached_tokens,
            generated_tokens=len(completion.token_ids),
            image_size=image_size,
            started_at=started,
            finished_at=finished,
            token_logprobs=self.token_logprobs(completion) if request.logprobs else None,
        )

    def token_logprobs(self, completion: Any) -> list[tuple[str, float]] | None:
        """The (text, logprob) of each token of a finished ``CompletionOutput``, or ``None``.

        With ``RequestOutputKind.FINAL_ONLY`` (see :meth:`sampling_params`) the one output
        ``generate`` yields holds the whole answer: ``token_ids``, and ``logprobs`` as one
        ``{token_id: Logprob}`` dict per generated token (the stop token included), the sampled
        token's entry always present. vLLM's ``decoded_token`` texts are used when they spell
        the text (the stop token's ``"<|im_end|>"`` becomes ``""``); otherwise the texts are
        derived again with the tokenizer, and ``None`` is returned when even those do not.
        """
        token_ids = list(completion.token_ids)
        positions = completion.logprobs
        if positions is None or len(positions) != len(token_ids):
            return None
        pieces: list[str] = []
        values: list[float] = []
        for token_id, position in zip(token_ids, positions, strict=True):
            entry = position.get(token_id) if position else None
            if entry is None:
                return None
            pieces.append(entry.decoded_token or "")
            values.append(float(entry.logprob))
        text = completion.text
        aligned = align_token_logprobs(text, pieces, values)
        tokenizer = self._tokenizer
        if aligned is None and tokenizer is not None:
            derived = decoded_pieces(
                lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)), token_ids
            )
            aligned = align_token_logprobs(text, derived, values)
        return aligned

    @staticmethod
    def prompt(request: InferenceRequest, image: PreparedImage, template: ChatTemplate) -> Any:
        """vLLM's prompt dict for ``request``: the rendered chat text and the prepared image.

        The image is already at the size the processor picks, and ``multi_modal_uuids`` names it
        by its content, so vLLM neither hashes its pixels nor runs the image processor again for
        the 2nd..25th analysis of one image (its processor cache is keyed by that name).
        """
        return {
            "prompt": template.render(request),
            "multi_modal_data": {"image": image.image},
            "multi_modal_uuids": {"image": [image.uuid]},
        }

    @property
    def template(self) -> ChatTemplate:
        """The loaded chat template; raises :class:`EngineError` before :meth:`start`."""
        if self._template is None:
            raise EngineError("the vLLM engine is not started")
        return self._template

    def sampling_params(self, request: InferenceRequest) -> Any:
        """vLLM's ``SamplingParams`` for ``request``.

        ``output_kind=FINAL_ONLY``: ``generate`` yields one output, when the request finishes,
        with the whole text and, when asked, every token's log-probability.

        ``logprobs=0`` when the request asks for token log-probabilities (``None`` otherwise:
        nothing is computed). vLLM always returns the sampled token's log-probability and adds
        the ``logprobs`` most likely others; 0 asks for no others. The engine's
        ``logprobs_mode`` is left at vLLM's default, ``raw_logprobs``: ``log_softmax`` of the
        model's logits before temperature, top-p/top-k and the repetition penalty, i.e. the
        model's own belief, not the distribution the sampler reshaped (temperature neither
        sharpens nor flattens it). One limit: the model runner applies the structured
        output grammar's bitmask to the logits in place before the sampler runs, so "raw" is
        after the grammar's mask. Under a JSON schema the probability is renormalised over the
        tokens the grammar allows there; a token the grammar forces (only one allowed) reads
        as log-probability 0, and an enum's value is weighed only against the other values of
        the enum. For free-text values (most of the vocabulary allowed) the mask changes little.
        """
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        structured = (
            StructuredOutputsParams(json=request.json_schema)
            if request.json_schema is not None
            else None
        )
        return SamplingParams(
            max_tokens=request.sampling.max_tokens,
            temperature=request.sampling.temperature,
            top_p=request.sampling.top_p,
            repetition_penalty=request.sampling.repetition_penalty,
            seed=self.seed,
            structured_outputs=structured,
            output_kind=RequestOutputKind.FINAL_ONLY,
            logprobs=0 if request.logprobs else None,
        )


def _build_async_llm(model: str, args: Any) -> Any:
    from vllm.v1.engine.async_llm import AsyncLLM

    try:
        return AsyncLLM.from_engine_args(args)
    except Exception as exc:
        raise EngineError(f"vLLM could not load model {model!r}: {exc}") from exc


async def _abort_quietly(llm: Any, request_id: str | list[str]) -> None:
    try:
        await llm.abort(request_id)
    except Exception as exc:  # noqa: BLE001 - best effort while already cancelling
        log.warning("vllm abort failed", request_id=request_id, error=_describe(exc))


def _describe(exc: BaseException) -> str:
    # EngineGenerateError carries its reason in __cause__.
    cause = exc.__cause__
    text = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if cause is not None:
        text += f" ({type(cause).__name__}: {cause})"
    return text


def _empty_device_cache() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
