"""Custom storage volumes: the rules, and the reserve/fill/finalize/undo steps of creating one.

A custom volume is a directory (a subvolume on btrfs) in its pool's `custom/` directory, root's alone like
`containers/`, recorded in the store's `storage_volumes` table. Instances attach one as a disk device
`{type: disk, pool: POOL, source: VOLUME, path: PATH}`; the LXC driver mounts it id-mapped, as the root.

Creating one (empty, as a copy, or from a migration) reserves the name, creates the directory, fills it and
only then writes the row: on any failure or cancellation the directory is removed again and no row exists.
A server killed half-way leaves a directory without a row, which `remove_incomplete` removes at start.

On disk a volume of the default project is `custom/NAME`, another project's `custom/PROJECT:NAME` (a ':'
no project or volume name holds: `PROJECT_NAME` would be another project's volume too).

One lock per volume (`locked`, `claim`) orders a delete, rename or move against the instance changes that
attach the volume; each re-reads the row once it holds the lock.

A volume keeps `volatile.idmap.last`, the id map of the instance that last attached it (Incus's key): its
files are stored unshifted, so one an unprivileged container's root planted (a setuid-root program) would
run as the host's root in a privileged container. A volume is never attached to an instance of the other
kind (privileged or unprivileged) than the one it was last used with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stapes.api.devices import volume_disks
from stapes.api.errors import BadRequest, Conflict, NotFound
from stapes.api.timefmt import iso
from stapes.api.volumes import validate_content_type, validate_volume_config, validate_volume_name
from stapes.server import process
from stapes.server.idmap import IdRange
from stapes.server.storage.base import CUSTOM, PoolDriver, Volume
from stapes.server.storage.service import StorageService
from stapes.server.store.db import InstanceRow, Store, VolumeRow

if TYPE_CHECKING:
    from stapes.server.instances.service import InstanceService

log = logging.getLogger(__name__)
Fill = Callable[[Path, PoolDriver], Awaitable[None]]


SEPARATOR = ":"  # between the project and the volume name on disk: no entity name holds one
IDMAP_LAST = "volatile.idmap.last"
HELD = "volatile.volumes.held"  # on an instance: "POOL/VOLUME,..." it still mounts after a detach, until it stops
Key = tuple[str, str, str]  # (pool, project, name)


def directory_name(project: str, name: str) -> str:
    return name if project == "default" else f"{project}{SEPARATOR}{name}"


def custom_volume(project: str, name: str) -> Volume:
    """A custom volume as the pool drivers see it (its directory: `directory_name`)."""
    return Volume(CUSTOM, "default", directory_name(project, name))


def idmap_text(idmap: Sequence[IdRange]) -> str:
    """Incus's form of volatile.idmap.last; `[]`: privileged."""
    return json.dumps([{"Isuid": r.uid, "Isgid": r.gid, "Hostid": r.host, "Nsid": r.inside, "Maprange": r.size}
                       for r in idmap])


def check_idmap_kind(row: VolumeRow, privileged: bool, device: str, instance: str) -> None:
    last = row.config.get(IDMAP_LAST)
    if last is None:
        return
    try:
        was_privileged = json.loads(last) == []
    except ValueError:
        was_privileged = False
    if was_privileged != privileged:
        used, now = ("a privileged", "unprivileged") if was_privileged else ("an unprivileged", "privileged")
        raise BadRequest(
            f"Disk device {device!r} of {instance!r}: storage volume {row.name!r} was last used by {used} "
            f"instance ({IDMAP_LAST}), and {instance!r} is {now}: its files keep the ids they were written with, "
            "so a file planted by one (a setuid-root program) would act with host ids in the other. Attach it to "
            f"{used.split()[-1]} instances only, or copy the files you need into a new volume")


def held_volumes(config: Mapping[str, str]) -> set[str]:
    return {v for v in config.get(HELD, "").split(",") if v}


def volume_url(pool: str, name: str, project: str) -> str:
    suffix = "" if project == "default" else f"?project={project}"
    return f"/1.0/storage-pools/{pool}/volumes/custom/{name}{suffix}"


class VolumeService:
    def __init__(self, store: Store, storage: StorageService, instances: InstanceService) -> None:
        self._store = store
        self._storage = storage
        self._instances = instances
        self._reserved: set[tuple[str, str, str]] = set()  # being created: (pool, project, name)
        self._busy: dict[tuple[str, str, str], str] = {}  # taking part in a migration: the operation
        self._locks: dict[Key, asyncio.Lock] = {}
        instances.volume_claim = self.claim  # instance changes that attach volumes take their locks

    # locks
    @contextlib.asynccontextmanager
    async def locked(self, pool: str, project: str, name: str) -> AsyncIterator[None]:
        async with self.claim([(pool, project, name)], check_busy=False):
            yield

    @contextlib.asynccontextmanager
    async def claim(self, keys: Iterable[Key], *, check_busy: bool = True) -> AsyncIterator[None]:
        """The locks of these volumes (in one order: no deadlock); `check_busy`: refuse a volume a migration
        or a move holds."""
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(set(keys)):
                await stack.enter_async_context(self._locks.setdefault(key, asyncio.Lock()))
                if check_busy:
                    self.check_idle(*key)
            yield

    # lookups
    async def driver(self, pool: str) -> PoolDriver:
        return await self._storage.driver(pool)

    async def get(self, pool: str, project: str, name: str) -> VolumeRow:
        await self._store.pool(pool)
        return await self._store.volume(pool, project, name)

    async def path(self, row: VolumeRow) -> Path:
        return (await self._storage.driver(row.pool)).volume_path(custom_volume(row.project, row.name))

    async def attached(self, pool: str, project: str, name: str) -> list[InstanceRow]:
        """The instances that attach the volume, by their own devices or their profiles'."""
        found = []
        for row in await self._store.instances(project):
            if f"{pool}/{name}" in held_volumes(row.config):  # detached, but still mounted inside
                found.append(row)
                continue
            try:
                _, devices = await self._instances.expand(row)
            except NotFound:
                continue
            if any(d["pool"] == pool and d["source"] == name for d in volume_disks(devices).values()):
                found.append(row)
        return found

    async def used_by(self, pool: str, project: str, name: str) -> list[str]:
        urls = []
        for profile in await self._store.profiles():
            if any(d["pool"] == pool and d["source"] == name for d in volume_disks(profile.devices).values()):
                urls.append(f"/1.0/profiles/{profile.name}")
        for row in await self.attached(pool, project, name):
            urls.append(f"/1.0/instances/{row.name}" + ("" if row.project == "default" else f"?project={row.project}"))
        return urls

    async def render(self, row: VolumeRow) -> dict[str, Any]:
        return {"name": row.name, "type": CUSTOM, "content_type": row.content_type, "description": row.description,
                "config": row.config, "project": row.project, "location": "none",
                "created_at": iso(row.created_at), "used_by": await self.used_by(row.pool, row.project, row.name)}

    async def render_all(self, pool: str, project: str, *, recursion: bool) -> list[Any]:
        """Incus's listing: the instances' own volumes (type container) and the custom ones."""
        await self._store.pool(pool)
        result: list[Any] = []
        for inst in await self._store.instances(project):
            try:
                _, devices = await self._instances.expand(inst)
            except NotFound:
                continue
            root = next((d for d in devices.values() if d.get("type") == "disk" and d.get("path") == "/"), None)
            if root is None or root.get("pool") != pool:
                continue
            url = f"/1.0/storage-pools/{pool}/volumes/{inst.type}/{inst.name}"
            result.append({"name": inst.name, "type": inst.type, "content_type": "filesystem", "description": "",
                           "config": {}, "project": inst.project, "location": "none",
                           "created_at": iso(inst.created_at),
                           "used_by": [f"/1.0/instances/{inst.name}"]} if recursion else url)
        for row in await self._store.volumes(pool):
            if row.project == project:
                result.append(await self.render(row) if recursion else volume_url(pool, row.name, project))
        return result

    # claims
    def check_idle(self, pool: str, project: str, name: str, op_id: str | None = None) -> None:
        """`op_id`: the operation asking, which may hold the volume itself."""
        holder = self._busy.get((pool, project, name))
        if holder is not None and not (op_id is not None and holder.startswith(f"operation {op_id} ")):
            raise Conflict(f"Storage volume {name!r} is busy: {holder} is running; wait for it to finish, or cancel "
                           f"it with 'stapes operation delete {holder.split()[1]}'")

    def mark_busy(self, pool: str, project: str, name: str, op_id: str, what: str) -> Callable[[], None]:
        self.check_idle(pool, project, name)
        key = (pool, project, name)
        self._busy[key] = f"operation {op_id} ({what})"

        def release() -> None:
            if self._busy.get(key, "").startswith(f"operation {op_id} "):
                del self._busy[key]

        return release

    # creation
    async def validate_new(self, row: VolumeRow) -> None:
        """Everything checkable before any work starts, so a bad request changes nothing."""
        validate_volume_name(row.name)
        validate_content_type(row.content_type)
        validate_volume_config(row.config)
        await self._store.pool(row.pool)
        await self._store.project(row.project)
        if (row.pool, row.project, row.name) in self._reserved:
            raise Conflict(f"Storage volume {row.name!r} is being created in pool {row.pool!r}")
        with contextlib.suppress(NotFound):
            await self._store.volume(row.pool, row.project, row.name)
            raise Conflict(f"Storage volume {row.name!r} already exists in pool {row.pool!r}")

    @contextlib.asynccontextmanager
    async def _reserve(self, row: VolumeRow) -> AsyncIterator[None]:
        await self.validate_new(row)
        key = (row.pool, row.project, row.name)
        self._reserved.add(key)
        try:
            yield
        finally:
            self._reserved.discard(key)

    async def create_with(self, row: VolumeRow, fill: Fill | None = None,
                          finalize: Callable[[], Awaitable[None]] | None = None) -> None:
        """Reserve the name, create and fill the directory, record the row, finalize (a migration target
        confirms there); on any failure or cancellation undo every step, so nothing of the volume is left."""
        async with self._reserve(row):
            pool = await self._storage.driver(row.pool)
            volume = custom_volume(row.project, row.name)
            recorded = False
            path = await pool.create_volume(volume)
            try:
                if fill is not None:
                    await fill(path, pool)
                row.created_at = row.created_at or time.time()
                await self._store.create_volume(row)
                recorded = True
                if finalize is not None:
                    await finalize()
            except BaseException:
                await asyncio.shield(self._undo(pool, volume, row, recorded))
                raise

    async def _undo(self, pool: PoolDriver, volume: Volume, row: VolumeRow, recorded: bool) -> None:
        try:
            if recorded:
                await self._store.delete_volume(row.pool, row.project, row.name)
            await pool.delete_volume(volume)
        except Exception as err:  # said in the log: the reason of the failure itself is what the caller sees
            log.error("could not remove the half-created storage volume %s/%s: %s", row.pool, row.name, err)

    async def create(self, row: VolumeRow) -> None:
        await self.create_with(row)

    async def copy_local(self, source_pool: str, source: str, row: VolumeRow) -> None:
        """A copy on this server (the same pool or another): owners, modes, xattrs, hard links, sparse files."""
        original = await self.get(source_pool, row.project, source)
        origin = await self.path(original)
        volatile = {k: v for k, v in original.config.items() if k.startswith("volatile.")}
        row.config = {**original.config, **row.config, **volatile}  # the files' own record stays theirs
        row.description = row.description or original.description

        async def fill(path: Path, pool: PoolDriver) -> None:
            await process.run(["cp", "-a", "--reflink=auto", "-T", "--", str(origin), str(path)])

        await self.create_with(row, fill)

    # changes
    async def update(self, pool: str, project: str, name: str, description: str | None,
                     config: dict[str, str] | None, *, replace: bool) -> None:
        self.check_idle(pool, project, name)
        row = await self.get(pool, project, name)
        volatile = {k: v for k, v in row.config.items() if k.startswith("volatile.")}
        if config is not None:
            given = dict(config)
            if any(k.startswith("volatile.") and volatile.get(k) != v for k, v in given.items()):
                raise BadRequest("volatile.* keys are the server's own record: they cannot be set or unset")
            merged = given if replace else {**row.config, **given}
            merged = {k: v for k, v in merged.items() if v != "" and not k.startswith("volatile.")}
            validate_volume_config(merged)
            row.config = {**merged, **volatile}
        elif replace:
            row.config = volatile
        if description is not None:
            row.description = description
        await self._store.update_volume(row)

    async def _refuse_in_use(self, pool: str, project: str, name: str, doing: str) -> None:
        users = await self.used_by(pool, project, name)
        if users:
            names = ", ".join(u.rsplit("/", 1)[-1].split("?")[0] for u in users)
            raise BadRequest(f"Storage volume {name!r} is in use by {names}: detach it first "
                             f"('stapes storage volume detach {pool} {name} INSTANCE') before {doing} it")

    async def rename(self, pool: str, project: str, name: str, new: str) -> None:
        validate_volume_name(new)
        async with self.locked(pool, project, name):
            self.check_idle(pool, project, name)
            row = await self.get(pool, project, name)
            await self._refuse_in_use(pool, project, name, "renaming")
            probe = VolumeRow(pool, project, new, content_type=row.content_type)
            async with self._reserve(probe):
                driver = await self._storage.driver(pool)
                await driver.rename_volume(custom_volume(project, name), directory_name(project, new))
                try:
                    await self._store.rename_volume(pool, project, name, new)
                except BaseException:
                    await driver.rename_volume(custom_volume(project, new), directory_name(project, name))
                    raise

    async def check_moveable(self, pool: str, project: str, name: str, op_id: str | None = None) -> None:
        self.check_idle(pool, project, name, op_id)
        await self.get(pool, project, name)
        await self._refuse_in_use(pool, project, name, "moving")

    async def move_local(self, pool: str, project: str, name: str, target_pool: str, new: str,
                         op_id: str | None = None) -> None:
        """To another pool of this server: a copy, then the original is deleted. The source is held busy
        throughout (by `op_id`, the caller's claim, or here): nothing attaches, renames or deletes it meanwhile;
        if the final delete is refused after all, the copy is removed again."""
        if op_id is None:
            op_id = f"move-{id(self)}-{time.monotonic_ns()}"
            release = self.mark_busy(pool, project, name, op_id, "moving")
        else:
            release = None
        try:
            async with self.locked(pool, project, name):
                await self.check_moveable(pool, project, name, op_id)
                row = await self.get(pool, project, name)
            copy = VolumeRow(target_pool, project, new, row.description, row.content_type, dict(row.config))
            await self.copy_local(pool, name, copy)
            try:
                await self.delete(pool, project, name, op_id)
            except BaseException:
                await asyncio.shield(self._remove_copy(copy))
                raise
        finally:
            if release is not None:
                release()

    async def _remove_copy(self, row: VolumeRow) -> None:
        try:
            async with self.locked(row.pool, row.project, row.name):
                await self._store.delete_volume(row.pool, row.project, row.name)
                await (await self._storage.driver(row.pool)).delete_volume(custom_volume(row.project, row.name))
        except Exception as err:
            log.error("could not remove the copy %s/%s of a refused move: %s", row.pool, row.name, err)

    async def delete(self, pool: str, project: str, name: str, op_id: str | None = None) -> None:
        async with self.locked(pool, project, name):
            self.check_idle(pool, project, name, op_id)
            await self.get(pool, project, name)
            await self._refuse_in_use(pool, project, name, "deleting")
            driver = await self._storage.driver(pool)
            await self._store.delete_volume(pool, project, name)
            await driver.delete_volume(custom_volume(project, name))

    async def remove_incomplete(self) -> None:
        """At start: a custom volume directory without its row is what a killed server left of a creation."""
        for pool_name, driver in (await self._storage.drivers()).items():
            rows = await self._store.volumes(pool_name)
            directory = driver.root / CUSTOM
            await asyncio.to_thread(_rename_old_layout, directory, rows)
            expected = {directory_name(r.project, r.name) for r in rows}
            entries = await asyncio.to_thread(_entries, directory)
            for entry in entries:
                if entry.name not in expected:
                    log.warning("removing %s: a storage volume whose creation was interrupted", entry)
                    with contextlib.suppress(Exception):
                        await driver.delete_volume(Volume(CUSTOM, "default", entry.name))


def _rename_old_layout(directory: Path, rows: list[VolumeRow]) -> None:
    """Volumes of other projects were `PROJECT_NAME` at first: renamed to `PROJECT:NAME` (never one that is
    also a default-project volume's name: that directory is the default project's)."""
    defaults = {r.name for r in rows if r.project == "default"}
    for row in rows:
        old = f"{row.project}_{row.name}"
        if row.project == "default" or old in defaults:
            continue
        source, target = directory / old, directory / directory_name(row.project, row.name)
        if source.is_dir() and not source.is_symlink() and not os.path.lexists(target):
            log.warning("renaming storage volume directory %s to %s", source, target)
            os.rename(source, target)


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []
