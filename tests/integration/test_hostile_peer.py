"""A migration peer that lies: everything it sends is checked before a byte is written, and nothing it sends
reaches outside the target's state directory or leaves a partial instance behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stapes.server.migration import migrate_pb2 as pb
from tests.integration.harness import Cluster, Server
from tests.integration.hostile import (
    HostileSource,
    Raw,
    add_device,
    add_dir,
    add_file,
    add_link,
    header,
    tar_of,
)


def _files_below(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


async def _instances(raw: Raw) -> list[str]:
    status, body = await raw.call("GET", "/1.0/instances")
    assert status == 200
    return sorted(url.rsplit("/", 1)[-1] for url in body["metadata"])


def _assert_nothing_left(server: Server, name: str) -> None:
    assert not (server.state_dir / "storage-pools/default/containers" / name).exists()
    assert not (server.state_dir / "storage-pools/default/containers-snapshots" / name).exists()
    assert not (server.state_dir / "containers" / name).exists()


async def _refused_offer(server: Server, name: str, offer: bytes) -> str:
    async with Raw(server) as raw:
        peer = HostileSource(raw, name)
        await peer.start()
        await peer.offer(offer)
        await peer.close()
        result = await raw.wait(peer.op)
        assert result["status"] == "Failure", result
        assert name not in await _instances(raw)
    _assert_nothing_left(server, name)
    return str(result["err"])


async def test_snapshot_names_that_escape_are_refused(s1: Server) -> None:
    before = _files_below(s1.state_dir.parent)
    for bad in ("../../../../escape", "a/b", "..", "", "x" * 300):
        snap = pb.Snapshot(name=bad, ephemeral=False, architecture=0, stateful=False)
        err = await _refused_offer(s1, "victim", header(snapshots=[snap]))
        assert "snapshot" in err.lower() and ("Protocol error" in err or "Refused" in err), err
    created = {p for p in _files_below(s1.state_dir.parent) - before if "escape" in p}
    assert not created
    assert not Path("/escape").exists()


async def test_snapshot_config_and_devices_checked_as_the_rest_api_does(s1: Server) -> None:
    cases = {
        "limits.bogus": pb.Snapshot(name="s0", ephemeral=False, architecture=0, stateful=False,
                                    localConfig=[pb.Config(key="limits.bogus", value="1")]),
        "raw.lxc": pb.Snapshot(name="s0", ephemeral=False, architecture=0, stateful=False,
                               localConfig=[pb.Config(key="raw.lxc", value="lxc.mount.entry = / host none bind")]),
        "unsupported type": pb.Snapshot(name="s0", ephemeral=False, architecture=0, stateful=False,
                                        localDevices=[pb.Device(name="d", config=[pb.Config(key="type",
                                                                                            value="unix-char")])]),
        "nosuchprofile": pb.Snapshot(name="s0", ephemeral=False, architecture=0, stateful=False,
                                     profiles=["nosuchprofile"]),
    }
    for expected, snap in cases.items():
        err = await _refused_offer(s1, "victim", header(snapshots=[snap]))
        assert expected in err, err
    assert "twice" in await _refused_offer(s1, "victim", header(names=["a", "a"]))
    assert "impossible size" in await _refused_offer(s1, "victim", header(total=-5))


def _snapshot_with(*devices: tuple[str, dict[str, str]]) -> pb.Snapshot:
    return pb.Snapshot(name="s0", ephemeral=False, architecture=0, stateful=False, profiles=["default"],
                       localDevices=[pb.Device(name=name, config=[pb.Config(key=k, value=v) for k, v in config.items()])
                                     for name, config in devices])


async def test_snapshot_devices_that_reach_the_host_are_refused(s1: Server, tmp_path: Path) -> None:
    """A snapshot's devices are applied when it is restored: from a peer, they are held to what the server
    takes from a client (pools, volumes, networks that exist) and what reaches the host (a host path, a host
    bridge) must be the instance's own, as the client's request gave it."""
    share = {"type": "disk", "source": str(tmp_path), "path": "/mnt"}
    cases = {
        "'hostroot' (type=disk, source=/) reaches the host": _snapshot_with(
            ("hostroot", {"type": "disk", "source": "/", "path": "/mnt"})),
        "'eth9' (type=nic, nictype=bridged, parent=stapesbr9) reaches the host": _snapshot_with(
            ("eth9", {"type": "nic", "nictype": "bridged", "parent": "stapesbr9"})),
        "'share' (type=disk, source=/) reaches the host, and the instance's own device 'share' is different":
            _snapshot_with(("share", {**share, "source": "/"})),
        "attaches storage volume 'nosuchvolume'": _snapshot_with(
            ("data", {"type": "disk", "pool": "default", "source": "nosuchvolume", "path": "/data"})),
        "Storage pool 'nosuchpool'": _snapshot_with(
            ("data", {"type": "disk", "pool": "nosuchpool", "source": "v", "path": "/data"})),
    }
    for expected, snap in cases.items():
        async with Raw(s1) as raw:
            peer = HostileSource(raw, "victim")
            await peer.start(devices={"share": share})
            reply = await peer.offer(header(snapshots=[snap]))  # refused instead of an answer: nothing is sent
            assert reply is None or not pb.MigrationHeader.FromString(reply).stapesTransports
            await peer.close()
            result = await raw.wait(peer.op)
            assert result["status"] == "Failure", result
            assert "victim" not in await _instances(raw)
        _assert_nothing_left(s1, "victim")
        err = str(result["err"])
        assert expected in err and "snapshot 's0'" in err and "--instance-only" in err, err
    # The instance's own host path device, as the client's request gave it, is taken in a snapshot.
    async with Raw(s1) as raw:
        peer = HostileSource(raw, "victim")
        await peer.start(devices={"share": share})
        reply = await peer.offer(header(snapshots=[_snapshot_with(("share", share))]))
        assert reply is not None and pb.MigrationHeader.FromString(reply).stapesTransports == ["tar-stream"]
        await peer.close()
        await raw.wait(peer.op)
        if "victim" in await _instances(raw):
            await raw.wait((await raw.call("DELETE", "/1.0/instances/victim"))[1]["metadata"])


@pytest.mark.parametrize("payload", ["garbage", "truncated", "oversized", "empty"])
async def test_malformed_headers_are_refused(s1: Server, payload: str) -> None:
    valid = header(snapshots=[pb.Snapshot(name="s0", ephemeral=False, architecture=0, stateful=False)])
    data = {"garbage": b"\xff\x00\x13garbage", "truncated": valid[: len(valid) // 2],
            "oversized": b"\x22" + b"\x00" * (2 << 20), "empty": b""}[payload]
    err = await _refused_offer(s1, "victim", data)
    assert "Protocol error" in err, err


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=512),
                      st.builds(lambda names, size: header(names=names, total=size),
                                st.lists(st.text(max_size=20), max_size=5),
                                st.integers(min_value=-(2**63), max_value=2**63 - 1))))
def test_any_header_bytes_never_crash_the_target(s1: Server, data: bytes) -> None:
    async def one() -> None:
        async with Raw(s1) as raw:
            peer = HostileSource(raw, "fuzzed")
            await peer.start()
            await peer.offer(data)
            await peer.close()
            result = await raw.wait(peer.op)
            assert result["status"] in ("Failure", "Success"), result
            assert "Internal error" not in result["err"], result["err"]
            if result["status"] == "Success":
                await raw.wait((await raw.call("DELETE", "/1.0/instances/fuzzed"))[1]["metadata"])

    asyncio.run(one())
    assert s1.proc is not None and s1.proc.poll() is None


async def test_file_streams_cannot_escape(s1: Server, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("original")

    def build(tar: tarfile.TarFile) -> None:
        add_dir(tar, "rootfs")
        add_file(tar, f"../../../../../../../..{outside}/dotdot", b"escaped by ..")
        add_file(tar, f"rootfs/../../../../../../../..{outside}/inner-dotdot", b"escaped by ..")
        add_link(tar, "rootfs/evil", str(outside))
        add_file(tar, "rootfs/evil/through-symlink", b"escaped through a symlink")
        add_link(tar, "rootfs/hard", str(outside / "target"), hard=True)
        add_file(tar, "rootfs/hard", b"overwritten through a hard link")
        add_link(tar, "rootfs/hard2", f"../../../../../../../..{outside}/target", hard=True)
        add_device(tar, "rootfs/disk", 7, 0)
        add_link(tar, "rootfs/etc", str(outside))  # the hostname is written into the rootfs, not here

    async with Raw(s1) as raw:
        peer = HostileSource(raw, "escaper")
        await peer.start()
        await peer.offer(header())
        await peer.send_stream(tar_of(build))
        await peer.finish()
        await peer.close()
        if "escaper" in await _instances(raw):
            await raw.wait((await raw.call("DELETE", "/1.0/instances/escaper"))[1]["metadata"])
    assert sorted(p.name for p in outside.iterdir()) == ["target"]
    assert (outside / "target").read_text() == "original"
    _assert_nothing_left(s1, "escaper")


async def test_a_symlinked_rootfs_is_refused(s1: Server, tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_link(tar, "rootfs", str(tmp_path))

    async with Raw(s1) as raw:
        peer = HostileSource(raw, "rooted")
        await peer.start()
        await peer.offer(header())
        await peer.send_stream(tar_of(build))
        result = await peer.finish()
        await peer.close()
        assert result["status"] == "Failure" and "rootfs" in result["err"], result
        assert "rooted" not in await _instances(raw)
    _assert_nothing_left(s1, "rooted")
    assert list(tmp_path.iterdir()) == []


async def test_a_silent_peer_is_dropped_and_leaves_nothing(cluster: Cluster) -> None:
    server = cluster.server("quiet", "127.0.0.3", env={"STAPES_MIGRATION_IDLE_TIMEOUT": "3"})
    async with Raw(server) as raw:
        peer = HostileSource(raw, "waiting")
        await peer.start()  # connected, then says nothing at all
        started = time.monotonic()
        result = await raw.wait(peer.op, timeout=60)
        waited = time.monotonic() - started
        await peer.close()
        assert result["status"] == "Failure" and "stopped responding" in result["err"], result
        assert waited < 30
        assert "waiting" not in await _instances(raw)
    _assert_nothing_left(server, "waiting")
    assert "stopped responding" in server.log()  # a failed migration leaves a line in the daemon's log


async def test_websocket_secrets_open_once_and_never_after_the_end(s1: Server) -> None:
    async with Raw(s1) as raw, Raw(s1, cert_dir=s1.state_dir.parent / "stranger", unix=False) as stranger:
        peer = HostileSource(raw, "once")
        await peer.start()
        secret = peer.op["metadata"]["control"]
        status, body = await stranger.call("GET", f"/1.0/operations/{peer.op['id']}/websocket?secret={secret}")
        assert status == 403 and "already used" in body["error"], body
        await peer.close()
        await raw.wait(peer.op)
        status, body = await stranger.call("GET", f"/1.0/operations/{peer.op['id']}/websocket?secret={secret}")
        assert status in (403, 404), body


@contextlib.contextmanager
def _small_pool(server: Server, where: Path, size_mib: int) -> Iterator[Path]:
    """A dir pool `small` on a tmpfs of its own: what a transfer writes there, and when it fills, shows."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}M", "tmpfs", str(where)], check=True)
    try:
        server.api("POST", "/1.0/storage-pools", {"name": "small", "driver": "dir",
                                                  "config": {"source": str(where / "pool")}})
        yield where / "pool"
    finally:
        with contextlib.suppress(Exception):
            server.api("DELETE", "/1.0/storage-pools/small")
        subprocess.run(["umount", "-l", str(where)], check=False)


def _big_rootfs(mib: int) -> bytes:
    def build(tar: tarfile.TarFile) -> None:
        add_dir(tar, "rootfs")
        for n in range(mib // 8):
            add_file(tar, f"rootfs/blob{n}", os.urandom(8 << 20))

    return tar_of(build)


async def _push_too_much(server: Server, name: str, offer: bytes, stream: bytes) -> dict[str, Any]:
    async with Raw(server) as raw:
        peer = HostileSource(raw, name)
        await peer.start(devices={"root": {"type": "disk", "path": "/", "pool": "small"}})
        await peer.offer(offer)
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            await peer.send_stream(stream)  # the target may hang up before it has all
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
            await peer.finish()
        result = await raw.wait(peer.op)
        await peer.close()
        assert name not in await _instances(raw)
    return result


async def test_a_source_is_held_to_the_size_it_declared(s1: Server, tmp_path: Path) -> None:
    """A header declaring 1 MiB, then 64 MiB of tar: stopped at 1 MiB plus the stated margin (17 MiB)."""
    with _small_pool(s1, tmp_path / "small", 128) as pool:
        result = await _push_too_much(s1, "liar", header(total=1 << 20), _big_rootfs(64))
        assert result["status"] == "Failure", result
        err = str(result["err"])
        assert "more than it declared" in err and "1.0 MiB declared" in err, err
        arrived = float(re.search(r"([0-9.]+) MiB arrived", err).group(1))  # type: ignore[union-attr]
        assert arrived <= 17.2, err
        assert not any((pool / "containers").iterdir())
    _assert_nothing_left(s1, "liar")


async def test_a_transfer_stops_before_the_pool_fills(s1: Server, tmp_path: Path) -> None:
    """A source declaring much (or, as Incus's rsync, nothing) cannot fill the pool: it stops with room left."""
    with _small_pool(s1, tmp_path / "small", 48) as pool:
        lowest = [1 << 40]
        sampling = True

        def sample() -> None:
            while sampling:
                stat = os.statvfs(pool)
                lowest[0] = min(lowest[0], stat.f_bavail * stat.f_frsize)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = await _push_too_much(s1, "filler", header(total=1 << 30), _big_rootfs(64))
        finally:
            sampling = False
            sampler.join()
        assert result["status"] == "Failure", result
        assert lowest[0] >= 2 << 20, f"the pool went down to {lowest[0]} bytes free"
        err = str(result["err"])
        assert "Storage pool 'small' is full" in err and "stay free" in err and "-s" in err, err
        assert not any((pool / "containers").iterdir())
    _assert_nothing_left(s1, "filler")
