"""The transformers engine: ``Qwen2_5_VLForConditionalGeneration`` with batched ``generate``.

Concurrent :meth:`TransformersEngine.infer` calls are queued; one batcher task takes up to
``batch_size`` of them (waiting a short gather window for stragglers), and runs the batch's
``generate`` on a single dedicated thread, so the event loop stays free and batches never
overlap. Prompts are left-padded. Requests of one batch with different sampling run as
separate sub-batches; different ``max_tokens`` share one ``generate`` (up to the largest) and
each answer is cut at its own budget.

Structured decoding is not available here (``supports_json_schema = False``): the prompt text
describes the schema and QA checks the answer.

Token log-probabilities (``request.logprobs``): when any request of a ``generate`` asks,
it runs with ``output_logits=True`` (the model's raw logits of every step, before the
repetition penalty, temperature and top-p; no grammar mask here) and each asking answer gets
``log_softmax`` of its step's logits at the token it wrote. Those logits are kept for the
whole ``generate``: steps x batch x vocabulary float32 values (512 x 8 x 152k = 2.5 GB for
Qwen2.5-VL), so ask only when the confidence is wanted.

``load_format="dummy"`` builds the model from its ``config.json`` with random weights (the real
3B/7B architecture without downloads, see :func:`goflow_gpu.engines.tiny.build_random_model_dir`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from goflow_gpu.engines.base import (
    Engine,
    InferenceRequest,
    InferenceResult,
    align_token_logprobs,
    decoded_pieces,
)
from goflow_gpu.engines.chat import ChatTemplate
from goflow_gpu.engines.images import prepared_image_cache
from goflow_gpu.errors import EngineError, GoFlowError
from goflow_gpu.logs import adopt_library_handlers, get_logger

if TYPE_CHECKING:
    from PIL import Image

    from goflow_gpu.settings import Settings

log = get_logger(__name__)

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


@dataclass
class _Pending:
    request: InferenceRequest
    future: asyncio.Future[InferenceResult]
    queued_at: float


@dataclass
class _Prepared:
    request: InferenceRequest
    text: str
    image: Image.Image
    started_at: float


class TransformersEngine(Engine):
    """Qwen2.5-VL through ``transformers`` on CPU or one GPU, batching concurrent requests."""

    name: ClassVar[str] = "transformers"
    supports_json_schema: ClassVar[bool] = False
    supports_prefix_caching: ClassVar[bool] = False
    reports_cached_tokens: ClassVar[bool] = False

    def __init__(
        self,
        model: str | Path,
        *,
        model_label: str = "qwen2.5vl",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        load_format: str = "auto",
        seed: int = 0,
        max_in_flight: int | None = None,
        gather_window_s: float = 0.02,
    ) -> None:
        if batch_size < 1:
            raise EngineError(f"batch_size must be at least 1, got {batch_size}")
        self.model_path = str(model)
        self.model_label = model_label
        self.device_setting = device
        self.dtype_setting = dtype
        self.batch_size = batch_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.load_format = load_format
        self.seed = seed
        self.gather_window_s = gather_window_s
        # Enough in flight to fill the next batch while one generates.
        self.max_in_flight = max_in_flight or 2 * batch_size
        self.device = ""
        self._model: Any = None
        self._processor: Any = None
        self._template: ChatTemplate | None = None
        self.images = prepared_image_cache(min_pixels, max_pixels)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> TransformersEngine:
        """Build the engine from the typed settings (not started)."""
        return cls(
            settings.model,
            model_label=settings.model_label,
            device=settings.device,
            dtype=settings.dtype,
            batch_size=settings.batch_size,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
            load_format=settings.load_format,
            seed=settings.seed,
            max_in_flight=settings.max_in_flight,
        )

    @property
    def started(self) -> bool:
        """True while a model is loaded."""
        return self._model is not None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the processor and the model (in a thread). Idempotent."""
        async with self._start_lock:
            if self._model is not None:
                return
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="goflow-transformers"
            )
            loop = asyncio.get_running_loop()
            began = time.monotonic()
            try:
                self._processor, self._model = await loop.run_in_executor(
                    self._executor, self._load
                )
            except BaseException:
                self._executor.shutdown(wait=False)
                self._executor = None
                raise
            self._template = ChatTemplate(self._processor)
            self._queue = asyncio.Queue()
            self._batcher = asyncio.create_task(self._run_batches(), name="transformers-batcher")
            log.info(
                "engine started",
                engine=self.name,
                model=self.model_path,
                device=self.device,
                load_format=self.load_format,
                seconds=round(time.monotonic() - began, 2),
            )

    async def close(self) -> None:
        """Stop batching, fail what was not answered, and free the model. Idempotent.

        The engine can be started again afterwards.
        """
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await batcher
        queue, self._queue = self._queue, None
        while queue is not None and not queue.empty():
            pending = queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(EngineError("transformers engine was closed"))
        executor, self._executor = self._executor, None
        if executor is not None:
            # Wait for a generate still running on the thread, so its memory is really freed.
            await asyncio.to_thread(executor.shutdown, wait=True)
        if self._model is not None:
            self._model = None
            self._processor = None
            self._template = None
            self.images.clear()
            gc.collect()
            _empty_cuda_cache()
            log.info("engine closed", engine=self.name)

    # -- requests --------------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """Queue one request for the next batch and wait for its result (starts the engine)."""
        await self.start()
        queue = self._queue
        if queue is None:
            raise EngineError("transformers engine is closed")
        future: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        queue.put_nowait(_Pending(request, future, time.monotonic()))
        return await future

    async def _run_batches(self) -> None:
        assert self._queue is not None
        assert self._executor is not None
        queue, executor = self._queue, self._executor
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.gather_window_s
            while len(batch) < self.batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0 and queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), max(timeout, 0)))
                except TimeoutError:
                    break
            live = [p for p in batch if not p.future.done()]  # skip cancelled callers
            if not live:
                continue
            requests = [p.request for p in live]
            try:
                results = await loop.run_in_executor(executor, self._answer_batch, requests)
            except asyncio.CancelledError:
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(EngineError("transformers engine was closed"))
                raise
            except Exception as exc:  # noqa: BLE001 - a broken engine fails the whole batch
                error = EngineError(f"transformers generate failed: {type(exc).__name__}: {exc}")
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            for pending, result in zip(live, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)

    # -- work on the engine thread ---------------------------------------------------------

    def _load(self) -> tuple[Any, Any]:
        try:
            import torch

            # transformers is only partly typed; its classes are handled as Any here.
            transformers: Any = importlib.import_module("transformers")
        except ImportError as exc:
            raise EngineError(
                f"the transformers engine needs torch and transformers: {exc}; "
                "pip install 'goflow-gpu[transformers]'"
            ) from exc
        # transformers puts its own handler on stderr: its records go through the one pipeline.
        adopt_library_handlers()
        self.device = _resolve_device(self.device_setting, torch.cuda.is_available())
        torch_dtype = getattr(torch, _resolve_dtype(self.dtype_setting, self.device))
        torch.manual_seed(self.seed)
        try:
            processor = transformers.AutoProcessor.from_pretrained(self.model_path)
            processor.tokenizer.padding_side = "left"
            if self.load_format == "dummy":
                config = transformers.AutoConfig.from_pretrained(self.model_path)
                with torch.device(self.device):
                    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
                        config, dtype=torch_dtype
                    )
            else:
                model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    self.model_path, dtype=torch_dtype
                ).to(self.device)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise EngineError(
                f"cannot load model {self.model_path!r} with transformers: {exc}"
            ) from exc
        model.eval()
        return processor, model

    def _answer_batch(self, requests: list[InferenceRequest]) -> list[InferenceResult]:
        """Answer one batch; a request that fails on its own gets ``result.error``."""
        results: dict[str, InferenceResult] = {}
        prepared: list[_Prepared] = []
        for request in requests:
            started = time.monotonic()
            try:
                prepared.append(
                    _Prepared(
                        request,
                        self._prompt(request),
                        self.images.get(request.image_path).image,
                        started,
                    )
                )
            except GoFlowError as exc:
                results[request.request_id] = _failed(request, str(exc), started)
        # One generate() call per distinct sampling (max_tokens aside: the longest budget is used
        # and each answer is cut at its own stop).
        by_sampling: dict[tuple[float, float, float], list[_Prepared]] = {}
        for item in prepared:
            chosen = item.request.sampling
            key = (chosen.temperature, chosen.top_p, chosen.repetition_penalty)
            by_sampling.setdefault(key, []).append(item)
        for group in by_sampling.values():
            for result in self._generate_isolating_failures(group):
                results[result.request_id] = result
        return [results[r.request_id] for r in requests]

    def _generate_isolating_failures(self, group: list[_Prepared]) -> list[InferenceResult]:
        try:
            return self._generate(group)
        except (ValueError, RuntimeError, TypeError, IndexError) as exc:
            if len(group) == 1:
                item = group[0]
                message = f"generation failed for {item.request.image_path}: {exc}"
                return [_failed(item.request, message, item.started_at)]
            # One bad input fails the whole batch: answer one by one to find it.
            return [r for item in group for r in self._generate_isolating_failures([item])]

    def _generate(self, group: list[_Prepared]) -> list[InferenceResult]:
        import torch

        processor, model = self._processor, self._model
        # transformers 5 takes the pixel budget as size={shortest_edge: min, longest_edge: max}.
        size = dict(processor.image_processor.size)
        if self.min_pixels is not None:
            size["shortest_edge"] = self.min_pixels
        if self.max_pixels is not None:
            size["longest_edge"] = self.max_pixels
        inputs = processor(
            text=[item.text for item in group],
            images=[item.image for item in group],
            padding=True,
            return_tensors="pt",
            images_kwargs={"size": size},
        ).to(self.device)
        chosen = group[0].request.sampling
        budget = max(item.request.sampling.max_tokens for item in group)
        # Explicit, so the model's generation_config (repetition_penalty 1.05 for Qwen2.5-VL)
        # does not apply here when vLLM's engine would not apply it.
        sampling: dict[str, Any] = {"repetition_penalty": chosen.repetition_penalty}
        if chosen.temperature > 0:
            sampling.update(do_sample=True, temperature=chosen.temperature, top_p=chosen.top_p)
        else:
            sampling.update(do_sample=False)
        tokenizer = processor.tokenizer
        stop_ids = _stop_ids(model, tokenizer)
        want_logprobs = any(item.request.logprobs for item in group)
        if want_logprobs:
            # The raw logits of each step (output_scores would give the processed ones).
            sampling.update(output_logits=True, return_dict_in_generate=True)
        with torch.inference_mode():
            generated = model.generate(
                **inputs,
                max_new_tokens=budget,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(stop_ids),
                **sampling,
            )
        finished = time.monotonic()
        output = generated.sequences if want_logprobs else generated
        prompt_width = inputs["input_ids"].shape[1]
        chosen_logprobs = (
            _chosen_logprobs(generated.logits, output[:, prompt_width:]) if want_logprobs else None
        )
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        grids = inputs["image_grid_thw"].tolist()
        patch = int(getattr(processor.image_processor, "patch_size", 14))
        results = []
        for row, item in enumerate(group):
            new_tokens = output[row, prompt_width:].tolist()
            limit = item.request.sampling.max_tokens
            kept, finish_reason = _cut(new_tokens, stop_ids, limit)
            _, grid_h, grid_w = grids[row]
            text = tokenizer.decode(
                [t for t in kept if t not in stop_ids], skip_special_tokens=True
            )
            token_logprobs = None
            if item.request.logprobs and chosen_logprobs is not None:
                token_logprobs = _token_logprobs(
                    tokenizer, text, kept, stop_ids, chosen_logprobs[row][: len(kept)]
                )
            results.append(
                InferenceResult(
                    request_id=item.request.request_id,
                    text=text,
                    finish_reason=finish_reason,
                    prompt_tokens=int(prompt_lengths[row]),
                    generated_tokens=len(kept),
                    image_size=(int(grid_w) * patch, int(grid_h) * patch),
                    started_at=item.started_at,
                    finished_at=finished,
                    token_logprobs=token_logprobs,
                )
            )
        return results

    def _prompt(self, request: InferenceRequest) -> str:
        """System turn, then the user turn with the image first (unless ``image_first=False``)."""
        if self._template is None:
            raise EngineError("transformers engine is closed")
        return self._template.render(request)


def _resolve_device(setting: str, cuda_available: bool) -> str:
    if setting == "auto":
        return "cuda" if cuda_available else "cpu"
    if setting.startswith("cuda") and not cuda_available:
        raise EngineError(f"device {setting!r} requested but CUDA is not available here")
    return setting


def _resolve_dtype(setting: str, device: str) -> str:
    if setting == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    try:
        return _DTYPES[setting.lower()]
    except KeyError:
        raise EngineError(
            f"dtype {setting!r} is not supported: use auto, float32, bfloat16 or float16"
        ) from None


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _chosen_logprobs(step_logits: Any, new_tokens: Any) -> list[list[float]]:
    """Per row, the log-probability of the token written at each step: ``log_softmax`` of the
    step's raw logits at that token (steps after a row stopped hold padding; callers cut)."""
    import torch

    columns = []
    for step, logits in enumerate(step_logits):
        chosen = new_tokens[:, step : step + 1].to(logits.device)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        columns.append(logprobs.gather(1, chosen).squeeze(1))
    if not columns:
        return [[] for _ in range(new_tokens.shape[0])]
    rows: list[list[float]] = torch.stack(columns, dim=1).cpu().tolist()
    return rows


def _token_logprobs(
    tokenizer: Any, text: str, kept: list[int], stop_ids: set[int], logprobs: list[float]
) -> list[tuple[str, float]] | None:
    """``(text piece, logprob)`` per kept token; the stop token spells ``""``, like the text."""
    if len(logprobs) != len(kept):
        return None
    pieces = [""] * len(kept)
    spelled = [i for i, token in enumerate(kept) if token not in stop_ids]
    derived = decoded_pieces(
        lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)), [kept[i] for i in spelled]
    )
    for index, piece in zip(spelled, derived, strict=True):
        pieces[index] = piece
    return align_token_logprobs(text, pieces, logprobs)


def _cut(tokens: list[int], stop_ids: set[int], limit: int) -> tuple[list[int], str]:
    """The tokens of one answer up to its first stop token (kept) or its own budget."""
    for index, token in enumerate(tokens[:limit]):
        if token in stop_ids:
            return tokens[: index + 1], "stop"
    return tokens[:limit], "length"


def _failed(request: InferenceRequest, message: str, started: float) -> InferenceResult:
    return InferenceResult(
        request_id=request.request_id,
        text="",
        finish_reason="error",
        started_at=started,
        finished_at=time.monotonic(),
        error=message,
    )


def _empty_cuda_cache() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
