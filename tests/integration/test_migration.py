"""Moving and copying containers between two real servers, in every mode and transport."""

from __future__ import annotations

import pytest

from tests.integration.fstree import fingerprint, populate
from tests.integration.harness import Cli, Server


def rootfs(server: Server, name: str, pool: str = "default") -> str:
    return str(server.state_dir / "storage-pools" / pool / "containers" / name / "rootfs")


@pytest.mark.parametrize("mode", ["pull", "push", "relay"])
@pytest.mark.parametrize("transport", ["tar-stream", "rsync"])
def test_copy_then_move_keeps_every_file(s1: Server, s2: Server, two: Cli, mode: str, transport: str) -> None:
    from pathlib import Path

    two.run("init", "s1:busybox", "c1", "-c", "user.note=kept", "-q")
    populate(Path(rootfs(s1, "c1")))
    before = fingerprint(Path(rootfs(s1, "c1")))
    assert before["data/sparse.img"][-2] is True  # the source file really is sparse

    out = two.run("copy", "s1:c1", "s2:c1-copy", "--mode", mode, "--transport", transport).stdout
    assert f"({mode}, {transport})" in out
    copied = fingerprint(Path(rootfs(s2, "c1-copy")))
    assert copied.pop("etc/hostname") != before["etc/hostname"]  # the copy is called by its own name
    assert copied == {k: v for k, v in before.items() if k != "etc/hostname"}
    assert fingerprint(Path(rootfs(s1, "c1"))) == before  # a copy leaves the source alone

    two.run("move", "s1:c1", "s2:", "--mode", mode, "--transport", transport)
    assert two.json("list", "s1:") == []
    assert fingerprint(Path(rootfs(s2, "c1"))) == before
    moved = {i["name"]: i for i in two.json("list", "s2:")}
    assert moved["c1"]["config"]["user.note"] == "kept"
    two.run("start", "s2:c1")
    assert two.run("exec", "s2:c1", "--", "cat", "/etc/hostname").stdout == "c1\n"
    assert two.run("exec", "s2:c1-copy", "--", "true", check=False).returncode != 0  # copies stay stopped
    two.run("start", "s2:c1-copy")
    assert two.run("exec", "s2:c1-copy", "--", "cat", "/etc/hostname").stdout == "c1-copy\n"


def test_overrides_on_the_target(s1: Server, s2: Server, two: Cli, tmp_path: object) -> None:
    two.run("profile", "create", "s2:small")
    two.run("profile", "set", "s2:small", "limits.memory=48MiB")
    two.run("project", "create", "s2:staging")
    two.run("storage", "create", "s2:fast", "dir")
    two.run("init", "s1:busybox", "c1", "-c", "limits.cpu=1", "-q")
    two.run("copy", "s1:c1", "s2:c2", "-c", "user.where=s2", "-c", "limits.cpu=2", "-s", "fast",
            "--target-project", "staging", "-p", "default", "-p", "small")
    copied = two.json("--project", "staging", "list", "s2:")[0]
    assert copied["name"] == "c2" and copied["project"] == "staging"
    assert copied["config"]["user.where"] == "s2" and copied["config"]["limits.cpu"] == "2"
    assert copied["profiles"] == ["default", "small"]
    assert copied["expanded_config"]["limits.memory"] == "48MiB"
    assert copied["expanded_devices"]["root"]["pool"] == "fast"
    assert (s2.state_dir / "storage-pools/fast/containers/staging_c2/rootfs/bin/busybox").exists()

    two.run("copy", "s1:c1", "s2:bare", "--no-profiles", "-d", "root,type=disk,path=/,pool=default")
    bare = {i["name"]: i for i in two.json("list", "s2:")}["bare"]
    assert bare["profiles"] == [] and bare["devices"]["root"]["pool"] == "default"


def test_move_on_one_server_renames_or_changes_pool_or_project(s1: Server, two: Cli) -> None:
    two.run("init", "s1:busybox", "c1", "-q")
    (s1.state_dir / "storage-pools/default/containers/c1/rootfs/root/mark").write_text("here")
    two.run("snapshot", "create", "s1:c1", "snap")
    assert "Renamed" in two.run("move", "s1:c1", "s1:c2").stdout
    assert [i["name"] for i in two.json("list", "s1:")] == ["c2"]
    two.run("storage", "create", "s1:other", "dir")
    two.run("move", "s1:c2", "s1:", "-s", "other")
    moved = two.json("list", "s1:")
    assert [(i["name"], i["expanded_devices"]["root"]["pool"]) for i in moved] == [("c2", "other")]
    assert (s1.state_dir / "storage-pools/other/containers/c2/rootfs/root/mark").read_text() == "here"
    assert not (s1.state_dir / "storage-pools/default/containers/c2").exists()
    assert [s["name"] for s in two.json("snapshot", "list", "s1:c2")] == ["snap"]
    two.run("project", "create", "s1:p2")
    two.run("move", "s1:c2", "s1:", "--target-project", "p2")
    assert two.json("list", "s1:") == []
    assert [i["name"] for i in two.json("--project", "p2", "list", "s1:")] == ["c2"]


def test_stateless_move_of_a_running_container(s1: Server, s2: Server, two: Cli) -> None:
    two.run("launch", "s1:busybox", "web", "-q")
    two.run("exec", "s1:web", "--", "sh", "-c", "echo state > /root/file")
    out = two.run("move", "s1:web", "s2:", "--stateless").stdout
    assert "live" not in out, out  # stopped, moved, started: without --stateless it would move live
    assert two.json("list", "s1:") == []
    assert two.json("list", "s2:")[0]["status"] == "Running"
    assert two.run("exec", "s2:web", "--", "cat", "/root/file").stdout == "state\n"
