"""The prompt commands agree: one catalog option, broken specs reported without hiding the
others, unknown slugs refused with a "did you mean", unsatisfiable schemas refused with field
and line, specs edited under the same version flagged (issue 16, item 4).

Every test runs the real commands (typer's CliRunner; stdout and stderr apart) on a tmp copy
of the shipped catalog or a hand-written one.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner, Result

from goflow_gpu.errors import ConfigError
from goflow_gpu.prompts import catalog as catalog_module
from goflow_gpu.prompts import cli as prompts_cli
from goflow_gpu.prompts.catalog import CatalogError, load_catalog
from goflow_gpu.prompts.cli import app
from goflow_gpu.prompts.lock import LOCK_FILE, audit_lock
from goflow_gpu.service import run_worker
from goflow_gpu.settings import load_settings
from tests.doubles import ScriptedEngine
from tests.test_prompts import GOOD_SPEC, SHARED

REPO = Path(__file__).resolve().parents[1]
SHIPPED = (REPO / "prompts").resolve()
runner = CliRunner()

SPEC = GOOD_SPEC  # one hand-written minimal spec for both prompt test files


@pytest.fixture(autouse=True)
def _no_catalog_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the catalog variables it means; the developer's own do not leak in."""
    for name in ("GOFLOW_PROMPTS_DIR", "GOFLOW_ENGINE", "GOFLOW_OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def write_catalog(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_catalog.yaml").write_text(SHARED)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def copy_shipped(tmp_path: Path, *, lock: bool = True) -> Path:
    target = tmp_path / "prompts"
    shutil.copytree(SHIPPED, target)
    if not lock:
        (target / LOCK_FILE).unlink()
    return target


def edit(path: Path, pattern: str, replacement: str) -> None:
    text = path.read_text()
    new, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert count == 1, (path, pattern)
    path.write_text(new)


def line_of(path: Path, pattern: str) -> int:
    """The 1-based line of the first match of ``pattern`` in ``path`` (found by hand here, not
    by the loader's line map)."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if re.search(pattern, line):
            return number
    raise AssertionError(f"{pattern!r} not in {path}")


def invoke(*args: str) -> Result:
    return runner.invoke(app, [*args])


# --- one catalog option, named on stderr ---------------------------------------------------

CATALOG_COMMANDS = ("list", "validate", "render", "try", "eval", "budget", "reference", "lock")


def test_every_prompt_command_has_the_same_catalog_option():
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert sorted(commands) == sorted(CATALOG_COMMANDS)  # a new command joins the list
    options = {}
    for name in CATALOG_COMMANDS:
        command = commands[name]
        (option,) = [p for p in command.params if "--prompts-dir" in p.opts]
        assert sorted(option.opts) == ["--prompts-dir", "-d"], name
        options[name] = option
    helps = {option.help for option in options.values()}
    assert len(helps) == 1
    assert "GOFLOW_PROMPTS_DIR" in helps.pop()


def test_the_shipped_catalog_is_the_default_and_named_on_stderr():
    result = invoke("list")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"catalog: {SHIPPED} (shipped)"]
    assert not any(line.startswith("catalog:") for line in result.stdout.splitlines())


def test_goflow_prompts_dir_is_used_by_list_and_render(tmp_path, monkeypatch):
    directory = write_catalog(tmp_path / "mine", {"mine-only.yaml": SPEC.format(slug="mine-only")})
    monkeypatch.setenv("GOFLOW_PROMPTS_DIR", str(directory))
    listed = invoke("list")
    assert listed.exit_code == 0, listed.output
    assert "mine-only" in listed.stdout and "object-detection" not in listed.stdout
    assert "1 specs" in listed.stdout
    assert f"catalog: {directory.resolve()} (GOFLOW_PROMPTS_DIR)" in listed.stderr

    rendered = invoke("render", "mine-only", "--json")
    assert rendered.exit_code == 0, rendered.output
    payload = json.loads(rendered.stdout)  # stdout is the JSON alone
    assert payload["system_prompt"] == "You are a test analyst. Reply with JSON only."
    assert f"catalog: {directory.resolve()} (GOFLOW_PROMPTS_DIR)" in rendered.stderr


def test_the_config_file_sets_the_catalog_and_d_overrides_everything(tmp_path, monkeypatch):
    mine = write_catalog(tmp_path / "mine", {"from-file.yaml": SPEC.format(slug="from-file")})
    config = tmp_path / "goflow.yaml"
    config.write_text(f"prompts_dir: {mine}\n")
    result = invoke("list", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "from-file" in result.stdout
    assert f"catalog: {mine.resolve()} (prompts_dir in {config})" in result.stderr

    other = write_catalog(tmp_path / "other", {"from-flag.yaml": SPEC.format(slug="from-flag")})
    monkeypatch.setenv("GOFLOW_PROMPTS_DIR", str(mine))
    result = invoke("validate", "-d", str(other), "--config", str(config))
    assert result.exit_code == 0, result.output
    assert f"catalog: {other.resolve()} (-d)" in result.stderr
    assert "from-file" not in result.output


def test_a_broken_config_is_a_configuration_error_not_the_shipped_catalog(tmp_path):
    config = tmp_path / "goflow.yaml"
    config.write_text("prompts_dir: [not, a, path]\n")
    result = invoke("list", "--config", str(config))
    assert result.exit_code == 2
    assert "configuration error" in result.stderr and "prompts_dir" in result.stderr
    assert result.stdout == ""


def test_validate_takes_the_directory_by_d_and_still_accepts_it_positionally(tmp_path):
    directory = write_catalog(tmp_path / "c", {"ok.yaml": SPEC.format(slug="ok")})
    by_option = invoke("validate", "-d", str(directory))
    assert by_option.exit_code == 0, by_option.output
    assert f"catalog: {directory.resolve()} (-d)" in by_option.stderr
    assert "deprecated" not in by_option.stderr

    positional = invoke("validate", str(directory))
    assert positional.exit_code == 0, positional.output
    assert "deprecated; use `prompts validate -d DIRECTORY`" in positional.stderr
    assert f"catalog: {directory.resolve()} (-d)" in positional.stderr

    both = invoke("validate", str(directory), "-d", str(tmp_path))
    assert both.exit_code == 2
    assert "once, with -d" in both.stderr
    assert "Deprecated: use -d DIRECTORY" in invoke("validate", "--help").stdout


def test_reference_of_another_catalog_needs_an_explicit_out(tmp_path):
    directory = write_catalog(tmp_path / "c", {"ok.yaml": SPEC.format(slug="ok")})
    shipped_reference = (REPO / "docs" / "ANALYSES.md").read_text()
    result = invoke("reference", "-d", str(directory))
    assert result.exit_code == 2
    assert "docs/ANALYSES.md describes the shipped catalog" in result.stderr
    assert "pass --out" in result.stderr
    assert (REPO / "docs" / "ANALYSES.md").read_text() == shipped_reference


# --- a broken spec does not hide the others ------------------------------------------------


@pytest.fixture
def broken_copy(tmp_path: Path) -> tuple[Path, Path, int]:
    """The shipped catalog with alt-text.yaml broken (an unknown variant); its file and line."""
    directory = copy_shipped(tmp_path)
    broken = directory / "alt-text.yaml"
    edit(broken, r"^variant: optimised$", "variant: sepia")
    return directory, broken, line_of(broken, r"^variant: sepia$")


def test_list_shows_the_good_specs_marks_the_broken_one_and_exits_1(broken_copy):
    directory, broken, line = broken_copy
    result = invoke("list", "-d", str(directory))
    assert result.exit_code == 1
    assert "object-detection" in result.stdout and "text-legibility" in result.stdout
    (row,) = [r for r in result.stdout.splitlines() if "alt-text" in r]
    assert "BROKEN (1 problem(s))" in row
    assert "24 specs, 1 broken (see stderr)" in result.stdout
    assert f"{broken}:{line}: variant:" in result.stderr


def test_render_of_another_slug_still_works_and_the_broken_one_says_why(broken_copy):
    directory, broken, line = broken_copy
    good = invoke("render", "object-detection", "-d", str(directory), "--json")
    assert good.exit_code == 0, good.output
    assert '"slug": "object-detection"' in good.stdout
    assert "1 other spec file(s) do not load (alt-text)" in good.stderr

    bad = invoke("render", "alt-text", "-d", str(directory))
    assert bad.exit_code == 1
    assert f"{broken}:{line}: variant:" in bad.stderr
    assert "the spec file of 'alt-text' does not load" in bad.stderr
    assert bad.stdout == ""


def test_validate_still_exits_1_on_one_broken_spec(broken_copy):
    directory, broken, line = broken_copy
    result = invoke("validate", "-d", str(directory))
    assert result.exit_code == 1
    assert f"{broken}:{line}: variant:" in result.stdout
    assert "1 error(s), 0 warning(s)" in result.stdout


def test_commands_about_the_whole_set_refuse_a_partial_catalog(broken_copy):
    directory, broken, line = broken_copy
    result = invoke("lock", "-d", str(directory), "--check")
    assert result.exit_code == 1
    assert f"{broken}:{line}: variant:" in result.stderr


def test_the_worker_still_refuses_a_catalog_with_one_broken_spec(broken_copy, monkeypatch):
    directory, broken, line = broken_copy
    with pytest.raises(CatalogError) as caught:
        load_catalog(directory)
    assert caught.value.problems == [
        f"{broken}:{line}: variant: Input should be 'optimised' or 'greyscale'"
    ]

    monkeypatch.setenv("GOFLOW_API_KEY", "made-up-key")
    # A backend nothing listens on: the refusal must come before any request.
    settings = load_settings(
        None, prompts_dir=directory, base_url="http://127.0.0.1:9", state_dir=directory / "s"
    )
    engine = ScriptedEngine()  # the model check of a real engine would refuse first offline
    with pytest.raises(ConfigError, match="the prompt catalog cannot be used") as refused:
        asyncio.run(run_worker(settings, burst=True, engine=engine, handle_signals=False))
    assert engine.started == 0
    assert "alt-text.yaml" in str(refused.value)
    assert not (directory / "s").exists()  # refused before the state was opened


def test_a_broken_shared_file_stops_list(tmp_path):
    directory = write_catalog(tmp_path / "c", {"ok.yaml": SPEC.format(slug="ok")})
    (directory / "_catalog.yaml").write_text("system_prompt: [unclosed\n")
    result = invoke("list", "-d", str(directory))
    assert result.exit_code == 1
    assert f"{directory / '_catalog.yaml'}:2: invalid YAML" in result.stderr
    assert "the catalog cannot be used" in result.stderr


# --- unknown slugs -------------------------------------------------------------------------


@pytest.fixture
def sky(tmp_path: Path) -> Path:
    return write_catalog(
        tmp_path / "sky",
        {"sky-colour.yaml": SPEC.format(slug="sky-colour"), "sea.yaml": SPEC.format(slug="sea")},
    )


def test_render_of_a_typo_is_an_error_with_a_suggestion(sky):
    result = invoke("render", "sky-color", "-d", str(sky))
    assert result.exit_code == 2
    assert "no analysis 'sky-color' in the catalog" in result.stderr
    assert "did you mean 'sky-colour'?" in result.stderr
    assert result.stdout == ""


def test_render_of_a_slug_like_none_points_at_list(sky):
    result = invoke("render", "object-detection", "-d", str(sky))
    assert result.exit_code == 2
    assert "did you mean" not in result.stderr
    assert "`goflow-gpu prompts list` shows the slugs" in result.stderr


def test_fallback_shows_the_generic_spec_and_says_so(sky):
    result = invoke("render", "sky-color", "-d", str(sky), "--fallback", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["slug"] == "sky-color" and payload["version"] == 0
    assert payload["json_schema"]["required"] == ["summary", "labels", "confidence"]
    assert "showing the generic fallback spec the worker would use" in result.stderr


def test_try_refuses_a_typo_before_loading_any_engine(sky, tmp_path, monkeypatch):
    image = tmp_path / "blue.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(image)
    # An OpenAI-compatible engine on a port nothing listens on: reaching it would fail with
    # another message and exit code.
    result = invoke(
        "try", "sky-color", str(image), "-d", str(sky),
        "--openai-base-url", "http://127.0.0.1:9/v1",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "did you mean 'sky-colour'?" in result.stderr
    assert "--- raw output ---" not in result.stdout


# --- unsatisfiable schemas: errors with field and line -------------------------------------

UNSATISFIABLE = [
    pytest.param(
        ("required: [label]", "required: [label, colour]"),
        r"^  required:",
        "colour: required, but not in properties while additionalProperties is false",
        id="required-not-in-properties",
    ),
    pytest.param(
        ("label: {type: string, maxLength: 20}", "label: false"),
        r"^    label: false",
        "label: required, but its schema is false",
        id="required-false",
    ),
    pytest.param(
        (
            "label: {type: string, maxLength: 20}",
            "label: {type: array, minItems: 3, maxItems: 2, items: {enum: [a]}}",
        ),
        r"^    label:",
        "label: minItems 3 is above maxItems 2",
        id="min-items-above-max-items",
    ),
    pytest.param(
        (
            "label: {type: string, maxLength: 20}",
            "label: {type: string, minLength: 30, maxLength: 20}",
        ),
        r"^    label:",
        "label: minLength 30 is above maxLength 20",
        id="min-length-above-max-length",
    ),
    pytest.param(
        ("label: {type: string, maxLength: 20}", "label: {type: number, minimum: 2, maximum: 1}"),
        r"^    label:",
        "label: minimum 2 and maximum 1 leave no value",
        id="minimum-above-maximum",
    ),
    pytest.param(
        (
            "label: {type: string, maxLength: 20}",
            "label: {type: integer, minimum: 0.2, maximum: 0.8}",
        ),
        r"^    label:",
        "label: minimum 0.2 and maximum 0.8 leave no value for an integer",
        id="no-integer-in-range",
    ),
    pytest.param(
        ("label: {type: string, maxLength: 20}", "label: {type: string, enum: []}"),
        r"^    label:",
        "label: empty enum",
        id="empty-enum",
    ),
]


@pytest.mark.parametrize(("change", "line_pattern", "message"), UNSATISFIABLE)
def test_validate_refuses_an_unsatisfiable_schema_naming_field_and_line(
    tmp_path, change, line_pattern, message
):
    directory = write_catalog(tmp_path / "c", {"odd.yaml": SPEC.format(slug="odd")})
    file = directory / "odd.yaml"
    edit(file, re.escape(change[0]), change[1])
    result = invoke("validate", "-d", str(directory))
    assert result.exit_code == 1, result.output
    expected = f"{file}:{line_of(file, line_pattern)}: json_schema: {message}"
    assert any(line.startswith(expected) for line in result.stdout.splitlines()), result.stdout
    assert "no answer can satisfy it" in result.stdout
    assert "1 error(s)" in result.stdout


NESTED = """\
slug: nested
name: Nested
version: 1
variant: optimised
user_prompt: Answer with "objects".
json_schema:
  type: object
  additionalProperties: false
  required: [objects]
  properties:
    objects:
      type: array
      maxItems: 3
      items:
        type: object
        additionalProperties: false
        required:
          - name
          - colour
        properties:
          name: {type: string, maxLength: 20}
sampling:
  max_tokens: 64
"""


def test_a_nested_schema_error_names_the_item_field_and_its_line(tmp_path):
    directory = write_catalog(tmp_path / "c", {"nested.yaml": NESTED})
    file = directory / "nested.yaml"
    result = invoke("validate", "-d", str(directory))
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0].startswith(
        f"{file}:19: json_schema: objects[].colour: required, but not in properties"
    )


def test_an_invalid_schema_keyword_names_the_field_and_the_keyword(tmp_path):
    directory = write_catalog(tmp_path / "c", {"neg.yaml": SPEC.format(slug="neg")})
    file = directory / "neg.yaml"
    edit(file, "maxLength: 20", "maxLength: -1")
    result = invoke("validate", "-d", str(directory))
    assert result.exit_code == 1
    assert (
        f"{file}:11: json_schema: label: invalid JSON schema at 'maxLength': -1 is less than "
        "the minimum of 0"
    ) in result.stdout


def test_a_satisfiable_schema_with_the_same_keywords_passes(tmp_path):
    text = SPEC.format(slug="fine").replace(
        "label: {type: string, maxLength: 20}",
        "label: {type: integer, minimum: 1, maximum: 1}",
    )
    directory = write_catalog(tmp_path / "c", {"fine.yaml": text})
    result = invoke("validate", "-d", str(directory))
    assert result.exit_code == 0, result.output


# --- content changed under the same version ------------------------------------------------


def test_validate_flags_an_edit_without_a_version_bump_as_lock_check_does(tmp_path):
    directory = copy_shipped(tmp_path)
    spec = directory / "scene-mood.yaml"
    edit(spec, r"^  Judge the mood", "  Look closely. Judge the mood")
    version_line = line_of(spec, r"^version: ")
    found = re.search(r"^version: (\d+)", spec.read_text(), re.MULTILINE)
    assert found is not None
    version = int(found.group(1))
    why = (
        f"the spec's content changed but its version is still {version}; raise `version` in "
        "scene-mood.yaml"
    )

    validated = invoke("validate", "-d", str(directory))
    assert validated.exit_code == 1
    assert f"{spec}:{version_line}: {why}" in validated.stdout
    assert "1 error(s), 0 warning(s)" in validated.stdout

    checked = invoke("lock", "-d", str(directory), "--check")
    assert checked.exit_code == 1
    assert f"scene-mood: {why}" in checked.stderr

    # The version raised: no longer an error; the lock not holding it yet is a warning for
    # validate and a refusal for lock --check, until `prompts lock` records it.
    edit(spec, r"^version: \d+", f"version: {version + 1}")
    validated = invoke("validate", "-d", str(directory))
    assert validated.exit_code == 0, validated.output
    assert (
        f"warning: {spec}:{version_line}: scene-mood: version {version + 1} is not locked yet "
        f"(locked: {version})"
    ) in validated.stdout
    assert invoke("lock", "-d", str(directory), "--check").exit_code == 1
    assert invoke("lock", "-d", str(directory)).exit_code == 0
    validated = invoke("validate", "-d", str(directory))
    assert "0 error(s), 0 warning(s)" in validated.stdout
    assert invoke("lock", "-d", str(directory), "--check").exit_code == 0


def test_a_custom_catalog_without_a_lock_has_nothing_to_check(tmp_path):
    directory = copy_shipped(tmp_path, lock=False)
    edit(directory / "scene-mood.yaml", r"^  Judge the mood", "  Look closely. Judge the mood")
    result = invoke("validate", "-d", str(directory))
    assert result.exit_code == 0, result.output
    assert "0 error(s), 0 warning(s)" in result.stdout


def test_the_shipped_catalog_must_have_its_lock(tmp_path, monkeypatch):
    # A stand-in for the shipped catalog, so the real one is not touched.
    directory = copy_shipped(tmp_path, lock=False)
    monkeypatch.setattr(catalog_module, "shipped_catalog_dir", lambda: directory)
    monkeypatch.setattr(prompts_cli, "shipped_catalog_dir", lambda: directory)
    result = invoke("validate")
    assert result.exit_code == 1
    assert f"catalog: {directory.resolve()} (shipped)" in result.stderr
    assert f"{directory / LOCK_FILE}:0: missing: the lock of versions" in result.stdout
    assert audit_lock(load_catalog(directory), required=False).problems() == []


def test_a_removed_spec_is_stale_in_the_lock_not_an_error(tmp_path):
    directory = copy_shipped(tmp_path)
    (directory / "scene-mood.yaml").unlink()
    result = invoke("validate", "-d", str(directory))
    assert result.exit_code == 0, result.output
    assert (
        f"warning: {directory / LOCK_FILE}:0: scene-mood: in the lock but not in the catalog"
    ) in result.stdout
