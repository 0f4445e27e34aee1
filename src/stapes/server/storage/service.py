"""Storage pools: the database rows plus one driver object per pool."""

from __future__ import annotations

from collections.abc import Sequence

from stapes.api.errors import BadRequest, Conflict
from stapes.api.names import validate_entity_name
from stapes.server.paths import StatePaths
from stapes.server.progress import Progress
from stapes.server.storage.base import PoolDriver
from stapes.server.storage.btrfs import BtrfsPool
from stapes.server.storage.dir import DirPool
from stapes.server.storage.transfer import Transport
from stapes.server.store.db import PoolRow, Store
from stapes.server.streams import Channel

DRIVERS: dict[str, type[PoolDriver]] = {DirPool.name: DirPool, BtrfsPool.name: BtrfsPool}
# Every transfer type some driver declares, by the name the two ends of a migration negotiate.
TRANSFER_TYPES: dict[str, type[Transport]] = {t.name: t for d in DRIVERS.values() for t in d.transports}


def open_transport(name: str, channel: Channel, progress: Progress | None, features: Sequence[str],
                   bwlimit: str | None = None) -> Transport:
    return TRANSFER_TYPES[name](channel, progress, features, bwlimit)


class StorageService:
    def __init__(self, store: Store, paths: StatePaths) -> None:
        self._store = store
        self._paths = paths

    async def driver(self, pool: str) -> PoolDriver:
        row = await self._store.pool(pool)
        return DRIVERS[row.driver](row.name, row.config)

    async def drivers(self) -> dict[str, PoolDriver]:
        """Every pool's driver, from one read of the table (for listings)."""
        return {row.name: DRIVERS[row.driver](row.name, row.config) for row in await self._store.pools()}

    async def create(self, name: str, driver: str, config: dict[str, str], description: str = "") -> PoolRow:
        validate_entity_name("storage pool", name)
        cls = DRIVERS.get(driver)
        if cls is None:
            raise BadRequest(f"Unknown storage driver {driver!r}: supported drivers are {', '.join(sorted(DRIVERS))}")
        if name in {p.name for p in await self._store.pools()}:
            raise Conflict(f"Storage pool {name!r} already exists")
        filled = cls.fill_defaults(name, config, self._paths.storage_pools / name)
        pool = cls(name, filled)
        await pool.create_pool()
        row = PoolRow(name, driver, description, filled)
        try:
            await pool.seal()
            await self._store.create_pool(row)
        except Exception:
            await pool.delete_pool()
            raise
        return row

    async def activate_all(self) -> None:
        for row in await self._store.pools():
            pool = DRIVERS[row.driver](row.name, row.config)
            await pool.activate()
            await pool.seal()

    async def delete(self, name: str, used_by: list[str]) -> None:
        if used_by:
            raise BadRequest(f"Storage pool {name!r} is in use by {', '.join(used_by)}: remove those first")
        pool = await self.driver(name)
        await self._store.delete_pool(name)
        await pool.delete_pool()
