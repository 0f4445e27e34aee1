"""The `dir` pool: volumes are plain directories below the pool's source path."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import ClassVar

from stapes.api.errors import BadRequest, Conflict
from stapes.server import process
from stapes.server.storage.base import TUNABLE_KEYS, PoolDriver, Volume, check_tunables
from stapes.server.storage.transfer import Rsync, TarStream, Transport


class DirPool(PoolDriver):
    name: ClassVar[str] = "dir"
    transports: ClassVar[tuple[type[Transport], ...]] = (TarStream, Rsync)

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

    async def create_volume(self, volume: Volume) -> Path:
        path = self.volume_path(volume)
        if path.exists():
            raise Conflict(f"A volume for {volume.name!r} already exists in pool {self.pool!r} ({path})")
        await asyncio.to_thread(path.mkdir, 0o711, True)
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
        # cp -a keeps owners, modes, xattrs, hard links and sparse files; reflinks where the fs has them.
        await process.run(["cp", "-a", "--reflink=auto", "--", str(self.volume_path(volume)),
                           str(target)])

    async def delete_snapshot(self, volume: Volume, snapshot: str) -> None:
        path = self.snapshot_path(volume, snapshot)
        if path.exists():
            await process.run(["rm", "-rf", "--one-file-system", "--", str(path)])

    async def restore_snapshot(self, volume: Volume, snapshot: str) -> None:
        await process.run(["rsync", "-aHAX", "--delete", "--numeric-ids", "--sparse",
                           f"{self.snapshot_path(volume, snapshot)}/",
                           f"{self.volume_path(volume)}/"])

    async def prepare_snapshot_target(self, volume: Volume, snapshot: str) -> Path:
        path = self.snapshot_path(volume, snapshot)
        if path.exists():
            raise Conflict(f"Snapshot {snapshot!r} of {volume.name!r} already exists in pool {self.pool!r}")
        await asyncio.to_thread(path.mkdir, 0o711, True)
        return path
