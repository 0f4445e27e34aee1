"""A live move's checkpoint as the target receives it: file by file, each checked before it exists on disk.

Volumes arrive through GNU tar, which keeps owners, modes, links and device nodes (a system container needs
them). A checkpoint needs none of that, and CRIU reads it as root: a device node, a FIFO or a link among its
files would have the restore read host resources into the container. So the checkpoint's tar is read here,
with Python's `tarfile` streaming one member after the other: only regular files whose names the driver
declares (`StateFiles`), each created once (`O_EXCL`, `O_NOFOLLOW`) with the driver's mode, owned by the
server; the one link allowed is a pre-copy round's `parent`, naming an earlier round. Every byte written
(these files, and the pages streamed while the checkpoint was written) counts against a `StateBudget`: the
driver's bound for one checkpoint of the instance, and the free space of the disk, checked while receiving.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import queue
import tarfile
from collections.abc import Collection
from pathlib import Path

from stapes.api.errors import BadRequest
from stapes.server.instances.driver import StateFiles
from stapes.server.storage.bound import reserve_for
from stapes.server.streams import Channel

MIB = 1 << 20
CHECK_EVERY = 4 * MIB  # the free space is looked at again after this many bytes
COPY = 1 * MIB
MAX_TRAILING = 1 * MIB  # after a tar's end: its padding to a whole record (10 KiB for GNU tar)
_KINDS = {tarfile.LNKTYPE: "hard link", tarfile.SYMTYPE: "symbolic link", tarfile.CHRTYPE: "character device",
          tarfile.BLKTYPE: "block device", tarfile.DIRTYPE: "directory", tarfile.FIFOTYPE: "FIFO",
          tarfile.CONTTYPE: "contiguous file"}


class StateRefused(BadRequest):
    """The source's checkpoint breaks a rule: the move fails before the restore."""


def refused(what: str) -> StateRefused:
    return StateRefused(f"The source's checkpoint {what}: refused")


class StateBudget:
    """What one live move may write into the target's working directory: at most `per_round` bytes in each
    directory (the final checkpoint, each pre-copy round) and `total` in all, and never into the last
    reserve of the disk's free space (as a volume's receive keeps it, storage/bound.py)."""

    def __init__(self, where: Path, per_round: int, total: int) -> None:
        self.where = where
        self.per_round = per_round
        self.total = total
        self.arrived = 0
        self.rounds: dict[str, int] = {}
        self._unchecked = CHECK_EVERY  # the first bytes are checked

    def admit(self, directory: str, size: int) -> None:
        """Raises StateRefused before `size` more bytes are written into `directory` if they would break the
        bound (called from the receiving thread or the event loop: statvfs is quick and local)."""
        used = self.rounds.get(directory, 0) + size
        if used > self.per_round or self.arrived + size > self.total:
            raise refused(f"is larger than this instance's memory allows ({used // MIB} MiB in {directory}, at most "
                          f"{self.per_round // MIB} MiB in one round and {self.total // MIB} MiB in all)")
        self.rounds[directory] = used
        self.arrived += size
        self._unchecked += size
        if self._unchecked >= CHECK_EVERY:
            self._unchecked = 0
            stat = os.statvfs(self.where)
            free, disk = stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize
            if free < reserve_for(disk) + size + CHECK_EVERY:
                raise refused(f"does not fit on this server's disk ({free // MIB} MiB free after "
                              f"{self.arrived // MIB} MiB arrived, {reserve_for(disk) // MIB} MiB stay free)")


class _Feed(io.RawIOBase):
    """The channel's messages as a file, read by the extracting thread (None from the loop ends it)."""

    def __init__(self) -> None:
        self.messages: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._current = memoryview(b"")
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._current and not self._ended:
            message = self.messages.get()
            if message is None:
                self._ended = True
            else:
                self._current = memoryview(message)
        size = min(len(buffer), len(self._current))
        buffer[:size] = self._current[:size]
        self._current = self._current[size:]
        return size


def _kind(member: tarfile.TarInfo) -> str:
    return _KINDS.get(member.type, f"member of type {member.type!r}")


def _write(directory: Path, name: str, source: io.BufferedReader | None, size: int, mode: int) -> None:
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, mode & 0o755)  # the driver's mode, never set-id, whatever the tar said
        left = size
        while left and source is not None:
            data = source.read(min(COPY, left))
            if not data:
                raise refused(f"ends in the middle of {name!r}")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            left -= len(data)
    finally:
        os.close(fd)


def _extract(directory: Path, feed: _Feed, files: StateFiles, budget: StateBudget, links: Collection[str]) -> None:
    """The checks, member by member, before anything of a member is written."""
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=feed, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isdir() and name in (".", ""):
                    continue  # the directory itself: ours already
                if not name or "/" in name or name in (".", "..") or "\0" in name:
                    raise refused(f"holds a file named {member.name!r}, which is not a plain name")
                if name in seen or os.path.lexists(directory / name):
                    raise refused(f"holds {name!r} twice")
                seen.add(name)
                if member.issym() and name == "parent" and member.linkname in links:
                    os.symlink(member.linkname, directory / name)  # a pre-copy round's parent, beside it
                    continue
                if not member.isreg():
                    target = f" -> {member.linkname!r}" if member.issym() or member.islnk() else ""
                    raise refused(f"holds {name!r}{target}, a {_kind(member)}: only regular files are accepted")
                if not files.pattern.fullmatch(name):
                    raise refused(f"holds a file named {name!r}, which is not one a checkpoint writes")
                budget.admit(directory.name, member.size)
                _write(directory, name, tar.extractfile(member), member.size, files.mode)  # type: ignore[arg-type]
    except tarfile.TarError as err:
        raise refused(f"is not a valid tar stream ({err})") from None


async def receive_state_files(directory: Path, channel: Channel, files: StateFiles, budget: StateBudget,
                              links: Collection[str] = ()) -> None:
    """One tar stream of checkpoint files (up to the channel's barrier) into `directory`, which holds at most
    the pages streamed before it. `links`: the targets a `parent` link may name (earlier pre-copy rounds)."""
    feed = _Feed()
    extracting = asyncio.ensure_future(asyncio.to_thread(_extract, directory, feed, files, budget, links))
    trailing = 0
    try:
        async for message in channel.stream():
            if extracting.done():
                if extracting.exception() is not None:
                    break  # its error says why
                trailing += len(message)  # after the tar's end: its padding, which is read up to the barrier
                if trailing > MAX_TRAILING:
                    raise refused("goes on after the end of its tar stream")
                continue
            await _put(feed, extracting, message)
        await _end(feed, extracting)
        await extracting
    finally:
        if not extracting.done():
            await _end(feed, extracting)
            with contextlib.suppress(BaseException):
                await extracting


async def _end(feed: _Feed, extracting: asyncio.Future[None]) -> None:
    """Tell the thread the stream ended (it reads what is queued, then finds the end)."""
    await _put(feed, extracting, None)


async def _put(feed: _Feed, extracting: asyncio.Future[None], item: bytes | None) -> None:
    """Hand `item` to the thread without blocking the event loop (its queue is bounded); nothing once the thread
    has ended."""
    while not extracting.done():
        try:
            feed.messages.put_nowait(item)
            return
        except queue.Full:
            await asyncio.wait({extracting}, timeout=0.002)
