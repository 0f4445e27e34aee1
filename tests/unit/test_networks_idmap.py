"""Pure pieces of networks, nics, id maps and the Debian image recipe."""

from __future__ import annotations

import ipaddress
import json
import random
import sqlite3
import uuid
from pathlib import Path

import pytest

from stapes.api.config_keys import validate_instance_config
from stapes.api.devices import validate_devices
from stapes.api.errors import BadRequest
from stapes.api.networks import (
    check_mac,
    choose_ipv4,
    choose_ipv6,
    dhcp_range,
    interface_name,
    parse_ipv4_cidr,
    parse_ipv6_cidr,
    random_mac,
)
from stapes.client.migration import Overrides, target_body
from stapes.server.idmap import IdRange, NoAllocation, container_map, from_volatile, parse_allocation, to_volatile
from stapes.server.images.debian import customise, mmdebstrap_argv, release_of
from stapes.server.instances.driver import InstanceSpec
from stapes.server.instances.lxc import render_config
from stapes.server.instances.volatile import kept_from_peer, missing_volatile
from stapes.server.networks.bridge import BridgeSpec, dnsmasq_argv, nft_ruleset
from stapes.server.store.db import SCHEMA, Store

MAP = (IdRange(True, False, 1000000, 0, 65536), IdRange(False, True, 1000000, 0, 65536))
NIC = {"type": "nic", "network": "stapesbr0", "name": "eth0"}


def test_interface_names_are_short_unique_and_stable() -> None:
    a = interface_name("aaaa1111", "stapesbr0")
    assert len(a) <= 15 and a == interface_name("aaaa1111", "stapesbr0")
    assert a != interface_name("bbbb2222", "stapesbr0")  # two servers on one host, same network name
    assert a != interface_name("aaaa1111", "backend")


def test_subnet_choice_avoids_what_is_in_use() -> None:
    used = [ipaddress.IPv4Network("10.0.0.0/9")]  # the lower half of 10/8 is taken
    for seed in range(50):
        chosen = ipaddress.IPv4Interface(choose_ipv4(used, random.Random(seed)))
        assert chosen.network.prefixlen == 24 and not chosen.network.overlaps(used[0])
        assert chosen.ip == next(chosen.network.hosts())
    with pytest.raises(ValueError, match="no free IPv4"):
        choose_ipv4([ipaddress.IPv4Network("10.0.0.0/8")], random.Random(1), attempts=20)
    v6 = ipaddress.IPv6Interface(choose_ipv6([], random.Random(3)))
    assert v6.network.prefixlen == 64 and v6.ip.is_private and str(v6.ip).startswith("fd42:")


def test_address_checks() -> None:
    assert str(parse_ipv4_cidr("10.1.2.1/24").network) == "10.1.2.0/24"
    for bad, message in (("10.1.2.0/24", "network's own"), ("10.1.2.1/31", "prefix"), ("nonsense", "not an IPv4"),
                         ("10.1.2.255/24", "broadcast")):
        with pytest.raises(ValueError, match=message):
            parse_ipv4_cidr(bad)
    with pytest.raises(ValueError, match="/64"):
        parse_ipv6_cidr("fd42::1/48")
    assert dhcp_range(ipaddress.IPv4Interface("10.1.2.1/24")) == ("10.1.2.2", "10.1.2.254")
    check_mac(random_mac())
    for bad in ("11:22:33:44:55:66", "00:00:00:00:00:00", "10:66:6a:1:2:3", "10-66-6a-01-02-03"):
        with pytest.raises(ValueError):
            check_mac(bad)


def _bridge(config: dict[str, str]) -> BridgeSpec:
    return BridgeSpec("stapesbr0", "stpabc", "stapes:/s:stapesbr0", config, Path("/s/networks/stapesbr0"))


def test_firewall_and_dhcp_of_a_bridge() -> None:
    spec = _bridge({"ipv4.address": "10.9.8.1/24", "ipv4.nat": "true", "ipv6.address": "fd42:1:2:3::1/64",
                    "ipv6.nat": "false"})
    rules = nft_ruleset(spec)
    assert "table inet stapes_stpabc" in rules
    assert "ip saddr 10.9.8.0/24 ip daddr != 10.9.8.0/24 masquerade" in rules
    assert "ip6 saddr" not in rules  # IPv6 NAT is off
    argv = dnsmasq_argv(spec)
    assert "--interface=stpabc" in argv and "--dhcp-range=10.9.8.2,10.9.8.254,1h" in argv
    assert "--enable-ra" in argv and "--domain=stapes" in argv
    quiet = dnsmasq_argv(_bridge({"ipv4.address": "10.9.8.1/24", "ipv4.dhcp": "false", "ipv6.address": "none"}))
    assert not any(a.startswith("--dhcp-range") for a in quiet) and "--enable-ra" not in quiet
    assert "masquerade" not in nft_ruleset(_bridge({"ipv4.address": "10.9.8.1/24", "ipv4.nat": "false"}))


def test_volatile_keys_for_nics_and_the_id_map() -> None:
    added = missing_volatile({}, {"eth0": NIC, "eth1": {**NIC, "hwaddr": "10:66:6a:00:00:01"}}, MAP, applying=True)
    check_mac(added["volatile.eth0.hwaddr"])
    assert "volatile.eth1.hwaddr" not in added  # the device fixes its own MAC
    assert from_volatile(added["volatile.idmap.next"]) == list(MAP)
    assert json.loads(added["volatile.idmap.current"])[0] == {"Isuid": True, "Isgid": False, "Hostid": 1000000,
                                                               "Nsid": 0, "Maprange": 65536}
    assert added["volatile.idmap.base"] == "1000000" and added["volatile.last_state.idmap"] == "[]"
    assert str(uuid.UUID(added["volatile.uuid"])) == added["volatile.uuid"]
    again = missing_volatile({**added}, {"eth0": NIC}, MAP, applying=True)
    assert again == {}  # nothing changes once recorded: the MAC and the UUID stay
    assert missing_volatile({**added, "volatile.uuid": "x"}, {"eth0": NIC}, MAP, applying=True)["volatile.uuid"] \
        != "x"  # one that is no UUID is replaced
    # security.privileged set on a running container: the next start drops the map, the current one stays
    changed = missing_volatile(added, {"eth0": NIC}, (), applying=False)
    assert changed["volatile.idmap.next"] == "[]" and "volatile.idmap.current" not in changed
    assert "volatile.eth0.hwaddr" not in changed
    started = missing_volatile({**added, **changed}, {"eth0": NIC}, (), applying=True)
    assert started == {"volatile.idmap.current": "[]"}


def test_what_a_migrated_instance_keeps() -> None:
    config = {"limits.cpu": "1", "volatile.base_image": "abc", "volatile.eth0.hwaddr": "10:66:6a:01:02:03",
              "volatile.eth9.hwaddr": "10:66:6a:01:02:04", "volatile.idmap.next": "[]",
              "volatile.last_state.power": "RUNNING", "volatile.uuid": "x"}
    kept = kept_from_peer(config, {"eth0": NIC})
    assert kept == {"limits.cpu": "1", "volatile.base_image": "abc", "volatile.eth0.hwaddr": "10:66:6a:01:02:03"}
    machine = "0b6a1b0e-5d1c-4f5e-9a43-6f1f2b3c4d5e"
    assert kept_from_peer({**config, "volatile.uuid": machine}, {"eth0": NIC})["volatile.uuid"] == machine
    with pytest.raises(BadRequest, match="volatile.eth0.hwaddr"):
        kept_from_peer({"volatile.eth0.hwaddr": "ff:ff:ff:ff:ff:ff"}, {"eth0": NIC})


def test_a_move_keeps_the_mac_and_the_uuid_and_a_copy_does_not() -> None:
    machine = "0b6a1b0e-5d1c-4f5e-9a43-6f1f2b3c4d5e"
    instance = {"config": {"volatile.eth0.hwaddr": "10:66:6a:01:02:03", "volatile.idmap.next": "[]",
                           "volatile.uuid": machine},
                "devices": {}, "profiles": ["default"], "type": "container", "architecture": "x86_64",
                "description": "", "ephemeral": False}
    moved = target_body(instance, "c1", Overrides(), {}, same_machine=True)["config"]
    assert moved == {"volatile.eth0.hwaddr": "10:66:6a:01:02:03", "volatile.uuid": machine}
    assert target_body(instance, "c1", Overrides(), {})["config"] == {}


def test_subordinate_id_allocation(tmp_path: Path) -> None:
    assert parse_allocation("bob:100000:65536\nroot:1000000:1000000000\n") == (1000000, 1000000000)
    assert parse_allocation("root:1000000:100\n") is None  # too small for a container
    uid, gid = tmp_path / "subuid", tmp_path / "subgid"
    uid.write_text("root:2000000:65536\n")
    gid.write_text("root:3000000:65536\n")
    assert container_map(uid, gid) == [IdRange(True, False, 2000000, 0, 65536), IdRange(False, True, 3000000, 0,
                                                                                          65536)]
    gid.write_text("")
    with pytest.raises(NoAllocation, match="security.privileged=true"):
        container_map(uid, gid)
    with pytest.raises(ValueError):
        from_volatile('[{"Isuid": true, "Isgid": false, "Hostid": -1, "Nsid": 0, "Maprange": 5}]')
    assert from_volatile(to_volatile(list(MAP))) == list(MAP)


def _spec(config: dict[str, str], idmap: tuple[IdRange, ...], nics: dict[str, str]) -> InstanceSpec:
    return InstanceSpec("default", "c1", config, {"root": {"type": "disk", "path": "/", "pool": "p"}, "eth0": NIC},
                        Path("/pool/c1"), nics, idmap)


def test_lxc_config_of_an_unprivileged_networked_container() -> None:
    text = render_config(_spec({"volatile.eth0.hwaddr": "10:66:6a:01:02:03", "image.os": "busybox"}, MAP,
                               {"eth0": "stpabc"}), lxc_dir=Path("/l"), server_id="x", cgroup2=False,
                         apparmor=False)
    assert "lxc.idmap = u 0 1000000 65536" in text and "lxc.idmap = g 0 1000000 65536" in text
    # The server's own id-mapped mount of the volume's rootfs (CRIU cannot restore LXC's idmap=container one).
    assert "lxc.rootfs.path = dir:/l/rootfs" in text and "idmap=container" not in text and "cgroup:rw:force" in text
    # What a checkpoint needs: no console pty, no AppArmor line on a host without AppArmor.
    assert "lxc.console.path = none" in text and "apparmor" not in text
    for line in ("lxc.net.0.type = veth", "lxc.net.0.link = stpabc", "lxc.net.0.name = eth0",
                 "lxc.net.0.hwaddr = 10:66:6a:01:02:03", "lxc.signal.halt = SIGUSR1"):
        assert line in text
    privileged = render_config(_spec({"image.os": "debian"}, (), {}), lxc_dir=Path("/l"), server_id="x",
                               cgroup2=False, apparmor=True)
    assert "lxc.rootfs.path = dir:/pool/c1/rootfs" in privileged and "lxc.apparmor.profile = unconfined" in privileged
    assert "lxc.idmap" not in privileged and "lxc.net.0.type = empty" in privileged
    assert "lxc.signal.halt = SIGPWR" in privileged and "cgroup:mixed:force" in privileged


def test_debian_image_recipe(tmp_path: Path) -> None:
    assert release_of("debian/12") == "12"
    with pytest.raises(BadRequest, match="debian/12, debian/13"):
        release_of("debian/11")
    argv = mmdebstrap_argv("13", tmp_path / "rootfs", "http://mirror")
    assert argv[-3:] == ["trixie", str(tmp_path / "rootfs"), "http://mirror"] and "--variant=minbase" in argv
    assert any(a.startswith("--include=") and "sysvinit-core" in a for a in argv)
    root = tmp_path / "rootfs"
    (root / "etc/network").mkdir(parents=True)
    (root / "etc/inittab").write_text("id:2:initdefault:\n1:2345:respawn:/sbin/getty 38400 tty1\n"
                                      "pf::powerwait:/etc/init.d/powerfail start\npn::powerfailnow:x\n")
    customise(root, "12")
    inittab = (root / "etc/inittab").read_text()
    assert "getty" not in inittab and "pf::powerwait:/sbin/shutdown -h now" in inittab and "pn::" not in inittab
    assert "iface eth0 inet dhcp" in (root / "etc/network/interfaces").read_text()
    assert "os: debian" in (tmp_path / "metadata.yaml").read_text()


async def test_containers_made_before_unprivileged_defaults_stay_privileged(tmp_path: Path) -> None:
    """A version-1 database (every container then ran privileged) is brought to version 2 at start."""
    path = tmp_path / "stapes.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    conn.execute("INSERT INTO instances (project, name, type, architecture, config, created_at) VALUES "
                 "('default', 'old', 'container', 'x86_64', '{\"limits.cpu\": \"1\"}', 0)")
    conn.execute("INSERT INTO instances (project, name, type, architecture, config, created_at) VALUES "
                 "('default', 'chosen', 'container', 'x86_64', '{\"security.privileged\": \"false\"}', 0)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = await Store.open(path)
    try:
        rows = {row.name: row.config for row in await store.instances()}
        assert rows["old"] == {"limits.cpu": "1", "security.privileged": "true"}
        assert rows["chosen"] == {"security.privileged": "false"}
        assert await store.networks() == []
    finally:
        await store.close()


def test_nothing_a_client_sends_can_add_lines_to_the_lxc_config() -> None:
    with pytest.raises(BadRequest, match="volatile.eth0.hwaddr"):
        validate_instance_config({"volatile.eth0.hwaddr": "10:66:6a:00:00:01\nlxc.idmap = u 0 0 1"})
    with pytest.raises(BadRequest, match="control characters"):
        validate_devices({"d": {"type": "disk", "path": "/d", "source": "/srv\nlxc.rootfs.path = dir:/"}})
    with pytest.raises(BadRequest, match="Invalid device name"):
        validate_devices({"d\nlxc.idmap = u 0 0 1": {"type": "none"}})
    spec = InstanceSpec("default", "c1", {}, {"d": {"type": "disk", "path": "/my data", "source": "/srv/a b"}},
                        Path("/pool/c1"))
    text = render_config(spec, lxc_dir=Path("/l"), server_id="x", cgroup2=False, apparmor=False)
    assert "lxc.mount.entry = /srv/a\\040b my\\040data none" in text
