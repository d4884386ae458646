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


#: What each shipped vLLM config must hand to vLLM's AsyncEngineArgs (written out by hand).
EXPECTED_VLLM_ARGS: dict[str, dict[str, object]] = {
    "cpu-dev.yaml": {"max_num_seqs": 16, "max_num_batched_tokens": 4096, "max_model_len": 4096},
    "default.yaml": {"max_num_seqs": 64, "max_num_batched_tokens": 16384, "dtype": "bfloat16"},
    "h100-7b.yaml": {"max_num_seqs": 128, "max_num_batched_tokens": 16384, "dtype": "bfloat16"},
    "h200-7b.yaml": {"max_num_seqs": 256, "max_num_batched_tokens": 16384, "dtype": "bfloat16"},
    "multi-gpu-tp2.yaml": {
        "max_num_seqs": 128,
        "max_num_batched_tokens": 16384,
        "tensor_parallel_size": 2,
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_VLLM_ARGS))
def test_engine_arguments_built_from_each_vllm_config(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from goflow_gpu.engines.vllm_engine import VllmEngine

    for variable in list(os.environ):
        if variable.startswith("GOFLOW_"):
            monkeypatch.delenv(variable)
    settings = load_settings(Path(__file__).parents[1] / "configs" / name)
    engine = VllmEngine.from_settings(settings)
    kwargs = engine.engine_kwargs()
    for key, value in EXPECTED_VLLM_ARGS[name].items():
        assert kwargs[key] == value, key
    assert kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert kwargs["enable_prefix_caching"] is True
    assert kwargs["mm_processor_kwargs"] == {
        "min_pixels": settings.min_pixels,
        "max_pixels": settings.max_pixels,
    }
    # A queue above the scheduler's batch: in-flight depth about 1.5x max_num_seqs.
    assert settings.max_in_flight == kwargs["max_num_seqs"] * 3 // 2
    # Every key is one vLLM's engine arguments know (a typo would fail only on a GPU node).
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = set(AsyncEngineArgs.__dataclass_fields__)
    assert set(kwargs) <= fields, set(kwargs) - fields


def test_requests_of_one_image_go_to_one_data_parallel_rank() -> None:
    from goflow_gpu.engines.base import InferenceRequest
    from goflow_gpu.engines.vllm_engine import VllmEngine

    def request(media: str, analysis: int) -> InferenceRequest:
        return InferenceRequest(
            request_id=f"{media}:{analysis}:1",
            image_path=Path("x.jpg"),
            system_prompt="s",
            user_prompt=f"analysis {analysis}",
            group_key=(media, "optimised"),
        )

    single = VllmEngine(model="m")
    assert single.data_parallel_rank(request("a", 1)) is None
    engine = VllmEngine(model="m", data_parallel_size=4)
    media = [f"media-{n}" for n in range(40)]
    for item in media:
        ranks = {engine.data_parallel_rank(request(item, a)) for a in range(25)}
        assert len(ranks) == 1  # every analysis of one image on one rank
    spread = {engine.data_parallel_rank(request(item, 0)) for item in media}
    assert spread == {0, 1, 2, 3}  # and images spread over all ranks


def test_vllm_sampling_is_explicit_not_left_to_generation_config() -> None:
    from goflow_gpu.engines.base import InferenceRequest, Sampling
    from goflow_gpu.engines.vllm_engine import VllmEngine

    engine = VllmEngine(model="m", seed=3)
    params = engine.sampling_params(
        InferenceRequest(
            request_id="r",
            image_path=Path("x.jpg"),
            system_prompt="s",
            user_prompt="u",
            json_schema={"type": "object"},
            sampling=Sampling(max_tokens=64, temperature=0.0),
        )
    )
    assert (params.max_tokens, params.temperature, params.seed) == (64, 0.0, 3)
    # Qwen2.5-VL's generation_config says 1.05; JSON wants no penalty on repeated tokens.
    assert params.repetition_penalty == 1.0
    assert params.top_p == 1.0
