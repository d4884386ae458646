"""The training script of the tiny scene model: its data, its loss, and what it writes.

The real run takes about an hour; here two steps on a batch of two check the folder it writes
(loadable, the pixel budget and decoding settings it was trained with, its record), and the
pieces that decide what it learns are checked on their own.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from goflow_gpu.engines.scene_answers import LEARNED_ANALYSES, compact, scene_answers
from goflow_gpu.engines.train import (
    Batcher,
    Sample,
    TrainConfig,
    answer_loss,
    attention_targets,
    batches_for,
    build_untrained,
    heldout_keys,
    layout_head,
    layout_targets,
    lr_at,
    plan_samples,
    stale_specs,
    train,
    trained_specs,
    training_losses,
)
from goflow_gpu.prompts.catalog import load_catalog
from goflow_gpu.settings import load_settings
from goflow_gpu.simulator.images import LabelledScene, SceneShape, labelled_scene


def test_batches_are_deterministic_one_analysis_each_and_never_held_out() -> None:
    cfg = TrainConfig(steps=40, batch=4)
    first, again = list(plan_samples(cfg)), list(plan_samples(cfg))
    assert first == again
    keys = [s.key for batch in first for s in batch]
    assert len(keys) == len(set(keys)) == 160
    assert not set(keys) & set(heldout_keys(1000))
    assert all(len({(s.slug, s.short) for s in batch}) == 1 for batch in first)
    assert {batch[0].short for batch in first} == {True, False}
    assert {batch[0].slug for batch in first} == set(LEARNED_ANALYSES)
    other = list(plan_samples(TrainConfig(steps=40, batch=4, seed=1)))
    assert [s.key for s in other[0]] != [s.key for s in first[0]]


@pytest.mark.parametrize(("device", "ahead"), [("cpu", False), ("cuda", True)])
def test_batches_are_built_ahead_in_a_thread_only_for_a_gpu(device: str, ahead: bool) -> None:
    import threading

    built_in: list[str] = []

    def make(samples: list[Sample]) -> dict[str, str]:
        built_in.append(threading.current_thread().name)
        return {"key": samples[0].key}

    plan = iter([[Sample("a", "people-count")], [Sample("b", "people-count")]])
    assert [b["key"] for b in batches_for(make, plan, device)] == ["a", "b"]
    here = threading.current_thread().name
    assert (built_in != [here, here]) is ahead


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    cfg = TrainConfig(steps=1100, lr=2e-3, warmup=100, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(2e-5)
    assert lr_at(99, cfg) == pytest.approx(2e-3)
    assert lr_at(100, cfg) == pytest.approx(2e-3)
    assert lr_at(600, cfg) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))  # half way: cos = 0
    assert lr_at(1100, cfg) == pytest.approx(2e-4)


def _hand_built_scene() -> LabelledScene:
    from PIL import Image

    return LabelledScene(
        image=Image.new("RGB", (112, 56), "white"),
        background="white",
        shapes=(
            SceneShape("circle", "red", (0, 0, 28, 28)),  # fills cell (0, 0)
            SceneShape("square", "blue", (30, 0, 20, 20)),  # 400 of cell (0, 1)'s 784 px
            SceneShape("triangle", "green", (84, 0, 10, 10)),  # 100 px: under a fifth
        ),
        word="OPEN",
        word_colour="black",
        word_box=(60, 30, 40, 20),  # 480 px of cell (1, 2), 320 of cell (1, 3)
        colour_shares=(("white", 1.0),),
    )


@pytest.mark.engine
def test_layout_targets_name_each_image_token_s_place_content_and_shape_box() -> None:
    """A 112 x 56 picture is seen as it is (4 x 2 merged tokens of 28 px), row by row."""
    import torch

    grid = torch.tensor([[1, 4, 8]])  # t, h, w in 14 px patches
    got = layout_targets([_hand_built_scene()], grid, TrainConfig())
    assert got["layout_rows"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert got["layout_cols"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    red_circle, blue_square, word = 1, 1 + 1 * 6 + 4, 19
    assert got["layout_what"].tolist() == [red_circle, blue_square, 0, 0, 0, 0, word, word]
    assert got["layout_has_box"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    boxes = got["layout_boxes"]
    assert boxes[0].tolist() == pytest.approx([0, 0, 28 / 112, 28 / 56])
    assert boxes[1].tolist() == pytest.approx([30 / 112, 0, 50 / 112, 20 / 56])


@pytest.mark.engine
def test_attention_targets_point_each_object_s_tokens_at_its_cells(tmp_path: Path) -> None:
    """Hand-worked: shapes in reading order (all at the top: left to right) are a circle in
    cell 0, a square in cell 1 and a triangle in cell 3; the word covers cells 6 and 7. The
    description ("A red circle, ... and the word OPEN") looks at the same cells again."""
    import transformers

    cfg = TrainConfig(batch=1)
    build_untrained(tmp_path / "m", load_catalog(None), cfg)
    processor = transformers.AutoProcessor.from_pretrained(str(tmp_path / "m"))  # type: ignore[no-untyped-call]
    batcher = Batcher(processor, load_catalog(None), cfg)
    scene = _hand_built_scene()
    expected_cells: dict[str, dict[str, tuple[int, ...]]] = {
        "object-detection": {  # the objects, then the description's colours and word
            "circle": (0,),
            "square": (1,),
            "triangle": (3,),
            "red": (0,),
            "blue": (1,),
            "green": (3,),
            "OPEN": (6, 7),
        },
        "text-recognition": {"OPEN": (6, 7)},
    }
    for slug, cells in expected_cells.items():
        answer = compact(scene_answers(scene, cfg.min_pixels, cfg.max_pixels)[slug])
        text = batcher.short_prompts[slug] + answer + "<|im_end|>"
        inputs = dict(processor(text=[text], images=[scene.image], return_tensors="pt"))
        assert inputs["image_grid_thw"].tolist() == [[1, 4, 8]]
        values = scene_answers(scene, cfg.min_pixels, cfg.max_pixels)[slug]
        tokens = processor.tokenizer(answer + "<|im_end|>", return_offsets_mapping=True)
        got = attention_targets(
            batcher.image_token,
            [Sample("k", slug)],
            [scene],
            [values],
            [tokens["offset_mapping"]],
            inputs,
        )
        ids = inputs["input_ids"][0].tolist()
        image = [i for i, t in enumerate(ids) if processor.tokenizer.decode([t]) == "<|image_pad|>"]
        assert len(image) == 8
        seen: dict[str, bool] = {}
        for query in got["attend_rows"][0].nonzero().flatten().tolist():
            word = processor.tokenizer.decode([ids[query + 1]]).strip()
            keys = got["attend_mask"][0, query].nonzero().flatten().tolist()
            for name, where in cells.items():
                if word in name and len(word) > 1:  # a piece of the name: its cells, no others
                    assert keys == [image[c] for c in where], (word, keys)
                    seen[name] = True
        assert set(seen) == set(cells)
        # the JSON around the boxed things (the key names, "A", "background") is not taught
        assert int(got["attend_rows"].sum()) < len(processor.tokenizer(answer)["input_ids"])


@pytest.mark.engine
def test_the_shared_prefix_loss_equals_the_loss_of_whole_sequences(tmp_path: Path) -> None:
    """The system turn is encoded once per batch and shared: the loss must be exactly that of
    the whole sequences, each encoded on its own (position ids and padding included)."""
    import torch
    import transformers

    cfg = TrainConfig(batch=3, layout_weight=0.5)
    catalog = load_catalog(None)
    model, _ids = build_untrained(tmp_path / "m", catalog, cfg)
    head = layout_head(model.config.text_config.hidden_size)
    processor = transformers.AutoProcessor.from_pretrained(str(tmp_path / "m"))  # type: ignore[no-untyped-call]
    batcher = Batcher(processor, catalog, cfg)
    keys = ["loss-0", "loss-1", "loss-2"]
    for slug, short in (
        ("object-detection", False),
        ("people-count", False),
        ("text-recognition", True),
    ):
        samples = [Sample(key, slug, short) for key in keys]
        prompts = batcher.short_prompts if short else batcher.prompts
        batch = batcher(samples)
        with torch.no_grad():
            shared = answer_loss(model, batch)
            # the layout head and the attention loss leave the answers' loss alone
            model.set_attn_implementation("eager")
            answers, parts, attention = training_losses(model, batch, head, cfg)
            model.set_attn_implementation("sdpa")
        assert float(answers) == pytest.approx(float(shared), rel=1e-5)
        tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
        assert tokens == len(batch["layout_rows"]) > 0
        assert parts.shape == (4,) and bool(torch.isfinite(parts).all())
        assert attention.shape == (2,) and bool(torch.isfinite(attention).all())
        # people-count writes about no boxed thing: nothing to look at is taught
        assert (float(batch["attend_rows"].sum()) > 0) == (slug != "people-count")
        texts, images, lengths = [], [], []
        for key in keys:
            scene = labelled_scene(key)
            answer = compact(scene_answers(scene, cfg.min_pixels, cfg.max_pixels)[slug])
            texts.append(prompts[slug] + answer + "<|im_end|>")
            images.append(scene.image)
            lengths.append(len(processor.tokenizer(answer + "<|im_end|>")["input_ids"]))
        whole = processor(text=texts, images=images, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**whole).logits
        losses = []
        for row, length in enumerate(lengths):
            ids = whole["input_ids"][row]
            losses.append(
                torch.nn.functional.cross_entropy(
                    logits[row, -length - 1 : -1], ids[-length:], reduction="sum"
                )
            )
        expected = float(sum(losses)) / sum(lengths)
        assert float(shared) == pytest.approx(expected, rel=1e-4)
        assert math.isfinite(expected)


@pytest.mark.engine
def test_two_steps_write_a_model_folder_with_its_record(tmp_path: Path) -> None:
    out = tmp_path / "model"
    cfg = TrainConfig(steps=2, batch=2, warmup=1, eval_every=100, eval_scenes=1)
    lines: list[str] = []
    final = train(out, cfg, command="goflow-gpu dev train-tiny model", echo=lines.append)
    assert list(final) == list(LEARNED_ANALYSES)
    assert any(line.startswith("step 1/2 loss ") for line in lines)
    assert any("held-out object-detection: " in line for line in lines)

    record = json.loads((out / "training.json").read_text())
    assert record["command"] == "goflow-gpu dev train-tiny model"
    assert record["pixel_budget"] == {"min_pixels": 56 * 56, "max_pixels": 168 * 168}
    assert record["analyses"] == list(LEARNED_ANALYSES)
    assert record["config"]["steps"] == 2
    assert set(record["heldout"]) == set(LEARNED_ANALYSES)

    processor_config = json.loads((out / "preprocessor_config.json").read_text())
    assert (processor_config["min_pixels"], processor_config["max_pixels"]) == (3136, 28224)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    im_end = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<|im_end|>")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["do_sample"] is False
    assert im_end in generation["eos_token_id"]
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4
    assert config["vision_config"]["depth"] == 4
    assert config["text_config"]["intermediate_size"] == 512
    # stored as bf16 (half the bytes), computed in fp32: the config still says float32
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert {str(t.dtype) for t in stored.values()} == {"torch.bfloat16"}
    assert config["dtype"] == "float32"

    # digits are single tokens, as in Qwen's tokenizer: coordinates are written digit by digit
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.tokenize("[120,7]") == ["[", "1", "2", "0", ",", "7", "]"]

    settings = load_settings(None, model=str(out))
    assert (settings.min_pixels, settings.max_pixels) == (3136, 28224)

    # the same seed and settings give the same weights: a rebuild is a rebuild
    train(tmp_path / "again", cfg, echo=lines.append)
    weights = (out / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == weights
    train(tmp_path / "other", dataclasses.replace(cfg, seed=1), echo=lines.append)
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != weights

    # continuing a folder starts after the 2 x 2 scenes it saw and keeps its record
    more = tmp_path / "more"
    train(more, dataclasses.replace(cfg, steps=1), echo=lines.append, continue_from=out)
    record = json.loads((more / "training.json").read_text())
    assert record["config"]["data_offset"] == 4
    assert record["continued_from"]["command"] == "goflow-gpu dev train-tiny model"
    assert (more / "model.safetensors").read_bytes() != weights


def test_a_changed_learned_spec_is_reported_as_stale(tmp_path: Path) -> None:
    import shutil

    shipped = load_catalog(None)
    record = {"specs": trained_specs(shipped, list(LEARNED_ANALYSES))}
    assert record["specs"]["object-detection"]["version"] == 3
    assert stale_specs(record, shipped) == []
    edited = tmp_path / "prompts"
    shutil.copytree(shipped.source, edited)
    spec = edited / "object-detection.yaml"
    text = spec.read_text().replace("version: 3", "version: 4")
    spec.write_text(text.replace("most prominent first", "largest first"))
    (edited / "people-count.yaml").unlink()
    assert stale_specs(record, load_catalog(edited)) == [
        "object-detection v3 -> v4",
        "people-count is no longer in the catalog",
    ]


@pytest.mark.parametrize("item", ["object-detection=lots", "faces=1", "people-count=0"])
def test_a_bad_mix_is_refused_by_name(item: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from goflow_gpu.cli import app

    out = CliRunner().invoke(app, ["dev", "train-tiny", str(tmp_path / "m"), "--mix", item])
    assert out.exit_code == 2
    assert f"--mix {item!r}" in out.output
    assert not (tmp_path / "m").exists()  # refused before anything was written


@pytest.mark.parametrize("value", ["0-2", "3-2", "1-4", "two", "1-"])
def test_a_bad_shape_count_is_refused_by_name(value: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from goflow_gpu.cli import app

    out = CliRunner().invoke(app, ["dev", "train-tiny", str(tmp_path / "m"), "--shapes", value])
    assert out.exit_code == 2
    assert f"--shapes {value!r}" in out.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("args", "wanted"),
    [([], (1, 3)), (["--shapes", "1-1"], (1, 1)), (["--shapes", "2"], (2, 2))],
)
def test_the_shape_count_reaches_the_training_config(
    args: list[str], wanted: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import goflow_gpu.engines.train as train_module
    from goflow_gpu.cli import app

    seen: list[TrainConfig] = []

    def record(directory: Path, cfg: TrainConfig, **_: object) -> dict[str, object]:
        seen.append(cfg)
        return {}

    monkeypatch.setattr(train_module, "train", record)
    out = CliRunner().invoke(app, ["dev", "train-tiny", str(tmp_path / "m"), *args])
    assert out.exit_code == 0, out.output
    assert [cfg.shapes for cfg in seen] == [wanted]
