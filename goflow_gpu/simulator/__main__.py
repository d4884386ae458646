"""``python -m goflow_gpu.simulator``: the ``simulate`` command alone (for subprocess tests)."""

from __future__ import annotations

import typer

from goflow_gpu.simulator.cli import register

app = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False)
register(app)

if __name__ == "__main__":
    app()
