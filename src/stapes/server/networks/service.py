"""Managed networks: the database rows, their bridges on the host, and who uses them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from stapes.api.config_keys import NETWORK_KEYS, validate_network_config
from stapes.api.devices import expand_devices
from stapes.api.errors import BadRequest, Conflict, NotFound, StapesError
from stapes.api.names import validate_entity_name
from stapes.api.networks import choose_ipv4, choose_ipv6, interface_alias, interface_name, overlaps
from stapes.server.networks.bridge import BridgeDriver, BridgeSpec, host_networks
from stapes.server.networks.hostlock import LOCK_PATH, host_lock
from stapes.server.paths import StatePaths
from stapes.server.store.db import NetworkRow, Store

log = logging.getLogger(__name__)
DEFAULT_NETWORK = "stapesbr0"
NETWORK_TYPES = ("bridge",)


def uses_network(devices: dict[str, dict[str, str]], network: str) -> bool:
    return any(d.get("type") == "nic" and d.get("network") == network for d in devices.values())


class NetworkService:
    def __init__(self, store: Store, paths: StatePaths, driver: BridgeDriver | None = None,
                 host_lock_path: Path = LOCK_PATH) -> None:
        self._store = store
        self._paths = paths
        self._driver = driver or BridgeDriver()
        self._lock = asyncio.Lock()  # one change of the host's networking at a time (subnet choice included)
        self._host_lock_path = host_lock_path

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        """This server's lock, then the host's: from choosing a subnet to the bridge that claims it, no other
        server on the host chooses, so it sees this one's subnet."""
        async with self._lock, host_lock(self._host_lock_path):
            yield

    def interface(self, network: str) -> str:
        return interface_name(self._paths.server_id, network)

    def _spec(self, row: NetworkRow) -> BridgeSpec:
        return BridgeSpec(row.name, self.interface(row.name), interface_alias(str(self._paths.root), row.name),
                          dict(row.config), self._paths.root / "networks" / row.name)

    async def get(self, name: str) -> NetworkRow:
        return await self._store.network(name)

    async def all(self) -> list[NetworkRow]:
        return await self._store.networks()

    async def require(self, network: str, device: str) -> None:
        """A nic's network must exist here; the error names the override that fixes a move or copy."""
        try:
            await self._store.network(network)
        except NotFound:
            names = [row.name for row in await self._store.networks()]
            here = f" (networks here: {', '.join(names)})" if names else " (this server has no network)"
            raise BadRequest(
                f"Network {network!r} of device {device!r} does not exist on this server{here}: create it "
                f"('stapes network create {network}'), or attach the device to an existing one, for a move or "
                f"copy with '-d {device},network=NAME'") from None

    async def used_by(self, name: str) -> list[str]:
        profiles = await self._store.profiles()
        users = [f"/1.0/profiles/{p.name}" for p in profiles if uses_network(p.devices, name)]
        by_name = {p.name: p for p in profiles}
        for row in await self._store.instances():
            devices = expand_devices([by_name[p].devices for p in row.profiles if p in by_name], row.devices)
            if uses_network(devices, name):
                suffix = "" if row.project == "default" else f"?project={row.project}"
                users.append(f"/1.0/instances/{row.name}{suffix}")
        return users

    async def _resolve(self, name: str, config: dict[str, str]) -> dict[str, str]:
        """Defaults filled in and "auto" subnets chosen now; a subnet (chosen or given) never overlaps one the
        host or another network of this server already uses (the network's own bridge aside)."""
        config = {**{k: key.default for k, key in NETWORK_KEYS.items() if key.default and k.startswith("ipv")},
                  **config}
        own = self.interface(name)
        used = [net for net, iface in await asyncio.to_thread(host_networks) if iface != own]
        for row in await self._store.networks():
            if row.name != name:
                spec = self._spec(row)
                used += [a.network for a in (spec.ipv4, spec.ipv6) if a is not None]
        try:
            if config.get("ipv4.address") == "auto":
                config["ipv4.address"] = choose_ipv4([u for u in used if isinstance(u, ipaddress.IPv4Network)])
            if config.get("ipv6.address") == "auto":
                config["ipv6.address"] = choose_ipv6([u for u in used if isinstance(u, ipaddress.IPv6Network)])
        except ValueError as err:
            raise BadRequest(str(err)) from None
        for key in ("ipv4.address", "ipv6.address"):
            if config.get(key, "none") != "none":
                subnet = ipaddress.ip_interface(config[key]).network
                clash = next((u for u in used if overlaps(subnet, [u])), None)
                if clash is not None:
                    raise BadRequest(f"{key} {config[key]} overlaps {clash}, already in use on this host: choose "
                                     f"another subnet, or 'auto'")
        return config

    async def create(self, name: str, network_type: str, config: dict[str, str], description: str = "") -> None:
        validate_entity_name("network", name)
        if network_type not in NETWORK_TYPES:
            raise BadRequest(f"Unknown network type {network_type!r}: Stapes manages {', '.join(NETWORK_TYPES)}")
        validate_network_config(config)
        async with self._changing():
            with contextlib.suppress(NotFound):
                await self._store.network(name)
                raise Conflict(f"Network {name!r} already exists")
            row = NetworkRow(name, network_type, description, await self._resolve(name, config))
            await self._store.create_network(row)
            try:
                await self._driver.start(self._spec(row))
            except BaseException:
                await asyncio.shield(self._undo_create(row))
                raise

    async def _undo_create(self, row: NetworkRow) -> None:
        """The driver already removed a bridge it made and could not finish; what it found made is this
        server's (its mark checked) and goes too, with the network's directory."""
        try:
            await self._driver.remove(self._spec(row))
            await self._remove_directory(row.name)
        finally:
            await self._store.delete_network(row.name)

    async def _remove_directory(self, name: str) -> None:
        """networks/<name>/: dnsmasq's leases, log and PID (the name was checked: no '/' or '..')."""
        await asyncio.to_thread(shutil.rmtree, self._paths.root / "networks" / name, ignore_errors=True)

    async def update(self, name: str, changes: dict[str, str] | None, description: str | None, *,
                     replace: bool) -> None:
        async with self._changing():
            row = await self._store.network(name)
            old = NetworkRow(row.name, row.type, row.description, dict(row.config))
            if changes is not None:
                merged = dict(changes) if replace else {**row.config, **changes}
                config = {k: v for k, v in merged.items() if v != ""}
                validate_network_config(config)
                row.config = await self._resolve(name, config)
            if description is not None:
                row.description = description
            await self._store.update_network(row)
            try:
                await self._driver.start(self._spec(row))
            except BaseException:
                await asyncio.shield(self._undo_update(old))
                raise

    async def _undo_update(self, old: NetworkRow) -> None:
        """The row and the bridge as they were, even when the change was cancelled half-way."""
        await self._store.update_network(old)
        with contextlib.suppress(StapesError):
            await self._driver.start(self._spec(old))

    async def delete(self, name: str) -> None:
        async with self._lock:
            row = await self._store.network(name)
            users = await self.used_by(name)
            if users:
                raise BadRequest(f"Network {name!r} is in use by {', '.join(users)}: remove its nic devices, or "
                                 "attach them to another network, first")
            await self._driver.remove(self._spec(row))
            await self._store.delete_network(name)
            await self._remove_directory(name)

    async def state(self, name: str) -> dict[str, Any]:
        return await self._driver.state(self._spec(await self._store.network(name)))

    async def leases(self, name: str) -> list[dict[str, str]]:
        """dnsmasq keeps a lease until it expires, whoever held it: only those of instances that still exist
        (by their nics' MAC addresses) are listed, as Incus lists its instances' leases."""
        leases = await self._driver.leases(self._spec(await self._store.network(name)))
        macs = {value.lower() for row in await self._store.instances() for key, value in row.config.items()
                if key.startswith("volatile.") and key.endswith(".hwaddr")}
        return [lease for lease in leases if lease["hwaddr"].lower() in macs]

    async def start_all(self) -> None:
        """At daemon start: every network's bridge (kept from before, or made again) and its dnsmasq."""
        for row in await self._store.networks():
            if self._driver.serving(row.name):
                continue  # made moments ago (the first start's default network)
            try:
                await self._driver.start(self._spec(row))
            except Exception as err:  # one broken network never keeps the server down
                log.warning("could not start network %s: %s", row.name, err)

    async def shutdown(self) -> None:
        """dnsmasq stops with the daemon; bridges stay, so running containers keep their network."""
        await self._driver.stop_all()

    def render(self, row: NetworkRow, used_by: list[str]) -> dict[str, Any]:
        return {"name": row.name, "type": row.type, "description": row.description, "config": row.config,
                "managed": True, "status": "Created", "locations": ["none"], "used_by": used_by,
                "project": "default", "interface": self.interface(row.name)}
