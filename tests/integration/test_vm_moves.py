"""Stopped virtual machines moving and copying between two real servers: the disk arrives bit for bit, holes
stay holes, snapshots and overrides travel, and a running VM that cannot move live is refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.integration.harness import Cli, Server, wait_for

MiB = 2**20


def disk(server: Server, name: str, pool: str = "default", snapshot: str | None = None) -> Path:
    base = server.state_dir / "storage-pools" / pool
    if snapshot is not None:
        return base / "virtual-machines-snapshots" / name / snapshot / "root.img"
    return base / "virtual-machines" / name / "root.img"


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def scribble(path: Path, offset: int, size: int, seed: int) -> None:
    """Data the guest could have written, far into the disk (everything between stays a hole)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    with path.open("r+b") as f:
        for i in range(size // MiB):
            f.seek(offset + i * MiB)
            f.write(block)


def new_vm(cli: Cli, name: str, *extra: str) -> None:
    cli.run("init", "s1:busybox-vm", name, "--vm", "-d", "root,size=1GiB", *extra, "-q")


@pytest.mark.parametrize("mode", ["pull", "push", "relay"])
def test_stopped_vm_moves_with_its_disk_and_snapshots(s1: Server, s2: Server, two: Cli, mode: str) -> None:
    new_vm(two, "v1", "-c", "user.note=kept")
    root = disk(s1, "v1")
    assert root.stat().st_size == 2**30
    scribble(root, 512 * MiB, 8 * MiB, 1)
    two.run("snapshot", "create", "s1:v1", "before")
    scribble(root, 700 * MiB, 4 * MiB, 2)
    before, snap_before = digest(root), digest(disk(s1, "v1", snapshot="before"))
    assert snap_before != before

    out = two.run("copy", "s1:v1", "s2:v1c", "--mode", mode).stdout
    assert f"({mode}," in out
    copied = disk(s2, "v1c")
    assert digest(copied) == before and copied.stat().st_size == 2**30
    # Only the allocated data travelled and was written: the copy is as sparse as the source.
    assert allocated(copied) <= allocated(root) + 4 * MiB
    assert digest(disk(s2, "v1c", snapshot="before")) == snap_before
    assert digest(root) == before  # a copy leaves the source alone

    two.run("move", "s1:v1", "s2:", "--mode", mode)
    assert two.json("list", "s1:") == []
    assert not root.exists()
    assert digest(disk(s2, "v1")) == before
    moved = {i["name"]: i for i in two.json("list", "s2:")}
    assert moved["v1"]["type"] == "virtual-machine" and moved["v1"]["status"] == "Stopped"
    assert moved["v1"]["config"]["user.note"] == "kept"
    assert [s["name"] for s in two.json("snapshot", "list", "s2:v1")] == ["before"]


def test_overrides_and_refresh(s1: Server, s2: Server, two: Cli) -> None:
    two.run("storage", "create", "s2:fast", "dir")
    two.run("project", "create", "s2:staging")
    new_vm(two, "v1", "-c", "limits.cpu=1")
    scribble(disk(s1, "v1"), 100 * MiB, 2 * MiB, 3)
    two.run("copy", "s1:v1", "s2:v2", "-c", "limits.memory=192MiB", "-s", "fast", "--target-project", "staging",
            "-d", "root,size=2GiB")
    copied = two.json("--project", "staging", "list", "s2:")[0]
    assert copied["type"] == "virtual-machine" and copied["config"]["limits.memory"] == "192MiB"
    assert copied["expanded_devices"]["root"]["pool"] == "fast"
    target = s2.state_dir / "storage-pools/fast/virtual-machines/staging_v2/root.img"
    assert target.stat().st_size == 2 * 2**30  # grown to the size the override asks for
    with target.open("rb") as f, disk(s1, "v1").open("rb") as g:
        assert f.read(2**30) == g.read(2**30)  # the first GiB is the source's disk

    # --refresh: the copy catches up with what changed on the source, and only with that.
    two.run("copy", "s1:v1", "s2:v3", "-q")
    scribble(disk(s1, "v1"), 300 * MiB, 2 * MiB, 4)
    two.run("snapshot", "create", "s1:v1", "s1")
    two.run("copy", "s1:v1", "s2:v3", "--refresh")
    assert digest(disk(s2, "v3")) == digest(disk(s1, "v1"))
    assert [s["name"] for s in two.json("snapshot", "list", "s2:v3")] == ["s1"]


def test_running_vm_without_stateful_is_refused_then_moves_stateless(s1: Server, s2: Server, two: Cli) -> None:
    new_vm(two, "v1")
    two.run("start", "s1:v1")
    before_refusal = two.json("list", "s1:")
    error = two.fails("move", "s1:v1", "s2:")
    assert "migration.stateful=true" in error and "--stateless" in error and "stop it" in error
    assert two.json("list", "s2:") == []
    assert [i["status"] for i in two.json("list", "s1:")] == [i["status"] for i in before_refusal] == ["Running"]

    two.run("move", "s1:v1", "s2:", "--stateless")
    assert two.json("list", "s1:") == []
    wait_for(lambda: two.json("list", "s2:")[0]["status"] == "Running", 30, "v1 running on s2")
    log = s2.state_dir / "qemu" / "v1" / "console.log"
    wait_for(lambda: log.exists() and b"heartbeat 2" in log.read_bytes(), 90, "the moved VM's heartbeat")
    two.run("stop", "s2:v1", "--force")


def test_vm_snapshots_on_one_server(s1: Server, two: Cli) -> None:
    new_vm(two, "v1")
    root = disk(s1, "v1")
    scribble(root, 10 * MiB, 1 * MiB, 5)
    first = digest(root)
    two.run("snapshot", "create", "s1:v1", "a")
    scribble(root, 10 * MiB, 1 * MiB, 6)
    assert digest(root) != first
    two.run("snapshot", "restore", "s1:v1", "a")
    assert digest(disk(s1, "v1")) == first
    two.run("copy", "s1:v1", "s1:v2")
    assert digest(disk(s1, "v2")) == first
    two.run("snapshot", "delete", "s1:v1", "a")
    assert not disk(s1, "v1", snapshot="a").exists()
    two.run("delete", "s1:v1")
    two.run("delete", "s1:v2")
    assert not any((s1.state_dir / "storage-pools/default/virtual-machines").iterdir())
    assert not os.listdir(s1.state_dir / "storage-pools/default/virtual-machines-snapshots") or all(
        not any(p.iterdir()) for p in (s1.state_dir / "storage-pools/default/virtual-machines-snapshots").iterdir())


def test_a_vm_too_big_for_the_target_pool_is_refused_before_any_transfer(s1: Server, s2: Server, two: Cli) -> None:
    two.run("storage", "create", "s2:small", "btrfs", "size=300MiB")
    new_vm(two, "v1")
    scribble(disk(s1, "v1"), 200 * MiB, 2 * MiB, 7)
    before = digest(disk(s1, "v1"))
    error = two.fails("copy", "s1:v1", "s2:v1", "-s", "small")
    assert "Storage pool 'small' has" in error and "the disk of the instance is 1.0 GiB" in error
    assert "choose another pool with -s" in error
    assert two.json("list", "s2:") == []
    assert not any((s2.state_dir / "storage-pools/small/virtual-machines").iterdir())
    assert digest(disk(s1, "v1")) == before
    # A bad root size is refused before anything exists, saying what is wrong.
    error = two.fails("init", "s1:busybox-vm", "v2", "--vm", "-d", "root,size=1MiB")
    assert "too small" in error and "64MiB" in error
    assert [i["name"] for i in two.json("list", "s1:")] == ["v1"]
