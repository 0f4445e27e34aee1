"""Block volumes (a VM's disk) on real pools: a btrfs pool on a loop file (nodatacow disks, subvolume
snapshots), and the transfers between pools: only the allocated data of a sparse disk travels, and its holes
stay holes on the target (tar-stream, btrfs send, block-and-rsync)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stapes.server.storage.base import BLOCK, Volume, check_layout, is_nocow
from stapes.server.storage.btrfs import BtrfsPool, BtrfsSendReceive
from stapes.server.storage.dir import DirPool
from stapes.server.storage.transfer import TarStream, Transport, payload
from stapes.server.streams import Channel
from tests.unit.conftest import channels  # noqa: F401 - the websocket pair fixture

pytestmark = pytest.mark.skipif(shutil.which("mkfs.btrfs") is None or os.geteuid() != 0,
                                reason="needs btrfs-progs and root (a loop mount)")
MIB = 2**20


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def write_disk(path: Path) -> None:
    """A 1 GiB disk holding 24 MiB in three pieces, with holes between and after."""
    with open(path, "r+b") as file:
        for offset in (0, 300 * MIB, 700 * MIB):
            file.seek(offset)
            file.write(os.urandom(8 * MIB))


async def btrfs_pool(root: Path, name: str) -> BtrfsPool:
    pool = BtrfsPool(name, BtrfsPool.fill_defaults(name, {"size": "600MiB"}, root / "storage-pools" / name))
    await pool.create_pool()
    return pool


@pytest.fixture
async def pools(tmp_path: Path) -> AsyncIterator[tuple[BtrfsPool, BtrfsPool, DirPool]]:
    made = [await btrfs_pool(tmp_path, "bt1"), await btrfs_pool(tmp_path, "bt2")]
    plain = DirPool("default", {"source": str(tmp_path / "dir")})
    await plain.create_pool()
    try:
        yield made[0], made[1], plain
    finally:
        for pool in made:  # each one, whatever the others did: no mount or loop device outlives the test
            try:
                await pool.delete_pool()
            except Exception:
                subprocess.run(["umount", "-l", str(pool.root)], check=False, capture_output=True)


VM = Volume.of("virtual-machine", "default", "v1")


async def test_btrfs_block_volume_is_nodatacow_and_snapshots(pools: tuple[BtrfsPool, BtrfsPool, DirPool]) -> None:
    pool = pools[0]
    path = await pool.create_volume(VM, size=1 << 30)
    disk = pool.block_path(VM)
    assert is_nocow(path) and is_nocow(disk) and disk.stat().st_size == 1 << 30 and allocated(disk) == 0
    write_disk(disk)
    check_layout(path, BLOCK)
    await pool.create_snapshot(VM, "s1")
    with open(disk, "r+b") as file:
        file.write(b"changed")
    await pool.restore_snapshot(VM, "s1")
    assert is_nocow(pool.block_path(VM)) and pool.block_path(VM).read_bytes()[:7] != b"changed"
    await pool.resize_block(VM, 2 << 30)
    assert pool.block_path(VM).stat().st_size == 2 << 30
    await pool.rename_volume(VM, "v2")
    moved = VM.renamed("v2")
    assert (pool.snapshot_path(moved, "s1") / "root.img").is_file()
    await pool.delete_volume(moved)
    assert not pool.volume_path(moved).exists() and not pool.snapshot_path(moved, "s1").parent.exists()


class Counting(Channel):
    def __init__(self, channel: Channel) -> None:
        super().__init__(channel.name, channel.ws)
        self.sent = 0

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        await super().send(data)


async def move(kind: type[Transport], source: Path, prepare_target: Path, pair: tuple[Channel, Channel]) -> int:
    sender = Counting(pair[0])
    out, into = kind(sender, None, []), kind(pair[1], None, [])
    try:
        await asyncio.gather(out.send(source), into.receive(prepare_target, snapshot=False,
                                                            size=(source / "root.img").stat().st_size))
    finally:
        await out.close()
        await into.close()
    return sender.sent


@pytest.mark.parametrize("kind", [BtrfsSendReceive, TarStream])
async def test_only_the_allocated_data_travels(pools: tuple[BtrfsPool, BtrfsPool, DirPool], kind: type[Transport],
                                               channels: tuple[Channel, Channel]) -> None:  # noqa: F811
    source_pool, target_pool, _ = pools
    source = await source_pool.create_volume(VM, size=1 << 30)
    write_disk(source / "root.img")
    (source / "metadata.yaml").write_text("architecture: x86_64\n")
    target = await target_pool.create_volume(VM)
    sent = await move(kind, source, target, channels)
    data = allocated(source / "root.img")
    assert data == 24 * MIB and payload(source)[0] < data + MIB
    assert data <= sent < data + 2 * MIB, f"{sent} bytes on the wire for {data} allocated"
    disk = target / "root.img"
    assert disk.stat().st_size == 1 << 30 and allocated(disk) == data  # the holes stay holes
    assert subprocess.run(["cmp", str(source / "root.img"), str(disk)]).returncode == 0
    assert is_nocow(disk)  # tar's file inherits it; a received btrfs disk is rewritten so
    check_layout(target, BLOCK)
