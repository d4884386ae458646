"""The confidence of one value of a JSON answer, from the engine's token log-probabilities.

A model's self-reported confidence numbers are not calibrated: at temperature 0 a 7B model
writes 0.9-0.95 everywhere. What the model does reveal is how sure it was of each token it
wrote (:attr:`~goflow_gpu.engines.base.InferenceResult.token_logprobs`, asked for with
``InferenceRequest(logprobs=True)``). This module maps the answer's values to character spans
of its text and turns the tokens that spell a value into one probability::

    spans = value_spans(result.text)  # {("objects_detected", 2, "name"): (start, end), ...}
    span_probability(result.token_logprobs, *spans[("objects_detected", 2, "name")])
    # the same in one call; None when the engine gave no token log-probabilities:
    confidences(result.text, result.token_logprobs, ("objects_detected", 2, "name"))

What the number means: the probability that the model, at this point of its answer and given
everything it had written before, would write exactly this value, i.e. the joint probability
of the tokens that spell it, ``exp(sum of their log-probabilities)``. A token that spells the
value together with its neighbours (``"car`` with the opening quote, ``5,`` with the comma)
counts whole. The first token usually carries most of the doubt: once a model has written
``bic`` the rest of ``bicycle`` is nearly certain, so a low number mostly says that the model
hesitated between different values at the start.

Where the log-probabilities come from: the model's logits before temperature, top-p and the
repetition penalty (the sampler's settings do not sharpen or flatten them). The transformers
engine has no grammar, so they are the model's own belief over its whole vocabulary. vLLM (in
process or served) applies the JSON schema's grammar mask to the logits first: the probability
is then renormalised over what the schema allows at that point. A token the grammar forces
reads as certain, and an enum value is weighed against the other values of the enum only,
not against answers outside the schema. For free-text values nearly every token is allowed and
the mask changes little.

Its limits: it is not calibrated against ground truth either (a model can be sure and wrong,
and a fine-tuned or quantised model is sure in its own way), so it is a ranking signal, not a
frequency: compare values of one model and prompt with each other (a 0.35 object beside 0.98
ones is the one to look at), and calibrate thresholds on a labelled set before reading 0.8 as
"right 80 % of the time". It also says nothing about fields the grammar fixed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

JsonPath = tuple[str | int, ...]

#: deeper nesting is refused (a degenerate answer like "[[[[..."), not recursed into
MAX_DEPTH = 256

_WHITESPACE = " \t\n\r"
_ESCAPES = '"\\/bfnrt'
_HEX = "0123456789abcdefABCDEF"
_DIGITS = "0123456789"


def value_spans(text: str) -> dict[JsonPath, tuple[int, int]]:
    """The character span ``[start, end)`` in ``text`` of every scalar value, keyed by its path.

    ``text`` is one JSON object, optionally inside one fenced block (```` ```json ... ``` ````)
    as QA accepts it. A string's span is its content between the quotes (escapes as written,
    e.g. ``\\u00e9`` is six characters); a number's, ``true``'s, ``false``'s and ``null``'s is
    the literal. Paths hold object keys (decoded) and list indexes, e.g.
    ``("objects_detected", 2, "name")``; a repeated key keeps its last value, as ``json.loads``
    does. Raises ``ValueError`` when ``text`` is not one JSON object.
    """
    return _Scanner(text).document()


def span_probability(tokens: Sequence[tuple[str, float]], start: int, end: int) -> float | None:
    """``exp`` of the summed log-probabilities of the tokens that overlap ``[start, end)``.

    ``tokens`` are ``(text, logprob)`` pairs that spell the answer in order. A token with no
    text of its own (the first bytes of a character split over tokens) counts with the next
    token that has text, since it helped spell that one. An empty span (the value ``""``) takes
    the token that holds the character at ``start``, the closing quote. ``None`` when the tokens
    do not reach the span, or ``end < start``. The value is not rounded.
    """
    if start < 0 or end < start:
        return None
    if start == end:
        end = start + 1  # the closing quote's token decides the empty value
    total = 0.0
    pending = 0.0  # log-probabilities of text-less tokens, owed to the next token with text
    position = 0
    for piece, logprob in tokens:
        pending += logprob
        if not piece:
            continue
        first, position = position, position + len(piece)
        if first < end and position > start:
            total += pending
        pending = 0.0
        if position >= end:
            break
    if position < end:
        return None
    return math.exp(total)


def confidences(
    text: str, tokens: Sequence[tuple[str, float]] | None, path: JsonPath
) -> float | None:
    """The probability of the value at ``path`` in the answer ``text`` (see the module doc).

    ``None`` when there are no token log-probabilities, when they do not spell ``text``, or when
    ``path`` names no scalar value of the answer. Raises ``ValueError`` when ``text`` is not one
    JSON object.
    """
    if tokens is None:
        return None
    span = value_spans(text).get(tuple(path))
    if span is None or "".join(piece for piece, _ in tokens) != text:
        return None
    return span_probability(tokens, *span)


class _Scanner:
    """A recursive-descent reader of the JSON grammar (RFC 8259) that records value spans."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0
        self.spans: dict[JsonPath, tuple[int, int]] = {}

    def fail(self, what: str) -> ValueError:
        return ValueError(f"not a JSON object: {what} at character {self.at}")

    def skip_whitespace(self) -> None:
        text, at = self.text, self.at
        while at < len(text) and text[at] in _WHITESPACE:
            at += 1
        self.at = at

    def document(self) -> dict[JsonPath, tuple[int, int]]:
        self.skip_whitespace()
        fenced = self.text.startswith("```", self.at)
        if fenced:
            self.open_fence()
        self.skip_whitespace()
        if not self.text.startswith("{", self.at):
            raise self.fail("expected '{'")
        self.value((), 0)
        self.skip_whitespace()
        if fenced:
            if not self.text.startswith("```", self.at):
                raise self.fail("expected the closing ```")
            self.at += 3
            self.skip_whitespace()
        if self.at != len(self.text):
            raise self.fail("text after the JSON object")
        return self.spans

    def open_fence(self) -> None:
        # ```json, ```JSON or ``` alone, then spaces or tabs, then the end of the line
        self.at += 3
        for tag in ("json", "JSON"):
            if self.text.startswith(tag, self.at):
                self.at += len(tag)
                break
        while self.at < len(self.text) and self.text[self.at] in " \t":
            self.at += 1
        if self.text.startswith("\r\n", self.at):
            self.at += 2
        elif self.text.startswith("\n", self.at):
            self.at += 1
        else:
            raise self.fail("expected a new line after the opening ```")

    def value(self, path: JsonPath, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail("nested too deeply")
        self.skip_whitespace()
        if self.at >= len(self.text):
            raise self.fail("unexpected end")
        char = self.text[self.at]
        if char == "{":
            self.object(path, depth)
        elif char == "[":
            self.array(path, depth)
        elif char == '"':
            start = self.at + 1
            self.string()
            self.spans[path] = (start, self.at - 1)
        elif char == "-" or char in _DIGITS:
            start = self.at
            self.number()
            self.spans[path] = (start, self.at)
        else:
            for literal in ("true", "false", "null"):
                if self.text.startswith(literal, self.at):
                    self.spans[path] = (self.at, self.at + len(literal))
                    self.at += len(literal)
                    return
            raise self.fail(f"unexpected {char!r}")

    def object(self, path: JsonPath, depth: int) -> None:
        self.at += 1  # {
        self.skip_whitespace()
        if self.text.startswith("}", self.at):
            self.at += 1
            return
        while True:
            self.skip_whitespace()
            if not self.text.startswith('"', self.at):
                raise self.fail("expected a key")
            key = self.string()
            self.skip_whitespace()
            if not self.text.startswith(":", self.at):
                raise self.fail("expected ':'")
            self.at += 1
            self.value((*path, key), depth + 1)
            self.skip_whitespace()
            if self.text.startswith(",", self.at):
                self.at += 1
            elif self.text.startswith("}", self.at):
                self.at += 1
                return
            else:
                raise self.fail("expected ',' or '}'")

    def array(self, path: JsonPath, depth: int) -> None:
        self.at += 1  # [
        self.skip_whitespace()
        if self.text.startswith("]", self.at):
            self.at += 1
            return
        index = 0
        while True:
            self.value((*path, index), depth + 1)
            index += 1
            self.skip_whitespace()
            if self.text.startswith(",", self.at):
                self.at += 1
            elif self.text.startswith("]", self.at):
                self.at += 1
                return
            else:
                raise self.fail("expected ',' or ']'")

    def string(self) -> str:
        """Read a string from its opening quote to past its closing one; returns it decoded."""
        text = self.text
        self.at += 1  # "
        parts: list[str] = []
        while True:
            if self.at >= len(text):
                raise self.fail("unterminated string")
            char = text[self.at]
            if char == '"':
                self.at += 1
                return "".join(parts)
            if char == "\\":
                escape = text[self.at + 1 : self.at + 2]
                if escape == "u":
                    digits = text[self.at + 2 : self.at + 6]
                    if len(digits) != 4 or any(d not in _HEX for d in digits):
                        raise self.fail("bad \\u escape")
                    parts.append(chr(int(digits, 16)))
                    self.at += 6
                    if len(parts) > 1 and _is_pair(parts[-2], parts[-1]):
                        # a surrogate pair spells one character, as json.loads reads it
                        low, high = parts.pop(), parts.pop()
                        parts.append(
                            chr(0x10000 + ((ord(high) - 0xD800) << 10) + ord(low) - 0xDC00)
                        )
                elif escape and escape in _ESCAPES:
                    parts.append(_ESCAPED[escape])
                    self.at += 2
                else:
                    raise self.fail("bad escape")
            elif char < " ":
                raise self.fail("control character in a string")
            else:
                parts.append(char)
                self.at += 1

    def number(self) -> None:
        text = self.text
        if text.startswith("-", self.at):
            self.at += 1
        if text.startswith("0", self.at):
            self.at += 1
        elif not self.digits():
            raise self.fail("expected a digit")
        if text.startswith(".", self.at):
            self.at += 1
            if not self.digits():
                raise self.fail("expected a digit after '.'")
        if self.at < len(text) and text[self.at] in "eE":
            self.at += 1
            if self.at < len(text) and text[self.at] in "+-":
                self.at += 1
            if not self.digits():
                raise self.fail("expected a digit in the exponent")

    def digits(self) -> bool:
        start = self.at
        while self.at < len(self.text) and self.text[self.at] in _DIGITS:
            self.at += 1
        return self.at > start


_ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _is_pair(high: str, low: str) -> bool:
    return "\ud800" <= high <= "\udbff" and "\udc00" <= low <= "\udfff"
