"""An engine wrapper for benchmark runs: token cap, naive prompt layout, shared lifetime.

:class:`BenchEngine` forwards every request to the wrapped engine after rewriting it:

- ``max_tokens`` caps each request's token budget (random weights would otherwise ramble until
  the spec's budget on every request);
- ``naive=True`` turns the production layout into the one the ``layout`` comparison measures
  against: a per-analysis system prompt (``"[slug] " + system``) and the text before the image.

Every request it forwards is kept in ``sent`` (as the wrapped engine got it), so a comparison can
replay exactly the job's requests elsewhere (``--compare offline``).

Its ``close`` leaves the wrapped engine running, so several runs in one process share one loaded
model; whoever created the inner engine closes it.
"""

from __future__ import annotations

import dataclasses

from goflow_gpu.engines.base import Engine, InferenceRequest, InferenceResult


def naive_request(request: InferenceRequest, slug: str) -> InferenceRequest:
    """``request`` in the naive layout: its own system prompt per analysis, text first."""
    return dataclasses.replace(
        request, system_prompt=f"[{slug}] {request.system_prompt}", image_first=False
    )


def capped_request(request: InferenceRequest, max_tokens: int | None) -> InferenceRequest:
    """``request`` with its token budget capped at ``max_tokens`` (unchanged when None)."""
    if max_tokens is None or request.sampling.max_tokens <= max_tokens:
        return request
    sampling = dataclasses.replace(request.sampling, max_tokens=max_tokens)
    return dataclasses.replace(request, sampling=sampling)


class BenchEngine(Engine):
    """Forwards to ``inner`` with the benchmark's request rewrites (see the module docstring).

    ``slug_of`` maps an analysis id to its slug for the naive system prompt; the worker's
    request ids are ``media:analysis:attempt``.
    """

    name = "bench"

    def __init__(
        self,
        inner: Engine,
        *,
        max_tokens: int | None = None,
        naive: bool = False,
        slug_of: dict[str, str] | None = None,
    ) -> None:
        self.inner = inner
        self.max_tokens = max_tokens
        self.naive = naive
        self.slug_of = slug_of or {}
        self.sent: list[InferenceRequest] = []
        self.max_in_flight = inner.max_in_flight
        self.model_label = inner.model_label
        self.supports_json_schema = inner.supports_json_schema  # type: ignore[misc]
        self.supports_prefix_caching = inner.supports_prefix_caching  # type: ignore[misc]
        self.reports_cached_tokens = inner.reports_cached_tokens  # type: ignore[misc]

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        """Leaves the inner engine loaded: its owner closes it after the last run."""

    def rewrite(self, request: InferenceRequest) -> InferenceRequest:
        """The request as the wrapped engine gets it."""
        request = capped_request(request, self.max_tokens)
        if self.naive:
            parts = request.request_id.split(":")
            slug = self.slug_of.get(parts[1], parts[1]) if len(parts) > 1 else "analysis"
            request = naive_request(request, slug)
        return request

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        rewritten = self.rewrite(request)
        self.sent.append(rewritten)
        return await self.inner.infer(rewritten)
