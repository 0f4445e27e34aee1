"""`stapes publish` (and `incus publish`): an image from a stopped container or a snapshot, that a launch then
uses; owners, modes, xattrs, device nodes and symlinks survive; a running instance needs --force."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import Cli, Cluster, Server


def rootfs(server: Server, name: str) -> Path:
    return server.state_dir / "storage-pools/default/containers" / name / "rootfs"


def aliases(cli: Cli) -> dict[str, dict[str, str]]:
    return {a["name"]: i["properties"] for i in cli.json("image", "list") for a in i["aliases"]}


def test_publish_instance_and_snapshot_then_launch(cli: Cli, s1: Server, tmp_path: Path) -> None:
    cli.run("init", "busybox", "c1")
    marker = tmp_path / "marker"
    marker.write_text("v1\n")
    cli.run("file", "push", str(marker), "c1/root/marker", "--uid", "1000", "--gid", "1001", "--mode", "0600")
    root = rootfs(s1, "c1")
    os.mknod(root / "root/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "root/out").symlink_to("/etc/shadow")  # never followed by tar
    cli.run("snapshot", "create", "c1", "snap0")
    marker.write_text("v2\n")
    cli.run("file", "push", str(marker), "c1/root/marker", "--mode", "0600")  # the owner stays
    os.setxattr(root / "root/marker", "user.stapes", b"kept")

    out = cli.run("publish", "c1", "--alias", "img-now", "description=published now", "user.k=v").stdout
    assert "Instance published with fingerprint:" in out
    cli.run("publish", "s1:c1/snap0", "s1:", "--alias", "img-snap")
    listed = aliases(cli)
    assert listed["img-now"]["description"] == "published now" and listed["img-now"]["user.k"] == "v"
    assert "img-snap" in listed and listed["img-snap"]["description"].startswith("BusyBox")

    cli.run("launch", "img-now", "c2")
    assert cli.run("exec", "c2", "--", "cat", "/root/marker").stdout == "v2\n"
    assert cli.run("exec", "c2", "--", "stat", "-c", "%u %g %a", "/root/marker").stdout.split() == ["1000", "1001",
                                                                                                     "600"]
    copy = rootfs(s1, "c2")
    st = (copy / "root/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert os.getxattr(copy / "root/marker", "user.stapes") == b"kept"
    assert os.readlink(copy / "root/out") == "/etc/shadow"
    cli.run("launch", "s1:img-snap", "c3")
    assert cli.run("exec", "c3", "--", "cat", "/root/marker").stdout == "v1\n"

    assert "already exist" in cli.fails("publish", "c1", "--alias", "img-now")
    assert "not found" in cli.fails("publish", "c1/nosnap", "--alias", "x")
    assert "not found" in cli.fails("publish", "nosuch", "--alias", "x")
    cli.run("delete", "c1", "c2", "c3", "--force")


def test_running_instance_needs_force(cli: Cli, s1: Server) -> None:
    cli.run("launch", "busybox", "c1")
    err = cli.fails("publish", "c1", "--alias", "hot")
    assert "running" in err and "--force" in err
    # The server refuses it too (a client that skips the check).
    op = s1.run_op("POST", "/1.0/images", {"source": {"type": "instance", "name": "c1"}, "aliases": [{"name": "hot"}]})
    assert op["status"] == "Failure" and "running" in op["err"]
    assert "hot" not in aliases(cli)

    cli.run("publish", "c1", "--alias", "hot", "--force")
    assert "hot" in aliases(cli)
    assert s1.instances() == [("c1", "Running")]  # started again
    cli.run("delete", "c1", "--force")


def incus(conf: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, INCUS_CONF=str(conf), HOME=str(conf))
    result = subprocess.run(["incus", *args], env=env, capture_output=True, text=True, timeout=300, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"incus {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@pytest.mark.skipif(shutil.which("incus") is None, reason="incus-client is not installed")
def test_incus_publish_against_stapes(cluster: Cluster, s1: Server) -> None:
    conf = cluster.root / "incus-client"
    conf.mkdir()
    token = cluster.cli(s1).run("config", "trust", "add", "incus-user").stdout.strip().splitlines()[-1]
    incus(conf, "remote", "add", "st", token)
    incus(conf, "launch", "st:busybox", "st:c1")
    incus(conf, "exec", "st:c1", "--", "sh", "-c", "echo from-incus > /root/m")
    assert "--force" in incus(conf, "publish", "st:c1", "st:", "--alias", "inc", check=False).stderr
    out = incus(conf, "publish", "st:c1", "st:", "--alias", "inc", "--force", "owner=me").stdout
    assert "Instance published with fingerprint" in out
    images = json.loads(incus(conf, "image", "list", "st:", "--format", "json").stdout)
    published = next(i for i in images if any(a["name"] == "inc" for a in i["aliases"]))
    assert published["properties"]["owner"] == "me"
    incus(conf, "launch", "st:inc", "st:c2")
    assert incus(conf, "exec", "st:c2", "--", "cat", "/root/m").stdout == "from-incus\n"
    incus(conf, "delete", "st:c1", "st:c2", "--force")
