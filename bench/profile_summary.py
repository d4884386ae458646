"""Summarise a py-spy raw profile of the worker's process by where its CPU time went.

    python bench/profile_summary.py PROFILE.txt [--rate 200] [--label NAME]

PROFILE.txt is ``py-spy record --format raw`` output (one ``frame;frame;... count`` line per
distinct stack; only samples where a thread was running, py-spy's default). Each stack is put
in the first category whose pattern one of its frames matches, in the order of CATEGORIES, and
the table gives samples, seconds (samples / rate) and the share of the job's samples. Waits that
py-spy samples as running (idle pool threads, epoll), engine loading, imports and writing the
results are counted apart: they are not CPU the job spent.
``bench/profile.sh`` records a profile and runs this on it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

#: py-spy samples threads it cannot see blocked inside C (an idle pool thread waiting on its
#: queue, the event loop in epoll, zmq's collector): a stack whose innermost frame is one of
#: these is a wait, not CPU
IDLE_LEAF = re.compile(
    r"_worker \(concurrent/futures/thread\.py|EpollSelector\.select|GarbageCollectorThread\.run"
    r"|Condition\.wait|Event\.wait|Thread\.join|queue\.py.*get"
)

#: (category, pattern on one frame): first match wins, most specific first; the first
#: NOT_JOB categories are not part of a job
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("waiting (idle threads, not CPU)", r"(?!)"),
    ("engine load (not the job)", r"VllmEngine\._load|TransformersEngine\._load|start_engine"),
    ("python imports (not the job)", r"<frozen importlib\._bootstrap"),
    (
        "plots and results (not the job)",
        r"goflow_gpu/bench/(plots|report)\.py|engines/vllm_engine.*close",
    ),
    ("image decode and resize (PIL)", r"\(PIL/"),
    ("image hashing (vLLM)", r"vllm/multimodal/hasher\.py"),
    ("image processor (transformers)", r"transformers/(image_|models/qwen2_vl/image_)"),
    ("chat template (jinja)", r"apply_chat_template|\(jinja2/"),
    ("vLLM input processing", r"vllm/(multimodal|inputs|v1/engine/(input_processor|processor))"),
    ("vLLM client: outputs, detokenise", r"\(vllm/"),
    ("SQLite, store's writer thread (off the loop)", r"_GroupWriter\._run"),
    ("SQLite, on the event loop", r"goflow_gpu/store\.py"),
    ("QA and JSON schema", r"goflow_gpu/prompts/|\(jsonschema/"),
    ("simulator (the backend)", r"goflow_gpu/simulator/"),
    ("HTTP (aiohttp)", r"\(aiohttp/|\(yarl/|\(multidict/"),
    ("logging", r"goflow_gpu/logs\.py|\(logging/"),
    ("worker: job, media, client", r"goflow_gpu/"),
    ("event loop, other", r""),
)

LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")


NOT_JOB = 4


def categorise(stack: str) -> str:
    frames = stack.split(";")
    if IDLE_LEAF.search(frames[-1]):
        return CATEGORIES[0][0]
    for name, pattern in CATEGORIES:
        regex = re.compile(pattern)
        if any(regex.search(frame) for frame in frames):
            return name
    return CATEGORIES[-1][0]


def summarise(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        match = LINE.match(line)
        if match:
            counts[categorise(match["stack"])] += int(match["count"])
    return counts


def table(counts: Counter[str], rate: float, label: str) -> str:
    excluded = {name for name, _ in CATEGORIES[:NOT_JOB]}
    job = sum(n for name, n in counts.items() if name not in excluded)
    lines = [
        f"| {label}: where the worker process's CPU went | samples | seconds | share of job |",
        "|---|---:|---:|---:|",
    ]
    for name, _ in CATEGORIES:
        n = counts.get(name, 0)
        share = "-" if name in excluded else f"{n / max(job, 1):.1%}"
        lines.append(f"| {name} | {n} | {n / rate:.1f} | {share} |")
    lines.append(f"| **job total** | {job} | {job / rate:.1f} | 100% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--rate", type=float, default=200.0, help="py-spy's --rate (Hz)")
    parser.add_argument("--label", default="profile")
    args = parser.parse_args(argv)
    sys.stdout.write(table(summarise(args.profile), args.rate, args.label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
