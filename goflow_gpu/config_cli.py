"""``goflow-gpu config show``: the merged settings, and where each value came from.

About forty settings reach the worker through four layers (flag > ``GOFLOW_*`` environment >
``--config`` YAML > default). When the worker does something unexpected the first question is
"which value did it run with, and why": this command answers it without starting anything. The
values are those :func:`goflow_gpu.settings.load_settings` builds (the same validation, the same
refusal of mistyped ``GOFLOW_*`` variables, exit 2 on a bad setting); the source of each comes
from :func:`goflow_gpu.settings.value_sources`, which asks the same pydantic-settings sources.

Secrets are never printed: the API key shows as "set (not shown)" or "not set", and a URL's
password (the inference server's URL may carry one) as ``***``.

Output: a table on a terminal; plain aligned text otherwise (``name  value  source`` per line, for
grep and diff); ``--json`` one object ``{name: {"value": ..., "source": ...}}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from goflow_gpu.errors import ConfigError
from goflow_gpu.settings import Settings, load_settings, value_sources

__all__ = ["KEY_NOT_SET", "KEY_SET", "app", "describe"]

#: How the API key appears: whether it is set, never what it is.
KEY_SET = "set (not shown)"
KEY_NOT_SET = "not set"

app = typer.Typer(
    help="Show the configuration the worker would run with, and where each value came from.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _mask_url_password(value: str) -> str:
    """``https://user:***@host/``: the password of a URL is a secret too."""
    parts = urlsplit(value)
    if parts.password is None:
        return value
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def describe(settings: Settings, sources: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``{name: {"value": ..., "source": ...}}`` in declaration order, secrets masked.

    Values are JSON types (paths as strings, unset optional values as ``None``)."""
    values = settings.model_dump(mode="json", exclude={"api_key"})
    shown: dict[str, dict[str, Any]] = {}
    for name in Settings.model_fields:
        if name == "api_key":
            value: Any = KEY_SET if settings.api_key is not None else KEY_NOT_SET
        else:
            value = values[name]
            if isinstance(value, str) and "://" in value:
                value = _mask_url_password(value)
        shown[name] = {"value": value, "source": sources[name]}
    return shown


def _text(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@app.command("show")
def show(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML settings file (see configs/).", exists=False),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object {name: {value, source}}.")
    ] = False,
) -> None:
    """Print every setting with its value and its source: flag, env GOFLOW_X, file PATH, or
    default. The API key is shown only as set or not set.

    Exit 2 when the configuration is invalid (the same checks as serve and run, including
    unknown GOFLOW_* variables).
    """
    out = Console(soft_wrap=True)
    try:
        settings = load_settings(config)
        rows = describe(settings, value_sources(config, settings=settings))
    except ConfigError as exc:
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]configuration error:[/] {escape(str(exc))}", highlight=False
        )
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif out.is_terminal:
        table = Table(title="settings (flag > env > file > default)", title_justify="left")
        for column in ("setting", "value", "source"):
            table.add_column(column, overflow="fold")
        for name, row in rows.items():
            cells = (Text(name), Text(_text(row["value"])), Text(row["source"]))
            table.add_row(*cells, style=_style(row["source"]))
        out.print(table)
    else:
        width = max(len(name) for name in rows)
        value_width = max(len(_text(row["value"])) for row in rows.values())
        for name, row in rows.items():
            typer.echo(f"{name:<{width}}  {_text(row['value']):<{value_width}}  {row['source']}")


def _style(source: str) -> str:
    # Defaults dim, so that what an operator changed stands out.
    return "dim" if source == "default" else ""
