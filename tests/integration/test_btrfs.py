"""btrfs pools: subvolumes, read-only snapshots, and btrfs send/receive between two btrfs pools."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.fstree import fingerprint, populate
from tests.integration.harness import Cli, Server

pytestmark = pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="btrfs-progs is not installed")


def volume(server: Server, pool: str, name: str) -> Path:
    return server.state_dir / "storage-pools" / pool / "containers" / name / "rootfs"


def snapshot(server: Server, pool: str, name: str, snap: str) -> Path:
    return server.state_dir / "storage-pools" / pool / "containers-snapshots" / name / snap / "rootfs"


@pytest.fixture
def bt(two: Cli) -> Cli:
    """Both servers with a btrfs pool 'bt' on a loop file."""
    for remote in ("s1", "s2"):
        two.run("storage", "create", f"{remote}:bt", "btrfs", "size=600MiB")
    return two


def test_btrfs_pool_send_receive_with_snapshots(s1: Server, s2: Server, bt: Cli) -> None:
    bt.run("init", "s1:busybox", "c1", "-s", "bt", "-q")
    populate(volume(s1, "bt", "c1"))
    (volume(s1, "bt", "c1") / "root/v").write_text("v1")
    bt.run("snapshot", "create", "s1:c1", "one")
    (volume(s1, "bt", "c1") / "root/v").write_text("v2")
    bt.run("snapshot", "create", "s1:c1", "two")
    (volume(s1, "bt", "c1") / "root/v").write_text("now")
    before = fingerprint(volume(s1, "bt", "c1"))
    assert "btrfs" in bt.run("move", "s1:c1", "s2:", "-s", "bt").stdout
    assert fingerprint(volume(s2, "bt", "c1")) == before
    assert (snapshot(s2, "bt", "c1", "one") / "root/v").read_text() == "v1"
    assert (snapshot(s2, "bt", "c1", "two") / "root/v").read_text() == "v2"
    assert not [p for p in (s2.state_dir / "storage-pools/bt/containers-snapshots/c1").iterdir()
                if p.name.startswith(".stapes")]
    bt.run("start", "s2:c1")
    assert bt.run("exec", "s2:c1", "--", "cat", "/root/v").stdout == "now"
    bt.run("stop", "s2:c1", "--force")
    bt.run("snapshot", "restore", "s2:c1", "one")
    assert (volume(s2, "bt", "c1") / "root/v").read_text() == "v1"

    # btrfs to dir: the best common transport is the tar stream
    assert "tar-stream" in bt.run("copy", "s2:c1", "s1:back", "-s", "default").stdout
    assert (snapshot(s1, "default", "back", "two") / "root/v").read_text() == "v2"
    bt.run("delete", "s2:c1")
    bt.run("storage", "delete", "s2:bt")
    assert not (s2.state_dir / "disks/bt.img").exists()


def test_btrfs_pool_survives_a_restart(s1: Server, s2: Server, bt: Cli) -> None:
    bt.run("launch", "s1:busybox", "c1", "-s", "bt", "-q")
    s1.stop()
    s1.kill_containers()
    subprocess_umount(s1.state_dir / "storage-pools/bt")
    s1.start()
    assert bt.json("list", "s1:")[0]["status"] == "Running"
    assert bt.run("exec", "s1:c1", "--", "hostname").stdout == "c1\n"


def subprocess_umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", str(path)], check=True)
