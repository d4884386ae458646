"""Evaluation reports: ``results.json``, ``report.md`` and a self-contained ``report.html``.

- ``results.json``: everything, machine-readable: each run's summary rows, every answer with its
  result, expected fields and field scores, and the comparison (deltas, regressions, worst drop).
- ``report.md``: per-analysis tables of each run, candidate against baseline, the biggest
  regressions and the weakest labelled fields.
- ``report.html``: the same tables, then per image the picture (embedded as a data URL; a large
  file as a JPEG thumbnail) under an SVG overlay of the boxes: expected in green, the
  candidate's predictions in orange, the baseline's in blue, with a legend and a tooltip per
  box, and the field scores of every analysis. No script, no external file; every text from
  labels, answers and file names is escaped.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from goflow_gpu.evaluation.fields import BOX_KEY, is_box
from goflow_gpu.evaluation.labels import LabelledImage
from goflow_gpu.evaluation.scoring import (
    ALL,
    AnalysisScore,
    Comparison,
    FieldScore,
    MetricDelta,
    RunScores,
    compare,
)

FORMAT_VERSION = 1
EMBED_LIMIT_BYTES = 256 * 1024
"""Images up to this size are embedded as they are; larger ones as a JPEG thumbnail."""
THUMBNAIL_SIDE = 1024
COLOURS: dict[str, str] = {"expected": "#1a9641", "candidate": "#f57c00", "baseline": "#1f5fbf"}
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
_TOP_REGRESSIONS = 10
_WEAKEST_FIELDS = 10

# (metric, column title, kind): the per-analysis table, in order.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("answers", "answers", "int"),
    ("schema_valid_rate", "schema valid", "pct"),
    ("qa_pass_rate", "QA pass", "pct"),
    ("repaired_rate", "repaired", "pct"),
    ("consistent_rate", "consistent", "pct"),
    ("labelled", "labelled", "int"),
    ("field_agreement", "field agreement", "pct"),
    ("box_precision", "box P", "pct"),
    ("box_recall", "box R", "pct"),
    ("prompt_tokens_per_answer", "prompt tok", "num"),
    ("generated_tokens_per_answer", "gen tok", "num"),
    ("seconds_per_answer", "s / answer", "sec"),
)
_DELTA_METRICS: tuple[tuple[str, str, str], ...] = (
    ("field_agreement", "field agreement", "pct"),
    ("qa_pass_rate", "QA pass", "pct"),
    ("schema_valid_rate", "schema valid", "pct"),
    ("consistent_rate", "consistent", "pct"),
    ("repaired_rate", "repaired", "pct"),
    ("box_precision", "box P", "pct"),
    ("box_recall", "box R", "pct"),
    ("generated_tokens_per_answer", "gen tok", "num"),
    ("seconds_per_answer", "s / answer", "sec"),
)


def write_reports(
    out_dir: Path,
    labelled: Sequence[LabelledImage],
    candidate: RunScores,
    baseline: RunScores | None = None,
    comparison: Comparison | None = None,
) -> dict[str, Path]:
    """Write the three reports into ``out_dir`` (created); ``{"json"|"markdown"|"html": path}``.

    ``comparison`` defaults to :func:`~goflow_gpu.evaluation.scoring.compare` of the two runs'
    summaries when a baseline is given.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if baseline is not None and comparison is None:
        comparison = compare(candidate.summary, baseline.summary)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
    }
    data = results_data(labelled, candidate, baseline, comparison)
    paths["json"].write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")
    paths["markdown"].write_text(markdown_report(candidate, baseline, comparison), "utf-8")
    paths["html"].write_text(html_report(labelled, candidate, baseline, comparison), "utf-8")
    return paths


# --- results.json ----------------------------------------------------------------------------


def results_data(
    labelled: Sequence[LabelledImage],
    candidate: RunScores,
    baseline: RunScores | None,
    comparison: Comparison | None,
) -> dict[str, Any]:
    """The content of ``results.json`` (JSON types only)."""
    expected = {image.name: image.expected for image in labelled}
    return {
        "format": FORMAT_VERSION,
        "labelled_set": {
            "images": [
                {
                    "name": image.name,
                    "path": str(image.path),
                    "size": list(image.size),
                    "label_file": str(image.label_file) if image.label_file else None,
                    "analyses": sorted(image.expected),
                }
                for image in labelled
            ]
        },
        "candidate": _run_data(candidate, expected),
        "baseline": _run_data(baseline, expected) if baseline is not None else None,
        "comparison": _comparison_data(comparison) if comparison is not None else None,
    }


def _run_data(run: RunScores, expected: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "name": run.name,
        "summary": {slug: dataclasses.asdict(row) for slug, row in run.summary.items()},
        "answers": [
            {
                "image": item.image,
                "slug": item.slug,
                "answered": item.answer is not None,
                "schema_valid": item.answer.schema_valid if item.answer else None,
                "qa_passed": item.answer.qa_passed if item.answer else None,
                "reasons": list(item.answer.reasons) if item.answer else [],
                "prompt_tokens": item.answer.prompt_tokens if item.answer else None,
                "generated_tokens": item.answer.generated_tokens if item.answer else None,
                "seconds": item.answer.seconds if item.answer else None,
                "result": item.answer.result if item.answer else None,
                "expected": expected.get(item.image, {}).get(item.slug),
                "agreement": item.agreement,
                "fields": [_field_data(f) for f in item.fields],
            }
            for item in run.scored
        ],
    }


def _field_data(score: FieldScore) -> dict[str, Any]:
    data = dataclasses.asdict(score)
    data["pairs"] = [list(pair) for pair in score.pairs]
    return data


def _comparison_data(comparison: Comparison) -> dict[str, Any]:
    return {
        "worst_drop": comparison.worst_drop,
        "regressions": [dataclasses.asdict(d) for d in comparison.regressions],
        "deltas": [dataclasses.asdict(d) for d in comparison.deltas],
    }


# --- report.md -------------------------------------------------------------------------------


def markdown_report(
    candidate: RunScores, baseline: RunScores | None, comparison: Comparison | None
) -> str:
    """The Markdown report."""
    lines = ["# Prompt evaluation", ""]
    lines.append(f"- candidate: {_md(candidate.name)}")
    if baseline is not None:
        lines.append(f"- baseline: {_md(baseline.name)}")
    lines.append("")
    runs = [("candidate", candidate)] + ([("baseline", baseline)] if baseline else [])
    for role, run in runs:
        lines += [f"## Per analysis: {role}", "", *_md_table(*_summary_table(run.summary)), ""]
    if comparison is not None:
        lines += ["## Candidate vs baseline", "", *_md_table(*_delta_table(comparison)), ""]
        lines += [
            "## Biggest regressions",
            "",
            f"Worst drop: {comparison.worst_drop:.1%}",
            "",
        ]
        if comparison.regressions:
            lines += _md_table(*_regression_table(comparison.regressions))
        else:
            lines.append("None: no analysis lost field agreement, QA passes or valid answers.")
        lines.append("")
    lines += ["## Weakest labelled fields (candidate)", ""]
    weakest = _weakest_fields(candidate.summary)
    if weakest:
        lines += _md_table(["analysis", "field", "mean score"], weakest)
    else:
        lines.append("No labelled fields.")
    lines.append("")
    return "\n".join(lines)


def _md(text: str) -> str:
    """Markdown-safe cell text: no pipes, no line breaks, no raw HTML."""
    return html.escape(" ".join(str(text).split())).replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(_md(h) for h in header) + " |"]
    out.append("|" + "|".join("---" for _ in header) + "|")
    out += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    return out


# --- tables shared by both formats -----------------------------------------------------------


def _ordered(summary: Mapping[str, AnalysisScore]) -> list[AnalysisScore]:
    return sorted(summary.values(), key=lambda row: (row.slug == ALL, row.slug))


def _summary_table(summary: Mapping[str, AnalysisScore]) -> tuple[list[str], list[list[str]]]:
    header = ["analysis", *(title for _, title, _ in _COLUMNS)]
    rows = [
        [row.slug, *(_fmt(getattr(row, metric), kind) for metric, _, kind in _COLUMNS)]
        for row in _ordered(summary)
    ]
    return header, rows


def _delta_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    slugs = sorted({d.slug for d in comparison.deltas}, key=lambda s: (s == ALL, s))
    header = ["analysis", *(f"{title} (delta)" for _, title, _ in _DELTA_METRICS)]
    rows = []
    for slug in slugs:
        row = [slug]
        for metric, _, kind in _DELTA_METRICS:
            found = comparison.delta(slug, metric)
            row.append(_fmt_delta(found, kind))
        rows.append(row)
    return header, rows


def _regression_table(regressions: Sequence[MetricDelta]) -> tuple[list[str], list[list[str]]]:
    header = ["analysis", "metric", "baseline", "candidate", "change"]
    rows = [
        [
            d.slug,
            d.metric,
            _fmt(d.baseline, "pct"),
            _fmt(d.candidate, "pct"),
            _fmt_signed(d.delta, "pct"),
        ]
        for d in regressions[:_TOP_REGRESSIONS]
    ]
    return header, rows


def _weakest_fields(summary: Mapping[str, AnalysisScore]) -> list[list[str]]:
    found = [
        (score, row.slug, path)
        for row in summary.values()
        if row.slug != ALL
        for path, score in row.field_means.items()
    ]
    found.sort()
    return [[slug, path, f"{score:.2f}"] for score, slug, path in found[:_WEAKEST_FIELDS]]


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "int":
        return str(int(value))
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "sec":
        return f"{value:.2f}"
    return f"{value:.1f}"


def _fmt_signed(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    text = _fmt(abs(value), kind)
    return f"+{text}" if value > 0 else f"-{text}" if value < 0 else text


def _fmt_delta(found: MetricDelta | None, kind: str) -> str:
    if found is None or found.delta is None:
        return "-"
    return f"{_fmt(found.candidate, kind)} ({_fmt_signed(found.delta, kind)})"


# --- report.html -----------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:80em}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}
td.l{text-align:left}
.drop{color:#b71c1c}.gain{color:#1b5e20}
figure{margin:0 0 .5em;display:inline-block}
figure svg{max-width:min(100%,40em);height:auto;border:1px solid #ccc;display:block}
.legend span{display:inline-block;margin-right:1.2em}
.swatch{display:inline-block;width:1.2em;height:.8em;margin-right:.3em;vertical-align:middle}
section.image{border-top:1px solid #ddd;padding-top:1em;margin-top:1em}
pre{white-space:pre-wrap;font-size:.85em;background:#f6f6f6;padding:.5em}
"""


def html_report(
    labelled: Sequence[LabelledImage],
    candidate: RunScores,
    baseline: RunScores | None,
    comparison: Comparison | None,
) -> str:
    """The self-contained HTML report."""
    e = _esc
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Prompt evaluation</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>Prompt evaluation</h1>",
        f"<p>candidate: <b>{e(candidate.name)}</b>",
    ]
    if baseline is not None:
        parts.append(f"<br>baseline: <b>{e(baseline.name)}</b>")
    parts.append(f"<br>{len(labelled)} images</p>")
    runs = [("candidate", candidate)] + ([("baseline", baseline)] if baseline else [])
    for role, run in runs:
        parts += [f"<h2>Per analysis: {e(role)}</h2>", _html_table(*_summary_table(run.summary))]
    if comparison is not None:
        parts += ["<h2>Candidate vs baseline</h2>", _html_delta_table(comparison)]
        parts += [
            "<h2>Biggest regressions</h2>",
            f"<p>Worst drop: {comparison.worst_drop:.1%}</p>",
        ]
        if comparison.regressions:
            parts.append(_html_table(*_regression_table(comparison.regressions)))
        else:
            parts.append(
                "<p>None: no analysis lost field agreement, QA passes or valid answers.</p>"
            )
    weakest = _weakest_fields(candidate.summary)
    if weakest:
        parts += [
            "<h2>Weakest labelled fields (candidate)</h2>",
            _html_table(["analysis", "field", "mean score"], weakest),
        ]
    parts += ["<h2>Images</h2>", _legend(baseline is not None)]
    for image in labelled:
        parts.append(_image_section(image, candidate, baseline))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_delta_table(comparison: Comparison) -> str:
    header, rows = _delta_table(comparison)
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [f"<td>{_esc(row[0])}</td>"]
        for (metric, _, _), text in zip(_DELTA_METRICS, row[1:], strict=True):
            found = comparison.delta(row[0], metric)
            css = ""
            if found is not None and found.delta is not None and found.delta != 0:
                better = found.delta > 0 if metric in _HIGHER_IS_BETTER else found.delta < 0
                css = ' class="gain"' if better else ' class="drop"'
            cells.append(f"<td{css}>{_esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_HIGHER_IS_BETTER = frozenset(
    {
        "field_agreement",
        "qa_pass_rate",
        "schema_valid_rate",
        "consistent_rate",
        "box_precision",
        "box_recall",
    }
)


def _legend(with_baseline: bool) -> str:
    roles = ["expected", "candidate"] + (["baseline"] if with_baseline else [])
    spans = "".join(
        f'<span><i class="swatch" style="background:{COLOURS[role]}"></i>'
        f"{_esc(role if role == 'expected' else role + ' prediction')}</span>"
        for role in roles
    )
    return f'<p class="legend">Boxes: {spans}</p>'


def _image_section(image: LabelledImage, candidate: RunScores, baseline: RunScores | None) -> str:
    runs = [("candidate", candidate)] + ([("baseline", baseline)] if baseline else [])
    rects: list[str] = []
    for slug, fields in sorted(image.expected.items()):
        rects += [_rect(box, "expected", slug, label) for box, label in _boxes(fields)]
    for role, run in runs:
        for item in run.scored:
            if item.image == image.name and item.answer is not None and item.answer.result:
                rects += [
                    _rect(box, role, item.slug, label) for box, label in _boxes(item.answer.result)
                ]
    width, height = image.size
    mime, data = _embedded(image.path)
    figure = (
        f'<figure><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{_esc(image.name)}">'
        f'<image href="data:{mime};base64,{data}" x="0" y="0" width="{width}" '
        f'height="{height}" preserveAspectRatio="none"/>'
        f"{''.join(rects)}</svg>"
        f"<figcaption>{_esc(image.path.name)}, {width}x{height}</figcaption></figure>"
    )
    return (
        f'<section class="image" id="img-{_esc(image.name)}"><h3>{_esc(image.name)}</h3>'
        f"{figure}{_image_scores(image, runs)}</section>"
    )


def _image_scores(image: LabelledImage, runs: Sequence[tuple[str, RunScores]]) -> str:
    slugs = sorted(
        {item.slug for _, run in runs for item in run.scored if item.image == image.name}
    )
    if not slugs:
        return "<p>No answers for this image.</p>"
    header = ["analysis"] + [f"{role} agreement" for role, _ in runs] + ["fields"]
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for slug in slugs:
        cells = [f"<td>{_esc(slug)}</td>"]
        details = []
        for role, run in runs:
            item = next((s for s in run.scored if s.image == image.name and s.slug == slug), None)
            if item is None:
                cells.append("<td>-</td>")
                continue
            status = _status(item.answer)
            agreement = item.agreement
            shown = "-" if agreement is None else f"{agreement:.0%}"
            cells.append(f"<td>{_esc(shown)} ({_esc(status)})</td>")
            lines = [f"{f.path} [{f.kind}] {f.score:.2f}: {f.detail}" for f in item.fields]
            if item.answer is not None and item.answer.reasons:
                lines += [f"QA: {reason}" for reason in item.answer.reasons]
            result = item.answer.result if item.answer is not None else None
            lines.append("result: " + json.dumps(result, ensure_ascii=False))
            details.append(f"<b>{_esc(role)}</b><pre>{_esc(chr(10).join(lines))}</pre>")
        expected = image.expected.get(slug)
        if expected:
            details.insert(
                0, f"<b>expected</b><pre>{_esc(json.dumps(expected, ensure_ascii=False))}</pre>"
            )
        cells.append(
            f'<td class="l"><details><summary>fields</summary>{"".join(details)}</details></td>'
        )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _status(answer: Any) -> str:
    if answer is None:
        return "no answer"
    if answer.qa_passed:
        return "QA passed"
    return "QA failed" if answer.schema_valid else "invalid"


def _boxes(node: Any, label: str = "") -> Iterator[tuple[Mapping[str, Any], str]]:
    """Every wire box in a (partial) result, with the first text field beside it as label."""
    if isinstance(node, Mapping):
        names = [v for k, v in node.items() if k != BOX_KEY and isinstance(v, str) and v]
        own = names[0] if names else label
        for key, value in node.items():
            if key == BOX_KEY and is_box(value):
                yield value, own
            else:
                yield from _boxes(value, key if isinstance(value, list) else own)
    elif isinstance(node, list):
        for item in node:
            yield from _boxes(item, label)


def _rect(box: Mapping[str, Any], role: str, slug: str, label: str) -> str:
    colour = COLOURS[role]
    dash = {
        "expected": "",
        "candidate": ' stroke-dasharray="6 3"',
        "baseline": ' stroke-dasharray="2 3"',
    }[role]
    title = f"{slug}: {label} ({role})" if label else f"{slug} ({role})"
    x, y, w, h = (float(box[k]) for k in ("x", "y", "width", "height"))
    return (
        f'<rect x="{x:g}" y="{y:g}" width="{w:g}" height="{h:g}" fill="none" stroke="{colour}" '
        f'stroke-width="2" vector-effect="non-scaling-stroke"{dash} class="{role}">'
        f"<title>{_esc(title)}</title></rect>"
    )


def _embedded(path: Path) -> tuple[str, str]:
    """``(mime type, base64)`` of the image to embed: the file itself, or a JPEG thumbnail."""
    raw = path.read_bytes()
    mime = _MIME.get(path.suffix.lower())
    if mime is not None and len(raw) <= EMBED_LIMIT_BYTES:
        return mime, base64.b64encode(raw).decode("ascii")
    with Image.open(io.BytesIO(raw)) as opened:
        thumb = opened.convert("RGB")
    thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=80)
    return "image/jpeg", base64.b64encode(out.getvalue()).decode("ascii")
