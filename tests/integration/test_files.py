"""`stapes file push/pull/delete/mkdir` (and `incus file ...`) against real servers and containers: bytes,
modes and owners round trip; a hostile rootfs (symlinks to the host, `..`) never lets a push or a pull reach a
host file; owners outside the container's map are refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import Cli, Cluster, Server


def rootfs(server: Server, name: str) -> Path:
    return server.state_dir / "storage-pools/default/containers" / name / "rootfs"


def test_push_pull_round_trip_keeps_bytes_modes_and_owners(cli: Cli, s1: Server, tmp_path: Path) -> None:
    cli.run("init", "busybox", "c1")
    data = os.urandom(3 << 20) + b"tail"  # several chunks
    src = tmp_path / "blob"
    src.write_bytes(data)
    src.chmod(0o640)
    cli.run("file", "push", str(src), "c1/root/blob")
    on_disk = rootfs(s1, "c1") / "root/blob"
    st = on_disk.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 0)  # mode kept, root by default
    assert on_disk.read_bytes() == data

    out = tmp_path / "back"
    cli.run("file", "pull", "s1:c1/root/blob", str(out))  # over TLS too
    assert out.read_bytes() == data and stat.S_IMODE(out.stat().st_mode) == 0o640

    cli.run("file", "push", str(src), "c1/root/owned", "--uid", "1000", "--gid", "1001", "--mode", "4750")
    st = (rootfs(s1, "c1") / "root/owned").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4750, 1000, 1001)
    # Overwriting an existing file keeps its owner and mode unless others are given.
    src.write_bytes(b"new")
    cli.run("file", "push", str(src), "c1/root/owned", "--mode", "0600")
    st = (rootfs(s1, "c1") / "root/owned").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1000, 1001)

    # What the container sees through its id-mapped root: the same ids.
    cli.run("start", "c1")
    seen = cli.run("exec", "c1", "--", "stat", "-c", "%u %g %a", "/root/owned").stdout.split()
    assert seen == ["1000", "1001", "600"]
    cli.run("delete", "c1", "--force")


def test_tree_stdin_append_mkdir_delete(cli: Cli, s1: Server, tmp_path: Path) -> None:
    cli.run("init", "busybox", "c1")
    tree = tmp_path / "site"
    (tree / "private").mkdir(parents=True)
    (tree / "private").chmod(0o700)
    (tree / "index.html").write_text("<h1>hi</h1>")
    (tree / "run.sh").write_text("#!/bin/sh\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "private/key").write_text("k")
    (tree / "private/key").chmod(0o600)
    (tree / "link").symlink_to("index.html")
    cli.run("file", "push", "-r", "-p", str(tree), "c1/srv/www/", "--uid", "33", "--gid", "33")
    remote = rootfs(s1, "c1") / "srv/www/site"
    assert stat.S_IMODE((remote / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((remote / "run.sh").stat().st_mode) == 0o755
    assert (remote / "private/key").stat().st_uid == 33 and (remote / "index.html").stat().st_gid == 33
    assert os.readlink(remote / "link") == "index.html"

    out = tmp_path / "out"
    cli.run("file", "pull", "-r", "-p", "c1/srv/www/site", str(out) + "/")
    assert (out / "site/index.html").read_text() == "<h1>hi</h1>"
    assert stat.S_IMODE((out / "site/private").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "site/private/key").stat().st_mode) == 0o600
    assert os.readlink(out / "site/link") == "index.html"

    cli.run("file", "push", "-", "c1/tmp/log", input="one\n")
    cli.run("file", "push", "--append", "-", "c1/tmp/log", input="two\n")
    assert cli.run("file", "pull", "c1/tmp/log", "-").stdout == "one\ntwo\n"
    assert stat.S_IMODE((rootfs(s1, "c1") / "tmp/log").stat().st_mode) == 0o644

    cli.run("file", "mkdir", "-p", "--mode", "0750", "c1/opt/a/b")
    assert stat.S_IMODE((rootfs(s1, "c1") / "opt/a/b").stat().st_mode) == 0o750
    assert "not empty" in cli.fails("file", "delete", "c1/opt/a")
    cli.run("file", "delete", "-f", "c1/opt/a")
    assert not (rootfs(s1, "c1") / "opt/a").exists()
    assert "no such file" in cli.fails("file", "pull", "c1/opt/a", str(tmp_path / "x"))
    assert "not found" in cli.fails("file", "pull", "nosuch/etc/hosts", str(tmp_path / "x"))
    cli.run("delete", "c1")


def test_hostile_rootfs_never_leads_to_the_host(cli: Cli, s1: Server, cluster: Cluster, tmp_path: Path) -> None:
    """The container's root plants symlinks to host files and directories; every push and pull stays in
    the rootfs (a canary on the host is neither read nor changed)."""
    cli.run("init", "busybox", "c1")
    canary = cluster.root / "canary-dir" / "canary"
    canary.parent.mkdir()
    canary.write_text("host secret\n")
    root = rootfs(s1, "c1")
    up = "../" * 20
    (root / "tmp/abs").symlink_to(canary)
    (root / "tmp/rel").symlink_to(up + str(canary).lstrip("/"))
    (root / "tmp/dir").symlink_to(canary.parent)
    (root / "tmp/etc").symlink_to(up + "etc")
    (root / "tmp/shadow").symlink_to("/etc/shadow")
    local = tmp_path / "payload"
    local.write_text("payload\n")

    # Pulls: a symlink comes back as a symlink (its text), a path through one resolves inside the rootfs.
    for link in ("abs", "rel", "shadow"):
        assert "host secret" not in cli.run("file", "pull", f"c1/tmp/{link}", "-", check=False).stdout
        cli.run("file", "pull", f"c1/tmp/{link}", str(tmp_path / link))
        assert (tmp_path / link).is_symlink()
    for path in ("tmp/dir/canary", f"tmp/rel/{up}", "tmp/etc/shadow", f"{up}{str(canary).lstrip('/')}"):
        result = cli.run("file", "pull", f"c1/{path}", "-", check=False)
        assert result.returncode != 0 and "host secret" not in result.stdout and "root:" not in result.stdout

    # Pushes: over a symlink replaces it (inside), through one lands inside, `..` is clamped at the root.
    cli.run("file", "push", str(local), "c1/tmp/abs")
    assert (root / "tmp/abs").is_file() and not (root / "tmp/abs").is_symlink()
    assert "symlink" in cli.fails("file", "push", "--append", str(local), "c1/tmp/rel")
    assert "not a directory" in cli.fails("file", "push", "-p", str(local), "c1/tmp/dir/canary")  # dangling inside
    cli.run("file", "mkdir", "-p", f"c1{canary.parent}")
    cli.run("file", "push", str(local), "c1/tmp/dir/canary")
    assert (root / str(canary).lstrip("/")).read_text() == "payload\n"
    cli.run("file", "push", str(local), "c1/tmp/etc/stapes-canary")
    assert (root / "etc/stapes-canary").exists() and not Path("/etc/stapes-canary").exists()
    cli.run("file", "push", "-p", str(local), f"c1/{up}{str(canary).lstrip('/')}.pushed")
    assert not Path(f"{canary}.pushed").exists() and (root / f"{str(canary).lstrip('/')}.pushed").exists()
    cli.run("file", "mkdir", "-p", "c1/tmp/dir/made")
    cli.run("file", "delete", "c1/tmp/dir/canary")
    assert canary.read_text() == "host secret\n" and not (canary.parent / "made").exists()
    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary"]
    # A FIFO planted by the container is refused at once (not opened, never hangs the server).
    os.mkfifo(root / "tmp/fifo")
    assert "not a regular file" in cli.fails("file", "pull", "c1/tmp/fifo", "-")
    assert "not a regular file" in cli.fails("file", "push", str(local), "c1/tmp/fifo")
    cli.run("delete", "c1")


def test_owner_outside_the_map_is_refused(cli: Cli, s1: Server, tmp_path: Path) -> None:
    size = int(re.search(r"(\d+) ids", s1.api("GET", "/1.0")["environment"]["unprivileged"]).group(1))  # type: ignore[union-attr]
    cli.run("init", "busybox", "c1")
    local = tmp_path / "f"
    local.write_text("x")
    for flags in (["--uid", str(size)], ["--gid", str(size)], ["--uid", "4294967295"]):
        err = cli.fails("file", "push", str(local), "c1/tmp/f", *flags)
        assert "not an id of this container" in err and str(size - 1) in err, err
    assert not (rootfs(s1, "c1") / "tmp/f").exists()  # nothing written on a refusal
    assert "not an id" in cli.fails("file", "mkdir", "--uid", str(size + 5), "c1/tmp/d")
    cli.run("file", "push", str(local), "c1/tmp/f", "--uid", str(size - 1), "--gid", str(size - 1))
    assert (rootfs(s1, "c1") / "tmp/f").stat().st_uid == size - 1
    # A privileged container has every id but (uid_t)-1.
    cli.run("init", "busybox", "c2", "-c", "security.privileged=true")
    cli.run("file", "push", str(local), "c2/tmp/f", "--uid", str(size + 5))
    assert "4294967294" in cli.fails("file", "push", str(local), "c2/tmp/f", "--uid", "4294967295")
    cli.run("delete", "c1", "c2")


def test_running_container_sees_pushed_files_and_gives_its_own(cli: Cli, s1: Server, tmp_path: Path) -> None:
    cli.run("launch", "busybox", "c1")
    local = tmp_path / "conf"
    local.write_text("pushed\n")
    cli.run("file", "push", str(local), "c1/etc/app.conf", "--uid", "1000")
    assert cli.run("exec", "c1", "--", "cat", "/etc/app.conf").stdout == "pushed\n"
    assert cli.run("exec", "c1", "--", "stat", "-c", "%u", "/etc/app.conf").stdout.strip() == "1000"
    cli.run("exec", "c1", "--", "sh", "-c", "echo made inside > /root/inside; chown 7:8 /root/inside")
    assert cli.run("file", "pull", "c1/root/inside", "-").stdout == "made inside\n"
    head = s1.raw("GET", "/1.0/instances/c1/files?path=/root")
    assert "inside" in head["metadata"]
    cli.run("file", "delete", "c1/root/inside")
    assert cli.run("exec", "c1", "--", "test", "-e", "/root/inside", check=False).returncode == 1
    cli.run("delete", "c1", "--force")


def test_file_api_headers(cli: Cli, s1: Server) -> None:
    """Incus's shapes: a directory's listing as JSON with X-Incus-* headers, a symlink's target as the body."""
    cli.run("init", "busybox", "c1")
    (rootfs(s1, "c1") / "tmp/l").symlink_to("/etc/hostname")
    out = subprocess.run(["curl", "-s", "-i", "--unix-socket", str(s1.state_dir / "unix.socket"),
                          "http://x/1.0/instances/c1/files?path=/tmp/l"], capture_output=True, text=True,
                         check=True).stdout
    assert "X-Incus-type: symlink" in out and out.endswith("/etc/hostname")
    out = subprocess.run(["curl", "-s", "-i", "--unix-socket", str(s1.state_dir / "unix.socket"),
                          "http://x/1.0/instances/c1/files?path=/tmp"], capture_output=True, text=True,
                         check=True).stdout
    headers, _, body = out.partition("\n\n")  # text mode: CRLF read as LF
    mode = stat.S_IMODE((rootfs(s1, "c1") / "tmp").stat().st_mode)
    assert "X-Incus-type: directory" in headers and f"X-Incus-mode: {mode:04o}" in headers
    assert json.loads(body)["metadata"] == ["l"]
    cli.run("delete", "c1")


def incus(conf: Path, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, INCUS_CONF=str(conf), HOME=str(conf))
    result = subprocess.run(["incus", *args], env=env, capture_output=True, text=True, input=input, timeout=120,
                            check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"incus {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@pytest.mark.skipif(shutil.which("incus") is None, reason="incus-client is not installed")
def test_incus_file_push_pull_against_stapes(cluster: Cluster, s1: Server, tmp_path: Path) -> None:
    """The official client speaks SFTP over `GET /1.0/instances/<name>/sftp`."""
    conf = cluster.root / "incus-client"
    conf.mkdir()
    token = cluster.cli(s1).run("config", "trust", "add", "incus-user").stdout.strip().splitlines()[-1]
    incus(conf, "remote", "add", "st", token)
    incus(conf, "init", "st:busybox", "st:c1")
    data = os.urandom(1 << 20)
    src = tmp_path / "blob"
    src.write_bytes(data)
    incus(conf, "file", "push", str(src), "st:c1/root/blob", "--mode", "0600", "--uid", "5", "--gid", "6")
    st = (rootfs(s1, "c1") / "root/blob").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 5, 6)
    incus(conf, "file", "pull", "st:c1/root/blob", str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == data
    assert incus(conf, "file", "pull", "st:c1/etc/hostname", "-").stdout == "c1\n"

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub/f").write_text("deep\n")
    incus(conf, "file", "push", "-r", str(tree), "st:c1/srv/")
    assert (rootfs(s1, "c1") / "srv/tree/sub/f").read_text() == "deep\n"
    incus(conf, "file", "pull", "-r", "st:c1/srv/tree", str(tmp_path / "pulled"))
    assert (tmp_path / "pulled/tree/sub/f").read_text() == "deep\n"

    # Through SFTP too, a symlink to a host file stays a symlink and the host file is untouched.
    canary = cluster.root / "incus-canary"
    canary.write_text("host secret\n")
    (rootfs(s1, "c1") / "tmp/abs").symlink_to(canary)
    assert "host secret" not in incus(conf, "file", "pull", "st:c1/tmp/abs", "-", check=False).stdout
    incus(conf, "file", "push", str(src), "st:c1/tmp/abs")
    assert canary.read_text() == "host secret\n"
    assert (rootfs(s1, "c1") / "tmp/abs").read_bytes() == data
    err = incus(conf, "file", "push", str(src), "st:c1/tmp/x", "--uid", "4294967295", check=False)
    assert err.returncode != 0 and "not an id" in err.stderr

    incus(conf, "file", "delete", "st:c1/root/blob")
    assert not (rootfs(s1, "c1") / "root/blob").exists()
    incus(conf, "delete", "st:c1")
