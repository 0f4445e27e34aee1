"""What a storage pool driver must offer.

A driver owns volumes (one per instance, with its snapshots) and declares the transfer types it can send and
receive, best first (as Incus's drivers declare their MigrationTypes); the migration code negotiates from
those declarations only, and opens the chosen one from the registry the drivers' declarations make.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from stapes.api.config_keys import parse_size
from stapes.api.errors import BadRequest, Conflict
from stapes.server.storage.transfer import Transport

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


VOLUME_KINDS = {"container": "containers", "virtual-machine": "virtual-machines"}
CUSTOM = "custom"  # custom volumes (storage/volumes.py) live in <pool>/custom/, as Incus's do
ALL_KINDS = (*VOLUME_KINDS.values(), CUSTOM)


@dataclass(frozen=True)
class Volume:
    """One instance's volume in a pool: its kind (Incus's directory name: containers, virtual-machines),
    project and instance name."""

    kind: str
    project: str
    name: str

    @classmethod
    def of(cls, instance_type: str, project: str, name: str) -> Volume:
        return cls(VOLUME_KINDS[instance_type], project, name)

    @property
    def directory(self) -> str:
        return volume_name(self.project, self.name)

    def renamed(self, name: str) -> Volume:
        return Volume(self.kind, self.project, name)


class PoolDriver(ABC):
    name: ClassVar[str]
    transports: ClassVar[tuple[type[Transport], ...]]  # what it can send and receive, best first

    @property
    def migration_transports(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.transports)

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

    async def seal(self) -> None:
        """No host user but root reaches into an instance's volume: its files are not shifted (uid 0 inside is
        uid 0 on disk, so a setuid file planted inside would be setuid root outside). Incus makes each volume
        0100; here the directories of every volume kind are root's alone, whatever mode a peer sent a volume
        with. Set at every activation (an older server made them 0711)."""
        def seal_directories() -> None:
            for kind in ALL_KINDS:
                for name in (kind, f"{kind}-snapshots"):
                    directory = self.root / name
                    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                    os.chmod(directory, 0o700)

        await asyncio.to_thread(seal_directories)

    @classmethod
    @abstractmethod
    def fill_defaults(cls, pool: str, config: dict[str, str], default_source: Path) -> dict[str, str]:
        """Complete a new pool's configuration (e.g. its source path) and check it."""

    @abstractmethod
    async def create_pool(self) -> None: ...

    @abstractmethod
    async def delete_pool(self) -> None: ...

    def volume_path(self, volume: Volume) -> Path:
        return self.root / volume.kind / volume.directory

    @abstractmethod
    async def create_volume(self, volume: Volume) -> Path: ...

    @abstractmethod
    async def delete_volume(self, volume: Volume) -> None: ...

    async def rename_volume(self, volume: Volume, new: str) -> None:
        """Volumes and snapshot directories are renamed in place (subvolumes included)."""
        target = volume.renamed(new)
        src, dst = self.volume_path(volume), self.volume_path(target)
        if dst.exists():
            raise Conflict(f"A volume for {new!r} already exists in pool {self.pool!r}")
        await asyncio.to_thread(os.rename, src, dst)
        snaps = self.snapshot_path(volume, "x").parent
        if snaps.exists():
            await asyncio.to_thread(os.rename, snaps, self.snapshot_path(target, "x").parent)

    def snapshot_path(self, volume: Volume, snapshot: str) -> Path:
        """Incus's layout: <pool>/<kind>-snapshots/<volume>/<snapshot>."""
        return self.root / f"{volume.kind}-snapshots" / volume.directory / snapshot

    @abstractmethod
    async def create_snapshot(self, volume: Volume, snapshot: str, *,
                              writable: bool = False) -> None:
        """`writable` for a snapshot that is about to receive files (a refresh seeds it from the volume)."""

    @abstractmethod
    async def delete_snapshot(self, volume: Volume, snapshot: str) -> None: ...

    @abstractmethod
    async def restore_snapshot(self, volume: Volume, snapshot: str) -> None: ...

    async def rename_snapshot(self, volume: Volume, old: str, new: str) -> None:
        await asyncio.to_thread(os.rename, self.snapshot_path(volume, old),
                                self.snapshot_path(volume, new))

    @abstractmethod
    async def prepare_snapshot_target(self, volume: Volume, snapshot: str) -> Path:
        """An empty place to receive a snapshot's files into (migration)."""

    async def usage(self) -> dict[str, int]:
        """{'used': bytes, 'total': bytes} of the pool's backing filesystem."""
        stat = await asyncio.to_thread(os.statvfs, self.root)
        total = stat.f_blocks * stat.f_frsize
        return {"used": total - stat.f_bavail * stat.f_frsize, "total": total}
