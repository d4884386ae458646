"""Inference engines, registered by name and imported lazily.

Importing this package imports no heavy library (torch, vLLM, transformers): the engine modules
are imported by :func:`create_engine` only, so the CLI and the protocol layer start fast.
Every engine class implements ``from_settings(settings)``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from goflow_gpu.engines.base import Engine, InferenceRequest, InferenceResult, Sampling
from goflow_gpu.errors import ConfigError, EngineError

if TYPE_CHECKING:
    from goflow_gpu.settings import Settings

__all__ = [
    "ENGINES",
    "Engine",
    "InferenceRequest",
    "InferenceResult",
    "Sampling",
    "available_engines",
    "check_model",
    "create_engine",
]

#: engine name -> "module:Class"
ENGINES: dict[str, str] = {
    "vllm": "goflow_gpu.engines.vllm_engine:VllmEngine",
    "transformers": "goflow_gpu.engines.hf:TransformersEngine",
    "openai": "goflow_gpu.engines.openai_engine:OpenAIEngine",
}

# The top-level libraries each engine needs, and the pip extra that installs them.
_REQUIRES: dict[str, tuple[tuple[str, ...], str]] = {
    "vllm": (("vllm", "torch"), "vllm"),
    "transformers": (("transformers", "torch", "torchvision"), "transformers"),
    "openai": (("aiohttp",), ""),
}


def _missing_modules(name: str) -> list[str]:
    modules, _extra = _REQUIRES.get(name, ((), ""))
    return [m for m in modules if importlib.util.find_spec(m) is None]


def available_engines() -> list[str]:
    """Names of the engines whose libraries are installed here (checked without importing them)."""
    return [name for name in ENGINES if not _missing_modules(name)]


def _check_installed(name: str) -> None:
    """:class:`EngineError` for an unknown engine name or a missing library (naming the extra);
    checked without importing anything."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}: choose one of {', '.join(sorted(ENGINES))}")
    missing = _missing_modules(name)
    if missing:
        extra = _REQUIRES[name][1]
        hint = f"pip install 'goflow-gpu[{extra}]'" if extra else "reinstall goflow-gpu"
        raise EngineError(
            f"engine {name!r} needs {', '.join(missing)}, which is not installed: {hint}"
        )


def engine_class(name: str) -> type[Engine]:
    """Import and return the engine class registered as ``name``.

    Raises :class:`EngineError` for an unknown name or a missing library (naming the extra).
    """
    _check_installed(name)
    module_name, _, class_name = ENGINES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(f"engine {name!r} failed to import ({module_name}): {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise EngineError(f"engine {name!r}: {ENGINES[name]} is not an Engine class")
    return cls


def check_model(settings: Settings) -> None:
    """Refuse a model that cannot be loaded, from files only, in milliseconds.

    The doctor's own check (:func:`goflow_gpu.doctor.model_check`): a path that does not
    exist, a directory without config.json or that is not a Qwen2.5-VL, missing weights, or a
    Hub id that is not cached while ``HF_HUB_OFFLINE`` is set raise :class:`ConfigError` with
    the doctor's message (CLI exit 2: the setting must change; a restart would fail the same
    way). Without it such a model surfaced only after seconds of engine imports and library
    output, as a Hub-id error. Warnings (a Hub id that will be downloaded) pass.
    """
    from goflow_gpu.doctor import model_check

    check = model_check(settings)
    if check.ok is False:
        raise ConfigError(check.detail)


def create_engine(settings: Settings, **overrides: Any) -> Engine:
    """Build the engine named by ``settings.engine`` (not started: call ``start()``).

    ``overrides`` replace settings fields for this engine only (``engine=...`` picks another).

    Before anything is imported or loaded: :func:`check_model`, and whether the engine's
    libraries are installed (:class:`EngineError`, exit 5, naming the extra to install).
    """
    if overrides:
        settings = settings.model_copy(update=overrides)
    _check_installed(settings.engine)
    check_model(settings)
    cls = engine_class(settings.engine)
    from_settings = getattr(cls, "from_settings", None)
    if from_settings is None:
        raise EngineError(f"engine {settings.engine!r} has no from_settings(settings)")
    engine = from_settings(settings)
    if not isinstance(engine, Engine):
        raise EngineError(f"engine {settings.engine!r}: from_settings did not return an Engine")
    return engine
