"""Pure checks of the hardening rules: locks, peer headers, tool stderr, files inside a rootfs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from stapes.api.errors import Conflict
from stapes.api.requests import InstancesPost, decode
from stapes.server import rootfs, streams
from stapes.server.events import EventHub
from stapes.server.instances.service import InstanceService
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration import protocol
from stapes.server.operations import OperationRegistry


def _service() -> InstanceService:
    return InstanceService(None, None, None, EventHub(), {}, None)  # type: ignore[arg-type]


async def test_a_lock_is_never_dropped_while_others_wait() -> None:
    service = _service()
    order: list[str] = []
    holder_in = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with service.locked("default", "c1"):
            holder_in.set()
            await release.wait()
            order.append("first")

    async def waiter(name: str) -> None:
        async with service.locked("default", "c1"):
            order.append(name)
            await asyncio.sleep(0.01)

    first = asyncio.create_task(holder())
    await holder_in.wait()
    second = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0.01)
    # The first holder deletes the instance here (the old code popped the lock); a newcomer must still queue.
    third = asyncio.create_task(waiter("third"))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(first, second, third)
    assert order == ["first", "second", "third"]


async def test_busy_instances_refuse_and_name_the_operation() -> None:
    service = _service()
    op = OperationRegistry(EventHub()).create(op_class="task", description="Migrating instance", project="default")
    release = service.mark_busy("default", "c1", op)
    with pytest.raises(Conflict, match=f"operation {op.id} \\(Migrating instance\\)"):
        service.check_idle("default", "c1")
    with pytest.raises(Conflict):
        service.mark_busy("default", "c1", op)
    service.check_idle("default", "c2")
    release()
    service.check_idle("default", "c1")


def test_offers_are_checked_like_rest_input() -> None:
    def offer(**kwargs: Any) -> pb.MigrationHeader:
        return pb.MigrationHeader(fs=pb.RSYNC, **kwargs)

    protocol.check_offer(offer(snapshotNames=["s0"], snapshots=[pb.Snapshot(
        name="s0", ephemeral=False, architecture=0, stateful=False,
        localConfig=[pb.Config(key="limits.memory", value="64MiB")])]))
    for bad in (offer(snapshotNames=["../x"]), offer(snapshotNames=["a", "a"]),
                offer(snapshotNames=["a"], snapshots=[pb.Snapshot(name="b", ephemeral=False, architecture=0,
                                                                  stateful=False)]),
                offer(stapesTotalBytes=-1), offer(snapshotNames=["x"] * 5000)):
        with pytest.raises(protocol.ProtocolError):
            protocol.check_offer(bad)
    snap = pb.Snapshot(name="s0", ephemeral=False, architecture=0, stateful=False,
                       localConfig=[pb.Config(key="raw.lxc", value="lxc.hook.pre-start = /bin/evil")])
    with pytest.raises(protocol.ProtocolError, match="raw.lxc"):
        protocol.check_snapshot_raw_keys(snap, {})
    protocol.check_snapshot_raw_keys(snap, {"raw.lxc": "lxc.hook.pre-start = /bin/evil"})


def test_answers_must_pick_what_was_offered() -> None:
    answer = pb.MigrationHeader(fs=pb.RSYNC, stapesTransports=["btrfs"])
    with pytest.raises(protocol.ProtocolError, match="not offered"):
        protocol.check_answer(answer, ["tar-stream", "rsync"], [])
    answer = pb.MigrationHeader(fs=pb.RSYNC, stapesTransports=["rsync"], snapshotNames=["nosuch"])
    with pytest.raises(protocol.ProtocolError):
        protocol.check_answer(answer, ["rsync"], ["s0"])
    assert protocol.check_answer(pb.MigrationHeader(fs=pb.RSYNC), ["rsync"], []) == "rsync"


def test_headers_that_do_not_parse_are_protocol_errors() -> None:
    for data in (None, b"", b"\xff\xff\xff", b"\x08" * (2 << 20)):
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_header(data, "source")


def test_typed_bodies_name_the_wrong_field() -> None:
    with pytest.raises(Exception, match=r"\$\.profiles"):
        decode(b'{"name": "c1", "profiles": 5}', InstancesPost)
    body = decode(b'{"name": "c1", "config": null, "devices": null, "unknown": [1]}', InstancesPost)
    assert body.name == "c1" and body.config is None


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    async def send(self, data: bytes) -> None:
        self.data += data

    async def barrier(self) -> None:
        pass


async def test_a_chatty_tool_never_deadlocks() -> None:
    """2 MiB on stderr before any stdout: the old code read stderr only after stdout closed, and hung."""
    proc = await streams.spawn_tool(["sh", "-c", "head -c 2000000 /dev/zero >&2; echo out; exit 3"],
                                   stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                   stderr=asyncio.subprocess.PIPE)
    sink = _Sink()
    assert proc.stdout is not None
    await asyncio.wait_for(streams.stdout_to_channel(proc.stdout, sink, None), 10)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="failed"):
        await asyncio.wait_for(streams.finish(proc, "chatty"), 10)
    assert bytes(sink.data) == b"out\n"


def test_files_in_a_rootfs_never_resolve_to_the_host(tmp_path: Path) -> None:
    root, host = tmp_path / "rootfs", tmp_path / "host"
    root.mkdir()
    host.mkdir()
    (root / "etc").symlink_to(host)  # absolute: resolved inside the root, it is /<host path> there
    with pytest.raises(OSError):
        rootfs.write_text(root, "etc/hostname", "c1\n")
    assert list(host.iterdir()) == []
    (root / "etc").unlink()
    (root / "etc").symlink_to("/")  # '/' inside the root is the root itself
    rootfs.write_text(root, "etc/hostname", "c1\n")
    assert (root / "hostname").read_text() == "c1\n" and list(host.iterdir()) == []
    os.mkfifo(root / "fifo")
    with pytest.raises(OSError):  # never opened for writing (that would block, or hit a device)
        rootfs.write_text(root, "fifo", "x")
    with pytest.raises(OSError, match="not a regular file"):
        rootfs.read_text(root, "fifo")
    (root / "linked").symlink_to(root)  # the root itself as a symlink is refused
    with pytest.raises(OSError):
        rootfs.write_text(root / "linked", "x", "x")


async def test_coalesced_queries_are_shared_and_never_stale() -> None:
    from stapes.server.coalesce import Coalesced

    runs: list[int] = []
    gate = asyncio.Event()

    async def fetch() -> int:
        runs.append(len(runs))
        await gate.wait()
        return len(runs)

    shared = Coalesced(fetch)
    first = asyncio.create_task(shared.get())
    await asyncio.sleep(0)  # the first run is in flight
    late = [asyncio.create_task(shared.get()) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(first, *late)
    # The late callers asked after the first run started: they share one newer run, not the first's answer.
    assert results[0] == 1 and set(results[1:]) == {2} and len(runs) == 2


def test_a_malformed_timeout_in_the_environment_stops_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from stapes.server.streams import _seconds_from_env

    monkeypatch.setenv("STAPES_TEST_SECONDS", "30")
    assert _seconds_from_env("STAPES_TEST_SECONDS", 120.0) == 30.0
    monkeypatch.delenv("STAPES_TEST_SECONDS")
    assert _seconds_from_env("STAPES_TEST_SECONDS", 120.0) == 120.0
    for bad in ("abc", "-5", "0", "nan", "1e9"):
        monkeypatch.setenv("STAPES_TEST_SECONDS", bad)
        with pytest.raises(SystemExit, match="STAPES_TEST_SECONDS"):
            _seconds_from_env("STAPES_TEST_SECONDS", 120.0)


def test_trust_tokens_are_compared_by_their_hash() -> None:
    from stapes.server.auth import token_hash

    secret = "ab" * 32
    assert token_hash(secret) == token_hash(secret) != token_hash("ab" * 31 + "ac")
    assert token_hash(secret).startswith("sha256:") and secret not in token_hash(secret)
