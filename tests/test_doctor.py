"""``goflow-gpu doctor``: real loopback servers, real files, a real fake nvidia-smi on PATH."""

from __future__ import annotations

import asyncio
import socket
import stat
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from aiohttp import web
from typer.testing import CliRunner

from goflow_gpu.doctor import Check, register, render_checks, run_doctor
from goflow_gpu.engines import create_engine
from goflow_gpu.errors import ConfigError
from goflow_gpu.settings import Settings, load_settings

MADE_UP_KEY = "zqxv-made-up-doctor-key-5521"
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"
QWEN_CONFIG = (
    '{"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]}'
)


class CountingBackend:
    """A tiny HTTP server on loopback that answers 404 to everything and counts paths."""

    def __init__(self) -> None:
        self.paths: Counter[str] = Counter()
        self.saw_key = False
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        self.paths[request.path] += 1
        self.saw_key = self.saw_key or "X-API-Key" in request.headers
        return web.json_response({"detail": "Not Found"}, status=404)

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(self._runner.addresses[0][1])

    def __enter__(self) -> CountingBackend:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def backend() -> Iterator[CountingBackend]:
    with CountingBackend() as server:
        yield server


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("GOFLOW_API_KEY", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def settings_for(tmp_path: Path, base_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "base_url": base_url,
        "state_dir": tmp_path / "state",
        "engine": "openai",
        "openai_base_url": "http://127.0.0.1:9/v1",
    }
    values.update(overrides)
    return load_settings(None, **values)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name.split(" (")[0]: c for c in checks}


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command, so the app keeps subcommand names like the real one
        pass

    return app


# -- key and backend ---------------------------------------------------------------------------


def test_missing_key_and_unreachable_backend_fail_with_clear_details(
    tmp_path: Path, closed_port_url: str
) -> None:
    checks = by_name(run_doctor(settings_for(tmp_path, closed_port_url)))
    assert checks["api key"].ok is False
    assert "GOFLOW_API_KEY is not set" in checks["api key"].detail
    assert checks["backend"].ok is False
    assert closed_port_url in checks["backend"].detail
    assert "cannot be reached" in checks["backend"].detail
    assert "network error" in checks["backend"].detail


def test_reachable_backend_is_ok_and_next_job_is_never_called(
    tmp_path: Path, backend: CountingBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOFLOW_API_KEY", MADE_UP_KEY)
    checks = run_doctor(settings_for(tmp_path, backend.url))
    named = by_name(checks)
    assert named["api key"].ok is True  # set: nothing to fix, but...
    assert named["api key"].verdict == "present (not verified)"  # ...never "ok": unchecked
    assert "not verified" in named["api key"].detail
    assert named["backend"].ok is True
    assert backend.url in named["backend"].detail
    assert backend.paths == Counter({"/": 1})
    assert not backend.saw_key
    assert all(MADE_UP_KEY[:4] not in c.detail for c in checks)


def test_check_backend_false_makes_no_request(tmp_path: Path, backend: CountingBackend) -> None:
    checks = by_name(run_doctor(settings_for(tmp_path, backend.url), check_backend=False))
    assert checks["backend"].ok is None
    assert backend.paths == Counter()


def test_cli_all_good_exits_zero_and_never_prints_the_key(
    tmp_path: Path, backend: CountingBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOFLOW_API_KEY", MADE_UP_KEY)
    monkeypatch.setenv("GOFLOW_ENGINE", "openai")
    monkeypatch.setenv("GOFLOW_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(
        cli(), ["doctor", "--base-url", backend.url, "--state-dir", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output
    assert "no check failed" in result.output
    for name in ("configuration", "api key", "backend", "state directory", "prompt catalog"):
        assert name in result.output
    assert MADE_UP_KEY[:4] not in result.output
    assert "next-job" not in "".join(backend.paths)
    (key_line,) = [line for line in result.output.splitlines() if "api key" in line]
    assert "present (not verified)" in key_line
    assert " ok " not in key_line  # the table never says ok for a key it could not check


def test_cli_missing_key_and_closed_port_exit_one(tmp_path: Path, closed_port_url: str) -> None:
    result = CliRunner().invoke(
        cli(),
        [
            "doctor",
            "--base-url",
            closed_port_url,
            "--state-dir",
            str(tmp_path / "s"),
            "--engine",
            "openai",
        ],
        env={"GOFLOW_OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "COLUMNS": "200"},
    )
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    assert "2 check(s) failed: api key, backend" in result.output


def test_cli_unloadable_configuration_exits_two(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("engine: tensorrt\n", encoding="utf-8")
    result = CliRunner().invoke(cli(), ["doctor", "--config", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "configuration" in result.output
    assert "engine" in result.output


def test_render_checks_prints_one_verdict_per_line() -> None:
    from rich.console import Console

    console = Console(record=True, width=120)
    table = render_checks(
        [Check("a", True, "fine"), Check("b", False, "[red]x[/]"), Check("c", None, "meh")],
        console,
    )
    text = console.export_text()
    assert table.row_count == 3
    assert "ok" in text
    assert "FAIL" in text
    assert "warn" in text
    assert "[red]x[/]" in text  # details are shown literally, not as markup


# -- engine, GPU, model, state, prompts ---------------------------------------------------------


def fake_nvidia_smi(directory: Path, script: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + script + "\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def local_model(tmp_path: Path, weights: bool = True) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(QWEN_CONFIG, encoding="utf-8")
    if weights:
        (model / "model.safetensors").write_bytes(b"\0" * 1024)
    return model


def test_gpu_seen_through_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path / "bin", 'echo "NVIDIA H100 80GB HBM3, 81559"')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    model = local_model(tmp_path)
    base = settings_for(tmp_path, "http://127.0.0.1:9", engine="vllm", model=str(model))
    gpu = by_name(run_doctor(base, check_backend=False))["gpu"]
    assert gpu.ok is True
    assert "NVIDIA H100 80GB HBM3 (81559 MiB)" in gpu.detail

    tp2 = settings_for(
        tmp_path, "http://127.0.0.1:9", engine="vllm", model=str(model), tensor_parallel_size=2
    )
    gpu = by_name(run_doctor(tp2, check_backend=False))["gpu"]
    assert gpu.ok is False
    assert "needs 2 GPUs" in gpu.detail


def test_gpu_missing_for_a_cuda_device_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path / "bin", 'echo "NVIDIA-SMI has failed: no driver" >&2\nexit 9')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    model = str(local_model(tmp_path))
    cuda = settings_for(
        tmp_path, "http://127.0.0.1:9", engine="transformers", device="cuda", model=model
    )
    gpu = by_name(run_doctor(cuda, check_backend=False))["gpu"]
    assert gpu.ok is False
    assert "device=cuda" in gpu.detail
    assert "nvidia-smi exit 9: NVIDIA-SMI has failed: no driver" in gpu.detail

    auto = cuda.model_copy(update={"device": "auto"})
    gpu = by_name(run_doctor(auto, check_backend=False))["gpu"]
    assert gpu.ok is None
    assert "will run on CPU" in gpu.detail


def test_without_nvidia_smi_torch_is_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    settings = settings_for(tmp_path, "http://127.0.0.1:9", engine="transformers")
    gpu = by_name(run_doctor(settings, check_backend=False))["gpu"]
    if torch.cuda.is_available():
        assert gpu.ok is True
        assert "torch.cuda" in gpu.detail
    else:
        assert gpu.ok is None
        assert "torch.cuda.is_available() is False" in gpu.detail


def hub_snapshot(tmp_path: Path, weights: bool) -> Path:
    snapshot = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-VL-7B-Instruct" / "snapshots" / "a1"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(QWEN_CONFIG, encoding="utf-8")
    if weights:
        (snapshot / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 2048)
    return snapshot


def model_check(settings: Settings) -> Check:
    return by_name(run_doctor(settings, check_backend=False))["model"]


def test_model_found_in_the_hf_cache(tmp_path: Path) -> None:
    hub_snapshot(tmp_path, weights=True)
    check = model_check(settings_for(tmp_path, "http://127.0.0.1:9", engine="vllm", model=QWEN))
    assert check.ok is True
    assert "in the HF cache" in check.detail
    assert "1 weight file(s)" in check.detail


def test_model_without_weights_fails_unless_dummy(tmp_path: Path) -> None:
    hub_snapshot(tmp_path, weights=False)
    check = model_check(settings_for(tmp_path, "http://127.0.0.1:9", engine="vllm", model=QWEN))
    assert check.ok is False
    assert "no weight files" in check.detail
    dummy = settings_for(
        tmp_path, "http://127.0.0.1:9", engine="vllm", model=QWEN, load_format="dummy"
    )
    assert model_check(dummy).ok is True


def test_model_not_cached_warns_online_and_fails_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(tmp_path, "http://127.0.0.1:9", engine="vllm", model=QWEN)
    check = model_check(settings)
    assert check.ok is None
    assert str(tmp_path / "hf" / "hub") in check.detail
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check = model_check(settings)
    assert check.ok is False
    assert "HF_HUB_OFFLINE" in check.detail


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}', "is not a Qwen2.5-VL"),
        ('{"model_type": "qwen2_vl"}', "model_type 'qwen2_vl', expected 'qwen2_5_vl'"),
        ("{}", "model_type None"),
        ("{not json", "cannot be read as JSON"),
    ],
)
def test_model_that_is_not_a_qwen25_vl_fails(tmp_path: Path, config: str, expected: str) -> None:
    model = local_model(tmp_path)
    (model / "config.json").write_text(config, encoding="utf-8")
    check = model_check(
        settings_for(tmp_path, "http://127.0.0.1:9", engine="vllm", model=str(model))
    )
    assert check.ok is False
    assert expected in check.detail
    assert str(model) in check.detail


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such directory"),
        ("not-qwen", "is not a Qwen2.5-VL"),
        ("no-weights", "no weight files"),
        ("offline", "HF_HUB_OFFLINE is set"),
    ],
)
def test_create_engine_refuses_what_the_doctor_refuses_with_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, message: str
) -> None:
    model = QWEN
    if case == "missing":
        model = str(tmp_path / "nope")
    elif case in ("not-qwen", "no-weights"):
        directory = local_model(tmp_path, weights=case != "no-weights")
        if case == "not-qwen":
            (directory / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
        model = str(directory)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and HF_HOME is an empty cache
    for engine in ("vllm", "transformers"):
        settings = settings_for(tmp_path, "http://127.0.0.1:9", engine=engine, model=model)
        doctor_says = model_check(settings)
        assert doctor_says.ok is False
        with pytest.raises(ConfigError) as refused:
            create_engine(settings)
        assert str(refused.value) == doctor_says.detail  # the doctor's own words, no second copy
        assert message in str(refused.value)


def test_local_model_dir_needs_config_json(tmp_path: Path) -> None:
    model = local_model(tmp_path)
    (model / "config.json").unlink()
    check = model_check(
        settings_for(tmp_path, "http://127.0.0.1:9", engine="vllm", model=str(model))
    )
    assert check.ok is False
    assert "no config.json" in check.detail
    missing = str(tmp_path / "nope")
    check = model_check(settings_for(tmp_path, "http://127.0.0.1:9", engine="vllm", model=missing))
    assert check.ok is False
    assert "no such directory" in check.detail
    assert missing in check.detail


def test_state_dir_writable_leaves_nothing_behind(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "http://127.0.0.1:9")
    check = by_name(run_doctor(settings, check_backend=False))["state directory"]
    assert check.ok is True
    assert list((tmp_path / "state").iterdir()) == []


def test_state_dir_not_writable_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    settings = settings_for(tmp_path, "http://127.0.0.1:9", state_dir=blocker / "state")
    check = by_name(run_doctor(settings, check_backend=False))["state directory"]
    assert check.ok is False
    assert str(blocker / "state") in check.detail
    assert "not writable" in check.detail


def test_prompts_and_engine_checks(tmp_path: Path) -> None:
    good = by_name(run_doctor(settings_for(tmp_path, "http://127.0.0.1:9"), check_backend=False))
    assert good["prompt catalog"].ok is True
    assert "analysis types" in good["prompt catalog"].detail
    assert good["engine"].ok is True

    empty = tmp_path / "prompts"
    empty.mkdir()
    settings = settings_for(tmp_path, "http://127.0.0.1:9", prompts_dir=empty)
    settings = settings.model_copy(update={"openai_base_url": None})
    bad = by_name(run_doctor(settings, check_backend=False))
    assert bad["prompt catalog"].ok is False
    assert "problem(s) in the prompt catalog" in bad["prompt catalog"].detail
    assert bad["engine"].ok is False
    assert "GOFLOW_OPENAI_BASE_URL" in bad["engine"].detail


def test_an_unreadable_hf_cache_is_named_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cache owned by another user (the worker runs as a non-root uid) raises EACCES on
    # stat; root ignores permission bits, so the refusal is made by hand here.
    hub_snapshot(tmp_path, weights=True)
    original = Path.is_dir

    def refusing(self: Path) -> bool:
        if self.name == "snapshots":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "is_dir", refusing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check = model_check(settings_for(tmp_path, "http://127.0.0.1:9", engine="vllm", model=QWEN))
    assert check.ok is False
    assert f"could not read {tmp_path / 'hf' / 'hub'} (Permission denied)" in check.detail
