"""Token budgets: the longest answer a spec's JSON schema allows, in the model's tokens.

Structured decoding keeps an answer inside its spec's JSON schema, not inside
``sampling.max_tokens``: an answer that needs more tokens is cut off mid-JSON, fails QA and is
re-asked with ``qa.retry_max_tokens`` (a second full decode). :func:`check_spec` computes the
worst case, the answer the schema allows that costs the most tokens, and refuses a spec whose
``max_tokens`` is below it, or whose ``retry_max_tokens`` is below ``max_tokens``.

How the worst case is built (:func:`worst_case`), node by node of the schema:

- object: every property, in schema order, optional ones too (extra properties an object
  allows are not counted: a warning);
- array: ``prefixItems``, then the worst item repeated up to ``maxItems``;
- string: ``maxLength`` characters of :data:`SAMPLE_TEXT` (repeated and cut); an ``enum`` or
  ``const``: its costliest value; a ``pattern`` or ``format`` without ``maxLength``:
  :data:`PATTERN_CHARS` characters of the sample (a warning: the real bound is unknown);
- integer: the bound (``minimum`` / ``maximum``) that costs the most tokens, ``-1000`` over
  ``8192``; an integer without both bounds counts :data:`NUMBER_TOKENS` (a warning);
- number: with ``multipleOf`` and both bounds, the widest bound written with every decimal
  place of ``multipleOf``; otherwise :data:`NUMBER_TOKENS` (a warning: a float has no token
  bound, ``0.30000000000000004`` is valid);
- boolean: ``false``; null: ``null``;
- ``anyOf`` / ``oneOf`` / a list of types: the costliest branch; local ``$ref``: followed.

What has no bound at all (a string without ``maxLength``, ``enum``, ``pattern`` or ``format``;
an array without ``maxItems``; a schema that allows anything) is an error: the spec is refused.

The answer is rendered as compact JSON, exactly as vLLM emits it under xgrammar with
``disable_any_whitespace`` (``json.dumps(..., separators=(",", ":"), ensure_ascii=False)``),
counted with the tokenizer, plus one token for the end of the turn (``<|im_end|>``).

The assumption about string content: strings are Latin-script text like :data:`SAMPLE_TEXT`,
OCR-like and dense (capitals, digits, punctuation, an accented letter), which costs more tokens
per character than ordinary prose. Text in other scripts (CJK, Cyrillic, Arabic, emoji) can cost
several tokens per character, far beyond this bound; such an answer is cut off at
``max_tokens`` and re-asked once with ``qa.retry_max_tokens``, which is what that setting is
for.

Tokenizers (:func:`load_tokenizer`): the model's own (``--tokenizer
/models/Qwen2.5-VL-7B-Instruct`` on a GPU node) gives the exact count. Without it, the tiny test
model's tokenizer (:mod:`goflow_gpu.engines.tiny`) stands in: a byte-level BPE of 4,096 tokens
trained on a small corpus, so words split into more pieces than with Qwen's 151,643 tokens and
the count is higher, a conservative bound. One exception is digits: Qwen writes every digit as
its own token (``8192`` is 4 tokens) while the tiny BPE merges some (``8``, ``1``, ``92``). So
every tokenizer here is counted with :func:`digit_cost`, which charges one token per digit and
one for whatever else shares a token with digits (the space of ``" 4"``); for Qwen's tokenizer
that changes nothing, for the tiny one it keeps the bound above Qwen's on numbers and boxes.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from goflow_gpu.errors import GoFlowError
from goflow_gpu.prompts.spec import PromptSpec

#: What every string is made of: dense Latin-script text as OCR reads it off a label or a sign
#: (mixed words, capitals, digits, punctuation, an accented letter), repeated and cut.
SAMPLE_TEXT: Final = (
    "Lot 7B: Fresh MANGO x3 (Alphonso), EUR 4.99/kg, was 6.50; best before 12/08/2025. "
    "Café Nord, 14 Rue de l'Église, Ph. +33 1 42 68 53 00 - www.cafe-nord.fr #OPEN 9am-5pm! "
)
#: Tokens counted for a number without a token bound (a float, an unbounded integer).
NUMBER_TOKENS: Final = 12
#: Characters of :data:`SAMPLE_TEXT` counted for a string bounded only by a pattern or format.
PATTERN_CHARS: Final = 64
#: The token that ends the model's turn (``<|im_end|>``), generated after the JSON.
END_OF_TURN_TOKENS: Final = 1
#: Where the tokenizer of a local model folder lives.
TOKENIZER_FILES: Final = ("tokenizer.json", "tokenizer_config.json")

#: Counts the tokens of a text.
TokenCounter = Callable[[str], int]

_DIGIT = re.compile(r"\d")


class BudgetError(GoFlowError):
    """A tokenizer that cannot be loaded."""


@dataclass(frozen=True)
class Tokenizer:
    """A token counter and what it is, for the report (``label``)."""

    label: str
    count: TokenCounter


@dataclass
class WorstCase:
    """The costliest answer a schema allows.

    ``instance`` is the answer (a number without a token bound appears as ``0``);
    ``extra_tokens`` what such numbers cost beyond that ``0``; ``errors`` the parts without any
    bound (no worst case exists), ``warnings`` the parts whose bound is a guess. Paths read
    like ``objects_detected[].name``.
    """

    instance: Any
    extra_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def tokens(self, count: TokenCounter) -> int:
        """The answer's tokens as the model writes it, end of turn included."""
        return count(render_json(self.instance)) + self.extra_tokens + END_OF_TURN_TOKENS


@dataclass(frozen=True)
class Budget:
    """The token budget verdict of one spec.

    ``worst_case`` is ``None`` when the schema has no bound; the spec is refused when
    ``errors`` is not empty.
    """

    slug: str
    worst_case: int | None
    max_tokens: int
    retry_max_tokens: int | None
    errors: list[str]
    warnings: list[str]
    answer: Any = None

    @property
    def headroom(self) -> int | None:
        """``max_tokens`` minus the worst case (negative: the worst answer is cut off)."""
        return None if self.worst_case is None else self.max_tokens - self.worst_case

    @property
    def refused(self) -> bool:
        return bool(self.errors)


def render_json(value: Any) -> str:
    """``value`` as vLLM's structured decoding writes it: compact JSON, non-ASCII as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def sample_string(length: int) -> str:
    """``length`` characters of :data:`SAMPLE_TEXT`, repeated as needed."""
    repeats = -(-length // len(SAMPLE_TEXT))
    return (SAMPLE_TEXT * repeats)[:length]


def digit_cost(pieces: Iterable[str]) -> int:
    """Tokens of a tokenisation, charging digits as Qwen's tokenizer writes them.

    Each piece costs 1, except a piece holding digits: one token per digit, plus one for the
    rest of the piece if it holds anything else (Qwen splits ``" 42"`` into ``" "``, ``"4"``,
    ``"2"``).
    """
    total = 0
    for piece in pieces:
        digits = len(_DIGIT.findall(piece))
        if digits == 0:
            total += 1
        else:
            total += digits + (1 if digits < len(piece) else 0)
    return total


# --- the worst case --------------------------------------------------------------------------


def worst_case(schema: dict[str, Any], count: TokenCounter) -> WorstCase:
    """The answer ``schema`` allows that costs the most tokens under ``count``."""
    builder = _Builder(schema, count)
    instance, extra = builder.build(schema, "", depth=0)
    return WorstCase(instance, extra, builder.errors, builder.warnings)


class _Builder:
    """Builds a worst-case instance, collecting the unbounded parts on the way."""

    def __init__(self, root: dict[str, Any], count: TokenCounter) -> None:
        self.root = root
        self.count = count
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def cost(self, candidate: tuple[Any, int]) -> int:
        value, extra = candidate
        return self.count(render_json(value)) + extra

    def costliest(self, candidates: list[tuple[Any, int]]) -> tuple[Any, int]:
        """The costliest candidate; the first of equals (schema order)."""
        best = candidates[0]
        best_cost = self.cost(best)
        for candidate in candidates[1:]:
            cost = self.cost(candidate)
            if cost > best_cost:
                best, best_cost = candidate, cost
        return best

    def build(self, node: Any, path: str, depth: int) -> tuple[Any, int]:
        where = path or "(top level)"
        if depth > 64:
            self.errors.append(f"{where}: schema nested too deeply (a recursive $ref?)")
            return None, 0
        if node is True or node == {}:
            self.errors.append(f"{where}: allows any value, so no answer length is bounded")
            return None, 0
        if not isinstance(node, dict):
            self.errors.append(f"{where}: allows no value")
            return None, 0
        if "$ref" in node:
            return self.build(self._resolve(node["$ref"], where), path, depth + 1)
        if "const" in node:
            return node["const"], 0
        if node.get("enum"):
            return self.costliest([(value, 0) for value in node["enum"]])
        branches = node.get("anyOf") or node.get("oneOf")
        if branches:
            base = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
            return self.costliest(
                [self.build({**base, **branch}, path, depth + 1) for branch in branches]
            )
        kind = node.get("type")
        if isinstance(kind, list):
            if not kind:
                self.errors.append(f"{where}: allows no type")
                return None, 0
            return self.costliest([self.build({**node, "type": k}, path, depth + 1) for k in kind])
        if kind == "object":
            return self._object(node, path, depth)
        if kind == "array":
            return self._array(node, path, depth)
        if kind == "string":
            return self._string(node, where)
        if kind == "integer":
            return self._integer(node, where)
        if kind == "number":
            return self._number(node, where)
        if kind == "boolean":
            return self.costliest([(False, 0), (True, 0)])
        if kind == "null":
            return None, 0
        self.errors.append(f"{where}: no type, enum or const, so any value is allowed")
        return None, 0

    def _resolve(self, ref: Any, where: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            self.errors.append(f"{where}: only local $ref (#/...) is followed, not {ref!r}")
            return {}
        node: Any = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                self.errors.append(f"{where}: $ref {ref!r} points nowhere")
                return {}
            node = node[part]
        return node

    def _object(self, node: dict[str, Any], path: str, depth: int) -> tuple[Any, int]:
        if node.get("additionalProperties", True) is not False or node.get("patternProperties"):
            self.warnings.append(
                f"{path or '(top level)'}: the object allows extra properties; they are not "
                "counted (set additionalProperties: false)"
            )
        out: dict[str, Any] = {}
        extra = 0
        for name, sub in (node.get("properties") or {}).items():
            out[name], cost = self.build(sub, f"{path}.{name}" if path else name, depth + 1)
            extra += cost
        return out, extra

    def _array(self, node: dict[str, Any], path: str, depth: int) -> tuple[Any, int]:
        where = path or "(top level)"
        prefix = node.get("prefixItems") or []
        items = node.get("items")
        limit = node.get("maxItems")
        if limit is None:
            if items is False:
                limit = len(prefix)
            else:
                self.errors.append(f"{where}: array without maxItems, so its length is unbounded")
                return [], 0
        out: list[Any] = []
        extra = 0
        for index, sub in enumerate(prefix[:limit]):
            value, cost = self.build(sub, f"{path}[{index}]", depth + 1)
            out.append(value)
            extra += cost
        rest = limit - len(out)
        if rest > 0 and items is not False:
            value, cost = self.build(items if items is not None else {}, f"{path}[]", depth + 1)
            out.extend(json.loads(render_json(value)) for _ in range(rest))
            extra += cost * rest
        return out, extra

    def _string(self, node: dict[str, Any], where: str) -> tuple[Any, int]:
        limit = node.get("maxLength")
        if limit is None:
            if "pattern" in node or "format" in node:
                self.warnings.append(
                    f"{where}: string bounded by a pattern or format only, counted as "
                    f"{PATTERN_CHARS} characters of sample text"
                )
                return sample_string(PATTERN_CHARS), 0
            self.errors.append(f"{where}: string without maxLength, so its length is unbounded")
            return "", 0
        return sample_string(int(limit)), 0

    def _bounds(self, node: dict[str, Any]) -> tuple[Any, Any]:
        low = node.get("minimum", node.get("exclusiveMinimum"))
        high = node.get("maximum", node.get("exclusiveMaximum"))
        return low, high

    def _integer(self, node: dict[str, Any], where: str) -> tuple[Any, int]:
        low, high = self._bounds(node)
        if low is None or high is None:
            self.warnings.append(
                f"{where}: integer without both minimum and maximum, counted as "
                f"{NUMBER_TOKENS} tokens"
            )
            return 0, NUMBER_TOKENS - self.count("0")
        return self.costliest([(int(low), 0), (int(high), 0)])

    def _number(self, node: dict[str, Any], where: str) -> tuple[Any, int]:
        low, high = self._bounds(node)
        step = node.get("multipleOf")
        if step is None or low is None or high is None:
            self.warnings.append(
                f"{where}: number without multipleOf and both bounds has no token bound "
                f"(a float may print 17 digits), counted as {NUMBER_TOKENS} tokens"
            )
            return 0, NUMBER_TOKENS - self.count("0")
        places = max(0, -int(Decimal(str(step)).normalize().as_tuple().exponent))
        candidates: list[tuple[Any, int]] = []
        for bound in (low, high):
            whole = math.trunc(abs(float(bound)))
            digits = "9" * places
            text = f"{'-' if float(bound) < 0 else ''}{whole}" + (f".{digits}" if places else "")
            candidates.append((json.loads(text), 0))
        return self.costliest(candidates)


# --- verdicts --------------------------------------------------------------------------------


def check_spec(spec: PromptSpec, count: TokenCounter) -> Budget:
    """The budget verdict of ``spec``: worst case, headroom, and why it is refused, if it is."""
    case = worst_case(spec.json_schema, count)
    errors = list(case.errors)
    worst = None if case.errors else case.tokens(count)
    max_tokens = spec.sampling.max_tokens
    retry = spec.qa.retry_max_tokens
    if worst is not None and max_tokens < worst:
        errors.append(
            f"sampling.max_tokens {max_tokens} is below the worst case of {worst} tokens, so "
            f"the longest answer the schema allows is cut off: set max_tokens >= {worst} or "
            "lower the schema's maxItems / maxLength"
        )
    if retry is not None and retry < max_tokens:
        errors.append(
            f"qa.retry_max_tokens {retry} is below sampling.max_tokens {max_tokens}: a re-ask "
            "after a cut-off answer would be cut off sooner"
        )
    return Budget(
        slug=spec.slug,
        worst_case=worst,
        max_tokens=max_tokens,
        retry_max_tokens=retry,
        errors=errors,
        warnings=case.warnings,
        answer=case.instance,
    )


def check_specs(specs: Iterable[PromptSpec], count: TokenCounter) -> list[Budget]:
    """:func:`check_spec` of every spec, sorted by slug."""
    return [check_spec(spec, count) for spec in sorted(specs, key=lambda s: s.slug)]


# --- tokenizers ------------------------------------------------------------------------------


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` is a local model folder with a tokenizer."""
    return directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(directory: Path, label: str | None = None) -> Tokenizer:
    """The tokenizer of a local model folder, counting with :func:`digit_cost`.

    Heavy import (transformers) happens here. Raises :class:`BudgetError` when the folder has no
    tokenizer that loads.
    """
    directory = Path(directory)
    if not has_tokenizer(directory):
        raise BudgetError(f"no tokenizer in {directory} (expected {' or '.join(TOKENIZER_FILES)})")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise BudgetError(f"cannot load the tokenizer in {directory}: {exc}") from exc

    @functools.lru_cache(maxsize=4096)
    def count(text: str) -> int:
        if not text:
            return 0
        if getattr(tokenizer, "is_fast", False):
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return digit_cost(text[start:end] for start, end in encoded["offset_mapping"])
        ids = tokenizer.encode(text, add_special_tokens=False)
        return digit_cost(str(tokenizer.decode([token])) for token in ids)

    return Tokenizer(label or str(directory), count)


TINY_LABEL: Final = (
    "the tiny test model's byte-level BPE (counts more tokens than Qwen's own tokenizer: a "
    "conservative bound)"
)


def default_tokenizer_dir(model: str | None) -> tuple[Path, str]:
    """The folder to count with, and its label: ``model`` when it is a local folder with a
    tokenizer, else the tiny test model (built on first use, offline, into the demo's cache)."""
    if model:
        candidate = Path(model).expanduser()
        if has_tokenizer(candidate):
            return candidate, f"the model's own tokenizer ({candidate})"
    from goflow_gpu.demo import ensure_tiny_model

    tiny = ensure_tiny_model()
    return tiny, f"{TINY_LABEL}, {tiny}"
