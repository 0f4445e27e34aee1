"""A live move between servers whose bridges have different subnets: the container takes an address on the
target's network at once, instead of keeping the source's, unreachable, until its lease renews an hour later
(issue 16)."""

from __future__ import annotations

import ipaddress
import subprocess

from tests.integration.harness import Cli, Server, wait_for
from tests.integration.test_live_migration import _assert_counted_on, _start_counter


def _ipv4(server: Server, name: str) -> list[ipaddress.IPv4Address]:
    state = server.api("GET", f"/1.0/instances/{name}/state")
    addresses = ((state.get("network") or {}).get("eth0") or {}).get("addresses", [])
    return [ipaddress.IPv4Address(a["address"]) for a in addresses if a["family"] == "inet"]


def _subnet(server: Server) -> ipaddress.IPv4Network:
    config = server.api("GET", "/1.0/networks/stapesbr0")["config"]
    return ipaddress.IPv4Interface(config["ipv4.address"]).network


def test_a_live_move_to_another_subnet_takes_a_lease_there_at_once(s1: Server, s2: Server, two: Cli) -> None:
    here, there = _subnet(s1), _subnet(s2)
    assert not here.overlaps(there)  # two servers on one host: each bridge has its own subnet
    two.run("launch", "s1:busybox", "c1", "-q")
    wait_for(lambda: any(a in here for a in _ipv4(s1, "c1")), 30, "a lease on the source's network")
    seen, pid = _start_counter(two, "s1:c1")
    two.run("move", "s1:c1", "s2:")
    wait_for(lambda: _ipv4(s2, "c1") and all(a in there for a in _ipv4(s2, "c1")), 20,
             f"an address in {there} (the target's network)")
    _assert_counted_on(two, "s2:c1", seen, pid)  # the same processes: moved, not restarted
    address = str(_ipv4(s2, "c1")[0])
    assert subprocess.run(["ping", "-c", "1", "-W", "5", address], capture_output=True).returncode == 0, address
