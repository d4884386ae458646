"""Catalog before/after on the sloppy model: QA pass, repaired and consistent answers per analysis.

    .venv/bin/python bench/catalog_compare.py [--baseline-rev HEAD] [--set evalsets/starter]
        [--out DIR] [--json FILE]

The baseline catalog is ``prompts/`` as committed at ``--baseline-rev`` (taken from git into a
temporary directory); the candidate is the working tree's ``prompts/`` (``--candidate``). Both
run through the real ``goflow-gpu prompts eval SET --every-analysis`` (a subprocess, the OpenAI
engine) against :mod:`goflow_gpu.bench.sloppy_model` on loopback: a deterministic stand-in for
a 7B VLM that fits every schema but makes a small model's mistakes (flags that disagree with
their lists, repeated items, boxes past the edge, points off the image, miscounts). So the
figures measure how each catalog and QA cope with such answers, not what the model sees, and
they are the same on every run.

Prints one table, analyses as rows, each figure as ``before -> after``: schema-valid, QA pass,
pass unrepaired, repaired (of the passed answers, the share QA repaired), consistent (of the
passed answers, the share whose fields do not contradict each other), then the totals of answers
QA failed and of inconsistent answers, and the commonest reasons QA failed an answer.

Both catalogs are judged by the working tree's QA, which repairs what it can (drops a list item
whose box or point is off the image, a repeated item, a primary value among the secondary ones;
sets a count bin from the points) where the QA shipped with v1 failed the answer. So "QA pass"
before is the v1 catalog under today's QA; "pass unrepaired" (answered, passed, nothing
repaired) is about what v1's own QA passed: it failed those repairs, except a repeated boxed
item in a list not declared distinct, which it let through.

``--json`` writes the same figures as JSON. The eval's reports (results.json, report.md,
report.html) go to ``--out`` (a temporary directory by default).
Exits with the eval's exit code when it fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from goflow_gpu.bench.sloppy_model import SloppyModelServer  # noqa: E402
from goflow_gpu.evaluation.consistency import problems  # noqa: E402
from goflow_gpu.prompts.qa import WARNINGS_KEY  # noqa: E402

UNREPAIRED = "unrepaired_pass_rate"
RATES = (
    ("schema_valid_rate", "schema-valid"),
    ("qa_pass_rate", "QA pass"),
    (UNREPAIRED, "pass unrepaired"),
    ("repaired_rate", "repaired"),
    ("consistent_rate", "consistent"),
)
PIXELS = {"min_pixels": 56 * 56, "max_pixels": 1280 * 28 * 28}


def materialise_catalog(rev: str, target: Path, repo: Path = ROOT) -> Path:
    """``prompts/`` as committed at ``rev``, written under ``target``; returns its directory."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", rev, "prompts"],
            capture_output=True,
            check=True,
        ).stdout
    except FileNotFoundError:
        raise SystemExit("git is not installed: cannot take the baseline catalog") from None
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip()
        raise SystemExit(f"cannot take prompts/ at {rev!r} from git: {detail}") from None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / "prompts"


def run_eval(
    labelled: Path, candidate: Path, baseline: Path, url: str, out: Path, workdir: Path
) -> subprocess.CompletedProcess[str]:
    """The real CLI, in a subprocess, against the model at ``url``."""
    config = workdir / "eval.yaml"
    settings = {"engine": "openai", "openai_base_url": url, "max_in_flight": 32, **PIXELS}
    config.write_text(json.dumps(settings))  # JSON is YAML
    # Settings come from this file and the flags only: a GOFLOW_* variable of the caller's
    # shell (pixels, engine, model) would change what the model is asked.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GOFLOW_")}
    env["GOFLOW_API_KEY"] = "made-up-catalog-compare-key"  # never used by eval
    command = [
        sys.executable, "-m", "goflow_gpu", "prompts", "eval", str(labelled),
        "--every-analysis", "-d", str(candidate), "--baseline", str(baseline),
        "--config", str(config), "--openai-base-url", url, "--out", str(out),
        "--max-regression", "1",
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """Before/after figures from the eval's results.json: per analysis (and ``all``) each rate,
    answers, QA-failed and inconsistent counts; the totals; the commonest QA failure reasons."""
    runs = {"before": results["baseline"], "after": results["candidate"]}
    slugs = sorted(set(runs["before"]["summary"]) | set(runs["after"]["summary"]) - {"all"})
    slugs = [s for s in slugs if s != "all"] + ["all"]
    counts: dict[str, dict[str, Counter[str]]] = {}
    reasons: dict[str, Counter[str]] = {}
    for role, run in runs.items():
        tally: dict[str, Counter[str]] = {
            name: Counter() for name in ("asked", "qa_failed", "unrepaired", "inconsistent")
        }
        why: Counter[str] = Counter()
        for answer in run["answers"]:
            if not answer["answered"]:
                continue
            slug, result = answer["slug"], answer["result"]
            tally["asked"][slug] += 1
            if not answer["qa_passed"]:
                tally["qa_failed"][slug] += 1
                why.update(_reason_kind(r) for r in answer["reasons"][:1])
                continue
            if result is not None and not result.get(WARNINGS_KEY):
                tally["unrepaired"][slug] += 1
            if result is not None and problems(result):
                tally["inconsistent"][slug] += 1
        for counter in tally.values():
            counter["all"] = sum(counter.values())
        counts[role] = tally
        reasons[role] = why
    rows: dict[str, Any] = {}
    for slug in slugs:
        row: dict[str, Any] = {}
        for role, run in runs.items():
            summary = run["summary"].get(slug)
            row[role] = None
            if summary is not None:
                row[role] = {key: summary[key] for key, _ in RATES if key != UNREPAIRED}
                asked = counts[role]["asked"][slug]
                row[role][UNREPAIRED] = counts[role]["unrepaired"][slug] / asked if asked else None
                row[role]["answers"] = summary["answers"]
                row[role]["qa_failed"] = counts[role]["qa_failed"][slug]
                row[role]["inconsistent"] = counts[role]["inconsistent"][slug]
        rows[slug] = row
    return {
        "baseline": runs["before"]["name"],
        "candidate": runs["after"]["name"],
        "analyses": rows,
        "totals": {
            role: {
                "answers": rows["all"][role]["answers"],
                "qa_failed": counts[role]["qa_failed"]["all"],
                "inconsistent": counts[role]["inconsistent"]["all"],
            }
            for role in runs
        },
        "qa_failure_reasons": {role: dict(why.most_common(6)) for role, why in reasons.items()},
    }


def _reason_kind(reason: str) -> str:
    """A QA reason without its values: ``people[2].bbox_2d: ... outside the image ...``."""
    where, _, what = reason.partition(": ")
    for marker in ("lies outside the image", "must not be empty", "not JSON", "cut off"):
        if marker in what or marker in where:
            return f"{_strip_indexes(where)}: {marker}"
    return _strip_indexes(reason)[:80]


def _strip_indexes(text: str) -> str:
    import re

    return re.sub(r"\[\d+\]", "[]", text)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def table(data: dict[str, Any]) -> str:
    """The figures as a text table, ``before -> after`` per cell."""
    header = ["analysis", "answers", *(label for _, label in RATES), "QA failed", "inconsistent"]
    lines: list[list[str]] = []
    for slug, row in data["analyses"].items():
        before, after = row["before"], row["after"]
        cells = [slug, str((after or before)["answers"])]
        for key, _ in RATES:
            cells.append(_pair(before, after, key, _percent))
        cells.append(_pair(before, after, "qa_failed", str))
        cells.append(_pair(before, after, "inconsistent", str))
        lines.append(cells)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    out = [f"before: {data['baseline']}", f"after:  {data['candidate']}", ""]
    for index, cells in enumerate([header, *lines]):
        if index == len(lines):
            out.append("  ".join("-" * w for w in widths))
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    before, after = data["totals"]["before"], data["totals"]["after"]
    out += [
        "",
        f"answers QA failed: {before['qa_failed']} of {before['answers']} before, "
        f"{after['qa_failed']} of {after['answers']} after",
        f"passed answers with contradicting fields: {before['inconsistent']} before, "
        f"{after['inconsistent']} after",
    ]
    for role in ("before", "after"):
        reasons = data["qa_failure_reasons"][role]
        if reasons:
            out.append(f"commonest QA failures {role}:")
            out += [f"  {n:4d}  {reason}" for reason, n in reasons.items()]
    return "\n".join(out)


def _pair(before: dict[str, Any] | None, after: dict[str, Any] | None, key: str, fmt: Any) -> str:
    first = "n/a" if before is None else fmt(before[key])
    second = "n/a" if after is None else fmt(after[key])
    return f"{first} -> {second}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--baseline-rev", default="HEAD", help="git revision of the baseline")
    parser.add_argument("--candidate", type=Path, default=ROOT / "prompts")
    parser.add_argument("--set", type=Path, default=ROOT / "evalsets" / "starter")
    parser.add_argument("--out", type=Path, help="eval reports (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="catalog-compare-") as tmp:
        workdir = Path(tmp)
        baseline = materialise_catalog(args.baseline_rev, workdir / "baseline")
        out = args.out or workdir / "out"
        with SloppyModelServer() as server:
            done = run_eval(args.set, args.candidate, baseline, server.url, out, workdir)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            print(f"prompts eval failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        data = figures(json.loads((out / "results.json").read_text()))
    data["baseline_rev"] = args.baseline_rev
    data["baseline"] = f"prompts/ at {args.baseline_rev} (git)"
    data["requests"] = server.requests
    print(table(data))
    where = args.out or "a temporary directory, removed"
    print(f"\n{server.requests} requests to the sloppy model; eval reports in {where}")
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
