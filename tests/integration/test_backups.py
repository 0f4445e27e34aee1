"""`export` / `import` of instance backups (Incus's tarball layout), between real servers, with the official
client, and against hostile archives: each refused with a clear error, nothing left on the server, the host
untouched."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.integration import fstree
from tests.integration.harness import Cli, Cluster, Server, _UnixConnection, wait_for
from tests.integration.test_incus_client import incus


def rootfs(server: Server, name: str) -> Path:
    return server.state_dir / "storage-pools/default/containers" / name / "rootfs"


def snapshot_rootfs(server: Server, name: str, snap: str) -> Path:
    return server.state_dir / "storage-pools/default/containers-snapshots" / name / snap / "rootfs"


def leftovers(server: Server, name: str) -> list[str]:
    """Anything of instance `name` on the server: a row, a volume, snapshots, an LXC directory, an upload."""
    found = [f"row {n}" for n, _ in server.instances() if n == name]
    pool = server.state_dir / "storage-pools/default"
    lxc = server.state_dir / "containers" / name
    for path in (pool / "containers" / name, pool / "containers-snapshots" / name, lxc):
        if path.exists():
            found.append(str(path))
    found += [str(p) for p in (server.state_dir / "backups/imports").iterdir()]
    return found


def test_export_import_between_servers(cluster: Cluster, s1: Server, s2: Server, two: Cli) -> None:
    two.run("init", "s1:busybox", "c1", "-c", "user.note=kept", "-d", "root,size=1GiB", "-q")
    root = rootfs(s1, "c1")
    (root / "root/version").write_text("v1")
    two.run("snapshot", "create", "s1:c1", "first")
    (root / "root/version").write_text("current")
    fstree.populate(root)
    (root / "data/null").unlink()  # a device node: refused for an unprivileged container (tested below)
    before = fstree.fingerprint(root / "data")

    target = cluster.root / "c1.tar.gz"
    two.run("export", "s1:c1", str(target))
    assert target.stat().st_size > 0
    assert s1.api("GET", "/1.0/instances/c1/backups") == []  # the server's copy went with the download
    assert not list((s1.state_dir / "backups/instances/c1").iterdir())
    with tarfile.open(target) as archive:
        names = archive.getnames()
        index = yaml.safe_load(archive.extractfile("backup/index.yaml").read())  # type: ignore[union-attr]
    assert names[0] == "backup/index.yaml"
    assert "backup/container/rootfs/root/version" in names and "backup/snapshots/first/rootfs/root/version" in names
    assert index["name"] == "c1" and index["snapshots"] == ["first"] and index["backend"] == "dir"
    assert index["config"]["container"]["config"]["user.note"] == "kept"

    two.run("import", "s2:", str(target))
    assert (rootfs(s2, "c1") / "root/version").read_text() == "current"
    assert (snapshot_rootfs(s2, "c1", "first") / "root/version").read_text() == "v1"
    assert fstree.fingerprint(rootfs(s2, "c1") / "data") == before
    info = s2.api("GET", "/1.0/instances/c1")
    assert info["config"]["user.note"] == "kept" and info["devices"]["root"]["size"] == "1GiB"
    assert info["profiles"] == ["default"]
    assert [s["name"] for s in s2.api("GET", "/1.0/instances/c1/snapshots?recursion=1")] == ["first"]
    two.run("start", "s2:c1")
    assert two.run("exec", "s2:c1", "--", "cat", "/root/version").stdout == "current"
    assert two.run("exec", "s2:c1", "--", "stat", "-c", "%u:%g %a", "/data/text.txt").stdout == "1234:5678 640\n"
    two.run("stop", "s2:c1", "--force")

    # Back to s1 under a new name, from stdin, without snapshots, uncompressed.
    plain = cluster.root / "c1.tar"
    two.run("export", "s2:c1", str(plain), "--instance-only", "--compression", "none")
    with tarfile.open(plain) as archive:
        assert not any(n.startswith("backup/snapshots/") for n in archive.getnames())
    assert "already exists" in two.fails("export", "s2:c1", str(plain))
    with plain.open("rb") as handle:
        result = subprocess.run([str(Path(sys.executable).parent / "stapes"), "import", "s1:", "-", "c2"],
                                stdin=handle, env=two.env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert fstree.fingerprint(rootfs(s1, "c2") / "data") == before
    assert s1.api("GET", "/1.0/instances/c2/snapshots") == []
    assert (rootfs(s1, "c2") / "etc/hostname").read_text() == "c2\n"
    assert "already exists" in two.fails("import", "s1:", str(target))  # c1 is still there


def test_backups_api_expiry_and_removal_with_instance(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-q")
    op = s1.run_op("POST", "/1.0/instances/c1/backups", {"name": "b1", "compression_algorithm": "zstd"})
    assert op["status"] == "Success", op
    assert op["resources"]["backups"] == ["/1.0/instances/c1/backups/b1"]
    listed = s1.api("GET", "/1.0/instances/c1/backups?recursion=1")
    assert [b["name"] for b in listed] == ["b1"] and listed[0]["expires_at"] == "0001-01-01T00:00:00Z"
    directory = s1.state_dir / "backups/instances/c1"
    assert (s1.state_dir / "backups").stat().st_mode & 0o777 == 0o700
    assert (directory / "b1.backup").stat().st_mode & 0o777 == 0o600
    assert (directory / "b1.backup").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert "already exists" in s1.raw("POST", "/1.0/instances/c1/backups", {"name": "b1"})["error"]
    assert "compression" in s1.raw("POST", "/1.0/instances/c1/backups", {"compression_algorithm": "lz9"})["error"]
    s1.run_op("POST", "/1.0/instances/c1/backups/b1", {"name": "b2"})
    assert s1.api("GET", "/1.0/instances/c1/backups") == ["/1.0/instances/c1/backups/b2"]
    # An expiry: gone once it passed.
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    s1.run_op("POST", "/1.0/instances/c1/backups", {"name": "short", "expires_at": soon})
    assert "short" in [b["name"] for b in s1.api("GET", "/1.0/instances/c1/backups?recursion=1")]
    wait_for(lambda: "short" not in [b["name"] for b in s1.api("GET", "/1.0/instances/c1/backups?recursion=1")],
             10, "the backup to expire")
    assert not (directory / "short.backup").exists()
    cli.run("rename", "c1", "c3")
    assert s1.api("GET", "/1.0/instances/c3/backups") == ["/1.0/instances/c3/backups/b2"]
    cli.run("delete", "c3")
    assert not (s1.state_dir / "backups/instances/c3").exists()


def test_incus_client_exports_and_imports(cluster: Cluster, s1: Server) -> None:
    if shutil.which("incus") is None:
        pytest.skip("incus-client is not installed")
    conf = cluster.root / "incus-client"
    conf.mkdir()
    token = cluster.cli(s1).run("config", "trust", "add", "incus-user").stdout.strip().splitlines()[-1]
    incus(conf, "remote", "add", "st", token)
    incus(conf, "init", "st:busybox", "st:c1", "-c", "user.from=incus")
    (rootfs(s1, "c1") / "root/mark").write_text("incus")
    incus(conf, "snapshot", "create", "st:c1", "s0")
    target = cluster.root / "incus.tar.gz"
    incus(conf, "export", "st:c1", str(target))
    assert s1.api("GET", "/1.0/instances/c1/backups") == []
    incus(conf, "import", "st:", str(target), "c9")
    assert (rootfs(s1, "c9") / "root/mark").read_text() == "incus"
    assert s1.api("GET", "/1.0/instances/c9")["config"]["user.from"] == "incus"
    assert [s["name"] for s in s1.api("GET", "/1.0/instances/c9/snapshots?recursion=1")] == ["s0"]


# hostile archives
CANARY = Path("/tmp/stapes-backup-canary")


def _index(name: str = "evil", snapshots: list[str] | None = None, config: dict[str, str] | None = None) -> bytes:
    doc = {"name": name, "backend": "dir", "pool": "default", "snapshots": snapshots or [], "optimized": False,
           "type": "container",
           "config": {"container": {"name": name, "type": "container", "config": config or {}, "devices": {},
                                    "profiles": ["default"]},
                      "snapshots": [{"name": s, "config": {}, "devices": {}, "profiles": ["default"]}
                                    for s in snapshots or []]}}
    return yaml.safe_dump(doc).encode()


def _archive(path: Path, members: Callable[[tarfile.TarFile], None], index: bytes | None = None) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", claimed: int = 0,
                **fields: object) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            for key, value in fields.items():
                setattr(info, key, value)
            if claimed:  # a header claiming more data than follows
                info.size = claimed
                header = info.tobuf(archive.format, archive.encoding, archive.errors)
                archive.fileobj.write(header + data)  # type: ignore[union-attr]
                archive.offset += len(header) + len(data)
                return
            archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        archive.add_member = add  # type: ignore[attr-defined]
        add("backup/index.yaml", data=_index() if index is None else index)
        add("backup/container", tarfile.DIRTYPE)
        add("backup/container/rootfs", tarfile.DIRTYPE)
        members(archive)
    return path


def _add(archive: tarfile.TarFile, *args: object, **fields: object) -> None:
    archive.add_member(*args, **fields)  # type: ignore[attr-defined]


HOSTILE: dict[str, tuple[Callable[[tarfile.TarFile], None], bytes | None, str]] = {
    "absolute": (lambda a: _add(a, str(CANARY)), None, "absolute path"),
    "dotdot": (lambda a: _add(a, "backup/container/rootfs/../../../../../../tmp/stapes-backup-canary",
                              data=b"pwned"), None, "'..'"),
    "symlink-then-file": (lambda a: (_add(a, "backup/container/rootfs/tmp", tarfile.SYMTYPE, linkname="/tmp"),
                                     _add(a, "backup/container/rootfs/tmp/stapes-backup-canary", data=b"pwned")),
                          None, "symbolic link"),
    "hardlink-shadow": (lambda a: _add(a, "backup/container/rootfs/shadow", tarfile.LNKTYPE, linkname="/etc/shadow"),
                        None, "absolute path"),
    "hardlink-via-symlink": (lambda a: (_add(a, "backup/container/rootfs/e", tarfile.SYMTYPE, linkname="/etc"),
                                        _add(a, "backup/container/rootfs/s", tarfile.LNKTYPE,
                                             linkname="backup/container/rootfs/e/shadow")), None, "symbolic link"),
    "oversize-claimed": (lambda a: _add(a, "backup/container/rootfs/big", data=b"x" * 512, claimed=1 << 50), None,
                         "larger than the pool"),
    "device": (lambda a: _add(a, "backup/container/rootfs/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None,
               "block device"),
    "outside-layout": (lambda a: _add(a, "backup/extra", data=b"x"), None, "outside its layout"),
    "bad-name": (lambda a: None, _index(name="bad_name!"), "Invalid instance name"),
    "unknown-key": (lambda a: None, _index(config={"no.such.key": "1"}), "no.such.key"),
    "snapshot-mismatch": (lambda a: None, _index(snapshots=["s0"]), "no files for: s0"),
    # `backup/container/.` would set the volume directory's own mode and owner
    "dot-volume": (lambda a: _add(a, "backup/container/.", tarfile.DIRTYPE, mode=0o4777, uid=1000), None, "'.'"),
    "dot-inside": (lambda a: _add(a, "backup/container/rootfs/./x", data=b"x"), None, "'.'"),
    # an ACL naming a user beyond the container's ids
    "acl-foreign-id": (lambda a: _add(a, "backup/container/rootfs/acl", data=b"x", pax_headers={
        "SCHILY.xattr.system.posix_acl_access": _acl(0xFFFFFFF0)}), None, "ACL"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused(cluster: Cluster, s1: Server, cli: Cli, case: str) -> None:
    members, index, message = HOSTILE[case]
    CANARY.write_text("canary")
    shadow = Path("/etc/shadow").stat()
    try:
        path = _archive(cluster.root / f"{case}.tar", members, index)
        error = cli.fails("import", str(path))
        assert message in error, error
        assert leftovers(s1, "evil") == []
        assert CANARY.read_text() == "canary"
        after = Path("/etc/shadow").stat()
        assert (after.st_nlink, after.st_mtime) == (shadow.st_nlink, shadow.st_mtime)
    finally:
        CANARY.unlink(missing_ok=True)


def _acl(user: int) -> str:
    """A system.posix_acl_access value (version 2: user::rwx, user:`user`:rwx, group::r-x, mask::rwx,
    other::r--), as tarfile holds a binary pax value."""
    entries = [(0x01, 7, 0xFFFFFFFF), (0x02, 7, user), (0x04, 5, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF),
               (0x20, 4, 0xFFFFFFFF)]
    raw = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    return raw.decode("utf-8", "surrogateescape")


def _header(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields: object) -> bytes:
    """One GNU-format member (header, data, padding)."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % 512)


def _long_name(name: str) -> bytes:
    """A GNU long-name (L) header naming the member that follows."""
    data = name.encode() + b"\0"
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, len(data)
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + data + b"\0" * (-len(data) % 512)


def _layout() -> bytes:
    return (_header("backup/index.yaml", data=_index()) + _header("backup/container", tarfile.DIRTYPE)
            + _header("backup/container/rootfs", tarfile.DIRTYPE))


def _polyglot() -> bytes:
    """A valid gzip file whose FEXTRA field holds a complete plain tar (a valid ustar header in block 0, then
    the members): gunzipped it is a harmless archive, read by GNU tar as it stands it holds device nodes, a
    far owner and an unchecked file (the security review's proof of concept)."""
    benign = _layout() + _header("backup/container/rootfs/benign", data=b"hello\n") + b"\0" * 1024
    evil = (_layout() + _header("backup/container/rootfs/benign", data=b"hello\n")
            + _header("backup/container/rootfs/sda", tarfile.BLKTYPE, mode=0o666, devmajor=8, devminor=0)
            + _header("backup/container/rootfs/mem", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=1)
            + _header("backup/container/rootfs/farowner", data=b"x", uid=4000000)
            + _header("backup/container/rootfs/EVIL", data=b"unvalidated\n") + b"\0" * 1024)
    extra = 65535
    assert 512 + len(evil) <= 12 + extra
    block = bytearray(512)
    block[0:12] = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\x03" + struct.pack("<H", extra)
    for offset, value in ((100, b"0000644\0"), (108, b"0000000\0"), (116, b"0000000\0"), (124, b"00000000000\0"),
                          (136, b"00000000000\0"), (156, b"0"), (257, b"ustar\0"), (263, b"00"), (148, b" " * 8)):
        block[offset:offset + len(value)] = value
    block[148:156] = b"%06o\0 " % sum(block)
    body = (bytes(block) + evil).ljust(12 + extra, b"\0")
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    return body + deflate.compress(benign) + deflate.flush() + struct.pack("<II", zlib.crc32(benign), len(benign))


def test_gzip_tar_polyglot_extracts_only_what_was_checked(cluster: Cluster, s1: Server, cli: Cli) -> None:
    path = cluster.root / "poly.tar.gz"
    path.write_bytes(_polyglot())
    with tarfile.open(path) as archive:
        assert archive.getnames()[-1] == "backup/container/rootfs/benign"  # what gunzip gives
    cli.run("import", str(path))
    root = rootfs(s1, "evil")
    assert (root / "benign").read_bytes() == b"hello\n"
    for name in ("sda", "mem", "farowner", "EVIL"):
        assert not (root / name).exists(), name
    assert not list((s1.state_dir / "backups/imports").iterdir())


def test_tar_parsers_agree_on_member_names(cluster: Cluster, s1: Server, cli: Cli) -> None:
    """Two GNU long-name headers in a row: Python's tarfile takes the first, GNU tar the last; what is
    extracted is what was checked. The re-written archive keeps the xattrs restored (ACL ids checked)."""
    xattrs = {"SCHILY.xattr.user.note": b"\xff\x00kept".decode("utf-8", "surrogateescape"),
              "SCHILY.xattr.system.posix_acl_access": _acl(1000)}
    with io.BytesIO() as buf:
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
            info = tarfile.TarInfo("backup/container/rootfs/acl")
            info.size, info.pax_headers = 1, xattrs
            archive.addfile(info, io.BytesIO(b"x"))
        with_xattrs = buf.getvalue().rstrip(b"\0")
    body = (_layout() + _long_name("backup/container/rootfs/first") + _long_name("backup/container/rootfs/second")
            + _header("short", data=b"x") + with_xattrs + b"\0" * (-len(with_xattrs) % 512) + b"\0" * 1024)
    path = cluster.root / "twice.tar"
    path.write_bytes(body)
    cli.run("import", str(path))
    root = rootfs(s1, "evil")
    assert (root / "first").read_bytes() == b"x"
    assert not (root / "second").exists() and not (root / "short").exists()
    assert os.getxattr(root / "acl", "user.note") == b"\xff\x00kept"
    assert struct.pack("<HHI", 0x02, 7, 1000) in os.getxattr(root / "acl", "system.posix_acl_access")


def test_garbage_after_the_members_is_refused(cluster: Cluster, s1: Server, cli: Cli) -> None:
    """Python's tarfile stops at a block that is no header; GNU tar skips it and reads on."""
    path = cluster.root / "garbage.tar"
    path.write_bytes(_layout() + b"\xff" * 512 + _header("backup/container/rootfs/after", data=b"x") + b"\0" * 1024)
    error = cli.fails("import", str(path))
    assert "past the end of its members" in error, error
    assert leftovers(s1, "evil") == []


def test_concurrent_uploads_share_the_free_space(s1: Server) -> None:
    """Each upload is measured against the free space less what the others still have to write."""
    imports = s1.state_dir / "backups/imports"
    stat = os.statvfs(imports)
    size = (stat.f_bavail * stat.f_frsize - (256 << 20)) * 6 // 10

    def upload(timeout: float) -> http.client.HTTPConnection:
        conn = _UnixConnection(s1.state_dir / "unix.socket", timeout)
        conn.putrequest("POST", "/1.0/instances")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        return conn

    first = upload(60)
    try:
        first.send(b"\0" * 4096)
        wait_for(lambda: any(imports.iterdir()), 20, "the first upload to start")
        second = upload(30)
        try:
            answer = second.getresponse()
            assert answer.status == 413, answer.status
            assert "free for it" in json.loads(answer.read())["error"]
        finally:
            second.close()
    finally:
        with contextlib.suppress(OSError):
            first.sock.shutdown(socket.SHUT_RDWR)
        first.close()
    wait_for(lambda: not any(imports.iterdir()), 20, "the cut upload to be removed")


def test_device_nodes_on_an_unprivileged_rootfs_cannot_be_opened(s1: Server, cli: Cli) -> None:
    """Defence in depth: the id-mapped root of an unprivileged container is mounted nodev."""
    cli.run("init", "busybox", "c1", "-q")
    node = rootfs(s1, "c1") / "node"
    os.mknod(node, 0o20666, os.makedev(1, 3))  # /dev/null's numbers
    os.chmod(node, 0o666)
    cli.run("start", "c1")
    try:
        result = cli.run("exec", "c1", "--", "sh", "-c", "echo x > /node", check=False)
        assert result.returncode != 0 and "denied" in result.stderr.lower(), (result.returncode, result.stderr)
        assert cli.run("exec", "c1", "--", "sh", "-c", "echo x > /dev/null").returncode == 0
    finally:
        cli.run("stop", "c1", "--force")


def test_sparse_member_larger_than_the_pool_is_refused(cluster: Cluster, s1: Server, cli: Cli) -> None:
    """A real GNU sparse member (an 8 TiB hole) whose apparent size no pool here holds."""
    tree = cluster.root / "sparse-src"
    (tree / "backup/container/rootfs").mkdir(parents=True)
    (tree / "backup/index.yaml").write_bytes(_index())
    with (tree / "backup/container/rootfs/hole").open("wb") as handle:
        handle.truncate(1 << 43)
    path = cluster.root / "sparse.tar"
    subprocess.run(["tar", "-C", str(tree), "-cSf", str(path), "backup/index.yaml", "backup/container"], check=True)
    assert path.stat().st_size < 1 << 20
    assert "larger than the pool" in cli.fails("import", str(path))
    assert leftovers(s1, "evil") == []


def test_cancelled_import_leaves_nothing(cluster: Cluster, s1: Server, cli: Cli) -> None:
    path = cluster.root / "many.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        def add(name: str, kind: bytes, data: bytes = b"") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mode = kind, len(data), 0o755
            archive.addfile(info, io.BytesIO(data))

        add("backup/index.yaml", tarfile.REGTYPE, _index())
        for directory in ("backup/container", "backup/container/rootfs"):
            add(directory, tarfile.DIRTYPE)
        for d in range(60):
            add(f"backup/container/rootfs/d{d}", tarfile.DIRTYPE)
            for f in range(500):
                add(f"backup/container/rootfs/d{d}/f{f}", tarfile.REGTYPE, b"x" * 1024)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "stapes"), "import", str(path)], env=cli.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def restoring() -> list[dict[str, object]]:
            return [o for o in s1.running_operations() if o["description"] == "Restoring backup"]

        wait_for(lambda: restoring() and (s1.state_dir / "storage-pools/default/containers/evil").exists(), 60,
                 "the import to unpack")
        op = restoring()[0]
        s1.api("DELETE", f"/1.0/operations/{op['id']}")
        final = s1.api("GET", f"/1.0/operations/{op['id']}/wait?timeout=60")
        assert final["status"] == "Cancelled", final
        proc.wait(60)
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert leftovers(s1, "evil") == []


def test_export_of_a_missing_instance_and_bad_bodies(s1: Server, cli: Cli) -> None:
    assert "not found" in cli.fails("export", "nosuch", "/tmp/never-written.tar.gz")
    assert not Path("/tmp/never-written.tar.gz").exists()
    answer = s1.raw("POST", "/1.0/instances/nosuch/backups", {})
    assert answer["error_code"] == 404
    cli.run("init", "busybox", "c1", "-q")
    assert "past" in s1.raw("POST", "/1.0/instances/c1/backups", {"expires_at": "2001-01-01T00:00:00Z"})["error"]
    assert "backup name" in s1.raw("POST", "/1.0/instances/c1/backups", {"name": "a/b"})["error"]
    assert json.dumps(s1.api("GET", "/1.0/instances/c1/backups")) == "[]"
