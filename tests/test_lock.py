"""The catalog lock (prompts/_catalog.lock), the changelog of the analysis types, ``prompts lock``."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from goflow_gpu.prompts.catalog import load_catalog
from goflow_gpu.prompts.cli import app
from goflow_gpu.prompts.lock import (
    LOCK_FILE,
    LockError,
    changelog_versions,
    content_hash,
    lock_entries,
    missing_changelog_entries,
    read_lock,
    update_lock,
)

REPO = Path(__file__).resolve().parents[1]
CHANGELOG = REPO / "docs" / "ANALYSES-CHANGELOG.md"
runner = CliRunner()


# --- the shipped catalog ---------------------------------------------------------------------


def test_the_lock_matches_the_shipped_specs():
    locked = read_lock(REPO / "prompts" / LOCK_FILE)
    assert locked == lock_entries(load_catalog()), (
        "prompts/_catalog.lock is stale: raise the version of every changed spec, add its "
        "changelog entry, and run `goflow-gpu prompts lock`"
    )


def test_every_shipped_version_has_a_changelog_entry():
    assert missing_changelog_entries(load_catalog(), CHANGELOG) == []


def test_the_lock_ships_in_the_package():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["goflow_gpu.catalog"]
    assert LOCK_FILE in patterns


def test_the_catalog_loader_does_not_read_the_lock_as_a_spec():
    assert LOCK_FILE not in {f"{slug}.yaml" for slug in load_catalog().specs}
    assert not LOCK_FILE.endswith((".yaml", ".yml"))


# --- refusing content changes without a version bump (tmp copy of the shipped catalog) -------


def copy_catalog(tmp_path: Path) -> Path:
    target = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts", target)
    (target / LOCK_FILE).unlink(missing_ok=True)
    update_lock(load_catalog(target))
    return target


def edit(path: Path, pattern: str, change: str | Callable[[re.Match[str]], str]) -> None:
    text = path.read_text()
    new, count = re.subn(pattern, change, text, count=1, flags=re.MULTILINE)
    assert count == 1, (path, pattern)
    path.write_text(new)


def raise_budget(match: re.Match[str]) -> str:
    return f"max_tokens: {int(match.group(1)) + 1}"


def bump_version(match: re.Match[str]) -> str:
    return f"version: {int(match.group(1)) + 1}"


def test_a_spec_edited_without_a_version_bump_is_refused(tmp_path: Path):
    catalog_dir = copy_catalog(tmp_path)
    spec_file = catalog_dir / "object-detection.yaml"
    before = (catalog_dir / LOCK_FILE).read_text()
    edit(spec_file, r"max_tokens: (\d+)", raise_budget)

    with pytest.raises(LockError) as caught:
        update_lock(load_catalog(catalog_dir))
    version = load_catalog(catalog_dir).specs["object-detection"].version
    assert caught.value.problems == [
        f"object-detection: the spec's content changed but its version is still {version}; "
        "raise `version` in object-detection.yaml and add an entry for it to "
        "docs/ANALYSES-CHANGELOG.md"
    ]
    assert (catalog_dir / LOCK_FILE).read_text() == before

    result = runner.invoke(app, ["lock", "-d", str(catalog_dir)])
    assert result.exit_code == 1
    assert "object-detection: the spec's content changed" in result.output
    assert (catalog_dir / LOCK_FILE).read_text() == before

    edit(spec_file, r"^version: (\d+)", bump_version)
    result = runner.invoke(app, ["lock", "-d", str(catalog_dir)])
    assert result.exit_code == 0, result.output
    assert "object-detection updated" in result.output
    locked = read_lock(catalog_dir / LOCK_FILE)
    assert locked["object-detection"].version == version + 1
    assert locked == lock_entries(load_catalog(catalog_dir))
    result = runner.invoke(app, ["lock", "-d", str(catalog_dir), "--check"])
    assert result.exit_code == 0, result.output


def test_a_new_shared_system_prompt_changes_every_spec(tmp_path: Path):
    catalog_dir = copy_catalog(tmp_path)
    edit(catalog_dir / "_catalog.yaml", r"^system_prompt: >-\n", "system_prompt: >-\n  Be brief.\n")
    with pytest.raises(LockError) as caught:
        update_lock(load_catalog(catalog_dir))
    assert len(caught.value.problems) == len(load_catalog(catalog_dir).specs)


# --- the rules, on a hand-written catalog ----------------------------------------------------


SPEC: dict[str, Any] = {
    "slug": "tiny-check",
    "name": "Tiny Check",
    "version": 2,
    "variant": "optimised",
    "description": "A check.",
    "user_prompt": 'Answer "ok".',
    "json_schema": {
        "type": "object",
        "additionalProperties": False,
        "required": ["ok"],
        "properties": {"ok": {"type": "boolean", "description": "Whether it is fine."}},
    },
    "qa": {
        "computed": [{"field": "fine", "rule": "non_empty", "source": "ok", "description": "Same."}]
    },
    "sampling": {"max_tokens": 64},
}


def write(directory: Path, **changes: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_catalog.yaml").write_text("system_prompt: Answer in JSON.\n")
    (directory / "tiny-check.yaml").write_text(json.dumps({**SPEC, **changes}))
    return directory


def test_documentation_is_not_content(tmp_path: Path):
    directory = write(tmp_path)
    first = load_catalog(directory).specs["tiny-check"]
    qa = {"computed": [{**SPEC["qa"]["computed"][0], "description": "Other words."}]}
    write(tmp_path, name="Renamed", description="New words.", qa=qa)
    second = load_catalog(directory).specs["tiny-check"]
    assert content_hash(first, "Answer in JSON.") == content_hash(second, "Answer in JSON.")
    assert content_hash(first, "Answer in JSON.") != content_hash(first, "Answer briefly.")
    schema = json.loads(json.dumps(SPEC["json_schema"]))
    schema["properties"]["ok"]["description"] = "Sent to the engine, so content."
    write(tmp_path, json_schema=schema)
    third = load_catalog(directory).specs["tiny-check"]
    assert content_hash(first, "Answer in JSON.") != content_hash(third, "Answer in JSON.")


def test_versions_only_go_up_and_force_overrides(tmp_path: Path):
    directory = write(tmp_path)
    update_lock(load_catalog(directory))
    write(tmp_path, version=1)
    with pytest.raises(LockError) as caught:
        update_lock(load_catalog(directory))
    assert caught.value.problems == [
        "tiny-check: version 1 is below the locked version 2; versions only go up"
    ]
    write(tmp_path, user_prompt="Answer now.")
    with pytest.raises(LockError):
        update_lock(load_catalog(directory))
    check = update_lock(load_catalog(directory), force=True)
    assert check.changed == ["tiny-check"]
    assert read_lock(directory / LOCK_FILE) == lock_entries(load_catalog(directory))


def test_the_lock_file_is_sorted_json(tmp_path: Path):
    directory = write(tmp_path)
    update_lock(load_catalog(directory))
    data = json.loads((directory / LOCK_FILE).read_text())
    assert set(data) == {"about", "specs"}
    entry = data["specs"]["tiny-check"]
    assert entry["version"] == 2 and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])


def test_the_changelog_layout_is_read_per_slug_and_version(tmp_path: Path):
    text = "\n".join(
        [
            "# Changelog",
            "## tiny-check",
            "### Version 2 (catalog v2)",
            "### Version 1",
            "## `other-one`",
            "### version 7",
            "## Notes",
            "### Version 9",
        ]
    )
    assert changelog_versions(text) == {("tiny-check", 2), ("tiny-check", 1), ("other-one", 7)}
    changelog = tmp_path / "CHANGELOG.md"
    changelog.write_text("## tiny-check\n### Version 1\n")
    directory = write(tmp_path / "catalog")
    assert missing_changelog_entries(load_catalog(directory), changelog) == [
        f"tiny-check: version 2 has no entry in {changelog} (add '### Version 2' under "
        "'## tiny-check': what changed for customers)"
    ]
    result = runner.invoke(app, ["lock", "-d", str(directory), "--changelog", str(changelog)])
    assert result.exit_code == 1
    assert not (directory / LOCK_FILE).exists()
    changelog.write_text("## tiny-check\n### Version 2\nWhat changed.\n")
    result = runner.invoke(app, ["lock", "-d", str(directory), "--changelog", str(changelog)])
    assert result.exit_code == 0, result.output
    assert (directory / LOCK_FILE).exists()
