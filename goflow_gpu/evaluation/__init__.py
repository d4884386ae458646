"""Evaluating a prompt catalog against a labelled set (``goflow-gpu prompts eval``).

The run loop (engine + QA, in the CLI) produces one :class:`Answer` per (image, analysis); this
package loads the labels, scores the answers and writes the reports::

    labelled = load_labelled_set(DIR, schemas)      # EvalSetError names the bad file
    run = score_run("prompts/", answers, labelled, schemas)   # RunScores: .scored, .summary
    base = score_run("old/", old_answers, labelled, old_schemas)
    comparison = compare(run.summary, base.summary)           # .regressions, .worst_drop
    write_reports(OUT, labelled, run, base, comparison)       # results.json, report.md, .html
    exit 1 if comparison.worst_drop > max_regression

``schemas`` maps each analysis slug to the JSON schema of its analysisResult (the catalog's
``json_schema``). Labels and results are compared in *wire* form: what the worker POSTs, boxes
as ``bounding_box {x, y, width, height}`` in the original image's pixels.

Public surface::

    labels.py   EvalSetError(GoFlowError), LabelledImage(name, path, size, expected, label_file)
                load_labelled_set(directory, schemas=None) -> list[LabelledImage]
    fields.py   plan_fields(expected, schema) -> list[FieldRule]   kinds and label checks
    scoring.py  Answer(image, slug, schema_valid, qa_passed, result, prompt_tokens,
                       generated_tokens, seconds, reasons)
                score_fields(expected, result, schema, rules=DEFAULT_RULES) -> list[FieldScore]
                score_run(name, answers, labelled, schemas, rules) -> RunScores
                summarise(answers, labelled, schemas, rules) -> dict[slug | "all", AnalysisScore]
                compare(candidate, baseline) -> Comparison(deltas, regressions, worst_drop)
    report.py   write_reports(out_dir, labelled, candidate, baseline=None, comparison=None)
                    -> {"json": Path, "markdown": Path, "html": Path}
    starter.py  build_starter_set(directory, n=12, seed="starter") -> list[Path]
                (not re-exported: it draws with the simulator; ``python -m`` runs it)

How each kind of field is scored: :mod:`goflow_gpu.evaluation.scoring`. What counts as a field
of which kind: :mod:`goflow_gpu.evaluation.fields`. The set layout: :mod:`.labels`.
"""

from goflow_gpu.evaluation.fields import BOX_KEY, FieldError, FieldRule, plan_fields
from goflow_gpu.evaluation.labels import EvalSetError, LabelledImage, load_labelled_set
from goflow_gpu.evaluation.report import write_reports
from goflow_gpu.evaluation.scoring import (
    ALL,
    DEFAULT_RULES,
    GUARDED_METRICS,
    AnalysisScore,
    Answer,
    Comparison,
    FieldScore,
    MetricDelta,
    RunScores,
    ScoredAnswer,
    ScoringRules,
    compare,
    score_fields,
    score_run,
    summarise,
)
from goflow_gpu.prompts.geometry import iou

__all__ = [
    "ALL",
    "BOX_KEY",
    "DEFAULT_RULES",
    "GUARDED_METRICS",
    "AnalysisScore",
    "Answer",
    "Comparison",
    "EvalSetError",
    "FieldError",
    "FieldRule",
    "FieldScore",
    "LabelledImage",
    "MetricDelta",
    "RunScores",
    "ScoredAnswer",
    "ScoringRules",
    "compare",
    "iou",
    "load_labelled_set",
    "plan_fields",
    "score_fields",
    "score_run",
    "summarise",
    "write_reports",
]
