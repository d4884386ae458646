"""Settings precedence, validation errors and the startup errors of the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from goflow_gpu.errors import ConfigError
from goflow_gpu.settings import PRODUCTION_BASE_URL, Settings, load_settings, value_sources


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GOFLOW_"):
            monkeypatch.delenv(name)


def test_defaults_point_at_production_and_vllm() -> None:
    s = load_settings()
    assert s.base_url == PRODUCTION_BASE_URL
    assert s.engine == "vllm"
    assert s.model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert s.api_key is None


def test_precedence_flag_over_env_over_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("engine: transformers\nmodel: from-yaml\nqa_retries: 5\nstate_dir: /tmp/y\n")
    monkeypatch.setenv("GOFLOW_MODEL", "from-env")
    monkeypatch.setenv("GOFLOW_STATE_DIR", "/tmp/e")
    s = load_settings(config, state_dir=Path("/tmp/flag"), engine=None)
    assert s.engine == "transformers"  # yaml over default
    assert s.qa_retries == 5
    assert s.model == "from-env"  # env over yaml
    assert s.state_dir == Path("/tmp/flag")  # flag over env


def test_env_names_operators_rely_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOFLOW_API_KEY", "made-up-key-123")
    monkeypatch.setenv("GOFLOW_BASE_URL", "http://127.0.0.1:9999/")
    monkeypatch.setenv("GOFLOW_ENGINE", "openai")
    monkeypatch.setenv("GOFLOW_OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    s = load_settings()
    assert s.require_api_key().get_secret_value() == "made-up-key-123"
    assert "made-up-key-123" not in repr(s)
    assert s.base_url == "http://127.0.0.1:9999"
    assert s.engine == "openai"
    assert s.openai_base_url == "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://example.com", "plain http to a non-loopback host"),
        ("ftp://127.0.0.1", "must be an http(s) URL"),
        ("https://user:pw@example.com", "must not carry credentials"),
    ],
)
def test_insecure_or_bad_base_url_refused(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="base_url") as info:
        load_settings(base_url=url)
    assert fragment in str(info.value)


def test_loopback_http_allowed() -> None:
    for url in ("http://localhost:1", "http://127.0.0.2:8080", "http://[::1]:80"):
        assert load_settings(base_url=url).base_url == url


def test_key_refused_in_yaml_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("api_key: made-up\n")
    with pytest.raises(ConfigError, match="GOFLOW_API_KEY"):
        load_settings(config)
    with pytest.raises(ConfigError, match="GOFLOW_API_KEY"):
        load_settings(api_key="made-up")


def test_unknown_and_bad_settings_are_named(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("engine: tensorrt\nmax_pixel: 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    text = str(info.value)
    assert "engine" in text and str(config) in text
    assert "max_pixel: unknown setting (did you mean max_pixels?)" in text


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read config file"),  # no such file: never a silent fall back to defaults
        ("- engine: vllm\n", "top level must be a mapping"),
        ("engine: [unclosed\n", "not valid YAML"),
        ("GOFLOW_API_KEY: made-up\n", "api_key must not be in a config file"),
    ],
)
def test_a_bad_config_file_is_refused_by_name(
    tmp_path: Path, content: str | None, fragment: str
) -> None:
    config = tmp_path / "typo.yaml"
    if content is not None:
        config.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert fragment in str(info.value)
    assert str(config) in str(info.value)


def test_value_sources_follow_the_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("engine: transformers\nmodel: from-yaml\nqa_retries: 5\n")
    monkeypatch.setenv("GOFLOW_MODEL", "from-env")
    monkeypatch.setenv("goflow_seed", "7")  # any case, as pydantic-settings reads it
    sources = value_sources(config, qa_retries=1, engine=None)
    assert sources["qa_retries"] == "flag"  # flag over yaml
    assert sources["engine"] == f"file {config}"  # a flag of None is not given
    assert sources["model"] == "env GOFLOW_MODEL"  # env over yaml
    assert sources["seed"] == "env goflow_seed"
    assert sources["base_url"] == "default"
    assert set(sources) == set(Settings.model_fields)


def test_missing_key_message() -> None:
    with pytest.raises(ConfigError, match="GOFLOW_API_KEY is not set"):
        load_settings().require_api_key()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "goflow_gpu", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_startup_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("GOFLOW_")}
    env["GOFLOW_STATE_DIR"] = str(tmp_path)
    missing = _cli("run", env=env)
    assert missing.returncode == 2
    assert "GOFLOW_API_KEY is not set" in missing.stderr
    assert "Traceback" not in missing.stderr
    env["GOFLOW_API_KEY"] = "made-up-key-xyz"
    insecure = _cli("run", "--base-url", "http://goflow.example.com", env=env)
    assert insecure.returncode == 2
    assert "plain http" in insecure.stderr
    assert "Traceback" not in insecure.stderr
    assert "made-up-key-xyz" not in insecure.stderr + insecure.stdout


def test_a_mistyped_goflow_variable_is_refused_with_a_suggestion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOFLOW_BASEURL", "http://127.0.0.1:9")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "GOFLOW_BASEURL (did you mean GOFLOW_BASE_URL?)" in message
    monkeypatch.delenv("GOFLOW_BASEURL")
    monkeypatch.setenv("GOFLOW_QWERTYUIOP", "1")
    with pytest.raises(
        ConfigError, match=r"unknown environment variable\(s\): GOFLOW_QWERTYUIOP\."
    ):
        load_settings()


def test_known_non_setting_variables_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOFLOW_API_KEY", "made-up-settings-key")
    monkeypatch.setenv("GOFLOW_OPENAI_API_KEY", "made-up-inference-key")
    monkeypatch.setenv("GOFLOW_LIVE_BASE_URL", "https://example.invalid")
    monkeypatch.setenv("goflow_base_url", "http://127.0.0.1:8787")  # any case, like pydantic
    assert load_settings().base_url == "http://127.0.0.1:8787"


def test_a_model_trained_here_is_served_at_its_pixel_budget_unless_one_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "trained"
    model.mkdir()
    (model / "training.json").write_text(
        '{"pixel_budget": {"min_pixels": 3136, "max_pixels": 28224}}'
    )
    settings = load_settings(None, model=str(model))
    assert (settings.min_pixels, settings.max_pixels) == (3136, 28224)
    sources = value_sources(None, settings=settings, model=str(model))
    assert sources["max_pixels"] == f"training.json of {model}"  # config show says why
    monkeypatch.setenv("GOFLOW_MAX_PIXELS", str(448 * 448))
    settings = load_settings(None, model=str(model))
    assert (settings.min_pixels, settings.max_pixels) == (3136, 448 * 448)
    sources = value_sources(None, settings=settings, model=str(model))
    assert (sources["min_pixels"], sources["max_pixels"]) == (
        f"training.json of {model}",
        "env GOFLOW_MAX_PIXELS",
    )
    monkeypatch.delenv("GOFLOW_MAX_PIXELS")
    # a broken or partial record, or none: the defaults
    (model / "training.json").write_text('{"pixel_budget": {"min_pixels": 9}}')
    default = load_settings(None)
    settings = load_settings(None, model=str(model))
    assert (settings.min_pixels, settings.max_pixels) == (default.min_pixels, default.max_pixels)
    (model / "training.json").write_text("not json")
    assert load_settings(None, model=str(model)).max_pixels == default.max_pixels
