"""What a storage pool driver must offer.

A driver owns volumes (one per instance, later also snapshots) and declares the migration transports it
can send and receive; the migration code negotiates from those declarations only.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from stapes.api.config_keys import parse_size
from stapes.api.errors import BadRequest, Conflict

TUNABLE_KEYS = ("rsync.bwlimit",)  # keys any pool takes and that may change after creation


def check_tunables(config: dict[str, str]) -> None:
    """`rsync.bwlimit`: Incus's per-pool cap on what rsync sends from this pool (e.g. 50MiB, per second)."""
    if "rsync.bwlimit" in config:
        try:
            parse_size(config["rsync.bwlimit"])
        except ValueError as err:
            raise BadRequest(f"Invalid rsync.bwlimit: {err}") from None


def volume_name(project: str, name: str) -> str:
    """Incus's on-disk naming: the default project's volumes carry the bare name."""
    return name if project == "default" else f"{project}_{name}"


class PoolDriver(ABC):
    name: ClassVar[str]
    migration_transports: ClassVar[tuple[str, ...]]

    def __init__(self, pool: str, config: dict[str, str]) -> None:
        self.pool = pool
        self.config = config

    @property
    def source(self) -> Path:
        return Path(self.config["source"])

    @property
    def root(self) -> Path:
        """Where the volumes live (the source itself, or where it is mounted)."""
        return self.source

    async def activate(self) -> None:  # noqa: B027 - most drivers have nothing to do
        """Make the pool usable after the server (or the host) restarted, e.g. mount it."""

    @classmethod
    @abstractmethod
    def fill_defaults(cls, pool: str, config: dict[str, str], default_source: Path) -> dict[str, str]:
        """Complete a new pool's configuration (e.g. its source path) and check it."""

    @abstractmethod
    async def create_pool(self) -> None: ...

    @abstractmethod
    async def delete_pool(self) -> None: ...

    def volume_path(self, kind: str, project: str, name: str) -> Path:
        return self.root / kind / volume_name(project, name)

    @abstractmethod
    async def create_volume(self, kind: str, project: str, name: str) -> Path: ...

    @abstractmethod
    async def delete_volume(self, kind: str, project: str, name: str) -> None: ...

    async def rename_volume(self, kind: str, project: str, old: str, new: str) -> None:
        """Volumes and snapshot directories are renamed in place (subvolumes included)."""
        src, dst = self.volume_path(kind, project, old), self.volume_path(kind, project, new)
        if dst.exists():
            raise Conflict(f"A volume for {new!r} already exists in pool {self.pool!r}")
        await asyncio.to_thread(os.rename, src, dst)
        snaps = self.snapshot_path(kind, project, old, "x").parent
        if snaps.exists():
            await asyncio.to_thread(os.rename, snaps, self.snapshot_path(kind, project, new, "x").parent)

    def snapshot_path(self, kind: str, project: str, name: str, snapshot: str) -> Path:
        """Incus's layout: <pool>/<kind>-snapshots/<volume>/<snapshot>."""
        return self.root / f"{kind}-snapshots" / volume_name(project, name) / snapshot

    @abstractmethod
    async def create_snapshot(self, kind: str, project: str, name: str, snapshot: str, *,
                              writable: bool = False) -> None:
        """`writable` for a snapshot that is about to receive files (a refresh seeds it from the volume)."""

    @abstractmethod
    async def delete_snapshot(self, kind: str, project: str, name: str, snapshot: str) -> None: ...

    @abstractmethod
    async def restore_snapshot(self, kind: str, project: str, name: str, snapshot: str) -> None: ...

    async def rename_snapshot(self, kind: str, project: str, name: str, old: str, new: str) -> None:
        await asyncio.to_thread(os.rename, self.snapshot_path(kind, project, name, old),
                                self.snapshot_path(kind, project, name, new))

    @abstractmethod
    async def prepare_snapshot_target(self, kind: str, project: str, name: str, snapshot: str) -> Path:
        """An empty place to receive a snapshot's files into (migration)."""

    async def usage(self) -> dict[str, int]:
        """{'used': bytes, 'total': bytes} of the pool's backing filesystem."""
        stat = await asyncio.to_thread(os.statvfs, self.root)
        total = stat.f_blocks * stat.f_frsize
        return {"used": total - stat.f_bavail * stat.f_frsize, "total": total}
