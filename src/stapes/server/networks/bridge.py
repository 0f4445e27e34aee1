"""The bridge driver: a Linux bridge made through netlink (pyroute2), NAT and a small firewall for it in its
own nftables table, and dnsmasq for DHCP, router advertisements and DNS of the instances' names.

Everything here belongs to one network of one server: the bridge carries the server's mark in its ifalias,
the nftables table is named after the bridge, and dnsmasq is this daemon's child (killed with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import grp
import hashlib
import ipaddress
import logging
import os
import pwd
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from stapes.api.config_keys import is_true
from stapes.api.errors import InternalError
from stapes.api.networks import dhcp_range
from stapes.server import process

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class BridgeSpec:
    name: str  # the network's name in the API
    interface: str  # the bridge on the host
    alias: str  # the bridge's ifalias: which server and network it belongs to
    config: dict[str, str]
    directory: Path  # dnsmasq's lease and pid files (root's alone: dnsmasq opens its lease file before it drops root)

    @property
    def ipv4(self) -> ipaddress.IPv4Interface | None:
        value = self.config.get("ipv4.address", "none")
        return None if value == "none" else ipaddress.IPv4Interface(value)

    @property
    def ipv6(self) -> ipaddress.IPv6Interface | None:
        value = self.config.get("ipv6.address", "none")
        return None if value == "none" else ipaddress.IPv6Interface(value)

    @property
    def domain(self) -> str:
        return self.config.get("dns.domain") or "stapes"


def host_networks() -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]:
    """Every subnet in use on the host (its addresses and its routes) with the interface it is on, so a new
    network avoids them. Blocking: call it in a thread."""
    found: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
    with IPRoute() as ipr:
        names = {link["index"]: str(link.get("IFLA_IFNAME")) for link in ipr.get_links()}
        for addr in ipr.get_addr():
            with contextlib.suppress(ValueError, TypeError):
                net = ipaddress.ip_network(f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False)
                if not net.is_loopback and not net.is_link_local:
                    found.append((net, names.get(addr["index"], "")))
        for family in (2, 10):
            for route in ipr.get_routes(family=family):
                dst = route.get("RTA_DST")
                if dst and route["dst_len"] > 0:
                    with contextlib.suppress(ValueError, TypeError):
                        net = ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False)
                        if not net.is_loopback and not net.is_link_local and not net.is_multicast:
                            found.append((net, names.get(route.get("RTA_OIF"), "")))
    return found


MAX_ALIAS = 255  # the kernel's IFALIASZ, less its NUL


def _ensure_bridge(spec: BridgeSpec) -> int | None:
    """The bridge as `spec` says; returns its index if this call made it (the caller removes exactly that
    one if what follows fails), None if it was there already."""
    if len(spec.alias.encode()) > MAX_ALIAS or "\0" in spec.alias:
        raise InternalError(f"The bridge of network {spec.name!r} cannot carry this server's mark (its ifalias "
                            f"would be {len(spec.alias.encode())} bytes, at most {MAX_ALIAS}): use a shorter state "
                            "directory path")
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=spec.interface)
        made = None
        if links:
            alias = ipr.get_links(links[0])[0].get("IFLA_IFALIAS")
            if alias != spec.alias:
                raise InternalError(f"The host already has an interface {spec.interface!r} that is not this "
                                    "server's bridge: delete it ('ip link delete') or rename the network")
        else:
            ipr.link("add", ifname=spec.interface, kind="bridge")
            links = ipr.link_lookup(ifname=spec.interface)
            made = links[0]
        try:
            _configure_bridge(ipr, links[0], spec)
        except BaseException:
            if made is not None:
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=made)
            raise
        return made


def bridge_mac(alias: str) -> str:
    """The bridge's own MAC address, stable for the server and network (pure): a bridge without ports has
    none on some kernels (00:00:00:00:00:00) and otherwise takes its lowest port's, changing as instances come
    and go. Incus gives its bridges a generated address too (bridge.hwaddr); 00:16:3e is its prefix."""
    digest = hashlib.sha256(alias.encode()).digest()
    return "00:16:3e:" + ":".join(f"{b:02x}" for b in digest[:3])


def _configure_bridge(ipr: IPRoute, index: int, spec: BridgeSpec) -> None:
    ipr.link("set", index=index, ifalias=spec.alias)
    mac = bridge_mac(spec.alias)
    if str(ipr.get_links(index)[0].get("IFLA_ADDRESS", "")).lower() != mac:
        ipr.link("set", index=index, address=mac)
    if ipr.get_links(index)[0].get("IFLA_IFALIAS") != spec.alias:  # what removes it later looks for this mark
        raise InternalError(f"The bridge of network {spec.name!r} did not keep this server's mark (ifalias)")
    if mtu := spec.config.get("bridge.mtu"):
        ipr.link("set", index=index, mtu=int(mtu))
    _sysctl(f"net/ipv6/conf/{spec.interface}/disable_ipv6", "0" if spec.ipv6 else "1")
    _sysctl(f"net/ipv6/conf/{spec.interface}/accept_dad", "0")
    wanted = {str(a) for a in (spec.ipv4, spec.ipv6) if a is not None}
    for addr in ipr.get_addr(index=index):
        value = f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}"
        scope_link = addr.get("IFA_ADDRESS", "").startswith("fe80:")
        if value not in wanted and not scope_link:
            ipr.addr("del", index=index, address=addr.get("IFA_ADDRESS"), prefixlen=addr["prefixlen"])
        wanted.discard(value)
    for value in sorted(wanted):
        iface = ipaddress.ip_interface(value)
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
    ipr.link("set", index=index, state="up")


def _delete_made(interface: str, index: int) -> None:
    """The bridge this server just made (by its index, whatever its alias says), if it is still that one."""
    with IPRoute() as ipr:
        if index in ipr.link_lookup(ifname=interface):
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)


def _delete_bridge(interface: str, alias: str) -> None:
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=interface)
        if links and ipr.get_links(links[0])[0].get("IFLA_IFALIAS") == alias:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=links[0])


def _sysctl(path: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", path).write_text(value)


TAP_PREFIX = "stv"  # bridges are stp<hash>: a tap is never taken for one


def tap_name(server_id: str, runtime_name: str, device: str) -> str:
    """A VM nic's tap on the host (pure): unique per server, instance and nic, within IFNAMSIZ (15 characters)."""
    return TAP_PREFIX + hashlib.sha256(f"{server_id}/{runtime_name}/{device}".encode()).hexdigest()[:12]


def tap_alias(state_root: str, runtime_name: str, device: str) -> str:
    """The tap's ifalias: the server's mark (as its bridges carry, so cleanup finds both), then `/tap/` (no
    network name holds a slash), the instance and the nic."""
    return f"stapes:{state_root}:/tap/{runtime_name}/{device}"


TUN_DEVICE = "/dev/net/tun"
_TUNSETIFF = 0x400454CA
_TUNSETOWNER = 0x400454CC
_TUNSETGROUP = 0x400454CE
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


def open_tap(name: str, bridge: str, alias: str, mtu: int | None = None, owner: tuple[int, int] = (0, 0)) -> int:
    """A new tap `name` on `bridge`, up, marked with `alias`, and the descriptor that holds it (the caller's: a
    VM's QEMU gets it, `-netdev tap,fd=N`). The tap is not persistent: it lives exactly as long as a descriptor
    holds it, so no other process can attach to it before QEMU has it, after QEMU ends or while the server is
    down (and a tap attaches one descriptor at a time). It belongs to `owner` (uid, gid) all the same. A tap of
    this server's found from before (same alias) is deleted and made again, never taken as it is; an interface
    of anyone else's is refused. Blocking: call it in a thread."""
    if len(alias.encode()) > MAX_ALIAS or "\0" in alias:
        raise InternalError(f"The tap {name} cannot carry this server's mark (its ifalias would be "
                            f"{len(alias.encode())} bytes, at most {MAX_ALIAS}): use a shorter state directory path")
    with IPRoute() as ipr:
        masters = ipr.link_lookup(ifname=bridge)
        if not masters:
            raise InternalError(f"The bridge {bridge} is not on this host: start its network first")
        links = ipr.link_lookup(ifname=name)
        if links:
            if ipr.get_links(links[0])[0].get("IFLA_IFALIAS") != alias:
                raise InternalError(f"The host already has an interface {name!r} that is not this server's tap: "
                                    "delete it ('ip link delete')")
            ipr.link("del", index=links[0])  # an earlier run's: whoever may hold it keeps nothing of the new one
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
            fcntl.ioctl(fd, _TUNSETOWNER, owner[0])
            fcntl.ioctl(fd, _TUNSETGROUP, owner[1])
            links = ipr.link_lookup(ifname=name)
            if not links:
                raise InternalError(f"The tap {name} vanished as it was made")
            index = links[0]
            ipr.link("set", index=index, ifalias=alias)
            mtu = mtu or ipr.get_links(masters[0])[0].get("IFLA_MTU")
            if mtu:
                ipr.link("set", index=index, mtu=int(mtu))
            ipr.link("set", index=index, master=masters[0])
            ipr.link("set", index=index, state="up")
        except OSError as err:
            os.close(fd)  # the tap goes with it
            raise InternalError(f"The tap {name} could not be made: {err.strerror or err}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd


def tap_owner(name: str) -> tuple[int, int] | None:
    """A tap's owner and group as the kernel records them (-1: anyone who can open the tun device); None when
    there is no such tap."""
    try:
        owner, group = (int(Path(f"/sys/class/net/{name}/{key}").read_text()) for key in ("owner", "group"))
    except (OSError, ValueError):
        return None
    return owner, group


def delete_tap(name: str, alias: str) -> bool:
    """The tap, if it is still this server's (its alias); whether one was removed. Blocking."""
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=name)
        if not links or ipr.get_links(links[0])[0].get("IFLA_IFALIAS") != alias:
            return False
        with contextlib.suppress(NetlinkError):
            ipr.link("del", index=links[0])
            return True
    return False


def tap_counters(name: str) -> dict[str, Any] | None:
    """A tap's state seen from the guest's side (what the host receives, the guest sent); None when it is
    gone. Blocking."""
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=name)
        if not links:
            return None
        link = ipr.get_links(links[0])[0]
    stats = link.get("IFLA_STATS64") or {}
    return {"bytes_received": stats.get("tx_bytes", 0), "bytes_sent": stats.get("rx_bytes", 0),
            "packets_received": stats.get("tx_packets", 0), "packets_sent": stats.get("rx_packets", 0)}


def bridge_state(interface: str) -> dict[str, Any]:
    """Incus's network state: addresses, MAC, MTU, counters. Blocking: call it in a thread."""
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=interface)
        if not links:
            return {"addresses": [], "counters": {}, "hwaddr": "", "mtu": 0, "state": "down", "type": "broadcast"}
        link = ipr.get_links(links[0])[0]
        stats = link.get("IFLA_STATS64") or {}
        addresses = [{"family": "inet" if a["family"] == 2 else "inet6", "address": a.get("IFA_ADDRESS"),
                      "netmask": str(a["prefixlen"]), "scope": "link" if a["scope"] == 253 else "global"}
                     for a in ipr.get_addr(index=links[0])]
    return {
        "addresses": addresses, "hwaddr": link.get("IFLA_ADDRESS", ""), "mtu": link.get("IFLA_MTU", 0),
        "state": "up" if link.get("IFLA_OPERSTATE") in ("UP", "UNKNOWN") or link["flags"] & 1 else "down",
        "type": "broadcast",
        "counters": {"bytes_received": stats.get("rx_bytes", 0), "bytes_sent": stats.get("tx_bytes", 0),
                     "packets_received": stats.get("rx_packets", 0), "packets_sent": stats.get("tx_packets", 0)},
    }


def nft_ruleset(spec: BridgeSpec) -> str:
    """This network's nftables table (pure: unit-tested): DHCP and DNS from instances to the host, forwarding
    for the bridge, and masquerading of traffic that leaves the subnet when NAT is on."""
    table = f"stapes_{spec.interface}"
    br = spec.interface
    nat: list[str] = []
    if spec.ipv4 and is_true(spec.config.get("ipv4.nat", "true")):
        net = spec.ipv4.network
        nat.append(f"ip saddr {net} ip daddr != {net} masquerade")
    if spec.ipv6 and is_true(spec.config.get("ipv6.nat", "true")):
        net6 = spec.ipv6.network
        nat.append(f"ip6 saddr {net6} ip6 daddr != {net6} masquerade")
    lines = [
        f"table inet {table} {{",
        "  chain input { type filter hook input priority 0; policy accept;",
        f'    iifname "{br}" udp dport {{ 53, 67, 547 }} accept',
        f'    iifname "{br}" tcp dport 53 accept',
        f'    iifname "{br}" icmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }} accept',
        "  }",
        "  chain forward { type filter hook forward priority 0; policy accept;",
        f'    iifname "{br}" accept',
        f'    oifname "{br}" accept',
        "  }",
        "  chain postrouting { type nat hook postrouting priority 100; policy accept;",
        *[f"    {rule}" for rule in nat],
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


async def _apply_nft(spec: BridgeSpec) -> None:
    table = f"stapes_{spec.interface}"
    # Declaring then deleting the table first makes the whole replacement one atomic nft transaction.
    script = f"table inet {table}\ndelete table inet {table}\n" + nft_ruleset(spec)
    await process.run(["nft", "-f", "-"], input=script.encode(), timeout=30)


async def _delete_nft(interface: str) -> None:
    table = f"stapes_{interface}"
    await process.run(["nft", "-f", "-"], input=f"table inet {table}\ndelete table inet {table}\n".encode(),
                      check=False, timeout=30)


def _die_with_parent() -> None:
    """dnsmasq goes when the daemon goes, even when the daemon is killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


DNSMASQ_USERS = ("stapes-dnsmasq", "dnsmasq")  # scripts/setup-system.sh makes the first; dnsmasq-base the second


def dnsmasq_user() -> tuple[str, str]:
    """The user and group dnsmasq drops root for: one of its own, never `nobody` (any process running as
    nobody could signal it). The first of DNSMASQ_USERS the host has, with its primary group."""
    for name in DNSMASQ_USERS:
        try:
            entry = pwd.getpwnam(name)
            return name, grp.getgrgid(entry.pw_gid).gr_name
        except KeyError:
            continue
    raise InternalError(f"No user for dnsmasq: create one ('useradd --system --user-group {DNSMASQ_USERS[0]}', as "
                        "scripts/setup-system.sh does)")


def dnsmasq_argv(spec: BridgeSpec, user: tuple[str, str] = (DNSMASQ_USERS[0], DNSMASQ_USERS[0])) -> list[str]:
    """dnsmasq for one bridge (pure: unit-tested): leases and names for the instances, nothing else. It writes
    no pid file (`--pid-file` without a path): one it wrote would be its user's to edit. The daemon, which
    started it in the foreground, records its PID itself (root's file, root's directory)."""
    argv = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--strict-order", "--bind-interfaces",
        "--except-interface=lo", f"--interface={spec.interface}", "--no-resolv", "--no-ping", "--no-hosts",
        "--dhcp-no-override", "--dhcp-authoritative", f"--user={user[0]}", f"--group={user[1]}",
        "--pid-file", f"--dhcp-leasefile={spec.directory / 'dnsmasq.leases'}",
        f"--domain={spec.domain}", f"--local=/{spec.domain}/", "--expand-hosts", "--dhcp-fqdn",
        "--log-facility=-", "--quiet-dhcp", "--quiet-dhcp6", "--quiet-ra",
    ]
    if spec.ipv4:
        argv.append(f"--listen-address={spec.ipv4.ip}")
        if is_true(spec.config.get("ipv4.dhcp", "true")):
            first, last = dhcp_range(spec.ipv4)
            argv.append(f"--dhcp-range={first},{last},1h")
    if spec.ipv6:
        argv += [f"--listen-address={spec.ipv6.ip}", "--enable-ra",
                 f"--dhcp-range=::,constructor:{spec.interface},ra-stateless,ra-names"]
    return argv


class Dnsmasq:
    """One dnsmasq process, owned by this daemon."""

    def __init__(self, spec: BridgeSpec) -> None:
        self.spec = spec
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        await asyncio.to_thread(_private_directory, self.spec.directory)
        pid_file = self.spec.directory / "dnsmasq.pid"
        await _kill_stale(pid_file, self.spec)
        user = await asyncio.to_thread(dnsmasq_user)
        log_file = await asyncio.to_thread(open, self.spec.directory / "dnsmasq.log", "ab")
        try:
            self._proc = await process.spawn(dnsmasq_argv(self.spec, user), stdin=asyncio.subprocess.DEVNULL,
                                             stdout=log_file, stderr=log_file, preexec_fn=_die_with_parent)
        finally:
            log_file.close()
        # dnsmasq drops root, which clears its parent-death signal: if this daemon is killed, its next start
        # finds dnsmasq by this file.
        await asyncio.to_thread(_write_pid, pid_file, self._proc.pid)
        await asyncio.sleep(0.05)
        if self._proc.returncode is not None:
            raise InternalError(f"dnsmasq for network {self.spec.name!r} failed to start; see "
                                f"{self.spec.directory / 'dnsmasq.log'}")

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        process.forget(proc)


def _private_directory(directory: Path) -> None:
    """A network's directory: root's alone (dnsmasq's leases, its log, its PID)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def _write_pid(pid_file: Path, pid: int) -> None:
    pid_file.unlink(missing_ok=True)  # an older server's, written by dnsmasq as its user
    fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{pid}\n")


def is_our_dnsmasq(cmdline: bytes, directory: Path) -> bool:
    """The command line of a dnsmasq this server started for the network in `directory` (pure: its lease
    file is that network's; an older server named its pid file there too)."""
    args = cmdline.split(b"\0")
    return bool(args) and args[0].endswith(b"dnsmasq") and (
        f"--dhcp-leasefile={directory / 'dnsmasq.leases'}".encode() in args
        or f"--pid-file={directory / 'dnsmasq.pid'}".encode() in args)


async def _kill_stale(pid_file: Path, spec: BridgeSpec) -> None:
    """A dnsmasq left by a previous run of this daemon (killed before it could stop it) holds the address."""
    try:
        pid = int((await asyncio.to_thread(pid_file.read_text)).strip())
        cmdline = await asyncio.to_thread(Path(f"/proc/{pid}/cmdline").read_bytes)
    except (OSError, ValueError):
        return
    if is_our_dnsmasq(cmdline, spec.directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not _alive(pid):
                break
            await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    """Still running: a process that ended but that nobody reaped yet (an orphan waits for init) is not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class BridgeDriver:
    """Start, change and remove one managed bridge."""

    def __init__(self) -> None:
        self._dnsmasq: dict[str, Dnsmasq] = {}

    async def start(self, spec: BridgeSpec) -> None:
        """If it fails, a bridge it made is removed again (that one: by its index, not by its mark)."""
        try:
            made = await asyncio.to_thread(_ensure_bridge, spec)
        except NetlinkError as err:
            raise InternalError(f"Could not set up the bridge of network {spec.name!r}: {err}") from None
        try:
            if spec.ipv4 and is_true(spec.config.get("ipv4.nat", "true")):
                await asyncio.to_thread(_sysctl, "net/ipv4/ip_forward", "1")
            if spec.ipv6:
                await asyncio.to_thread(_sysctl, "net/ipv6/conf/all/forwarding", "1")
            await _apply_nft(spec)
            await self.stop_dhcp(spec.name)
            dnsmasq = Dnsmasq(spec)
            await dnsmasq.start()
            self._dnsmasq[spec.name] = dnsmasq
        except BaseException:
            if made is not None:
                await asyncio.shield(self._unmake(spec, made))
            raise

    async def _unmake(self, spec: BridgeSpec, index: int) -> None:
        await self.stop_dhcp(spec.name)
        await _delete_nft(spec.interface)
        await asyncio.to_thread(_delete_made, spec.interface, index)

    def serving(self, name: str) -> bool:
        return name in self._dnsmasq

    async def stop_dhcp(self, name: str) -> None:
        dnsmasq = self._dnsmasq.pop(name, None)
        if dnsmasq is not None:
            await dnsmasq.stop()

    async def remove(self, spec: BridgeSpec) -> None:
        await self.stop_dhcp(spec.name)
        await _delete_nft(spec.interface)
        await asyncio.to_thread(_delete_bridge, spec.interface, spec.alias)

    async def stop_all(self) -> None:
        for name in list(self._dnsmasq):
            await self.stop_dhcp(name)

    async def state(self, spec: BridgeSpec) -> dict[str, Any]:
        return await asyncio.to_thread(bridge_state, spec.interface)

    async def leases(self, spec: BridgeSpec) -> list[dict[str, str]]:
        """dnsmasq's leases: who has which address (for `stapes network list-leases`)."""
        try:
            text = await asyncio.to_thread((spec.directory / "dnsmasq.leases").read_text)
        except OSError:
            return []
        leases = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0] != "duid":
                leases.append({"hwaddr": parts[1], "address": parts[2], "hostname": parts[3], "type": "dynamic"})
        return leases
