"""The chat-template text of a request, rendered once per distinct prompt.

The in-process engines (vLLM, transformers) render the model's chat template themselves: the
system turn, then the user turn with the image placeholder FIRST and the analysis text after it
(``image_first=False`` only for the benchmark's naive layout). Rendering is a Jinja template run;
a job renders the same 25 (system, analysis) pairs once per image, so :class:`ChatTemplate` keeps
the rendered text of recent prompts (QA re-asks add their reasons, hence a bound, not a dict).
"""

from __future__ import annotations

import functools
from typing import Any

from goflow_gpu.engines.base import InferenceRequest

#: distinct prompts kept: 25 analyses x variants, plus QA re-asks in flight
RENDERED_KEPT = 1024


def chat_messages(system_prompt: str, user_prompt: str, image_first: bool) -> list[dict[str, Any]]:
    """The messages of one request, image placeholder included (no pixels)."""
    image_part: dict[str, Any] = {"type": "image"}
    text_part: dict[str, Any] = {"type": "text", "text": user_prompt}
    user = [image_part, text_part] if image_first else [text_part, image_part]
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": user})
    return messages


class ChatTemplate:
    """``render(request)``: the processor's chat template applied to the request, cached."""

    def __init__(self, processor: Any, kept: int = RENDERED_KEPT) -> None:
        self._processor = processor
        self._render = functools.lru_cache(maxsize=kept)(self._render_uncached)

    def _render_uncached(self, system_prompt: str, user_prompt: str, image_first: bool) -> str:
        messages = chat_messages(system_prompt, user_prompt, image_first)
        text = self._processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def render(self, request: InferenceRequest) -> str:
        return self._render(request.system_prompt, request.user_prompt, request.image_first)

    def cache_info(self) -> Any:
        return self._render.cache_info()
