"""The QEMU machine a VM's instance describes, and its command line (pure: no QEMU runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stapes.api.errors import BadRequest
from stapes.server.instances.accel import parse_version, probe_argv, probe_firmware
from stapes.server.instances.driver import InstanceSpec
from stapes.server.instances.qemu import is_our_qemu
from stapes.server.instances.qemu_machine import (
    DEFAULT_MEMORY_MIB,
    Fds,
    Machine,
    argv,
    check_instance,
    machine_from_spec,
    memory_mib,
)
from stapes.server.networks.bridge import tap_alias, tap_name

ROOT = {"type": "disk", "path": "/", "pool": "default"}
NIC = {"type": "nic", "network": "stapesbr0", "name": "eth0"}


def spec(config: dict[str, str] | None = None, devices: dict[str, dict[str, str]] | None = None,
         nics: dict[str, str] | None = None) -> InstanceSpec:
    return InstanceSpec("default", "v1", config or {}, devices or {"root": ROOT}, Path("/pool/virtual-machines/v1"),
                        nics or {}, disk=Path("/pool/virtual-machines/v1/root.img"))


def machine(s: InstanceSpec, accel: str = "tcg", direct: bool = True) -> Machine:
    return machine_from_spec(s, accel=accel, runtime=Path("/state/qemu/v1"), uuid="u-1",
                             firmware_code=Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
                             nvram=s.volume / "qemu.nvram", direct=direct, tap=lambda dev: f"tap-{dev}",
                             host_memory=8 << 30)


def option(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_a_typical_vm() -> None:
    s = spec({"limits.cpu": "2", "limits.memory": "512MiB", "volatile.eth0.hwaddr": "00:16:3E:AA:BB:CC"},
             {"root": ROOT, "eth0": NIC}, {"eth0": "stpbridge"})
    m = machine(s)
    args = argv(m)
    assert args[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in args
    assert option(args, "-display") == ["none"]
    assert "-daemonize" not in args  # the sandbox forbids the fork: QEMU runs in a session of its own instead
    assert option(args, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert option(args, "-machine") == ["q35,pflash0=fw-code,pflash1=fw-vars"]
    assert option(args, "-accel") == ["tcg"] and option(args, "-cpu") == ["max"]
    assert option(args, "-smp") == ["2,sockets=1,cores=2,threads=1"]
    assert option(args, "-m") == ["512M"]
    assert option(args, "-pidfile") == ["/state/qemu/v1/qemu.pid"]
    assert option(args, "-action") == ["reboot=reset,shutdown=poweroff"]
    chardevs = option(args, "-chardev")
    assert "socket,id=qmp,path=/state/qemu/v1/qmp.sock,server=on,wait=off" in chardevs
    assert "socket,id=console,path=/state/qemu/v1/console.sock,server=on,wait=off" in chardevs
    assert "socket,id=agent,path=/state/qemu/v1/agent.sock,server=on,wait=off" in chardevs
    assert option(args, "-mon") == ["chardev=qmp,mode=control"]
    assert option(args, "-serial") == ["chardev:console"]
    devices = option(args, "-device")
    assert "virtserialport,bus=virtio-serial0.0,chardev=agent,name=org.stapes.agent" in devices
    assert "virtio-blk-pci,drive=root,id=dev-root,bootindex=1" in devices
    assert "virtio-net-pci,netdev=net0,id=dev-net0,mac=00:16:3e:aa:bb:cc,romfile=" in devices
    assert option(args, "-netdev") == ["tap,id=net0,ifname=tap-eth0,script=no,downscript=no,vhost=off"]
    blockdevs = option(args, "-blockdev")
    assert ("driver=file,filename=/usr/share/OVMF/OVMF_CODE_4M.fd,node-name=fw-code-file,read-only=on,aio=threads,"
            "cache.direct=off") in blockdevs
    assert "driver=raw,file=fw-code-file,node-name=fw-code,read-only=on,cache.direct=off" in blockdevs
    assert ("driver=file,filename=/pool/virtual-machines/v1/qemu.nvram,node-name=fw-vars-file,aio=threads,"
            "cache.direct=off") in blockdevs
    assert ("driver=file,filename=/pool/virtual-machines/v1/root.img,node-name=root-file,aio=threads,"
            "cache.direct=on,discard=unmap") in blockdevs
    assert "driver=raw,file=root-file,node-name=root,cache.direct=on,discard=unmap" in blockdevs


def test_defaults_kvm_and_file_systems_without_o_direct() -> None:
    m = machine(spec(), accel="kvm", direct=False)
    args = argv(m, "/usr/bin/qemu-system-x86_64")
    assert args[0] == "/usr/bin/qemu-system-x86_64"
    assert option(args, "-accel") == ["kvm"] and option(args, "-cpu") == ["host"]
    assert option(args, "-m") == [f"{DEFAULT_MEMORY_MIB}M"] and option(args, "-smp")[0].startswith("1,")
    assert any("node-name=root-file" in b and "cache.direct=off" in b for b in option(args, "-blockdev"))
    assert not option(args, "-netdev")


def test_commas_in_paths_are_escaped() -> None:
    s = InstanceSpec("default", "v1", {}, {"root": ROOT}, Path("/a,b"), {}, disk=Path("/a,b/root.img"))
    args = argv(machine(s))
    assert any("filename=/a,,b/root.img," in b for b in option(args, "-blockdev"))


def test_the_record_rebuilds_the_same_machine() -> None:
    s = spec({"volatile.eth0.hwaddr": "00:16:3e:00:00:01"}, {"root": ROOT, "eth0": NIC}, {"eth0": "br"})
    m = machine(s)
    again = Machine.from_json(__import__("json").loads(m.dumps()))
    assert again == m and argv(again) == argv(m)


def test_memory() -> None:
    assert memory_mib(None, 0) == DEFAULT_MEMORY_MIB
    assert memory_mib("1GiB", 0) == 1024
    assert memory_mib("25%", 8 << 30) == 2048


@pytest.mark.parametrize(("config", "devices", "words"), [
    ({"raw.lxc": "lxc.x = 1"}, {}, "raw.lxc applies to containers only"),
    ({"limits.processes": "10"}, {}, "limits.processes applies to containers only"),
    ({"security.privileged": "true"}, {}, "security.privileged applies to containers only"),
    ({"migration.lazy": "true"}, {}, "migration.lazy"),
    ({"limits.cpu": "0-1"}, {}, "count of virtual CPUs"),
    ({"limits.cpu": "0"}, {}, "count of virtual CPUs"),
    ({"limits.memory": "64MiB"}, {}, "below the 128MiB"),
    ({}, {"data": {"type": "disk", "path": "/data", "source": "/srv"}}, "not supported for a virtual machine"),
])
def test_refused_with_what_is_supported(config: dict[str, str], devices: dict[str, dict[str, str]],
                                        words: str) -> None:
    with pytest.raises(BadRequest) as err:
        check_instance(config, {"root": ROOT, **devices})
    assert words in err.value.message


def test_accepted() -> None:
    check_instance({"security.privileged": "false", "migration.lazy": "false", "limits.cpu": "2",
                    "limits.memory": "50%", "user.x": "y"}, {"root": ROOT, "eth0": NIC})


def test_a_nic_needs_its_mac() -> None:
    with pytest.raises(BadRequest, match="no MAC address"):
        machine(spec({}, {"root": ROOT, "eth0": NIC}, {"eth0": "br"}))


def test_tap_names_fit_and_differ_per_server_instance_and_nic() -> None:
    names = {tap_name(server, instance, nic) for server in ("aaaa1111", "bbbb2222") for instance in ("v1", "v2")
             for nic in ("eth0", "eth1")}
    assert len(names) == 8
    assert all(len(name) <= 15 and name.startswith("stv") for name in names)
    assert tap_alias("/var/lib/stapes", "v1", "eth0") == "stapes:/var/lib/stapes:/tap/v1/eth0"


def test_our_qemu_is_told_by_its_pid_file() -> None:
    cmdline = b"\0".join([b"/usr/bin/qemu-system-x86_64", b"-name", b"guest=v1", b"-pidfile",
                          b"/state/qemu/v1/qemu.pid", b""])
    assert is_our_qemu(cmdline, Path("/state/qemu/v1/qemu.pid"))
    assert not is_our_qemu(cmdline, Path("/other/qemu/v1/qemu.pid"))
    assert not is_our_qemu(b"sleep\0-pidfile\0/state/qemu/v1/qemu.pid\0", Path("/state/qemu/v1/qemu.pid"))


def test_the_kvm_probe() -> None:
    firmware = probe_firmware()
    assert len(firmware) == 65536 and firmware[0xFFF0:0xFFF4] == bytes([0xB0, 0x31, 0xE6, 0xF4])
    args = probe_argv("qemu-system-x86_64", Path("/tmp/p.bin"))
    assert args[args.index("-accel") + 1] == "kvm" and args[args.index("-cpu") + 1] == "host"
    assert parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)") == "10.0.2"


def test_qemu_writes_no_console_log_of_its_own() -> None:
    """QEMU's logfile= grew without bound (a guest flooding its serial port filled the host's disk): the server
    keeps the log; the guest waits (-S) until the server's console connection is there."""
    args = argv(machine(spec()))
    assert not any("logfile" in a for a in args)
    assert "-S" in args


def test_qemu_ids_come_from_indexes_not_device_names() -> None:
    """`nic:1` is a valid device name in Incus and not a valid QEMU id: the VM could not start."""
    nic = {"type": "nic", "network": "n", "name": "eth1"}
    s = spec({"volatile.nic:1.hwaddr": "00:16:3e:00:00:02", "volatile.eth0.hwaddr": "00:16:3e:00:00:01"},
             {"root": ROOT, "eth0": NIC, "nic:1": nic}, {"eth0": "br", "nic:1": "br"})
    args = argv(machine(s))
    netdevs = option(args, "-netdev")
    assert [n.split(",")[1] for n in netdevs] == ["id=net0", "id=net1"]
    for value in (*netdevs, *option(args, "-device"), *option(args, "-blockdev")):
        for part in value.split(","):
            key, _, ident = part.partition("=")
            if key in ("id", "netdev", "node-name", "drive", "file") and not ident.startswith("/"):
                assert all(c.isalnum() or c in "-._" for c in ident), value


def test_files_and_taps_as_descriptors_and_qemu_as_its_user() -> None:
    """QEMU resolves no name in the VM's volume: root.img and qemu.nvram are fd sets, the tap a descriptor; it
    drops root for its user (the sandbox lets it: elevateprivileges=deny kills QEMU at its setuid)."""
    s = spec({"volatile.eth0.hwaddr": "00:16:3e:00:00:01"}, {"root": ROOT, "eth0": NIC}, {"eth0": "br"})
    args = argv(machine(s), fds=Fds({"fw-vars": 11, "root": 12}, {"eth0": 13}), user="stapes-qemu")
    assert option(args, "-add-fd") == ["fd=11,set=1,opaque=fw-vars", "fd=12,set=2,opaque=root"]
    blockdevs = option(args, "-blockdev")
    assert "driver=file,filename=/dev/fdset/1,node-name=fw-vars-file,aio=threads,cache.direct=off" in blockdevs
    assert ("driver=file,filename=/dev/fdset/2,node-name=root-file,aio=threads,cache.direct=on,discard=unmap"
            in blockdevs)
    assert not any("/pool/" in a for a in args)
    assert option(args, "-netdev") == ["tap,id=net0,fd=13,vhost=off"]
    assert option(args, "-run-with") == ["user=stapes-qemu"]
    assert "elevateprivileges=allow" in option(args, "-sandbox")[0]
    assert "elevateprivileges=deny" in option(argv(machine(s)), "-sandbox")[0]
