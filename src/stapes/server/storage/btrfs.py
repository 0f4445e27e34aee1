"""The `btrfs` pool: volumes are subvolumes, snapshots are read-only subvolume snapshots, and moves between
two btrfs pools use `btrfs send | btrfs receive` (incremental from one snapshot to the next), a transfer
type this driver declares beside the shared ones.

A VM's volume is a subvolume with copy-on-write off (`chattr +C` on it, so that root.img, created empty
inside it, inherits nodatacow before any data is written, as Incus does); its snapshots are subvolume snapshots
like a container's.

The pool lives on a loop file the server creates (`size=`, default 5GiB, sparse) or on an existing btrfs
directory (`source=/path/on/btrfs`); a loop-file pool is mounted again when the server starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from stapes.api.config_keys import parse_size
from stapes.api.errors import BadRequest, Conflict, InternalError
from stapes.server import process
from stapes.server.progress import Progress
from stapes.server.storage.base import (
    ALL_KINDS,
    BLOCK_FILE,
    TUNABLE_KEYS,
    PoolDriver,
    Volume,
    check_tunables,
    create_block_file,
    is_nocow,
)
from stapes.server.storage.block import BlockAndRsync
from stapes.server.storage.transfer import Rsync, TarStream, Transport
from stapes.server.streams import Channel, channel_to_tool, tool_to_channel

DEFAULT_SIZE = "5GiB"


async def _is_btrfs(path: Path) -> bool:
    result = await process.run(["stat", "-f", "-c", "%T", str(path)], check=False)
    return result.stdout.decode().strip() == "btrfs"


async def delete_subvolume(path: Path) -> None:
    if path.exists():
        await process.run(["btrfs", "property", "set", "-f", "-ts", str(path), "ro", "false"], check=False)
        await process.run(["btrfs", "subvolume", "delete", str(path)])


async def set_nocow(path: Path) -> None:
    """Copy-on-write off for the files created in `path` from now on (a VM's disk: a database-like write pattern
    that copy-on-write fragments)."""
    await process.run(["chattr", "+C", str(path)])


async def nocow_disk(volume: Path) -> None:
    """A received VM volume: btrfs send carries no inode flags, so its disk arrives copy-on-write. Its data is
    copied once into a nodatacow file (holes kept), as a VM's disk is made here; the received snapshots keep
    theirs (they are never written)."""
    await set_nocow(volume)
    disk = volume / BLOCK_FILE
    if disk.is_symlink() or not disk.is_file() or await asyncio.to_thread(is_nocow, disk):
        return  # check_layout refuses a disk that is not a regular file
    staged = volume / f".{BLOCK_FILE}.nocow"
    staged.unlink(missing_ok=True)
    await create_block_file(staged, 0, nocow=True)
    try:
        await process.run(["cp", "--sparse=always", "--reflink=never", "--preserve=mode,ownership,timestamps",
                           "--", str(disk), str(staged)])
        await asyncio.to_thread(os.rename, staged, disk)
    finally:
        staged.unlink(missing_ok=True)


_SENT_NAME = re.compile(r"^\.stapes-send-[0-9a-f]{12}$")


class BtrfsSendReceive(Transport):
    """btrfs send | btrfs receive. Each stream is sent from a read-only snapshot taken for the purpose, with
    the previous one as its parent, so a snapshot series costs only its differences. The receiver keeps
    received snapshots as they arrive (their received UUID makes them parents for the next stream) and turns
    the last stream, the instance's volume, into a writable subvolume."""

    name: ClassVar[str] = "btrfs"

    def __init__(self, channel: Channel, progress: Progress | None, features: Sequence[str],
                 bwlimit: str | None = None) -> None:
        super().__init__(channel, progress, features, bwlimit)
        self._sent: list[Path] = []
        self._staging: dict[Path, Path] = {}  # receiving: this transfer's private directory beside each target

    async def send(self, path: Path) -> None:
        frozen = path.parent / f".stapes-send-{uuid.uuid4().hex[:12]}"
        await process.run(["btrfs", "subvolume", "snapshot", "-r", str(path), str(frozen)])
        self._sent.append(frozen)
        # `send -p` finds the parent through the UUID tree, which a new snapshot joins only at commit.
        await process.run(["btrfs", "filesystem", "sync", str(path.parent)])
        parent = ["-p", str(self._sent[-2])] if len(self._sent) > 1 else []
        await tool_to_channel(["btrfs", "send", "-q", *parent, str(frozen)], self.channel, self.progress,
                              "Sending the files (btrfs send)")

    async def receive(self, path: Path, *, snapshot: bool, size: int | None = None) -> None:
        # Received into a private staging directory of this transfer, beside the target (the same filesystem):
        # whatever appears there is the stream's, and nothing else is ever deleted on a failure (a volume created
        # meanwhile beside it is not). --chroot: whatever paths the stream names, it writes below it only.
        # A received (read-only) subvolume cannot move to another directory: the target is a snapshot of it,
        # and the received one stays in staging until the transfer ends (the next stream's parent, found by its
        # received UUID).
        staging = await self._staging_dir(path.parent)
        before = set(staging.iterdir())
        try:
            await channel_to_tool(["btrfs", "receive", "-q", "--chroot", str(staging)], self.channel,
                                  self.progress, "Receiving the files (btrfs receive)",
                                  self.bound.stream if self.bound else None)
            new = set(staging.iterdir()) - before
            if len(new) != 1 or not _SENT_NAME.match(next(iter(new)).name) or not next(iter(new)).is_dir():
                raise InternalError("Protocol error: the btrfs stream did not hold exactly one subvolume as "
                                    f"Stapes sends it (got {sorted(p.name for p in new)[:3]})")
        except BaseException:
            for partial in set(staging.iterdir()) - before:
                with contextlib.suppress(Exception):
                    await delete_subvolume(partial)
            raise
        received = new.pop()
        # The next stream's `receive` looks this one up as its parent in the UUID tree: commit it first.
        await process.run(["btrfs", "filesystem", "sync", str(staging)])
        nocow = await asyncio.to_thread(is_nocow, path)  # a VM's volume was made so (a stream never says)
        await delete_subvolume(path)  # the empty subvolume made for us
        readonly = ["-r"] if snapshot else []
        await process.run(["btrfs", "subvolume", "snapshot", *readonly, str(received), str(path)])
        if nocow and not snapshot:
            await nocow_disk(path)

    async def _staging_dir(self, parent: Path) -> Path:
        """One per directory the transfer receives into (the volume's and its snapshots'), all on the pool's
        filesystem: a stream finds its parent by received UUID, wherever that one was received."""
        if parent not in self._staging:
            staging = parent / f".stapes-receive-{uuid.uuid4().hex[:12]}"
            await asyncio.to_thread(staging.mkdir, 0o700)
            self._staging[parent] = staging
        return self._staging[parent]

    async def close(self) -> None:
        for frozen in self._sent:
            with contextlib.suppress(Exception):
                await delete_subvolume(frozen)
        stagings, self._staging = list(self._staging.values()), {}
        for staging in stagings:  # only what this transfer received: the staging directories are its own
            for received in await asyncio.to_thread(sorted, staging.iterdir()):
                with contextlib.suppress(Exception):
                    await delete_subvolume(received)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(staging.rmdir)


class BtrfsPool(PoolDriver):
    name: ClassVar[str] = "btrfs"
    transports: ClassVar[tuple[type[Transport], ...]] = (BtrfsSendReceive, TarStream, Rsync, BlockAndRsync)

    @classmethod
    def fill_defaults(cls, pool: str, config: dict[str, str], default_source: Path) -> dict[str, str]:
        unknown = set(config) - {"source", "size", *TUNABLE_KEYS}
        if unknown:
            raise BadRequest(f"Unknown configuration for a btrfs pool: {', '.join(sorted(unknown))} "
                             f"(source, size, {', '.join(TUNABLE_KEYS)})")
        check_tunables(config)
        filled = dict(config)
        if "source" in filled:
            if "size" in filled:
                raise BadRequest("A btrfs pool takes either an existing btrfs 'source' directory or a 'size'")
            if not filled["source"].startswith("/"):
                raise BadRequest(f"The pool source {filled['source']!r} must be an absolute path")
            filled["mount"] = filled["source"]
            return filled
        filled.setdefault("size", DEFAULT_SIZE)
        try:
            if parse_size(filled["size"]) < 128 * 2**20:
                raise BadRequest("A btrfs pool needs at least 128MiB")
        except ValueError as err:
            raise BadRequest(f"Invalid size for a btrfs pool: {err}") from None
        filled["source"] = str(default_source.parent.parent / "disks" / f"{pool}.img")
        filled["mount"] = str(default_source)
        return filled

    @property
    def root(self) -> Path:
        return Path(self.config["mount"])

    @property
    def loop_file(self) -> bool:
        return "size" in self.config

    async def create_pool(self) -> None:
        if not self.loop_file:
            if not await _is_btrfs(self.source):
                raise BadRequest(f"{self.source} is not on a btrfs filesystem: give a btrfs directory, or a size "
                                 "for a loop-file pool")
        else:
            image = self.source
            if image.exists():
                raise Conflict(f"The pool image {image} already exists")
            await asyncio.to_thread(image.parent.mkdir, 0o700, True, True)  # a second pool shares it
            await process.run(["truncate", "-s", str(parse_size(self.config["size"])), str(image)])
            try:
                await process.run(["mkfs.btrfs", "-q", str(image)])
                await self.activate()
            except BaseException:
                image.unlink(missing_ok=True)
                raise
        for kind in ("containers", "containers-snapshots", "virtual-machines", "virtual-machines-snapshots"):
            await asyncio.to_thread((self.root / kind).mkdir, 0o711, True, True)

    async def activate(self) -> None:
        if self.loop_file and not os.path.ismount(self.root):
            await asyncio.to_thread(self.root.mkdir, 0o711, True, True)
            await process.run(["mount", "-o", "loop", str(self.source), str(self.root)])

    async def delete_pool(self) -> None:
        if self.loop_file:
            if os.path.ismount(self.root):
                await process.run(["umount", str(self.root)])
            self.source.unlink(missing_ok=True)
            await asyncio.to_thread(shutil.rmtree, self.root, True)
        else:
            for kind in ALL_KINDS:
                for name in (kind, f"{kind}-snapshots"):
                    await asyncio.to_thread(shutil.rmtree, self.root / name, True)

    async def create_volume(self, volume: Volume, size: int | None = None) -> Path:
        path = self.volume_path(volume)
        if path.exists():
            raise Conflict(f"A volume for {volume.name!r} already exists in pool {self.pool!r} ({path})")
        await process.run(["btrfs", "subvolume", "create", str(path)])
        if volume.block:
            try:
                await set_nocow(path)
                await create_block_file(path / BLOCK_FILE, size or 0, nocow=True)
            except BaseException:
                await delete_subvolume(path)
                raise
        return path

    async def delete_volume(self, volume: Volume) -> None:
        snapshots = self.snapshot_path(volume, "x").parent
        if snapshots.exists():
            for snap in sorted(snapshots.iterdir()):
                await delete_subvolume(snap)
            await asyncio.to_thread(shutil.rmtree, snapshots, True)
        await delete_subvolume(self.volume_path(volume))

    async def create_snapshot(self, volume: Volume, snapshot: str, *,
                              writable: bool = False) -> None:
        target = self.snapshot_path(volume, snapshot)
        if target.exists():
            raise Conflict(f"Snapshot {snapshot!r} of {volume.name!r} already exists in pool {self.pool!r}")
        await asyncio.to_thread(target.parent.mkdir, 0o711, True, True)
        readonly = [] if writable else ["-r"]
        await process.run(["btrfs", "subvolume", "snapshot", *readonly, str(self.volume_path(volume)),
                           str(target)])

    async def delete_snapshot(self, volume: Volume, snapshot: str) -> None:
        await delete_subvolume(self.snapshot_path(volume, snapshot))

    async def restore_snapshot(self, volume: Volume, snapshot: str) -> None:
        path = self.volume_path(volume)
        staged = path.with_name(path.name + ".restoring")
        await process.run(["btrfs", "subvolume", "snapshot", str(self.snapshot_path(volume, snapshot)),
                           str(staged)])
        await delete_subvolume(path)
        await asyncio.to_thread(os.rename, staged, path)

    async def prepare_snapshot_target(self, volume: Volume, snapshot: str) -> Path:
        path = self.snapshot_path(volume, snapshot)
        if path.exists():
            raise Conflict(f"Snapshot {snapshot!r} of {volume.name!r} already exists in pool {self.pool!r}")
        await asyncio.to_thread(path.parent.mkdir, 0o711, True, True)
        await process.run(["btrfs", "subvolume", "create", str(path)])
        if volume.block:  # a restore makes the volume a writable snapshot of it: its disk must be nodatacow
            await set_nocow(path)
        return path
