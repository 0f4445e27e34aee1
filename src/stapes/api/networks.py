"""Names and numbers of managed networks, as pure functions: the host interface a network gets, the subnets
chosen for it, the MAC addresses of nics, and the checks on what a client or peer sends for them."""

from __future__ import annotations

import hashlib
import ipaddress
import random
import re
from collections.abc import Iterable

IPv4Net = ipaddress.IPv4Network
IPv6Net = ipaddress.IPv6Network
# Incus's own MAC prefix is 10:66:6a; Stapes uses the same locally administered range so tools that know it
# recognise an instance's nic.
MAC_PREFIX = "10:66:6a"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def interface_name(server_id: str, network: str) -> str:
    """The bridge's name on the host: unique per server and network (two servers on one host may each have a
    network called stapesbr0) and within the kernel's 15 characters."""
    return "stp" + hashlib.sha256(f"{server_id}/{network}".encode()).hexdigest()[:10]


def interface_alias(state_root: str, network: str) -> str:
    """Written to the bridge's ifalias, so this server (and a test harness) can tell its own bridges apart."""
    return f"stapes:{state_root}:{network}"


def check_interface_name(name: str) -> None:
    if not _IFNAME.match(name) or name in (".", ".."):
        raise ValueError(f"{name!r} is not an interface name: 1 to 15 letters, digits, '_', '-' or '.'")


def random_mac(rng: random.Random | None = None) -> str:
    rng = rng or random.SystemRandom()
    return MAC_PREFIX + "".join(f":{rng.randrange(256):02x}" for _ in range(3))


def check_mac(value: str) -> None:
    """A unicast MAC address (a multicast or all-zero one would make the nic unusable)."""
    if not _MAC.match(value):
        raise ValueError(f"{value!r} is not a MAC address: use six hex pairs such as 10:66:6a:01:02:03")
    first = int(value[:2], 16)
    if first & 1 or value == "00:00:00:00:00:00":
        raise ValueError(f"{value!r} is a multicast or null MAC address: a nic needs a unicast one")


def _check_usable(value: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface, example: str) -> None:
    if iface.ip.is_loopback or iface.ip.is_link_local or iface.ip.is_multicast or iface.ip.is_unspecified:
        raise ValueError(f"{value!r} is a loopback, link-local, multicast or unspecified address: use {example}")


def parse_ipv4_cidr(value: str) -> ipaddress.IPv4Interface:
    """A gateway address with its prefix, such as 10.12.13.1/24."""
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address with a prefix: use such as 10.0.3.1/24, auto or "
                         "none") from None
    _check_usable(value, iface, "a private subnet such as 10.0.3.1/24")
    if not 8 <= iface.network.prefixlen <= 30:
        raise ValueError(f"{value!r}: the prefix must be between /8 and /30 (room for a gateway and instances)")
    if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise ValueError(f"{value!r} is the network's own or broadcast address: give the gateway's, such as "
                         f"{next(iface.network.hosts())}/{iface.network.prefixlen}")
    return iface


def parse_ipv6_cidr(value: str) -> ipaddress.IPv6Interface:
    try:
        iface = ipaddress.IPv6Interface(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv6 address with a prefix: use such as fd42:1:2:3::1/64, auto or "
                         "none") from None
    _check_usable(value, iface, "a unique local one such as fd42:1:2:3::1/64")
    if iface.network.prefixlen != 64:
        raise ValueError(f"{value!r}: use a /64 (stateless autoconfiguration needs one)")
    if iface.ip == iface.network.network_address:
        raise ValueError(f"{value!r} is the network's own address: give the gateway's, such as ...::1/64")
    return iface


def overlaps(candidate: ipaddress.IPv4Network | ipaddress.IPv6Network,
             used: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    return any(candidate.version == u.version and candidate.overlaps(u) for u in used)


def choose_ipv4(used: Iterable[IPv4Net], rng: random.Random | None = None, attempts: int = 1000) -> str:
    """A /24 in 10.0.0.0/8 that overlaps nothing in use on the host (its addresses and routes), as Incus picks
    one for a new bridge; its first address is the gateway."""
    rng = rng or random.SystemRandom()
    taken = [u for u in used if not u.is_loopback and u.prefixlen > 0]
    for _ in range(attempts):
        net = IPv4Net(f"10.{rng.randrange(1, 255)}.{rng.randrange(0, 255)}.0/24")
        if not overlaps(net, taken):
            return f"{next(net.hosts())}/24"
    raise ValueError("no free IPv4 /24 left in 10.0.0.0/8 on this host: give ipv4.address explicitly")


def choose_ipv6(used: Iterable[IPv6Net], rng: random.Random | None = None, attempts: int = 1000) -> str:
    """A /64 in a random ULA prefix (fd00::/8), so two hosts (or servers) practically never pick the same."""
    rng = rng or random.SystemRandom()
    taken = [u for u in used if u.prefixlen > 0 and not u.is_link_local and not u.is_loopback]
    for _ in range(attempts):
        groups = [rng.randrange(0x10000) for _ in range(3)]
        net = IPv6Net(f"fd42:{groups[0]:x}:{groups[1]:x}:{groups[2]:x}::/64")
        if not overlaps(net, taken):
            return f"{net.network_address + 1}/64"
    raise ValueError("no free IPv6 /64 found: give ipv6.address explicitly")


def dhcp_range(gateway: ipaddress.IPv4Interface) -> tuple[str, str]:
    """From the address after the gateway to the last before broadcast (dnsmasq's range)."""
    net = gateway.network
    first = gateway.ip + 1 if gateway.ip + 1 < net.broadcast_address else net.network_address + 1
    return str(first), str(net.broadcast_address - 1)
