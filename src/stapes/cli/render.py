"""All terminal output in one place: tables, machine formats, progress, errors."""

from __future__ import annotations

import csv
import io
import json
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
import yaml
from rich import box
from rich.console import Console
from rich.status import Status
from rich.table import Table
from rich.text import Text

FORMATS = ("table", "json", "yaml", "csv", "compact")
FORMAT_OPTIONS = ("noheader", "header", "raw")
_err_console = Console(stderr=True)
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(value: object) -> str:
    """A cell as text an admin's terminal only shows: no control characters (ESC, C1, BEL, CR...) nor
    bidirectional overrides, tabs as spaces, newlines kept (multi-line cells). Values come from the server,
    and some of them (descriptions, config values, a VM guest's own word) from whoever set them."""
    return "".join(" " if char == "\t" else char for char in str(value)
                   if char in "\n\t" or not (unicodedata.category(char) == "Cc" or char in _BIDI))


def cell(value: object) -> Text:
    """A table cell: plain text (rich never reads markup in it), control characters stripped."""
    return Text(printable(value))


def split_format(spec: str) -> tuple[str, set[str]]:
    """Incus's `-f csv,noheader`: the format and its options (csv has no header unless `header`)."""
    fmt, *options = spec.split(",")
    if fmt not in FORMATS:
        raise click.BadParameter(f"{fmt!r} is not one of {', '.join(FORMATS)}", param_hint="'--format'")
    unknown = [o for o in options if o not in FORMAT_OPTIONS]
    if unknown:
        raise click.BadParameter(f"unknown format option {unknown[0]!r}: use {', '.join(FORMAT_OPTIONS)}",
                                 param_hint="'--format'")
    return fmt, set(options)


class FormatType(click.ParamType):  # type: ignore[type-arg]
    """-f FORMAT[,noheader|header|raw] as Incus's list commands take it."""

    name = "format"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        split_format(str(value))
        return str(value)


def global_flag(name: str) -> bool:
    """A global option (`stapes -q ...`, or anywhere on the line: see argv.normalise)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get(name))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], fmt: str = "table", raw: Any = None) -> None:
    """Render rows; json and yaml render `raw` (the API objects) like Incus does. `fmt` may carry Incus's
    options: `csv,header`, `table,noheader`."""
    fmt, options = split_format(fmt)
    if fmt == "json":
        click.echo(json.dumps(raw if raw is not None else [dict(zip(headers, r, strict=True)) for r in rows]))
    elif fmt == "yaml":
        click.echo(yaml.safe_dump(raw if raw is not None else [dict(zip(headers, r, strict=True)) for r in rows],
                                  sort_keys=False), nl=False)
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if "header" in options:
            writer.writerow(headers)
        writer.writerows([[printable(c) for c in row] for row in rows])
        click.echo(out.getvalue(), nl=False)
    else:
        styles = {"table": box.ASCII, "compact": box.SIMPLE_HEAD}
        t = Table(*headers, box=styles.get(fmt, box.ASCII), show_lines=fmt == "table", header_style="bold",
                  show_header="noheader" not in options)
        for row in rows:
            t.add_row(*(cell(c) for c in row))
        Console(width=200 if not sys.stdout.isatty() else None).print(t)


def debug(message: str) -> None:
    """A --debug line on stderr."""
    if global_flag("debug"):
        click.echo(f"DEBUG: {message}", err=True)


def show_yaml(data: Any) -> None:
    click.echo(yaml.safe_dump(data, sort_keys=True, default_flow_style=False), nl=False)


def error(message: str) -> None:
    click.echo(f"Error: {message}", err=True)


def success(message: str, quiet: bool = False) -> None:
    if not quiet and not global_flag("quiet"):
        click.echo(message)


@contextmanager
def progress(label: str, quiet: bool = False) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A live status line on stderr for a running operation (on a terminal), then the final figures as one
    line once it succeeded (terminal or not). Nothing with --quiet, nothing extra on failure."""
    last = ""
    status: Status | None = None

    def update(op: dict[str, Any]) -> None:
        nonlocal last
        last = _progress_text(op) or last
        if status is not None and last:
            status.update(f"{label}: {last}")

    if quiet or global_flag("quiet"):
        yield lambda op: None
        return
    if sys.stderr.isatty():
        with _err_console.status(label) as status:
            yield update
    else:
        yield update
    if last:
        click.echo(f"{label}: {last}", err=True)


def _progress_text(op: dict[str, Any]) -> str:
    detail = (op.get("metadata") or {}).get("progress")
    if not isinstance(detail, dict):
        return ""
    from stapes.cli.units import transfer  # figures as people read them (issue 17)
    text = transfer(detail) or str(detail.get("text") or "")
    vm = (op.get("metadata") or {}).get("vm")
    if isinstance(vm, dict) and detail.get("stage"):  # a VM's live move: its phase and QEMU's own figures
        text = f"{detail['stage']}: {text}{_vm_memory_text(vm)}"
    return text


def _vm_memory_text(vm: dict[str, Any]) -> str:
    """QEMU's memory-phase figures after the transfer's: what is left, the pass, how fast the guest dirties
    its memory (QEMU counts 4 KiB pages a second), the downtime QEMU expects against the one allowed now."""
    if vm.get("phase") != "memory":
        return ""
    from stapes.cli.units import compact_size

    def number(key: str) -> int:
        value = vm.get(key)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0

    text = (f", {compact_size(number('memory_remaining'))} left, pass {number('iteration')}, "
            f"dirtying {compact_size(number('dirty_rate_pages') * 4096)}/s, "
            f"expected downtime {number('expected_downtime_ms')} ms")
    if number("downtime_limit_ms"):
        text += f" (allowed {number('downtime_limit_ms')} ms)"
    if number("throttle_percent"):
        text += f", guest throttled {number('throttle_percent')}%"
    return text
