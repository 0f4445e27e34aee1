"""A hostile live source: the checkpoint it sends must never make the target read, write, mount or execute
anything outside the instance's own root and devices. The test plays the source of a live push move byte by
byte (the volume by tar, the final pass by a real rsync, the state on the `criu` channel) and sends crafted
checkpoints: device nodes, FIFOs, hard links, oversized pages (streamed and in the tar), crafted mount and
file images (CRIU's own images from a real busybox dump, changed with pycriu). Each is refused with a clear
error, the operation fails, and the target keeps nothing: no instance, no volume, no working directory."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from stapes.server.instances import criu_images
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.storage.transfer import rsync_send
from stapes.server.streams import Channel
from tests.integration import counter
from tests.integration.harness import Cli, Server
from tests.integration.hostile import HostileSource, Raw, add_dir, control, tar_of

DATA = Path(__file__).parent.parent / "unit/data/criu/unprivileged"
MEMORY = 8 << 20  # the instance's limits.memory: a checkpoint may hold this, an eighth more, and 64 MiB


def _header(streamed: bool) -> bytes:
    return pb.MigrationHeader(
        fs=pb.RSYNC, criu=pb.CRIU_RSYNC, stapesTransports=["tar-stream"], stapesTotalBytes=1 << 20,
        stapesStreamedState=streamed,
        rsyncFeatures=pb.rsyncFeatures(xattrs=False, delete=True, compress=False, bidirectional=False),
    ).SerializeToString()


class LiveSource(HostileSource):
    """The source of a live push move: its header says CRIU_RSYNC, its state goes on the `criu` channel."""

    criu: aiohttp.ClientWebSocketResponse | None = None

    async def start_live(self) -> None:
        status, body = await self.raw.call("POST", "/1.0/instances", {
            "name": self.name, "config": {"limits.memory": f"{MEMORY >> 20}MiB"},
            "source": {"type": "migration", "mode": "push", "live": True}})
        assert status == 202, body
        self.op = body["metadata"]
        secrets = self.op["metadata"]
        self.control = await self.raw.ws(self.op, secrets["control"])
        self.fs = await self.raw.ws(self.op, secrets["fs"])
        self.criu = await self.raw.ws(self.op, secrets["criu"])

    async def close(self) -> None:
        await super().close()
        if self.criu is not None:
            await self.criu.close()


async def _move(server: Server, tmp_path: Path, state: bytes | Callable[[Channel], Any], *,
                streamed: bool = False) -> str:
    """One live move into `server` whose final checkpoint is `state` (a tar, or a coroutine function sending
    on the criu channel); returns the target's error."""
    volume = tmp_path / "volume"
    (volume / "rootfs").mkdir(parents=True)
    async with Raw(server) as raw:
        peer = LiveSource(raw, "victim")
        await peer.start_live()
        try:
            answer = await peer.offer(_header(streamed))
            assert answer is not None
            reply = pb.MigrationHeader()
            reply.ParseFromString(answer)
            assert reply.criu == pb.CRIU_RSYNC and reply.stapesStreamedState == streamed
            await peer.send_stream(tar_of(lambda tar: (add_dir(tar, "."), add_dir(tar, "rootfs"))))
            assert peer.criu is not None and peer.fs is not None and peer.control is not None
            criu = Channel("criu", peer.criu)

            async def send_state() -> None:
                if streamed and not callable(state):
                    await criu.barrier()  # no pages followed while the checkpoint ran
                if callable(state):
                    await state(criu)
                    return
                for start in range(0, len(state), 1 << 16):
                    await criu.send(state[start:start + (1 << 16)])
                await criu.barrier()

            sending = [asyncio.ensure_future(send_state()),
                       asyncio.ensure_future(rsync_send(volume, Channel("fs", peer.fs), None, ["delete"]))]
            await asyncio.wait(sending, timeout=60)
            for task in sending:
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
            await asyncio.gather(peer.control.send_bytes(control(True)), return_exceptions=True)
            result = await raw.wait(peer.op, 120)
        finally:
            await peer.close()
        assert result["status"] == "Failure", result
        status, body = await raw.call("GET", "/1.0/instances")
        assert not [url for url in body["metadata"] if url.endswith("/victim")], body
    assert not (server.state_dir / "storage-pools/default/containers/victim").exists()
    assert not (server.state_dir / "containers/victim").exists()
    migrations = server.state_dir / "migrations"
    assert not migrations.exists() or not list(migrations.iterdir()), list(migrations.iterdir())
    return str(result["err"])


def _state_tar(directory: Path, extra: Callable[[tarfile.TarFile], None] | None = None) -> bytes:
    """A checkpoint as the source's GNU tar sends it (`./` and the files), plus crafted members."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(directory, arcname=".")
        if extra is not None:
            extra(tar)
    return out.getvalue()


def _checkpoint(tmp_path: Path) -> Path:
    """The images of a real busybox dump (its mounts, open files, page maps), with pages of their size."""
    final = tmp_path / "final"
    shutil.copytree(DATA, final)
    with (final / "pages-1.img").open("wb") as pages:
        pages.truncate(73728)
    with (final / "pages-2.img").open("wb") as pages:
        pages.truncate(69632)
    return final


def _member(name: str, kind: bytes, *, linkname: str = "", size: int = 0, major: int = 0, minor: int = 0
            ) -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.linkname, info.size = kind, 0o644, linkname, size
        info.devmajor, info.devminor = major, minor
        tar.addfile(info, io.BytesIO(b"\0" * size) if size else None)
    return add


def _loop_device() -> tuple[int, int]:
    """A host block device the checkpoint's node would point at (any loop device's numbers)."""
    for name in sorted(os.listdir("/dev")):
        if name.startswith("loop") and name[4:].isdigit():
            rdev = os.stat(f"/dev/{name}").st_rdev
            return os.major(rdev), os.minor(rdev)
    return 7, 0


def _no_node_below(root: Path) -> None:
    for top, _dirs, files in os.walk(root):
        for name in files:
            mode = os.lstat(os.path.join(top, name)).st_mode
            assert not (stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)), os.path.join(top, name)


async def test_a_block_device_as_pages_is_refused(s1: Server, tmp_path: Path) -> None:
    """The issue's exploit: pages-N.img a block-device node (mode 0644) pointing at a loop device."""
    major, minor = _loop_device()
    final = _checkpoint(tmp_path)
    (final / "pages-2.img").unlink()
    err = await _move(s1, tmp_path, _state_tar(final, _member("./pages-2.img", tarfile.BLKTYPE, major=major,
                                                              minor=minor)))
    assert "'pages-2.img', a block device" in err and "refused" in err, err
    _no_node_below(s1.state_dir)


async def test_a_fifo_is_refused(s1: Server, tmp_path: Path) -> None:
    final = _checkpoint(tmp_path)
    (final / "pages-2.img").unlink()
    err = await _move(s1, tmp_path, _state_tar(final, _member("./pages-2.img", tarfile.FIFOTYPE)))
    assert "'pages-2.img', a FIFO" in err and "refused" in err, err
    _no_node_below(s1.state_dir)


async def test_a_hard_link_is_refused(s1: Server, tmp_path: Path) -> None:
    """A hard link to a host file (or to another image) would have CRIU read that file as memory."""
    final = _checkpoint(tmp_path)
    (final / "pages-2.img").unlink()
    err = await _move(s1, tmp_path, _state_tar(final, _member("./pages-2.img", tarfile.LNKTYPE,
                                                              linkname="/etc/shadow")))
    assert "'pages-2.img' -> '/etc/shadow', a hard link" in err and "refused" in err, err


async def test_a_symlink_other_than_a_parent_round_is_refused(s1: Server, tmp_path: Path) -> None:
    final = _checkpoint(tmp_path)
    (final / "pages-2.img").unlink()
    err = await _move(s1, tmp_path, _state_tar(final, _member("./pages-2.img", tarfile.SYMTYPE,
                                                              linkname="/dev/loop0")))
    assert "a symbolic link" in err and "refused" in err, err


async def test_oversized_pages_in_the_tar_are_refused_before_they_are_written(s1: Server, tmp_path: Path) -> None:
    """The tar's header says the size: refused when it is read, before a byte of the file is written."""
    header = tarfile.TarInfo("./pages-1.img")
    header.size = 1 << 40  # a TiB: the disk would fill
    err = await _move(s1, tmp_path, header.tobuf(format=tarfile.GNU_FORMAT))
    assert "is larger than this instance's memory allows" in err, err


async def test_oversized_streamed_pages_are_refused_while_they_arrive(s1: Server, tmp_path: Path) -> None:
    """Pages streamed while the checkpoint runs (stapesStreamedState) count against the same bound."""
    chunk = bytes([len(b"pages-1.img")]) + b"pages-1.img" + b"\0" * (1 << 20)

    async def flood(criu: Channel) -> None:
        for _ in range((MEMORY >> 20) * 2 + 80):  # beyond memory + an eighth + 64 MiB
            await criu.send(chunk)
        await criu.barrier()

    err = await _move(s1, tmp_path, flood, streamed=True)
    assert "is larger than this instance's memory allows" in err, err


async def test_a_crafted_mountpoints_image_is_refused(s1: Server, tmp_path: Path) -> None:
    """`--ext-mount-map auto` would bind the host path in an autodetected mount's `source` into the container."""
    final = _checkpoint(tmp_path)
    pycriu = criu_images._pycriu()
    image = final / "mountpoints-13.img"
    decoded = pycriu.images.load(image.open("rb"), pretty=True)
    null = next(e for e in decoded["entries"] if e["mountpoint"] == "/dev/null")
    null["source"], null["mountpoint"], null["root"] = "/etc", "/mnt", "/"
    null["parent_mnt_id"] = next(e for e in decoded["entries"] if e["mountpoint"] == "/")["mnt_id"]
    pycriu.images.dump(decoded, image.open("wb"))
    err = await _move(s1, tmp_path, _state_tar(final))
    assert "binds the host's '/etc' on '/mnt' (an autodetected external mount): refused" in err, err


async def test_a_crafted_file_path_image_is_refused(s1: Server, tmp_path: Path) -> None:
    final = _checkpoint(tmp_path)
    pycriu = criu_images._pycriu()
    image = final / "files.img"
    decoded = pycriu.images.load(image.open("rb"), pretty=True)
    decoded["entries"][0]["reg"]["name"] = "/../../../etc/shadow"
    pycriu.images.dump(decoded, image.open("wb"))
    err = await _move(s1, tmp_path, _state_tar(final))
    assert "names an open file '/../../../etc/shadow', which is not a plain absolute path: refused" in err, err


@pytest.mark.parametrize("name", ["../escape.img", "passwd"])
async def test_names_a_checkpoint_never_writes_are_refused(s1: Server, tmp_path: Path, name: str) -> None:
    final = _checkpoint(tmp_path)
    err = await _move(s1, tmp_path, _state_tar(final, _member(name, tarfile.REGTYPE, size=10)))
    assert "refused" in err and ("not a plain name" in err or "not one a checkpoint writes" in err), err
    assert not (s1.state_dir / "escape.img").exists()


async def test_a_crafted_cgroup_image_is_refused(s1: Server, tmp_path: Path) -> None:
    """liblxc restores with --manage-cgroups=full: CRIU writes each property to <cgroup>/<name>, as root."""
    final = _checkpoint(tmp_path)
    pycriu = criu_images._pycriu()
    image = final / "cgroup.img"
    decoded = pycriu.images.load(image.open("rb"), pretty=True)
    decoded["entries"][0]["controllers"][0]["dirs"][0]["properties"].append(
        {"name": "../../release_agent", "value": "/tmp/pwned"})
    pycriu.images.dump(decoded, image.open("wb"))
    err = await _move(s1, tmp_path, _state_tar(final))
    assert "sets a cgroup property '../../release_agent', which is not a plain name: refused" in err, err


def _host_block_device() -> str:
    """Some block device of the host, as major:minor (a disk, a loop device: whatever is there)."""
    for entry in sorted(Path("/sys/dev/block").iterdir()):
        return entry.name
    pytest.skip("this host has no block device")


def test_a_restored_privileged_container_keeps_its_device_rules(s1: Server, s2: Server, two: Cli) -> None:
    """CRIU leaves a restored container's devices cgroup open to every device: a privileged container moved
    live could make a node for a host disk and read it. The target sets its rules again after the restore."""
    major, minor = _host_block_device().split(":")
    read_disk = ["sh", "-c", f"rm -f /tmp/disk; mknod /tmp/disk b {major} {minor} && head -c 1 /tmp/disk >/dev/null"]
    two.run("launch", "s1:busybox", "c1", "-q", "-c", "security.privileged=true")
    denied = two.run("exec", "s1:c1", "--", *read_disk, check=False)
    assert denied.returncode != 0 and "Operation not permitted" in denied.stderr, denied
    counter.start(lambda command: two.run("exec", "s1:c1", "--", *command, check=False).stdout)
    two.run("move", "s1:c1", "s2:")
    assert two.json("list", "s2:")[0]["status"] == "Running"
    after = two.run("exec", "s2:c1", "--", *read_disk, check=False)
    assert after.returncode != 0 and "Operation not permitted" in after.stderr, after
    assert two.run("exec", "s2:c1", "--", "sh", "-c", "echo x > /dev/null").returncode == 0
