"""Running a catalog over a labelled set: one engine answer per labelled (image, analysis).

:func:`ask` is the one path from (spec, image) to a checked answer, shared with
``goflow-gpu prompts try``: the image as the worker would send it (a greyscale copy for
greyscale specs), the rendered texts, schema and sampling of the spec, the engine's answer, and
QA's verdict in the image's own pixels (boxes converted to the wire format).

:func:`run_catalog` asks every labelled (image, analysis) pair of a set, image-major (the
analyses of one image share the engine's prefix cache, as in a job), with at most
``engine.max_in_flight`` requests at once, and returns one
:class:`~goflow_gpu.evaluation.scoring.Answer` each, reporting progress through ``on_answer``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from goflow_gpu.engines.base import Engine, InferenceRequest, InferenceResult, Sampling
from goflow_gpu.errors import MediaError
from goflow_gpu.evaluation.labels import LabelledImage
from goflow_gpu.evaluation.scoring import Answer
from goflow_gpu.prompts.catalog import Catalog
from goflow_gpu.prompts.qa import QAVerdict, judge, parse_json_output, schema_reasons
from goflow_gpu.prompts.spec import QARules, RenderedPrompt

if TYPE_CHECKING:
    from goflow_gpu.prompts.pixels import FactCache


@dataclass(frozen=True)
class Asked:
    """One answer and what QA made of it."""

    result: InferenceResult
    verdict: QAVerdict
    schema_valid: bool
    original_size: tuple[int, int]
    seconds: float


class Images:
    """The image files as the worker sends them: the original, or a greyscale copy (made once)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._greyscale: dict[Path, Path] = {}
        self._sizes: dict[Path, tuple[int, int]] = {}
        self._facts: FactCache | None = None

    def size(self, image: Path) -> tuple[int, int]:
        """The original ``(width, height)``; raises :class:`MediaError` naming the file."""
        if image not in self._sizes:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(image) as img:
                    self._sizes[image] = img.size
            except (OSError, UnidentifiedImageError) as exc:
                raise MediaError(f"cannot open image {image}: {exc}") from None
        return self._sizes[image]

    def facts(self, image: Path, names: Iterable[str]) -> dict[str, Any]:
        """The pixel facts ``names`` of ``image`` (the original file), computed once each."""
        if self._facts is None:
            from goflow_gpu.prompts.pixels import FactCache

            self._facts = FactCache(max_images=None)  # a labelled set is small: keep it all
        return self._facts.get(image, names)

    def path(self, image: Path, variant: str) -> Path:
        """The file to send for ``variant`` (``optimised`` or ``greyscale``)."""
        self.size(image)
        if variant != "greyscale":
            return image
        if image not in self._greyscale:
            from PIL import Image

            with Image.open(image) as img:
                if img.mode == "L":
                    self._greyscale[image] = image
                else:
                    target = self.workdir / f"{len(self._greyscale)}-{image.stem}-greyscale.png"
                    img.convert("L").save(target)
                    self._greyscale[image] = target
        return self._greyscale[image]


async def ask(
    engine: Engine,
    rendered: RenderedPrompt,
    rules: QARules,
    image: Path,
    images: Images,
    *,
    min_pixels: int,
    max_pixels: int,
    request_id: str = "ask",
) -> Asked:
    """Ask ``engine`` the analysis ``rendered`` about ``image`` and judge the answer."""
    original = images.size(image)
    facts = images.facts(image, rules.pixel_facts.values()) if rules.pixel_facts else None
    began = time.monotonic()
    result = await engine.infer(
        InferenceRequest(
            request_id=request_id,
            image_path=images.path(image, rendered.variant),
            system_prompt=rendered.system_prompt,
            user_prompt=rendered.user_prompt,
            json_schema=rendered.json_schema,
            sampling=Sampling(max_tokens=rendered.max_tokens, temperature=rendered.temperature),
            group_key=(str(image), rendered.variant),
            logprobs=bool(rules.logprob_confidence),
        )
    )
    seconds = time.monotonic() - began
    verdict = judge(
        result,
        rendered,
        rules,
        original_size=original,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        facts=facts,
    )
    return Asked(result, verdict, _schema_valid(result, rendered), original, seconds)


def _schema_valid(result: InferenceResult, rendered: RenderedPrompt) -> bool:
    if result.error:
        return False
    try:
        data = parse_json_output(result.text)
    except ValueError:
        return False
    return rendered.json_schema is None or not schema_reasons(data, rendered.json_schema)


def pairs_to_ask(
    catalog: Catalog, labelled: list[LabelledImage], *, every_analysis: bool = False
) -> list[tuple[LabelledImage, str]]:
    """The (image, analysis slug) pairs a run asks, image-major, slugs sorted."""
    return [
        (item, slug)
        for item in labelled
        for slug in sorted(catalog.specs if every_analysis else item.expected)
        if slug in catalog.specs
    ]


async def run_catalog(
    engine: Engine,
    catalog: Catalog,
    labelled: list[LabelledImage],
    workdir: Path,
    *,
    min_pixels: int,
    max_pixels: int,
    on_answer: Callable[[Answer], None] | None = None,
    every_analysis: bool = False,
) -> list[Answer]:
    """Answer every labelled (image, analysis) pair of ``labelled`` with ``catalog``'s specs
    (with ``every_analysis``: every analysis of the catalog for every image, labelled or not).

    Pairs whose analysis is not in the catalog are skipped (the caller reports them). Answers
    come back in the set's order, whatever order they finished in.
    """
    images = Images(workdir)
    pairs = pairs_to_ask(catalog, labelled, every_analysis=every_analysis)
    gate = asyncio.Semaphore(max(1, engine.max_in_flight))

    async def one(index: int, item: LabelledImage, slug: str) -> Answer:
        spec = catalog.specs[slug]
        async with gate:
            asked = await ask(
                engine,
                catalog.render(spec),
                spec.qa,
                item.path,
                images,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                request_id=f"eval:{index}:{slug}",
            )
        answer = Answer(
            image=item.name,
            slug=slug,
            schema_valid=asked.schema_valid,
            qa_passed=asked.verdict.passed,
            result=asked.verdict.result if asked.verdict.passed else None,
            prompt_tokens=asked.result.prompt_tokens,
            generated_tokens=asked.result.generated_tokens,
            seconds=asked.seconds,
            reasons=tuple(asked.verdict.reasons),
        )
        if on_answer is not None:
            on_answer(answer)
        return answer

    return list(await asyncio.gather(*(one(i, item, slug) for i, (item, slug) in enumerate(pairs))))
