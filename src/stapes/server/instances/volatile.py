"""`volatile.*` keys: the state a server records about an instance (its nics' MAC addresses, its id map).
Pure functions: which keys to add, and which of a migration peer's keys to keep."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

from stapes.api.config_keys import is_uuid
from stapes.api.devices import nic_devices
from stapes.api.errors import BadRequest
from stapes.api.networks import check_mac, random_mac
from stapes.server.idmap import IdRange, to_volatile

IDMAP_KEYS = ("volatile.idmap.base", "volatile.idmap.current", "volatile.idmap.next", "volatile.last_state.idmap")
_HWADDR = re.compile(r"^volatile\.([A-Za-z0-9_.-]{1,64})\.hwaddr$")


def missing_volatile(config: Mapping[str, str], devices: Mapping[str, Mapping[str, str]],
                     idmap: tuple[IdRange, ...], *, applying: bool) -> dict[str, str]:
    """Keys to add or change: the instance's UUID (`volatile.uuid`, as Incus records it: a VM's SMBIOS UUID,
    the same wherever the instance moves, so its guest sees one machine), a MAC for every nic that has none
    yet (kept from then on, so DHCP gives the same address), and the id map, as Incus records it: `next` (and
    `base`) is what the next start uses; `current` is what the container runs with, so it changes only when
    the map is applied (`applying`: a create or a start). The files stay unshifted on disk, so
    `last_state.idmap` is always empty."""
    wanted: dict[str, str] = {}
    if not is_uuid(config.get("volatile.uuid", "")):
        wanted["volatile.uuid"] = str(uuid.uuid4())
    for name, device in nic_devices(devices).items():
        key = f"volatile.{name}.hwaddr"
        if not device.get("hwaddr") and not config.get(key):
            wanted[key] = random_mac()
    map_json = to_volatile(list(idmap))
    recorded = {"volatile.idmap.base": str(idmap[0].host) if idmap else "0", "volatile.idmap.next": map_json,
                "volatile.last_state.idmap": "[]"}
    if applying or "volatile.idmap.current" not in config:
        recorded["volatile.idmap.current"] = map_json
    wanted.update({key: value for key, value in recorded.items() if config.get(key) != value})
    return wanted


def kept_from_peer(config: Mapping[str, str], devices: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """A migrated instance's config as this server takes it: its own keys, the base image, and the MAC of each
    of its nics (a moved instance keeps its address where the network hands it out by MAC), and its UUID
    where it is one (another is made at its first start here otherwise). Every other
    volatile key (an id map, a power state, a peer's internals) describes the other server and is dropped."""
    kept: dict[str, str] = {}
    nics = nic_devices(devices)
    for key, value in config.items():
        same_machine = key == "volatile.uuid" and is_uuid(value)  # (a copy comes without one)
        if not key.startswith("volatile.") or key == "volatile.base_image" or same_machine:
            kept[key] = value
        elif (match := _HWADDR.match(key)) and match.group(1) in nics:
            try:
                check_mac(value)
            except ValueError as err:
                raise BadRequest(f"Invalid {key}: {err}") from None
            kept[key] = value
    return kept

