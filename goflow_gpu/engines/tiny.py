"""A tiny random-weight Qwen2.5-VL built locally, for tests and the CPU demo (no network).

:func:`build_tiny_model` writes a model directory of a few MB that both ``transformers``
(``AutoProcessor`` + ``Qwen2_5_VLForConditionalGeneration``) and vLLM load like a real
checkpoint: a byte-level BPE tokenizer trained here on a small built-in corpus plus Qwen's
special tokens, a Qwen-style chat template of our own, a ``Qwen2_5_VLConfig`` whose token ids
point at those special tokens, random safetensors weights, and the processor files.

Shape constraints (found by trying, see the design notes): vLLM's CPU attention refuses a text
head_dim of 16 but takes 64, so the text model is hidden 128 with 2 heads; ``mrope_section``
must sum to head_dim / 2.

The processor's pixel budget (written to ``preprocessor_config.json``): ``min_pixels`` 56*56 and
``max_pixels`` 448*448, so an image of 448-1024 px becomes at most 16 x 16 = 256 visual tokens
(one token per 28 x 28 px after the 2 x 2 merge of 14 px patches). Engines may override both
per request (``mm_processor_kwargs`` / processor kwargs).

:func:`real_architecture_config` and :func:`build_random_model_dir` give the published shapes of
Qwen2.5-VL-3B/7B-Instruct without weights, for ``load_format="dummy"`` benchmarks.

Heavy imports (torch, transformers, tokenizers) happen inside the functions.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any, Literal

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 448 * 448
TINY_VOCAB_SIZE = 4096
# CLIP normalisation, as the Qwen2-VL image processor uses.
_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# A Qwen-style template: an optional system turn, then each turn as <|im_start|>role ... <|im_end|>,
# an image content part rendered as the vision placeholder the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') or 'image' in part %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the a an of and or to in on at with for from by is are was be this that it image photo "
    "picture scene person people man woman child dog cat car tree building sky water road "
    "street house room table chair window door light dark colour color red green blue yellow "
    "black white grey gray orange purple brown pink left right top bottom center middle "
    "front back background foreground small large big tiny bright sharp blurry quality "
    "label labels name names type category categories description describe caption text "
    "title summary objects object count confidence score value values box boxes bbox x y "
    "width height area position mood style tags tag keywords keyword language detected "
    "true false null yes no none unknown indoor outdoor day night face faces emotion happy "
    "sad neutral angry answer result results analysis greyscale contrast exposure noise "
    "brand logo sign shape circle square triangle rectangle line lines pattern texture "
    "Return only JSON matching the schema You are a careful vision assistant Answer the "
    "question about this image "
    "about above across after again against all almost also always among another any "
    "around as away because before behind below beside between both but can could did does "
    "down during each either enough even every few first found four give given good great "
    "group half has have her here his how however if into its just kind last least less "
    "like little long look made main make many may more most much must near never new next "
    "not now number often old one only other our out over own part perhaps place plain "
    "possible rather really same second seen several should show shown side since some "
    "something still such than their them then there these they thing things third those "
    "three through thus together too toward two under until up upon us use used very visible "
    "way we well were what when where whether which while who whole why will within without "
    "would you your animal animals bird birds flower flowers grass field mountain beach sea "
    "river snow cloud clouds sun food plate cup bottle phone computer screen book paper shirt "
    "hat glasses hand hands hair eyes smile standing sitting walking running holding wearing "
    "looking playing city town park garden kitchen office shop wall floor ceiling lamp bag "
    "box sports ball game team player vehicle bus truck bike bicycle train boat plane sign "
    "document chart graph diagram screenshot illustration drawing painting cartoon portrait "
    "landscape closeup aerial macro vintage modern natural artificial warm cool soft hard "
    "high low medium level levels rating ratings percent ratio rate error errors items item "
    "list array string integer boolean enum required properties schema minimum maximum"
).split()

_JSON_FRAGMENTS = (
    '{"label": "dog", "confidence": 0.92}',
    '{"objects": [{"name": "car", "count": 2}, {"name": "tree", "count": 5}]}',
    '{"caption": "A red car on a street.", "tags": ["car", "street", "red"]}',
    '{"bbox": [12, 34, 256, 448], "score": 0.5}',
    '{"is_outdoor": true, "has_text": false, "text": null}',
    '{"colors": ["red", "green", "blue"], "brightness": 0.75, "quality": "sharp"}',
    '{"mood": "happy", "faces": 3, "style": "photo"}',
    "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]",
    '{"width": 1024, "height": 768, "x": 0, "y": 0}',
)


def _corpus() -> list[str]:
    """A deterministic training corpus: common words, JSON shapes, numbers, punctuation."""
    lines: list[str] = []
    for i in range(0, len(_WORDS), 8):
        lines.append(" ".join(_WORDS[i : i + 8]) + ".")
    lines.extend(_JSON_FRAGMENTS * 20)
    lines.extend(" ".join(_WORDS) for _ in range(20))
    lines.extend(
        json.dumps({"value": n, "score": round(n / 997, 3), "name": _WORDS[n % len(_WORDS)]})
        for n in range(0, 1000, 7)
    )
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 1000 0.0 0.1 0.25 0.5 0.75 0.9 1.0 -1")
    lines.append("{ } [ ] : , \" ' . ! ? ; - _ ( ) / \\ \n \t # % & * + = < > @")
    return lines


def _train_tokenizer(
    vocab_size: int, corpus: list[str] | None = None, individual_digits: bool = False
) -> Any:
    """A byte-level BPE trained on ``corpus`` (default: the built-in one).

    ``individual_digits`` splits every digit into a token of its own before BPE, as Qwen's
    tokenizer does: a coordinate is then written digit by digit, which a model learns to place.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if individual_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is a token, so any text (JSON punctuation, digits, unicode) round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    return tokenizer


def tokenizer_vocab_size(directory: Path) -> int:
    """The number of tokens of the tokenizer saved in ``directory`` (the config's vocab_size)."""
    data = json.loads((Path(directory) / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data["added_tokens"]]
    return int(max(ids)) + 1


def _processor_config(min_pixels: int, max_pixels: int) -> dict[str, Any]:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": _IMAGE_MEAN,
        "image_std": _IMAGE_STD,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
    }


def _write_processor_files(
    directory: Path,
    *,
    vocab_size: int,
    corpus: list[str] | None = None,
    individual_digits: bool = False,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
) -> dict[str, int]:
    """Train and save the tokenizer, the processor configs and the chat template.

    Returns the ids of the special tokens by name.
    """
    transformers: Any = importlib.import_module("transformers")

    tokenizer = _train_tokenizer(vocab_size, corpus, individual_digits)
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",  # noqa: S106 - a token name, not a password
        pad_token="<|endoftext|>",  # noqa: S106
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        padding_side="left",
    )
    fast.save_pretrained(str(directory))
    processor = _processor_config(min_pixels, max_pixels)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    video = dict(processor, video_processor_type="Qwen2VLVideoProcessor")
    del video["image_processor_type"]
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    (directory / "chat_template.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n"
    )
    return ids


def _config_dict(
    text: dict[str, Any], vision: dict[str, Any], ids: dict[str, int]
) -> dict[str, Any]:
    """A Qwen2_5_VLConfig dict with the token ids of our tokenizer."""
    text = dict(text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    text["pad_token_id"] = ids["<|endoftext|>"]
    return {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": text.get("tie_word_embeddings", False),
    }


def _tiny_shapes(
    vocab_size: int, *, layers: int = 2, mlp: int = 256
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Text and vision configs: hidden 128 with 2 heads of 64 in both towers, ``layers``
    blocks in each, MLP width ``mlp``; full attention in every second vision block."""
    head_dim = 64
    mrope_section = [8, 12, 12]
    # mrope splits head_dim / 2 rotary frequencies into (temporal, height, width) sections.
    assert sum(mrope_section) == head_dim // 2
    text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 2 * head_dim,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": mrope_section,
        },
    }
    vision = {
        "depth": layers,
        "hidden_size": 128,
        "intermediate_size": mlp,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": 128,
        "fullatt_block_indexes": list(range(1, layers, 2)),
        "hidden_act": "silu",
    }
    return text, vision


def write_generation_config(directory: Path, ids: dict[str, int]) -> None:
    """Greedy decoding that stops at ``<|im_end|>`` (``save_pretrained`` drops both: call this
    after it)."""
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": False,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def build_tiny_model(directory: Path, *, seed: int = 0) -> Path:
    """Build a random-weight Qwen2.5-VL of a few MB in ``directory`` (created if needed).

    Works offline. The same ``seed`` gives the same weights. Returns ``directory``.
    """
    import torch

    transformers: Any = importlib.import_module("transformers")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = _write_processor_files(directory, vocab_size=TINY_VOCAB_SIZE)
    # The config's vocabulary is exactly the tokenizer's: random weights then never sample an id
    # that the tokenizer cannot decode.
    text, vision = _tiny_shapes(tokenizer_vocab_size(directory))
    config = transformers.Qwen2_5_VLConfig(**_config_dict(text, vision, ids))
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    write_generation_config(directory, ids)
    return directory


# Published Qwen2.5-VL-Instruct shapes (config.json of the Hugging Face repos), typed in from
# memory: vocab 151936, vision tower of 32 blocks, hidden 1280, 16 heads, MLP 3420, window 112,
# full attention in blocks 7/15/23/31, mrope_section [16, 24, 24] (head_dim 128). Values marked
# "unsure" below are the ones most worth checking against the real config.json.
_REAL_ARCHS: dict[str, dict[str, Any]] = {
    "3b": {
        "text": {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,  # unsure: the 3B ties embeddings (as Qwen2.5-3B does)
        },
        "vision_out_hidden_size": 2048,
    },
    "7b": {
        "text": {
            "vocab_size": 152064,  # unsure: the 7B repo says 152064, the 3B 151936
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
        "vision_out_hidden_size": 3584,
    },
}

#: token ids of the special tokens in Qwen's real tokenizer (vocab 151643 + added tokens)
REAL_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def real_architecture_config(name: Literal["3b", "7b"]) -> dict[str, Any]:
    """The ``config.json`` of Qwen2.5-VL-3B/7B-Instruct as a dict (shapes only, no weights).

    Typed in from the published configs; the values least certain are commented in the source
    (``_REAL_ARCHS``). The real token ids are used, so these configs describe the real
    checkpoints; :func:`build_random_model_dir` re-points them at our small tokenizer.
    """
    if name not in _REAL_ARCHS:
        raise ValueError(f"unknown architecture {name!r}: choose one of {sorted(_REAL_ARCHS)}")
    arch = copy.deepcopy(_REAL_ARCHS[name])
    text = dict(
        arch["text"],
        hidden_act="silu",
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [16, 24, 24],
        },
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=arch["text"]["num_hidden_layers"],
        attention_dropout=0.0,
        initializer_range=0.02,
    )
    vision = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": arch["vision_out_hidden_size"],
        "fullatt_block_indexes": [7, 15, 23, 31],
        "hidden_act": "silu",
    }
    config = _config_dict(text, vision, REAL_TOKEN_IDS)
    config["dtype"] = "bfloat16"
    return config


def build_random_model_dir(directory: Path, arch: Literal["3b", "7b"] = "7b") -> Path:
    """Write a weightless model dir of the real 3B/7B architecture for ``load_format="dummy"``.

    The config has the real shapes (:func:`real_architecture_config`); the tokenizer and
    processor files are our small ones, so the token ids are re-pointed at our special tokens
    (the embedding keeps the real vocabulary size, so its cost is real). No weights are written:
    engines build the model from the config with random weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = _write_processor_files(directory, vocab_size=TINY_VOCAB_SIZE)
    real = real_architecture_config(arch)
    config = _config_dict(real["text_config"], real["vision_config"], ids)
    config["dtype"] = real["dtype"]
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_generation_config(directory, ids)
    return directory


def directory_size(directory: Path) -> int:
    """Total bytes of the files in ``directory`` (recursively)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
