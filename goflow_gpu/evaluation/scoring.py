"""Scores: each labelled field of one answer, each analysis of a run, and two runs compared.

Field scores are in [0, 1] (kinds in :mod:`goflow_gpu.evaluation.fields`):

- ``exact``: 1 when equal (strings exactly: they are enum values), else 0;
- ``number``: 1 when ``|predicted - expected| <= max(abs_tol, rel_tol * |expected|)``, else 0;
  defaults ``abs_tol=0``, ``rel_tol=0.1`` for integers and numbers alike, so a count of 0 must
  be 0, a count of 10 may be 9 to 11;
- ``text``: ``difflib.SequenceMatcher`` ratio of the normalised texts (lower case, trimmed,
  whitespace collapsed): 1 for equal texts, 0 for texts without a common character;
- ``set``: F1 of the normalised string sets (duplicates collapse);
- ``box``: 1 when the IoU with the predicted box is at least ``iou_threshold`` (0.5);
- ``boxes``: greedy one-to-one matching, highest IoU first, of pairs with IoU >= threshold whose
  other labelled fields agree (a labelled ``name: circle`` must be predicted as ``circle``);
  F1, with precision, recall and the counts kept;
- ``items``: the same matching without boxes, in label order.

Precision is matched / predicted and recall matched / expected; an empty side against a
non-empty one scores 0 on both, two empty sides score 1 (an expected empty list answered with an
empty list is right). A missing answer, a failed one (QA refused it) and a missing field all
score 0 on every labelled field they should have answered, an expected empty list included.
Box precision and recall of a run pool the counts of every box field (matched, expected,
predicted), so an answer with many boxes weighs more than one with few.

:func:`summarise` folds a run's answers into one :class:`AnalysisScore` per analysis slug plus
the row ``"all"``; :func:`compare` sets a candidate's rows against a baseline's.
"""

from __future__ import annotations

import difflib
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from goflow_gpu.evaluation.consistency import problems
from goflow_gpu.evaluation.fields import (
    BOX_KEY,
    BOX_KINDS,
    FieldError,
    FieldRule,
    is_box,
    normalise,
    plan_fields,
)
from goflow_gpu.evaluation.labels import EvalSetError, LabelledImage
from goflow_gpu.prompts.geometry import iou
from goflow_gpu.prompts.qa import WARNINGS_KEY

ALL = "all"
"""Key of the summary row over every analysis."""
GUARDED_METRICS: tuple[str, ...] = (
    "field_agreement",
    "qa_pass_rate",
    "schema_valid_rate",
    "consistent_rate",
)
"""Metrics whose drop against the baseline is a regression."""
COMPARED_METRICS: tuple[str, ...] = (
    *GUARDED_METRICS,
    "repaired_rate",
    "box_precision",
    "box_recall",
    "prompt_tokens_per_answer",
    "generated_tokens_per_answer",
    "seconds_per_answer",
)
_NOISE = 1e-9


@dataclass(frozen=True)
class ScoringRules:
    """Tolerances of the comparisons (see the module docstring)."""

    abs_tol: float = 0.0
    rel_tol: float = 0.1
    iou_threshold: float = 0.5


DEFAULT_RULES = ScoringRules()


@dataclass(frozen=True)
class Answer:
    """One model answer to one (image, analysis), after QA, as the run loop saw it."""

    image: str
    """The labelled image's name (file stem)."""
    slug: str
    schema_valid: bool
    """The output parsed as one JSON object and matched the spec's schema."""
    qa_passed: bool
    result: dict[str, Any] | None
    """The analysisResult as the worker would POST it (wire boxes) when QA passed, else None."""
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    seconds: float = 0.0
    reasons: tuple[str, ...] = ()
    """QA's reasons when it refused the answer, for the report."""


@dataclass(frozen=True)
class FieldScore:
    """The score of one labelled field of one answer."""

    path: str
    kind: str
    score: float
    expected: Any
    predicted: Any
    """The value found in the result (None when missing)."""
    detail: str = ""
    matched: int | None = None
    """For ``box``, ``boxes``, ``set``, ``items``: matched pairs, expected and predicted counts."""
    n_expected: int | None = None
    n_predicted: int | None = None
    precision: float | None = None
    recall: float | None = None
    pairs: tuple[tuple[int, int, float], ...] = ()
    """For ``boxes``: (expected index, predicted index, IoU) of every matched pair."""


@dataclass(frozen=True)
class ScoredAnswer:
    """One (image, analysis) of a run: its answer (None = never answered) and field scores."""

    image: str
    slug: str
    answer: Answer | None
    fields: tuple[FieldScore, ...]

    @property
    def agreement(self) -> float | None:
        """Mean field score; None when nothing was labelled for this pair."""
        if not self.fields:
            return None
        return sum(f.score for f in self.fields) / len(self.fields)


@dataclass(frozen=True)
class AnalysisScore:
    """The figures of one analysis slug (or ``"all"``) over a run."""

    slug: str
    answers: int
    schema_valid_rate: float | None
    qa_pass_rate: float | None
    labelled: int
    """Labelled (image, analysis) pairs scored, answered or not."""
    missing: int
    """Labelled pairs the run has no answer for (they score 0)."""
    fields: int
    field_agreement: float | None
    """Mean of every field score of every labelled pair; None when nothing is labelled."""
    box_matched: int
    box_expected: int
    box_predicted: int
    box_precision: float | None
    """Pooled over every box field; None when no box field is labelled."""
    box_recall: float | None
    prompt_tokens_per_answer: float | None
    generated_tokens_per_answer: float | None
    seconds_per_answer: float | None
    field_means: dict[str, float] = field(default_factory=dict)
    """Dotted field path -> mean score (``all`` prefixes paths with the slug)."""
    repaired_rate: float | None = None
    """Share of the QA-passed answers that QA repaired (their result has ``qa_warnings``)."""
    consistent_rate: float | None = None
    """Share of the QA-passed answers whose fields do not contradict each other
    (:func:`goflow_gpu.evaluation.consistency.problems`); labels play no part."""

    def metric(self, name: str) -> float | None:
        value = getattr(self, name)
        return None if value is None else float(value)


@dataclass(frozen=True)
class RunScores:
    """A scored run: its name (shown in reports), answers, per-pair scores and summary."""

    name: str
    answers: tuple[Answer, ...]
    scored: tuple[ScoredAnswer, ...]
    summary: dict[str, AnalysisScore]


@dataclass(frozen=True)
class MetricDelta:
    """One metric of one analysis in both runs; ``delta`` = candidate - baseline."""

    slug: str
    metric: str
    candidate: float | None
    baseline: float | None
    delta: float | None


@dataclass(frozen=True)
class Comparison:
    """A candidate against a baseline.

    ``deltas``: every compared metric of every analysis either run has. ``regressions``: the
    drops of :data:`GUARDED_METRICS`, worst first. ``worst_drop``: the largest such drop as a
    positive number, 0.0 when nothing dropped (the CLI fails when it exceeds its limit).
    """

    deltas: tuple[MetricDelta, ...]
    regressions: tuple[MetricDelta, ...]
    worst_drop: float

    def delta(self, slug: str, metric: str) -> MetricDelta | None:
        for item in self.deltas:
            if item.slug == slug and item.metric == metric:
                return item
        return None


# --- one answer ------------------------------------------------------------------------------


def score_fields(
    expected: Mapping[str, Any],
    result: Mapping[str, Any] | None,
    schema: Mapping[str, Any],
    rules: ScoringRules = DEFAULT_RULES,
) -> list[FieldScore]:
    """Score every labelled field of ``expected`` against ``result`` (None = no answer).

    Raises :class:`EvalSetError` naming the field when a label does not fit ``schema``.
    """
    try:
        plan = plan_fields(expected, schema)
    except FieldError as exc:
        raise EvalSetError(f"label does not fit the schema: {exc}") from None
    return [_score_rule(rule, result, rules) for rule in plan]


_MISSING: Any = object()


def _lookup(result: Mapping[str, Any] | None, keys: Sequence[str]) -> Any:
    node: Any = result
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _score_rule(
    rule: FieldRule, result: Mapping[str, Any] | None, rules: ScoringRules
) -> FieldScore:
    found = _lookup(result, rule.keys)
    predicted = None if found is _MISSING else found
    base = {"path": rule.path, "kind": rule.kind, "expected": rule.expected, "predicted": predicted}
    if rule.kind == "exact":
        ok = found is not _MISSING and _same(rule.expected, found, rules, exact_strings=True)
        return FieldScore(**base, score=1.0 if ok else 0.0, detail="equal" if ok else "differs")
    if rule.kind == "number":
        return _score_number(base, rule.expected, found, rules)
    if rule.kind == "text":
        if not isinstance(found, str):
            return FieldScore(**base, score=0.0, detail="no text")
        ratio = difflib.SequenceMatcher(None, normalise(rule.expected), normalise(found)).ratio()
        return FieldScore(**base, score=ratio, detail=f"similarity {ratio:.2f}")
    if rule.kind == "set":
        return _score_set(base, rule.expected, found)
    if rule.kind == "box":
        if not is_box(found):
            return FieldScore(
                **base,
                score=0.0,
                detail="no box",
                matched=0,
                n_expected=1,
                n_predicted=0,
                precision=0.0,
                recall=0.0,
            )
        overlap = iou(rule.expected, found)
        hit = overlap >= rules.iou_threshold
        return FieldScore(
            **base,
            score=1.0 if hit else 0.0,
            detail=f"IoU {overlap:.2f}",
            matched=int(hit),
            n_expected=1,
            n_predicted=1,
            precision=float(hit),
            recall=float(hit),
            pairs=((0, 0, overlap),) if hit else (),
        )
    return _score_matching(base, rule.kind, rule.expected, found, rules)


def _score_number(
    base: dict[str, Any], expected: float, found: Any, rules: ScoringRules
) -> FieldScore:
    if isinstance(found, bool) or not isinstance(found, int | float):
        return FieldScore(**base, score=0.0, detail="no number")
    tolerance = max(rules.abs_tol, rules.rel_tol * abs(expected))
    error = abs(float(found) - float(expected))
    ok = error <= tolerance + _NOISE
    return FieldScore(
        **base, score=1.0 if ok else 0.0, detail=f"off by {error:g} (tolerance {tolerance:g})"
    )


def _score_set(base: dict[str, Any], expected: list[str], found: Any) -> FieldScore:
    wanted = {normalise(item) for item in expected}
    given = (
        {normalise(item) for item in found if isinstance(item, str)}
        if isinstance(found, list)
        else set()
    )
    matched = len(wanted & given)
    return _counted(base, matched, len(wanted), len(given), answered=isinstance(found, list))


def _score_matching(
    base: dict[str, Any],
    kind: str,
    expected: list[Mapping[str, Any]],
    found: Any,
    rules: ScoringRules,
) -> FieldScore:
    predicted = (
        [item for item in found if isinstance(item, Mapping)] if isinstance(found, list) else []
    )
    candidates: list[tuple[float, int, int]] = []
    for i, want in enumerate(expected):
        for j, have in enumerate(predicted):
            if not _agree(want, have, rules):
                continue
            if kind == "boxes":
                if not is_box(have.get(BOX_KEY)):
                    continue
                overlap = iou(want[BOX_KEY], have[BOX_KEY])
                if overlap < rules.iou_threshold:
                    continue
                candidates.append((overlap, i, j))
            else:
                candidates.append((1.0, i, j))
    # Boxes: best overlap first; items: label order (every candidate weighs 1.0).
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    used_e: set[int] = set()
    used_p: set[int] = set()
    pairs: list[tuple[int, int, float]] = []
    for overlap, i, j in candidates:
        if i in used_e or j in used_p:
            continue
        used_e.add(i)
        used_p.add(j)
        pairs.append((i, j, overlap))
    pairs.sort()
    answered = isinstance(found, list)
    scored = _counted(base, len(pairs), len(expected), len(predicted), answered=answered)
    if kind != "boxes":
        return scored
    mean_iou = sum(p[2] for p in pairs) / len(pairs) if pairs else 0.0
    detail = f"{scored.detail}, mean IoU of matches {mean_iou:.2f}" if pairs else scored.detail
    return FieldScore(
        **{**base, "score": scored.score},
        detail=detail,
        matched=scored.matched,
        n_expected=scored.n_expected,
        n_predicted=scored.n_predicted,
        precision=scored.precision,
        recall=scored.recall,
        pairs=tuple(pairs),
    )


def _counted(
    base: dict[str, Any], matched: int, n_expected: int, n_predicted: int, *, answered: bool
) -> FieldScore:
    if not answered:  # no list at all: even an expected empty list was not answered
        return FieldScore(
            **base,
            score=0.0,
            detail="no list",
            matched=0,
            n_expected=n_expected,
            n_predicted=0,
            precision=0.0,
            recall=0.0,
        )
    precision, recall = _precision_recall(matched, n_expected, n_predicted)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return FieldScore(
        **base,
        score=f1,
        detail=f"{matched} of {n_expected} expected matched, {n_predicted} predicted "
        f"(P {precision:.2f} R {recall:.2f})",
        matched=matched,
        n_expected=n_expected,
        n_predicted=n_predicted,
        precision=precision,
        recall=recall,
    )


def _precision_recall(matched: int, n_expected: int, n_predicted: int) -> tuple[float, float]:
    if n_expected == 0 and n_predicted == 0:
        return 1.0, 1.0
    precision = matched / n_predicted if n_predicted else 0.0
    recall = matched / n_expected if n_expected else 0.0
    return precision, recall


def _agree(want: Mapping[str, Any], have: Mapping[str, Any], rules: ScoringRules) -> bool:
    for key, value in want.items():
        if key == BOX_KEY:
            continue
        if key not in have or not _same(value, have[key], rules, exact_strings=False):
            return False
    return True


def _same(expected: Any, found: Any, rules: ScoringRules, *, exact_strings: bool) -> bool:
    if expected is None:
        return found is None
    if isinstance(expected, bool):
        return isinstance(found, bool) and found == expected
    if isinstance(expected, int | float):
        if isinstance(found, bool) or not isinstance(found, int | float):
            return False
        if exact_strings:  # enum/const numbers are choices, not measurements
            return float(found) == float(expected)
        tolerance = max(rules.abs_tol, rules.rel_tol * abs(expected))
        return abs(float(found) - float(expected)) <= tolerance + _NOISE
    if isinstance(expected, str):
        if not isinstance(found, str):
            return False
        return found == expected if exact_strings else normalise(found) == normalise(expected)
    return bool(expected == found)


# --- a run -----------------------------------------------------------------------------------


def score_run(
    name: str,
    answers: Iterable[Answer],
    labelled: Sequence[LabelledImage],
    schemas: Mapping[str, Mapping[str, Any]],
    rules: ScoringRules = DEFAULT_RULES,
    *,
    strict: bool = True,
) -> RunScores:
    """Score every answer, add the labelled pairs the run never answered, and summarise.

    The analyses evaluated are those the run answered: labels of an analysis without any answer
    are left out; a labelled image without an answer for an answered analysis scores 0.
    Raises :class:`EvalSetError` (naming the label file) for labels that do not fit a schema;
    with ``strict=False`` (a baseline catalog whose results have other fields than the ones
    the set was labelled for) such top-level fields are left unscored instead.
    """
    answer_list = tuple(answers)
    by_name = {image.name: image for image in labelled}
    slugs = sorted({a.slug for a in answer_list})
    answered = {(a.image, a.slug) for a in answer_list}
    scored: list[ScoredAnswer] = []
    for answer in answer_list:
        image = by_name.get(answer.image)
        expected = image.expected.get(answer.slug) if image is not None else None
        result = answer.result if answer.qa_passed else None
        fields = _score_labelled(image, answer.slug, expected, result, schemas, rules, strict)
        scored.append(ScoredAnswer(answer.image, answer.slug, answer, tuple(fields)))
    for image in labelled:
        for slug in slugs:
            expected = image.expected.get(slug)
            if expected and (image.name, slug) not in answered:
                fields = _score_labelled(image, slug, expected, None, schemas, rules, strict)
                scored.append(ScoredAnswer(image.name, slug, None, tuple(fields)))
    summary = _summary(scored, slugs)
    return RunScores(name=name, answers=answer_list, scored=tuple(scored), summary=summary)


def summarise(
    answers: Iterable[Answer],
    labelled: Sequence[LabelledImage],
    schemas: Mapping[str, Mapping[str, Any]],
    rules: ScoringRules = DEFAULT_RULES,
) -> dict[str, AnalysisScore]:
    """One :class:`AnalysisScore` per answered analysis slug, plus the row ``"all"``."""
    return score_run("", answers, labelled, schemas, rules).summary


def _score_labelled(
    image: LabelledImage | None,
    slug: str,
    expected: Mapping[str, Any] | None,
    result: Mapping[str, Any] | None,
    schemas: Mapping[str, Mapping[str, Any]],
    rules: ScoringRules,
    strict: bool = True,
) -> list[FieldScore]:
    if not expected or image is None:
        return []
    where = image.label_file or image.path
    schema = schemas.get(slug)
    if schema is None:
        raise EvalSetError(f"{where}: no schema for the analysis type {slug!r}")
    try:
        plan = plan_fields(expected, schema)
    except FieldError as exc:
        if strict:
            raise EvalSetError(f"{where}: {slug}: {exc}") from None
        plan = []
        for key, value in expected.items():
            try:
                plan.extend(plan_fields({key: value}, schema))
            except FieldError:
                continue  # a field this catalog's results do not have: not scored for it
    return [_score_rule(rule, result, rules) for rule in plan]


def _summary(scored: Sequence[ScoredAnswer], slugs: Sequence[str]) -> dict[str, AnalysisScore]:
    groups: dict[str, list[ScoredAnswer]] = defaultdict(list)
    for item in scored:
        groups[item.slug].append(item)
    summary = {slug: _fold(slug, groups[slug], prefix=False) for slug in slugs}
    summary[ALL] = _fold(ALL, list(scored), prefix=True)
    return summary


def _fold(slug: str, items: Sequence[ScoredAnswer], *, prefix: bool) -> AnalysisScore:
    answers = [item.answer for item in items if item.answer is not None]
    passed = [a.result for a in answers if a.qa_passed and a.result is not None]
    labelled = [item for item in items if item.fields]
    scores = [f for item in labelled for f in item.fields]
    box_fields = [f for f in scores if f.kind in BOX_KINDS]
    matched = sum(f.matched or 0 for f in box_fields)
    n_expected = sum(f.n_expected or 0 for f in box_fields)
    n_predicted = sum(f.n_predicted or 0 for f in box_fields)
    precision, recall = _precision_recall(matched, n_expected, n_predicted)
    by_path: dict[str, list[float]] = defaultdict(list)
    for item in labelled:
        for f in item.fields:
            by_path[f"{item.slug}:{f.path}" if prefix else f.path].append(f.score)
    return AnalysisScore(
        slug=slug,
        answers=len(answers),
        schema_valid_rate=_rate(a.schema_valid for a in answers),
        qa_pass_rate=_rate(a.qa_passed for a in answers),
        labelled=len(labelled),
        missing=sum(1 for item in labelled if item.answer is None),
        fields=len(scores),
        field_agreement=_mean(f.score for f in scores),
        box_matched=matched,
        box_expected=n_expected,
        box_predicted=n_predicted,
        box_precision=precision if box_fields else None,
        box_recall=recall if box_fields else None,
        prompt_tokens_per_answer=_mean(a.prompt_tokens for a in answers),
        generated_tokens_per_answer=_mean(a.generated_tokens for a in answers),
        seconds_per_answer=_mean(a.seconds for a in answers),
        field_means={path: sum(v) / len(v) for path, v in sorted(by_path.items())},
        repaired_rate=_rate(bool(result.get(WARNINGS_KEY)) for result in passed),
        consistent_rate=_rate(not problems(result) for result in passed),
    )


def _rate(flags: Iterable[bool]) -> float | None:
    values = list(flags)
    return sum(values) / len(values) if values else None


def _mean(values: Iterable[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


# --- two runs --------------------------------------------------------------------------------


def compare(
    candidate: Mapping[str, AnalysisScore], baseline: Mapping[str, AnalysisScore]
) -> Comparison:
    """Every compared metric side by side; drops of the guarded metrics, worst first."""
    slugs = sorted(set(candidate) | set(baseline), key=lambda s: (s == ALL, s))
    deltas: list[MetricDelta] = []
    for slug in slugs:
        mine, theirs = candidate.get(slug), baseline.get(slug)
        for metric in COMPARED_METRICS:
            a = mine.metric(metric) if mine is not None else None
            b = theirs.metric(metric) if theirs is not None else None
            delta = a - b if a is not None and b is not None else None
            deltas.append(MetricDelta(slug, metric, a, b, delta))
    regressions = sorted(
        (
            d
            for d in deltas
            if d.metric in GUARDED_METRICS and d.delta is not None and d.delta < -_NOISE
        ),
        key=lambda d: (d.delta or 0.0, d.slug == ALL, d.slug, d.metric),
    )
    worst = -regressions[0].delta if regressions and regressions[0].delta is not None else 0.0
    return Comparison(deltas=tuple(deltas), regressions=tuple(regressions), worst_drop=worst)
