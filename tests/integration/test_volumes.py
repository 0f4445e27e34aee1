"""Custom storage volumes on real servers: the REST API and `stapes storage volume`, attached to real
(unprivileged) containers, copied and moved between two servers in every mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import STAPES, Cli, Cluster, Server, in_netns


def volume_dir(server: Server, name: str, pool: str = "default") -> Path:
    return server.state_dir / "storage-pools" / pool / "custom" / name


def in_c(cli: Cli, instance: str, script: str, check: bool = True) -> str:
    return cli.run("exec", instance, "--", "sh", "-c", script, check=check).stdout


def test_create_list_show_set_rename_delete(s1: Server, cli: Cli) -> None:
    cli.run("storage", "volume", "create", "default", "data", "user.purpose=test", "--description", "mine")
    assert volume_dir(s1, "data").is_dir()
    custom = volume_dir(s1, "data").parent
    assert custom.stat().st_mode & 0o777 == 0o700  # no host user walks into the volumes

    listed = cli.json("storage", "volume", "list", "default")
    assert [(v["type"], v["name"]) for v in listed] == [("custom", "data")]
    shown = s1.api("GET", "/1.0/storage-pools/default/volumes/custom/data")
    assert shown["config"] == {"user.purpose": "test"} and shown["description"] == "mine"
    assert shown["content_type"] == "filesystem" and shown["used_by"] == []
    assert "user.purpose: test" in cli.run("storage", "volume", "show", "default", "data").stdout

    cli.run("storage", "volume", "set", "default", "data", "user.more=yes")
    assert cli.run("storage", "volume", "get", "default", "data", "user.more").stdout == "yes\n"
    cli.run("storage", "volume", "unset", "default", "data", "user.purpose")
    assert s1.api("GET", "/1.0/storage-pools/default/volumes/custom/data")["config"] == {"user.more": "yes"}
    assert "not supported" in cli.fails("storage", "volume", "set", "default", "data", "size=1GiB")
    assert "not supported" in cli.fails("storage", "volume", "create", "default", "big", "size=1GiB")
    assert not volume_dir(s1, "big").exists()

    cli.run("storage", "volume", "rename", "default", "data", "data2")
    assert not volume_dir(s1, "data").exists() and volume_dir(s1, "data2").is_dir()
    assert "already exists" in cli.fails("storage", "volume", "create", "default", "data2")
    cli.run("storage", "volume", "delete", "default", "data2")
    assert not volume_dir(s1, "data2").exists()
    assert cli.json("storage", "volume", "list", "default") == []
    assert "not found" in cli.fails("storage", "volume", "show", "default", "data2")


def test_bad_names_and_pools(s1: Server, cli: Cli) -> None:
    for bad in ("../x", "a b", "..", "x" * 64):
        answer = s1.raw("POST", "/1.0/storage-pools/default/volumes/custom", {"name": bad, "type": "custom"})
        assert answer["error_code"] == 400 and "Invalid storage volume name" in answer["error"], answer
    assert "Storage pool 'nosuch' not found" in cli.fails("storage", "volume", "create", "nosuch", "v")
    assert "not found" in cli.fails("storage", "volume", "list", "nosuch")
    answer = s1.raw("POST", "/1.0/storage-pools/default/volumes/custom",
                    {"name": "blk", "type": "custom", "content_type": "block"})
    assert answer["error_code"] == 400 and "block" in answer["error"]
    assert "attach takes" in cli.fails("storage", "volume", "attach", "default", "v", "c1", "a", "b", "c")
    assert sorted(p.name for p in volume_dir(s1, "x").parent.iterdir()) == []


def test_attach_write_detach_reattach_keeps_owner(s1: Server, cli: Cli) -> None:
    cli.run("storage", "volume", "create", "default", "shared")
    cli.run("launch", "busybox", "c1", "-q")
    cli.run("storage", "volume", "attach", "default", "shared", "c1", "/mnt/shared")  # while it runs
    in_c(cli, "c1", "echo hello > /mnt/shared/f && chown 1000:1000 /mnt/shared/f && mkdir /mnt/shared/d")
    on_disk = volume_dir(s1, "shared") / "f"
    assert on_disk.read_text() == "hello\n"
    assert (on_disk.stat().st_uid, on_disk.stat().st_gid) == (1000, 1000)  # unshifted on disk
    used = s1.api("GET", "/1.0/storage-pools/default/volumes/custom/shared")["used_by"]
    assert used == ["/1.0/instances/c1"]

    err = cli.fails("storage", "volume", "delete", "default", "shared")
    assert "in use by c1" in err and "detach" in err
    assert volume_dir(s1, "shared").is_dir()

    cli.run("storage", "volume", "detach", "default", "shared", "c1")
    assert "hello" not in in_c(cli, "c1", "cat /mnt/shared/f 2>&1", check=False)
    assert s1.api("GET", "/1.0/storage-pools/default/volumes/custom/shared")["used_by"] == []

    cli.run("init", "busybox", "c2", "-q")
    cli.run("storage", "volume", "attach", "default", "shared", "c2", "data", "/srv/data")  # at its start
    cli.run("start", "c2")
    assert in_c(cli, "c2", "cat /srv/data/f") == "hello\n"
    assert in_c(cli, "c2", "stat -c '%u:%g' /srv/data/f") == "1000:1000\n"
    assert in_c(cli, "c2", "cat /proc/self/uid_map").split()[:2] == ["0", "1000000"]  # unprivileged
    cli.run("stop", "c2", "--force")
    cli.run("start", "c2")  # mounted again at every start
    assert in_c(cli, "c2", "cat /srv/data/f") == "hello\n"
    cli.run("delete", "c1", "c2", "--force")
    cli.run("storage", "volume", "delete", "default", "shared")


def test_missing_volume_refused_at_attach(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-q")
    answer = s1.raw("PATCH", "/1.0/instances/c1",
                    {"devices": {"d": {"type": "disk", "pool": "default", "source": "nosuch", "path": "/x"}}})
    assert answer["error_code"] == 400 and "lacks" in answer["error"], answer
    assert "not found" in cli.fails("storage", "volume", "attach", "default", "nosuch", "c1", "/x")
    assert "d" not in s1.api("GET", "/1.0/instances/c1")["devices"]
    cli.run("delete", "c1")


def _fill(server: Server, name: str, pool: str = "default") -> None:
    root = volume_dir(server, name, pool)
    (root / "sub").mkdir()
    (root / "sub" / "owned").write_text("owned by 1000\n")
    os.chown(root / "sub" / "owned", 1000, 1001)
    (root / "big").write_bytes(os.urandom(1 << 20))


def _same(a: Path, b: Path) -> None:
    assert (b / "sub" / "owned").read_text() == "owned by 1000\n"
    assert ((b / "sub" / "owned").stat().st_uid, (b / "sub" / "owned").stat().st_gid) == (1000, 1001)
    assert (a / "big").read_bytes() == (b / "big").read_bytes()


@pytest.mark.parametrize("mode", ["pull", "push", "relay"])
def test_copy_and_move_between_servers(s1: Server, s2: Server, two: Cli, mode: str) -> None:
    two.run("storage", "volume", "create", "s1:default", "vol")
    _fill(s1, "vol")
    out = two.run("storage", "volume", "copy", "s1:default/vol", "s2:default/vol-copy", "--mode", mode).stdout
    assert f"({mode}," in out
    _same(volume_dir(s1, "vol"), volume_dir(s2, "vol-copy"))
    assert volume_dir(s1, "vol").is_dir()  # a copy leaves the source alone

    two.run("storage", "volume", "move", "s1:default/vol", "s2:", "--mode", mode)
    assert not volume_dir(s1, "vol").exists()
    assert s1.api("GET", "/1.0/storage-pools/default/volumes/custom") == []
    _same(volume_dir(s2, "vol-copy"), volume_dir(s2, "vol"))
    names = sorted(v["name"] for v in s2.api("GET", "/1.0/storage-pools/default/volumes?recursion=1"))
    assert names == ["vol", "vol-copy"]


def test_copy_and_move_within_a_server(s1: Server, cli: Cli) -> None:
    cli.run("storage", "create", "other", "dir")
    cli.run("storage", "volume", "create", "default", "vol")
    _fill(s1, "vol")
    cli.run("storage", "volume", "copy", "default/vol", "default/vol2")
    _same(volume_dir(s1, "vol"), volume_dir(s1, "vol2"))
    cli.run("storage", "volume", "move", "default/vol2", "other/vol2")
    assert not volume_dir(s1, "vol2").exists()
    _same(volume_dir(s1, "vol"), volume_dir(s1, "vol2", "other"))
    for pool, name in (("default", "vol"), ("other", "vol2")):
        cli.run("storage", "volume", "delete", pool, name)


def test_move_refused_while_attached_to_a_running_instance(s1: Server, s2: Server, two: Cli) -> None:
    two.run("storage", "volume", "create", "s1:default", "busy")
    two.run("launch", "s1:busybox", "s1:c1", "-q")
    two.run("storage", "volume", "attach", "s1:default", "busy", "c1", "/data")
    err = two.fails("storage", "volume", "move", "s1:default/busy", "s2:default/busy")
    assert "attached to running instance(s) c1" in err
    assert volume_dir(s1, "busy").is_dir()
    assert s2.api("GET", "/1.0/storage-pools/default/volumes/custom") == []
    two.run("storage", "volume", "copy", "s1:default/busy", "s2:default/busy")  # a copy is fine
    two.run("delete", "s1:c1", "--force")


def test_instance_move_needs_its_volume_on_the_target(s1: Server, s2: Server, two: Cli) -> None:
    two.run("storage", "volume", "create", "s1:default", "data")
    _fill(s1, "data")
    two.run("init", "s1:busybox", "s1:c1", "-q")
    two.run("storage", "volume", "attach", "s1:default", "data", "s1:c1", "/data")
    err = two.fails("move", "s1:c1", "s2:")
    assert "stapes storage volume copy" in err and "'data'" in err, err
    assert s1.instances() == [("c1", "Stopped")] and s2.instances() == []
    assert not (s2.state_dir / "storage-pools/default/containers/c1").exists()

    two.run("storage", "volume", "copy", "s1:default/data", "s2:default/data")
    two.run("move", "s1:c1", "s2:")
    assert s2.instances() == [("c1", "Stopped")] and s1.instances() == []
    two.run("start", "s2:c1")
    assert two.run("exec", "s2:c1", "--", "stat", "-c", "%u:%g", "/data/sub/owned").stdout == "1000:1001\n"
    two.run("delete", "s2:c1", "--force")


def test_failed_move_leaves_the_source_and_nothing_on_the_target(s1: Server, s2: Server, two: Cli) -> None:
    two.run("storage", "volume", "create", "s1:default", "vol")
    _fill(s1, "vol")
    # The target's pool name does not exist there: refused before anything moves.
    err = two.fails("storage", "volume", "move", "s1:default/vol", "s2:nosuch/vol")
    assert "nosuch" in err
    # The target already has a volume of that name: refused too, and neither side is touched.
    two.run("storage", "volume", "create", "s2:default", "vol")
    (volume_dir(s2, "vol") / "theirs").write_text("keep\n")
    err = two.fails("storage", "volume", "move", "s1:default/vol", "s2:default/vol", "--mode", "push")
    assert "already exists" in err
    assert (volume_dir(s2, "vol") / "theirs").read_text() == "keep\n"
    # A transfer that breaks half way (the target's receiving tool is killed): the source stays whole.
    two.run("storage", "volume", "delete", "s2:default", "vol")
    big = volume_dir(s1, "vol") / "huge"
    big.write_bytes(os.urandom(32 << 20))
    proc = subprocess.Popen([STAPES, "storage", "volume", "move", "s1:default/vol", "s2:default/vol", "-q"],
                            env=two.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _kill_receiver_when_it_starts(s2)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Migration failed" in stderr, stderr
    assert volume_dir(s1, "vol").is_dir() and big.stat().st_size == 32 << 20
    assert s1.api("GET", "/1.0/storage-pools/default/volumes/custom") == [
        "/1.0/storage-pools/default/volumes/custom/vol"]
    assert s2.api("GET", "/1.0/storage-pools/default/volumes/custom") == []
    assert not volume_dir(s2, "vol").exists()


def _kill_receiver_when_it_starts(server: Server) -> None:
    """Kill the tar or rsync that receives into the target's custom/ directory once it runs."""
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            text = b" ".join(cmdline).decode(errors="replace")
            if str(server.state_dir) in text and "/custom" in text and ("tar" in text or "rsync" in text):
                os.kill(int(pid), 9)
                return
        time.sleep(0.01)
    raise AssertionError("the receiving tool never started")


pytestmark_incus = pytest.mark.skipif(shutil.which("incus") is None, reason="incus-client is not installed")


@pytestmark_incus
def test_incus_client_lists_and_creates_volumes(cluster: Cluster, s1: Server) -> None:
    conf = cluster.root / "incus-client"
    conf.mkdir()
    env = dict(os.environ, INCUS_CONF=str(conf), HOME=str(conf))

    def incus(*args: str) -> str:
        result = subprocess.run(["incus", *args], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, f"incus {' '.join(args)}: {result.stderr}"
        return result.stdout

    token = cluster.cli(s1).run("config", "trust", "add", "incus-user").stdout.strip().splitlines()[-1]
    incus("remote", "add", "st", token)
    incus("storage", "volume", "create", "st:default", "fromincus")
    assert volume_dir(s1, "fromincus").is_dir()
    listed = json.loads(incus("storage", "volume", "list", "st:default", "--format", "json"))
    assert [(v["type"], v["name"]) for v in listed] == [("custom", "fromincus")]
    assert "fromincus" in incus("storage", "volume", "list", "st:default")
    incus("storage", "volume", "delete", "st:default", "fromincus")
    assert not volume_dir(s1, "fromincus").exists()


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="btrfs-progs is not installed")
def test_btrfs_volumes_are_subvolumes_and_move_with_btrfs_send(s1: Server, s2: Server, two: Cli) -> None:
    for remote in ("s1", "s2"):
        two.run("storage", "create", f"{remote}:bt", "btrfs", "size=600MiB")
    two.run("storage", "volume", "create", "s1:bt", "vol")
    path = volume_dir(s1, "vol", "bt")
    shown = subprocess.run(["btrfs", "subvolume", "show", str(path)], capture_output=True, text=True, check=False)
    assert shown.returncode == 0, shown.stderr
    assert path.parent.stat().st_mode & 0o777 == 0o700
    _fill(s1, "vol", "bt")
    (path / "big").chmod(0o600)
    assert "btrfs" in two.run("storage", "volume", "move", "s1:bt/vol", "s2:bt/vol").stdout
    target = volume_dir(s2, "vol", "bt")
    assert (target / "sub" / "owned").stat().st_uid == 1000
    assert subprocess.run(["btrfs", "subvolume", "show", str(target)], capture_output=True,
                          check=False).returncode == 0
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".stapes")]  # no send leftovers
    assert not path.exists()
    err = two.fails("storage", "delete", "s2:bt")
    assert "in use" in err and "vol" in err  # a pool's volumes are its users
    # btrfs to dir: the tar stream
    assert "tar-stream" in two.run("storage", "volume", "copy", "s2:bt/vol", "s1:default/vol").stdout
    assert (volume_dir(s1, "vol") / "sub" / "owned").stat().st_gid == 1001
    two.run("storage", "volume", "delete", "s2:bt", "vol")
    two.run("storage", "delete", "s2:bt")


def test_interrupted_creation_is_removed_at_start(s1: Server, cli: Cli) -> None:
    cli.run("storage", "volume", "create", "default", "kept")
    leftover = volume_dir(s1, "half")
    leftover.mkdir()
    (leftover / "f").write_text("partial")
    s1.stop()
    s1.start()
    assert not leftover.exists()
    assert volume_dir(s1, "kept").is_dir()
    assert [v["name"] for v in cli.json("storage", "volume", "list", "default")] == ["kept"]


def test_live_move_keeps_the_volume_mounted(s1: Server, s2: Server, two: Cli) -> None:
    """A running container with a custom volume moves live once the target has the volume: CRIU restores its
    mount from the target's own copy (a custom volume is never carried along with the instance)."""
    two.run("storage", "volume", "create", "s1:default", "data")
    two.run("launch", "s1:busybox", "s1:c1", "-q")
    two.run("storage", "volume", "attach", "s1:default", "data", "s1:c1", "/data")
    two.run("exec", "s1:c1", "--", "sh", "-c", "echo hi > /data/f && chown 1000 /data/f")
    two.run("storage", "volume", "copy", "s1:default/data", "s2:default/data")
    assert "live" in two.run("move", "s1:c1", "s2:").stdout
    assert s1.instances() == [] and s2.instances() == [("c1", "Running")]
    assert two.run("exec", "s2:c1", "--", "stat", "-c", "%u %n", "/data/f").stdout == "1000 /data/f\n"
    two.run("exec", "s2:c1", "--", "sh", "-c", "echo there > /data/g")
    assert (volume_dir(s2, "data") / "g").read_text() == "there\n"  # the target's own copy
    assert not (volume_dir(s1, "data") / "g").exists()
    two.run("delete", "s2:c1", "--force")


def test_device_names_that_are_path_parts_refused(s1: Server, cli: Cli) -> None:
    """A disk named `..` mounted its volume over the container's LXC directory (its config, its hooks)."""
    cli.run("storage", "volume", "create", "default", "v")
    cli.run("init", "busybox", "c1", "-q")
    for bad in ("..", ".", ".x"):
        answer = s1.raw("PATCH", "/1.0/instances/c1", {"devices": {bad: {
            "type": "disk", "pool": "default", "source": "v", "path": "/mnt/v"}}})
        assert answer["error_code"] == 400 and "Invalid device name" in answer["error"], answer
    cli.run("storage", "volume", "attach", "default", "v", "c1", "data", "/mnt/v")
    cli.run("start", "c1")
    in_c(cli, "c1", "touch /mnt/v/f")
    assert (volume_dir(s1, "v") / "f").exists()
    mounts = [p.name for p in (s1.state_dir / "containers" / "c1" / "volumes").iterdir()]
    assert len(mounts) == 1 and mounts != ["data"], mounts  # never named by the device
    cli.run("delete", "c1", "--force")


def test_read_only_disks_live_and_at_start(s1: Server, cli: Cli) -> None:
    cli.run("storage", "volume", "create", "default", "ro")
    cli.run("launch", "busybox", "p1", "-q", "-c", "security.privileged=true")
    s1.api("PATCH", "/1.0/instances/p1", {"devices": {"r": {
        "type": "disk", "pool": "default", "source": "ro", "path": "/mnt/ro", "readonly": "true"}}})
    assert "Read-only file system" in in_c(cli, "p1", "touch /mnt/ro/f 2>&1", check=False)
    assert not (volume_dir(s1, "ro") / "f").exists()
    cli.run("delete", "p1", "--force")

    cli.run("storage", "volume", "create", "default", "ro2")
    cli.run("launch", "busybox", "u1", "-q")
    answer = s1.raw("PATCH", "/1.0/instances/u1", {"devices": {"r": {
        "type": "disk", "pool": "default", "source": "ro2", "path": "/mnt/ro", "readonly": "true"}}})
    assert answer["error_code"] == 400 and "stop it first: read-only is applied at start" in answer["error"], answer
    assert "r" not in s1.api("GET", "/1.0/instances/u1")["devices"]
    cli.run("stop", "u1", "--force")
    s1.api("PATCH", "/1.0/instances/u1", {"devices": {"r": {
        "type": "disk", "pool": "default", "source": "ro2", "path": "/mnt/ro", "readonly": "true"}}})
    cli.run("start", "u1")
    assert "Read-only file system" in in_c(cli, "u1", "touch /mnt/ro/f 2>&1", check=False)
    cli.run("delete", "u1", "--force")


def test_a_detach_revokes_or_keeps_the_volume_in_use(s1: Server, cli: Cli) -> None:
    """The container's root bound the volume elsewhere: after the detach it still writes there, so the
    volume stays in use by it (no delete) until it stops."""
    cli.run("storage", "volume", "create", "default", "kept")
    cli.run("launch", "busybox", "c1", "-q")
    cli.run("storage", "volume", "attach", "default", "kept", "c1", "/mnt/kept")
    in_c(cli, "c1", "mkdir -p /other && mount --bind /mnt/kept /other")
    err = cli.fails("storage", "volume", "detach", "default", "kept", "c1")
    assert "still mounts" in err and "/other" in err, err
    assert s1.api("GET", "/1.0/storage-pools/default/volumes/custom/kept")["used_by"] == ["/1.0/instances/c1"]
    assert "in use by c1" in cli.fails("storage", "volume", "delete", "default", "kept")
    assert "in use by c1" in cli.fails("storage", "volume", "rename", "default", "kept", "k2")
    unset = s1.raw("PATCH", "/1.0/instances/c1", {"config": {"volatile.volumes.held": ""}})
    assert unset.get("error_code") in (None, 0), unset
    assert "in use by c1" in cli.fails("storage", "volume", "delete", "default", "kept")  # not the client's
    cli.run("stop", "c1", "--force")
    assert s1.api("GET", "/1.0/storage-pools/default/volumes/custom/kept")["used_by"] == []
    cli.run("storage", "volume", "delete", "default", "kept")

    cli.run("storage", "volume", "create", "default", "busy")
    cli.run("start", "c1")
    cli.run("storage", "volume", "attach", "default", "busy", "c1", "/mnt/busy")
    proc = subprocess.Popen([*in_netns(cli.netns), STAPES, "exec", "c1", "--", "sh", "-c",
                             "cd /mnt/busy && sleep 30"], env=cli.env())
    try:
        time.sleep(2)
        err = cli.fails("storage", "volume", "detach", "default", "busy", "c1")
        assert "Cannot detach" in err and "uses it" in err, err
        assert "busy" in in_c(cli, "c1", "grep -c /mnt/busy /proc/mounts >/dev/null && echo busy")
    finally:
        proc.kill()
        proc.wait()
    cli.run("delete", "c1", "--force")


def test_a_volume_never_serves_a_privileged_and_an_unprivileged_instance(s1: Server, cli: Cli) -> None:
    cli.run("storage", "volume", "create", "default", "mixed")
    cli.run("launch", "busybox", "u1", "-q")
    cli.run("storage", "volume", "attach", "default", "mixed", "u1", "/mnt/m")
    shown = s1.api("GET", "/1.0/storage-pools/default/volumes/custom/mixed")
    assert shown["config"]["volatile.idmap.last"] != "[]"
    cli.run("launch", "busybox", "p1", "-q", "-c", "security.privileged=true")
    err = cli.fails("storage", "volume", "attach", "default", "mixed", "p1", "/mnt/m")
    assert "last used by an unprivileged instance" in err, err
    cli.run("storage", "volume", "detach", "default", "mixed", "u1")
    assert "last used by an unprivileged" in cli.fails("storage", "volume", "attach", "default", "mixed", "p1",
                                                       "/mnt/m")
    answer = s1.raw("PATCH", "/1.0/storage-pools/default/volumes/custom/mixed",
                    {"config": {"volatile.idmap.last": "[]"}})
    assert answer["error_code"] == 400, answer
    cli.run("delete", "u1", "p1", "--force")


def test_projects_with_volumes_stay_and_names_never_collide(s1: Server, cli: Cli) -> None:
    cli.run("project", "create", "pp")
    cli.run("storage", "volume", "create", "default", "sec", "--project", "pp")
    cli.run("storage", "volume", "create", "default", "pp_sec")  # the default project's: another volume
    assert (volume_dir(s1, "pp:sec")).is_dir() and volume_dir(s1, "pp_sec").is_dir()
    err = cli.fails("project", "delete", "pp")
    assert "storage volumes default/sec" in err, err
    assert "storage volumes default/sec" in cli.fails("project", "rename", "pp", "qq")
    cli.run("storage", "volume", "delete", "default", "sec", "--project", "pp")
    assert volume_dir(s1, "pp_sec").is_dir()
    cli.run("project", "delete", "pp")
    cli.run("storage", "volume", "delete", "default", "pp_sec")


@pytest.fixture
def btrfs_dir(tmp_path: Path) -> Iterator[Path]:
    image, mount = tmp_path / "img", tmp_path / "m"
    subprocess.run(["truncate", "-s", "200M", str(image)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_btrfs_receive_never_deletes_what_it_did_not_receive(btrfs_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow peer's stream fails after another volume was created beside the target meanwhile: only what
    the stream made (in the transfer's own staging directory) is removed."""
    from stapes.server.storage import btrfs

    custom = btrfs_dir / "custom"
    custom.mkdir()
    target = custom / "incoming"
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(target)], check=True)

    async def hostile(argv: list[str], *args: object, **kwargs: object) -> None:
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(custom / "victim")], check=True)
        subprocess.run(["btrfs", "-q", "subvolume", "create", f"{argv[-1]}/.stapes-send-000000000000"], check=True)
        raise btrfs.InternalError("the stream broke")

    monkeypatch.setattr(btrfs, "channel_to_tool", hostile)
    transport = btrfs.BtrfsSendReceive(None, None, ())  # type: ignore[arg-type]
    with pytest.raises(btrfs.InternalError, match="the stream broke"):
        await transport.receive(target, snapshot=False)
    await transport.close()
    assert sorted(p.name for p in custom.iterdir()) == ["incoming", "victim"]

    async def stream(argv: list[str], *args: object, **kwargs: object) -> None:
        (custom / "late").mkdir()  # appears meanwhile: not the stream's
        subprocess.run(["btrfs", "-q", "subvolume", "create", f"{argv[-1]}/.stapes-send-0123456789ab"], check=True)
        subprocess.run(["btrfs", "-q", "property", "set", f"{argv[-1]}/.stapes-send-0123456789ab", "ro", "true"],
                       check=True)

    monkeypatch.setattr(btrfs, "channel_to_tool", stream)
    transport = btrfs.BtrfsSendReceive(None, None, ())  # type: ignore[arg-type]
    await transport.receive(target, snapshot=False)
    await transport.close()
    assert sorted(p.name for p in custom.iterdir()) == ["incoming", "late", "victim"]
    (target / "writable").touch()  # the volume itself: a writable snapshot of what arrived
