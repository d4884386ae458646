"""Every shipped config file loads through the settings model."""

from __future__ import annotations

from pathlib import Path

import pytest

from goflow_gpu.settings import load_settings

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_the_promised_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {
        "default.yaml",
        "h100-7b.yaml",
        "h200-7b.yaml",
        "multi-gpu-tp2.yaml",
        "openai-fleet.yaml",
        "cpu-dev.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GOFLOW_"):
            monkeypatch.delenv(name)
    settings = load_settings(path)
    assert settings.engine in ("vllm", "transformers", "openai")
    assert settings.api_key is None  # never in a file
    if settings.engine == "openai":
        assert settings.openai_base_url
