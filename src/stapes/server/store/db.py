"""SQLite state of a standalone server.

One table per resource, JSON columns for maps. aiosqlite keeps the SQLite calls off the event loop. All
writes go through one connection under one lock, and each write method is one transaction: its statements
commit together or not at all. The schema is versioned (`PRAGMA user_version`); `MIGRATIONS` bring an older
database up to date at start, and a newer one is refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from stapes.api.errors import Conflict, InternalError, NotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '', config TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS profiles (
    name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL DEFAULT '{}', devices TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS storage_pools (
    name TEXT PRIMARY KEY, driver TEXT NOT NULL, description TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS instances (
    project TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL, architecture TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '', config TEXT NOT NULL DEFAULT '{}',
    devices TEXT NOT NULL DEFAULT '{}', profiles TEXT NOT NULL DEFAULT '[]',
    ephemeral INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, last_used_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (project, name));
CREATE TABLE IF NOT EXISTS snapshots (
    project TEXT NOT NULL, instance TEXT NOT NULL, name TEXT NOT NULL, description TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL DEFAULT '{}', devices TEXT NOT NULL DEFAULT '{}', profiles TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL, PRIMARY KEY (project, instance, name));
CREATE TABLE IF NOT EXISTS images (
    fingerprint TEXT PRIMARY KEY, filename TEXT NOT NULL, size INTEGER NOT NULL, type TEXT NOT NULL,
    architecture TEXT NOT NULL, properties TEXT NOT NULL DEFAULT '{}', public INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS image_aliases (
    name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, description TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS certificates (
    fingerprint TEXT PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL, certificate TEXT NOT NULL,
    restricted INTEGER NOT NULL DEFAULT 0, projects TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS networks (
    name TEXT PRIMARY KEY, type TEXT NOT NULL, description TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS trust_tokens (
    secret TEXT PRIMARY KEY, name TEXT NOT NULL, expires_at REAL NOT NULL, operation TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS storage_volumes (
    pool TEXT NOT NULL, project TEXT NOT NULL, name TEXT NOT NULL, description TEXT NOT NULL DEFAULT '',
    content_type TEXT NOT NULL DEFAULT 'filesystem', config TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL,
    PRIMARY KEY (pool, project, name));
"""
SCHEMA_VERSION = 3
# version -> statements that bring a database of the previous version to it (version 1 is SCHEMA itself).
# 2: managed networks (the `networks` table, which SCHEMA's CREATE ... IF NOT EXISTS adds), and containers
#    unprivileged by default: those made before keep running privileged, as they were made.
MIGRATIONS: dict[int, list[str]] = {2: [
    """UPDATE instances SET config = json_set(config, '$."security.privileged"', 'true')
       WHERE json_extract(config, '$."security.privileged"') IS NULL""",
    """UPDATE snapshots SET config = json_set(config, '$."security.privileged"', 'true')
       WHERE json_extract(config, '$."security.privileged"') IS NULL""",
],
    # 3: custom storage volumes (the `storage_volumes` table, which SCHEMA's CREATE ... IF NOT EXISTS adds).
    3: []}
Statement = tuple[str, tuple[Any, ...]]


@dataclass
class InstanceRow:
    project: str
    name: str
    type: str
    architecture: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)
    ephemeral: bool = False
    created_at: float = 0.0
    last_used_at: float = 0.0


@dataclass
class SnapshotRow:
    project: str
    instance: str
    name: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)
    created_at: float = 0.0


@dataclass
class ProfileRow:
    name: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class PoolRow:
    name: str
    driver: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)


@dataclass
class VolumeRow:
    """A custom storage volume (the instances' own volumes have no row: their instance is the record)."""

    pool: str
    project: str
    name: str
    description: str = ""
    content_type: str = "filesystem"
    config: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0


@dataclass
class NetworkRow:
    name: str
    type: str = "bridge"
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)


@dataclass
class ProjectRow:
    name: str
    description: str = ""
    config: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageRow:
    fingerprint: str
    filename: str
    size: int
    type: str
    architecture: str
    properties: dict[str, str] = field(default_factory=dict)
    public: bool = False
    created_at: float = 0.0


@dataclass
class CertificateRow:
    fingerprint: str
    name: str
    type: str
    certificate: str
    restricted: bool = False
    projects: list[str] = field(default_factory=list)


@dataclass
class TokenRow:
    secret: str
    name: str
    expires_at: float
    operation: str


def _private_database(path: Path) -> None:
    """Root's alone before SQLite opens it (its -wal and -shm files take the database file's mode)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    os.chmod(path, 0o600)


class Store:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Store:
        await asyncio.to_thread(_private_database, path)
        conn = await aiosqlite.connect(path)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        async with conn.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            await conn.close()
            raise InternalError(f"The database {path} is of schema version {version}, newer than this stapesd "
                                f"understands ({SCHEMA_VERSION}): run the newer stapesd")
        await conn.executescript(SCHEMA)
        for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                await conn.execute(statement)
        await conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await conn.commit()
        return cls(conn)

    async def close(self) -> None:
        await self._conn.close()

    async def _all(self, sql: str, args: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        async with self._conn.execute(sql, tuple(args)) as cursor:
            return list(await cursor.fetchall())

    async def _transaction(self, statements: list[Statement], conflict: str = "") -> int:
        """Run the statements as one transaction; returns the rows the last one changed."""
        async with self._write_lock:
            count = 0
            try:
                for sql, args in statements:
                    cursor = await self._conn.execute(sql, args)
                    count = cursor.rowcount
                await self._conn.commit()
            except aiosqlite.IntegrityError as err:
                await self._conn.rollback()
                raise Conflict(conflict or f"Already exists: {err}") from None
            except BaseException:
                await asyncio.shield(self._conn.rollback())
                raise
            return count

    async def _write(self, sql: str, args: Iterable[Any] = (), conflict: str = "") -> int:
        return await self._transaction([(sql, tuple(args))], conflict)

    # server config
    async def server_config(self) -> dict[str, str]:
        return {row["key"]: row["value"] for row in await self._all("SELECT key, value FROM config")}

    async def replace_server_config(self, config: dict[str, str]) -> None:
        await self._transaction([("DELETE FROM config", ()),
                                 *(("INSERT INTO config VALUES (?, ?)", item) for item in config.items())])

    # projects
    async def projects(self) -> list[ProjectRow]:
        rows = await self._all("SELECT * FROM projects ORDER BY name")
        return [ProjectRow(r["name"], r["description"], json.loads(r["config"])) for r in rows]

    async def project(self, name: str) -> ProjectRow:
        for project in await self.projects():
            if project.name == name:
                return project
        raise NotFound(f"Project {name!r} not found")

    async def create_project(self, row: ProjectRow) -> None:
        await self._write("INSERT INTO projects VALUES (?, ?, ?)", (row.name, row.description, json.dumps(row.config)))

    async def update_project(self, row: ProjectRow) -> None:
        await self._write(
            "UPDATE projects SET description=?, config=? WHERE name=?",
            (row.description, json.dumps(row.config), row.name),
        )

    async def rename_project(self, old: str, new: str) -> None:
        await self._write("UPDATE projects SET name=? WHERE name=?", (new, old))

    async def delete_project(self, name: str) -> None:
        await self._write("DELETE FROM projects WHERE name=?", (name,))

    # profiles
    async def profiles(self) -> list[ProfileRow]:
        rows = await self._all("SELECT * FROM profiles ORDER BY name")
        return [
            ProfileRow(r["name"], r["description"], json.loads(r["config"]), json.loads(r["devices"])) for r in rows
        ]

    async def profile(self, name: str) -> ProfileRow:
        rows = await self._all("SELECT * FROM profiles WHERE name=?", (name,))
        if not rows:
            raise NotFound(f"Profile {name!r} not found")
        r = rows[0]
        return ProfileRow(r["name"], r["description"], json.loads(r["config"]), json.loads(r["devices"]))

    async def create_profile(self, row: ProfileRow) -> None:
        await self._write(
            "INSERT INTO profiles VALUES (?, ?, ?, ?)",
            (row.name, row.description, json.dumps(row.config), json.dumps(row.devices)),
        )

    async def update_profile(self, row: ProfileRow) -> None:
        await self._write(
            "UPDATE profiles SET description=?, config=?, devices=? WHERE name=?",
            (row.description, json.dumps(row.config), json.dumps(row.devices), row.name),
        )

    async def rename_profile(self, old: str, new: str) -> None:
        await self._write("UPDATE profiles SET name=? WHERE name=?", (new, old))

    async def delete_profile(self, name: str) -> None:
        await self._write("DELETE FROM profiles WHERE name=?", (name,))

    # storage pools
    async def pools(self) -> list[PoolRow]:
        rows = await self._all("SELECT * FROM storage_pools ORDER BY name")
        return [PoolRow(r["name"], r["driver"], r["description"], json.loads(r["config"])) for r in rows]

    async def pool(self, name: str) -> PoolRow:
        for pool in await self.pools():
            if pool.name == name:
                return pool
        raise NotFound(f"Storage pool {name!r} not found")

    async def create_pool(self, row: PoolRow) -> None:
        await self._write(
            "INSERT INTO storage_pools VALUES (?, ?, ?, ?)",
            (row.name, row.driver, row.description, json.dumps(row.config)),
        )

    async def update_pool(self, row: PoolRow) -> None:
        await self._write(
            "UPDATE storage_pools SET description=?, config=? WHERE name=?",
            (row.description, json.dumps(row.config), row.name),
        )

    async def delete_pool(self, name: str) -> None:
        await self._write("DELETE FROM storage_pools WHERE name=?", (name,))

    # custom storage volumes
    @staticmethod
    def _volume(r: aiosqlite.Row) -> VolumeRow:
        return VolumeRow(r["pool"], r["project"], r["name"], r["description"], r["content_type"],
                         json.loads(r["config"]), r["created_at"])

    async def volumes(self, pool: str | None = None) -> list[VolumeRow]:
        if pool is None:
            rows = await self._all("SELECT * FROM storage_volumes ORDER BY pool, project, name")
        else:
            rows = await self._all("SELECT * FROM storage_volumes WHERE pool=? ORDER BY project, name", (pool,))
        return [self._volume(r) for r in rows]

    async def volume(self, pool: str, project: str, name: str) -> VolumeRow:
        rows = await self._all("SELECT * FROM storage_volumes WHERE pool=? AND project=? AND name=?",
                               (pool, project, name))
        if not rows:
            raise NotFound(f"Storage volume {name!r} not found in pool {pool!r}")
        return self._volume(rows[0])

    async def create_volume(self, row: VolumeRow) -> None:
        row.created_at = row.created_at or time.time()
        await self._write("INSERT INTO storage_volumes VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (row.pool, row.project, row.name, row.description, row.content_type,
                           json.dumps(row.config), row.created_at),
                          conflict=f"Storage volume {row.name!r} already exists in pool {row.pool!r}")

    async def update_volume(self, row: VolumeRow) -> None:
        await self._write("UPDATE storage_volumes SET description=?, config=? WHERE pool=? AND project=? AND name=?",
                          (row.description, json.dumps(row.config), row.pool, row.project, row.name))

    async def rename_volume(self, pool: str, project: str, old: str, new: str) -> None:
        await self._write("UPDATE storage_volumes SET name=? WHERE pool=? AND project=? AND name=?",
                          (new, pool, project, old),
                          conflict=f"Storage volume {new!r} already exists in pool {pool!r}")

    async def delete_volume(self, pool: str, project: str, name: str) -> None:
        await self._write("DELETE FROM storage_volumes WHERE pool=? AND project=? AND name=?", (pool, project, name))

    # networks
    async def networks(self) -> list[NetworkRow]:
        rows = await self._all("SELECT * FROM networks ORDER BY name")
        return [NetworkRow(r["name"], r["type"], r["description"], json.loads(r["config"])) for r in rows]

    async def network(self, name: str) -> NetworkRow:
        rows = await self._all("SELECT * FROM networks WHERE name=?", (name,))
        if not rows:
            raise NotFound(f"Network {name!r} not found")
        r = rows[0]
        return NetworkRow(r["name"], r["type"], r["description"], json.loads(r["config"]))

    async def create_network(self, row: NetworkRow) -> None:
        await self._write("INSERT INTO networks VALUES (?, ?, ?, ?)",
                          (row.name, row.type, row.description, json.dumps(row.config)),
                          conflict=f"Network {row.name!r} already exists")

    async def update_network(self, row: NetworkRow) -> None:
        await self._write("UPDATE networks SET description=?, config=? WHERE name=?",
                          (row.description, json.dumps(row.config), row.name))

    async def delete_network(self, name: str) -> None:
        await self._write("DELETE FROM networks WHERE name=?", (name,))

    # instances
    @staticmethod
    def _instance(r: aiosqlite.Row) -> InstanceRow:
        return InstanceRow(
            project=r["project"], name=r["name"], type=r["type"], architecture=r["architecture"],
            description=r["description"], config=json.loads(r["config"]), devices=json.loads(r["devices"]),
            profiles=json.loads(r["profiles"]), ephemeral=bool(r["ephemeral"]), created_at=r["created_at"],
            last_used_at=r["last_used_at"],
        )

    async def instances(self, project: str | None = None) -> list[InstanceRow]:
        if project is None:
            rows = await self._all("SELECT * FROM instances ORDER BY project, name")
        else:
            rows = await self._all("SELECT * FROM instances WHERE project=? ORDER BY name", (project,))
        return [self._instance(r) for r in rows]

    async def instance(self, project: str, name: str) -> InstanceRow:
        rows = await self._all("SELECT * FROM instances WHERE project=? AND name=?", (project, name))
        if not rows:
            raise NotFound(f"Instance {name!r} not found in project {project!r}")
        return self._instance(rows[0])

    async def create_instance(self, row: InstanceRow) -> None:
        row.created_at = row.created_at or time.time()
        await self._write(
            "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.project, row.name, row.type, row.architecture, row.description, json.dumps(row.config),
             json.dumps(row.devices), json.dumps(row.profiles), int(row.ephemeral), row.created_at,
             row.last_used_at),
            conflict=f"Instance {row.name!r} already exists in project {row.project!r}")

    async def update_instance(self, row: InstanceRow) -> None:
        await self._write(
            "UPDATE instances SET description=?, config=?, devices=?, profiles=?, ephemeral=?, last_used_at=?"
            " WHERE project=? AND name=?",
            (row.description, json.dumps(row.config), json.dumps(row.devices), json.dumps(row.profiles),
             int(row.ephemeral), row.last_used_at, row.project, row.name),
        )

    async def rename_instance(self, project: str, old: str, new: str) -> None:
        """The instance and its snapshots, together."""
        await self._transaction([
            ("UPDATE instances SET name=? WHERE project=? AND name=?", (new, project, old)),
            ("UPDATE snapshots SET instance=? WHERE project=? AND instance=?", (new, project, old)),
        ], conflict=f"Instance {new!r} already exists in project {project!r}")

    async def delete_instance(self, project: str, name: str) -> None:
        """The instance and its snapshots, together."""
        await self._transaction([("DELETE FROM snapshots WHERE project=? AND instance=?", (project, name)),
                                 ("DELETE FROM instances WHERE project=? AND name=?", (project, name))])

    # snapshots
    async def snapshots(self, project: str, instance: str) -> list[SnapshotRow]:
        rows = await self._all("SELECT * FROM snapshots WHERE project=? AND instance=? ORDER BY created_at, name",
                               (project, instance))
        return [self._snapshot(r) for r in rows]

    async def all_snapshots(self) -> list[SnapshotRow]:
        rows = await self._all("SELECT * FROM snapshots ORDER BY project, instance, created_at, name")
        return [self._snapshot(r) for r in rows]

    @staticmethod
    def _snapshot(r: aiosqlite.Row) -> SnapshotRow:
        return SnapshotRow(r["project"], r["instance"], r["name"], r["description"], json.loads(r["config"]),
                           json.loads(r["devices"]), json.loads(r["profiles"]), r["created_at"])

    async def create_snapshot(self, row: SnapshotRow) -> None:
        await self._write(
            "INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.project, row.instance, row.name, row.description, json.dumps(row.config),
             json.dumps(row.devices), json.dumps(row.profiles), row.created_at or time.time()),
            conflict=f"Snapshot {row.name!r} of {row.instance!r} already exists")

    async def delete_snapshot(self, project: str, instance: str, name: str) -> None:
        await self._write("DELETE FROM snapshots WHERE project=? AND instance=? AND name=?", (project, instance, name))

    async def delete_snapshots(self, project: str, instance: str) -> None:
        await self._write("DELETE FROM snapshots WHERE project=? AND instance=?", (project, instance))

    async def rename_snapshot(self, project: str, instance: str, old: str, new: str) -> None:
        await self._write("UPDATE snapshots SET name=? WHERE project=? AND instance=? AND name=?",
                          (new, project, instance, old), conflict=f"Snapshot {new!r} of {instance!r} already exists")

    # images
    @staticmethod
    def _image(r: aiosqlite.Row) -> ImageRow:
        return ImageRow(r["fingerprint"], r["filename"], r["size"], r["type"], r["architecture"],
                        json.loads(r["properties"]), bool(r["public"]), r["created_at"])

    async def images(self) -> list[ImageRow]:
        return [self._image(r) for r in await self._all("SELECT * FROM images ORDER BY created_at")]

    async def create_image(self, row: ImageRow) -> None:
        await self._write(
            "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.fingerprint, row.filename, row.size, row.type, row.architecture, json.dumps(row.properties),
             int(row.public), row.created_at or time.time()),
        )

    async def delete_image(self, fingerprint: str) -> None:
        await self._transaction([("DELETE FROM image_aliases WHERE fingerprint=?", (fingerprint,)),
                                 ("DELETE FROM images WHERE fingerprint=?", (fingerprint,))])

    async def aliases(self) -> dict[str, tuple[str, str]]:
        rows = await self._all("SELECT * FROM image_aliases ORDER BY name")
        return {r["name"]: (r["fingerprint"], r["description"]) for r in rows}

    async def set_alias(self, name: str, fingerprint: str, description: str = "") -> None:
        await self._write("INSERT OR REPLACE INTO image_aliases VALUES (?, ?, ?)", (name, fingerprint, description))

    async def delete_alias(self, name: str) -> int:
        return await self._write("DELETE FROM image_aliases WHERE name=?", (name,))

    # certificates and tokens
    async def certificates(self) -> list[CertificateRow]:
        rows = await self._all("SELECT * FROM certificates ORDER BY name")
        return [CertificateRow(r["fingerprint"], r["name"], r["type"], r["certificate"], bool(r["restricted"]),
                               json.loads(r["projects"])) for r in rows]

    async def add_certificate(self, row: CertificateRow) -> None:
        await self._write("INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?)",
                          (row.fingerprint, row.name, row.type, row.certificate, int(row.restricted),
                           json.dumps(row.projects)), conflict="This certificate is already trusted")

    async def delete_certificate(self, fingerprint: str) -> int:
        return await self._write("DELETE FROM certificates WHERE fingerprint=?", (fingerprint,))

    async def tokens(self) -> list[TokenRow]:
        rows = await self._all("SELECT * FROM trust_tokens")
        return [TokenRow(r["secret"], r["name"], r["expires_at"], r["operation"]) for r in rows]

    async def add_token(self, row: TokenRow) -> None:
        await self._write("INSERT INTO trust_tokens VALUES (?, ?, ?, ?)",
                          (row.secret, row.name, row.expires_at, row.operation))

    async def rename_token(self, secret: str, new: str) -> None:
        await self._write("UPDATE trust_tokens SET secret=? WHERE secret=?", (new, secret))

    async def take_token(self, secret: str) -> TokenRow | None:
        """Single use, in one statement: of two concurrent takers exactly one gets the row."""
        async with self._write_lock:
            async with self._conn.execute("DELETE FROM trust_tokens WHERE secret=? RETURNING *", (secret,)) as cur:
                rows = list(await cur.fetchall())
            await self._conn.commit()
        if not rows:
            return None
        r = rows[0]
        return TokenRow(r["secret"], r["name"], r["expires_at"], r["operation"])

    async def delete_token_by_operation(self, operation: str) -> int:
        return await self._write("DELETE FROM trust_tokens WHERE operation=?", (operation,))
