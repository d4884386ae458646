"""The tiny random Qwen2.5-VL builder, the real-architecture configs and the resize rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from goflow_gpu.engines.images import visual_tokens
from goflow_gpu.engines.tiny import (
    SPECIAL_TOKENS,
    build_random_model_dir,
    real_architecture_config,
)
from goflow_gpu.errors import MediaError
from goflow_gpu.prompts.geometry import smart_resize

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # Any attempt to reach the network goes to a closed local port and fails.
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        NO_PROXY="",
    )
    return env


def _vocab(model_dir: Path) -> dict[str, int]:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in data["added_tokens"]})
    return vocab


def test_cli_builds_offline_and_same_seed_gives_same_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "again"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from goflow_gpu.engines.cli import dev_app; dev_app()",
            "tiny-model",
            str(target),
        ],
        env=_offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MB" in proc.stdout
    assert str(target) in proc.stdout
    assert {p.name for p in target.iterdir()} >= EXPECTED_FILES
    # The fixture built with seed 0 too: the weights are reproducible byte for byte.
    assert (target / "model.safetensors").read_bytes() == (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()


def test_model_dir_is_a_few_megabytes(tiny_model_dir: Path) -> None:
    assert {p.name for p in tiny_model_dir.iterdir()} >= EXPECTED_FILES
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert 1_000_000 < size < 15_000_000


def test_config_token_ids_point_at_the_special_tokens(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    vocab = _vocab(tiny_model_dir)
    assert set(SPECIAL_TOKENS) <= set(vocab)
    assert config["image_token_id"] == vocab["<|image_pad|>"]
    assert config["video_token_id"] == vocab["<|video_pad|>"]
    assert config["vision_start_token_id"] == vocab["<|vision_start|>"]
    assert config["vision_end_token_id"] == vocab["<|vision_end|>"]
    text = config["text_config"]
    # Every id the model can emit decodes: the embedding is exactly the tokenizer's size.
    assert text["vocab_size"] == max(vocab.values()) + 1
    # vLLM's CPU attention needs head_dim 64; mrope splits head_dim / 2.
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim == 64
    assert sum(text["rope_parameters"]["mrope_section"]) == 32
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert vocab["<|im_end|>"] in generation["eos_token_id"]


def test_processor_files_are_json_with_the_pixel_budget(tiny_model_dir: Path) -> None:
    processor = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}
    assert processor["patch_size"] == 14
    assert processor["merge_size"] == 2
    template = json.loads((tiny_model_dir / "chat_template.json").read_text())["chat_template"]
    assert "<|image_pad|>" in template


@pytest.mark.engine
def test_loads_in_transformers_and_renders_a_qwen_prompt(tiny_model_dir: Path) -> None:
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(tiny_model_dir)  # type: ignore[no-untyped-call]
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert model.config.image_token_id == _vocab(tiny_model_dir)["<|image_pad|>"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.engine
def test_tokenizer_has_json_punctuation_digits_and_words(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = tokenizer.get_vocab()
    for token in ["{", "}", "[", "]", ":", ",", '"', *"0123456789", "label", "confidence"]:
        assert token in vocab, token
    text = '{"label": "dog", "confidence": 0.92, "tags": ["a", "b"]}'
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    # Common words are single tokens, so JSON keys are short to generate.
    assert len(ids) < len(text) / 2


def test_real_architecture_configs_have_the_published_shapes() -> None:
    seven = real_architecture_config("7b")
    three = real_architecture_config("3b")
    assert seven["text_config"]["hidden_size"] == 3584
    assert seven["text_config"]["num_hidden_layers"] == 28
    assert seven["text_config"]["num_attention_heads"] == 28
    assert seven["text_config"]["num_key_value_heads"] == 4
    assert three["text_config"]["hidden_size"] == 2048
    assert three["text_config"]["num_hidden_layers"] == 36
    assert three["text_config"]["vocab_size"] == 151936
    for config in (seven, three):
        text = config["text_config"]
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        assert head_dim == 128
        assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
        assert config["vision_config"]["out_hidden_size"] == text["hidden_size"]
        assert config["image_token_id"] == 151655
    with pytest.raises(ValueError, match="unknown architecture"):
        real_architecture_config("72b")  # type: ignore[arg-type]


@pytest.mark.engine
def test_random_model_dir_has_config_and_tokenizer_but_no_weights(tmp_path: Path) -> None:
    from transformers import AutoConfig

    directory = build_random_model_dir(tmp_path / "arch", arch="3b")
    names = {p.name for p in directory.iterdir()}
    assert "model.safetensors" not in names
    config = AutoConfig.from_pretrained(directory)
    assert config.text_config.hidden_size == 2048
    assert config.image_token_id == _vocab(directory)["<|image_pad|>"]


@pytest.mark.parametrize(
    ("size", "budget", "expected"),
    [
        # 640x480 over 448*448: scale sqrt(307200/200704)=1.2372; 640/1.2372/28=18.47 -> 18*28,
        # 480/1.2372/28=13.86 -> 13*28.
        ((640, 480), (3136, 200704), (504, 364)),
        # Within budget: round each side to a multiple of 28 (300/28=10.7 -> 11, 500/28=17.9 -> 18)
        ((300, 500), (3136, 200704), (308, 504)),
        # Below min: 20x20 -> scale sqrt(3136/400)=2.8 -> 56x56
        ((20, 20), (3136, 200704), (56, 56)),
        # 1024x768 at the 7B default max 1280*28*28 fits: 1024/28=36.6 -> 37, 768/28=27.4 -> 27
        ((1024, 768), (3136, 1003520), (1036, 756)),
        # ... but not in 448*448: scale sqrt(786432/200704)=1.9795; 1024/1.9795/28=18.5 -> 18,
        # 768/1.9795/28=13.9 -> 13
        ((1024, 768), (3136, 200704), (504, 364)),
    ],
)
def test_smart_resize(
    size: tuple[int, int], budget: tuple[int, int], expected: tuple[int, int]
) -> None:
    width, height = size
    got_h, got_w = smart_resize(height, width, min_pixels=budget[0], max_pixels=budget[1])
    assert (got_w, got_h) == expected


def test_smart_resize_refuses_extreme_aspect_and_counts_tokens() -> None:
    with pytest.raises(MediaError, match="aspect ratio"):
        smart_resize(20, 10_000, min_pixels=3136, max_pixels=200704)
    assert visual_tokens(504, 364) == 18 * 13


@pytest.mark.engine
@pytest.mark.parametrize(("arch", "published"), [("3b", 3.75e9), ("7b", 8.29e9)])
def test_real_architecture_has_the_published_parameter_count(arch: str, published: float) -> None:
    import torch
    import transformers

    config = transformers.Qwen2_5_VLConfig(**real_architecture_config(arch))  # type: ignore[arg-type]
    # On the meta device no memory is allocated: only the shapes are built.
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config)  # type: ignore[no-untyped-call]
    count = sum(p.numel() for p in model.parameters())
    # The model cards say 3.75B and 8.29B parameters.
    assert abs(count - published) / published < 0.005
