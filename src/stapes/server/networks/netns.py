"""What a running instance's network looks like from inside its network namespace, read through netlink.

The netlink socket is opened by a short-lived thread that joined the instance's network namespace (setns
changes only the calling thread's). pyroute2's NetNS is not used: it forks the daemon, and the forked child
shares asyncio's signal wake-up socket, so its SIGTERM at the end reached the daemon as a request to stop.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import threading
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

_SCOPES = {0: "global", 200: "site", 253: "link", 254: "local"}
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def interfaces_in(pid: int) -> dict[str, Any] | None:
    """Incus's `state.network` of the process's namespace: per interface, its addresses, MAC, MTU, counters.
    None if the process is gone. Blocking: call it in a thread."""
    result: list[dict[str, Any] | None] = [None]

    def inside() -> None:  # this thread alone enters the namespace, and ends there
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                return
        finally:
            os.close(fd)
        try:
            with IPRoute() as ipr:
                result[0] = _read(ipr)
        except (OSError, NetlinkError):
            return

    thread = threading.Thread(target=inside, name=f"netns {pid}", daemon=True)
    thread.start()
    thread.join()
    return result[0]


def _read(ns: IPRoute) -> dict[str, Any]:
    links = {link["index"]: link for link in ns.get_links()}
    found: dict[str, Any] = {}
    for index, link in links.items():
        stats = link.get("IFLA_STATS64") or {}
        found[link.get("IFLA_IFNAME")] = {
            "addresses": [], "hwaddr": link.get("IFLA_ADDRESS", ""), "mtu": link.get("IFLA_MTU", 0),
            "state": "up" if link["flags"] & 1 else "down",
            "type": "loopback" if index == 1 or link.get("IFLA_IFNAME") == "lo" else "broadcast",
            "host_name": "",
            "counters": {"bytes_received": stats.get("rx_bytes", 0), "bytes_sent": stats.get("tx_bytes", 0),
                         "packets_received": stats.get("rx_packets", 0),
                         "packets_sent": stats.get("tx_packets", 0)},
        }
    for addr in ns.get_addr():
        link = links.get(addr["index"])
        if link is None:
            continue
        found[link.get("IFLA_IFNAME")]["addresses"].append({
            "family": "inet" if addr["family"] == 2 else "inet6", "address": addr.get("IFA_ADDRESS"),
            "netmask": str(addr["prefixlen"]), "scope": _SCOPES.get(addr["scope"], "global"),
        })
    return found


def bridge_ipv4_networks(bridge: str) -> list[ipaddress.IPv4Network]:
    """The IPv4 subnets of a host bridge (its own addresses): where a container on it should have its address.
    Empty if it has none, or no such bridge. Blocking: call it in a thread."""
    try:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=bridge)
            if not index:
                return []
            found = ipr.get_addr(index=index[0], family=socket.AF_INET)
    except (OSError, NetlinkError):
        return []
    return [ipaddress.IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}").network for a in found]
