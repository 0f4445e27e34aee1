"""What a storage pool driver must offer.

A driver owns volumes (one per instance, with its snapshots) and declares the transfer types it can send and
receive, best first (as Incus's drivers declare their MigrationTypes); each transfer type declares the volume
contents it carries. The migration code negotiates from those declarations only, and opens the chosen one from
the registry the drivers' declarations make.

A volume's content is Incus's: `filesystem` (a container: the volume directory holds `rootfs/`) or `block` (a
virtual machine: the volume directory is the VM's config filesystem, holding the raw disk `root.img`, sparse,
beside metadata.yaml, templates/ and qemu.nvram). A block volume has a size: its root.img's apparent size.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from stapes.api.config_keys import parse_size
from stapes.api.errors import BadRequest, Conflict
from stapes.server import process
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


FILESYSTEM = "filesystem"
BLOCK = "block"
CONTENTS = (FILESYSTEM, BLOCK)
VOLUME_KINDS = {"container": "containers", "virtual-machine": "virtual-machines"}
KIND_CONTENT = {"containers": FILESYSTEM, "virtual-machines": BLOCK}  # an instance volume's content, by kind
CUSTOM = "custom"  # custom volumes (storage/volumes.py) live in <pool>/custom/, as Incus's do
ALL_KINDS = (*VOLUME_KINDS.values(), CUSTOM)
BLOCK_FILE = "root.img"  # Incus's name for a block volume's raw disk, inside its config directory
DEFAULT_BLOCK_SIZE = 10 * 2**30  # Incus's default root disk of a VM (`-d root,size=` sets another)


@dataclass(frozen=True)
class Volume:
    """One instance's volume in a pool: its kind (Incus's directory name: containers, virtual-machines),
    project and instance name, and its content (filesystem, or block for a VM's disk)."""

    kind: str
    project: str
    name: str
    content: str = FILESYSTEM

    @classmethod
    def of(cls, instance_type: str, project: str, name: str) -> Volume:
        kind = VOLUME_KINDS[instance_type]
        return cls(kind, project, name, KIND_CONTENT[kind])

    @property
    def directory(self) -> str:
        return volume_name(self.project, self.name)

    @property
    def block(self) -> bool:
        return self.content == BLOCK

    def renamed(self, name: str) -> Volume:
        return Volume(self.kind, self.project, name, self.content)


def check_layout(path: Path, content: str) -> None:
    """What a volume (or a snapshot of one) received from an image, a backup or a migration peer must look like
    before anything runs from it. A container volume holds a real `rootfs` directory (a symlink there would make
    LXC use a host directory as the container's root). A VM volume holds a regular `root.img` (a symlink would
    have QEMU read and write a host file), and nothing but directories and regular files: no symlinks (QEMU opens
    qemu.nvram and the templates by name), device nodes, sockets or FIFOs."""
    if content == FILESYSTEM:
        root = path / "rootfs"
        if root.is_symlink() or not root.is_dir():
            raise BadRequest(f"The instance's files are not a container volume: {root.name!r} is not a directory "
                             "(a symlink or a file was received in its place)")
        return
    if content != BLOCK:
        raise BadRequest(f"Unknown volume content {content!r} ({', '.join(CONTENTS)})")
    if path.is_symlink() or not path.is_dir():
        raise BadRequest("The instance's files are not a virtual machine volume: its directory is not a directory")
    disk = path / BLOCK_FILE
    if disk.is_symlink() or not disk.is_file():
        raise BadRequest(f"The instance's files are not a virtual machine volume: {BLOCK_FILE!r} is not a regular "
                         "file (missing, or a symlink or a directory was received in its place)")
    for top, dirs, files in os.walk(path):  # follows no links
        for name in (*dirs, *files):
            mode = os.lstat(os.path.join(top, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                kind = "a symlink" if stat.S_ISLNK(mode) else "a special file"
                where = os.path.relpath(os.path.join(top, name), path)
                raise BadRequest(f"The virtual machine volume holds {kind}, {where!r}: a VM's volume holds "
                                 "directories and regular files only")


def block_size(path: Path) -> int:
    """A block volume's size: its root.img's apparent size (what the guest sees)."""
    return (path / BLOCK_FILE).stat().st_size


def allocated_bytes(path: Path) -> int:
    """What a file's data takes on disk (its holes not counted)."""
    return path.stat().st_blocks * 512


FS_IOC_GETFLAGS = 0x80086601
FS_NOCOW_FL = 0x00800000


def is_nocow(path: Path) -> bool:
    """Whether copy-on-write is off for a file or directory (chattr +C); False where the filesystem has no
    such flag."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
    except OSError:
        return False
    finally:
        os.close(fd)
    return bool(struct.unpack_from("=i", flags)[0] & FS_NOCOW_FL)


async def create_block_file(path: Path, size: int, *, nocow: bool) -> None:
    """An empty raw disk, sparse, of `size` bytes. `nocow` (btrfs): copy-on-write off, set while the file is
    still empty (btrfs ignores the flag on a file that holds data)."""
    await asyncio.to_thread(lambda: path.touch(0o600, exist_ok=False))
    if nocow:
        await process.run(["chattr", "+C", str(path)])
    await asyncio.to_thread(os.truncate, path, size)


async def grow_block_file(path: Path, size: int) -> None:
    current = (await asyncio.to_thread(path.stat)).st_size
    if size < current:
        raise BadRequest(f"The disk cannot shrink from {current} to {size} bytes: the guest's filesystems "
                         "would lose their end (Incus refuses it too); give a size of at least the current one")
    await asyncio.to_thread(os.truncate, path, size)


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

    def block_path(self, volume: Volume) -> Path:
        """A block volume's raw disk (root.img in its config directory)."""
        if not volume.block:
            raise BadRequest(f"The volume of {volume.name!r} is a {volume.content} volume: it has no disk file")
        return self.volume_path(volume) / BLOCK_FILE

    @abstractmethod
    async def create_volume(self, volume: Volume, size: int | None = None) -> Path:
        """The volume's directory. A block volume's directory holds root.img: a sparse file of `size` bytes, or
        empty (0 bytes) with None, for a volume about to be filled (an image's disk, a migration)."""

    async def resize_block(self, volume: Volume, size: int) -> None:
        """Grow a block volume's disk (sparse: no data written); a shrink is refused, saying why."""
        await grow_block_file(self.block_path(volume), size)

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
