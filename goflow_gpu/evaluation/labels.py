"""A labelled set on disk: images, and per image the answers expected of each analysis.

Layout of a set directory::

    DIR/<name>.png|.jpg|.jpeg|.webp    the image
    DIR/<name>.yaml|.yml|.json         optional: {analysis slug: {field: expected, ...}, ...}

Each label file holds, per analysis slug, a *partial* analysisResult in wire form (boxes as
``bounding_box {x, y, width, height}`` in the image's own pixels): only the fields given are
scored. An image without a label file is part of the set; its answers count for the schema, QA
and cost figures but have no fields to score. Other files (a README, hidden files) are ignored;
subdirectories are not searched.

Loading refuses, with :class:`EvalSetError` naming the file, a label file without its image, two
images or two label files for one name, an unreadable image, a label file that is not a mapping
of slugs to mappings, non-JSON values (YAML dates, ...) and an empty set. Given the schemas of a
catalog, it also refuses an analysis slug the catalog lacks and any labelled field that does not
fit the slug's schema (:mod:`goflow_gpu.evaluation.fields`), so a typo fails before the engine
runs.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from goflow_gpu.errors import GoFlowError
from goflow_gpu.evaluation.fields import FieldError, plan_fields

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
LABEL_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class EvalSetError(GoFlowError):
    """A labelled set that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LabelledImage:
    """One image of a labelled set and what is expected of it per analysis slug."""

    name: str
    """The file stem; answers refer to the image by it."""
    path: Path
    size: tuple[int, int]
    """``(width, height)`` of the image file: the original pixels boxes are given in."""
    expected: dict[str, dict[str, Any]]
    """Analysis slug -> partial expected analysisResult, wire form."""
    label_file: Path | None = None


def load_labelled_set(
    directory: Path, schemas: Mapping[str, Mapping[str, Any]] | None = None
) -> list[LabelledImage]:
    """Every image of the set in ``directory``, sorted by name, with its labels.

    ``schemas`` (slug -> JSON schema of the analysisResult) turns on the checks against a
    catalog: unknown slugs and fields that do not fit. Raises :class:`EvalSetError`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise EvalSetError(f"{directory}: not a directory")
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        suffix = path.suffix.lower()
        found = images if suffix in IMAGE_SUFFIXES else labels if suffix in LABEL_SUFFIXES else None
        if found is None:
            continue
        if path.stem in found:
            what = "images" if found is images else "label files"
            raise EvalSetError(
                f"{path}: two {what} named {path.stem!r} ({found[path.stem].name} and "
                f"{path.name}); keep one"
            )
        found[path.stem] = path
    for name, label_path in labels.items():
        if name not in images:
            raise EvalSetError(
                f"{label_path}: label file without an image (expected {name} with one of "
                f"{', '.join(IMAGE_SUFFIXES)} beside it)"
            )
    if not images:
        raise EvalSetError(
            f"{directory}: empty set, no images ({', '.join(IMAGE_SUFFIXES)}) in this directory"
        )
    out: list[LabelledImage] = []
    for name, image_path in images.items():
        label_file = labels.get(name)
        expected = _read_labels(label_file) if label_file is not None else {}
        if schemas is not None and label_file is not None:
            check_labels(label_file, expected, schemas)
        out.append(
            LabelledImage(
                name=name,
                path=image_path,
                size=_image_size(image_path),
                expected=expected,
                label_file=label_file,
            )
        )
    return out


def check_labels(
    label_path: Path,
    expected: Mapping[str, Mapping[str, Any]],
    schemas: Mapping[str, Mapping[str, Any]],
) -> None:
    """Refuse slugs the schemas lack and fields that do not fit; the error names the file."""
    for slug, fields in expected.items():
        schema = schemas.get(slug)
        if schema is None:
            close = difflib.get_close_matches(slug, list(schemas), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise EvalSetError(f"{label_path}: unknown analysis type {slug!r}{hint}")
        try:
            plan_fields(fields, schema)
        except FieldError as exc:
            raise EvalSetError(f"{label_path}: {slug}: {exc}") from None


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise EvalSetError(f"{path}: unreadable image ({exc})") from None
    return width, height


class _LabelLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, with YAML's own timestamp rule whatever was imported before.

    lm-format-enforcer (imported with vLLM's structured outputs) makes every ``SafeLoader`` of the
    process read timestamps as strings; a label ``2024-01-01`` would then pass as the string
    where it must be refused as a date (JSON has no dates: quote it).
    """


def _timestamp(loader: _LabelLoader, node: yaml.Node) -> Any:
    assert isinstance(node, yaml.ScalarNode)
    return yaml.constructor.SafeConstructor.construct_yaml_timestamp(loader, node)


_LabelLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp)


def _read_labels(path: Path) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalSetError(f"{path}: cannot read the label file ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalSetError(
                f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from None
    else:
        try:
            data = yaml.load(text, Loader=_LabelLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise EvalSetError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EvalSetError(
            f"{path}: not a mapping; the top level must map analysis slugs to expected fields"
        )
    out: dict[str, dict[str, Any]] = {}
    for slug, fields in data.items():
        if not isinstance(slug, str) or not _SLUG.match(slug):
            raise EvalSetError(f"{path}: {slug!r} is not an analysis slug (like object-detection)")
        if not isinstance(fields, dict):
            raise EvalSetError(
                f"{path}: {slug}: not a mapping; give the expected fields of its analysisResult"
            )
        problem = _non_json(fields, slug)
        if problem:
            raise EvalSetError(f"{path}: {problem}")
        out[slug] = fields
    return out


def _non_json(value: Any, where: str) -> str | None:
    """A message for the first value JSON cannot carry (YAML dates, NaN, non-string keys)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}: field names must be strings, got {key!r}"
            found = _non_json(item, f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _non_json(item, f"{where}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: {value} is not a finite number"
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    return f"{where}: a {type(value).__name__} is not a JSON value (quote it)"
