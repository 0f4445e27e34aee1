"""Moving volumes' files over the fs channel: the transfer types every pool driver can use.

- tar-stream (Stapes only): GNU tar at both ends, raw binary messages in between. One pass, no round trips;
  keeps owners, modes, xattrs, hard links, sparse files and device nodes.
- rsync (Incus-compatible): the receiver runs `rsync --server` on the channel, the sender runs rsync with a
  remote shell that is joined to the channel, exactly the arguments Incus uses, so either end can be Incus.

A driver with a faster way of its own (btrfs send/receive) declares it beside these, in its own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from stapes.api.config_keys import parse_size
from stapes.server.progress import Progress
from stapes.server.storage.bound import ReceiveBound
from stapes.server.streams import (
    Admit,
    Channel,
    channel_to_socket,
    channel_to_stdin,
    channel_to_tool,
    finish,
    kill,
    spawn_tool,
    stdout_to_channel,
    tool_to_channel,
)

TAR_COMMON = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse"]


async def tar_send(path: Path, channel: Channel, progress: Progress | None, leave_out: Sequence[str] = ()) -> None:
    """`leave_out`: names of files directly in `path` that are not sent (they travelled already)."""
    excluded = [f"--exclude=./{name}" for name in leave_out]
    await tool_to_channel(["tar", "-C", str(path), "-cf", "-", *TAR_COMMON, "--anchored", *excluded, "--no-anchored",
                           "--one-file-system", "."], channel, progress, "Sending the files (tar)")


async def tar_receive(path: Path, channel: Channel, progress: Progress | None, admit: Admit | None = None) -> None:
    await channel_to_tool(["tar", "-C", str(path), "-xf", "-", *TAR_COMMON, "--same-permissions", "--same-owner"],
                          channel, progress, "Receiving the files (tar)", admit)


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
    shell = f"{sys.executable} -m stapes.server.storage.netcat {theirs.fileno()}"
    limit = [f"--bwlimit={max(1, parse_size(bwlimit) // 1024)}"] if bwlimit else []
    argv = ["rsync", "-ar", "--devices", "--numeric-ids", "--partial", "--sparse", *limit,
            *_rsync_feature_args(features), f"{path}/", "localhost:/tmp/foo", "-e", shell]
    try:
        proc = await spawn_tool(argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                                stderr=asyncio.subprocess.PIPE, pass_fds=(theirs.fileno(),))
    finally:
        theirs.close()
    try:
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        receiving = asyncio.create_task(channel_to_socket(channel, writer))
        try:
            await stdout_to_channel(reader, channel, progress)
            await finish(proc, "Sending the files (rsync)")
            await receiving
        finally:
            receiving.cancel()
            writer.close()
    finally:
        ours.close()
        await kill(proc)


async def rsync_receive(path: Path, channel: Channel, progress: Progress | None, features: Sequence[str],
                        admit: Admit | None = None) -> None:
    argv = ["rsync", "--server", "-vlogDtpre.iLsfx", "--numeric-ids", "--devices", "--partial", "--sparse",
            "--modify-window=-1", *_rsync_feature_args(features), ".", str(path)]
    proc = await spawn_tool(argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                            stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    sending = asyncio.create_task(stdout_to_channel(proc.stdout, channel, None))
    try:
        await channel_to_stdin(channel, proc.stdin, progress, admit)
        await sending
        await finish(proc, "Receiving the files (rsync)")
    finally:
        sending.cancel()
        await kill(proc)
        with contextlib.suppress(BaseException):
            await sending


class Transport:
    """One migration's data path on the fs channel: streams sent or received one after the other. A pool
    driver declares the transports it can send and receive (its `transports`); the name is what the two
    ends negotiate."""

    name: ClassVar[str]

    def __init__(self, channel: Channel, progress: Progress | None, features: Sequence[str],
                 bwlimit: str | None = None) -> None:
        self.channel = channel
        self.progress = progress
        self.features = features
        self.bwlimit = bwlimit
        self.bound: ReceiveBound | None = None  # a receiver's limit on what it writes (set by its user)

    async def send(self, path: Path) -> None:
        raise NotImplementedError

    async def receive(self, path: Path, *, snapshot: bool) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Remove whatever the transport made for itself (temporary snapshots)."""


class TarStream(Transport):
    name: ClassVar[str] = "tar-stream"

    async def send(self, path: Path) -> None:
        await tar_send(path, self.channel, self.progress)

    async def receive(self, path: Path, *, snapshot: bool) -> None:
        await tar_receive(path, self.channel, self.progress, self.bound.stream if self.bound else None)


class Rsync(Transport):
    name: ClassVar[str] = "rsync"

    async def send(self, path: Path) -> None:
        await rsync_send(path, self.channel, self.progress, self.features, self.bwlimit)

    async def receive(self, path: Path, *, snapshot: bool) -> None:
        # rsync sends deltas: no declared size to hold it to, the pool's free space only.
        await rsync_receive(path, self.channel, self.progress, self.features,
                            self.bound.delta if self.bound else None)
