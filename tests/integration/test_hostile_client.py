"""A client that probes the REST API as an attacker would: each defect found that way stays fixed."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import subprocess
import tarfile
import time
from pathlib import Path

from stapes.api.tokens import decode_token
from tests.integration.harness import Cli, Server
from tests.integration.hostile import Raw


def _token(cli: Cli, name: str) -> str:
    local = Cli(cli.conf_dir.parent / "root-tokens", None)
    env_server = cli.default_server
    assert env_server is not None
    local.default_server = env_server
    return local.run("config", "trust", "add", name).stdout.strip().splitlines()[-1]


async def test_a_trust_token_is_spent_once_even_concurrently(s1: Server, cli: Cli) -> None:
    token = _token(cli, "granted-name")
    secret = decode_token(token)["secret"]
    clients = [Raw(s1, cert_dir=s1.state_dir.parent / f"attacker{i}", unix=False) for i in range(8)]
    try:
        body = {"trust_token": secret, "name": "chosen-by-me", "type": "client"}
        results = await asyncio.gather(*(c.call("POST", "/1.0/certificates", body) for c in clients))
    finally:
        for c in clients:
            await c.close()
    statuses = sorted(status for status, _ in results)
    assert statuses.count(200) == 1, results
    assert all(s == 403 for s in statuses if s != 200), results
    async with Raw(s1) as root:
        status, listing = await root.call("GET", "/1.0/certificates?recursion=1")
    names = [c["name"] for c in listing["metadata"]]
    assert "granted-name" in names and "chosen-by-me" not in names  # the token decides, not the spender
    assert all(c["type"] == "client" and not c["restricted"] for c in listing["metadata"])


async def test_spender_cannot_choose_restrictions(s1: Server, cli: Cli) -> None:
    secret = decode_token(_token(cli, "t2"))["secret"]
    async with Raw(s1, cert_dir=s1.state_dir.parent / "someone", unix=False) as c:
        status, body = await c.call("POST", "/1.0/certificates",
                                    {"trust_token": secret, "type": "metrics", "restricted": True,
                                     "projects": ["default"]})
    assert status == 400, body


async def test_request_bodies_are_bounded(s1: Server, cli: Cli) -> None:
    rss_before = s1.rss()

    async def big_body(raw: Raw, path: str, size: int) -> int:
        async def chunks():  # type: ignore[no-untyped-def]
            block = b"x" * (1 << 20)
            for _ in range(size >> 20):
                yield block

        try:
            async with raw.session.post(raw.base + path, data=chunks(),
                                        headers={"Content-Type": "application/json"}) as resp:
                return resp.status
        except (ConnectionError, OSError):
            return 0  # the server hung up on us: also a refusal
        except Exception as err:  # aiohttp raises its own errors when the server closes mid-upload
            return 0 if "closed" in str(err).lower() or "reset" in str(err).lower() else -1

    async with Raw(s1, cert_dir=s1.state_dir.parent / "stranger", unix=False) as stranger:
        assert await big_body(stranger, "/1.0/certificates", 100 << 20) in (0, 413)
    async with Raw(s1) as root:
        assert await big_body(root, "/1.0/profiles", 64 << 20) in (0, 413)
        status, _ = await root.call("POST", "/1.0/profiles", raw=b"{" + b" " * (5 << 20) + b"}")
        assert status == 413
    growth = s1.rss() - rss_before
    assert growth < 40 << 20, f"the daemon grew by {growth >> 20} MiB reading refused bodies"


async def test_wrongly_typed_fields_are_400_with_the_field_named(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-q")
    cases = [
        ("POST", "/1.0/instances", {"name": "x", "source": "x"}, "source"),
        ("POST", "/1.0/instances", {"name": "x", "profiles": 5}, "profiles"),
        ("POST", "/1.0/instances", {"name": "x", "config": {"limits.cpu": 2}}, "config"),
        ("POST", "/1.0/instances", {"name": ["x"]}, "name"),
        ("POST", "/1.0/instances", {"name": "x", "devices": {"d": "disk"}}, "devices"),
        ("PUT", "/1.0/instances/c1", {"config": []}, "config"),
        ("PATCH", "/1.0/instances/c1", {"profiles": "default"}, "profiles"),
        ("POST", "/1.0/instances/c1", {"migration": "yes"}, "migration"),
        ("POST", "/1.0/instances/c1", {"migration": True, "target": "s2"}, "target"),
        ("PUT", "/1.0/instances/c1/state", {"action": "start", "timeout": "soon"}, "timeout"),
        ("POST", "/1.0/instances/c1/exec", {"command": "ls", "wait-for-websocket": True}, "command"),
        ("POST", "/1.0/instances/c1/exec", {"command": ["ls"], "user": "root"}, "user"),
        ("POST", "/1.0/instances/c1/snapshots", {"name": 3}, "name"),
        ("POST", "/1.0/profiles", {"name": "p", "config": "x"}, "config"),
        ("PUT", "/1.0", {"config": {"core.https_address": 1}}, "config"),
        ("POST", "/1.0/storage-pools", {"name": "p", "driver": "dir", "config": {"source": None}}, "config"),
        ("POST", "/1.0/certificates", {"token": "yes"}, "token"),
        ("POST", "/1.0/images/aliases", {"name": {}, "target": "x"}, "name"),
        ("POST", "/1.0/instances", [1, 2], "object"),
    ]
    async with Raw(s1) as raw:
        for method, path, body, field in cases:
            status, answer = await raw.call(method, path, body)
            assert status == 400, (method, path, body, answer)
            assert field in answer["error"], (method, path, answer["error"])
        status, answer = await raw.call("POST", "/1.0/instances", raw=b"{not json")
        assert status == 400 and "not valid JSON" in answer["error"]
    assert [i["name"] for i in cli.json("list")] == ["c1"]


def _edit_db(server: Server, sql: str, args: tuple[object, ...]) -> None:
    server.stop()
    with sqlite3.connect(server.state_dir / "database" / "stapes.db") as db:
        db.execute(sql, args)
    server.start()


def test_broken_rows_show_as_errors_and_can_be_repaired(s1: Server, cli: Cli) -> None:
    for name in ("good", "broken"):
        cli.run("init", "busybox", name, "-q")
    # An instance whose profile vanished (as an older server could leave it): the rest of the server works.
    _edit_db(s1, "UPDATE instances SET profiles=? WHERE name=?", (json.dumps(["gone"]), "broken"))
    listing = {i["name"]: i for i in cli.json("list")}
    assert listing["good"]["status"] == "Stopped"
    assert listing["broken"]["status"] == "Error" and "gone" in listing["broken"]["status_error"]
    cli.run("start", "good")
    cli.run("stop", "good", "--force")
    # It can be repaired in place (profiles set back), or deleted.
    async def repair() -> tuple[int, dict[str, object]]:
        async with Raw(s1) as raw:
            return await raw.call("PATCH", "/1.0/instances/broken", {"profiles": ["default"]})

    status, body = asyncio.run(repair())
    assert status == 200, body
    assert {i["name"]: i["status"] for i in cli.json("list")}["broken"] == "Stopped"
    _edit_db(s1, "UPDATE instances SET profiles=? WHERE name=?", (json.dumps(["gone"]), "broken"))
    cli.run("delete", "broken")
    assert [i["name"] for i in cli.json("list")] == ["good"]
    assert not (s1.state_dir / "storage-pools/default/containers/broken").exists()


def test_a_snapshot_restore_is_checked_before_anything_changes(s1: Server, cli: Cli) -> None:
    cli.run("profile", "create", "small")
    cli.run("init", "busybox", "c1", "-p", "default", "-p", "small", "-q")
    cli.run("snapshot", "create", "c1", "s0")
    # A profile a snapshot uses cannot go away (its restore would bring the name back).
    err = cli.fails("profile", "delete", "small")
    assert "in use" in err and "snapshots/s0" in err
    # A snapshot row that no longer makes a valid instance (an older server's) is refused before the files
    # or the configuration change, and `list` keeps working.
    _edit_db(s1, "UPDATE snapshots SET config=? WHERE name=?", (json.dumps({"limits.bogus": "1"}), "s0"))
    marker = s1.state_dir / "storage-pools/default/containers/c1/rootfs/after-snapshot"
    marker.write_text("kept")
    err = cli.fails("snapshot", "restore", "c1", "s0")
    assert "cannot be restored" in err and "limits.bogus" in err
    assert marker.read_text() == "kept"
    instance = cli.json("list")[0]
    assert instance["profiles"] == ["default", "small"] and instance["status"] == "Stopped"
    cli.run("start", "c1")
    cli.run("stop", "c1", "--force")


def test_a_profile_change_that_would_break_instances_is_refused(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-q")
    err = cli.fails("profile", "device", "remove", "default", "root")
    assert "cannot change so" in err and "c1" in err
    assert cli.json("list")[0]["status"] == "Stopped"


def test_the_incomplete_marker_is_neither_settable_nor_shown(s1: Server, cli: Cli) -> None:
    """A client that could set it would have the instance deleted at the next restart; an Incus server refuses
    it, so it must never travel with a moved instance."""
    cli.run("init", "busybox", "c1", "-q")
    err = cli.fails("config", "set", "c1", "volatile.incomplete=true")
    assert "cannot be set" in err
    s1.stop()
    s1.start()
    assert [i["name"] for i in cli.json("list")] == ["c1"]
    cli.run("start", "c1")
    cli.run("stop", "c1", "--force")


async def test_failed_image_builds_and_uploads_leave_no_temporary_file(s1: Server, cli: Cli) -> None:
    images = s1.state_dir / "images"
    before = set(images.iterdir())
    async with Raw(s1) as raw:
        status, _ = await raw.call("POST", "/1.0/images", {"source": {"type": "builtin", "name": "nosuch"}})
        assert status == 400
        status, body = await raw.call("POST", "/1.0/images", raw=b"not a tarball",
                                      headers={"Content-Type": "application/octet-stream"})
        assert status == 202, body  # the upload is accepted; its import fails in the operation
        result = await raw.wait(body["metadata"])
        assert result["status"] == "Failure" and "tarball" in result["err"], result
    assert set(images.iterdir()) == before


def test_no_socket_any_local_user_could_race_during_rsync(s1: Server, s2: Server, two: Cli, tmp_path: Path) -> None:
    two.run("init", "s1:busybox", "c1", "-q")
    root = s1.state_dir / "storage-pools/default/containers/c1/rootfs"
    subprocess.run(["dd", "if=/dev/urandom", f"of={root / 'blob'}", "bs=1M", "count=64", "status=none"], check=True)
    two.run("storage", "set", "s1:default", "rsync.bwlimit=32MiB")
    copy = subprocess.Popen(["stapes", "copy", "s1:c1", "s2:", "--transport", "rsync"], env=two.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            executable=str(Path(__import__("sys").executable).parent / "stapes"))
    seen: set[str] = set()
    while copy.poll() is None:
        seen |= {line.split()[-1] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
                 if "stapes" in line}
    assert copy.returncode == 0, copy.stderr.read() if copy.stderr else ""
    assert not {s for s in seen if s.startswith("@stapes")}, seen


def test_renaming_never_writes_through_a_symlinked_etc(s1: Server, cli: Cli, tmp_path: Path) -> None:
    """A privileged container can make its own /etc a symlink to any host path; renaming it then wrote the
    hostname there. Now the hostname goes inside the rootfs or nowhere."""
    host_dir = tmp_path / "host-etc"
    host_dir.mkdir()
    cli.run("init", "busybox", "c1", "-q")
    rootfs = s1.state_dir / "storage-pools/default/containers/c1/rootfs"
    subprocess.run(["rm", "-rf", str(rootfs / "etc")], check=True)
    (rootfs / "etc").symlink_to(host_dir)
    cli.run("rename", "c1", "c2")
    assert list(host_dir.iterdir()) == []
    assert [i["name"] for i in cli.json("list")] == ["c2"]


async def test_a_rename_that_asks_for_another_pool_is_refused_not_ignored(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-q")
    async with Raw(s1) as raw:
        status, body = await raw.call("POST", "/1.0/instances/c1", {"name": "c2", "pool": "elsewhere"})
    assert status == 400 and "stapes move" in body["error"], body
    assert [i["name"] for i in cli.json("list")] == ["c1"]


def _image_with_metadata(metadata: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo("metadata.yaml")
        info.size = len(metadata)
        tar.addfile(info, io.BytesIO(metadata))
        root = tarfile.TarInfo("rootfs")
        root.type, root.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(root)
    return out.getvalue()


def _rss_kib(server: Server) -> int:
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


ALIAS_BOMB = b"""architecture: x86_64
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
properties: {description: *f}
"""


async def test_an_image_metadata_alias_bomb_is_refused_without_growing_the_daemon(s1: Server) -> None:
    before = _rss_kib(s1)
    async with Raw(s1) as raw:
        images_before = (await raw.call("GET", "/1.0/images"))[1]["metadata"]
        for metadata, expected in ((ALIAS_BOMB, "aliases"), (b"properties: " + b"[" * 5000 + b"]" * 5000, "nested"),
                                   (b"properties: {" + b"k" * 300 + b": v}", "names of 1 to 255"),
                                   (b"creation_date: [1, 2]", "creation_date"),
                                   (b"# " + b"x" * (300 << 10), "larger than")):
            status, body = await raw.call("POST", "/1.0/images", raw=_image_with_metadata(metadata),
                                          headers={"Content-Type": "application/octet-stream"})
            assert status == 202, body
            started = time.monotonic()
            result = await raw.wait(body["metadata"])
            assert time.monotonic() - started < 5
            assert result["status"] == "Failure" and expected in result["err"], result
            assert "Internal error" not in result["err"], result
        assert (await raw.call("GET", "/1.0/images"))[1]["metadata"] == images_before
    assert _rss_kib(s1) - before < 40 << 10  # the reviewer saw 67 -> 371 MiB


def test_exec_ids_outside_the_container_map_are_refused(s1: Server, cli: Cli) -> None:
    """(uid_t)-1 means "unchanged" to setuid(): as a user it ran the command as root."""
    cli.run("launch", "busybox", "c1")
    assert cli.run("exec", "c1", "--user", "1000", "--group", "1000", "--", "id", "-u").stdout.strip() == "1000"
    for option, value in (("--user", "4294967295"), ("--group", "4294967295"), ("--user", "1000000000"),
                          ("--group", "1000000000")):
        err = cli.fails("exec", "c1", option, value, "--", "id", "-u")
        assert f"{value} is not an id of this container: use 0 to 999999999" in err, err
    cli.run("config", "set", "c1", "security.privileged=true")
    cli.run("restart", "c1", "--force")
    assert cli.run("exec", "c1", "--user", "1000000000", "--", "id", "-u").stdout.strip() == "1000000000"
    err = cli.fails("exec", "c1", "--user", "4294967295", "--", "id", "-u")
    assert "use 0 to 4294967294" in err, err
