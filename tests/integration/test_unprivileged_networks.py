"""Unprivileged containers on managed networks, from busybox and Debian images, and how they move."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import Cli, Cluster, Server, wait_for

# Owners and modes set inside the container; after every move `stat` inside must show the same.
FILES = (
    "mkdir -p /srv/t/dir && chmod 1775 /srv/t/dir && chown 1000:1000 /srv/t/dir",
    "echo s > /srv/t/suid && chown 1001:42 /srv/t/suid && chmod 4750 /srv/t/suid",
    "echo g > /srv/t/sgid && chown 65533:65533 /srv/t/sgid && chmod 2711 /srv/t/sgid",
    "ln -s suid /srv/t/link && chown -h 1002:1003 /srv/t/link",
)
STAT = "stat -c '%n %u:%g %a %F' /srv/t/dir /srv/t/suid /srv/t/sgid /srv/t/link"


def addresses(cli: Cli, ref: str, family: str = "inet") -> list[str]:
    state = cli.json("list", ref.split(":")[0] + ":", "-c", "n")
    instance = next(i for i in state if i["name"] == ref.split(":")[1])
    eth0 = ((instance.get("state") or {}).get("network") or {}).get("eth0") or {}
    return [a["address"] for a in eth0.get("addresses", []) if a["family"] == family and a["scope"] == "global"]


def wait_address(cli: Cli, ref: str, timeout: float = 30) -> str:
    found: list[str] = []
    wait_for(lambda: found.extend(addresses(cli, ref)) or found, timeout, f"{ref} to get an IPv4 address")
    return found[0]


def subnet(cli: Cli, remote: str, network: str = "stapesbr0") -> ipaddress.IPv4Network:
    info = cli.json("network", "list", f"{remote}:")
    return ipaddress.IPv4Interface(next(n for n in info if n["name"] == network)["config"]["ipv4.address"]).network


def host_pid_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_an_unprivileged_container_is_confined(cli: Cli, s1: Server, cluster: Cluster, tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"  # below pytest's 0700 directory: the container's root cannot get there
    hidden.mkdir()
    error = cli.fails("launch", "busybox", "c0", "-d", f"host,type=disk,source={hidden},path=/mnt/host")
    assert "cannot reach the source of disk device 'host'" in error and "chmod o+x" in error
    secret = cluster.root / "secret"
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("host root only\n")
    (secret / "key").chmod(0o600)
    cli.run("launch", "busybox", "c1", "-d", f"host,type=disk,source={secret},path=/mnt/host")
    assert cli.run("exec", "c1", "--", "cat", "/proc/self/uid_map").stdout.split()[:2] == ["0", "1000000"]
    pid = next(i for i in cli.json("list") if i["name"] == "c1")["state"]["pid"]
    assert host_pid_uid(pid) == 1000000  # root inside is a high, unprivileged id outside
    # The host's root-only files: owned by nobody as the container sees them, and not readable.
    assert cli.run("exec", "c1", "--", "stat", "-c", "%u", "/mnt/host").stdout.strip() == "65534"
    denied = cli.run("exec", "c1", "--", "cat", "/mnt/host/key", check=False)
    assert denied.returncode != 0 and "host root only" not in denied.stdout
    processes = cli.run("exec", "c1", "--", "ps", "-o", "comm").stdout
    assert "stapesd" not in processes and "init" in processes  # its own PID namespace
    assert cli.run("exec", "c1", "--", "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes", check=False
                   ).returncode == 0  # its cgroups are mounted, so it sees its own limits
    # security.privileged opts out (no user namespace) from the next start; until then the map stays current.
    cli.run("config", "set", "c1", "security.privileged=true")
    config = next(i for i in cli.json("list") if i["name"] == "c1")["config"]
    assert '"Hostid":1000000' in config["volatile.idmap.current"] and config["volatile.idmap.next"] == "[]"
    cli.run("restart", "c1", "--force")
    assert cli.run("exec", "c1", "--", "cat", "/proc/self/uid_map").stdout.split() == ["0", "0", "4294967295"]
    assert next(i for i in cli.json("list") if i["name"] == "c1")["config"]["volatile.idmap.current"] == "[]"
    info = cli.run("info").stdout
    assert "Unprivileged containers: yes (root inside is host uid 1000000" in info and "stapesbr0" in info


def test_containers_reach_each_other_and_the_host_reaches_them(cli: Cli, s1: Server) -> None:
    cli.run("launch", "busybox", "c1")
    cli.run("launch", "busybox", "c2")
    a1, a2 = wait_address(cli, "s1:c1"), wait_address(cli, "s1:c2")
    net = subnet(cli, "s1")
    assert ipaddress.IPv4Address(a1) in net and ipaddress.IPv4Address(a2) in net and a1 != a2
    assert cli.run("exec", "c1", "--", "ping", "-c1", "-W2", "c2").returncode == 0  # by name, from its DNS
    assert cli.run("exec", "c2", "--", "ping", "-c1", "-W2", a1).returncode == 0
    for address in (a1, a2):
        assert subprocess.run(["ping", "-c1", "-W2", address], capture_output=True).returncode == 0
    leases = {lease["hostname"]: lease["address"] for lease in cli.json("network", "list-leases", "stapesbr0")}
    assert leases == {"c1": a1, "c2": a2}
    listing = cli.run("list", "-c", "n4").stdout
    assert f"{a1} (eth0)" in listing and f"{a2} (eth0)" in listing
    taken = f"{next(net.hosts()) + 7}/{net.prefixlen}"
    assert "overlaps" in cli.fails("network", "create", "twin", f"ipv4.address={taken}")
    assert "loopback" in cli.fails("network", "create", "lo2", "ipv4.address=127.9.0.1/24")
    used = cli.json("network", "list")[0]["used_by"]
    assert "/1.0/profiles/default" in used
    assert "in use" in cli.fails("network", "delete", "stapesbr0")


def test_moves_keep_owners_inside_and_the_mac(s1: Server, s2: Server, two: Cli) -> None:
    two.run("launch", "s1:busybox", "c1")
    two.run("exec", "s1:c1", "--", "sh", "-c", " && ".join(FILES))
    before = two.run("exec", "s1:c1", "--", "sh", "-c", STAT).stdout
    assert "/srv/t/suid 1001:42 4750" in before and "/srv/t/link 1002:1003 777" in before
    mac = two.json("list", "s1:")[0]["config"]["volatile.eth0.hwaddr"]
    wait_address(two, "s1:c1")
    here, there = "s1", "s2"
    for mode in ("pull", "push", "relay"):
        two.run("move", f"{here}:c1", f"{there}:", "--mode", mode, "--stateless")
        assert two.json("list", f"{here}:") == []
        assert two.run("exec", f"{there}:c1", "--", "sh", "-c", STAT).stdout == before, mode
        assert two.run("exec", f"{there}:c1", "--", "cat", "/sys/class/net/eth0/address").stdout.strip() == mac
        address = wait_address(two, f"{there}:c1")
        assert ipaddress.IPv4Address(address) in subnet(two, there)
        assert subprocess.run(["ping", "-c1", "-W2", address], capture_output=True).returncode == 0
        here, there = there, here
    copied = two.run("copy", f"{here}:c1", f"{there}:c1-copy", "--stateless").stdout
    assert "Copied" in copied
    two.run("start", f"{there}:c1-copy")
    copy_mac = two.json("list", f"{there}:")[0]["config"]["volatile.eth0.hwaddr"]
    assert copy_mac != mac  # a copy is another machine on the network
    assert two.run("exec", f"{there}:c1-copy", "--", "sh", "-c", STAT).stdout == before


def test_a_missing_network_on_the_target_is_refused_before_anything_moves(s1: Server, s2: Server,
                                                                          two: Cli) -> None:
    two.run("network", "create", "s1:backend")
    two.run("launch", "s1:busybox", "c1", "-d", "eth0,network=backend")
    assert ipaddress.IPv4Address(wait_address(two, "s1:c1")) in subnet(two, "s1", "backend")
    two.run("stop", "s1:c1")
    before = two.json("list", "s1:")[0]
    error = two.fails("move", "s1:c1", "s2:")
    assert "Network 'backend' of device 'eth0' does not exist" in error and "-d eth0,network=" in error
    after = two.json("list", "s1:")[0]
    assert (after["config"], after["devices"], after["status"]) == (before["config"], before["devices"], "Stopped")
    assert two.json("list", "s2:") == []
    assert not (s2.state_dir / "storage-pools/default/containers/c1").exists()
    assert "Network 'nowhere'" in two.fails("profile", "device", "add", "s2:default", "eth1", "nic",
                                             "network=nowhere")
    two.run("move", "s1:c1", "s2:", "-d", "eth0,network=stapesbr0")
    two.run("start", "s2:c1")
    assert ipaddress.IPv4Address(wait_address(two, "s2:c1")) in subnet(two, "s2")
    assert two.json("list", "s2:")[0]["devices"]["eth0"]["network"] == "stapesbr0"


@pytest.mark.skipif(subprocess.run(["which", "mmdebstrap"], capture_output=True).returncode != 0,
                    reason="mmdebstrap is not installed (make install)")
def test_a_debian_container_boots_gets_an_address_and_moves(s1: Server, s2: Server, two: Cli) -> None:
    built = two.run("image", "build", "debian/12", "s1:", timeout=900).stdout  # from the archive, unless cached
    assert "Image built with fingerprint" in built
    two.run("launch", "s1:debian/12", "d1")
    address = wait_address(two, "s1:d1", timeout=60)
    assert ipaddress.IPv4Address(address) in subnet(two, "s1")
    assert two.run("exec", "s1:d1", "--", "ps", "-p", "1", "-o", "comm=").stdout.strip() == "init"
    owners = "stat -c '%n %U:%G %a' /etc/shadow /usr/bin/passwd /var/log/apt /tmp"
    before = two.run("exec", "s1:d1", "--", "sh", "-c", owners).stdout
    assert "/etc/shadow root:shadow 640" in before and "/usr/bin/passwd root:root 4755" in before
    two.run("move", "s1:d1", "s2:", "--mode", "relay", "--stateless")
    assert two.run("exec", "s2:d1", "--", "sh", "-c", owners).stdout == before
    assert ipaddress.IPv4Address(wait_address(two, "s2:d1", timeout=60)) in subnet(two, "s2")
