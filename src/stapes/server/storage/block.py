"""Incus's way of moving a virtual machine's volume: fs type BLOCK_AND_RSYNC (docs/migration.md, "VM volumes").

For the volume and each snapshot (snapshots first, oldest first, as for every transport), on the one fs
websocket:
1. the config directory by rsync, root.img left out (`--exclude`), with no rsync features (Incus's MatchTypes
   keeps no features for this fs type, so neither end passes --xattrs or --delete);
2. the raw disk: its bytes, front to back, as binary messages, ended by an empty text message (a barrier).
   Nothing comes back for it.

The raw part has no map of holes, so a sender must send the zeros between its data. This one goes through the
disk in windows of CHUNK bytes (one websocket message each): a window that is all hole (SEEK_DATA finds no data
in it) is sent as zeros from memory without reading it, any other is read whole with one pread, however its
data and holes alternate inside (the guest decides that: discard punches holes, 4 KiB apart if it likes). The
windows are found one at a time, in a thread, as they are sent: the daemon holds one window, never a map of the
disk. The sender stops after the window holding the last data: the receiver extends the file to the declared
size (the header's `volumeSize`, a snapshot's `size`), as Incus's receiver does (`enlargeVolumeBlockFile`). The
receiver writes sparse: all-zero blocks are skipped (seeked over), so the holes stay holes; it never writes past
the declared size.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from stapes.api.errors import BadRequest
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.progress import Progress
from stapes.server.storage.base import BLOCK_FILE
from stapes.server.storage.bound import DeclaredSizeExceeded
from stapes.server.storage.transfer import Transport, rsync_receive, rsync_send
from stapes.server.streams import Admit, Channel

CHUNK = 1 << 20  # one websocket message
ZERO_GRAIN = 4096  # the receiver skips all-zero blocks of this size (a filesystem block)
_ZEROS = bytes(CHUNK)
HOLE_BATCH = 64  # hole windows found per thread hop (sent from memory)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of data in an open file, holes left out (SEEK_DATA/SEEK_HOLE; a filesystem
    without them reports the whole file as data)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def data_windows(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, has_data) of each CHUNK-aligned window of an open file, up to the end of the window that
    holds its last data: one SEEK_DATA per window with data, none for the windows of a hole (lazy: nothing is
    gathered)."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            return
        if data >= size:
            return
        window = data - data % CHUNK
        while offset < window:  # all hole
            yield offset, CHUNK, False
            offset += CHUNK
        yield window, min(CHUNK, size - window), True
        offset = window + CHUNK


def sent_bytes(path: Path) -> int:
    """What `send_block` puts on the wire for a disk file: up to the end of the window holding its last data."""
    with open(path, "rb", buffering=0) as file:
        size = os.fstat(file.fileno()).st_size
        last = 0
        for offset, length, _ in data_windows(file.fileno(), size):
            last = offset + length
        return last


def data_bytes(path: Path) -> int:
    """The data of a file, its holes not counted: what a sparse-aware transport (tar --sparse, btrfs send) sends
    of it."""
    with open(path, "rb", buffering=0) as file:
        size = os.fstat(file.fileno()).st_size
        return sum(end - start for start, end in data_extents(file.fileno(), size))


class _DiskReader:
    """The windows of an open disk, taken a batch at a time (each batch in a thread): the hole windows up to and
    including the next data window (read), at most HOLE_BATCH of them; each (length, data or None for a hole
    window). An empty batch at the end."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path
        self._windows = data_windows(fd, os.fstat(fd).st_size)

    def batch(self) -> list[tuple[int, bytes | None]]:
        pieces: list[tuple[int, bytes | None]] = []
        for offset, length, has_data in self._windows:
            if has_data:
                data = os.pread(self._fd, length, offset)
                if len(data) != length:
                    raise BadRequest(f"{self._path} shrank while it was being sent")
                pieces.append((length, data))
                break
            pieces.append((length, None))
            if len(pieces) >= HOLE_BATCH:
                break
        return pieces


async def send_block(path: Path, channel: Channel, progress: Progress | None) -> int:
    """The raw disk, then a barrier; returns the bytes sent."""
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    sent = 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadRequest(f"{path} is not a regular file")
        reader = _DiskReader(fd, path)
        while pieces := await asyncio.to_thread(reader.batch):
            while pieces:  # each window let go once sent: one in memory while the next is read
                length, data = pieces.pop(0)
                await channel.send(_ZEROS[:length] if data is None else data)
                sent += length
                if progress is not None:
                    progress.advance(length)
            data = None
    finally:
        os.close(fd)
    await channel.barrier()
    return sent


def write_sparse(fd: int, offset: int, data: bytes) -> int:
    """Write `data` at `offset`, skipping its all-zero blocks (left as holes); returns the bytes written."""
    written = 0
    run_start: int | None = None  # the start (in data) of the non-zero run being gathered
    length = len(data)
    for low in range(0, length, ZERO_GRAIN):
        high = min(low + ZERO_GRAIN, length)
        if data[low:high] == _ZEROS[:high - low]:
            if run_start is not None:
                written += os.pwrite(fd, data[run_start:low], offset + run_start)
                run_start = None
        elif run_start is None:
            run_start = low
    if run_start is not None:
        written += os.pwrite(fd, data[run_start:], offset + run_start)
    return written


async def receive_block(path: Path, channel: Channel, progress: Progress | None, admit: Admit | None,
                        size: int | None) -> int:
    """The raw disk into `path` (a regular file or none; reset first, as Incus does), sparse; at the end the file
    is as long as the declared `size` (or what arrived, when none was declared). Returns the bytes received."""
    def open_disk() -> int:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):  # the config directory's rsync must not have put anything there
            raise BadRequest(f"Protocol error: the source's config volume held a {BLOCK_FILE} that is not a "
                             "regular file")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, 0)
        return fd

    fd = await asyncio.to_thread(open_disk)
    received = 0
    try:
        async for chunk in channel.stream():
            if size is not None and received + len(chunk) > size:
                raise DeclaredSizeExceeded(
                    f"The source sent more of the disk than its declared size ({size} bytes): the transfer was "
                    "stopped and what it wrote removed; the source is misbehaving")
            if admit is not None:
                await admit(len(chunk))
            await asyncio.to_thread(write_sparse, fd, received, chunk)
            received += len(chunk)
            if progress is not None:
                progress.advance(len(chunk))
        await asyncio.to_thread(os.ftruncate, fd, max(received, size or 0))
    finally:
        os.close(fd)
    return received


class BlockAndRsync(Transport):
    """Incus's BLOCK_AND_RSYNC: a VM volume's config directory by rsync, then its raw disk (see above)."""

    name: ClassVar[str] = "block-and-rsync"
    carries: ClassVar[frozenset[str]] = frozenset({"block"})
    leaves_disk: ClassVar[bool] = True
    refreshes: ClassVar[bool] = True  # the config by rsync, the disk whole again (Incus refreshes a VM so)
    incus: ClassVar[dict[str, pb.MigrationFSType]] = {"block": pb.BLOCK_AND_RSYNC}

    async def send(self, path: Path) -> None:
        await rsync_send(path, self.channel, self.progress, (), self.bwlimit, extra=[f"--exclude=/{BLOCK_FILE}"])
        if path in self.disk_elsewhere:
            await self.channel.barrier()  # no bytes: the receiver extends the disk to its declared size
            return
        await send_block(path / BLOCK_FILE, self.channel, self.progress)

    async def receive(self, path: Path, *, snapshot: bool, size: int | None = None) -> None:
        # The disk is held to its declared size, not to the stream's (the zeros between its data travel too).
        admit = self.bound.delta if self.bound else None
        await rsync_receive(path, self.channel, self.progress, (), admit)
        await receive_block(path / BLOCK_FILE, self.channel, self.progress, admit, size)
