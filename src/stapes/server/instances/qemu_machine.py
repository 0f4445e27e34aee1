"""What a QEMU virtual machine is made of, and the command line that makes it (pure: unit-tested).

`Machine` is the whole device configuration: machine type, accelerator, CPU model and topology, memory,
firmware, disks, nics and the host ends of its character devices. It is recorded as JSON when the machine
starts (the record a live move's target needs: QEMU accepts a migration stream only into a machine built
exactly like the source's, as Incus records `volatile.vm.boot_state`), and `argv` turns it into QEMU's
arguments. Nothing here touches the host.

The runtime directory of a machine (root's alone, 0700) holds the sockets QEMU serves:
`qmp.sock` (QMP), `console.sock` (the serial console; the server holds a connection to it for as long as the
machine runs and keeps a bounded `console.log` of it: qemu_console.py), `agent.sock` (the virtio-serial port
`org.stapes.agent` that the guest agent reads), and `qemu.pid` (QEMU holds a write lock on it).

QEMU resolves no name in a directory a migration peer wrote: the server opens the disks and the UEFI variables
itself (O_NOFOLLOW) and hands QEMU the descriptors (`-add-fd`, `/dev/fdset/N`), and opens the taps itself
(`-netdev tap,fd=N`): `Fds` says which descriptor is which. QEMU's own ids come from indexes, never from
device names (a name valid in Incus, as `nic:1`, is not a valid QEMU id).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stapes.api.config_keys import is_true, parse_size
from stapes.api.errors import BadRequest
from stapes.server.instances.driver import InstanceSpec

QMP_SOCKET = "qmp.sock"
CONSOLE_SOCKET = "console.sock"
CONSOLE_LOG = "console.log"
AGENT_SOCKET = "agent.sock"
PID_FILE = "qemu.pid"
QEMU_LOG = "qemu.log"
AGENT_PORT = "org.stapes.agent"
ROOT_NODE = "root"  # the root disk's block node (a live move mirrors it by this name)

# QEMU's seccomp filter: no obsolete system calls, no setuid/setgid, no fork or exec, no scheduler or
# affinity changes. (`-daemonize` forks after the filter is set, so QEMU runs in the foreground, in a session
# of its own, instead: `elevateprivileges=deny` and `spawn=deny` make a daemonizing QEMU exit with status 1.)
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
FW_VARS_NODE = "fw-vars"


@dataclass(frozen=True)
class Fds:
    """The descriptors the server opened for QEMU (their numbers in QEMU's process): each file by its block
    node (`fw-vars`, `root`, ...), each tap by its nic's name. A machine recorded without them names files and
    taps (what `running.json` shows a reader)."""

    files: Mapping[str, int] = field(default_factory=dict)
    taps: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Disk:
    name: str  # the device's name in the instance (root)
    path: str  # a raw image file
    direct: bool = True  # O_DIRECT (cache=none): the host's page cache stays out; off where the file system lacks it
    readonly: bool = False
    boot_index: int | None = None


@dataclass(frozen=True)
class Nic:
    name: str  # the nic device's name in the instance (eth0)
    tap: str  # the host's tap interface, on the bridge
    bridge: str
    mac: str
    mtu: int | None = None


@dataclass(frozen=True)
class Machine:
    name: str  # shown in `ps` and QEMU's own messages
    uuid: str
    runtime: str  # the runtime directory: sockets, pid file, console log
    accel: str  # kvm or tcg
    cpu_model: str
    cpus: int
    memory_mib: int
    firmware_code: str  # OVMF's code, read-only
    firmware_vars: str  # this machine's copy of OVMF's variables
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    machine_type: str = "q35"
    extra: tuple[str, ...] = field(default=())  # arguments appended as they are (a live move's -incoming)

    def path(self, name: str) -> str:
        return f"{self.runtime}/{name}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Machine:
        fields = dict(data)
        fields["disks"] = tuple(Disk(**d) for d in data.get("disks", ()))
        fields["nics"] = tuple(Nic(**n) for n in data.get("nics", ()))
        fields["extra"] = tuple(data.get("extra", ()))
        return cls(**fields)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"


def _options(*parts: str, **options: str | int | None) -> str:
    """QEMU's `key=value,...` option syntax (keys as QEMU spells them; None: left out); commas inside a value
    are doubled, as QEMU reads them."""
    items = list(parts)
    for key, value in options.items():
        if value is None:
            continue
        text = str(value).replace(",", ",,")
        items.append(f"{key}={text}")
    return ",".join(items)


def _blockdev(node: str, path: str, *, readonly: bool, direct: bool, discard: bool) -> list[str]:
    """A raw image as two block nodes: the file (`<node>-file`) and the raw format on it (`<node>`); `path` may
    be an fd set (`/dev/fdset/N`)."""
    cache = {"cache.direct": "on" if direct else "off"}
    extra: dict[str, str] = {"discard": "unmap"} if discard else {}
    ro = {"read-only": "on" if readonly else None}
    file_node = _options("driver=file", filename=path, **{"node-name": f"{node}-file"}, **ro, aio="threads",
                         **cache, **extra)
    raw_node = _options("driver=raw", file=f"{node}-file", **{"node-name": node}, **ro, **cache, **extra)
    return ["-blockdev", file_node, "-blockdev", raw_node]


def disk_node(index: int, disk: Disk) -> str:
    """A disk's block node: `root` for the root disk (a live move mirrors it by this name), else by index."""
    return ROOT_NODE if disk.name == "root" else f"disk{index}"


def argv(machine: Machine, binary: str = "qemu-system-x86_64", fds: Fds | None = None,
         user: str | None = None) -> list[str]:
    """QEMU's command line for `machine`: nothing from QEMU's own defaults or configuration files, no
    display, UEFI from pflash, a QMP socket, the serial console and the agent's port on sockets, one
    virtio-blk disk per disk and one virtio-net per nic on its tap. With `fds`, the files and taps are the
    descriptors the server opened; with `user`, QEMU drops root for that user once it opened everything. The
    guest's CPUs wait (-S) until the server, its console attached, says `cont`."""
    m = machine
    sandbox = SANDBOX if user is None else SANDBOX.replace("elevateprivileges=deny", "elevateprivileges=allow")
    args = [
        binary, "-name", _options(guest=m.name, **{"debug-threads": "on"}), "-uuid", m.uuid,
        "-nodefaults", "-no-user-config", "-display", "none", "-sandbox", sandbox,
    ]
    if user is not None:
        args += ["-run-with", _options(user=user)]
    args += [
        "-machine", _options(m.machine_type, pflash0="fw-code", pflash1=FW_VARS_NODE),
        "-accel", m.accel, "-cpu", m.cpu_model,
        "-smp", _options(str(m.cpus), sockets=1, cores=m.cpus, threads=1),
        "-m", f"{m.memory_mib}M",
        # A guest's reboot resets the machine; its poweroff ends QEMU (the instance is then Stopped).
        "-action", "reboot=reset,shutdown=poweroff",
        "-boot", "strict=on", "-S",
        "-pidfile", m.path(PID_FILE),
        "-chardev", _options("socket", id="qmp", path=m.path(QMP_SOCKET), server="on", wait="off"),
        "-mon", "chardev=qmp,mode=control",
        # No logfile=: QEMU would write everything the guest prints, without bound (the server keeps the log).
        "-chardev", _options("socket", id="console", path=m.path(CONSOLE_SOCKET), server="on", wait="off"),
        "-serial", "chardev:console",
        "-device", "virtio-serial-pci,id=virtio-serial0",
        "-chardev", _options("socket", id="agent", path=m.path(AGENT_SOCKET), server="on", wait="off"),
        "-device", _options("virtserialport", bus="virtio-serial0.0", chardev="agent", name=AGENT_PORT),
        "-device", "virtio-rng-pci,id=rng0",
    ]
    fdsets: dict[str, int] = {}

    def file(node: str, path: str) -> str:
        if fds is None or node not in fds.files:
            return path
        fdsets[node] = len(fdsets) + 1
        args.extend(["-add-fd", _options(fd=fds.files[node], set=fdsets[node], opaque=node)])
        return f"/dev/fdset/{fdsets[node]}"

    args += _blockdev("fw-code", m.firmware_code, readonly=True, direct=False, discard=False)
    args += _blockdev(FW_VARS_NODE, file(FW_VARS_NODE, m.firmware_vars), readonly=False, direct=False,
                      discard=False)
    for index, disk in enumerate(m.disks):
        node = disk_node(index, disk)
        args += _blockdev(node, file(node, disk.path), readonly=disk.readonly, direct=disk.direct,
                          discard=not disk.readonly)
        args += ["-device", _options("virtio-blk-pci", drive=node, id=f"dev-{node}", bootindex=disk.boot_index)]
    for index, nic in enumerate(m.nics):
        netdev = f"net{index}"
        if fds is not None and nic.name in fds.taps:
            tap = _options("tap", id=netdev, fd=fds.taps[nic.name], vhost="off")
        else:
            tap = _options("tap", id=netdev, ifname=nic.tap, script="no", downscript="no", vhost="off")
        args += ["-netdev", tap]
        # romfile= (none): no iPXE, so OVMF never tries to boot from the network before the disk.
        args += ["-device", _options("virtio-net-pci", netdev=netdev, id=f"dev-{netdev}", mac=nic.mac,
                                     host_mtu=nic.mtu, romfile="")]
    return [*args, *m.extra]


# What a VM's instance may say, and what it gets by default. 256 MiB (Incus's default is 1 GiB): a test
# host here has 2 cores and runs guests under TCG, several at once; a tiny guest needs far less, a Debian
# guest boots in it; set limits.memory for more.
DEFAULT_MEMORY_MIB = 256
MIN_MEMORY_MIB = 128  # OVMF and a kernel
DEFAULT_CPUS = 1
MAX_CPUS = 64
CPU_MODELS = {"kvm": "host", "tcg": "max"}  # TCG's `max`: every feature it emulates (it boots fastest here)
SUPPORTED_KEYS = ("limits.cpu (a count of virtual CPUs)", "limits.memory (a size, or a share of the host as 50%)",
                  "boot.autostart", "migration.stateful",
                  "migration.* (the live move's policy: docs/vm.md)", "user.*", "environment.*", "image.*",
                  "cloud-init.*")
# Container keys a VM refuses when they would change anything (set, or true for the switches).
CONTAINER_ONLY_KEYS = ("raw.lxc", "limits.processes")
CONTAINER_ONLY_SWITCHES = ("security.privileged", "migration.incremental.memory", "migration.lazy")
SUPPORTED_DEVICES = "its root disk (path '/', on a pool) and nic devices (on a managed network or a bridge)"


def memory_mib(value: str | None, host_memory: int) -> int:
    """limits.memory as MiB for QEMU's -m: a size, or a share of the host's memory (`host_memory` bytes)."""
    if not value:
        return DEFAULT_MEMORY_MIB
    size = host_memory * int(value[:-1]) // 100 if value.endswith("%") else parse_size(value)
    return size >> 20


def check_instance(config: Mapping[str, str], devices: Mapping[str, Mapping[str, str]]) -> None:
    """Refuses what a VM here cannot do (expanded config and devices), saying what it can (pure)."""
    for key in CONTAINER_ONLY_KEYS + CONTAINER_ONLY_SWITCHES:
        value = config.get(key)
        if value if key in CONTAINER_ONLY_KEYS else is_true(value):
            raise BadRequest(f"{key} applies to containers only; a virtual machine takes "
                             f"{', '.join(SUPPORTED_KEYS)}")
    from stapes.server.instances.qemu_policy import check_config
    check_config(config)  # the live move's policy keys
    cpu = config.get("limits.cpu", "")
    if cpu and (not cpu.isdigit() or not 1 <= int(cpu) <= MAX_CPUS):
        raise BadRequest(f"limits.cpu {cpu!r}: a virtual machine takes a count of virtual CPUs from 1 to {MAX_CPUS} "
                         "(pinning to host CPUs, as 0-1, is not supported for VMs)")
    memory = config.get("limits.memory", "")
    if memory and not memory.endswith("%") and parse_size(memory) >> 20 < MIN_MEMORY_MIB:
        raise BadRequest(f"limits.memory {memory!r} is below the {MIN_MEMORY_MIB}MiB a virtual machine needs "
                         "(UEFI and a kernel)")
    for name, device in sorted(devices.items()):
        kind = device.get("type")
        if kind == "nic" or (kind == "disk" and device.get("path") == "/"):
            continue
        raise BadRequest(f"Device {name!r} ({kind} at {device.get('path', '')!r}) is not supported for a virtual "
                         f"machine: it takes {SUPPORTED_DEVICES}")


def check_spec(spec: InstanceSpec) -> None:
    try:
        check_instance(spec.config, spec.devices)
    except BadRequest as err:
        raise BadRequest(f"Virtual machine {spec.name!r}: {err.message}") from None
    for name, device in sorted(spec.devices.items()):
        if device.get("type") == "nic" and name not in spec.nics:
            raise BadRequest(f"Virtual machine {spec.name!r}: nic {name!r} has no bridge on this server")


def machine_from_spec(spec: InstanceSpec, *, accel: str, runtime: Path, uuid: str, firmware_code: Path,
                      nvram: Path, direct: bool, tap: Callable[[str], str], host_memory: int | None = None
                      ) -> Machine:
    """The machine an instance describes (pure, but for /proc/meminfo when limits.memory is a share and
    `host_memory` is not given): checked first (check_spec)."""
    check_spec(spec)
    memory_value = spec.config.get("limits.memory")
    if memory_value and memory_value.endswith("%") and host_memory is None:
        host_memory = _host_memory()
    memory = memory_mib(memory_value, host_memory or 0)
    if memory < MIN_MEMORY_MIB:
        raise BadRequest(f"Virtual machine {spec.name!r}: limits.memory {memory_value!r} is below the "
                         f"{MIN_MEMORY_MIB}MiB it needs (UEFI and a kernel)")
    cpus = int(spec.config.get("limits.cpu") or DEFAULT_CPUS)
    disks: tuple[Disk, ...] = ()
    if spec.disk is not None:
        disks = (Disk("root", str(spec.disk), direct=direct, boot_index=1),)
    nics = []
    for name, bridge_name in sorted(spec.nics.items()):
        device = spec.devices[name]
        mac = device.get("hwaddr") or spec.config.get(f"volatile.{name}.hwaddr")
        if not mac:
            raise BadRequest(f"Virtual machine {spec.name!r}: nic {name!r} has no MAC address (volatile.{name}.hwaddr "
                             "is not set)")
        mtu = device.get("mtu")
        nics.append(Nic(name, device.get("host_name") or tap(name), bridge_name, mac.lower(),
                        int(mtu) if mtu else None))
    return Machine(name=spec.runtime_name, uuid=uuid, runtime=str(runtime), accel=accel,
                   cpu_model=CPU_MODELS.get(accel, "max"), cpus=cpus, memory_mib=memory,
                   firmware_code=str(firmware_code), firmware_vars=str(nvram), disks=disks, nics=tuple(nics))


def _host_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0
