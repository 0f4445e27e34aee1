"""Moving volumes' files over the fs channel.

- tar-stream (Stapes only): GNU tar at both ends, raw binary messages in between. One pass, no round trips;
  keeps owners, modes, xattrs, hard links, sparse files and device nodes.
- rsync (Incus-compatible): the receiver runs `rsync --server` on the channel, the sender runs rsync with a
  remote shell that is joined to the channel, exactly the arguments Incus uses, so either end can be Incus.
- btrfs (both pools btrfs): btrfs send | btrfs receive, incremental along the snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import socket
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stapes.api.config_keys import parse_size
from stapes.api.errors import InternalError
from stapes.server import process
from stapes.server.migration.channel import Channel
from stapes.server.migration.progress import Progress
from stapes.server.storage.btrfs import delete_subvolume

_SENT_NAME = re.compile(r"^\.stapes-send-[0-9a-f]{12}$")
CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
TAR_COMMON = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse"]


async def _spawn(argv: list[str], **kwargs: Any) -> _Tool:
    """Pipes of 1 MiB instead of 64 KiB: a quarter of the wake-ups and system calls per byte moved. A process
    group of its own: rsync forks (its receiver writes files from a second process), and a transfer that is
    abandoned must stop writing before its files are removed."""
    proc = await process.spawn(argv, start_new_session=True, **kwargs)
    for stream in (proc.stdin, proc.stdout):
        transport = getattr(stream, "transport", None) or getattr(stream, "_transport", None)
        pipe = transport.get_extra_info("pipe") if transport is not None else None
        if pipe is not None:
            # A fast tool may already have written everything and the pipe be closed: nothing to tune then.
            with contextlib.suppress(OSError, ValueError):
                fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
    return _Tool(proc, _Stderr(proc) if proc.stderr is not None else None)


async def _stdout_to_channel(stream: asyncio.StreamReader, channel: Channel, progress: Progress | None) -> None:
    while chunk := await stream.read(CHUNK):
        await channel.send(chunk)
        if progress is not None:
            progress.advance(len(chunk))
    await channel.barrier()


async def _channel_to_stdin(channel: Channel, stdin: asyncio.StreamWriter, progress: Progress | None) -> None:
    try:
        async for chunk in channel.stream():
            stdin.write(chunk)
            await stdin.drain()
            if progress is not None:
                progress.advance(len(chunk))
    finally:
        with contextlib.suppress(Exception):
            stdin.close()


STDERR_KEEP = 64 * 1024


class _Stderr:
    """A tool's stderr, drained while it runs (a chatty tool must never block on a full pipe while we wait
    for its stdout), keeping the last STDERR_KEEP bytes for the error message."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._tail = bytearray()
        self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while chunk := await self._stream.read(65536):
            self._tail += chunk
            del self._tail[:-STDERR_KEEP]

    async def text(self) -> str:
        with contextlib.suppress(Exception):
            await self._task
        return self._tail.decode(errors="replace")

    def cancel(self) -> None:
        self._task.cancel()


@dataclass
class _Tool:
    """A tool spawned for a transfer, with its stderr drained while it runs."""

    proc: asyncio.subprocess.Process
    stderr: _Stderr | None

    @property
    def stdin(self) -> asyncio.StreamWriter | None:
        return self.proc.stdin

    @property
    def stdout(self) -> asyncio.StreamReader | None:
        return self.proc.stdout


async def _finish(tool: _Tool, what: str) -> None:
    err = await tool.stderr.text() if tool.stderr is not None else ""
    code = await tool.proc.wait()
    process.forget(tool.proc)
    if code != 0:
        raise InternalError(f"{what} failed: {root_cause(err) or f'exit status {code}'}")


_GENERIC = ("Exiting with failure status", "Error is not recoverable", "error in rsync protocol data stream",
            "rsync error:", "connection unexpectedly closed")


def root_cause(stderr: str) -> str:
    """The first line that says what went wrong, not the tool's closing summary (pure: unit-tested)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if not any(generic in line for generic in _GENERIC):
            return line
    return lines[-1] if lines else ""


async def _kill(tool: _Tool) -> None:
    if tool.proc.returncode is None:  # not reaped yet, so the group id is still the tool's own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(tool.proc.pid, signal.SIGKILL)
        await tool.proc.wait()
    if tool.stderr is not None:
        tool.stderr.cancel()
    process.forget(tool.proc)


async def tar_send(path: Path, channel: Channel, progress: Progress | None) -> None:
    proc = await _spawn(["tar", "-C", str(path), "-cf", "-", *TAR_COMMON, "--one-file-system", "."],
                               stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                               stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        await _stdout_to_channel(proc.stdout, channel, progress)
        await _finish(proc, "Sending the files (tar)")
    finally:
        await _kill(proc)


async def tar_receive(path: Path, channel: Channel, progress: Progress | None) -> None:
    proc = await _spawn(["tar", "-C", str(path), "-xf", "-", *TAR_COMMON, "--same-permissions",
                                "--same-owner"],
                               stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                               stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdin is not None
        await _channel_to_stdin(channel, proc.stdin, progress)
        await _finish(proc, "Receiving the files (tar)")
    finally:
        await _kill(proc)


def _rsync_feature_args(features: Sequence[str]) -> list[str]:
    args: list[str] = []
    if "xattrs" in features:
        args += ["--xattrs", "--filter=-x security.selinux"]
    if "delete" in features:
        args.append("--delete")
    if "compress" in features:
        args += ["--compress", "--compress-level=2"]
    if "stapesHardLinks" in features:
        args.append("--hard-links")
    return args


async def rsync_send(path: Path, channel: Channel, progress: Progress | None, features: Sequence[str],
                     bwlimit: str | None = None) -> None:
    """rsync's remote shell is joined to us by a socketpair it inherits: no socket any local user could
    reach or race (as an abstract or filesystem socket could be)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    shell = f"{sys.executable} -m stapes.server.migration.netcat {theirs.fileno()}"
    limit = [f"--bwlimit={max(1, parse_size(bwlimit) // 1024)}"] if bwlimit else []
    argv = ["rsync", "-ar", "--devices", "--numeric-ids", "--partial", "--sparse", *limit,
            *_rsync_feature_args(features), f"{path}/", "localhost:/tmp/foo", "-e", shell]
    try:
        proc = await _spawn(argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                            stderr=asyncio.subprocess.PIPE, pass_fds=(theirs.fileno(),))
    finally:
        theirs.close()
    try:
        reader, writer = await asyncio.open_unix_connection(sock=ours)

        async def to_socket() -> None:
            try:
                async for chunk in channel.stream():
                    writer.write(chunk)
                    await writer.drain()
            finally:
                with contextlib.suppress(Exception):
                    writer.write_eof()

        receiving = asyncio.create_task(to_socket())
        try:
            await _stdout_to_channel(reader, channel, progress)
            await _finish(proc, "Sending the files (rsync)")
            await receiving
        finally:
            receiving.cancel()
            writer.close()
    finally:
        ours.close()
        await _kill(proc)


async def rsync_receive(path: Path, channel: Channel, progress: Progress | None, features: Sequence[str]) -> None:
    argv = ["rsync", "--server", "-vlogDtpre.iLsfx", "--numeric-ids", "--devices", "--partial", "--sparse",
            "--modify-window=-1", *_rsync_feature_args(features), ".", str(path)]
    proc = await _spawn(argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                               stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    sending = asyncio.create_task(_stdout_to_channel(proc.stdout, channel, None))
    try:
        await _channel_to_stdin(channel, proc.stdin, progress)
        await sending
        await _finish(proc, "Receiving the files (rsync)")
    finally:
        sending.cancel()
        await _kill(proc)
        with contextlib.suppress(BaseException):
            await sending


class Transport:
    """One migration's data path on the fs channel: streams sent or received one after the other."""

    def __init__(self, channel: Channel, progress: Progress | None, features: Sequence[str],
                 bwlimit: str | None = None) -> None:
        self.channel = channel
        self.progress = progress
        self.features = features
        self.bwlimit = bwlimit

    async def send(self, path: Path) -> None:
        raise NotImplementedError

    async def receive(self, path: Path, *, snapshot: bool) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Remove whatever the transport made for itself (temporary snapshots)."""


class TarStream(Transport):
    async def send(self, path: Path) -> None:
        await tar_send(path, self.channel, self.progress)

    async def receive(self, path: Path, *, snapshot: bool) -> None:
        await tar_receive(path, self.channel, self.progress)


class Rsync(Transport):
    async def send(self, path: Path) -> None:
        await rsync_send(path, self.channel, self.progress, self.features, self.bwlimit)

    async def receive(self, path: Path, *, snapshot: bool) -> None:
        await rsync_receive(path, self.channel, self.progress, self.features)


class BtrfsSendReceive(Transport):
    """btrfs send | btrfs receive. Each stream is sent from a read-only snapshot taken for the purpose, with
    the previous one as its parent, so a snapshot series costs only its differences. The receiver keeps
    received snapshots as they arrive (their received UUID makes them parents for the next stream) and turns
    the last stream, the instance's volume, into a writable subvolume."""

    def __init__(self, channel: Channel, progress: Progress | None, features: Sequence[str],
                 bwlimit: str | None = None) -> None:
        super().__init__(channel, progress, features, bwlimit)
        self._sent: list[Path] = []

    async def send(self, path: Path) -> None:
        frozen = path.parent / f".stapes-send-{uuid.uuid4().hex[:12]}"
        await process.run(["btrfs", "subvolume", "snapshot", "-r", str(path), str(frozen)])
        self._sent.append(frozen)
        # `send -p` finds the parent through the UUID tree, which a new snapshot joins only at commit.
        await process.run(["btrfs", "filesystem", "sync", str(path.parent)])
        parent = ["-p", str(self._sent[-2])] if len(self._sent) > 1 else []
        proc = await _spawn(["btrfs", "send", "-q", *parent, str(frozen)], stdin=asyncio.subprocess.DEVNULL,
                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            await _stdout_to_channel(proc.stdout, self.channel, self.progress)
            await _finish(proc, "Sending the files (btrfs send)")
        finally:
            await _kill(proc)

    async def receive(self, path: Path, *, snapshot: bool) -> None:
        # Received into the final directory: a read-only subvolume cannot move to another directory later.
        # --chroot: whatever paths the stream names, it writes below this directory only.
        before = set(path.parent.iterdir())
        try:
            proc = await _spawn(["btrfs", "receive", "-q", "--chroot", str(path.parent)],
                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                                stderr=asyncio.subprocess.PIPE)
            try:
                assert proc.stdin is not None
                await _channel_to_stdin(self.channel, proc.stdin, self.progress)
                await _finish(proc, "Receiving the files (btrfs receive)")
            finally:
                await _kill(proc)
            new = set(path.parent.iterdir()) - before
            if len(new) != 1 or not _SENT_NAME.match(next(iter(new)).name) or not next(iter(new)).is_dir():
                raise InternalError("Protocol error: the btrfs stream did not hold exactly one subvolume as "
                                    f"Stapes sends it (got {sorted(p.name for p in new)[:3]})")
        except BaseException:
            for partial in set(path.parent.iterdir()) - before:
                with contextlib.suppress(Exception):
                    await delete_subvolume(partial)
            raise
        received = new.pop()
        # The next stream's `receive` looks this one up as its parent in the UUID tree: commit it first.
        await process.run(["btrfs", "filesystem", "sync", str(path.parent)])
        await delete_subvolume(path)  # the empty subvolume made for us
        if snapshot:
            received.rename(path)
        else:
            await process.run(["btrfs", "subvolume", "snapshot", str(received), str(path)])
            self._sent.append(received)  # removed at close: nothing follows the volume itself

    async def close(self) -> None:
        for frozen in self._sent:
            with contextlib.suppress(Exception):
                await delete_subvolume(frozen)


TRANSPORTS: dict[str, type[Transport]] = {"tar-stream": TarStream, "rsync": Rsync, "btrfs": BtrfsSendReceive}


def open_transport(name: str, channel: Channel, progress: Progress | None, features: Sequence[str],
                   bwlimit: str | None = None) -> Transport:
    return TRANSPORTS[name](channel, progress, features, bwlimit)
