"""Bounds on what a client or a peer may make the server do (issue 16): bytes written into a pool, documents
parsed, names, exec ids, the host-wide network lock, dnsmasq's user and files."""

from __future__ import annotations

import ast
import asyncio
import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from stapes.api.documents import load_yaml
from stapes.api.errors import BadRequest, InternalError
from stapes.api.names import validate_entity_name, validate_instance_name
from stapes.api.requests import NO_ID, check_exec_ids
from stapes.api.tokens import decode_token
from stapes.server.idmap import IdRange, ids_from_zero
from stapes.server.images.store import ARCHITECTURE, image_fields
from stapes.server.networks.bridge import BridgeSpec, dnsmasq_argv, is_our_dnsmasq
from stapes.server.networks.hostlock import host_lock
from stapes.server.storage import bound
from stapes.server.storage.bound import DeclaredSizeExceeded, PoolFull, ReceiveBound

MIB = 1 << 20


class _Stat:
    def __init__(self, free: int, total: int) -> None:
        self.f_bavail, self.f_blocks, self.f_frsize = free // 4096, total // 4096, 4096


def test_the_stream_margin_and_the_reserve_are_as_stated() -> None:
    assert bound.stream_allowance(0) == 16 * MIB
    assert bound.stream_allowance(800 * MIB) == 900 * MIB + 16 * MIB
    assert bound.reserve_for(100 << 30) == 256 * MIB  # as image uploads keep
    assert bound.reserve_for(48 * MIB) == 6 * MIB  # an eighth of a small pool


async def test_a_stream_stops_past_its_declared_size(tmp_path: Path) -> None:
    limit = ReceiveBound("default", tmp_path, declared=MIB)
    for _ in range(17):
        await limit.stream(MIB)  # 1 MiB declared, 17.1 MiB allowed with the margin
    with pytest.raises(DeclaredSizeExceeded) as caught:
        await limit.stream(MIB)
    assert "18.0 MiB arrived, 1.0 MiB declared" in caught.value.message
    assert caught.value.status == 400


async def test_nothing_declared_means_free_space_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free = [10 << 30]
    monkeypatch.setattr(os, "statvfs", lambda path: _Stat(free[0], 20 << 30))
    limit = ReceiveBound("small", tmp_path, declared=None)
    for _ in range(100):
        await limit.delta(16 * MIB)  # rsync's deltas, as much as the pool holds
    free[0] = 260 * MIB  # the reserve (256 MiB) and what is still in flight do not fit any more
    with pytest.raises(PoolFull) as caught:
        for _ in range(4):  # noticed within CHECK_EVERY (4 MiB)
            await limit.delta(MIB)
    message = caught.value.message
    assert "Storage pool 'small' is full" in message and "no size declared" in message, message
    assert "256.0 MiB stay free" in message and "choose another pool with -s" in message, message


async def test_the_free_space_is_looked_at_every_few_mib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def statvfs(path: Any) -> _Stat:
        calls.append(path)
        return _Stat(10 << 30, 20 << 30)

    monkeypatch.setattr(os, "statvfs", statvfs)
    limit = ReceiveBound("default", tmp_path, declared=1 << 30)
    for _ in range(64):
        await limit.stream(1 << 16)  # 4 MiB in 64 KiB messages
    assert len(calls) == 1  # the first message, then not before 4 MiB more
    await limit.stream(1 << 16)
    assert len(calls) == 2 and calls == [tmp_path, tmp_path]


BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
properties: {description: *g}
"""


def test_yaml_from_outside_has_no_aliases_and_bounded_size_depth_and_nodes() -> None:
    assert load_yaml("architecture: x86_64\nproperties: {os: busybox}\n", "m") == {
        "architecture": "x86_64", "properties": {"os": "busybox"}}
    for text, expected in ((BOMB, "aliases"), ("[" * 1000 + "]" * 1000, "nested more than 64"),
                           ("x: [" + "1," * 200_000 + "1]", "more than 100000 nodes"),
                           ("a: " + "x" * (2 << 20), "more than the"), ("a: [", "not valid YAML")):
        with pytest.raises(BadRequest) as caught:
            load_yaml(text, "The image's metadata.yaml")
        assert expected in caught.value.message and "metadata.yaml" in caught.value.message


def test_an_image_record_is_bounded_and_typed() -> None:
    props, arch, created = image_fields({"properties": {"os": "busybox", "release": 1.36}, "creation_date": 1700000000})
    assert props == {"os": "busybox", "release": "1.36"} and arch == ARCHITECTURE and created == 1700000000.0
    for metadata, expected in (({"properties": {"k": ["a"]}}, "plain value"),
                               ({"properties": {"k": "v" * 5000}}, "at most 4096"),
                               ({"properties": {f"k{n}": "v" for n in range(300)}}, "at most 256 entries"),
                               ({"properties": "text"}, "must be a mapping"),
                               ({"architecture": ["x"]}, "architecture"),
                               ({"creation_date": {"a": 1}}, "creation_date"), ({"creation_date": True}, "Unix time")):
        with pytest.raises(BadRequest) as caught:
            image_fields(metadata)
        assert expected in caught.value.message, caught.value.message
    with pytest.raises(BadRequest, match="as a record"):
        image_fields({"properties": {f"k{n}": "v" * 4000 for n in range(200)}})


def test_exec_ids_stay_inside_the_container_map() -> None:
    check_exec_ids(0, 0, 1_000_000_000, 1_000_000_000)
    check_exec_ids(999_999_999, 65534, 1_000_000_000, 1_000_000_000)
    for user, group, uids, message in ((1_000_000_000, 0, 1_000_000_000, "'user' 1000000000"),
                                       (0, 2**32 - 1, 1_000_000_000, "'group' 4294967295"),
                                       (2**32 - 1, 0, NO_ID, "use 0 to 4294967294"), (-1, 0, NO_ID, "'user' -1")):
        with pytest.raises(BadRequest) as caught:
            check_exec_ids(user, group, uids, uids)
        assert message in caught.value.message, caught.value.message
    unprivileged = (IdRange(uid=True, gid=False, host=1_000_000, inside=0, size=65536),
                    IdRange(uid=False, gid=True, host=1_000_000, inside=0, size=1000))
    assert ids_from_zero(unprivileged, "uid") == 65536 and ids_from_zero(unprivileged, "gid") == 1000
    assert ids_from_zero((), "uid") == NO_ID  # privileged: every id but (uid_t)-1
    gap = (IdRange(uid=True, gid=False, host=1_000_000, inside=10, size=5),)
    assert ids_from_zero(gap, "uid") == 0


def test_names_refuse_control_characters_and_a_trailing_newline() -> None:
    for bad in ("bad\x00name", "trailing\n", "tab\t", "del\x7f", "esc\x1b[0m"):
        with pytest.raises(BadRequest, match="control characters"):
            validate_entity_name("network", bad)
    with pytest.raises(BadRequest):
        validate_instance_name("c1\n")
    validate_entity_name("network", "stapes-br.0_x")


def test_dnsmasq_runs_as_its_own_user_and_writes_no_pid_file() -> None:
    spec = BridgeSpec("stapesbr0", "stpabc", "stapes:/s:stapesbr0", {"ipv4.address": "10.9.8.1/24"},
                      Path("/s/networks/stapesbr0"))
    argv = dnsmasq_argv(spec, ("stapes-dnsmasq", "stapes-dnsmasq"))
    assert "--user=stapes-dnsmasq" in argv and "--group=stapes-dnsmasq" in argv
    assert "--pid-file" in argv and not any(a.startswith("--pid-file=") for a in argv)
    assert not any("nobody" in a or "nogroup" in a for a in argv)
    ours = "\0".join(argv).encode()
    assert is_our_dnsmasq(ours, spec.directory)
    assert not is_our_dnsmasq(ours, Path("/other/networks/stapesbr0"))
    assert not is_our_dnsmasq(b"sleep\0--dhcp-leasefile=/s/networks/stapesbr0/dnsmasq.leases", spec.directory)
    older = b"dnsmasq\0--pid-file=/s/networks/stapesbr0/dnsmasq.pid"  # what an older server started
    assert is_our_dnsmasq(older, spec.directory)


async def test_the_host_network_lock_is_exclusive_private_and_cancellable(tmp_path: Path) -> None:
    path = tmp_path / "run" / "networks.lock"
    order: list[str] = []
    async with host_lock(path):
        waiting = asyncio.create_task(_take(path, order))
        await asyncio.sleep(0.1)
        assert order == []  # a second holder (another server) waits
        cancelled = asyncio.create_task(_take(path, order))
        await asyncio.sleep(0.05)
        cancelled.cancel()
    await waiting
    assert order == ["taken"]
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with host_lock(path):  # the cancelled waiter took nothing
        pass
    with pytest.raises(InternalError, match="for more than 0s"):
        async with host_lock(path), host_lock(path, wait=0.05):
            pass


async def _take(path: Path, order: list[str]) -> None:
    async with host_lock(path):
        order.append("taken")


def test_no_temporary_file_has_a_predictable_name() -> None:
    """The server writes below its state directory only (root's); every temporary file it makes there has a
    random name (tempfile with dir=). The one '/tmp' it names is rsync's remote path, which Incus passes too
    and which our remote shell (storage/netcat.py) never opens. Scripts make theirs with mktemp."""
    source = Path(__file__).parents[2] / "src" / "stapes"
    literals, undirected = set(), []
    for path in source.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    any(d in node.value for d in ("/tmp", "/var/tmp", "/dev/shm")):
                literals.add(node.value)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "tempfile" and \
                    "server" in path.parts and not any(k.arg == "dir" for k in node.keywords):
                undirected.append(f"{path.name}:{node.lineno}")
    # A help text's example (`--cwd /tmp` inside a container) is not a path the server uses.
    assert {text for text in literals if "--cwd /tmp" not in text} <= {"localhost:/tmp/foo"}, literals
    assert not undirected
    for script in (source.parents[1] / "scripts").glob("*.sh"):
        for line in script.read_text().splitlines():
            if "/tmp" in line and not line.lstrip().startswith("#"):
                assert "mktemp" in line, f"{script.name}: {line}"


def test_a_deeply_nested_token_is_not_a_token() -> None:
    """An untrusted caller's `trust_token` was a 500 (RecursionError) when it nested deep enough."""
    with pytest.raises(ValueError, match="not a trust token"):
        decode_token(base64.b64encode(b"[" * 100_000).decode())
