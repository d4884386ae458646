"""Train the tiny Qwen2.5-VL on the simulator's labelled scenes (``goflow-gpu dev train-tiny``).

The product's answers on this machine otherwise come from random weights. This trains the tiny
architecture (:mod:`goflow_gpu.engines.tiny`, 4 blocks per tower, MLP 512) from scratch, on CPU,
to answer three of the catalog's own analysis types (``LEARNED_ANALYSES`` of
:mod:`goflow_gpu.engines.scene_answers`) with their real prompts and schemas, so that the
whole pipeline (pixels -> model-space boxes -> QA -> original pixels -> wire) runs on answers
that can be graded.

What it does, in order:

1. trains a byte-level BPE on the catalog's texts (system prompt, every user prompt) and sample
   answers, digits split one per token as Qwen's tokenizer does (coordinates are written digit
   by digit); the catalog's words become single tokens, which roughly halves the prompt;
2. writes the processor files at the training pixel budget (``preprocessor_config.json``'s
   ``min_pixels``/``max_pixels``: serve the model at that budget, or its boxes land elsewhere);
3. trains on scenes drawn on the fly (keys ``train-<seed>-<n>``; held-out keys ``heldout-<n>``
   are never drawn for training), each sample one (scene, analysis) rendered exactly as the
   engines render a request (shared system prompt, image first, the spec's user prompt), the
   loss on the answer tokens only (:func:`~goflow_gpu.engines.scene_answers.scene_answers`);
4. every ``eval_every`` steps, greedy answers to held-out scenes go through the worker's own QA
   (:func:`goflow_gpu.prompts.qa.check_output`) and are graded like the demo grades them
   (:mod:`goflow_gpu.evaluation.scenes`);
5. saves the weights (stored as ``dtype``, bf16 by default: :func:`store_weights`), a
   ``generation_config.json`` that stops at ``<|im_end|>`` and decodes greedily, and
   ``training.json`` (the command, the settings, the held-out grades).

Short prompts too: half the batches (``short_share``) ask the same answers with no system turn
and the slug as the whole request. A first run on whole prompts only (1500 steps planned)
learned the answer formats and told the analyses apart, but after 760 steps still answered the
same boxes, word and colours for every picture: with ~450 tokens of text around 30 image
tokens the text prior wins for a long time. Short sequences (~130 tokens) cost less than half
and make the image the only thing that decides the answer, so the vision path learns sooner;
the whole-prompt half keeps the model answering the catalog's real requests.

The layout loss (``layout_weight``, :func:`layout_targets`): answers alone taught the model
formats, task identity and the background colour, and nothing local: after 1150 steps every
picture got the same four triangles at the same corners. Linear probes on its image tokens
showed why: the vision tower's output no longer told a token's shape or colour apart (17% of
covered tokens, chance ~8%), and no layer knew its column. Nothing in Qwen2.5-VL gives an image
token its absolute place (rotary positions are relative, backgrounds are flat), so a training-only
head asks every image token, at block ``layout_layer``, for its row, column, what covers it and
that shape's box. After 250 steps with it the same probes read rows at 91%, columns at 60% and
boxes within 7% of the image's sides, and the answers started naming the shapes' colours. The
head is dropped at the end: the saved model is a plain Qwen2.5-VL.

The attention loss (``attention_weight``, :func:`attention_targets`): with the layout learned,
the answers still did not read it (the kind of a lone shape at chance after 400 more steps;
the last block gave the picture 1-3% of its attention). One head in each of
``attention_layers`` is taught to look at the image tokens of the thing the answer is writing
about; within 200 steps the kind's loss halved. Training then runs eager attention (the only
kind that returns weights); serving is unchanged.

Why whole prompts: the worker sends the catalog's long prompts (about 210 tokens of system prompt
and 160-190 of instructions with the catalog-trained tokenizer, 350 and 210-280 with the tiny
builder's); a model trained only on a short private prompt would meet a different input at
serve time. The cost is sequence length, hence the tokenizer trained
on the catalog and ``logits_to_keep`` (the output head runs on the answer positions only).

Deterministic: a fixed seed orders the data and initialises the weights; two runs on the same
machine and library versions give the same model (threads are fixed at 2).

From scratch to the shipped level is a curriculum of runs, each ``--continue-from`` the one
before (one shape per scene, then two, then the simulator's three): a run with both training
losses on full scenes from the start had not learned the kind of shape after 1100 steps
(PROMPTS.md, finding 4). ``scripts/rebuild-scene-model.sh`` is that chain, stage by stage,
resumable at a stage boundary.
"""

from __future__ import annotations

import json
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from goflow_gpu.engines.chat import chat_messages
from goflow_gpu.engines.scene_answers import (
    LEARNED_ANALYSES,
    compact,
    described_things,
    model_size,
    reading_order,
    scene_answers,
)
from goflow_gpu.engines.scene_model import TRAINING_FILE
from goflow_gpu.evaluation.scenes import GradeSummary, grade, summarise
from goflow_gpu.prompts.catalog import Catalog, load_catalog
from goflow_gpu.prompts.qa import check_output
from goflow_gpu.prompts.result import result_schema
from goflow_gpu.simulator.images import SCENE_MAX_SHAPES, Box, labelled_scene

EVAL_MAX_TOKENS = 256


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained model (written to ``training.json``)."""

    steps: int = 1150
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    layers: int = 4
    mlp: int = 512
    vocab_size: int = 4096
    min_pixels: int = 56 * 56
    max_pixels: int = 168 * 168
    mix: dict[str, float] = field(
        default_factory=lambda: {
            "object-detection": 0.65,
            "text-recognition": 0.3,
            "people-count": 0.05,
        }
    )
    eval_every: int = 400
    eval_scenes: int = 24
    threads: int = 2
    dtype: str = "bfloat16"
    """How the saved weights are stored (:func:`store_weights`); training is always fp32."""
    device: str = "cpu"
    """Where to train: ``cpu`` (the recipe's figures), or ``cuda`` on a GPU node, where the
    same steps take minutes (transformers and torch only: no vLLM needed there)."""
    data_offset: int = 0
    """Index of the first training scene (a continued run sets it past the scenes seen)."""
    short_share: float = 0.5
    """Share of batches asked with the short prompt (see the module docstring)."""
    shapes: tuple[int, int] = (1, SCENE_MAX_SHAPES)
    """Fewest and most shapes a training (and held-out) scene has; by default the simulator's."""
    layout_weight: float = 0.2
    """Weight of the layout loss (:func:`layout_targets`); 0 trains on the answers alone."""
    layout_layer: int = 2
    """Which block's output at the image tokens the layout head reads."""
    attention_weight: float = 0.5
    """Weight of the attention loss (:func:`attention_targets`); 0 leaves attention free."""
    attention_layers: tuple[int, ...] = (2, 3)
    """Blocks whose first head is taught to look at the object being written."""


@dataclass(frozen=True)
class Sample:
    key: str
    slug: str
    short: bool = False
    """Asked with the short prompt (no system turn, the slug as the whole request)."""


def plan_samples(cfg: TrainConfig) -> Iterator[list[Sample]]:
    """The training batches, the same for the same seed: each batch asks one analysis (drawn
    by ``mix``) about ``batch`` new scenes, so answers of one length pad little."""
    rng = random.Random(f"train-tiny:{cfg.seed}")
    slugs = list(cfg.mix)
    weights = [cfg.mix[s] for s in slugs]
    n = cfg.data_offset
    for _ in range(cfg.steps):
        slug = rng.choices(slugs, weights)[0]
        short = rng.random() < cfg.short_share
        yield [Sample(f"train-{cfg.seed}-{n + i}", slug, short) for i in range(cfg.batch)]
        n += cfg.batch


def heldout_keys(count: int) -> list[str]:
    """Scene keys never drawn for training."""
    return [f"heldout-{n}" for n in range(count)]


def tokenizer_corpus(catalog: Catalog, cfg: TrainConfig) -> list[str]:
    """Texts the BPE is trained on: the tiny builder's corpus, the catalog, sample answers."""
    from goflow_gpu.engines.tiny import _corpus

    lines = _corpus()
    texts = [catalog.system_prompt] + [spec.user_prompt for spec in catalog.specs.values()]
    lines.extend(texts * 20)
    for n in range(300):
        scene = labelled_scene(f"corpus-{n}")
        for answer in scene_answers(scene, cfg.min_pixels, cfg.max_pixels).values():
            lines.append(compact(answer))
    return lines


def build_untrained(directory: Path, catalog: Catalog, cfg: TrainConfig) -> Any:
    """Write the tokenizer and processor files to ``directory``; return the random model."""
    import torch

    from goflow_gpu.engines import tiny

    transformers: Any = __import__("transformers")
    directory.mkdir(parents=True, exist_ok=True)
    ids = tiny._write_processor_files(
        directory,
        vocab_size=cfg.vocab_size,
        corpus=tokenizer_corpus(catalog, cfg),
        individual_digits=True,
        min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels,
    )
    text, vision = tiny._tiny_shapes(
        tiny.tokenizer_vocab_size(directory), layers=cfg.layers, mlp=cfg.mlp
    )
    config = transformers.Qwen2_5_VLConfig(**tiny._config_dict(text, vision, ids))
    torch.manual_seed(cfg.seed)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.float32), ids


class Batcher:
    """Tokenised batches of one analysis each, split at the shared prefix.

    Every request starts with the same tokens (the system turn and ``<|vision_start|>``): they
    are encoded once per step and their keys and values shared by the whole batch
    (:func:`answer_loss`), which saves about a third of the work. The rest (image, the spec's
    prompt, the answer) is left-padded, so every answer ends at the last position and the output
    head only runs on the last ``keep`` positions.
    """

    def __init__(self, processor: Any, catalog: Catalog, cfg: TrainConfig) -> None:
        import torch

        self.processor = processor
        self.cfg = cfg
        self.prompts: dict[str, str] = {}
        self.short_prompts: dict[str, str] = {}
        for slug in cfg.mix:
            rendered = catalog.render(catalog.specs[slug])
            self.prompts[slug] = self._render(rendered.system_prompt, rendered.user_prompt)
            self.short_prompts[slug] = self._render("", slug)
        self.prefix = _head(
            self.prompts.values(), "the learned analyses must share one system prompt"
        )
        self.short_prefix = _head(self.short_prompts.values(), "short prompts differ")
        self.prefix_ids = torch.tensor([processor.tokenizer(self.prefix)["input_ids"]])
        self.short_prefix_ids = torch.tensor([processor.tokenizer(self.short_prefix)["input_ids"]])
        self.image_token = int(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))

    def _render(self, system_prompt: str, user_prompt: str) -> str:
        messages = chat_messages(system_prompt, user_prompt, True)
        return str(
            self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        short = samples[0].short
        prompts = self.short_prompts if short else self.prompts
        prefix = self.short_prefix if short else self.prefix
        images, texts, scenes, values, offsets = [], [], [], [], []
        for sample in samples:
            scene = labelled_scene(sample.key, count=self.cfg.shapes)
            scenes.append(scene)
            values.append(
                scene_answers(scene, self.cfg.min_pixels, self.cfg.max_pixels)[sample.slug]
            )
            answer = compact(values[-1])
            images.append(scene.image)
            texts.append(prompts[sample.slug][len(prefix) :] + answer + _END)
            tokens = self.processor.tokenizer(answer + _END, return_offsets_mapping=True)
            offsets.append(tokens["offset_mapping"])
        answer_lengths = [len(o) for o in offsets]
        inputs = dict(self.processor(text=texts, images=images, padding=True, return_tensors="pt"))
        keep = max(answer_lengths)
        targets = inputs["input_ids"][:, -keep:].clone()
        for row, length in enumerate(answer_lengths):
            targets[row, : keep - length] = -100
        inputs["targets"] = targets
        inputs["prefix_ids"] = self.short_prefix_ids if short else self.prefix_ids
        if self.cfg.layout_weight > 0:
            inputs.update(layout_targets(scenes, inputs["image_grid_thw"], self.cfg))
        if self.cfg.attention_weight > 0:
            inputs.update(
                attention_targets(self.image_token, samples, scenes, values, offsets, inputs)
            )
        return inputs


def _head(texts: Iterable[str], problem: str) -> str:
    """The common start of ``texts``, up to and including ``<|vision_start|>``."""
    heads = {text[: text.index(_VISION_START) + len(_VISION_START)] for text in texts}
    if len(heads) != 1:
        raise ValueError(problem)
    return heads.pop()


_VISION_START = "<|vision_start|>"
_END = "<|im_end|>"


LAYOUT_CELLS = 16
"""Rows and columns of merged image tokens the layout head can name (168 px: at most 8)."""
_LAYOUT_KINDS = 1 + 3 * 6 + 1  # nothing, a kind in a fill colour, the word


def layout_targets(scenes: list[Any], grids: Any, cfg: TrainConfig) -> dict[str, Any]:
    """What each image token the language model sees should know about its place in the scene.

    Why: the answers need absolute positions, and nothing in Qwen2.5-VL gives an image token its
    own: the vision tower's and the language model's rotary positions are relative, and a scene's
    background is flat, so a token can only work its place out by counting (causal attention
    over the tokens before it). Two hours of answer loss did not find that (held-out boxes 3%).
    A small head, used in training only and not saved, asks the hidden state of every merged
    image token (``layout_layer``) for its row and column, what covers it (one of the 18
    kind x colour pairs, the word, or nothing) and, where a shape covers it, that shape's box
    (corners over the model image's sides, 0-1): the answer then only has to find the shape's
    tokens by content and copy. Tokens come in the processor's order: row by row, per picture.

    A token is covered by the object whose box overlaps its 28 x 28 pixel cell most, when that is
    at least a fifth of the cell.
    """
    import torch

    from goflow_gpu.simulator.images import SCENE_FILLS, SCENE_KINDS

    rows: list[int] = []
    cols: list[int] = []
    what: list[int] = []
    boxes: list[list[float]] = []
    for scene, grid in zip(scenes, grids.tolist(), strict=True):
        cells, corners = _token_cells(scene, grid)
        sides = (cells[-1][2], cells[-1][3]) * 2  # the model image's width and height
        objects: list[tuple[int, tuple[float, ...]]] = []
        for shape in scene.shapes:
            kind = SCENE_KINDS.index(shape.kind) * len(SCENE_FILLS)
            objects.append((1 + kind + SCENE_FILLS.index(shape.colour), corners(shape.box)))
        objects.append((_LAYOUT_KINDS - 1, corners(scene.word_box)))
        for cell in cells:
            best, label = _CELL * _CELL / 5, 0
            box: tuple[float, ...] = (0.0,) * 4
            for kind, drawn in objects:
                area = _overlap(cell, drawn)
                if area >= best:
                    best, label, box = area, kind, drawn
            rows.append(min(cell[1] // _CELL, LAYOUT_CELLS - 1))
            cols.append(min(cell[0] // _CELL, LAYOUT_CELLS - 1))
            what.append(label)
            shape_here = 0 < label < _LAYOUT_KINDS - 1
            boxes.append([v / s for v, s in zip(box, sides, strict=True)] + [shape_here])
    table = torch.tensor(boxes)
    return {
        "layout_rows": torch.tensor(rows),
        "layout_cols": torch.tensor(cols),
        "layout_what": torch.tensor(what),
        "layout_boxes": table[:, :4],
        "layout_has_box": table[:, 4],
    }


_CELL = 28
"""Side in model pixels of the cell one merged image token sees (14 px patches, merged 2 x 2)."""


def _token_cells(
    scene: Any, grid: list[int]
) -> tuple[list[Box], Callable[[Box], tuple[float, ...]]]:
    """The model-pixel cells of a scene's merged image tokens, row by row as the processor
    orders them (``grid`` is its ``image_grid_thw`` row), and a function taking a scene box to
    model-pixel corners."""
    _, grid_h, grid_w = grid
    height, width = grid_h // 2, grid_w // 2
    scale_x = width * _CELL / scene.image.size[0]
    scale_y = height * _CELL / scene.image.size[1]
    cells = [
        (c * _CELL, r * _CELL, (c + 1) * _CELL, (r + 1) * _CELL)
        for r in range(height)
        for c in range(width)
    ]

    def corners(box: Box) -> tuple[float, ...]:
        x, y, w, h = box
        return (x * scale_x, y * scale_y, (x + w) * scale_x, (y + h) * scale_y)

    return cells, corners


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def layout_head(hidden: int) -> Any:
    """The training-only head of :func:`layout_targets` (row, column, content, box)."""
    import torch

    return torch.nn.Sequential(
        torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, 2 * LAYOUT_CELLS + _LAYOUT_KINDS + 4)
    )


def layout_loss(head: Any, states: Any, batch: dict[str, Any]) -> Any:
    """Cross-entropy of row, column and content, and 4 x the L1 of the covering shape's box
    corners (over the sides, so 0-4), stacked: their sum is the layout loss."""
    import torch

    f = torch.nn.functional
    out = head(states.float())
    rows, cols, what, box = out.split([LAYOUT_CELLS, LAYOUT_CELLS, _LAYOUT_KINDS, 4], dim=-1)
    has = batch["layout_has_box"]
    box_error = f.l1_loss(box.sigmoid(), batch["layout_boxes"], reduction="none").sum(-1) * has
    return torch.stack(
        [
            f.cross_entropy(rows, batch["layout_rows"]),
            f.cross_entropy(cols, batch["layout_cols"]),
            f.cross_entropy(what, batch["layout_what"]),
            4 * box_error.sum() / has.sum().clamp(min=1),
        ]
    )


def grounded_spans(slug: str, values: dict[str, Any], scene: Any) -> list[tuple[int, int, Box]]:
    """``(start, end, box)``: the characters of ``compact(values)`` (the scene's answer to
    ``slug``) that write about one boxed thing (an object of object-detection and its phrase in
    the description, the word in the description, the text block of text-recognition) and its
    scene box."""
    answer = compact(values)
    if slug == "object-detection":
        shapes = reading_order(scene.shapes)
        pieces = zip(values["objects_detected"], shapes, strict=True)
        items = [(compact(piece), shape.box) for piece, shape in pieces]
        # The description names each shape's colour (the only place the answer does): its
        # phrase looks at that shape, and "word X" at the word, in the order describe() wrote.
        # (The leading space: the tokenizer writes it at the front of the colour's token.)
        items += [(f" {phrase}", box) for phrase, box in described_things(scene)]
    elif slug == "text-recognition":
        items = [(compact(values["text_blocks"][0]), scene.word_box)]
    else:
        return []
    spans, at = [], 0
    for piece, box in items:
        start = answer.index(piece, at)
        at = start + len(piece)
        spans.append((start, at, box))
    return spans


def attention_targets(
    image_token: int,
    samples: list[Sample],
    scenes: list[Any],
    values: list[dict[str, Any]],
    offsets: list[list[tuple[int, int]]],
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """Where the answer should look while it writes about a thing: that thing's image tokens.

    Why: with the layout loss the image tokens knew their place, kind and box (linear probes:
    rows 100%, columns 97%, boxes within 4%), yet the answer did not read them: on one-shape
    scenes the kind token stayed at chance (1.094 nats, ln 3 = 1.099) after 400 more steps, and
    the last block's attention from that position put 1-3% of its weight on the picture. So the
    first head of each of ``attention_layers`` is taught, at every position that predicts a
    token of an object (from its name to its closing brace) or of the text block, to put its
    weight on the image tokens whose cells that thing's box overlaps: ``attend_mask[row, query,
    key]`` over the unshared part of the sequence, ``attend_rows[row, query]`` the positions
    taught. In a 200-step trial the kind's loss fell to 0.58 and the colour's from 1.34 to 0.76.
    The colour is only written in the description, after every box: its phrase ("a red circle")
    is taught to look at the shape again.

    ``image_token`` is ``<|image_pad|>``'s id, ``values`` the rows' answers
    (:func:`scene_answers`), ``offsets`` the character offsets of their tokens, ``<|im_end|>``
    included (the Batcher has them all).
    """
    import torch

    ids = inputs["input_ids"]
    rows, length = ids.shape
    mask = torch.zeros(rows, length, length, dtype=torch.bool)
    taught = torch.zeros(rows, length)
    image = ids == image_token
    for row, (sample, scene) in enumerate(zip(samples, scenes, strict=True)):
        spans = grounded_spans(sample.slug, values[row], scene)
        first = length - len(offsets[row])  # the answer ends the left-padded row
        tokens = image[row].nonzero().flatten().tolist()  # row by row, as _token_cells
        cells, corners = _token_cells(scene, inputs["image_grid_thw"][row].tolist())
        for start, end, box in spans:
            drawn = corners(box)
            look = [tokens[n] for n, cell in enumerate(cells) if _overlap(cell, drawn) > 0]
            for index, (a, _z) in enumerate(offsets[row]):
                if start <= a < end:
                    query = first + index - 1  # the position that predicts this token
                    taught[row, query] = 1
                    mask[row, query, look] = True
    return {"attend_mask": mask, "attend_rows": taught}


def attention_loss(weights: Any, batch: dict[str, Any]) -> Any:
    """``-log`` of the weight the first head puts on the taught image tokens, averaged over
    the taught positions; ``weights`` is one block's ``[rows, heads, queries, keys]``."""
    import torch

    mask, taught = batch["attend_mask"], batch["attend_rows"]
    own = weights[:, 0, :, -mask.shape[-1] :]  # the shared prefix's keys come first
    mass = (own * mask).sum(-1)
    return -(torch.log(mass + 1e-4) * taught).sum() / taught.sum().clamp(min=1)


def answer_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy of the answer tokens, the shared prefix encoded once."""
    return training_losses(model, batch)[0]


def training_losses(
    model: Any, batch: dict[str, Any], head: Any = None, cfg: TrainConfig | None = None
) -> tuple[Any, Any, Any]:
    """``(answers, layout, attention)``: the mean cross-entropy of the answer tokens (the shared
    prefix encoded once); given a layout ``head``, :func:`layout_loss`'s four parts on block
    ``cfg.layout_layer``'s output at the image tokens; when the batch carries attention targets,
    :func:`attention_loss` per block of ``cfg.attention_layers`` (the model must run eager
    attention to return its weights). Parts not asked for are ``None``."""
    import torch
    from transformers import DynamicCache

    extra = ("layout_", "attend_")
    inputs = {k: v for k, v in batch.items() if not k.startswith(extra)}
    attend = cfg is not None and "attend_mask" in batch
    targets, prefix = inputs.pop("targets"), inputs.pop("prefix_ids")
    rows, plen = inputs["input_ids"].shape[0], prefix.shape[1]
    full_ids = torch.cat([prefix.expand(rows, -1), inputs["input_ids"]], dim=1)
    full_mask = torch.cat([torch.ones_like(full_ids[:, :plen]), inputs.pop("attention_mask")], 1)
    types = torch.cat([torch.zeros_like(full_ids[:, :plen]), inputs.pop("mm_token_type_ids")], 1)
    positions, _ = model.model.get_rope_index(
        full_ids, types, image_grid_thw=inputs["image_grid_thw"], attention_mask=full_mask
    )
    encoded = model.model.language_model(
        input_ids=prefix, position_ids=positions[:, :1, :plen], use_cache=True
    ).past_key_values
    shared = DynamicCache()
    for index, cached in enumerate(encoded.layers):
        shared.update(
            cached.keys.expand(rows, -1, -1, -1), cached.values.expand(rows, -1, -1, -1), index
        )
    keep = targets.shape[1]
    out = model(
        **inputs,
        attention_mask=full_mask,
        position_ids=positions[:, :, plen:],
        past_key_values=shared,
        use_cache=True,
        logits_to_keep=keep + 1,
        output_hidden_states=head is not None,
        output_attentions=attend,
    )
    logits = out.logits[:, :-1].float()
    answers = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
    layout = attention = None
    if head is not None and cfg is not None:
        image = inputs["input_ids"] == model.config.image_token_id
        layout = layout_loss(head, out.hidden_states[cfg.layout_layer][image], batch)
    if attend and cfg is not None:
        attention = torch.stack(
            [attention_loss(out.attentions[n], batch) for n in cfg.attention_layers]
        )
    return answers, layout, attention


def batches_for(
    make: Callable[[list[Sample]], dict[str, Any]], plan: Iterator[list[Sample]], device: str
) -> Iterator[dict[str, Any]]:
    """The training batches: built in turn on CPU, ahead in a thread when a GPU trains.

    Why not always ahead: on the 2-core machine a batch costs ~0.13 s against ~1.1 s of forward
    and backward, and the tiny model's step is hundreds of small torch calls, each taking the
    GIL back from the batch thread's Python (drawing, layout and attention targets). Measured on
    60 one-shape steps: 0.53 steps/s with the thread, 0.64 with a separate process (it takes a
    core from torch's two), 0.71 in turn, the same losses. On a GPU the host is otherwise idle
    while the device computes, and the thread hides the batch's cost.
    """
    if device == "cpu":
        return (make(samples) for samples in plan)
    return _prefetch(make, plan)


def _prefetch(
    make: Callable[[list[Sample]], dict[str, Any]], plan: Iterator[list[Sample]]
) -> Iterator[dict[str, Any]]:
    """Build the next batch in a thread while the current one trains."""
    ready: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=2)

    def work() -> None:
        for samples in plan:
            ready.put(make(samples))
        ready.put(None)

    threading.Thread(target=work, daemon=True, name="batches").start()
    while (item := ready.get()) is not None:
        yield item


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine down to ``min_lr_ratio`` of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    done = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))
    )


def _load_for_more(source: Path, directory: Path, cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """The model, token ids and record of a folder this command wrote, copied to ``directory``."""
    import shutil

    import torch

    from goflow_gpu.engines.scene_model import read_training

    transformers: Any = __import__("transformers")
    earlier = read_training(source)
    if earlier is None:
        raise ValueError(f"{source} has no {TRAINING_FILE}: only a folder train-tiny wrote")
    for key in ("layers", "mlp", "min_pixels", "max_pixels"):
        if earlier["config"][key] != getattr(cfg, key):
            raise ValueError(f"{source} was trained with {key}={earlier['config'][key]}")
    if source.resolve() != directory.resolve():
        shutil.copytree(source, directory, dirs_exist_ok=True)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(directory), dtype=torch.float32
    )
    tokens = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in tokens["added_tokens"]}
    return model, ids, earlier


def store_weights(directory: Path, dtype: str) -> None:
    """Rewrite the folder's ``model.safetensors`` with every floating tensor as ``dtype``, the
    config untouched (it keeps ``float32``: engines compute in fp32 on CPU, where this machine's
    AVX2 has no bf16 arithmetic, and load the stored bf16 into fp32 weights).

    Why bf16: half the bytes in the repository (5.8 MB, not 11.7) at the same grades. Run16
    (shipped before the rebuild) stored as bf16 answered exactly as in fp32: through vLLM 21/24
    object-detection answers right, boxes 92% (mean IoU 0.86), colours 100%, kinds 92%,
    people-count 24/24; through transformers on the starter set the same agreement (0.917
    object-detection, 0.523 text-recognition). Rewriting the saved file rather than saving a
    cast state dict keeps transformers' own key names and tied weights as it wrote them.
    """
    import torch
    from safetensors.torch import load_file, save_file

    path = Path(directory) / "model.safetensors"
    target = getattr(torch, dtype)
    tensors = load_file(str(path))
    cast = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(cast, str(path), metadata={"format": "pt"})


def trained_specs(catalog: Catalog, slugs: list[str]) -> dict[str, dict[str, Any]]:
    """Version and content hash (as in the catalog lock) of each learned spec: a model learned
    these exact prompts, and :func:`stale_specs` tells when the catalog moved on."""
    from goflow_gpu.prompts.lock import content_hash

    return {
        slug: {
            "version": catalog.specs[slug].version,
            "hash": content_hash(catalog.specs[slug], catalog.system_prompt),
        }
        for slug in slugs
    }


def stale_specs(record: dict[str, Any], catalog: Catalog) -> list[str]:
    """The learned analyses whose spec in ``catalog`` differs from the one the model in
    ``record`` (its training.json) learned: ``"object-detection v3 -> v4"`` lines."""
    learned = record.get("specs") or {}
    now = trained_specs(catalog, [slug for slug in learned if slug in catalog.specs])
    lines = []
    for slug, then in learned.items():
        current = now.get(slug)
        if current is None:
            lines.append(f"{slug} is no longer in the catalog")
        elif current["hash"] != then.get("hash"):
            lines.append(f"{slug} v{then.get('version')} -> v{current['version']}")
    return lines


def evaluate(
    model: Any,
    processor: Any,
    catalog: Catalog,
    cfg: TrainConfig,
    keys: list[str],
    prompts: dict[str, str],
    batch: int = 16,
) -> dict[str, GradeSummary]:
    """Greedy answers (transformers ``generate``, no grammar) to ``keys`` for every learned
    analysis, asked with its whole rendered prompt (``Batcher.prompts``), through the worker's
    QA, graded."""
    import torch

    grades = []
    model.eval()
    with torch.no_grad():
        for slug in cfg.mix:
            spec = catalog.specs[slug]
            rendered = catalog.render(spec)
            schema = result_schema(spec.json_schema, spec.qa)
            for start in range(0, len(keys), batch):
                scenes = [labelled_scene(k, count=cfg.shapes) for k in keys[start : start + batch]]
                inputs = processor(
                    text=[prompts[slug]] * len(scenes),
                    images=[s.image for s in scenes],
                    padding=True,
                    return_tensors="pt",
                )
                # The learned answers are at most ~130 tokens: a cap keeps an early, rambling
                # model from spending the spec's whole budget at every evaluation.
                budget = min(rendered.max_tokens, EVAL_MAX_TOKENS)
                inputs = inputs.to(cfg.device)
                out = model.generate(**inputs, max_new_tokens=budget, do_sample=False)
                texts = processor.batch_decode(
                    out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for scene, text in zip(scenes, texts, strict=True):
                    verdict = check_output(
                        text,
                        rendered,
                        spec.qa,
                        original_size=scene.image.size,
                        model_size=model_size(scene, cfg.min_pixels, cfg.max_pixels),
                    )
                    grades.append(grade(slug, verdict.result, scene, schema))
    model.train()
    return summarise(grades)


def train(
    directory: Path,
    cfg: TrainConfig,
    *,
    catalog_dir: Path | None = None,
    command: str = "",
    echo: Callable[[str], None] = print,
    continue_from: Path | None = None,
) -> dict[str, GradeSummary]:
    """Train and save the model in ``directory``; returns the final held-out grades.

    ``continue_from``: a folder this command wrote; its weights and tokenizer are the start
    (``cfg`` must keep its architecture and pixel budget), training goes on with the scenes
    after the last one it saw (``data_offset``), and its record is kept in the new one's
    ``continued_from``, so the folder says every command that made it.
    """
    import torch

    transformers: Any = __import__("transformers")
    from goflow_gpu.engines.tiny import write_generation_config

    torch.set_num_threads(cfg.threads)
    catalog = load_catalog(catalog_dir)
    for slug in cfg.mix:
        if slug not in LEARNED_ANALYSES:
            raise ValueError(f"no scene answers for {slug!r}; scenes answer {LEARNED_ANALYSES}")
    directory = Path(directory)
    earlier = None
    if continue_from is None:
        model, ids = build_untrained(directory, catalog, cfg)
    else:
        model, ids, earlier = _load_for_more(Path(continue_from), directory, cfg)
        seen = earlier["config"]
        offset = seen.get("data_offset", 0) + seen["steps"] * seen["batch"]
        cfg = replace(cfg, data_offset=offset)
    processor = transformers.AutoProcessor.from_pretrained(str(directory))
    params = sum(p.numel() for p in model.parameters())
    echo(f"model: {params / 1e6:.2f} M parameters; tokenizer: {len(processor.tokenizer)} tokens")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    head = None
    if cfg.layout_weight > 0:
        torch.manual_seed(cfg.seed + 1)
        head = layout_head(model.config.text_config.hidden_size).to(cfg.device)
        optimizer.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})
    if cfg.attention_weight > 0:  # the attention loss needs the weights, which only eager gives
        model.set_attn_implementation("eager")
    model.to(cfg.device).train()
    batcher = Batcher(processor, catalog, cfg)
    batches = batches_for(batcher, plan_samples(cfg), cfg.device)
    heldout = heldout_keys(cfg.eval_scenes)
    started = time.monotonic()
    running: float | None = None
    aux_running: Any = None
    history: list[dict[str, Any]] = []
    for step, inputs in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        inputs = {k: v.to(cfg.device) for k, v in inputs.items()}
        loss, layout, attention = training_losses(model, inputs, head, cfg)
        total = loss
        if layout is not None:
            total = total + cfg.layout_weight * layout.sum()
        if attention is not None:
            total = total + cfg.attention_weight * attention.sum()
        parts = [p.detach().cpu() for p in (layout, attention) if p is not None]
        if parts:
            now = torch.cat(parts)
            aux_running = now if step == 0 else 0.95 * aux_running + 0.05 * now
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        done = step + 1
        if done % 50 == 0 or done == 1:
            rate = done / (time.monotonic() - started)
            left = (cfg.steps - done) / rate
            extra = ""
            if aux_running is not None:  # row, column, content, box; then attention per block
                extra = " aux " + "/".join(f"{v:.2f}" for v in aux_running.tolist())
            echo(
                f"step {done}/{cfg.steps} loss {running:.4f}{extra} "
                f"({rate:.2f} steps/s, {left / 60:.0f} min left)"
            )
        if done % cfg.eval_every == 0 or done == cfg.steps:
            summary = evaluate(model, processor, catalog, cfg, heldout, batcher.prompts)
            history.append({"step": done, **{s: g.line() for s, g in summary.items()}})
            for line in summary.values():
                echo(f"  held-out {line.line()}")
            if done < cfg.steps:  # a checkpoint; the last step saves below
                model.save_pretrained(str(directory), safe_serialization=True)
    elapsed = time.monotonic() - started
    final = summary
    model.to("cpu").save_pretrained(str(directory), safe_serialization=True)
    store_weights(directory, cfg.dtype)
    write_generation_config(directory, ids)
    record = {
        "command": command,
        "config": asdict(cfg),
        "analyses": list(cfg.mix),
        "specs": trained_specs(catalog, list(cfg.mix)),
        "pixel_budget": {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels},
        "minutes": round(elapsed / 60, 1),
        "heldout": {s: g.figures() for s, g in final.items()},
        "history": history,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if earlier is not None:
        record["continued_from"] = earlier
    (directory / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return final
