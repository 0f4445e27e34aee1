"""The `btrfs` pool: volumes are subvolumes, snapshots are read-only subvolume snapshots, and moves between
two btrfs pools use `btrfs send | btrfs receive` (incremental from one snapshot to the next).

The pool lives on a loop file the server creates (`size=`, default 5GiB, sparse) or on an existing btrfs
directory (`source=/path/on/btrfs`); a loop-file pool is mounted again when the server starts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import ClassVar

from stapes.api.config_keys import parse_size
from stapes.api.errors import BadRequest, Conflict
from stapes.server import process
from stapes.server.storage.base import TUNABLE_KEYS, PoolDriver, check_tunables

DEFAULT_SIZE = "5GiB"


async def _is_btrfs(path: Path) -> bool:
    result = await process.run(["stat", "-f", "-c", "%T", str(path)], check=False)
    return result.stdout.decode().strip() == "btrfs"


async def delete_subvolume(path: Path) -> None:
    if path.exists():
        await process.run(["btrfs", "property", "set", "-f", "-ts", str(path), "ro", "false"], check=False)
        await process.run(["btrfs", "subvolume", "delete", str(path)])


class BtrfsPool(PoolDriver):
    name: ClassVar[str] = "btrfs"
    migration_transports: ClassVar[tuple[str, ...]] = ("btrfs", "tar-stream", "rsync")

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
            await asyncio.to_thread(image.parent.mkdir, 0o700, True)
            await process.run(["truncate", "-s", str(parse_size(self.config["size"])), str(image)])
            try:
                await process.run(["mkfs.btrfs", "-q", str(image)])
                await self.activate()
            except BaseException:
                image.unlink(missing_ok=True)
                raise
        for kind in ("containers", "containers-snapshots"):
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
            for kind in ("containers", "containers-snapshots"):
                await asyncio.to_thread(shutil.rmtree, self.root / kind, True)

    async def create_volume(self, kind: str, project: str, name: str) -> Path:
        path = self.volume_path(kind, project, name)
        if path.exists():
            raise Conflict(f"A volume for {name!r} already exists in pool {self.pool!r} ({path})")
        await process.run(["btrfs", "subvolume", "create", str(path)])
        return path

    async def delete_volume(self, kind: str, project: str, name: str) -> None:
        snapshots = self.snapshot_path(kind, project, name, "x").parent
        if snapshots.exists():
            for snap in sorted(snapshots.iterdir()):
                await delete_subvolume(snap)
            await asyncio.to_thread(shutil.rmtree, snapshots, True)
        await delete_subvolume(self.volume_path(kind, project, name))

    async def create_snapshot(self, kind: str, project: str, name: str, snapshot: str, *,
                              writable: bool = False) -> None:
        target = self.snapshot_path(kind, project, name, snapshot)
        if target.exists():
            raise Conflict(f"Snapshot {snapshot!r} of {name!r} already exists in pool {self.pool!r}")
        await asyncio.to_thread(target.parent.mkdir, 0o711, True, True)
        readonly = [] if writable else ["-r"]
        await process.run(["btrfs", "subvolume", "snapshot", *readonly, str(self.volume_path(kind, project, name)),
                           str(target)])

    async def delete_snapshot(self, kind: str, project: str, name: str, snapshot: str) -> None:
        await delete_subvolume(self.snapshot_path(kind, project, name, snapshot))

    async def restore_snapshot(self, kind: str, project: str, name: str, snapshot: str) -> None:
        volume = self.volume_path(kind, project, name)
        staged = volume.with_name(volume.name + ".restoring")
        await process.run(["btrfs", "subvolume", "snapshot", str(self.snapshot_path(kind, project, name, snapshot)),
                           str(staged)])
        await delete_subvolume(volume)
        await asyncio.to_thread(os.rename, staged, volume)

    async def prepare_snapshot_target(self, kind: str, project: str, name: str, snapshot: str) -> Path:
        path = self.snapshot_path(kind, project, name, snapshot)
        if path.exists():
            raise Conflict(f"Snapshot {snapshot!r} of {name!r} already exists in pool {self.pool!r}")
        await asyncio.to_thread(path.parent.mkdir, 0o711, True, True)
        await process.run(["btrfs", "subvolume", "create", str(path)])
        return path
