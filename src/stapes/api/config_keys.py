"""The table of known configuration keys, each with its check, validated generically.

Instance and server configuration are plain string maps, as in Incus. A key outside the table is refused,
except the free-form namespaces (`user.*`, `environment.*`, `image.*`, `volatile.*` on instances).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from stapes.api.errors import BadRequest
from stapes.api.networks import check_mac, parse_ipv4_cidr, parse_ipv6_cidr

Check = Callable[[str], None]

_SIZE = re.compile(r"^(\d+)\s*(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$")
_SIZE_FACTORS = {
    None: 1, "B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
_CPU_SET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_size(value: str) -> int:
    """'256MiB' -> bytes; the units Incus accepts."""
    match = _SIZE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a size: use a number with an optional unit such as 256MiB or 1GB")
    return int(match.group(1)) * _SIZE_FACTORS[match.group(2)]


def check_bool(value: str) -> None:
    if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off", ""):
        raise ValueError(f"{value!r} is not a boolean: use true or false")


def is_true(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1", "yes", "on")


def check_int(low: int, high: int) -> Check:
    def check(value: str) -> None:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
        if not low <= number <= high:
            raise ValueError(f"{number} is out of range: it must be between {low} and {high}")

    return check


def check_memory(value: str) -> None:
    if value.endswith("%"):
        check_int(1, 100)(value[:-1])
        return
    if parse_size(value) < 4 * 2**20:
        raise ValueError(f"{value!r} is too small: a container needs at least 4MiB")


def check_cpu(value: str) -> None:
    """A count of CPUs ('2') or an explicit set ('0-1', '0,2')."""
    if value.isdigit():
        if int(value) < 1:
            raise ValueError("limits.cpu must be at least 1")
        return
    if not _CPU_SET.match(value):
        raise ValueError(f"{value!r} is not a CPU count or a CPU set such as 0-1 or 0,2")


def check_address(value: str) -> None:
    """host:port, [v6]:port or empty (not listening)."""
    if not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not an address: use HOST:PORT, such as 127.0.0.1:8443")


def check_any(value: str) -> None:
    """Free-form value."""


@dataclass(frozen=True)
class Key:
    check: Check
    help: str
    default: str = ""


INSTANCE_KEYS: dict[str, Key] = {
    "limits.cpu": Key(check_cpu, "Number of CPUs, or a CPU set, the instance may use"),
    "limits.memory": Key(check_memory, "Memory limit, as a size (256MiB) or a share of the host (50%)"),
    "limits.processes": Key(check_int(1, 2**31), "Maximum number of processes"),
    "boot.autostart": Key(check_bool, "Start the instance when the server starts", "false"),
    "raw.lxc": Key(check_any, "Extra LXC configuration lines, appended as they are"),
    "security.privileged": Key(check_bool, "Run the container without a user namespace: root inside is root "
                               "on the host (off by default)", "false"),
    "migration.stateful": Key(check_bool, "Move the instance live, with its running state", "false"),
    "migration.incremental.memory": Key(check_bool, "Use CRIU memory pre-copy for live moves", "false"),
    # A VM's live-move policy: each value checked in full by the VM driver (server/instances/qemu_policy.py).
    "migration.bandwidth": Key(check_any, "VM live move: QEMU's bandwidth cap per second", "1GiB"),
    "migration.downtime": Key(check_int(1, 60000), "VM live move: the largest allowed downtime, ms", "500"),
    "migration.downtime.steps": Key(check_int(1, 100), "VM live move: raises of the allowed downtime", "5"),
    "migration.downtime.delay": Key(check_any, "VM live move: seconds per GiB between two raises", "4"),
    "migration.timeout": Key(check_any, "VM live move: seconds per GiB of memory + disk (0: none)", "60"),
    "migration.stall_timeout": Key(check_any, "VM live move: seconds without progress (0: never)", "20"),
    "migration.timeout_action": Key(check_any, "VM live move: abort, postcopy or auto-converge", "abort"),
    "migration.incremental.memory.goal": Key(check_int(1, 100), "Pre-copy goal, in percent synced", "70"),
    "migration.incremental.memory.iterations": Key(check_int(1, 999), "Pre-copy rounds at most", "10"),
    "migration.lazy": Key(check_bool, "Live moves: restore at once, memory on demand after (CRIU lazy pages; a "
                          "link lost before all memory arrived loses the instance)", "false"),
}
# Incus keys that only tune what Stapes does not do (snapshot schedules, boot ordering, first-boot data):
# kept as they are, without effect here, so an instance moved from Incus and back keeps them. Keys that
# change how a container runs (security.*, linux.*, other limits.*) are refused instead: silently not
# applying them would run the container differently from what its owner asked.
INERT_INCUS_KEYS: dict[str, Key] = {
    "snapshots.schedule": Key(check_any, "Incus: snapshot schedule (kept, not acted on by Stapes)"),
    "snapshots.schedule.stopped": Key(check_bool, "Incus: snapshot stopped instances too (kept, no effect)"),
    "snapshots.pattern": Key(check_any, "Incus: name pattern of scheduled snapshots (kept, no effect)"),
    "snapshots.expiry": Key(check_any, "Incus: lifetime of scheduled snapshots (kept, no effect)"),
    "boot.autostart.delay": Key(check_int(0, 2**31), "Incus: seconds to wait after autostart (kept, no effect)"),
    "boot.autostart.priority": Key(check_int(-(2**31), 2**31), "Incus: autostart order (kept, no effect)"),
    "boot.stop.priority": Key(check_int(-(2**31), 2**31), "Incus: shutdown order (kept, no effect)"),
    "boot.host_shutdown_timeout": Key(check_int(0, 2**31), "Incus: shutdown wait (kept, no effect)"),
}
INSTANCE_NAMESPACES = ("user.", "environment.", "image.", "volatile.", "cloud-init.")

_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def check_domain(value: str) -> None:
    if not _DOMAIN.match(value) or len(value) > 253:
        raise ValueError(f"{value!r} is not a DNS domain: use lower-case labels such as stapes or lab.example")


def check_mtu(value: str) -> None:
    check_int(1280, 9000)(value)


def _check_cidr(parse: Callable[[str], object]) -> Check:
    def check(value: str) -> None:
        if value not in ("auto", "none"):
            parse(value)

    return check


# Managed bridge networks: Incus's key names and meanings. "auto" picks a subnet unused on the host when the
# network is created (the chosen one is then stored); "none" turns that family off.
NETWORK_KEYS: dict[str, Key] = {
    "ipv4.address": Key(_check_cidr(parse_ipv4_cidr), "Gateway address and prefix (10.1.2.1/24), auto or none", "auto"),
    "ipv4.nat": Key(check_bool, "Masquerade IPv4 traffic leaving the subnet", "true"),
    "ipv4.dhcp": Key(check_bool, "Hand out IPv4 addresses by DHCP", "true"),
    "ipv6.address": Key(_check_cidr(parse_ipv6_cidr), "Gateway address and /64 (fd42:1:2:3::1/64), auto or none",
                        "auto"),
    "ipv6.nat": Key(check_bool, "Masquerade IPv6 traffic leaving the subnet", "true"),
    "dns.domain": Key(check_domain, "Domain of the instances' names in the network's DNS", "stapes"),
    "bridge.mtu": Key(check_mtu, "MTU of the bridge", "1500"),
}
NETWORK_NAMESPACES = ("user.",)

SERVER_KEYS: dict[str, Key] = {
    "core.https_address": Key(check_address, "Address to listen on for HTTPS (HOST:PORT); empty: none"),
    "core.remote_token_expiry": Key(check_int(0, 10**9), "Lifetime of trust tokens in seconds (0: none)", "86400"),
}
SERVER_NAMESPACES = ("user.",)


# Keys inside a free-form namespace whose values still reach a tool (a nic's MAC goes into LXC's config).
PATTERN_KEYS: tuple[tuple[re.Pattern[str], Check], ...] = (
    (re.compile(r"^volatile\.[^.]+\.hwaddr$"), check_mac),
    (re.compile(r"^volatile\.uuid$"), lambda value: _check_uuid(value)),  # a VM's SMBIOS UUID: QEMU's -uuid
)


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_uuid(text: str) -> bool:
    """A UUID in its canonical form (8-4-4-4-12 hexadecimal digits)."""
    return _UUID.fullmatch(text) is not None


def _check_uuid(value: str) -> None:
    """A UUID in its canonical form (8-4-4-4-12 hexadecimal digits), as QEMU's -uuid takes it; empty: unset."""
    if value and not is_uuid(value):
        raise ValueError("a UUID is written as 8-4-4-4-12 hexadecimal digits, e.g. "
                         "0b6a1b0e-5d1c-4f5e-9a43-6f1f2b3c4d5e")


def validate_config(
    config: Mapping[str, str], keys: Mapping[str, Key], namespaces: tuple[str, ...], what: str, hint: str = ""
) -> None:
    for key, value in config.items():
        if not isinstance(value, str):
            raise BadRequest(f"Invalid value for {what} key {key!r}: values are strings, got {value!r}")
        spec = keys.get(key)
        if spec is None:
            if key.startswith(namespaces):
                for pattern, check in PATTERN_KEYS:
                    if pattern.match(key):
                        try:
                            check(value)
                        except ValueError as err:
                            raise BadRequest(f"Invalid value for {what} key {key!r}: {err}") from None
                continue
            known = ", ".join(sorted(keys))
            free = ", ".join(f"{n}*" for n in namespaces)
            raise BadRequest(f"Unknown {what} key {key!r}: known keys are {known}, and any key under {free}{hint}")
        try:
            spec.check(value)
        except ValueError as err:
            raise BadRequest(f"Invalid value for {what} key {key!r}: {err}") from None


def validate_instance_config(config: Mapping[str, str]) -> None:
    validate_config(config, {**INSTANCE_KEYS, **INERT_INCUS_KEYS}, INSTANCE_NAMESPACES, "instance configuration",
                    " (an instance coming from Incus: unset the key there first, 'incus config unset NAME KEY')")


def validate_server_config(config: Mapping[str, str]) -> None:
    validate_config(config, SERVER_KEYS, SERVER_NAMESPACES, "server configuration")


def validate_network_config(config: Mapping[str, str]) -> None:
    validate_config(config, NETWORK_KEYS, NETWORK_NAMESPACES, "network configuration")
