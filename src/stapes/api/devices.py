"""Device validation: which device types exist and which keys each takes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from stapes.api.errors import BadRequest

Devices = dict[str, dict[str, str]]

_DEVICE_KEYS: dict[str, dict[str, bool]] = {
    # key -> required
    "disk": {"path": True, "source": False, "pool": False, "readonly": False, "size": False},
    "none": {},
}


def validate_devices(devices: Mapping[str, Mapping[str, str]]) -> None:
    for name, device in devices.items():
        kind = device.get("type", "")
        allowed = _DEVICE_KEYS.get(kind)
        if allowed is None:
            raise BadRequest(
                f"Invalid device {name!r}: unsupported type {kind!r}; supported types are "
                + ", ".join(sorted(_DEVICE_KEYS))
            )
        for key in device:
            if key != "type" and key not in allowed and not key.startswith("user."):
                raise BadRequest(f"Invalid device {name!r}: unknown key {key!r} for a {kind} device")
        for key, required in allowed.items():
            if required and not device.get(key):
                raise BadRequest(f"Invalid device {name!r}: a {kind} device needs {key!r}")
        if kind == "disk":
            _validate_disk(name, device)


def _validate_disk(name: str, device: Mapping[str, str]) -> None:
    path = device["path"]
    if not path.startswith("/"):
        raise BadRequest(f"Invalid device {name!r}: path {path!r} must be absolute")
    if path == "/":
        if device.get("source"):
            raise BadRequest(f"Invalid device {name!r}: the root disk takes a pool, not a source")
    elif not device.get("source"):
        raise BadRequest(f"Invalid device {name!r}: a disk other than the root disk needs a host 'source' path")


def expand_devices(profile_devices: Sequence[Mapping[str, Mapping[str, str]]], local: Devices) -> Devices:
    """Profiles apply in order, then the instance's own devices; a later device of the same name wins."""
    expanded: Devices = {}
    for devices in profile_devices:
        expanded.update({name: dict(dev) for name, dev in devices.items()})
    expanded.update({name: dict(dev) for name, dev in local.items()})
    return {name: dev for name, dev in expanded.items() if dev.get("type") != "none"}


def root_disk(devices: Mapping[str, Mapping[str, str]]) -> tuple[str, Mapping[str, str]] | None:
    for name, device in devices.items():
        if device.get("type") == "disk" and device.get("path") == "/":
            return name, device
    return None
