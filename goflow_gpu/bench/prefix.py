"""The shared-prefix length of a prompt, for the theoretical maximum of cached prompt tokens.

In the shared layout every analysis of one (media, variant) starts with the same tokens: the
chat template's system turn, the user turn's opening and the image (its placeholder expanded to
one token per 28 x 28 px of the resized image). With n requests on one group, at most (n - 1)
times that prefix can come from the prefix cache. :class:`PrefixCounter` counts the prefix with
the model's own tokenizer and chat template; transformers is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

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
