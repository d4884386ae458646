"""YAML with line numbers: parse a file and remember on which line every key and item sits.

Authors get ``file:line: message`` for every problem, so the loader needs a map from a data path
(``("json_schema", "properties", "name")``) to the line it came from. PyYAML's composed node tree
carries those marks; the data itself is constructed from the same tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

PathKey = tuple[str | int, ...]


@dataclass
class YamlSource:
    """A parsed YAML document, its line map, and problems found while parsing (duplicate keys)."""

    data: Any
    lines: dict[PathKey, int] = field(default_factory=dict)
    problems: list[tuple[int, str]] = field(default_factory=list)

    def line_of(self, path: PathKey) -> int:
        """The line of ``path``, or of its nearest ancestor that exists (1 for the document)."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return 1


class YamlSyntaxError(Exception):
    """The text is not valid YAML; ``line`` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def parse_yaml(text: str) -> YamlSource:
    """Parse one YAML document. Raises :class:`YamlSyntaxError` with the line of the problem."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        message = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise YamlSyntaxError(line, f"invalid YAML: {message}") from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(1, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    source = YamlSource(data=data)
    if node is not None:
        _walk(node, (), source)
    return source


def _walk(node: yaml.Node, path: PathKey, source: YamlSource) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                # PyYAML keeps the last value silently; an author never means that.
                source.problems.append((line, f"duplicate key '{key}' (first on line {seen[key]})"))
            seen[key] = line
            source.lines[(*path, key)] = line
            _walk(value_node, (*path, key), source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            source.lines[(*path, index)] = item.start_mark.line + 1
            _walk(item, (*path, index), source)
