"""Snapshots on one server, snapshots travelling with a copy, and copy --refresh."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.harness import Cli, Server


def rootfs(server: Server, name: str) -> Path:
    return server.state_dir / "storage-pools/default/containers" / name / "rootfs"


def snapshot_rootfs(server: Server, name: str, snap: str) -> Path:
    return server.state_dir / "storage-pools/default/containers-snapshots" / name / snap / "rootfs"


def test_snapshot_create_restore_rename_delete(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-c", "user.v=1", "-q")
    (rootfs(s1, "c1") / "root/file").write_text("one")
    cli.run("snapshot", "create", "c1", "first")
    cli.run("snapshot", "create", "c1")  # automatic name
    assert [s["name"] for s in cli.json("snapshot", "list", "c1")] == ["first", "snap0"]
    (rootfs(s1, "c1") / "root/file").write_text("two")
    cli.run("config", "set", "c1", "user.v=2")
    cli.run("snapshot", "restore", "c1", "first")
    assert (rootfs(s1, "c1") / "root/file").read_text() == "one"
    assert cli.run("config", "get", "c1", "user.v").stdout == "1\n"
    cli.run("snapshot", "rename", "c1", "snap0", "second")
    assert "already exists" in cli.fails("snapshot", "create", "c1", "first")
    assert "not found" in cli.fails("snapshot", "restore", "c1", "nosuch")
    cli.run("start", "c1")
    assert "running" in cli.fails("snapshot", "restore", "c1", "first")
    cli.run("stop", "c1", "--force")
    assert cli.json("list")[0]["snapshots"][1]["name"] == "second"
    cli.run("rename", "c1", "c2")
    assert [s["name"] for s in cli.json("snapshot", "list", "c2")] == ["first", "second"]
    cli.run("snapshot", "delete", "c2", "first")
    assert [s["name"] for s in cli.json("snapshot", "list", "c2")] == ["second"]
    cli.run("delete", "c2")
    assert not (s1.state_dir / "storage-pools/default/containers-snapshots/c2").exists()


@pytest.mark.parametrize("transport", ["tar-stream", "rsync"])
def test_snapshots_travel_with_the_instance(s1: Server, s2: Server, two: Cli, transport: str) -> None:
    two.run("init", "s1:busybox", "c1", "-q")
    for version in ("v1", "v2"):
        (rootfs(s1, "c1") / "root/version").write_text(version)
        two.run("snapshot", "create", "s1:c1", version)
    (rootfs(s1, "c1") / "root/version").write_text("current")
    two.run("move", "s1:c1", "s2:", "--transport", transport)
    assert [s["name"] for s in two.json("snapshot", "list", "s2:c1")] == ["v1", "v2"]
    assert (snapshot_rootfs(s2, "c1", "v1") / "root/version").read_text() == "v1"
    assert (snapshot_rootfs(s2, "c1", "v2") / "root/version").read_text() == "v2"
    assert (rootfs(s2, "c1") / "root/version").read_text() == "current"
    two.run("snapshot", "restore", "s2:c1", "v1")
    assert (rootfs(s2, "c1") / "root/version").read_text() == "v1"

    two.run("copy", "s2:c1", "s1:bare", "--instance-only")
    assert two.json("snapshot", "list", "s1:bare") == []


def test_copy_refresh_sends_only_what_changed(s1: Server, s2: Server, two: Cli) -> None:
    two.run("init", "s1:busybox", "c1", "-q")
    (rootfs(s1, "c1") / "root/big.bin").write_bytes(os.urandom(8 * 2**20))
    two.run("snapshot", "create", "s1:c1", "old")
    two.run("copy", "s1:c1", "s2:")
    two.run("snapshot", "delete", "s1:c1", "old")
    two.run("snapshot", "create", "s1:c1", "new")
    (rootfs(s1, "c1") / "root/changed").write_text("changed on the source")
    (rootfs(s1, "c1") / "etc/hostname").unlink()
    two.run("config", "set", "s1:c1", "user.refreshed=yes")

    out = two.run("copy", "s1:c1", "s2:", "--refresh").stdout
    assert "rsync" in out
    assert (rootfs(s2, "c1") / "root/changed").read_text() == "changed on the source"
    assert not (rootfs(s2, "c1") / "etc/hostname").exists()  # deletions propagate
    assert [s["name"] for s in two.json("snapshot", "list", "s2:c1")] == ["new"]
    assert two.run("config", "get", "s2:c1", "user.refreshed").stdout == "yes\n"
    refresh_op = next(o for o in two.json("operation", "list", "s2:") if o["description"] == "Refreshing instance")
    sent = refresh_op["metadata"]["progress"]["bytes"]
    assert sent < 2 * 2**20, f"a refresh sent {sent} bytes for a few changed files"

    two.run("start", "s2:c1")
    assert "running on the target" in two.fails("copy", "s1:c1", "s2:", "--refresh")
