"""`stapes file push/pull/delete/mkdir` and `stapes publish`: files inside instances, images from them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import secrets
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from stapes.api.errors import BadRequest
from stapes.cli import render
from stapes.cli.common import config, key_values, parse, project_override
from stapes.client import files
from stapes.client.client import AsyncClient
from stapes.client.config import Remote

T = TypeVar("T")


def _run(remote: Remote, work: Callable[[AsyncClient], Awaitable[T]]) -> T:
    async def main() -> T:
        client = AsyncClient.connect(remote.name, config(), project_override())
        try:
            return await work(client)
        finally:
            await client.close()

    return asyncio.run(main())


def _target(spec: str) -> tuple[Remote, str, str]:
    """'[remote:]name/path' -> (remote, instance, '/path'); a trailing '/' is kept (it means a directory)."""
    remote, rest = parse(spec)
    name, sep, path = rest.partition("/")
    if not name or not sep:
        raise BadRequest(f"{spec!r}: give the instance and a path inside it, such as c1/etc/hosts")
    return remote, name, "/" + path


def _mode(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        mode = int(value, 8)
    except ValueError:
        raise BadRequest(f"Invalid --mode {value!r}: octal, such as 0644") from None
    if not 0 <= mode <= 0o7777:
        raise BadRequest(f"Invalid --mode {value!r}: at most 7777")
    return mode


def register(cli: click.Group) -> None:
    @cli.group(name="file")
    def file_group() -> None:
        """Copy files into and out of instances (running or stopped)."""

    @file_group.command(name="push")
    @click.argument("args", nargs=-1, required=True)
    @click.option("-r", "--recursive", is_flag=True, help="Push directories and what they hold")
    @click.option("-p", "--create-dirs", is_flag=True, help="Create the missing directories above the target")
    @click.option("--uid", type=int, default=None, help="Owner inside the instance (default: root)")
    @click.option("--gid", type=int, default=None, help="Group inside the instance (default: root)")
    @click.option("--mode", default=None, help="Mode, in octal (default: the local file's)")
    @click.option("-a", "--append", is_flag=True, help="Append to the file instead of replacing it")
    def push(args: tuple[str, ...], recursive: bool, create_dirs: bool, uid: int | None, gid: int | None,
             mode: str | None, append: bool) -> None:
        """Copy local files into an instance.

        SOURCE... [REMOTE:]NAME/PATH; '-' as the source reads standard input.
        Modes are kept (with -r, of every file and directory), owners are root inside unless --uid/--gid.
        A target ending in '/' (or several sources, or -r) is a directory that receives the sources.

        \b
        Examples:
          stapes file push app.conf s1:c1/etc/app.conf --mode 0600 --uid 1000
          stapes file push -r -p ./site c1/srv/
          echo hello | stapes file push - c1/root/hello
          echo more | stapes file push --append - c1/root/hello
        """
        if len(args) < 2:
            raise BadRequest("Give at least one source and a target: stapes file push SOURCE... NAME/PATH")
        remote, instance, target = _target(args[-1])
        sources, wanted = list(args[:-1]), _mode(mode)
        into_dir = target.endswith("/") or len(sources) > 1 or recursive
        if "-" in sources and (len(sources) > 1 or into_dir):
            raise BadRequest("'-' (standard input) is the only source, and the target a file path")

        async def work(client: AsyncClient) -> None:
            conn = client.conn
            parent = target.rstrip("/") or "/" if into_dir else posixpath.dirname(target)
            if create_dirs and parent != "/":
                await files.mkdir(conn, instance, parent, uid=uid, gid=gid, parents=True)
            for source in sources:
                if source == "-":
                    await files.push_file(conn, instance, target, sys.stdin.buffer, uid=uid, gid=gid, mode=wanted,
                                          append=append)
                    continue
                local = Path(source)
                info = local.lstat()
                dest = posixpath.join(parent, local.name) if into_dir else target
                if stat.S_ISDIR(info.st_mode):
                    if not recursive:
                        raise BadRequest(f"{source} is a directory: push it with -r")
                    await _push_tree(conn, instance, local, dest, uid, gid, wanted)
                else:
                    await _push_one(conn, instance, local, dest, uid, gid, wanted, append)

        _run(remote, work)

    @file_group.command(name="pull")
    @click.argument("args", nargs=-1, required=True)
    @click.option("-r", "--recursive", is_flag=True, help="Pull directories and what they hold")
    @click.option("-p", "--create-dirs", is_flag=True, help="Create the missing local directories")
    def pull(args: tuple[str, ...], recursive: bool, create_dirs: bool) -> None:
        """Copy files out of an instance.

        [REMOTE:]NAME/PATH... TARGET; '-' as the target writes standard output. Permission bits are kept
        but setuid, setgid and sticky are dropped (as Incus's client does); owners are not copied; symlinks
        are pulled as symlinks. A local symlink where a pulled file or directory goes is refused (delete it
        first), never followed.

        \b
        Examples:
          stapes file pull s1:c1/etc/hosts ./hosts
          stapes file pull -r c1/var/log ./logs/
          stapes file pull c1/etc/os-release -
        """
        if len(args) < 2:
            raise BadRequest("Give at least one source and a target: stapes file pull NAME/PATH... TARGET")
        dest_arg, specs = args[-1], [_target(a) for a in args[:-1]]
        if dest_arg == "-" and (len(specs) > 1 or recursive):
            raise BadRequest("'-' (standard output) takes one file")
        dest = Path(dest_arg)
        if create_dirs and dest_arg != "-":
            (dest if len(specs) > 1 or dest_arg.endswith("/") else dest.parent).mkdir(parents=True, exist_ok=True)
        into_dir = dest_arg != "-" and (dest.is_dir() or len(specs) > 1 or dest_arg.endswith("/"))
        for remote, instance, path in specs:
            local = dest / posixpath.basename(path.rstrip("/") or "/") if into_dir else dest

            async def work(client: AsyncClient, instance: str = instance, path: str = path, local: Path = local
                           ) -> None:
                if dest_arg == "-":
                    await _pull_stdout(client.conn, instance, path)
                else:
                    await _pull_tree(client.conn, instance, path, local, recursive)

            _run(remote, work)

    @file_group.command(name="delete")
    @click.argument("specs", nargs=-1, required=True)
    @click.option("-f", "--force", is_flag=True, help="Delete directories with what they hold")
    def delete(specs: tuple[str, ...], force: bool) -> None:
        """Delete files and directories in an instance (a directory with what it holds needs -f).

        \b
        Examples:
          stapes file delete c1/root/hello
          stapes file delete -f s1:c1/srv/site
        """
        for spec in specs:
            remote, instance, path = _target(spec)

            async def work(client: AsyncClient, instance: str = instance, path: str = path) -> None:
                await files.delete(client.conn, instance, path, force=force)

            _run(remote, work)

    @file_group.command(name="mkdir")
    @click.argument("specs", nargs=-1, required=True)
    @click.option("-p", "--parents", is_flag=True, help="Create the missing directories above it too")
    @click.option("--uid", type=int, default=None, help="Owner inside the instance (default: root)")
    @click.option("--gid", type=int, default=None, help="Group inside the instance (default: root)")
    @click.option("--mode", default=None, help="Mode, in octal (default: 0755)")
    def mkdir(specs: tuple[str, ...], parents: bool, uid: int | None, gid: int | None, mode: str | None) -> None:
        """Create directories in an instance.

        \b
        Examples:
          stapes file mkdir c1/srv/data
          stapes file mkdir -p --uid 1000 --mode 0700 s1:c1/home/app/.cache/x
        """
        wanted = _mode(mode)
        for spec in specs:
            remote, instance, path = _target(spec)

            async def work(client: AsyncClient, instance: str = instance, path: str = path) -> None:
                await files.mkdir(client.conn, instance, path, uid=uid, gid=gid, mode=wanted, parents=parents)

            _run(remote, work)

    @cli.command(name="publish")
    @click.argument("source")
    @click.argument("rest", nargs=-1)
    @click.option("--alias", "aliases", multiple=True, help="Alias for the new image (repeatable)")
    @click.option("--public", is_flag=True, help="Let untrusted clients see the image")
    @click.option("-f", "--force", is_flag=True, help="Stop a running instance first, and start it again after")
    @click.option("-q", "--quiet", is_flag=True)
    def publish(source: str, rest: tuple[str, ...], aliases: tuple[str, ...], public: bool, force: bool,
                quiet: bool) -> None:
        """Make an image of a stopped instance or of a snapshot.

        [REMOTE:]NAME[/SNAPSHOT] [REMOTE:] [KEY=VALUE...]: the image holds the instance's files (owners,
        modes, xattrs, device nodes) and its metadata.yaml with the given properties; it is made on the
        instance's server. A running instance needs --force (stopped, published, started again).

        \b
        Examples:
          stapes publish c1 --alias web-base
          stapes publish s1:c1/snap0 s1: --alias web-v1 description="web, first cut"
          stapes publish c1 --alias now --force && stapes launch now c2
        """
        remote, name = parse(source)
        target = rest[0] if rest and "=" not in rest[0] else None
        properties = key_values([r for r in rest if r is not target], "property")
        if target is not None and target.rstrip(":") != remote.name:
            raise BadRequest(f"Publishing to another server ({target}) is not supported: publish on "
                             f"{remote.name}: (copying images between servers is not supported yet)")

        async def work(client: AsyncClient) -> Any:
            restart = False
            if "/" not in name:
                instance = await client.instance(name)
                if instance["status"] not in ("Stopped", "STOPPED"):
                    if not force:
                        raise BadRequest(f"The instance {name!r} is running: stop it, or use --force to have it "
                                         "stopped and started again")
                    await client.change_state(name, "stop", timeout=-1, force=True)
                    restart = True
            try:
                with render.progress(f"Publishing {name}", quiet) as update:
                    return await files.publish(client.conn, name, aliases=list(aliases), properties=properties,
                                               public=public, progress=update)
            finally:
                if restart:
                    await client.change_state(name, "start")

        op = _run(remote, work)
        render.success(f"Instance published with fingerprint: {op['metadata']['fingerprint']}", quiet)


async def _push_one(conn: Any, instance: str, local: Path, dest: str, uid: int | None, gid: int | None,
                    mode: int | None, append: bool) -> None:
    info = local.lstat()
    if stat.S_ISLNK(info.st_mode):
        await files.symlink(conn, instance, dest, os.readlink(local), uid=uid, gid=gid)
        return
    if not stat.S_ISREG(info.st_mode):
        raise BadRequest(f"{local} is not a regular file, directory or symlink")
    with local.open("rb") as handle:
        await files.push_file(conn, instance, dest, handle, uid=uid, gid=gid,
                              mode=stat.S_IMODE(info.st_mode) if mode is None else mode, append=append)


async def _push_tree(conn: Any, instance: str, local: Path, dest: str, uid: int | None, gid: int | None,
                     mode: int | None) -> None:
    """A local directory and everything below it, each with its own mode (--mode applies to files only)."""
    await files.mkdir(conn, instance, dest, uid=uid, gid=gid, mode=stat.S_IMODE(local.lstat().st_mode))
    for entry in sorted(local.iterdir()):
        target = posixpath.join(dest, entry.name)
        if entry.is_dir() and not entry.is_symlink():
            await _push_tree(conn, instance, entry, target, uid, gid, mode)
        elif entry.is_symlink() or entry.is_file():
            await _push_one(conn, instance, entry, target, uid, gid, mode, False)


async def _pull_stdout(conn: Any, instance: str, path: str) -> None:
    out = sys.stdout.buffer

    def sink(info: files.RemoteFile) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            out.write(data)

        return write

    info, other = await files.pull(conn, instance, path, sink)
    if info.kind != "file":
        raise BadRequest(f"{path} is a {info.kind}: only a file can be pulled to standard output")
    out.flush()


MAX_PULL_DEPTH = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_entry_name(name: object) -> str:
    """A name from the server's directory listing: one path component, nothing else. Pure: unit-tested."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise BadRequest(f"The server listed an invalid file name {str(name)[:64]!r}: refused")
    return name


def _lstat_at(parent: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


async def _pull_tree(conn: Any, instance: str, path: str, local: Path, recursive: bool) -> None:
    """Pull `path` to `local`. The directory above `local` is the user's (opened as given); below it every
    step is taken by name relative to an open directory (O_NOFOLLOW): a symlink found where a file or a
    directory goes is refused, never followed, so a tree the container controls cannot lead a pull out of
    the destination."""
    name = local.name
    if name in ("", ".", ".."):
        raise BadRequest(f"{local}: give the file's local name, or a directory to pull into")
    try:
        parent = os.open(local.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadRequest(f"No local directory {str(local.parent)!r} to pull into: create it, or add -p") from None
    try:
        await _pull_at(conn, instance, path, parent, name, str(local), recursive, 0)
    finally:
        os.close(parent)


async def _pull_at(conn: Any, instance: str, path: str, parent: int, name: str, shown: str, recursive: bool,
                   depth: int) -> None:
    if depth > MAX_PULL_DEPTH:
        raise BadRequest(f"{shown}: more than {MAX_PULL_DEPTH} directories deep")
    temp: list[str] = []
    fds: list[int] = []

    def sink(info: files.RemoteFile) -> Callable[[bytes], None]:
        existing = _lstat_at(parent, name)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise BadRequest(f"{shown} is a directory")
        if existing is not None and stat.S_ISLNK(existing.st_mode):
            raise BadRequest(f"{shown} is a symlink: it is not written through (delete it first)")
        # A random name created with O_EXCL|O_NOFOLLOW, 0600 while it downloads: nothing another local user
        # planted is opened, and nobody else reads the bytes before they are complete.
        candidate = f".{name[:200]}.stapes-pull.{secrets.token_hex(8)}"
        fds.append(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=parent))
        temp.append(candidate)

        def write(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fds[0], view):]

        return write

    try:
        info, other = await files.pull(conn, instance, path, sink)
        if info.kind == "file":
            # Permission bits only: setuid, setgid and sticky are dropped (as Incus's client does).
            os.fchmod(fds[0], info.mode & 0o777)
            os.close(fds.pop())
            os.replace(temp[0], name, src_dir_fd=parent, dst_dir_fd=parent)
            temp.clear()
            return
    finally:
        for fd in fds:
            os.close(fd)
        for leftover in temp:
            with contextlib.suppress(OSError):
                os.unlink(leftover, dir_fd=parent)
    if info.kind == "symlink":
        assert isinstance(other, str)
        existing = _lstat_at(parent, name)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise BadRequest(f"{shown} is a directory")
        link = f".{name[:200]}.stapes-pull.{secrets.token_hex(8)}"
        os.symlink(other, link, dir_fd=parent)
        try:
            os.replace(link, name, src_dir_fd=parent, dst_dir_fd=parent)  # replaces a link or file, not through it
        except OSError:
            os.unlink(link, dir_fd=parent)
            raise
        return
    if not recursive:
        raise BadRequest(f"{path} is a directory: pull it with -r")
    assert isinstance(other, list)
    names = [check_entry_name(n) for n in other]
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent)
    try:
        here = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as err:
        existing = _lstat_at(parent, name)
        if existing is not None and stat.S_ISLNK(existing.st_mode):
            raise BadRequest(f"{shown} is a symlink: a directory is not pulled through it (delete it first)"
                             ) from None
        raise BadRequest(f"{shown}: {os.strerror(err.errno or 0)} (a directory goes there)") from None
    try:
        for entry in names:
            await _pull_at(conn, instance, posixpath.join(path, entry), here, entry, f"{shown}/{entry}", recursive,
                           depth + 1)
        os.fchmod(here, info.mode & 0o777)
    finally:
        os.close(here)
