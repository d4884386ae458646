"""The aggregated final report of a job (``PUT .../reports``), built from the local state.

Everything in it is derived from the stored combinations, so a resumed job reports the same
figures as one that ran straight through. Key findings come from the actual results: the most
frequent detected objects, labels and tags, and the texts that were read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from goflow_gpu.prompts.qa import WARNINGS_KEY
from goflow_gpu.protocol import Manifest, Report, ReportBody, ReportDetails
from goflow_gpu.store import ComboRow, Outcomes

# Result keys whose list items name things found in the image (object-detection, tags, ...).
_NAMED_LISTS = (
    "objects_detected",
    "objects",
    "animals",
    "vehicles",
    "products",
    "logos",
    "brands",
    "foods",
    "items",
    "landmarks",
)
_LABEL_LISTS = ("tags", "keywords", "labels")
_TEXT_KEYS = ("text", "full_text", "texts", "lines")


def _names(result: dict[str, Any]) -> Iterable[str]:
    for key in _NAMED_LISTS:
        for item in result.get(key) or []:
            if isinstance(item, dict):
                name = item.get("name") or item.get("label") or item.get("brand")
                if isinstance(name, str) and name.strip():
                    yield name.strip().lower()
    for key in _LABEL_LISTS:
        for item in result.get(key) or []:
            if isinstance(item, str) and item.strip():
                yield item.strip().lower()


def _texts(result: dict[str, Any]) -> Iterable[str]:
    for key in _TEXT_KEYS:
        value = result.get(key)
        if isinstance(value, str) and value.strip():
            yield value.strip()
        elif isinstance(value, list):
            for item in value:
                text = item.get("text") if isinstance(item, dict) else item
                if isinstance(text, str) and text.strip():
                    yield text.strip()


def key_findings(rows: Sequence[ComboRow]) -> tuple[str, dict[str, Any]]:
    """A sentence of findings and the structured figures behind it."""
    names: Counter[str] = Counter()
    texts: Counter[str] = Counter()
    for row in rows:
        if row.result_status != "completed" or not row.body:
            continue
        result = _result(row)
        names.update(_names(result))
        if row.plan.slug == "text-recognition" or "text" in row.plan.slug:
            texts.update(_texts(result))
    top_names = names.most_common(10)
    top_texts = [t for t, _ in texts.most_common(5)]
    parts = []
    if top_names:
        parts.append(
            "most frequent things seen: " + ", ".join(f"{n} ({c})" for n, c in top_names[:5])
        )
    if top_texts:
        parts.append("texts found: " + "; ".join(repr(t[:60]) for t in top_texts[:3]))
    sentence = ". ".join(parts) if parts else "no objects, labels or texts were reported"
    return sentence[0].upper() + sentence[1:], {
        "top_objects": [{"name": n, "count": c} for n, c in top_names],
        "texts_found": top_texts,
    }


def _result(row: ComboRow) -> dict[str, Any]:
    result = row.body.get("analysisResult") if row.body else None
    return result if isinstance(result, dict) else {}


def qa_retries_of(row: ComboRow) -> int:
    """QA re-asks made for one combination: every failed attempt was followed by a re-ask,
    except the last one of a combination that never passed (its tries ran out).

    ``row.attempts`` counts failed QA attempts only (an engine error is not one)."""
    if row.result_status == "completed":
        return row.attempts
    return max(0, row.attempts - 1)


def build_report(
    manifest: Manifest,
    rows: Sequence[ComboRow],
    *,
    wall_seconds: float,
    model: str,
) -> ReportBody:
    """The report body for a job whose combinations are all terminal and reported.

    Completed and failed are the store's one count (:class:`~goflow_gpu.store.Outcomes`,
    :attr:`ComboRow.passed`): the same figures as the job's end and the worker's summary.
    """
    counts = Outcomes.of_rows(rows)
    total = counts.total
    completed = [r for r in rows if r.passed]
    failed = [r for r in rows if r.outcome == "failed"]
    # One pass over the rows (a 10,000-image job has 250,000 of them): per analysis id.
    per_id: dict[str, dict[str, Any]] = {
        a.id: {
            "completed": 0,
            "failed": 0,
            "retries": 0,
            "retried_then_passed": 0,
            "repaired": 0,
            "versions": set(),
            "seconds": [],
        }
        for a in manifest.analyses
    }
    for row in rows:
        stats = per_id.get(row.key.analysis_id)
        if stats is None:
            continue
        passed = row.passed
        stats["completed" if passed else "failed"] += 1
        stats["retries"] += qa_retries_of(row)
        stats["retried_then_passed"] += passed and row.attempts > 0
        stats["repaired"] += passed and bool(_result(row).get(WARNINGS_KEY))
        stats["versions"].add(row.plan.spec_version)
        if row.inference_seconds is not None:
            stats["seconds"].append(row.inference_seconds)
    per_analysis: dict[str, dict[str, Any]] = {}
    for analysis in manifest.analyses:
        stats = per_id[analysis.id]
        seconds = stats["seconds"]
        per_analysis[analysis.slug] = {
            "analysis_id": analysis.id,
            "name": analysis.name,
            "completed": stats["completed"],
            "failed": stats["failed"],
            "qa_retries": stats["retries"],
            "passed_after_retry": stats["retried_then_passed"],
            # answers QA repaired (an item dropped, a count range set from the points...)
            # instead of asking again; each result lists its repairs in qa_warnings
            "repaired_by_qa": stats["repaired"],
            "spec_versions": sorted(stats["versions"]),
            "mean_inference_seconds": round(sum(seconds) / len(seconds), 3) if seconds else None,
        }
    failures = [
        {
            "media_id": r.key.media_id,
            "analysis": r.plan.slug,
            "state": r.state,
            "http_status": r.http_status,
            "reasons": (r.reasons[-1] if r.reasons else [])[:5],
            "server_detail": r.server_detail,
        }
        for r in failed
    ][:200]
    media_done = {r.key.media_id for r in completed}
    findings, figures = key_findings(rows)
    tokens = {
        "prompt": sum(r.prompt_tokens or 0 for r in rows),
        "cached_prompt": sum(r.cached_tokens or 0 for r in rows),
        "generated": sum(r.generated_tokens or 0 for r in rows),
    }
    minutes = wall_seconds / 60
    success_rate = counts.completed / total if total else 0.0
    summary = (
        f"{manifest.project.name}: {counts.completed} of {total} media x analysis combinations "
        f"completed ({success_rate:.0%}) over {len(manifest.media)} media and "
        f"{len(manifest.analyses)} analysis types in {minutes:.1f} min with {model}. "
        f"{counts.failed} failed. {findings}."
    )
    details = ReportDetails(
        total_media_processed=len(media_done),
        total_analyses_completed=counts.completed,
        processing_time_minutes=round(minutes, 3),
        success_rate=round(success_rate, 4),
        analysis_types_completed=sorted(
            slug for slug, stats in per_analysis.items() if stats["completed"] > 0
        ),
        key_findings=findings,
        total_combinations=total,
        total_failed=counts.failed,
        model=model,
        throughput_per_minute=round(total / minutes, 2) if minutes > 0 else None,
        per_analysis=per_analysis,
        failures=failures,
        tokens=tokens,
        findings=figures,
    )
    return ReportBody(report=Report(summary=summary, details=details))
