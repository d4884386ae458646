"""Writing a benchmark's results: ``results.json`` and a Markdown table (``results.md``).

``results.json`` holds the machine, every run's configuration and figures, and every
comparison (its ratio, the target and whether it was met). The Markdown table has one column
per run and one row per figure, then one line per comparison.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from goflow_gpu.bench.runner import RunResult

# (figure key, row title, format): the rows of the Markdown table, in order.
TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("combinations", "combinations", "{:d}"),
    ("wall_s", "wall time (s)", "{:.2f}"),
    ("combinations_per_s", "combinations / s", "{:.2f}"),
    ("busy_fraction", "engine busy fraction", "{:.1%}"),
    ("overhead_s", "orchestration overhead (s)", "{:.2f}"),
    ("overhead_fraction", "overhead / wall", "{:.1%}"),
    ("first_post_s", "time to first result POST (s)", "{:.2f}"),
    ("qa_to_post_p50_s", "QA pass -> POST accepted p50 (s)", "{:.3f}"),
    ("qa_to_post_p95_s", "QA pass -> POST accepted p95 (s)", "{:.3f}"),
    ("completed", "passed QA", "{}"),
    ("failed", "failed", "{}"),
    ("prompt_tokens", "prompt tokens", "{:d}"),
    ("cached_tokens", "cached prompt tokens", "{:d}"),
    ("cached_share_of_max", "cached / theoretical max", "{:.1%}"),
    ("generated_tokens", "generated tokens", "{:d}"),
    ("downloads", "downloads made", "{}"),
    ("downloads_expected", "(media, variant) pairs", "{}"),
    ("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"),
    ("retries_by_cause", "retries by cause", "{}"),
    ("ledger_problems", "exactly-once problems", "{}"),
)


def machine_info() -> dict[str, Any]:
    """A short description of where the numbers came from."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(value.items())) or "none"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(runs: list[RunResult], comparisons: list[dict[str, Any]]) -> str:
    """The runs side by side (one column each) and one line per comparison."""
    lines = [
        "| figure | " + " | ".join(f"{r.label} ({r.engine})" for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for key, title, fmt in TABLE_ROWS:
        cells = [_cell(r.figures.get(key), fmt) for r in runs]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if comparisons:
        lines += ["", "| comparison | ratio | target | met |", "|---|---:|---|---|"]
        for comp in comparisons:
            for check in comp.get("checks", []):
                met = {True: "yes", False: "NO", None: "-"}[check.get("met")]
                lines.append(
                    f"| {comp['name']}: {check['what']} | {_cell(check.get('value'), '{:.3f}')}"
                    f" | {check.get('target', '')} | {met} |"
                )
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: Path,
    runs: list[RunResult],
    comparisons: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": machine_info(),
        **(extra or {}),
        "runs": [
            {"label": r.label, "engine": r.engine, "config": r.config, "figures": r.figures}
            for r in runs
        ],
        "comparisons": comparisons,
    }
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(markdown_table(runs, comparisons))
    return {"json": json_path, "markdown": md_path}
