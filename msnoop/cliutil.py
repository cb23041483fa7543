"""Small helpers shared by the typer command modules of the stage packages."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (2: bad input or arguments)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


def split_list(values: list[str] | None) -> list[str]:
    """Repeated and/or comma-separated option values -> flat list."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]
