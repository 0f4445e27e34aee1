"""Moving volumes' files over the fs channel: the transfer types every pool driver can use.

- tar-stream (Stapes only): GNU tar at both ends, raw binary messages in between. One pass, no round trips;
  keeps owners, modes, xattrs, hard links, sparse files and device nodes.
- rsync (Incus-compatible): the receiver runs `rsync --server` on the channel, the sender runs rsync with a
  remote shell that is joined to the channel, exactly the arguments Incus uses, so either end can be Incus.

A driver with a faster way of its own (btrfs send/receive) declares it beside these, in its own module, and
Incus's way for a VM's volume (block-and-rsync: the config directory by rsync, then the raw disk) is in block.py.

Each transport declares the volume contents it carries (`carries`), whether it updates an existing copy in place
(`refreshes`), and the Incus fs type it speaks for a content (`incus`): the migration protocol negotiates from
these declarations only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from stapes.api.config_keys import parse_size
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.progress import Progress
from stapes.server.storage.bound import ReceiveBound
from stapes.server.streams import (
    Admit,
    Channel,
    channel_to_socket,
    channel_to_stdin,
    channel_to_tool,
    drop,
    finish,
    kill,
    spawn_tool,
    stdout_to_channel,
    tool_to_channel,
)


def _data_bytes(path: str, size: int) -> int:
    """A sparse file's data, its holes left out (SEEK_DATA/SEEK_HOLE)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return size
    try:
        total, offset = 0, 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole after offset
                break
            offset = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            total += offset - start
        return total
    finally:
        os.close(fd)


def payload(path: Path) -> tuple[int, int]:
    """(bytes, entries) of a volume directory as a stream carries it, about: every entry's apparent size (as
    `du --apparent-size`, hard links once), but a sparse file's data only (tar --sparse and btrfs send skip the
    holes: a VM's 10 GiB disk holding 300 MiB is 300 MiB), and the number of entries (as `du --inodes`)."""
    total, entries = 0, 0
    seen: set[tuple[int, int]] = set()

    def count(name: str) -> None:
        nonlocal total, entries
        try:
            info = os.lstat(name)
        except OSError:
            return
        if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in seen:
                return
            seen.add((info.st_dev, info.st_ino))
        entries += 1
        if stat.S_ISREG(info.st_mode) and info.st_blocks * 512 < info.st_size:
            total += _data_bytes(name, info.st_size)  # sparse, or compressed: ask for the holes
        else:
            total += info.st_size

    count(str(path))
    for top, dirs, files in os.walk(path):  # follows no links
        for name in (*dirs, *files):
            count(os.path.join(top, name))
    return total, entries


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
                     bwlimit: str | None = None, extra: Sequence[str] = ()) -> None:
    """rsync's remote shell is joined to us by a socketpair it inherits: no socket any local user could
    reach or race (as an abstract or filesystem socket could be). `extra`: more arguments (excludes)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    shell = f"{sys.executable} -m stapes.server.storage.netcat {theirs.fileno()}"
    limit = [f"--bwlimit={max(1, parse_size(bwlimit) // 1024)}"] if bwlimit else []
    argv = ["rsync", "-ar", "--devices", "--numeric-ids", "--partial", "--sparse", *limit,
            *_rsync_feature_args(features), *extra, f"{path}/", "localhost:/tmp/foo", "-e", shell]
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
            drop(writer)  # before the raw close below (streams.drop)
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
    carries: ClassVar[frozenset[str]] = frozenset({"filesystem", "block"})  # the volume contents it can move
    refreshes: ClassVar[bool] = False  # updates an existing copy in place (a refresh), sending what changed
    incus: ClassVar[dict[str, pb.MigrationFSType]] = {}  # content -> Incus's fs type, where Incus speaks it
    leaves_disk: ClassVar[bool] = False  # can send a block volume without its disk (`disk_elsewhere`)

    def __init__(self, channel: Channel, progress: Progress | None, features: Sequence[str],
                 bwlimit: str | None = None) -> None:
        self.channel = channel
        self.progress = progress
        self.features = features
        self.bwlimit = bwlimit
        self.bound: ReceiveBound | None = None  # a receiver's limit on what it writes (set by its user)
        # A sender's volumes whose block disk moves otherwise (a live VM's mirror): their files and the disk's
        # declared size only (the receiver makes the disk that long, all hole).
        self.disk_elsewhere: set[Path] = set()

    async def send(self, path: Path) -> None:
        raise NotImplementedError

    async def receive(self, path: Path, *, snapshot: bool, size: int | None = None) -> None:
        """`size`: a block volume's declared size (the header's volumeSize, a snapshot's `size`), which
        transports that write the disk on their own hold the source to."""
        raise NotImplementedError

    async def close(self) -> None:
        """Remove whatever the transport made for itself (temporary snapshots)."""


class TarStream(Transport):
    name: ClassVar[str] = "tar-stream"

    async def send(self, path: Path) -> None:
        await tar_send(path, self.channel, self.progress)

    async def receive(self, path: Path, *, snapshot: bool, size: int | None = None) -> None:
        await tar_receive(path, self.channel, self.progress, self.bound.stream if self.bound else None)


class Rsync(Transport):
    """Between Stapes servers it moves any volume directory (a VM's disk file too, sparse); to Incus it is the
    fs type of filesystem volumes only (Incus moves a VM's volume with block-and-rsync)."""

    name: ClassVar[str] = "rsync"
    refreshes: ClassVar[bool] = True
    incus: ClassVar[dict[str, pb.MigrationFSType]] = {"filesystem": pb.RSYNC}

    async def send(self, path: Path) -> None:
        await rsync_send(path, self.channel, self.progress, self.features, self.bwlimit)

    async def receive(self, path: Path, *, snapshot: bool, size: int | None = None) -> None:
        # rsync sends deltas: no declared size to hold it to, the pool's free space only.
        await rsync_receive(path, self.channel, self.progress, self.features,
                            self.bound.delta if self.bound else None)
