"""Managed networks against races between servers on one host, hostile names, leftovers and local users
(issue 16)."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.integration.harness import Server
from tests.integration.hostile import Raw

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def _ip(*args: str) -> list[dict[str, Any]]:
    return list(json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, check=True).stdout))


def _bridges(server: Server) -> dict[str, str]:
    """The host's links whose mark (ifalias) names this server's state directory: name -> mark."""
    prefix = f"stapes:{server.state_dir.resolve()}:"
    return {link["ifname"]: link["ifalias"] for link in _ip("link", "show")
            if str(link.get("ifalias") or "").startswith(prefix)}


def _addresses() -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for link in _ip("-4", "addr", "show") for a in link["addr_info"]]


async def _create(raw: Raw, name: str, address: str) -> tuple[int, dict[str, object]]:
    return await raw.call("POST", "/1.0/networks", {"name": name, "config": {"ipv4.address": address,
                                                                             "ipv6.address": "none"}})


async def test_two_servers_creating_networks_at_once_never_share_a_subnet(s1: Server, s2: Server) -> None:
    async with Raw(s1) as one, Raw(s2) as two:
        for attempt in range(5):
            # The same gateway, or another address of the same subnet: one server wins, the other is told.
            first, second = f"10.213.{200 + attempt}.1/24", f"10.213.{200 + attempt}.{1 + attempt % 2}/24"
            results = await asyncio.gather(_create(one, f"race{attempt}", first),
                                           _create(two, f"race{attempt}", second))
            statuses = sorted(status for status, _ in results)
            assert statuses == [201, 400], results
            loser = next(body for status, body in results if status == 400)
            assert "overlaps" in str(loser["error"]) and "already in use on this host" in str(loser["error"]), loser
            subnet = f"10.213.{200 + attempt}."
            assert len([a for a in _addresses() if a.startswith(subnet)]) == 1, _addresses()
            for raw in (one, two):
                await raw.call("DELETE", f"/1.0/networks/race{attempt}")


async def test_a_network_name_is_checked_before_anything_is_made(s1: Server) -> None:
    before = _bridges(s1)
    async with Raw(s1) as raw:
        for bad in ("bad\x00name", "trailing\n", "tab\tname", "bell\x07"):
            status, body = await _create(raw, bad, "10.213.199.1/24")
            assert status == 400 and "Invalid network name" in str(body["error"]), body
    assert _bridges(s1) == before
    assert not [a for a in _addresses() if a.startswith("10.213.199.")]
    assert sorted(p.name for p in (s1.state_dir / "networks").iterdir()) == ["stapesbr0"]


async def test_a_network_that_fails_to_start_leaves_nothing(s1: Server) -> None:
    """dnsmasq cannot listen (the address's DNS port is taken): the bridge just made goes, and its files."""
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: bind to the gateway before the bridge has it
    blocker.bind(("10.213.198.1", 53))
    before = _bridges(s1)
    try:
        async with Raw(s1) as raw:
            status, body = await _create(raw, "doomed", "10.213.198.1/24")
            assert status == 500 and "dnsmasq" in str(body["error"]), body
            status, _ = await raw.call("GET", "/1.0/networks/doomed")
            assert status == 404
    finally:
        blocker.close()
    assert _bridges(s1) == before
    assert not [a for a in _addresses() if a.startswith("10.213.198.")]
    assert not (s1.state_dir / "networks/doomed").exists()


async def test_a_deleted_network_leaves_no_directory(s1: Server) -> None:
    async with Raw(s1) as raw:
        status, body = await _create(raw, "brief", "10.213.197.1/24")
        assert status == 201, body
        assert (s1.state_dir / "networks/brief/dnsmasq.leases").exists()
        status, body = await raw.call("DELETE", "/1.0/networks/brief")
        assert status == 200, body
    assert not (s1.state_dir / "networks/brief").exists()


def test_a_local_user_cannot_stop_or_redirect_dnsmasq(s1: Server) -> None:
    """dnsmasq ran as `nobody` and owned its pid file: any process running as nobody could kill it, or point
    the server at another process."""
    directory = s1.state_dir / "networks/stapesbr0"
    pid_file = directory / "dnsmasq.pid"
    pid = int(pid_file.read_text())
    uids = next(line.split()[1:] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("Uid:"))
    dedicated = pwd.getpwnam("stapes-dnsmasq").pw_uid
    assert set(uids) == {str(dedicated)}, uids  # not nobody's 65534
    info = os.stat(pid_file)
    assert info.st_uid == 0 and stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    killed = subprocess.run([*AS_NOBODY, "kill", "-TERM", str(pid)], capture_output=True, text=True, check=False)
    assert killed.returncode != 0 and "not permitted" in killed.stderr, killed
    edited = subprocess.run([*AS_NOBODY, "sh", "-c", f"echo 1 > {pid_file}"], capture_output=True, check=False)
    assert edited.returncode != 0
    time.sleep(0.2)
    assert Path(f"/proc/{pid}").exists() and pid_file.read_text().strip() == str(pid)


def test_a_killed_server_finds_its_dnsmasq_by_its_own_pid_file(s1: Server) -> None:
    """dnsmasq outlives a killed daemon (dropping root clears its parent-death signal): the next start ends
    it by the PID the daemon recorded, and starts its own."""
    pid_file = s1.state_dir / "networks/stapesbr0/dnsmasq.pid"
    old = int(pid_file.read_text())
    s1.kill()
    s1.start()
    new = int(pid_file.read_text())
    assert new != old and not _running(old) and _running(new)
    assert "dnsmasq" in Path(f"/proc/{new}/cmdline").read_text()


def _running(pid: int) -> bool:
    """The process exists and has not ended (an orphan that ended may wait a while for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
