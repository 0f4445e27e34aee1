"""Block volumes (a VM's disk): the layout checks, the dir pool's block volumes, the negotiation of a VM
volume's transport with Stapes and Incus peers, and the block-and-rsync transport over a real websocket."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from stapes.api.errors import BadRequest
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration import protocol
from stapes.server.storage.base import BLOCK, FILESYSTEM, Volume, check_layout
from stapes.server.storage.block import (
    BlockAndRsync,
    data_windows,
    receive_block,
    send_block,
    sent_bytes,
    write_sparse,
)
from stapes.server.storage.bound import DeclaredSizeExceeded
from stapes.server.storage.btrfs import BtrfsPool
from stapes.server.storage.dir import DirPool
from stapes.server.storage.transfer import payload
from stapes.server.store.db import SnapshotRow
from stapes.server.streams import Channel

MIB = 2**20
DIR = DirPool("default", {"source": "/x"}).migration_transports
BTRFS = BtrfsPool("bt", {"source": "/x", "mount": "/x"}).migration_transports


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_a_vms_volume_is_block_in_virtual_machines() -> None:
    vm = Volume.of("virtual-machine", "p", "v1")
    assert (vm.kind, vm.content, vm.directory, vm.block) == ("virtual-machines", BLOCK, "p_v1", True)
    assert vm.renamed("v2").content == BLOCK
    assert Volume.of("container", "default", "c1").content == FILESYSTEM
    assert Volume("custom", "default", "v").content == FILESYSTEM


def test_layout_per_content(tmp_path: Path) -> None:
    container = tmp_path / "c"
    (container / "rootfs").mkdir(parents=True)
    check_layout(container, FILESYSTEM)
    with pytest.raises(BadRequest, match="not a container volume"):
        check_layout(tmp_path, FILESYSTEM)

    vm = tmp_path / "vm"
    (vm / "templates").mkdir(parents=True)
    (vm / "metadata.yaml").write_text("x")
    with pytest.raises(BadRequest, match="'root.img' is not a regular file"):
        check_layout(vm, BLOCK)
    (vm / "root.img").symlink_to("/etc/shadow")
    with pytest.raises(BadRequest, match="'root.img' is not a regular file"):
        check_layout(vm, BLOCK)
    (vm / "root.img").unlink()
    (vm / "root.img").write_bytes(b"")
    check_layout(vm, BLOCK)
    (vm / "qemu.nvram").symlink_to("/etc/passwd")  # QEMU would write the host's file
    with pytest.raises(BadRequest, match="holds a symlink, 'qemu.nvram'"):
        check_layout(vm, BLOCK)
    (vm / "qemu.nvram").unlink()
    os.mkfifo(vm / "templates" / "pipe")
    with pytest.raises(BadRequest, match="holds a special file, 'templates/pipe'"):
        check_layout(vm, BLOCK)


async def test_dir_pool_block_volumes_keep_their_holes(tmp_path: Path) -> None:
    pool = DirPool("default", {"source": str(tmp_path / "pool")})
    await pool.create_pool()
    vm = Volume.of("virtual-machine", "default", "v1")
    path = await pool.create_volume(vm, size=64 * MIB)
    disk = pool.block_path(vm)
    assert disk == path / "root.img" and path.parent.name == "virtual-machines"
    assert disk.stat().st_size == 64 * MIB and allocated(disk) == 0
    with open(disk, "r+b") as file:
        file.seek(32 * MIB)
        file.write(b"one" * 1000)
    await pool.resize_block(vm, 128 * MIB)
    assert disk.stat().st_size == 128 * MIB
    with pytest.raises(BadRequest, match="cannot shrink"):
        await pool.resize_block(vm, 64 * MIB)
    with pytest.raises(BadRequest, match="has no disk file"):
        pool.block_path(Volume.of("container", "default", "c1"))

    await pool.create_snapshot(vm, "s1")
    snap = pool.snapshot_path(vm, "s1") / "root.img"
    assert snap.stat().st_size == 128 * MIB and allocated(snap) < MIB
    with open(disk, "r+b") as file:
        file.seek(32 * MIB)
        file.write(b"two" * 1000)
    await pool.restore_snapshot(vm, "s1")
    assert allocated(disk) < MIB and disk.stat().st_size == 128 * MIB
    with open(disk, "rb") as file:
        file.seek(32 * MIB)
        assert file.read(3) == b"one"
    await pool.rename_volume(vm, "v2")
    moved = vm.renamed("v2")
    assert pool.block_path(moved).is_file() and (pool.snapshot_path(moved, "s1") / "root.img").is_file()
    await pool.delete_snapshot(moved, "s1")
    await pool.delete_volume(moved)
    assert not pool.volume_path(moved).exists()
    empty = await pool.create_volume(Volume.of("virtual-machine", "default", "empty"))
    assert (empty / "root.img").stat().st_size == 0  # to be filled (an image, a migration)


def test_a_sparse_disk_counts_its_data_only(tmp_path: Path) -> None:
    (tmp_path / "metadata.yaml").write_text("x" * 100)
    with open(tmp_path / "root.img", "wb") as file:
        file.truncate(1 << 30)
        file.seek(10 * MIB)
        file.write(os.urandom(MIB))
    data, entries = payload(tmp_path)
    assert entries == 3 and MIB <= data < MIB + 64 * 1024
    assert sent_bytes(tmp_path / "root.img") == 11 * MIB  # raw: the zeros before the data travel, not after


def test_write_sparse_skips_zero_blocks(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        data = bytes(4 * MIB) + b"x" * 4096 + bytes(4 * MIB)
        assert write_sparse(fd, MIB, data) == 4096
        os.ftruncate(fd, 10 * MIB)
    finally:
        os.close(fd)
    assert allocated(path) <= 8192
    with open(path, "rb") as file:
        file.seek(5 * MIB)
        assert file.read(4096) == b"x" * 4096


# negotiation

def _snap(name: str, config: dict[str, str] | None = None) -> SnapshotRow:
    return SnapshotRow(project="default", instance="v1", name=name, description="", config=config or {},
                       devices={}, profiles=[], created_at=1.0)


def test_stapes_to_stapes_vm_offers_its_own_transports_and_incus_block_type() -> None:
    offer = protocol.offer_header(DIR, refresh=False, total_bytes=300 * MIB, snapshots=[_snap("s1")],
                                  content=BLOCK, volume_size=10 << 30, snapshot_sizes={"s1": 8 << 30})
    assert offer.fs == pb.BLOCK_AND_RSYNC and offer.volumeSize == 10 << 30
    assert list(offer.stapesTransports) == ["tar-stream", "rsync", "block-and-rsync"]
    assert protocol.snapshot_block_size(offer, "s1") == 8 << 30
    protocol.check_offer(offer)  # Incus's `size` item is no instance key, and is accepted
    assert protocol.snapshot_row("default", "v1", offer.snapshots[0]).config == {}
    assert protocol.check_volume(offer, BLOCK, free=20 << 30, pool="default") == 10 << 30
    answer, chosen = protocol.answer_header(offer, DIR, content=BLOCK)
    assert chosen == "tar-stream" and answer.fs == pb.BLOCK_AND_RSYNC
    assert protocol.check_answer(answer, list(offer.stapesTransports), ["s1"], BLOCK) == "tar-stream"
    both_btrfs = protocol.offer_header(BTRFS, refresh=False, total_bytes=1, content=BLOCK, volume_size=1)
    assert protocol.answer_header(both_btrfs, BTRFS, content=BLOCK)[1] == "btrfs"
    assert protocol.answer_header(both_btrfs, DIR, content=BLOCK)[1] == "tar-stream"
    # a refresh updates the copy in place with rsync: only what changed travels
    assert protocol.answer_header(offer, DIR, refresh=True, content=BLOCK)[1] == "rsync"
    with pytest.raises(ValueError):  # a block offer always says its sizes
        protocol.offer_header(DIR, refresh=False, total_bytes=1, content=BLOCK)


def test_containers_negotiate_as_before() -> None:
    offer = protocol.offer_header(BTRFS, refresh=False, total_bytes=1)
    assert offer.fs == pb.RSYNC and not offer.HasField("volumeSize")
    assert list(offer.stapesTransports) == ["btrfs", "tar-stream", "rsync"]
    assert protocol.answer_header(offer, DIR)[1] == "tar-stream"
    assert protocol.answer_header(offer, DIR, refresh=True)[1] == "rsync"
    incus = pb.MigrationHeader(fs=pb.RSYNC)
    assert protocol.answer_header(incus, BTRFS)[1] == "rsync"
    assert protocol.check_volume(offer, FILESYSTEM, free=0, pool="p") is None


@pytest.mark.parametrize("incus_fs", [pb.BLOCK_AND_RSYNC, pb.BTRFS])  # an Incus dir pool's VM, a btrfs one's
def test_an_incus_vm_arrives_by_block_and_rsync(incus_fs: pb.MigrationFSType) -> None:
    offer = pb.MigrationHeader(fs=incus_fs, volumeSize=10 << 30, snapshotNames=["s1"], snapshots=[
        pb.Snapshot(name="s1", ephemeral=False, architecture=2, stateful=False,
                    localConfig=[pb.Config(key="size", value=str(4 << 30))])])
    protocol.check_offer(offer)
    assert protocol.check_volume(offer, BLOCK, free=50 << 30, pool="p") == 10 << 30
    for receivable in (DIR, BTRFS, ("rsync",)):  # never plain rsync: Incus's sender would not match it
        answer, chosen = protocol.answer_header(offer, receivable, content=BLOCK)
        assert chosen == "block-and-rsync" and answer.fs == pb.BLOCK_AND_RSYNC
        assert protocol.answer_header(offer, receivable, refresh=True, content=BLOCK)[1] == "block-and-rsync"
    assert protocol.snapshot_block_size(offer, "s1") == 4 << 30


def test_a_stapes_vm_goes_to_incus_by_block_and_rsync() -> None:
    offer = protocol.offer_header(DIR, refresh=False, total_bytes=1, content=BLOCK, volume_size=1 << 30)
    incus_answer = pb.MigrationHeader(fs=pb.BLOCK_AND_RSYNC)  # Incus's TypesToHeader of its match
    assert protocol.check_answer(incus_answer, list(offer.stapesTransports), [], BLOCK) == "block-and-rsync"
    with pytest.raises(protocol.ProtocolError, match="answered with fs type RSYNC for a virtual machine's"):
        protocol.check_answer(pb.MigrationHeader(fs=pb.RSYNC), list(offer.stapesTransports), [], BLOCK)


def test_what_cannot_be_exchanged_is_refused_before_any_transfer() -> None:
    vm = pb.MigrationHeader(fs=pb.BLOCK_AND_RSYNC, volumeSize=10 << 30)
    with pytest.raises(protocol.ProtocolError, match="sends a virtual machine's volume, but the instance created "
                                                     "here is a container"):
        protocol.check_volume(vm, FILESYSTEM, free=1 << 40, pool="p")
    with pytest.raises(protocol.ProtocolError, match="sends a container's volume, but .* a virtual machine"):
        protocol.check_volume(pb.MigrationHeader(fs=pb.RSYNC), BLOCK, free=1 << 40, pool="p")
    with pytest.raises(protocol.ProtocolError, match="has 5.0 GiB free, and the disk of the instance is 10.0 GiB"):
        protocol.check_volume(vm, BLOCK, free=5 << 30, pool="p")
    live = pb.MigrationHeader(fs=pb.BLOCK_AND_RSYNC, volumeSize=1, criu=pb.VM_QEMU)
    with pytest.raises(protocol.ProtocolError, match="live move of the virtual machine"):
        protocol.check_volume(live, BLOCK, free=1 << 40, pool="p")
    stateful = pb.MigrationHeader(fs=pb.BLOCK_AND_RSYNC, volumeSize=1, snapshotNames=["s"], snapshots=[
        pb.Snapshot(name="s", ephemeral=False, architecture=2, stateful=True)])
    with pytest.raises(protocol.ProtocolError, match="snapshot 's' is stateful"):
        protocol.check_volume(stateful, BLOCK, free=1 << 40, pool="p")
    unsized = pb.MigrationHeader(fs=pb.BLOCK_AND_RSYNC, volumeSize=0)
    with pytest.raises(protocol.ProtocolError, match="without its size"):
        protocol.check_volume(unsized, BLOCK, free=1 << 40, pool="p")
    bad_snapshot = pb.MigrationHeader(fs=pb.BLOCK_AND_RSYNC, volumeSize=1, snapshotNames=["s"], snapshots=[
        pb.Snapshot(name="s", ephemeral=False, architecture=2, stateful=False,
                    localConfig=[pb.Config(key="size", value="lots")])])
    with pytest.raises(protocol.ProtocolError, match="not a number"):
        protocol.check_volume(bad_snapshot, BLOCK, free=1 << 40, pool="p")


# the block-and-rsync transport, over a real websocket

class Counting(Channel):
    def __init__(self, channel: Channel) -> None:
        super().__init__(channel.name, channel.ws)
        self.sent = 0

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        await super().send(data)


async def test_block_and_rsync_keeps_holes(tmp_path: Path, channels: tuple[Channel, Channel]) -> None:
    source, target = tmp_path / "src", tmp_path / "dst"
    (source / "templates").mkdir(parents=True)
    target.mkdir()
    (source / "metadata.yaml").write_text("architecture: x86_64\n")
    (source / "templates" / "hostname.tpl").write_text("{{ container.name }}\n")
    with open(source / "root.img", "wb") as file:
        file.truncate(256 * MIB)
        file.seek(8 * MIB)
        file.write(os.urandom(2 * MIB))
        file.seek(100 * MIB)
        file.write(os.urandom(MIB))
    sender, receiver = Counting(channels[0]), channels[1]
    size = (source / "root.img").stat().st_size
    await asyncio.gather(BlockAndRsync(sender, None, ["xattrs"]).send(source),
                         BlockAndRsync(receiver, None, []).receive(target, snapshot=False, size=size))
    assert subprocess.run(["cmp", str(source / "root.img"), str(target / "root.img")]).returncode == 0
    assert (target / "templates" / "hostname.tpl").read_text() == "{{ container.name }}\n"
    assert (target / "root.img").stat().st_size == size
    assert allocated(target / "root.img") <= allocated(source / "root.img")  # holes stay holes
    assert 101 * MIB <= sender.sent < 102 * MIB  # raw up to the last data (Incus's format), none after it


async def test_block_receive_holds_the_source_to_its_size(tmp_path: Path,
                                                         channels: tuple[Channel, Channel]) -> None:
    async def send() -> None:
        for _ in range(3):
            await channels[0].send(b"x" * MIB)
        await channels[0].barrier()

    with pytest.raises(DeclaredSizeExceeded):
        await asyncio.gather(send(), receive_block(tmp_path / "root.img", channels[1], None, None, 2 * MIB))
    (tmp_path / "link.img").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BadRequest, match="not a regular file"):
        await receive_block(tmp_path / "link.img", channels[1], None, None, MIB)
    assert not (tmp_path / "elsewhere").exists()


class Recording:
    """A channel that only counts: each message's length and the bytes' digest."""

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.digest = hashlib.sha256()

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        self.lengths.append(len(data))
        self.digest.update(data)

    async def barrier(self) -> None:
        self.lengths.append(-1)


def _striped(path: Path, size: int, stripe: int = 4096) -> None:
    """A disk whose guest discarded every other 4 KiB block: data, hole, data, hole..."""
    with open(path, "wb") as file:
        file.truncate(size)
        block = os.urandom(stripe)
        for offset in range(0, size, 2 * stripe):
            os.pwrite(file.fileno(), block, offset)


async def test_a_disk_striped_with_holes_is_sent_in_whole_windows_lazily(tmp_path: Path) -> None:
    """The guest decides the extent map: 4 KiB of data, 4 KiB of hole, over the whole disk. The sender keeps one
    window in memory (not a list of every piece) and sends one message per MiB window, not one per extent."""
    disk = tmp_path / "root.img"
    size = 128 * MIB
    await asyncio.to_thread(_striped, disk, size)
    channel = Recording()
    tracemalloc.start()
    try:
        sent = await send_block(disk, channel, None)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent == size == sent_bytes(disk)
    assert channel.lengths[-1] == -1 and len(channel.lengths) - 1 == size // MIB  # one message per window
    assert peak < 2.5 * MIB, peak  # a window or two, never a map of the disk's 32768 extents
    with open(disk, "rb") as file:
        assert channel.digest.hexdigest() == hashlib.sha256(file.read()).hexdigest()


async def test_hole_windows_are_not_read_and_the_receiver_keeps_them_holes(
        tmp_path: Path, channels: tuple[Channel, Channel]) -> None:
    disk, copy = tmp_path / "root.img", tmp_path / "copy.img"
    with open(disk, "wb") as file:
        file.truncate(64 * MIB)
        os.pwrite(file.fileno(), os.urandom(4096), 5 * MIB + 4096)  # one window with a little data
        os.pwrite(file.fileno(), os.urandom(4096), 40 * MIB)
    with open(disk, "rb", buffering=0) as file:
        assert [(o // MIB, has) for o, _, has in data_windows(file.fileno(), 64 * MIB) if has] == \
            [(5, True), (40, True)]
    await asyncio.gather(send_block(disk, channels[0], None),
                         receive_block(copy, channels[1], None, None, 64 * MIB))
    assert subprocess.run(["cmp", str(disk), str(copy)]).returncode == 0
    assert allocated(copy) <= 64 * 1024  # the two data blocks (and the filesystem's rounding), the rest holes


def _peer_snap(**devices: dict[str, str]) -> pb.Snapshot:
    return pb.Snapshot(name="s0", ephemeral=False, architecture=0, stateful=False, localDevices=[
        pb.Device(name=n, config=[pb.Config(key=k, value=v) for k, v in d.items()]) for n, d in devices.items()])


def test_a_peers_snapshot_devices_reach_the_host_only_as_the_instances_own() -> None:
    own = {"eth0": {"type": "nic", "nictype": "bridged", "parent": "br0", "name": "eth0"},
           "share": {"type": "disk", "source": "/srv/share", "path": "/mnt", "readonly": "true"},
           "root": {"type": "disk", "path": "/", "pool": "default"}}
    protocol.check_snapshot_devices(_peer_snap(**own), own)  # the instance's own: taken
    inside_only = _peer_snap(eth0={**own["eth0"], "name": "lan"}, share={**own["share"], "path": "/x"},
                             data={"type": "disk", "pool": "default", "source": "v", "path": "/d"},
                             eth1={"type": "nic", "network": "stapesbr0"})
    protocol.check_snapshot_devices(inside_only, own)
    refused = {
        "vm nic on another host bridge": _peer_snap(eth0={**own["eth0"], "parent": "virbr0"}),
        "a host bridge not the instance's": _peer_snap(eth5={"type": "nic", "nictype": "bridged", "parent": "br0"}),
        "the host's root": _peer_snap(hostroot={"type": "disk", "source": "/", "path": "/mnt"}),
        "writable where the instance's is read-only": _peer_snap(share={**own["share"], "readonly": "false"}),
        "another host path": _peer_snap(share={**own["share"], "source": "/etc"}),
        "an unknown type": _peer_snap(gpu={"type": "gpu"}),
    }
    for what, snap in refused.items():
        with pytest.raises(protocol.ProtocolError, match="reaches the host.*--instance-only"):
            protocol.check_snapshot_devices(snap, own)
            pytest.fail(what)
