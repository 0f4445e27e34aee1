"""`stapes export` and `stapes import`: an instance as a backup tarball (Incus's format) and back."""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click

from stapes.api.backups import ALGORITHMS, DEFAULT_ALGORITHM, EXTENSIONS
from stapes.api.errors import BadRequest
from stapes.cli import render
from stapes.cli.common import client_for, config, parse, parse_remote_only

EXPIRY = datetime.timedelta(hours=24)  # as Incus's client asks: the server removes a forgotten backup


class _Bytes:
    """A byte count on stderr while it moves (a live line on a terminal), then one final line."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label = label
        self.quiet = quiet or render.global_flag("quiet")
        self.started = time.monotonic()
        self.text = ""
        self._shown = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        rate = done / max(time.monotonic() - self.started, 0.001)
        amount = f"{done * 100 // total}%" if total else _human(done)
        self.text = f"{amount} ({_human(rate)}/s)"
        now = time.monotonic()
        if not self.quiet and sys.stderr.isatty() and now - self._shown > 0.2:
            self._shown = now
            click.echo(f"\r{self.label}: {self.text}\033[K", err=True, nl=False)

    def clear(self) -> None:
        if not self.quiet and sys.stderr.isatty():
            click.echo("\r\033[K", err=True, nl=False)

    def done(self) -> None:
        if self.quiet:
            return
        if sys.stderr.isatty():
            click.echo("\r\033[K", err=True, nl=False)
        if self.text:
            click.echo(f"{self.label}: {self.text}", err=True)


def _human(value: float) -> str:
    """Bytes as Incus's progress shows them (12.34MiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.2f}{unit}" if unit != "B" else f"{int(value)}B"
        value /= 1024
    return f"{value:.2f}TiB"


@contextlib.contextmanager
def _target(path: str, force: bool) -> Iterator[BinaryIO]:
    """The file written (removed again if the export fails), or stdout for '-'."""
    if path == "-":
        yield sys.stdout.buffer
        return
    if os.path.lexists(path) and not force:
        raise BadRequest(f"Target path {path!r} already exists: choose another, or overwrite it with --force")
    try:
        with open(path, "wb") as handle:
            yield handle
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def register(cli: click.Group) -> None:
    @cli.command(name="export")
    @click.argument("instance")
    @click.argument("file", required=False)
    @click.option("--instance-only", is_flag=True, help="Leave the snapshots out")
    @click.option("--compression", type=click.Choice(ALGORITHMS), default=None,
                  help=f"Compression of the tarball (default: the server's, {DEFAULT_ALGORITHM})")
    @click.option("--optimized-storage", is_flag=True, hidden=True,
                  help="Accepted as Incus's client sends it; the backup is always the portable tarball")
    @click.option("-f", "--force", is_flag=True, help="Overwrite FILE if it exists")
    @click.option("-q", "--quiet", is_flag=True, help="No progress")
    def export(instance: str, file: str | None, instance_only: bool, compression: str | None,
               optimized_storage: bool, force: bool, quiet: bool) -> None:
        """Export an instance (its files, configuration and snapshots) as a backup tarball.

        The server writes the backup, the client downloads it, and the server's copy is removed. Without
        FILE it is NAME.tar.gz (.tar.zst, .tar with --compression); '-' writes it to the standard output.

        \b
        Examples:
          stapes export c1
          stapes export s1:c1 /backups/c1.tar.zst --compression zstd --instance-only
          stapes export c1 - | ssh host stapes import -
        """
        remote, name = parse(instance)
        algorithm = compression or DEFAULT_ALGORITHM
        path = file or f"{name}{EXTENSIONS[algorithm]}"
        quiet = quiet or path == "-"
        if path != "-" and os.path.lexists(path) and not force:
            raise BadRequest(f"Target path {path!r} already exists: choose another, or overwrite it with --force")
        expires = (datetime.datetime.now(datetime.UTC) + EXPIRY).isoformat().replace("+00:00", "Z")
        body = {"name": "", "expires_at": expires, "instance_only": instance_only, "optimized_storage": False,
                "compression_algorithm": compression or ""}
        with client_for(remote) as client:
            with render.progress("Backing up instance", quiet) as update:
                op = client.create_backup(name, body, update)
            backup = op["resources"]["backups"][0].split("?")[0].rsplit("/", 1)[-1]
            try:
                progress = _Bytes("Exporting the backup", quiet)
                try:
                    with _target(path, force) as sink:
                        client.download_backup(name, backup, sink, progress)
                except BaseException:
                    progress.clear()
                    raise
                progress.done()
            finally:
                with contextlib.suppress(Exception):
                    client.delete_backup(name, backup)
        render.success("Backup exported successfully!", quiet)

    @cli.command(name="import", context_settings={"ignore_unknown_options": False})
    @click.argument("args", nargs=-1, required=True, metavar="[REMOTE:] FILE [NAME]")
    @click.option("-s", "--storage", "pool", default="", help="Storage pool for the instance (default: the "
                  "backup's, if this server has it, else the default profile's)")
    @click.option("-q", "--quiet", is_flag=True, help="No progress")
    def import_backup(args: tuple[str, ...], pool: str, quiet: bool) -> None:
        """Create an instance from a backup tarball (made by 'export', here or by Incus), with its
        configuration, devices, profiles, snapshots and files. FILE '-' reads the standard input.

        \b
        Examples:
          stapes import c1.tar.gz
          stapes import s2: c1.tar.gz c1-restored -s fast
          stapes export s1:c1 - | stapes import s2: -
        """
        parts = list(args)
        spec = parts.pop(0) if parts and parts[0].endswith(":") and not Path(parts[0]).exists() else None
        if not 1 <= len(parts) <= 2:
            raise BadRequest("Usage: stapes import [REMOTE:] FILE [NAME]")
        remote = parse_remote_only(spec) if spec else config().remote(config().default_remote)
        file, name = parts[0], parts[1] if len(parts) == 2 else ""
        with contextlib.ExitStack() as stack:
            if file == "-":
                source: BinaryIO = sys.stdin.buffer
                size = None
            else:
                try:
                    source = stack.enter_context(open(file, "rb"))
                except OSError as err:
                    raise BadRequest(f"Cannot read {file!r}: {err.strerror}") from None
                size = os.fstat(source.fileno()).st_size
            uploading = _Bytes("Uploading the backup", quiet)
            client = stack.enter_context(client_for(remote))
            with render.progress("Importing instance", quiet) as update:
                try:
                    client.import_backup(source, pool=pool, name=name, size=size, upload_progress=uploading,
                                         progress=update)
                except BaseException:
                    uploading.clear()
                    raise
                uploading.done()
        render.success("Instance imported", quiet)
