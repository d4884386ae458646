"""Catalog v1 against v2 on the sloppy model (issue 14): ``bench/catalog_compare.py`` end to end.

The script runs the real ``goflow-gpu prompts eval --every-analysis`` (a subprocess, the OpenAI
engine, real HTTP on loopback) on the shipped starter set, the working tree's catalog against
the last v1 catalog taken from git (commit 5627fc6, fixed: HEAD moves on once v2 is committed).
The sloppy model answers deterministically, so the figures are the same on every run.

Both catalogs are judged by today's QA, which repairs what it can: v1's answers are repaired
too, so its "QA pass" is high. v1's own QA failed those answers instead; the script's
``unrepaired_pass_rate`` (passed with nothing to repair) stands for that, and v2 must pass more
answers than v1 did then.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from PIL import Image

from goflow_gpu.bench.sloppy_model import completion, seed_of, sloppy_answer, tokenize
from goflow_gpu.prompts.catalog import load_catalog

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "catalog_compare.py"
V1 = "5627fc6"  # the last commit with catalog v1


def _v1_available() -> bool:
    if shutil.which("git") is None:
        return False
    check = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{V1}^{{commit}}"], capture_output=True
    )
    return check.returncode == 0


@pytest.fixture(scope="module")
def v1_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _v1_available():
        message = f"git or commit {V1} (catalog v1) is not available here"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must check out the history (fetch-depth: 0)")
        pytest.skip(message)
    spec = importlib.util.spec_from_file_location("catalog_compare", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder: Path = script.materialise_catalog(V1, tmp_path_factory.mktemp("v1"), ROOT)
    return folder


def test_sloppy_answers_fit_every_schema_and_repeat(v1_catalog: Path) -> None:
    """Every analysis of both catalogs: a schema-valid answer, the same for the same request."""
    image = (ROOT / "evalsets" / "starter" / "scene-00.png").read_bytes()
    for directory in (v1_catalog, None):
        catalog = load_catalog(directory)
        for slug, spec in catalog.specs.items():
            schema = catalog.render(spec).json_schema
            assert schema is not None
            seed = seed_of(image, schema)
            answer = sloppy_answer(schema, (384, 512), seed)
            errors = list(Draft202012Validator(schema).iter_errors(answer))
            assert errors == [], (slug, errors[0].message)
            assert sloppy_answer(schema, (384, 512), seed) == answer
            text = json.dumps(answer, separators=(",", ":"))
            tokens = tokenize(text, seed)
            assert "".join(t for t, _ in tokens) == text
            assert all(1 <= len(t) <= 4 and lp <= 0 for t, lp in tokens)
    assert seed_of(image, {"type": "object"}) != seed_of(image + b"x", {"type": "object"})


def test_a_cut_off_answer_and_a_request_without_an_image() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    schema = {"type": "object", "properties": {"notes": {"type": "string", "minLength": 90}}}
    body: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        ],
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        "max_tokens": 5,
        "logprobs": True,
    }
    answer = completion(body)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 5 == len(choice["logprobs"]["content"])
    assert (
        "".join(i["token"] for i in choice["logprobs"]["content"]) == choice["message"]["content"]
    )
    with pytest.raises(ValueError, match="no image"):
        completion({"messages": [{"role": "user", "content": "hello"}]})


def test_v2_repairs_and_is_consistent_where_v1_contradicted_itself(
    v1_catalog: Path, tmp_path: Path
) -> None:
    figures_file = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--baseline-rev", V1,
         "--out", str(tmp_path / "out"), "--json", str(figures_file)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "consistent" in done.stdout and "-> " in done.stdout
    data = json.loads(figures_file.read_text())
    slugs = set(load_catalog(None).specs)
    assert data["requests"] == 2 * 12 * len(slugs)
    every = data["analyses"]["all"]
    before, after = every["before"], every["after"]
    assert before["answers"] == after["answers"] == 12 * len(slugs)
    assert after["consistent_rate"] == 1.0
    assert before["consistent_rate"] < after["consistent_rate"]
    assert data["totals"]["after"]["inconsistent"] == 0 < data["totals"]["before"]["inconsistent"]
    assert after["repaired_rate"] > 0
    # v1's own QA failed what today's QA repairs: v2 passes more answers than v1 did.
    assert after["qa_pass_rate"] > before["unrepaired_pass_rate"]
    contradicted = [
        slug
        for slug, row in data["analyses"].items()
        if slug != "all" and row["before"] is not None and row["before"]["inconsistent"] > 0
    ]
    assert contradicted  # v1 had contradictions (flags vs lists, main_tag, shares, ...)
    for slug in contradicted:
        assert data["analyses"][slug]["after"]["inconsistent"] == 0, slug
        assert data["analyses"][slug]["after"]["consistent_rate"] == 1.0, slug
    # The eval's own reports are there.
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["baseline"] is not None and results["candidate"]["summary"]["all"]["answers"]
