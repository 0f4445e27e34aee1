"""The file API's rules without a server: path cleaning, modes, ids, and `Root` on a hostile tree (symlinks to
the host, `..`, FIFOs) — nothing outside the root is ever read or written."""

from __future__ import annotations

import asyncio
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stapes.api.errors import BadRequest, Conflict, NotFound, RequestTooLarge, Unavailable
from stapes.cli import files as cli_files
from stapes.client import files as client_files
from stapes.client.files import RemoteFile
from stapes.server.images import publish as publish_module
from stapes.server.images.publish import image_metadata, source_of
from stapes.server.instances import files as files_module
from stapes.server.instances import sftp
from stapes.server.instances.files import FileInfo, Root, check_ids, parse_mode, split


def test_split_cleans_lexically_inside_the_root() -> None:
    assert split("/etc/hosts") == ("/etc", "hosts")
    assert split("etc//hosts/") == ("/etc", "hosts")
    assert split("/../../etc/./shadow") == ("/etc", "shadow")
    assert split("/a/b/../../..") == ("/", "")
    assert split("/") == ("/", "")
    for bad in ("", "a\0b", "/" + "x" * 5000):
        with pytest.raises(BadRequest):
            split(bad)


def test_modes_and_ids() -> None:
    assert parse_mode("0644") == 0o644 and parse_mode("04750") == 0o4750 and parse_mode("420") == 420
    assert parse_mode(None) is None and parse_mode("-1") is None and parse_mode("0o700") == 0o700
    for bad in ("abc", "077777", "99999"):
        with pytest.raises(BadRequest):
            parse_mode(bad)
    check_ids(0, 65535, 65536, 65536)
    check_ids(None, None, 65536, 65536)
    for uid, gid in ((65536, 0), (0, 65536), (-1, 0)):
        with pytest.raises(BadRequest, match="not an id of this container"):
            check_ids(uid, gid, 65536, 65536)


def test_publish_sources_and_metadata() -> None:
    assert source_of("instance", "c1") == ("c1", None)
    assert source_of("container", "c1") == ("c1", None)
    assert source_of("snapshot", "c1/snap0") == ("c1", "snap0")
    for kind, name in (("snapshot", "c1"), ("instance", "c1/s"), ("snapshot", "c1/a/b"), ("image", "c1"),
                       ("instance", "")):
        with pytest.raises(BadRequest):
            source_of(kind, name)
    meta = image_metadata({"properties": {"os": "busybox", "description": "old"}, "templates": {"x": {}}},
                          "x86_64", {"description": "new"}, 1234.5)
    assert meta == {"properties": {"os": "busybox", "description": "new"}, "templates": {"x": {}},
                    "architecture": "x86_64", "creation_date": 1234}
    assert image_metadata("not a mapping", "aarch64", {}, 0)["properties"] == {}


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Root, Path, Path]:
    """A rootfs whose owner planted symlinks to a host directory and file."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("host secret")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_text("inside")
    (root / "abs").symlink_to(host / "secret")
    (root / "dir").symlink_to(host)
    (root / "rel").symlink_to("../host")
    (root / "loop").symlink_to("loop")
    os.mkfifo(root / "fifo")
    r = Root(root, 65536, 65536)
    yield r, root, host
    r.close()


def test_reads_stay_inside(hostile: tuple[Root, Path, Path]) -> None:
    r, root, host = hostile
    assert r.lstat("/abs").kind == "symlink" and r.readlink("/abs") == str(host / "secret")
    with pytest.raises(BadRequest):
        r.open_read("/abs")  # a symlink at the final component is never followed
    for path in ("/dir/secret", "/rel/secret", "/../host/secret", "/etc/../../host/secret"):
        with pytest.raises(NotFound):
            r.open_read(path)
    info, fd = r.open_read("/etc/../../../etc/hosts")
    assert os.read(fd, 100) == b"inside" and info.kind == "file"
    os.close(fd)
    with pytest.raises(BadRequest, match="not a regular file"):
        r.open_read("/fifo")
    with pytest.raises(BadRequest):
        r.lstat("/loop/x")
    assert r.stat("/etc").kind == "directory" and "hosts" in r.list_dir("/etc")


def test_writes_stay_inside(hostile: tuple[Root, Path, Path]) -> None:
    r, root, host = hostile
    w = r.begin_write("/abs", uid=1000, gid=1000, mode=0o600, append=False)
    w.write(b"replaced")
    w.commit()
    assert (root / "abs").read_bytes() == b"replaced" and not (root / "abs").is_symlink()
    st = (root / "abs").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (1000, 0o600)
    with pytest.raises(BadRequest, match="symlink"):
        r.begin_write("/rel", uid=None, gid=None, mode=None, append=True)
    with pytest.raises(NotFound):
        r.begin_write("/dir/secret", uid=None, gid=None, mode=None, append=False)  # /host is not in the root
    r.mkdir(str(host), uid=None, gid=None, mode=None, parents=True)  # the symlink's target, inside the root
    w = r.begin_write("/dir/secret", uid=None, gid=None, mode=None, append=False)  # now lands inside
    w.write(b"inside")
    w.commit()
    assert (root / str(host).lstrip("/") / "secret").read_bytes() == b"inside"
    r.mkdir("/dir/new", uid=None, gid=None, mode=None)
    r.symlink("/dir/link", "/etc/shadow", uid=None, gid=None)
    r.delete("/dir/secret")
    assert sorted(p.name for p in host.iterdir()) == ["secret"] and (host / "secret").read_text() == "host secret"
    with pytest.raises(BadRequest, match="not a regular file"):
        r.begin_write("/fifo", uid=None, gid=None, mode=None, append=False)
    with pytest.raises(BadRequest, match="not an id"):
        r.begin_write("/etc/x", uid=70000, gid=None, mode=None, append=False)
    with pytest.raises(RequestTooLarge):
        r.begin_write("/etc/x", uid=None, gid=None, mode=None, append=False, length=1 << 62)
    assert not any(p.name.startswith(".stapes-") for p in (root / "etc").iterdir())  # nothing left on refusal


def test_defaults_overwrite_append_and_delete(hostile: tuple[Root, Path, Path]) -> None:
    r, root, _ = hostile
    (root / "etc/hosts").chmod(0o640)
    os.chown(root / "etc/hosts", 7, 8)
    w = r.begin_write("/etc/hosts", uid=None, gid=None, mode=None, append=False)
    w.write(b"new")
    w.commit()
    st = (root / "etc/hosts").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (7, 8, 0o640)  # an existing file keeps them
    w = r.begin_write("/etc/hosts", uid=None, gid=None, mode=None, append=True)
    w.write(b"+more")
    w.commit()
    assert (root / "etc/hosts").read_bytes() == b"new+more"
    w = r.begin_write("/etc/fresh", uid=None, gid=None, mode=None, append=False)
    w.abort()
    assert not (root / "etc/fresh").exists()
    w = r.begin_write("/etc/fresh", uid=None, gid=None, mode=None, append=False)
    w.commit()
    st = (root / "etc/fresh").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
    r.mkdir("/etc/d/e", uid=5, gid=5, mode=0o700, parents=True)
    assert stat.S_IMODE((root / "etc/d").stat().st_mode) == 0o755 and (root / "etc/d").stat().st_uid == 5
    assert stat.S_IMODE((root / "etc/d/e").stat().st_mode) == 0o700
    with pytest.raises(Conflict):
        r.delete("/etc/d")
    with pytest.raises(Conflict):
        r.mkdir("/etc/hosts", uid=None, gid=None, mode=None)
    r.delete("/etc/d", recursive=True)
    with pytest.raises(BadRequest):
        r.delete("/")
    assert not (root / "etc/d").exists()


# `stapes file pull` against a hostile server/container: the local destination is never left by a pull.
class _FakeServer:
    """What `files.pull` returns for a tree the container controls: {path: ('file', mode, bytes) |
    ('symlink', target) | ('directory', mode, [names])}."""

    def __init__(self, tree: dict[str, tuple[Any, ...]]) -> None:
        self.tree = tree
        self.during: list[Callable[[], None]] = []

    async def pull(self, conn: Any, instance: str, path: str,
                   sink: Callable[[RemoteFile], Callable[[bytes], None]]) -> tuple[RemoteFile, Any]:
        entry = self.tree[path]
        if entry[0] == "symlink":
            return RemoteFile("symlink", 0, 0, 0o777), entry[1]
        if entry[0] == "directory":
            return RemoteFile("directory", 0, 0, entry[1]), list(entry[2])
        info = RemoteFile("file", 0, 0, entry[1], len(entry[2]))
        write = sink(info)
        for check in self.during:
            check()
        write(entry[2])
        return info, None


def _pull(monkeypatch: pytest.MonkeyPatch, server: _FakeServer, path: str, local: Path,
          recursive: bool = True) -> None:
    monkeypatch.setattr(client_files, "pull", server.pull)
    asyncio.run(cli_files._pull_tree(None, "c1", path, local, recursive))


def test_pull_never_writes_through_a_symlink_it_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    server = _FakeServer({"/data": ("directory", 0o755, ["x"]), "/data/x": ("symlink", str(outside))})
    _pull(monkeypatch, server, "/data", out / "data")
    assert os.readlink(out / "data/x") == str(outside)  # a symlink comes back as one
    # The container replaces the symlink by a directory: the second pull must not follow the local symlink.
    server.tree.update({"/data/x": ("directory", 0o777, ["authorized_keys"]),
                        "/data/x/authorized_keys": ("file", 0o644, b"attacker key\n")})
    with pytest.raises(BadRequest, match="symlink"):
        _pull(monkeypatch, server, "/data", out / "data")
    assert list(outside.iterdir()) == [] and stat.S_IMODE(outside.stat().st_mode) == 0o755
    # ... nor where a file goes.
    server.tree["/data/x"] = ("file", 0o644, b"over")
    (outside / "f").write_text("host")
    (out / "data/x").unlink()
    (out / "data/x").symlink_to(outside / "f")
    with pytest.raises(BadRequest, match="symlink"):
        _pull(monkeypatch, server, "/data", out / "data")
    assert (outside / "f").read_text() == "host"


@pytest.mark.parametrize("bad", ["..", ".", "", "a/b", "../../escape", "x\0y"])
def test_pull_refuses_bad_names_in_a_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    out = tmp_path / "a/b/out"
    out.mkdir(parents=True)
    server = _FakeServer({"/d": ("directory", 0o755, [bad]), f"/d/{bad}": ("file", 0o644, b"x"),
                          "/d/../../escape": ("file", 0o644, b"x")})
    with pytest.raises(BadRequest, match="invalid file name"):
        _pull(monkeypatch, server, "/d", out / "d")
    assert {p.name for p in tmp_path.rglob("*")} <= {"a", "b", "out", "d"} and not any(
        p.is_file() for p in tmp_path.rglob("*"))


def test_pull_temp_file_is_private_and_unpredictable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "shared"
    work.mkdir()
    work.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    (work / ".passwd.stapes-pull").symlink_to(victim)  # a local user's guess at the temp name
    server = _FakeServer({"/etc/passwd": ("file", 0o4755, b"root:x:0:0\n")})
    seen: list[int] = []

    def while_downloading() -> None:
        for p in work.iterdir():
            if p.name.startswith(".passwd.stapes-pull.") and not p.is_symlink():
                seen.append(stat.S_IMODE(p.lstat().st_mode))

    server.during.append(while_downloading)
    _pull(monkeypatch, server, "/etc/passwd", work / "passwd", recursive=False)
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert seen == [0o600]  # nobody reads it before it is complete
    assert (work / "passwd").read_bytes() == b"root:x:0:0\n"
    assert stat.S_IMODE((work / "passwd").stat().st_mode) == 0o755  # setuid dropped
    assert sorted(p.name for p in work.iterdir()) == [".passwd.stapes-pull", "passwd"]  # no leftovers


# The SFTP server on a Root, without a daemon: bounded, and nothing a client sends escapes a request.
def _s(value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(raw)) + raw


class _Client:
    def __init__(self, root: Root, **kwargs: Any) -> None:
        self.reader = sftp.Reader()
        self.answers: asyncio.Queue[bytes] = asyncio.Queue()
        self.session = sftp.Session(root, self.reader, self._got, **kwargs)
        self.id = 0

    async def _got(self, data: bytes) -> None:
        await self.answers.put(data[4:])

    async def start(self) -> None:
        self.task = asyncio.create_task(self.session.run())
        self.reader.feed_data(struct.pack(">IBI", 5, sftp.INIT, 3))
        assert (await self.answers.get())[0] == sftp.VERSION

    async def req(self, kind: int, body: bytes) -> tuple[int, bytes]:
        self.id += 1
        packet = bytes([kind]) + struct.pack(">I", self.id) + body
        self.reader.feed_data(struct.pack(">I", len(packet)) + packet)
        answer = await asyncio.wait_for(self.answers.get(), 10)
        assert struct.unpack(">I", answer[1:5])[0] == self.id
        return answer[0], answer[5:]

    async def status(self, kind: int, body: bytes) -> int:
        typ, rest = await self.req(kind, body)
        assert typ == sftp.STATUS, typ
        return int(struct.unpack(">I", rest[:4])[0])

    async def open(self, path: str, flags: int = sftp.F_READ) -> bytes:
        typ, rest = await self.req(sftp.OPEN, _s(path) + struct.pack(">II", flags, 0))
        assert typ == sftp.HANDLE, rest
        return rest[4:]

    async def close(self) -> None:
        self.reader.feed_eof()
        await asyncio.wait_for(self.task, 10)


@pytest.fixture
def tree(tmp_path: Path) -> Any:
    (tmp_path / "rootfs/etc").mkdir(parents=True)
    (tmp_path / "rootfs/etc/hosts").write_text("inside")
    r = Root(tmp_path / "rootfs", 65536, 65536)
    yield r, tmp_path / "rootfs"
    r.close()


async def test_sftp_out_of_range_offsets_and_bugs_fail_one_request(tree: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    r, _ = tree
    c = _Client(r, limits=sftp.Limits())
    await c.start()
    h = await c.open("/etc/hosts")
    assert await c.status(sftp.READ, _s(h) + struct.pack(">QI", 1 << 63, 10)) == sftp.BAD_MESSAGE
    monkeypatch.setattr(r, "lstat", lambda path: 1 / 0)  # an unexpected exception: FAILURE, the session goes on
    assert await c.status(sftp.LSTAT, _s("/etc")) == sftp.FAILURE
    typ, data = await c.req(sftp.READ, _s(h) + struct.pack(">QI", 0, 10))
    assert typ == sftp.DATA and data[4:] == b"inside"
    await c.close()
    assert c.session.handles == {}


async def test_sftp_directories_are_read_lazily(tree: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    r, root = tree
    (root / "big").mkdir()
    for i in range(250):
        (root / f"big/{i}").symlink_to("x" * 100)
    c = _Client(r, limits=sftp.Limits())
    await c.start()
    stats: list[Any] = []
    real = FileInfo.of
    monkeypatch.setattr(FileInfo, "of", classmethod(lambda cls, st: stats.append(st) or real(st)))
    typ, rest = await c.req(sftp.OPENDIR, _s("/big"))
    assert typ == sftp.HANDLE and stats == []  # nothing read or held until READDIR
    h, names = rest[4:], []
    while True:
        typ, rest = await c.req(sftp.READDIR, _s(h))
        if typ == sftp.STATUS:
            break
        count = struct.unpack(">I", rest[:4])[0]
        assert count <= sftp.DIR_BATCH
        names.append(count)
    assert sum(names) == 250 and len(stats) == 250
    await c.close()


async def test_sftp_sessions_and_handles_are_capped_daemon_wide(tree: Any) -> None:
    r, _ = tree
    limits = sftp.Limits(sessions=2, handles=3)
    a, b = _Client(r, limits=limits), _Client(r, limits=limits)
    await a.start()
    await b.start()
    with pytest.raises(Unavailable):
        limits.check()
    with pytest.raises(Unavailable):
        await _Client(r, limits=limits).session.run()
    await a.open("/etc/hosts")
    await a.open("/etc/hosts")
    await b.open("/etc/hosts")
    assert await b.status(sftp.OPEN, _s("/etc/hosts") + struct.pack(">II", sftp.F_READ, 0)) == sftp.FAILURE
    assert await b.status(sftp.OPENDIR, _s("/etc")) == sftp.FAILURE
    await a.close()
    assert limits.handles == 1 and len(limits.sessions) == 1
    await b.open("/etc/hosts")
    limits.end(("", ""))  # the instance went away: its sessions end
    await asyncio.wait_for(b.task, 10)
    assert limits.handles == 0 and not limits.sessions
    idle = _Client(r, limits=limits, idle_timeout=0.2)
    await idle.start()
    await asyncio.wait_for(idle.task, 5)  # ended by the idle timeout


async def test_sftp_append_and_writes_check_the_space_left(tree: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    r, root = tree
    target = root / "etc/log"
    target.write_bytes(b"x" * 500)
    real = os.fstatvfs

    def fstatvfs(fd: int) -> Any:  # a volume with 1000 bytes beyond the margin before the file grew past 500
        free = files_module.FREE_SPACE_MARGIN + 1000 - (target.stat().st_size - 500)
        return type("V", (), {"f_bavail": free, "f_frsize": 1, "f_blocks": real(fd).f_blocks})()

    monkeypatch.setattr(os, "fstatvfs", fstatvfs)
    c = _Client(r, limits=sftp.Limits())
    await c.start()
    h = await c.open("/etc/log", sftp.F_WRITE | sftp.F_APPEND)
    codes = [await c.status(sftp.WRITE, _s(h) + struct.pack(">Q", 0) + _s(b"y" * 100)) for _ in range(20)]
    assert codes[:10] == [sftp.OK] * 10 and set(codes[10:]) == {sftp.FAILURE}
    assert target.stat().st_size == 1500
    await c.close()


async def test_sftp_mutations_ask_whether_the_instance_is_idle(tree: Any) -> None:
    r, root = tree
    busy = [False]

    def check() -> None:
        if busy[0]:
            raise Conflict("Instance 'c1' is busy: operation x is running")

    c = _Client(r, limits=sftp.Limits(), check=check)
    await c.start()
    h = await c.open("/etc/hosts", sftp.F_WRITE)
    busy[0] = True
    assert await c.status(sftp.MKDIR, _s("/made") + struct.pack(">I", 0)) == sftp.FAILURE
    assert await c.status(sftp.WRITE, _s(h) + struct.pack(">Q", 0) + _s(b"changed")) == sftp.FAILURE
    assert await c.status(sftp.OPEN, _s("/new") + struct.pack(">II", sftp.F_WRITE | sftp.F_CREAT, 0)) == sftp.FAILURE
    assert await c.status(sftp.REMOVE, _s("/etc/hosts")) == sftp.FAILURE
    await c.open("/etc/hosts")  # reading goes on
    assert not (root / "made").exists() and not (root / "new").exists()
    assert (root / "etc/hosts").read_text() == "inside"
    await c.close()


def test_publish_packs_templates_and_counts_sparse_files_by_blocks(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    (volume / "rootfs").mkdir(parents=True)
    with open(volume / "rootfs/sparse", "wb") as f:
        f.truncate(8 << 30)  # 8 GiB apparent, nothing allocated
    assert publish_module._tree_size(volume / "rootfs") < 1 << 20
    argv = publish_module.pack_argv(tmp_path / "up.tar", tmp_path / "meta", volume,
                                    publish_module.has_templates(volume))
    assert argv[-1] == "rootfs" and "--sparse" in argv
    (volume / "templates").symlink_to("/etc")  # never packed through a symlink
    assert not publish_module.has_templates(volume)
    (volume / "templates").unlink()
    (volume / "templates").mkdir()
    argv = publish_module.pack_argv(tmp_path / "up.tar", tmp_path / "meta", volume,
                                    publish_module.has_templates(volume))
    assert argv[-2:] == ["rootfs", "templates"]
