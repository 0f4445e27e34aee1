"""The `dir` pool: volumes are plain directories below the pool's source path; a VM's disk is a sparse raw file
(root.img) in its volume directory. Snapshots are copies that keep holes and share data where the filesystem
has reflinks."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import ClassVar

from stapes.api.errors import BadRequest, Conflict
from stapes.server import process
from stapes.server.storage.base import TUNABLE_KEYS, PoolDriver, Volume, check_tunables, create_block_file
from stapes.server.storage.block import BlockAndRsync
from stapes.server.storage.transfer import Rsync, TarStream, Transport

# cp -a keeps owners, modes, xattrs, hard links; holes stay holes, data is shared where the fs has reflinks.
COPY = ["cp", "-a", "--sparse=always", "--reflink=auto"]


class DirPool(PoolDriver):
    name: ClassVar[str] = "dir"
    transports: ClassVar[tuple[type[Transport], ...]] = (TarStream, Rsync, BlockAndRsync)

    @classmethod
    def fill_defaults(cls, pool: str, config: dict[str, str], default_source: Path) -> dict[str, str]:
        unknown = set(config) - {"source", *TUNABLE_KEYS}
        if unknown:
            raise BadRequest(f"Unknown configuration for a dir pool: {', '.join(sorted(unknown))} "
                             f"(source, {', '.join(TUNABLE_KEYS)})")
        check_tunables(config)
        filled = dict(config)
        filled.setdefault("source", str(default_source))
        if not filled["source"].startswith("/"):
            raise BadRequest(f"The pool source {filled['source']!r} must be an absolute path")
        return filled

    async def create_pool(self) -> None:
        source = self.source
        if source.exists() and any(source.iterdir()):
            raise Conflict(f"The pool source {source} is not empty: choose an empty or new directory")
        await asyncio.to_thread(lambda: (source / "containers").mkdir(parents=True, exist_ok=True))

    async def delete_pool(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.source, True)

    async def create_volume(self, volume: Volume, size: int | None = None) -> Path:
        path = self.volume_path(volume)
        if path.exists():
            raise Conflict(f"A volume for {volume.name!r} already exists in pool {self.pool!r} ({path})")
        await asyncio.to_thread(path.mkdir, 0o711, True)
        if volume.block:
            try:
                await create_block_file(self.block_path(volume), size or 0, nocow=False)
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, path, True)
                raise
        return path

    async def delete_volume(self, volume: Volume) -> None:
        """The volume and all its snapshots."""
        for path in (self.volume_path(volume), self.snapshot_path(volume, "x").parent):
            if path.exists():
                await process.run(["rm", "-rf", "--one-file-system", "--", str(path)])

    async def create_snapshot(self, volume: Volume, snapshot: str, *,
                              writable: bool = False) -> None:
        target = await self.prepare_snapshot_target(volume, snapshot)
        target.rmdir()
        await process.run([*COPY, "--", str(self.volume_path(volume)), str(target)])

    async def delete_snapshot(self, volume: Volume, snapshot: str) -> None:
        path = self.snapshot_path(volume, snapshot)
        if path.exists():
            await process.run(["rm", "-rf", "--one-file-system", "--", str(path)])

    async def restore_snapshot(self, volume: Volume, snapshot: str) -> None:
        if volume.block:
            # A whole copy beside the volume, swapped in: the disk's holes stay holes (rsync would write every
            # block of a changed disk file again), and a failed copy leaves the volume as it was.
            path = self.volume_path(volume)
            staged = path.with_name(f".{path.name}.restoring")
            await process.run(["rm", "-rf", "--one-file-system", "--", str(staged)])
            await process.run([*COPY, "-T", "--", str(self.snapshot_path(volume, snapshot)), str(staged)])
            old = path.with_name(f".{path.name}.old")
            await asyncio.to_thread(os.rename, path, old)
            await asyncio.to_thread(os.rename, staged, path)
            await process.run(["rm", "-rf", "--one-file-system", "--", str(old)])
            return
        await process.run(["rsync", "-aHAX", "--delete", "--numeric-ids", "--sparse",
                           f"{self.snapshot_path(volume, snapshot)}/",
                           f"{self.volume_path(volume)}/"])

    async def prepare_snapshot_target(self, volume: Volume, snapshot: str) -> Path:
        path = self.snapshot_path(volume, snapshot)
        if path.exists():
            raise Conflict(f"Snapshot {snapshot!r} of {volume.name!r} already exists in pool {self.pool!r}")
        await asyncio.to_thread(path.mkdir, 0o711, True)
        return path
