"""Instances: validation, expansion from profiles, lifecycle, and rollback of half-done creations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from stapes.api.config_keys import is_true, parse_size, validate_instance_config
from stapes.api.devices import Devices, expand_devices, nic_devices, root_disk, validate_devices, volume_disks
from stapes.api.errors import BadRequest, Conflict, NotFound, PreconditionFailed, StapesError
from stapes.api.names import validate_entity_name, validate_instance_name
from stapes.api.requests import check_exec_ids
from stapes.api.status import StatusCode
from stapes.api.timefmt import NEVER, iso
from stapes.server.events import EventHub
from stapes.server.idmap import IdRange, NoAllocation, container_map, ids_from_zero
from stapes.server.images.store import ARCHITECTURE, ImageStore
from stapes.server.instances.driver import ExecRequest, InstanceDriver, InstanceSpec, RuntimeState
from stapes.server.instances.exec_session import run_exec
from stapes.server.instances.hotplug import VolumesHeld
from stapes.server.instances.volatile import kept_from_peer, missing_volatile
from stapes.server.networks.service import NetworkService
from stapes.server.operations import Operation
from stapes.server.storage.base import BLOCK, PoolDriver, Volume
from stapes.server.storage.service import StorageService
from stapes.server.storage.volumes import HELD, IDMAP_LAST, Key, check_idmap_kind, custom_volume, idmap_text
from stapes.server.store.db import InstanceRow, ProfileRow, SnapshotRow, Store

log = logging.getLogger(__name__)
INCOMPLETE = "volatile.incomplete"  # Stapes's own crash marker: never shown, never taken from a client or peer
DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_BLOCK_SIZE = 10 * 2**30  # Incus's default root disk of a VM
MIN_BLOCK_SIZE = 64 * 2**20
EPHEMERAL_POLL = 2.0  # seconds between looks at running ephemeral instances (one lxc-ls, only while any exist)


def _shown(config: dict[str, str]) -> dict[str, str]:
    """What clients see: the crash marker stays inside (an Incus server refuses it, were it copied there)."""
    return {k: v for k, v in config.items() if k != INCOMPLETE}


class InstanceService:
    def __init__(self, store: Store, storage: StorageService, images: ImageStore, events: EventHub,
                 drivers: dict[str, InstanceDriver], networks: NetworkService) -> None:
        self._store = store
        self._networks = networks
        self._host_map: list[IdRange] | NoAllocation | None = None
        self._storage = storage
        self._images = images
        self._events = events
        self._drivers = drivers
        # A lock lives as long as someone holds or waits for it (the waiters keep it referenced), so removing
        # an instance never drops a lock that others still wait on.
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
        # Instances taking part in a migration (either side), with the operation that holds them: anything
        # else that would change them is refused at once, as Incus's operation lock does.
        self._busy: dict[tuple[str, str], str] = {}
        # Called with (project, name, new name) after a rename, (project, name, None) after a delete (backups).
        self.on_removed: list[Callable[[str, str, str | None], Awaitable[None]]] = []
        self._ephemeral_watch: asyncio.Task[None] | None = None
        # Ephemeral instances the watch leaves alone: those restore_power_state has not started yet, and those
        # whose deletion failed (with why; tried again only after they are started again).
        self._restoring: set[tuple[str, str]] = set()
        self._undeletable: dict[tuple[str, str], str] = {}
        # The locks of custom volumes an instance change attaches (storage/volumes.py sets it).
        self.volume_claim: Callable[[list[Key]], contextlib.AbstractAsyncContextManager[None]] = _no_claim

    # lookups and expansion
    def driver(self, instance_type: str) -> InstanceDriver:
        driver = self._drivers.get(instance_type)
        if driver is None:
            supported = ", ".join(sorted(self._drivers))
            raise BadRequest(f"Instance type {instance_type!r} is not supported here yet (supported: {supported})")
        return driver

    async def get(self, project: str, name: str) -> InstanceRow:
        return await self._store.instance(project, name)

    async def profile(self, name: str) -> ProfileRow:
        return await self._store.profile(name)

    async def expand(self, row: InstanceRow, profiles: dict[str, ProfileRow] | None = None
                     ) -> tuple[dict[str, str], Devices]:
        """`profiles`: all profiles, read once by a caller that expands many rows."""
        config: dict[str, str] = {}
        profile_devices = []
        for profile_name in row.profiles:
            profile = await _one(profiles, profile_name, self._store.profile, "Profile")
            config.update(profile.config)
            profile_devices.append(profile.devices)
        config.update(row.config)
        return config, expand_devices(profile_devices, row.devices)

    async def spec(self, row: InstanceRow, profiles: dict[str, ProfileRow] | None = None,
                   pools: dict[str, PoolDriver] | None = None) -> InstanceSpec:
        config, devices = await self.expand(row, profiles)
        root = root_disk(devices)
        if root is None:
            raise BadRequest(f"Instance {row.name!r} has no root disk device: add one with a pool, or a profile")
        pool = await _one(pools, root[1].get("pool", ""), self._storage.driver, "Storage pool")
        nics = {name: dev.get("parent") or self._networks.interface(dev.get("network", ""))
                for name, dev in nic_devices(devices).items()}
        idmap = () if is_true(config.get("security.privileged")) or not self.driver(row.type).id_mapped \
            else tuple(await self._container_map())
        instance_volume = Volume.of(row.type, row.project, row.name)
        volume = pool.volume_path(instance_volume)
        disk = pool.block_path(instance_volume) if instance_volume.content == BLOCK else None
        volumes = {name: (await _one(pools, dev["pool"], self._storage.driver, "Storage pool")).volume_path(
            custom_volume(row.project, dev["source"])) for name, dev in volume_disks(devices).items()}
        return InstanceSpec(row.project, row.name, config, devices, volume, nics, idmap, volumes, disk)

    async def _container_map(self) -> list[IdRange]:
        """Root's subordinate ids, read once (a change to /etc/subuid takes a daemon restart, as for Incus)."""
        if self._host_map is None:
            try:
                self._host_map = await asyncio.to_thread(container_map)
            except NoAllocation as err:
                self._host_map = err
        if isinstance(self._host_map, NoAllocation):
            raise PreconditionFailed(str(self._host_map))
        return self._host_map

    async def unprivileged_status(self) -> str:
        """For `GET /1.0`: whether new containers run unprivileged, and with which ids."""
        try:
            ranges = await self._container_map()
        except PreconditionFailed as err:
            return f"unavailable: {err.message}"
        return f"yes (root inside is host uid {ranges[0].host}, {ranges[0].size} ids)"

    async def _check_networks(self, devices: Mapping[str, Mapping[str, str]]) -> None:
        for name, device in nic_devices(devices).items():
            if device.get("network"):
                await self._networks.require(device["network"], name)

    async def _check_volumes(self, project: str, devices: Mapping[str, Mapping[str, str]],
                             config: Mapping[str, str] | None = None, instance: str = "",
                             record: tuple[IdRange, ...] | None = None) -> None:
        """Disks that attach a custom volume name one this server has (a moved instance's too: Incus's rule),
        last used by an instance of the same kind (`config`'s security.privileged); `record`: the id map the
        instance uses them with from now on (volatile.idmap.last)."""
        for name, device in volume_disks(devices).items():
            try:
                volume = await self._store.volume(device["pool"], project, device["source"])
                if config is not None:
                    check_idmap_kind(volume, is_true(config.get("security.privileged")), name, instance)
                if record is not None and volume.config.get(IDMAP_LAST) != idmap_text(record):
                    volume.config[IDMAP_LAST] = idmap_text(record)
                    await self._store.update_volume(volume)
            except NotFound:
                raise BadRequest(
                    f"Disk device {name!r} attaches storage volume {device['source']!r} of pool {device['pool']!r}, "
                    "which this server lacks: create it, or copy it here first with 'stapes storage volume copy "
                    f"SOURCE:{device['pool']}/{device['source']} {device['pool']}/{device['source']}'") from None

    async def add_volatile(self, row: InstanceRow, *, applying: bool) -> bool:
        """Record what the instance runs with (its nics' MACs, its id map) before it first runs with it;
        `applying`: it is being created or started with it now."""
        config, devices = await self.expand(row)
        idmap = () if is_true(config.get("security.privileged")) or not self.driver(row.type).id_mapped \
            else tuple(await self._container_map())
        missing = missing_volatile(config, devices, idmap, applying=applying)
        row.config.update(missing)
        return bool(missing)

    async def from_peer(self, row: InstanceRow) -> None:
        """An instance arriving by migration keeps its config and MACs, not the other server's volatile state."""
        _, devices = await self.expand(row)
        row.config = kept_from_peer(row.config, devices)
        if row.ephemeral:
            self.watch_ephemeral()

    @contextlib.asynccontextmanager
    async def locked(self, project: str, name: str) -> AsyncIterator[None]:
        lock = self._locks.get((project, name))
        if lock is None:
            lock = self._locks[(project, name)] = asyncio.Lock()
        async with lock:
            yield

    @contextlib.asynccontextmanager
    async def changing(self, project: str, name: str) -> AsyncIterator[None]:
        """The lock for a change, refused at once (not after waiting) while a migration holds the instance."""
        self.check_idle(project, name)
        async with self.locked(project, name):
            self.check_idle(project, name)
            yield

    def mark_busy(self, project: str, name: str, operation: Operation) -> Callable[[], None]:
        """Claim the instance for `operation` (a migration); returns the release. Refused if already claimed."""
        self.check_idle(project, name)
        key = (project, name)
        self._busy[key] = f"operation {operation.id} ({operation.description})"

        def release() -> None:
            if self._busy.get(key, "").startswith(f"operation {operation.id} "):
                del self._busy[key]

        return release

    def check_idle(self, project: str, name: str) -> None:
        holder = self._busy.get((project, name))
        if holder is not None:
            raise Conflict(f"Instance {name!r} is busy: {holder} is running; wait for it to finish, or cancel it "
                           f"with 'stapes operation delete {holder.split()[1]}'")

    # rendering
    async def render(self, row: InstanceRow, *, with_state: bool) -> dict[str, Any]:
        try:
            config, devices = await self.expand(row)
            spec = await self.spec(row)
        except StapesError as err:
            return self._render_broken(row, err)
        state = await self.driver(row.type).state(spec, detail=with_state)
        body = self._render_row(row, config, devices, state.status)
        if state.error:
            body["status_error"] = state.error
        if with_state:
            body["state"] = state.to_json()
            body["snapshots"] = [self.render_snapshot(row, s) for s in await self._store.snapshots(row.project,
                                                                                                  row.name)]
        return body

    def _render_row(self, row: InstanceRow, config: dict[str, str], devices: Devices,
                    status: StatusCode) -> dict[str, Any]:
        return {
            "name": row.name, "project": row.project, "type": row.type, "architecture": row.architecture,
            "description": row.description, "config": _shown(row.config), "devices": row.devices,
            "profiles": row.profiles, "ephemeral": row.ephemeral, "stateful": False,
            "expanded_config": _shown(config), "expanded_devices": devices, "status": status.label,
            "status_code": int(status), "created_at": iso(row.created_at), "last_used_at": iso(row.last_used_at),
            "location": "none",
        }

    async def render_all(self, project: str | None, *, with_state: bool) -> list[dict[str, Any]]:
        """One broken instance (a row that no longer expands) shows with an Error status and its reason; it
        never hides the others."""
        rows = await self._store.instances(project)
        if with_state:
            # Each instance's state may wait on its driver (a VM's guest agent, up to a second): 8 at most at
            # once, in the rows' order.
            limit = asyncio.Semaphore(8)

            async def one(row: InstanceRow) -> dict[str, Any]:
                async with limit:
                    return await self.render(row, with_state=True)

            return list(await asyncio.gather(*(one(row) for row in rows)))
        by_type: defaultdict[str, list[InstanceSpec]] = defaultdict(list)
        specs: dict[tuple[str, str], InstanceSpec | StapesError] = {}
        profiles = {p.name: p for p in await self._store.profiles()}
        pools = await self._storage.drivers()
        for row in rows:
            try:
                spec = await self.spec(row, profiles, pools)
                self.driver(row.type)
            except StapesError as err:
                specs[(row.project, row.name)] = err
                continue
            specs[(row.project, row.name)] = spec
            by_type[row.type].append(spec)
        statuses: dict[str, RuntimeState] = {}
        for instance_type, type_specs in by_type.items():
            statuses.update(await self.driver(instance_type).states(type_specs))
        result = []
        for row in rows:
            found = specs[(row.project, row.name)]
            if isinstance(found, StapesError):
                result.append(self._render_broken(row, found))
                continue
            devices = {name: dict(dev) for name, dev in found.devices.items()}
            state = statuses.get(found.runtime_name, RuntimeState(StatusCode.ERROR, error="its state is unknown"))
            result.append(self._render_row(row, dict(found.config), devices, state.status))
            if state.error:
                result[-1]["status_error"] = state.error
        return result

    def _render_broken(self, row: InstanceRow, err: StapesError) -> dict[str, Any]:
        body = self._render_row(row, dict(row.config), dict(row.devices), StatusCode.ERROR)
        body["state"] = {"status": "Error", "status_code": int(StatusCode.ERROR), "pid": -1, "processes": -1,
                         "memory": {"usage": 0, "usage_peak": 0}, "cpu": {"usage": 0}, "disk": {}, "network": None}
        body["status_error"] = f"{err.message} (fix it with 'stapes config edit', or delete the instance)"
        return body

    # creation
    async def validate_new(self, row: InstanceRow) -> None:
        """Everything checkable before any work starts, so a bad request changes nothing."""
        validate_instance_name(row.name)
        self.driver(row.type)
        await self._store.project(row.project)
        for profile in row.profiles:
            await self._store.profile(profile)
        if len(set(row.profiles)) != len(row.profiles):
            raise BadRequest("A profile is listed twice")
        validate_instance_config(row.config)
        validate_devices(row.devices)
        config, devices = await self.expand(row)
        validate_instance_config(config)
        self.driver(row.type).check_instance(config, devices)
        root = root_disk(devices)
        if root is None:
            raise BadRequest(
                "No root disk device: the instance needs one, from a profile (the default profile has one) or "
                "from '--device root,path=/,pool=POOL'"
            )
        if not root[1].get("pool"):
            raise BadRequest(f"The root disk device {root[0]!r} names no storage pool")
        await self._store.pool(root[1]["pool"])
        await self._check_networks(devices)
        await self._check_volumes(row.project, devices, config, row.name)
        if not is_true(config.get("security.privileged")) and self.driver(row.type).id_mapped:
            await self._container_map()
        with contextlib.suppress(NotFound):
            await self._store.instance(row.project, row.name)
            raise Conflict(f"Instance {row.name!r} already exists in project {row.project!r}")

    async def create(self, row: InstanceRow, image: str | None, op: Operation | None) -> None:
        fingerprint = None
        least = 0
        if image is not None:
            image_row = await self._images.resolve(image)
            check_image_type(image, image_row.type, row.type)
            fingerprint = image_row.fingerprint
            least = await self._images.disk_size(fingerprint) if image_row.type == "virtual-machine" else 0
            for key, value in image_row.properties.items():
                row.config.setdefault(f"image.{key}", value)
            row.config["volatile.base_image"] = fingerprint

        async def fill(volume: Path) -> None:
            if fingerprint is None:  # an empty instance: an empty root filesystem, or a blank disk
                if Volume.of(row.type, row.project, row.name).content != BLOCK:
                    (volume / "rootfs").mkdir(exist_ok=True)
                return
            if op is not None:
                op.update_metadata(progress={"stage": "unpack"})
            await self._images.unpack(fingerprint, volume)

        await self.create_with(row, fill, least_disk=least)

    async def create_with(self, row: InstanceRow, fill: Callable[[Path], Awaitable[None]],
                          finalize: Callable[[], Awaitable[None]] | None = None, *, least_disk: int = 0) -> None:
        """Reserve the name, create and fill the volume, define, finalize; on any failure (or cancellation)
        undo every step taken, so nothing of the instance is left. `least_disk`: a block root disk is at least
        this big (an image's disk), whatever size its device asks for."""
        row.architecture = row.architecture or ARCHITECTURE
        async with self.locked(row.project, row.name):
            await self._create_locked(row, fill, finalize, least_disk)
        self._events.lifecycle("instance-created", f"/1.0/instances/{row.name}", row.project)

    async def _create_locked(self, row: InstanceRow, fill: Callable[[Path], Awaitable[None]],
                             finalize: Callable[[], Awaitable[None]] | None, least_disk: int) -> None:
        await self.validate_new(row)
        await self.add_volatile(row, applying=True)
        row.config[INCOMPLETE] = "true"  # until the end: a server killed half-way cleans up at its next start
        await self._store.create_instance(row)
        volume_created = False
        spec: InstanceSpec | None = None
        try:
            spec = await self.spec(row)
            pool = await self.pool_of(spec)
            instance_volume = Volume.of(row.type, row.project, row.name)
            size = max(root_size(spec.devices), least_disk) if instance_volume.content == BLOCK else None
            volume = await pool.create_volume(instance_volume, size=size)  # a block disk: sparse, all holes
            volume_created = True
            await fill(volume)
            if size is not None:  # an image's (or a peer's) disk may be smaller than the root disk asks for
                current = (await asyncio.to_thread(pool.block_path(instance_volume).stat)).st_size
                if current < size:
                    await pool.resize_block(instance_volume, size)
            driver = self.driver(row.type)
            await asyncio.to_thread(driver.check_volume_layout, volume)
            await asyncio.to_thread(driver.prepare_volume, volume, row.name)
            await driver.define(spec)
            if finalize is not None:
                await finalize()
            # Last: until this row is written, a crash at any step above leaves an instance that the next
            # start removes (and whose operation never reported success, so a move keeps its source).
            del row.config[INCOMPLETE]
            await self._store.update_instance(row)
        except BaseException:
            await asyncio.shield(self._undo_create(row, spec, volume_created))
            raise

    async def _undo_create(self, row: InstanceRow, spec: InstanceSpec | None, volume_created: bool) -> None:
        try:
            if spec is not None:
                await self.driver(row.type).undefine(spec)
                if volume_created:
                    await (await self.pool_of(spec)).delete_volume(Volume.of(row.type, row.project, row.name))
        except Exception:
            log.exception("could not remove the volume of failed instance %s/%s", row.project, row.name)
        await self._store.delete_instance(row.project, row.name)

    async def pool_of(self, spec: InstanceSpec) -> PoolDriver:
        root = root_disk(spec.devices)
        assert root is not None
        return await self._storage.driver(root[1]["pool"])

    # snapshots
    async def snapshots(self, project: str, name: str) -> list[SnapshotRow]:
        await self._store.instance(project, name)
        return await self._store.snapshots(project, name)

    async def snapshot(self, project: str, name: str, snapshot: str) -> SnapshotRow:
        for row in await self.snapshots(project, name):
            if row.name == snapshot:
                return row
        raise NotFound(f"Snapshot {snapshot!r} of instance {name!r} not found")

    def render_snapshot(self, instance: InstanceRow, snap: SnapshotRow) -> dict[str, Any]:
        return {
            "name": snap.name, "description": snap.description, "config": snap.config, "devices": snap.devices,
            "profiles": snap.profiles, "expanded_config": snap.config, "expanded_devices": snap.devices,
            "architecture": instance.architecture, "ephemeral": False, "stateful": False,
            "created_at": iso(snap.created_at), "last_used_at": iso(0), "expires_at": NEVER, "size": -1,
        }

    async def create_snapshot(self, project: str, name: str, snapshot: str | None, description: str = "") -> str:
        async with self.changing(project, name):
            row = await self._store.instance(project, name)
            existing = {s.name for s in await self._store.snapshots(project, name)}
            if not snapshot:
                snapshot = next(f"snap{i}" for i in range(len(existing) + 1) if f"snap{i}" not in existing)
            validate_entity_name("snapshot", snapshot)
            if snapshot in existing:
                raise Conflict(f"Snapshot {snapshot!r} of {name!r} already exists")
            pool = await self.pool_of(await self.spec(row))
            await pool.create_snapshot(Volume.of(row.type, project, name), snapshot)
            try:
                await self._store.create_snapshot(SnapshotRow(
                    project, name, snapshot, description, dict(row.config), dict(row.devices), list(row.profiles),
                    time.time()))
            except BaseException:
                await pool.delete_snapshot(Volume.of(row.type, project, name), snapshot)
                raise
        self._events.lifecycle("instance-snapshot-created", f"/1.0/instances/{name}/snapshots/{snapshot}", project)
        return snapshot

    async def record_snapshot(self, row: SnapshotRow) -> None:
        """A snapshot whose files arrived by migration."""
        await self._store.create_snapshot(row)

    async def delete_snapshot(self, project: str, name: str, snapshot: str) -> None:
        async with self.changing(project, name):
            await self.delete_snapshot_unlocked(project, name, snapshot)

    async def delete_snapshot_unlocked(self, project: str, name: str, snapshot: str) -> None:
        """For callers that already hold the instance's lock."""
        await self.snapshot(project, name, snapshot)
        row = await self._store.instance(project, name)
        pool = await self.pool_of(await self.spec(row))
        await self._store.delete_snapshot(project, name, snapshot)
        await pool.delete_snapshot(Volume.of(row.type, project, name), snapshot)
        self._events.lifecycle("instance-snapshot-deleted", f"/1.0/instances/{name}/snapshots/{snapshot}", project)

    async def rename_snapshot(self, project: str, name: str, snapshot: str, new: str) -> None:
        validate_entity_name("snapshot", new)
        async with self.changing(project, name):
            await self.snapshot(project, name, snapshot)
            row = await self._store.instance(project, name)
            pool = await self.pool_of(await self.spec(row))
            await self._store.rename_snapshot(project, name, snapshot, new)
            try:
                await pool.rename_snapshot(Volume.of(row.type, project, name), snapshot, new)
            except BaseException:
                await self._store.rename_snapshot(project, name, new, snapshot)
                raise

    async def restore_snapshot(self, project: str, name: str, snapshot: str) -> None:
        """Files, configuration, devices and profiles go back to what they were at the snapshot."""
        async with self.changing(project, name):
            snap = await self.snapshot(project, name, snapshot)
            row = await self._store.instance(project, name)
            if await self.status(row) != StatusCode.STOPPED:
                raise BadRequest(f"Instance {name!r} is running: stop it before restoring a snapshot")
            spec = await self.spec(row)
            volatile = {k: v for k, v in row.config.items() if k.startswith("volatile.")}
            kept = {k: v for k, v in snap.config.items() if not k.startswith("volatile.")}
            restored = InstanceRow(**{**vars(row), "config": {**kept, **volatile},
                                      "devices": dict(snap.devices), "profiles": list(snap.profiles)})
            try:  # the snapshot must still define a valid instance here, on the same volume: check first
                new_spec = await self.validate_row(restored)
            except StapesError as err:
                raise BadRequest(f"Snapshot {snapshot!r} cannot be restored: {err.message}") from None
            if new_spec.volume != spec.volume:
                raise BadRequest(f"Snapshot {snapshot!r} cannot be restored: its root disk is on another pool")
            await (await self.pool_of(spec)).restore_snapshot(Volume.of(row.type, project, name), snapshot)
            await self._store.update_instance(restored)
            await self.driver(row.type).define(new_spec)
        self._events.lifecycle("instance-restored", f"/1.0/instances/{name}", project, {"snapshot": snapshot})

    # changes
    async def update(self, project: str, name: str, changes: dict[str, Any], *, replace: bool) -> None:
        async with self.changing(project, name):
            row = await self._store.instance(project, name)
            old = InstanceRow(**vars(row))
            volatile = {k: v for k, v in row.config.items() if k.startswith("volatile.")}
            if "config" in changes:
                config = dict(changes["config"] or {})
                if INCOMPLETE in config:
                    raise BadRequest(f"{INCOMPLETE!r} is Stapes's own marker of an unfinished creation: it cannot be "
                                     "set; leave it out of the configuration")
                row.config = config if replace else {**row.config, **config}
                for key, value in volatile.items():
                    row.config.setdefault(key, value)
                row.config.pop(HELD, None)  # the server's record of what the container still mounts, alone
                if HELD in old.config:
                    row.config[HELD] = old.config[HELD]
            if "devices" in changes:
                devices = dict(changes["devices"] or {})
                row.devices = devices if replace else {**row.devices, **devices}
            if "profiles" in changes:
                row.profiles = list(changes["profiles"] or [])
            if "description" in changes:
                row.description = str(changes["description"] or "")
            if changes.get("ephemeral") is not None:
                row.ephemeral = bool(changes["ephemeral"])
            new_spec = await self.validate_row(row)
            old_spec: InstanceSpec | None
            try:
                old_spec = await self.spec(old)
                old_volume: Path | None = old_spec.volume
            except StapesError:
                old_spec, old_volume = None, None  # a broken instance being repaired: the fix points to its volume
            if old_volume is not None and old_volume != new_spec.volume:
                raise BadRequest("The root disk's pool cannot change this way: move the instance with '-s POOL'")
            held: VolumesHeld | None = None
            before = {(d["pool"], d["source"]) for d in volume_disks(old_spec.devices if old_spec else {}).values()}
            keys = [(d["pool"], project, d["source"]) for d in volume_disks(new_spec.devices).values()
                    if (d["pool"], d["source"]) not in before]  # newly attached ones
            async with self.volume_claim(keys):  # no delete, rename or move of them meanwhile: checked again
                await self._check_volumes(project, new_spec.devices, new_spec.config, name, new_spec.idmap)
                try:
                    await self.driver(row.type).hotplug(old_spec, new_spec)  # attached volumes, at once if running
                except VolumesHeld as err:  # detached, but mounted elsewhere inside: in use until it stops
                    held = err
                    still = held_by(old_spec, err.devices) | set(filter(None, row.config.get(HELD, "").split(",")))
                    row.config[HELD] = ",".join(sorted(still))
                try:
                    await self._store.update_instance(row)
                except BaseException:
                    if held is None and old_spec is not None:  # the running container as the row still says
                        with contextlib.suppress(Exception):
                            await asyncio.shield(self.driver(row.type).hotplug(new_spec, old_spec))
                    raise
            await self.driver(row.type).define(new_spec)
            if row.ephemeral:  # made ephemeral while it runs: it goes when its init ends, as if started so
                self.watch_ephemeral()
            if held is not None:
                self._events.lifecycle("instance-updated", f"/1.0/instances/{name}", project)
                raise held
        self._events.lifecycle("instance-updated", f"/1.0/instances/{name}", project)

    async def update_unlocked(self, new: InstanceRow) -> None:
        """Take over another copy's configuration (a refresh); volatile keys stay this server's own."""
        row = await self._store.instance(new.project, new.name)
        volatile = {k: v for k, v in row.config.items() if k.startswith("volatile.")}
        row.config = {**{k: v for k, v in new.config.items() if not k.startswith("volatile.")}, **volatile}
        row.devices, row.profiles, row.description = dict(new.devices), list(new.profiles), new.description
        spec = await self.validate_row(row)
        await self._store.update_instance(row)
        await self.driver(row.type).define(spec)

    async def validate_row(self, row: InstanceRow) -> InstanceSpec:
        """An existing instance's (changed) row: its own keys, its profiles, and the expanded result."""
        validate_instance_config(row.config)
        validate_devices(row.devices)
        for profile in row.profiles:
            await self._store.profile(profile)
        spec = await self.spec(row)
        validate_instance_config(dict(spec.config))
        await self._store.pool(root_disk(spec.devices)[1]["pool"])  # type: ignore[index]
        await self._check_networks(spec.devices)
        await self._check_volumes(row.project, spec.devices, spec.config, row.name)
        if await self.add_volatile(row, applying=False):
            spec = await self.spec(row)
        return spec

    async def check_profile_change(self, profile: ProfileRow) -> None:
        """A profile edit must leave every instance that uses it valid (a root disk on a pool, valid keys), and
        its nics must name networks that exist."""
        await self._check_networks(profile.devices)
        for row in await self._store.instances():
            if profile.name not in row.profiles:
                continue
            config: dict[str, str] = {}
            profile_devices = []
            for name in row.profiles:
                current = profile if name == profile.name else await self._store.profile(name)
                config.update(current.config)
                profile_devices.append(current.devices)
            config.update(row.config)
            devices = expand_devices(profile_devices, row.devices)
            try:
                validate_instance_config(config)
                root = root_disk(devices)
                if root is None or not root[1].get("pool"):
                    raise BadRequest("it would have no root disk on a pool")
                await self._store.pool(root[1]["pool"])
            except StapesError as err:
                raise BadRequest(f"Profile {profile.name!r} cannot change so: instance {row.name!r} (project "
                                 f"{row.project!r}) uses it and {err.message}") from None

    async def rename(self, project: str, name: str, new_name: str) -> None:
        validate_instance_name(new_name)
        async with self.changing(project, name):
            row = await self._store.instance(project, name)
            spec = await self.spec(row)
            driver = self.driver(row.type)
            if (await driver.state(spec, detail=False)).status != StatusCode.STOPPED:
                raise BadRequest(f"Instance {name!r} is running: stop it before renaming it")
            with contextlib.suppress(NotFound):
                await self._store.instance(project, new_name)
                raise Conflict(f"Instance {new_name!r} already exists in project {project!r}")
            pool = await self.pool_of(spec)
            await pool.rename_volume(Volume.of(row.type, project, name), new_name)
            try:
                await self._store.rename_instance(project, name, new_name)
            except BaseException:
                await pool.rename_volume(Volume.of(row.type, project, new_name), name)
                raise
            await driver.undefine(spec)
            row.name = new_name
            new_spec = await self.spec(row)
            await asyncio.to_thread(driver.prepare_volume, new_spec.volume, new_name)
            await driver.define(new_spec)
            for hook in self.on_removed:
                await hook(project, name, new_name)
        self._events.lifecycle("instance-renamed", f"/1.0/instances/{new_name}", project, {"old_name": name})

    async def delete(self, project: str, name: str) -> None:
        async with self.changing(project, name):
            row = await self._store.instance(project, name)
            try:
                spec = await self.spec(row)
            except StapesError:
                await self._delete_broken(row)
            else:
                driver = self.driver(row.type)
                if (await driver.state(spec, detail=False)).status != StatusCode.STOPPED:
                    raise BadRequest(f"Instance {name!r} is running: stop it first, or delete it with --force")
                await self._delete_stopped(row, spec)
        self._events.lifecycle("instance-deleted", f"/1.0/instances/{name}", project)

    async def _delete_stopped(self, row: InstanceRow, spec: InstanceSpec) -> None:
        """A stopped instance, its LXC definition, its volume and its row (the caller holds its lock)."""
        pool = await self.pool_of(spec)
        await self.driver(row.type).undefine(spec)
        await pool.delete_volume(Volume.of(row.type, row.project, row.name))
        await self._store.delete_instance(row.project, row.name)
        for hook in self.on_removed:
            await hook(row.project, row.name, None)

    async def _delete_broken(self, row: InstanceRow) -> None:
        """An instance whose row no longer expands (a lost profile or pool): remove what can be found of it,
        its volume on whichever pool holds one, and the row, so one bad row can always be repaired."""
        bare = InstanceSpec(row.project, row.name, {}, {}, Path("/nonexistent"))
        if (await self.driver(row.type).state(bare, detail=False)).status != StatusCode.STOPPED:
            raise BadRequest(f"Instance {row.name!r} is running: stop it first ('stapes stop --force')")
        for pool_row in await self._store.pools():
            with contextlib.suppress(StapesError):
                pool = await self._storage.driver(pool_row.name)
                if pool.volume_path(Volume.of(row.type, row.project, row.name)).exists():
                    await pool.delete_volume(Volume.of(row.type, row.project, row.name))
        with contextlib.suppress(StapesError):
            await self.driver(row.type).undefine(bare)
        await self._store.delete_instance(row.project, row.name)
        for hook in self.on_removed:
            await hook(row.project, row.name, None)

    async def change_state(self, project: str, name: str, action: str, *, timeout: float | None = None,
                           force: bool = False) -> None:
        async with self.changing(project, name):
            row = await self._store.instance(project, name)
            spec = await self.spec(row)
            driver = self.driver(row.type)
            status = (await driver.state(spec, detail=False)).status
            stop_timeout = DEFAULT_STOP_TIMEOUT if timeout is None or timeout < 0 else timeout
            if action == "start":
                if row.config.get(INCOMPLETE) == "true":
                    raise Conflict(f"Instance {name!r} is incomplete (an interrupted migration or creation left it): "
                                   "it cannot start; delete it, or restart the server to remove it")
                if status == StatusCode.RUNNING:
                    raise BadRequest(f"Instance {name!r} is already running")
                if status == StatusCode.FROZEN:
                    raise BadRequest(f"Instance {name!r} is frozen: use 'unfreeze' (or 'start' after 'stop')")
                await self._check_networks(spec.devices)
                await self._check_volumes(project, spec.devices, spec.config, name, spec.idmap)
                if await self.add_volatile(row, applying=True):
                    spec = await self.spec(row)
                await driver.define(spec)
                await driver.start(spec)
                row.last_used_at = time.time()
                row.config["volatile.last_state.power"] = "RUNNING"
                row.config.pop(HELD, None)  # a new mount namespace: nothing detached is mounted any more
                self._undeletable.pop((project, name), None)
                if row.ephemeral:
                    self.watch_ephemeral()
            elif action == "stop":
                if status == StatusCode.STOPPED:
                    raise BadRequest(f"Instance {name!r} is already stopped")
                await driver.stop(spec, timeout=stop_timeout, force=force)
                row.config["volatile.last_state.power"] = "STOPPED"
                row.config.pop(HELD, None)  # its mounts ended with it
                if row.ephemeral:  # as Incus: an ephemeral instance goes when it stops (not on a restart)
                    await self._delete_stopped(row, spec)
                    self._events.lifecycle("instance-stopped", f"/1.0/instances/{name}", project)
                    self._events.lifecycle("instance-deleted", f"/1.0/instances/{name}", project)
                    return
            elif action == "restart":
                if status == StatusCode.STOPPED:
                    raise BadRequest(f"Instance {name!r} is not running: use 'start'")
                await driver.stop(spec, timeout=stop_timeout, force=force)
                row.config.pop(HELD, None)
                if await self.add_volatile(row, applying=True):
                    spec = await self.spec(row)
                    await driver.define(spec)
                await driver.start(spec)
                row.last_used_at = time.time()
            elif action == "freeze":
                if status != StatusCode.RUNNING:
                    raise BadRequest(f"Instance {name!r} is not running")
                await driver.freeze(spec)
            elif action == "unfreeze":
                if status != StatusCode.FROZEN:
                    raise BadRequest(f"Instance {name!r} is not frozen")
                await driver.unfreeze(spec)
            else:
                raise BadRequest(f"Unknown state action {action!r}: use start, stop, restart, freeze or unfreeze")
            await self._store.update_instance(row)
        verb = {"start": "started", "stop": "stopped", "restart": "restarted", "freeze": "paused",
                "unfreeze": "resumed"}[action]
        self._events.lifecycle(f"instance-{verb}", f"/1.0/instances/{name}", project)

    async def exec(self, op: Operation, project: str, name: str, request: ExecRequest, width: int,
                   height: int) -> dict[str, Any]:
        row = await self._store.instance(project, name)
        spec = await self.spec(row)
        return await run_exec(op, self.driver(row.type), spec, request, width, height)

    async def check_exec_ids(self, project: str, name: str, user: int, group: int) -> None:
        """Before an exec starts: its user and group are ids the container has (400 otherwise)."""
        spec = await self.spec(await self._store.instance(project, name))
        check_exec_ids(user, group, ids_from_zero(spec.idmap, "uid"), ids_from_zero(spec.idmap, "gid"))

    async def status(self, row: InstanceRow) -> StatusCode:
        return (await self.driver(row.type).state(await self.spec(row), detail=False)).status

    async def check_running(self, project: str, name: str) -> None:
        row = await self._store.instance(project, name)
        status = (await self.driver(row.type).state(await self.spec(row), detail=False)).status
        if status != StatusCode.RUNNING:
            raise BadRequest(f"Instance {name!r} is not running: start it first")

    async def runtime(self, project: str, name: str) -> tuple[InstanceDriver, InstanceSpec]:
        """The driver and the spec of an instance (its console: stapes.server.instances.console)."""
        row = await self._store.instance(project, name)
        return self.driver(row.type), await self.spec(row)

    async def log_files(self, project: str, name: str) -> dict[str, Path]:
        row = await self._store.instance(project, name)
        return self.driver(row.type).log_files(await self.spec(row))

    async def remove_incomplete(self) -> None:
        """Instances whose creation a crash interrupted (a killed server, a lost host) are removed."""
        for row in await self._store.instances():
            if row.config.get(INCOMPLETE) == "true":
                log.warning("removing %s/%s: its creation was interrupted", row.project, row.name)
                spec = None
                with contextlib.suppress(Exception):
                    spec = await self.spec(row)
                if spec is not None and await self._adopt_released(row, spec):
                    continue
                await self._undo_create(row, spec, volume_created=spec is not None)

    async def _adopt_released(self, row: InstanceRow, spec: InstanceSpec) -> bool:
        """A live move's copy that the source had handed over when this server stopped: the only copy now, so
        it is kept (and runs on), not removed."""
        try:
            if not await self.driver(row.type).restore_released(spec):
                return False
        except Exception as err:
            log.warning("%s/%s was handed over by its source, but could not go on here: %s", row.project,
                        row.name, err)
            return False
        del row.config[INCOMPLETE]
        row.config["volatile.last_state.power"] = "RUNNING"
        await self._store.update_instance(row)
        log.warning("%s/%s: kept, as its source had handed it over before this server stopped", row.project,
                    row.name)
        return True

    async def record_power_state(self, project: str, name: str, *, running: bool) -> None:
        """What restore_power_state will do with the instance when the server starts."""
        row = await self._store.instance(project, name)
        row.config["volatile.last_state.power"] = "RUNNING" if running else "STOPPED"
        await self._store.update_instance(row)

    def watch_ephemeral(self) -> None:
        """Start (once) the watch that deletes ephemeral instances whose init ended on its own (a poweroff
        inside): LXC tells nobody, so running ephemeral instances are looked at every EPHEMERAL_POLL seconds."""
        if self._ephemeral_watch is None or self._ephemeral_watch.done():
            self._ephemeral_watch = asyncio.get_running_loop().create_task(self._watch_ephemeral())

    async def stop_watching(self) -> None:
        task, self._ephemeral_watch = self._ephemeral_watch, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch_ephemeral(self) -> None:
        stopped_once: set[tuple[str, str]] = set()
        while True:
            await asyncio.sleep(EPHEMERAL_POLL)
            try:
                rows = [r for r in await self._store.instances() if r.ephemeral
                        and r.config.get("volatile.last_state.power") == "RUNNING" and r.config.get(INCOMPLETE) is None
                        and (r.project, r.name) not in self._restoring and (r.project, r.name) not in self._undeletable]
                if not rows:
                    if not stopped_once:
                        return  # nothing to watch: the next ephemeral start begins a new watch
                    stopped_once.clear()
                    continue
                stopped_once = await self._reap_ephemeral(rows, stopped_once)
            except Exception as err:  # the watch never dies of one bad look; it tries again next time
                log.warning("watching ephemeral instances: %s", err)

    async def _reap_ephemeral(self, rows: list[InstanceRow], stopped_once: set[tuple[str, str]]
                              ) -> set[tuple[str, str]]:
        """Delete those seen stopped twice in a row (a reboot inside passes through STOPPED for a moment) that
        nothing else holds: a move, a restart, a stop in progress holds the instance and is left alone."""
        specs: dict[tuple[str, str], tuple[InstanceRow, InstanceSpec]] = {}
        for row in rows:
            with contextlib.suppress(StapesError):
                specs[(row.project, row.name)] = (row, await self.spec(row))
        by_type: dict[str, list[InstanceSpec]] = defaultdict(list)
        for row, spec in specs.values():
            by_type[row.type].append(spec)
        states: dict[str, RuntimeState] = {}
        for instance_type, type_specs in by_type.items():
            states.update(await self.driver(instance_type).states(type_specs))
        now_stopped = set()
        for key, (row, spec) in specs.items():
            state = states.get(spec.runtime_name)
            if state is None or state.status != StatusCode.STOPPED or key in self._busy:
                continue
            lock = self._locks.get(key)
            if lock is not None and lock.locked():
                continue
            if key not in stopped_once:
                now_stopped.add(key)
                continue
            await self._delete_ended(row)
        return now_stopped

    async def _delete_ended(self, row: InstanceRow) -> None:
        name, project = row.name, row.project
        try:
            async with self.changing(project, name):
                current = await self._store.instance(project, name)
                spec = await self.spec(current)
                if (not current.ephemeral or current.config.get("volatile.last_state.power") != "RUNNING"
                        or (await self.driver(current.type).state(spec, detail=False)).status != StatusCode.STOPPED):
                    return  # changed meanwhile (started again, made persistent, stopped by a request)
                await self.driver(current.type).stop(spec, timeout=0, force=True)  # unmounts an idmapped root
                try:
                    await self._delete_stopped(current, spec)
                except Exception as err:
                    # Not tried again every poll: said once; it stays, stopped, for 'stapes delete' (or a start).
                    reason = err.message if isinstance(err, StapesError) else str(err)
                    self._undeletable[(project, name)] = reason
                    log.warning("%s/%s: ephemeral, its init ended, but deleting it failed: %s (left stopped; "
                                "delete it by hand)", project, name, reason)
                    with contextlib.suppress(StapesError):
                        current.config["volatile.last_state.power"] = "STOPPED"
                        await self._store.update_instance(current)
                    return
        except (NotFound, Conflict):
            return
        log.info("%s/%s: ephemeral, its init ended: deleted", project, name)
        self._events.lifecycle("instance-shutdown", f"/1.0/instances/{name}", project)
        self._events.lifecycle("instance-deleted", f"/1.0/instances/{name}", project)

    async def restore_power_state(self) -> None:
        """After a host reboot: start what was running, and what asks to start with the server. The ephemeral
        watch looks at none of them before its start was tried (a slow start is no poweroff)."""
        rows = await self._store.instances()
        self._restoring = {(row.project, row.name) for row in rows}
        try:
            await self._restore_each(rows)
        finally:
            self._restoring = set()
            self.watch_ephemeral()

    async def _restore_each(self, rows: list[InstanceRow]) -> None:
        for row in rows:
            try:
                wanted = row.config.get("volatile.last_state.power") == "RUNNING" or is_true(
                    (await self.expand(row))[0].get("boot.autostart"))
                if not wanted:
                    continue
                spec = await self.spec(row)
                driver = self.driver(row.type)
                if (await driver.state(spec, detail=False)).status == StatusCode.STOPPED:
                    await driver.define(spec)
                    await driver.start(spec)
            except Exception as err:  # one broken instance never keeps the server (or the others) down
                log.warning("could not start %s/%s at server start: %s", row.project, row.name, err)
            finally:
                self._restoring.discard((row.project, row.name))


T = TypeVar("T")


async def _one(read_once: dict[str, T] | None, name: str, fetch: Callable[[str], Awaitable[T]], what: str) -> T:
    """From what a listing read once, or fetched now."""
    if read_once is None:
        return await fetch(name)
    if name not in read_once:
        raise NotFound(f"{what} {name!r} not found")
    return read_once[name]


def check_image_type(image: str, image_type: str, instance_type: str) -> None:
    """A container image has no disk to boot, a VM image no root filesystem to run: refused before any work."""
    if (image_type or "container") == instance_type:
        return
    how = "add --vm" if image_type == "virtual-machine" else "leave out --vm"
    raise BadRequest(f"Image {image!r} is a {image_type or 'container'} image, not a {instance_type} one: {how}, "
                     "or choose an image of that type ('stapes image list' shows the TYPE)")


def root_size(devices: Mapping[str, Mapping[str, str]]) -> int:
    """A block root disk's size: its `size` key, else Incus's default for VMs."""
    root = root_disk(devices)
    value = root[1].get("size", "") if root is not None else ""
    if not value:
        return DEFAULT_BLOCK_SIZE
    try:
        size = parse_size(value)
    except ValueError as err:
        raise BadRequest(f"Invalid size of the root disk: {err}") from None
    if size < MIN_BLOCK_SIZE:
        raise BadRequest(f"The root disk's size {value} is too small: give at least 64MiB")
    return size


@contextlib.asynccontextmanager
async def _no_claim(keys: list[Key]) -> AsyncIterator[None]:
    yield


def held_by(spec: InstanceSpec | None, devices: list[str]) -> set[str]:
    """`POOL/VOLUME` of these disk devices (HELD's entries)."""
    if spec is None:
        return set()
    return {f"{spec.devices[d]['pool']}/{spec.devices[d]['source']}" for d in devices if d in spec.devices}
