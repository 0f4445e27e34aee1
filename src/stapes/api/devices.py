"""Device validation: which device types exist and which keys each takes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from stapes.api.errors import BadRequest
from stapes.api.names import validate_entity_name
from stapes.api.networks import check_interface_name, check_mac

Devices = dict[str, dict[str, str]]

_DEVICE_KEYS: dict[str, dict[str, bool]] = {
    # key -> required
    "disk": {"path": True, "source": False, "pool": False, "readonly": False, "size": False},
    "nic": {"network": False, "nictype": False, "parent": False, "name": False, "hwaddr": False, "mtu": False,
            "host_name": False},
    "none": {},
}
NIC_TYPES = ("bridged",)


def check_device_name(name: str) -> None:
    """Entity rules (no '/', '\\', spaces or control characters) and no leading dot: '.' and '..' could
    otherwise reach a path. (The LXC driver never uses a device name as a path part either.)"""
    if (not name or len(name) > 64 or name.startswith(".") or "/" in name or "\\" in name
            or any(ord(c) < 33 or c == "\x7f" for c in name)):
        raise BadRequest(f"Invalid device name {name!r}: 1 to 64 characters, not starting with '.', without '/', "
                         "'\\', spaces or control characters")


def validate_devices(devices: Mapping[str, Mapping[str, str]]) -> None:
    for name, device in devices.items():
        check_device_name(name)
        kind = device.get("type", "")
        allowed = _DEVICE_KEYS.get(kind)
        if allowed is None:
            raise BadRequest(
                f"Invalid device {name!r}: unsupported type {kind!r}; supported types are "
                + ", ".join(sorted(_DEVICE_KEYS))
            )
        for key, value in device.items():
            if key != "type" and key not in allowed and not key.startswith("user."):
                raise BadRequest(f"Invalid device {name!r}: unknown key {key!r} for a {kind} device")
            if not isinstance(value, str) or any(ord(c) < 32 or c == "\x7f" for c in value):
                raise BadRequest(f"Invalid device {name!r}: the value of {key!r} must be a string without control "
                                 "characters (newlines, tabs)")
        for key, required in allowed.items():
            if required and not device.get(key):
                raise BadRequest(f"Invalid device {name!r}: a {kind} device needs {key!r}")
        if kind == "disk":
            _validate_disk(name, device)
        elif kind == "nic":
            _validate_nic(name, device)
    names = [dev.get("name") or name for name, dev in devices.items() if dev.get("type") == "nic"]
    if len(set(names)) != len(names):
        raise BadRequest("Two nic devices have the same interface name inside the instance: give one another "
                         "'name'")


def _validate_disk(name: str, device: Mapping[str, str]) -> None:
    path = device["path"]
    if not path.startswith("/"):
        raise BadRequest(f"Invalid device {name!r}: path {path!r} must be absolute")
    if path == "/":
        if device.get("source"):
            raise BadRequest(f"Invalid device {name!r}: the root disk takes a pool, not a source")
    elif not device.get("source"):
        raise BadRequest(f"Invalid device {name!r}: a disk other than the root disk needs a host 'source' path, "
                         "or a 'pool' and the custom volume's name as 'source'")
    elif device.get("pool"):  # a custom storage volume (stapes storage volume attach)
        try:
            validate_entity_name("storage volume", device["source"])
        except BadRequest as err:
            raise BadRequest(f"Invalid device {name!r}: {err.message}") from None


def _validate_nic(name: str, device: Mapping[str, str]) -> None:
    """Incus's two ways: `network=NAME` (a managed network here), or `nictype=bridged` with a host `parent`."""
    if device.get("network"):
        if device.get("nictype") or device.get("parent"):
            raise BadRequest(f"Invalid device {name!r}: a nic on a managed network takes no 'nictype' or 'parent' "
                             "(the network says which bridge)")
    elif device.get("nictype") not in NIC_TYPES:
        raise BadRequest(f"Invalid device {name!r}: a nic needs a managed 'network', or nictype=bridged with a "
                         "host bridge as 'parent'")
    elif not device.get("parent"):
        raise BadRequest(f"Invalid device {name!r}: a bridged nic needs the host bridge as 'parent'")
    try:
        for key in ("name", "parent", "host_name"):
            if device.get(key):
                check_interface_name(device[key])
        if device.get("hwaddr"):
            check_mac(device["hwaddr"])
        if device.get("mtu"):
            mtu = device["mtu"]
            if not mtu.isdigit() or not 1280 <= int(mtu) <= 9000:
                raise ValueError(f"mtu {mtu!r} must be a number between 1280 and 9000")
    except ValueError as err:
        raise BadRequest(f"Invalid device {name!r}: {err}") from None


def nic_devices(devices: Mapping[str, Mapping[str, str]]) -> dict[str, Mapping[str, str]]:
    return {name: dev for name, dev in sorted(devices.items()) if dev.get("type") == "nic"}


def expand_devices(profile_devices: Sequence[Mapping[str, Mapping[str, str]]], local: Devices) -> Devices:
    """Profiles apply in order, then the instance's own devices; a later device of the same name wins."""
    expanded: Devices = {}
    for devices in profile_devices:
        expanded.update({name: dict(dev) for name, dev in devices.items()})
    expanded.update({name: dict(dev) for name, dev in local.items()})
    return {name: dev for name, dev in expanded.items() if dev.get("type") != "none"}


def volume_disks(devices: Mapping[str, Mapping[str, str]]) -> dict[str, Mapping[str, str]]:
    """The disks that attach a custom storage volume: `pool` plus the volume's name as `source`."""
    return {name: dev for name, dev in sorted(devices.items())
            if dev.get("type") == "disk" and dev.get("path") != "/" and dev.get("pool") and dev.get("source")}


def root_disk(devices: Mapping[str, Mapping[str, str]]) -> tuple[str, Mapping[str, str]] | None:
    for name, device in devices.items():
        if device.get("type") == "disk" and device.get("path") == "/":
            return name, device
    return None
