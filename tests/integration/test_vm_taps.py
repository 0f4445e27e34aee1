"""A VM's taps on the host (real netlink, no QEMU): nobody but the descriptor the server hands QEMU ever holds
one. The review's attack: any local user who can open /dev/net/tun (0666 on a Debian host with udev) attached
to a persistent tap without an owner, before QEMU opened it, after QEMU ended, or while the server was down."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from stapes.api.errors import InternalError
from stapes.server.networks import bridge

SYSTEM_PYTHON = "/usr/bin/python3"  # nobody can run it (not a python under /root)
ATTACH = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH22x", sys.argv[2].encode(), 0x0002 | 0x1000))  # TUNSETIFF
except OSError as err:
    print("refused", err.errno)
else:
    print("attached")
"""


@pytest.fixture
def tun_node() -> Iterator[Path]:
    """/dev/net/tun as a Debian host with udev has it: anyone may open it."""
    directory = Path(tempfile.mkdtemp(prefix="stapes-tun-"))
    directory.chmod(0o755)
    node = directory / "tun"
    os.mknod(node, 0o20666, os.makedev(10, 200))
    node.chmod(0o666)
    try:
        yield node
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def test_bridge() -> Iterator[str]:
    name = f"stbtap{os.getpid() % 10000}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="bridge")
    try:
        yield name
    finally:
        with IPRoute() as ipr, contextlib.suppress(Exception):
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])


def _as_nobody(node: Path, tap: str) -> str:
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c",
                             ATTACH, str(node), tap], capture_output=True, text=True, timeout=30,
                            cwd="/")
    return result.stdout.strip() or result.stderr.strip()


def _exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


ALIAS = f"stapes:/tmp/stapes-tap-test-{os.getpid()}:/tap/v1/eth0"


def test_a_tap_lives_as_long_as_its_descriptor_and_nobody_else_attaches(tun_node: Path, test_bridge: str) -> None:
    name = f"stvtest{os.getpid() % 10000}"
    fd = bridge.open_tap(name, test_bridge, ALIAS)
    try:
        assert bridge.tap_owner(name) == (0, 0), "root's, not anyone's (-1)"
        with IPRoute() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=name)[0])[0]
            assert link.get("IFLA_IFALIAS") == ALIAS
            assert link.get("IFLA_MASTER") == ipr.link_lookup(ifname=test_bridge)[0]
        assert _as_nobody(tun_node, name).startswith("refused"), "a local user cannot take the VM's tap"
    finally:
        os.close(fd)
    assert not _exists(name), "the tap goes with the last descriptor (QEMU's): nothing left to attach to"
    assert _as_nobody(tun_node, name).startswith("refused"), "and a user cannot make it again"


def test_a_tap_found_from_before_is_made_anew_never_taken(tun_node: Path, test_bridge: str) -> None:
    """A persistent tap an earlier version left (no owner: anyone could hold it) is deleted, not reused."""
    name = f"stvold{os.getpid() % 10000}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        old = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=old, ifalias=ALIAS)
    try:
        assert bridge.tap_owner(name) == (-1, -1)
        assert _as_nobody(tun_node, name) == "attached", "the review's attack on the old persistent tap"
        fd = bridge.open_tap(name, test_bridge, ALIAS)
        try:
            with IPRoute() as ipr:
                assert ipr.link_lookup(ifname=name)[0] != old, "a new interface"
            assert bridge.tap_owner(name) == (0, 0)
        finally:
            os.close(fd)
        assert not _exists(name)
    finally:
        with IPRoute() as ipr, contextlib.suppress(Exception):
            ipr.link("del", ifname=name)


def test_an_interface_of_someone_elses_is_refused(test_bridge: str) -> None:
    name = f"stvelse{os.getpid() % 10000}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="bridge")
    try:
        with pytest.raises(InternalError, match="not this server's tap"):
            bridge.open_tap(name, test_bridge, ALIAS)
        assert _exists(name)
    finally:
        with IPRoute() as ipr:
            ipr.link("del", ifname=name)
