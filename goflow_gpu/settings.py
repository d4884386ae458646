"""Typed settings: CLI flag > environment (``GOFLOW_*``) > YAML file (``--config``) > defaults.

The API key is only ever read from ``GOFLOW_API_KEY``: a YAML file or a CLI flag carrying it is
refused, so that it never lands in a config file or a shell history. It is a ``SecretStr``; its
repr is masked, and nothing in goflow-gpu logs or stores it.

**What is configuration** (pydantic-settings does the work): the fields with their types, bounds
and defaults; the order of the layers (:meth:`Settings.settings_customise_sources`: init kwargs,
which are the CLI flags, then ``EnvSettingsSource`` with the ``GOFLOW_`` prefix, then
``YamlConfigSettingsSource``); unknown keys refused by ``extra="forbid"``.

**What logic remains, and why:** the YAML source is subclassed (:class:`_YamlFile`) because the
library skips a missing file silently and lets a YAML error or a list at the top level through
as a raw exception; ours names the file, refuses ``api_key`` in it, and is told which file to
read through a context variable (the library reads a file fixed in ``model_config``, and the
file is a per-call argument here). :func:`check_environment` refuses mistyped ``GOFLOW_*``
variables (pydantic-settings ignores them: a typo of ``GOFLOW_BASE_URL`` would send the worker to
production). :func:`load_settings` turns validation errors into one line per setting with a
"did you mean". :func:`value_sources` re-reads the same sources to say where each value came
from (``goflow-gpu config show``). The URL checks are the project's security rules.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from goflow_gpu.errors import ConfigError

PRODUCTION_BASE_URL = "https://goflow-backend.yellowsand-8784ae26.uksouth.azurecontainerapps.io"
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"

# The YAML file of the Settings being built (None: no file); a context variable so that
# concurrent loads don't mix.
_YAML_FILE: ContextVar[Path | None] = ContextVar("goflow_yaml_file", default=None)

EngineName = Literal["vllm", "transformers", "openai"]
LogFormat = Literal["auto", "json", "console"]


def is_loopback_host(host: str | None) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_backend_url(url: str, what: str = "base_url") -> str:
    """Allow https anywhere and plain http only to loopback (test servers). Credentials refused."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http(s) URL with a host, got {url!r}")
    if parts.username or parts.password:
        raise ValueError(f"{what} must not carry credentials; use GOFLOW_API_KEY")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"{what} {url!r} uses plain http to a non-loopback host; use https "
            "(plain http is only for loopback test servers)"
        )
    return url.rstrip("/")


class Settings(BaseSettings):
    """All settings of goflow-gpu. Field names map to env ``GOFLOW_<NAME>`` and YAML keys."""

    model_config = SettingsConfigDict(
        env_prefix="GOFLOW_", extra="forbid", validate_default=True, case_sensitive=False
    )

    # Backend
    api_key: SecretStr | None = Field(default=None, description="env GOFLOW_API_KEY only")
    base_url: str = PRODUCTION_BASE_URL
    state_dir: Path = Path("~/.local/state/goflow-gpu")

    # Engine
    engine: EngineName = "vllm"
    model: str = DEFAULT_MODEL
    model_label: str = Field(default="qwen2.5vl", description="reported as modelUsed")
    openai_base_url: str | None = None
    openai_api_key_env: str = Field(
        default="GOFLOW_OPENAI_API_KEY", description="env var holding the inference server's key"
    )
    dtype: str = "auto"
    max_model_len: int = Field(default=16384, ge=256)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=256,
        description=(
            "vLLM scheduler token budget per step (None: vLLM's engine default, 2048); "
            "16384 on an H100/H200"
        ),
    )
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    seed: int = 0
    load_format: str = Field(default="auto", description="'dummy' = random weights for benchmarks")
    enforce_eager: bool = False
    min_pixels: int = Field(default=256 * 28 * 28, ge=28 * 28)
    max_pixels: int = Field(default=1280 * 28 * 28, ge=28 * 28)
    batch_size: int = Field(default=8, ge=1, description="transformers engine batch size")
    device: str = Field(default="auto", description="transformers engine device")
    max_in_flight: int = Field(
        default=96,
        ge=1,
        description="requests kept in the engine at once (about 1.5x max_num_seqs: a queue)",
    )

    # Prompts and QA
    prompts_dir: Path | None = Field(default=None, description="default: the shipped catalog")
    qa_retries: int = Field(default=2, ge=0, le=10)

    # Worker
    poll_interval_min: float = Field(default=2.0, gt=0)
    poll_interval_max: float = Field(default=60.0, gt=0)
    report_concurrency: int = Field(default=8, ge=1, le=64)
    outage_patience: float = Field(
        default=600.0,
        ge=0,
        description=(
            "run: seconds a job waits for an unavailable backend or image host before the "
            "process exits 75 (try again later, state kept); serve waits forever"
        ),
    )
    outage_backoff_min: float = Field(
        default=1.0, gt=0, description="first pause of a job whose backend or image host is down"
    )
    outage_backoff_max: float = Field(
        default=60.0, gt=0, description="longest pause between probes of an unavailable service"
    )
    drain_timeout: float = Field(
        default=20.0,
        ge=0,
        description="on SIGTERM: seconds in-flight inference may finish before it is aborted",
    )
    engine_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="re-tries of a request the engine failed (not QA attempts)",
    )
    download_concurrency: int = Field(default=8, ge=1, le=64)
    max_image_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=50_000_000, ge=1024)
    media_timeout: float = Field(default=30.0, gt=0, description="seconds per image download")
    keep_media: bool = Field(
        default=False, description="keep a closed job's cached images (debugging, benchmarks)"
    )

    # Observability
    log_format: LogFormat = "auto"
    log_level: str = "INFO"
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="serve /metrics, /healthz, /readyz here"
    )
    metrics_host: str = Field(default="127.0.0.1", description="0.0.0.0 inside a container")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return check_backend_url(value, "base_url")

    @field_validator("openai_base_url")
    @classmethod
    def _openai_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"openai_base_url must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _trained_pixel_budget(self) -> Settings:
        """A model trained here (``goflow-gpu dev train-tiny``) is served at the pixel budget it
        was trained at, unless min_pixels / max_pixels are set: its boxes are in the pixels of
        the image as it saw it, and it has never seen another size."""
        from goflow_gpu.engines.scene_model import trained_pixel_budget

        budget = trained_pixel_budget(self.model)
        if budget is not None:
            for name, value in zip(("min_pixels", "max_pixels"), budget, strict=True):
                if name not in self.model_fields_set:
                    object.__setattr__(self, name, value)
        return self

    @field_validator("state_dir", "prompts_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env files and no secrets directory: the key comes from GOFLOW_API_KEY only.
        yaml_file = _YAML_FILE.get()
        if yaml_file is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, _YamlFile(settings_cls, yaml_file))

    def require_api_key(self) -> SecretStr:
        """The key, or a :class:`ConfigError` that says how to provide it."""
        if self.api_key is None or not self.api_key.get_secret_value().strip():
            raise ConfigError("GOFLOW_API_KEY is not set: export the agent API key in it")
        return self.api_key


class _YamlFile(YamlConfigSettingsSource):
    """pydantic-settings' YAML source, strict about the one file it is given.

    The library reads only files that exist and passes parse errors through raw; a mistyped
    ``--config`` path must be an error that names it, never a silent fall back to defaults.
    """

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        self.path = path.expanduser()
        super().__init__(settings_cls, yaml_file=self.path)

    @staticmethod
    def _existing_files(files: Any) -> list[Any]:
        # Unlike the library, keep a missing file: _read_file reports it with its name.
        return [Path(files)] if files is not None else []

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        return read_yaml_config(Path(file_path))


def read_yaml_config(path: Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with errors that name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of setting: value")
    if any(str(k).lower() in ("api_key", "goflow_api_key") for k in data):
        raise ConfigError(f"{path}: api_key must not be in a config file; use GOFLOW_API_KEY")
    return {str(k): v for k, v in data.items()}


def _did_you_mean(name: str) -> str:
    """`` (did you mean X?)`` for the closest setting name, or nothing."""
    close = difflib.get_close_matches(name.lower(), sorted(Settings.model_fields), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


#: GOFLOW_* variables that are not settings: the key, and the live tests' backend URL.
_OTHER_VARIABLES = frozenset({"GOFLOW_API_KEY", "GOFLOW_LIVE_BASE_URL"})


def check_environment(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``GOFLOW_*`` variables that are no setting: a typo such as ``GOFLOW_BASEURL``
    would otherwise be ignored silently and the worker would talk to the production backend.
    The error names each one with the closest setting ("did you mean")."""
    env = os.environ if environ is None else environ
    known = {f"GOFLOW_{name.upper()}" for name in Settings.model_fields}
    known |= _OTHER_VARIABLES | {settings.openai_api_key_env.upper()}
    unknown = sorted(
        name for name in env if name.upper().startswith("GOFLOW_") and name.upper() not in known
    )
    if not unknown:
        return
    # Compare what follows the prefix: every name shares "GOFLOW_", which would make anything
    # look close to something.
    suffixes = {name.removeprefix("GOFLOW_"): name for name in known}
    parts = []
    for name in unknown:
        asked = name.upper().removeprefix("GOFLOW_")
        close = difflib.get_close_matches(asked, sorted(suffixes), n=1, cutoff=0.75)
        parts.append(f"{name}" + (f" (did you mean {suffixes[close[0]]}?)" if close else ""))
    raise ConfigError(
        "unknown environment variable(s): "
        + "; ".join(parts)
        + ". Every setting is GOFLOW_<NAME> of goflow_gpu/settings.py; unset or rename them"
    )


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings: ``overrides`` (CLI flags, ``None`` = not given) > env > YAML > defaults.

    Raises :class:`ConfigError` with one line per bad setting, naming the config file.
    """
    if "api_key" in overrides:
        raise ConfigError("the API key is read from GOFLOW_API_KEY only")
    flags = {k: v for k, v in overrides.items() if v is not None}
    source = f" (config {config})" if config is not None else ""
    token = _YAML_FILE.set(config)
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown setting" + _did_you_mean(name)
            lines.append(f"{name}: {msg}")
        raise ConfigError(f"invalid settings{source}: " + "; ".join(lines)) from None
    finally:
        _YAML_FILE.reset(token)
    check_environment(settings)
    return settings


def value_sources(
    config: Path | None = None, *, settings: Settings | None = None, **overrides: Any
) -> dict[str, str]:
    """Where each setting's value comes from: ``flag``, ``env GOFLOW_X``, ``file PATH`` or
    ``default``, in the precedence :func:`load_settings` applies; given the loaded
    ``settings``, a pixel budget adopted from a trained model folder says so
    (``training.json of MODEL``).

    Asks the same pydantic-settings sources the settings were built from, so the answer cannot
    drift from the merge. Call it after :func:`load_settings` succeeded (that validates).
    """
    flags = {k for k, v in overrides.items() if v is not None}
    from_env = EnvSettingsSource(Settings)()
    from_file = _YamlFile(Settings, config)() if config is not None else {}
    env_names = {name.upper(): name for name in os.environ}
    sources = {}
    for name in Settings.model_fields:
        variable = f"GOFLOW_{name.upper()}"
        if name in flags:
            sources[name] = "flag"
        elif name in from_env:
            sources[name] = f"env {env_names.get(variable, variable)}"
        elif name in from_file:
            sources[name] = f"file {config}"
        else:
            sources[name] = "default"
    if settings is not None:
        from goflow_gpu.engines.scene_model import TRAINING_FILE, trained_pixel_budget

        if trained_pixel_budget(settings.model) is not None:
            for name in ("min_pixels", "max_pixels"):
                if sources[name] == "default":
                    sources[name] = f"{TRAINING_FILE} of {settings.model}"
    return sources
