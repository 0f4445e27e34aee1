"""All terminal output in one place: tables, machine formats, progress, errors."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
import yaml
from rich import box
from rich.console import Console
from rich.table import Table

FORMATS = ("table", "json", "yaml", "csv", "compact")
_err_console = Console(stderr=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], fmt: str = "table", raw: Any = None) -> None:
    """Render rows; json and yaml render `raw` (the API objects) like Incus does."""
    if fmt == "json":
        click.echo(json.dumps(raw if raw is not None else [dict(zip(headers, r, strict=True)) for r in rows]))
    elif fmt == "yaml":
        click.echo(yaml.safe_dump(raw if raw is not None else [dict(zip(headers, r, strict=True)) for r in rows],
                                  sort_keys=False), nl=False)
    elif fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        click.echo(out.getvalue(), nl=False)
    else:
        styles = {"table": box.ASCII, "compact": box.SIMPLE_HEAD}
        t = Table(*headers, box=styles.get(fmt, box.ASCII), show_lines=fmt == "table", header_style="bold")
        for row in rows:
            t.add_row(*row)
        Console(width=200 if not sys.stdout.isatty() else None).print(t)


def show_yaml(data: Any) -> None:
    click.echo(yaml.safe_dump(data, sort_keys=True, default_flow_style=False), nl=False)


def error(message: str) -> None:
    click.echo(f"Error: {message}", err=True)


def success(message: str, quiet: bool = False) -> None:
    if not quiet:
        click.echo(message)


@contextmanager
def progress(label: str, quiet: bool = False) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A live status line on stderr for a running operation; silent when quiet or not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield lambda op: None
        return
    with _err_console.status(label) as status:
        def update(op: dict[str, Any]) -> None:
            meta = op.get("metadata") or {}
            detail = meta.get("progress")
            if isinstance(detail, dict):
                text = " ".join(f"{k}: {v}" for k, v in detail.items())
                status.update(f"{label} ({text})")

        yield update
