"""The shared-prefix length of a prompt, for the theoretical maximum of cached prompt tokens.

In the shared layout every analysis of one (media, variant) starts with the same tokens: the
chat template's system turn, the user turn's opening and the image (its placeholder expanded to
one token per 28 x 28 px of the resized image). With n requests on one group, at most (n - 1)
times that prefix can come from the prefix cache. :class:`PrefixCounter` counts the prefix with
the model's own tokenizer and chat template; transformers is imported lazily.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from goflow_gpu.engines.base import InferenceRequest
from goflow_gpu.errors import EngineError
from goflow_gpu.prompts.geometry import smart_resize

IMAGE_FACTOR = 28
IMAGE_PAD = "<|image_pad|>"
VISION_END = "<|vision_end|>"


def image_tokens(width: int, height: int, min_pixels: int, max_pixels: int) -> int:
    """Visual tokens of a ``width`` x ``height`` image under the processor's pixel budget."""
    h, w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)
    return (h // IMAGE_FACTOR) * (w // IMAGE_FACTOR)


class PrefixCounter:
    """Counts the tokens a shared-layout prompt shares with every analysis of its image."""

    def __init__(self, model_dir: str | Path, *, min_pixels: int, max_pixels: int) -> None:
        self.model_dir = str(model_dir)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self._processor: Any = None
        self._text_tokens: dict[str, int] = {}

    def _load(self) -> Any:
        if self._processor is None:
            try:
                from transformers import AutoProcessor

                self._processor = AutoProcessor.from_pretrained(self.model_dir)  # type: ignore[no-untyped-call]
            except Exception as exc:
                raise EngineError(
                    f"cannot load the processor of {self.model_dir!r} to count prefix tokens: {exc}"
                ) from exc
        return self._processor

    def text_tokens(self, system_prompt: str) -> int:
        """Tokens of the prefix text up to the end of the image, with one image placeholder."""
        if system_prompt not in self._text_tokens:
            processor = self._load()
            messages = [
                {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]},
            ]
            text = str(processor.apply_chat_template(messages, tokenize=False))
            cut = text.find(VISION_END)
            if cut < 0:
                raise EngineError(f"the chat template of {self.model_dir!r} has no {VISION_END}")
            prefix = text[: cut + len(VISION_END)]
            ids = processor.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            self._text_tokens[system_prompt] = len(ids)
        return self._text_tokens[system_prompt]

    def prompt(self, request: InferenceRequest) -> list[PromptToken]:
        """The prompt of ``request`` as the engine gets it, one item per token.

        Rendered with the chat template the way the engines render it (system turn, then the
        user turn with the image before or after the text). The image placeholder becomes one
        ``(image path, i)`` item per visual token: vLLM keys image blocks by the image's
        content, so two prompts share image tokens only when they show the same image.
        """
        processor = self._load()
        image: dict[str, Any] = {"type": "image"}
        text: dict[str, Any] = {"type": "text", "text": request.user_prompt}
        messages = [
            {"role": "system", "content": [{"type": "text", "text": request.system_prompt}]},
            {"role": "user", "content": [image, text] if request.image_first else [text, image]},
        ]
        rendered = str(
            processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
        before, found, after = rendered.partition(IMAGE_PAD)
        if not found:
            raise EngineError(f"the chat template of {self.model_dir!r} has no {IMAGE_PAD}")
        with Image.open(request.image_path) as picture:
            width, height = picture.size
        visual = image_tokens(width, height, self.min_pixels, self.max_pixels)
        # The placeholder sits between special tokens, so the two halves tokenize as in one go.
        encode = processor.tokenizer
        key = str(request.image_path)
        return [
            *encode(before, add_special_tokens=False)["input_ids"],
            *((key, i) for i in range(visual)),
            *encode(after, add_special_tokens=False)["input_ids"],
        ]

    def tokens(self, system_prompt: str, image_path: Path) -> int:
        """Tokens shared by every shared-layout request on this image with this system prompt."""
        with Image.open(image_path) as image:
            width, height = image.size
        # The placeholder stands for all the image tokens: count it once, replace it by them.
        return (
            self.text_tokens(system_prompt)
            - 1
            + image_tokens(width, height, self.min_pixels, self.max_pixels)
        )


PromptToken = Hashable
"""One prompt position: a text token id, or ``(image key, index)`` for the image's tokens."""


def ideal_cached(
    prompts: Iterable[Sequence[PromptToken]],
    block_size: int,
    primed: Iterable[Sequence[PromptToken]] = (),
) -> int:
    """Prompt tokens an ideal prefix cache serves for ``prompts`` sent in this order.

    Ideal: unbounded, and every earlier prompt already computed. Like vLLM's, the cache hands
    out whole blocks of ``block_size`` tokens only (a prompt's trailing partial block is
    computed every time) and never the prompt's last token, whose logits must be computed.
    ``block_size=1`` gives the raw figure: each prompt's longest common prefix with any earlier
    one, less its last token. ``primed`` prompts are in the cache before the first one (served
    earlier; not counted).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    seen: set[int] = set()
    for prompt in primed:
        seen.update(_block_keys(prompt, block_size))
    total = 0
    for prompt in prompts:
        keys = _block_keys(prompt, block_size)
        hits = 0
        for i, key in enumerate(keys):
            if key not in seen or (i + 1) * block_size > len(prompt) - 1:
                break
            hits += 1
        total += hits * block_size
        seen.update(keys)
    return total


def _block_keys(prompt: Sequence[PromptToken], block_size: int) -> list[int]:
    """One key per whole block, standing for the prefix up to its end (chained hashes)."""
    keys: list[int] = []
    key = 0
    for start in range(0, len(prompt) - block_size + 1, block_size):
        key = hash((key, tuple(prompt[start : start + block_size])))
        keys.append(key)
    return keys
