"""Instance backups: tarballs made on the server (export) and instances made from a tarball (import).

Backups live in `<state>/backups/instances/<volume>/` (0700: each holds a whole root filesystem): `<name>.backup`
(the tarball, whatever its compression) and `<name>.json` (its record), with an expiry, removed with their
instance (and moved when it is renamed). A backup is written by GNU tar (never following the rootfs's
symlinks, one file system) piped into the compressor, straight to disk, off the event loop.

An import first streams the upload to `<state>/backups/imports/` (bounded by the free space there less what
the other uploads in progress still have to write: one shared reservation), reads index.yaml (before
answering: a bad index is a 400), then in its operation checks every member in a child process
(backup_archive: nothing is extracted before the whole archive passed), which writes the accepted members as a
canonical plain tar beside the upload; GNU tar extracts that file, never the upload, into a new volume through
`InstanceService.create_with`, whose undo removes the volume, its snapshots and the rows on any failure or
cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import StreamReader

from stapes.api.backups import ALGORITHMS, BackupIndex, IndexSnapshot, parse_index, parse_time
from stapes.api.config_keys import is_true, validate_instance_config
from stapes.api.devices import Devices, expand_devices, root_disk, validate_devices
from stapes.api.documents import load_yaml
from stapes.api.errors import BadRequest, Conflict, InternalError, NotFound, RequestTooLarge, StapesError
from stapes.api.names import validate_entity_name, validate_instance_name
from stapes.api.timefmt import NEVER, iso
from stapes.server import process
from stapes.server.images.store import ARCHITECTURE
from stapes.server.instances import backup_archive as archive
from stapes.server.instances.service import InstanceService
from stapes.server.operations import Operation
from stapes.server.storage.base import PoolDriver, Volume, volume_name
from stapes.server.storage.bound import PoolFull, reserve_for
from stapes.server.storage.service import StorageService
from stapes.server.store.db import InstanceRow, SnapshotRow, Store
from stapes.server.streams import Tool, finish, kill, spawn_tool

log = logging.getLogger(__name__)
EXPIRY_INTERVAL = 60.0
UPLOAD_MARGIN = 256 << 20  # an upload never fills the disk the state directory is on
_DEFAULT_NAME = re.compile(r"^backup(\d+)$")


class _PlainDumper(yaml.SafeDumper):
    """No anchors and aliases: importers (ours included) refuse them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@dataclass
class BackupRecord:
    name: str
    created_at: float
    expires_at: float  # 0: never
    instance_only: bool
    optimized_storage: bool
    compression_algorithm: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "created_at": iso(self.created_at), "expires_at": iso(self.expires_at, NEVER),
                "instance_only": self.instance_only, "optimized_storage": self.optimized_storage}


@dataclass
class ImportPlan:
    upload: Path
    row: InstanceRow
    snapshots: list[SnapshotRow]
    pool: str


def validate_backup_name(name: str) -> None:
    validate_entity_name("backup", name)
    if name.startswith("."):
        raise BadRequest(f"Invalid backup name {name!r}: it must not start with a dot")


class BackupService:
    def __init__(self, store: Store, instances: InstanceService, storage: StorageService, state_dir: Path) -> None:
        self._store = store
        self._instances = instances
        self._storage = storage
        self.root = state_dir / "backups"
        self._expiry: asyncio.Task[None] | None = None
        self._uploads: dict[Path, list[int]] = {}  # uploads in progress: [bytes reserved, bytes written]

    # server life
    async def start(self) -> None:
        """The 0700 directories; what an interrupted backup or upload left is removed; expiry runs."""
        def prepare() -> None:
            for directory in (self.root, self.root / "instances", self.root / "imports"):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(directory, 0o700)
            shutil.rmtree(self.root / "imports", ignore_errors=True)
            (self.root / "imports").mkdir(mode=0o700, exist_ok=True)
            for leftover in (self.root / "instances").glob("*/.*"):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()

        await asyncio.to_thread(prepare)
        self._expiry = asyncio.create_task(self._expire_loop(), name="backup expiry")

    async def shutdown(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry

    async def _expire_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._expire_all)
            except Exception:
                log.exception("could not remove expired backups")
            await asyncio.sleep(EXPIRY_INTERVAL)

    def _expire_all(self) -> None:
        for record_file in (self.root / "instances").glob("*/*.json"):
            self._expire_one(record_file)

    def _expire_one(self, record_file: Path) -> bool:
        """True when the backup expired and was removed."""
        try:
            record = BackupRecord(**json.loads(record_file.read_text()))
        except (OSError, ValueError, TypeError):
            return False
        if not record.expires_at or record.expires_at > time.time():
            return False
        log.info("removing expired backup %s", record_file.with_suffix(""))
        record_file.with_suffix(".backup").unlink(missing_ok=True)
        record_file.unlink(missing_ok=True)
        return True

    # records
    def directory(self, project: str, name: str) -> Path:
        return self.root / "instances" / volume_name(project, name)

    def tarball(self, project: str, name: str, backup: str) -> Path:
        return self.directory(project, name) / f"{backup}.backup"

    async def records(self, project: str, name: str) -> list[BackupRecord]:
        await self._store.instance(project, name)

        def read() -> list[BackupRecord]:
            records = []
            for record_file in sorted(self.directory(project, name).glob("*.json")):
                if self._expire_one(record_file):
                    continue
                with contextlib.suppress(OSError, ValueError, TypeError):
                    records.append(BackupRecord(**json.loads(record_file.read_text())))
            return sorted(records, key=lambda r: (r.created_at, r.name))

        return await asyncio.to_thread(read)

    async def get(self, project: str, name: str, backup: str) -> BackupRecord:
        for record in await self.records(project, name):
            if record.name == backup:
                return record
        raise NotFound(f"Backup {backup!r} of instance {name!r} not found")

    async def next_name(self, project: str, name: str) -> str:
        """backupN, one above the highest such name (as Incus numbers them)."""
        numbers = [int(m.group(1)) for r in await self.records(project, name) if (m := _DEFAULT_NAME.match(r.name))]
        return f"backup{max(numbers) + 1 if numbers else 0}"

    async def delete(self, project: str, name: str, backup: str) -> None:
        await self.get(project, name, backup)
        directory = self.directory(project, name)

        def remove() -> None:
            (directory / f"{backup}.backup").unlink(missing_ok=True)
            (directory / f"{backup}.json").unlink(missing_ok=True)

        await asyncio.to_thread(remove)

    async def rename(self, project: str, name: str, backup: str, new: str) -> None:
        validate_backup_name(new)
        record = await self.get(project, name, backup)
        directory = self.directory(project, name)
        if (directory / f"{new}.json").exists():
            raise Conflict(f"Backup {new!r} of instance {name!r} already exists")
        record.name = new

        def move() -> None:
            os.rename(directory / f"{backup}.backup", directory / f"{new}.backup")
            _write_record(directory, record)
            (directory / f"{backup}.json").unlink()

        await asyncio.to_thread(move)

    async def instance_removed(self, project: str, name: str, new_name: str | None) -> None:
        """The instance was deleted (its backups go with it) or renamed (they follow it)."""
        directory = self.directory(project, name)
        if not directory.exists():
            return
        if new_name is None:
            await asyncio.to_thread(shutil.rmtree, directory, True)
        else:
            target = self.directory(project, new_name)
            await asyncio.to_thread(shutil.rmtree, target, True)
            await asyncio.to_thread(os.rename, directory, target)

    # export
    async def check_create(self, project: str, name: str, backup: str, compression: str) -> None:
        validate_backup_name(backup)
        if compression not in ALGORITHMS:
            raise BadRequest(f"Unknown compression algorithm {compression!r}: use {', '.join(ALGORITHMS)}")
        tool = archive.COMPRESSION_TOOLS.get(compression)
        if tool is not None and shutil.which(tool[0]) is None:
            raise BadRequest(f"Compression {compression!r} needs {tool[0]}, which this server lacks: choose another")
        row = await self._store.instance(project, name)
        if row.type != "container":
            raise BadRequest("Only containers can be backed up here")
        if any(r.name == backup for r in await self.records(project, name)):
            raise Conflict(f"Backup {backup!r} of instance {name!r} already exists")

    async def create(self, op: Operation, project: str, name: str, backup: str, *, expires_at: float,
                     instance_only: bool, compression: str) -> None:
        """Under the instance's lock: no delete, rename or snapshot change while its files are read."""
        async with self._instances.changing(project, name):
            await self.check_create(project, name, backup, compression)
            row = await self._store.instance(project, name)
            spec = await self._instances.spec(row)
            pool = await self._instances.pool_of(spec)
            volume = Volume.of(row.type, project, name)
            snapshots = [] if instance_only else await self._store.snapshots(project, name)
            directory = self.directory(project, name)
            work = directory / f".{backup}.work"
            partial = directory / f".{backup}.partial"
            index = await self._index(row, pool, snapshots)
            record = BackupRecord(backup, time.time(), expires_at, instance_only, False, compression)

            def prepare() -> None:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                work.mkdir(mode=0o700)
                (work / "index.yaml").write_text(yaml.dump(index, Dumper=_PlainDumper, sort_keys=False))
                (work / archive.INCUS_CONFIG).write_text(yaml.dump(index["config"], Dumper=_PlainDumper,
                                                                   sort_keys=False))

            try:
                await asyncio.to_thread(prepare)
                argv = archive.export_argv(pool.root, pool.volume_path(volume),
                                           [pool.snapshot_path(volume, s.name) for s in snapshots], work)

                def progress(size: int, rate: float) -> None:
                    op.update_metadata(create_backup_progress=f"{_size(size)} ({_size(rate)}/s)",
                                       progress={"stage": "create_backup", "processed": size,
                                                 "text": f"{_size(size)} ({_size(rate)}/s)"})

                await _write_tarball(argv, compression, partial, progress)
                await asyncio.to_thread(os.replace, partial, directory / f"{backup}.backup")
                await asyncio.to_thread(_write_record, directory, record)
            finally:
                await asyncio.to_thread(shutil.rmtree, work, True)
                await asyncio.to_thread(partial.unlink, True)

    async def _index(self, row: InstanceRow, pool: PoolDriver, snapshots: list[SnapshotRow]) -> dict[str, Any]:
        """Incus's index.yaml: backup.Info with the embedded config (instance, snapshots, pool, profiles,
        volume), which Incus's own import reads."""
        instance = await self._instances.render(row, with_state=False)
        pool_row = await self._store.pool(pool.pool)
        profiles = []
        for profile_name in row.profiles:
            profile = await self._store.profile(profile_name)
            profiles.append({"name": profile.name, "description": profile.description, "config": profile.config,
                             "devices": profile.devices, "used_by": []})
        return {
            "name": row.name, "backend": pool_row.driver, "pool": pool.pool,
            "snapshots": [s.name for s in snapshots], "optimized": False, "optimized_header": False,
            "type": "container",
            "config": {
                "container": instance,
                "snapshots": [self._instances.render_snapshot(row, s) for s in snapshots],
                "pool": {"name": pool_row.name, "driver": pool_row.driver, "description": pool_row.description,
                         "config": pool_row.config, "status": "Created", "locations": ["none"], "used_by": []},
                "profiles": profiles,
                "volume": {"name": row.name, "type": "container", "content_type": "filesystem", "config": {},
                           "description": "", "project": row.project, "location": "none", "used_by": []},
            },
        }

    # import
    def _import_room(self, excluded: Path | None = None) -> int:
        """The bytes an upload (or a canonical archive) may still write in the imports directory: its free
        space less UPLOAD_MARGIN and less what the other uploads in progress have reserved and not written."""
        stat = os.statvfs(self.root / "imports")
        pending = sum(max(reserved - written, 0) for path, (reserved, written) in self._uploads.items()
                      if path != excluded)
        return stat.f_bavail * stat.f_frsize - UPLOAD_MARGIN - pending

    async def receive_upload(self, content: StreamReader, length: int | None) -> Path:
        """The body on disk (0600, in a 0700 directory), never past the free space less UPLOAD_MARGIN and the
        other uploads' reservations (a declared length is reserved whole at the start); nothing is left behind
        if it fails or the client goes away."""
        directory = self.root / "imports"
        upload = directory / f"{uuid.uuid4()}.upload"
        room = self._import_room()
        if length is not None and length > room:
            raise RequestTooLarge(f"The backup ({length // 2**20} MiB) is larger than the {max(room, 0) // 2**20} MiB "
                                  "this server has free for it")
        state = self._uploads[upload] = [length or 0, 0]
        try:
            fd = await asyncio.to_thread(os.open, upload, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                async for chunk in content.iter_chunked(1 << 20):
                    reserved, written = state
                    room = self._import_room(upload)
                    if max(reserved - written, len(chunk)) > room:
                        raise RequestTooLarge(f"The backup is larger than the {max(room, 0) // 2**20} MiB this "
                                              "server has free for it")
                    state[1] += len(chunk)
                    await asyncio.to_thread(out.write, chunk)
        except BaseException:
            upload.unlink(missing_ok=True)
            raise
        finally:
            del self._uploads[upload]
        return upload

    async def inspect(self, upload: Path, project: str, *, pool: str = "", name: str = "") -> ImportPlan:
        """The instance the backup describes, as it will be created here: checked as a create request is."""
        text = (await _run_checker(["index", str(upload)]))["index"]
        document = await asyncio.to_thread(load_yaml, text, "The backup's index.yaml", archive.MAX_INDEX_BYTES)
        index = parse_index(document)
        container = index.config.container  # type: ignore[union-attr]
        assert container is not None
        target_name = name or index.name or container.name
        validate_instance_name(target_name)
        if container.architecture and container.architecture != ARCHITECTURE:
            raise BadRequest(f"The backup is of a {container.architecture} instance; this server runs "
                             f"{ARCHITECTURE} ones")
        profiles = ["default"] if container.profiles is None else list(container.profiles)
        for profile in profiles:
            try:
                await self._store.profile(profile)
            except NotFound:
                raise BadRequest(f"The backup's instance uses profile {profile!r}, which this server lacks: create "
                                 "it here first") from None
        devices = dict(container.devices or {})
        validate_devices(devices)
        target_pool = await self._target_pool(index, pool)
        devices = await self._on_pool(devices, profiles, target_pool)
        row = InstanceRow(project=project, name=target_name, type="container", architecture=ARCHITECTURE,
                          description=container.description, config=dict(container.config or {}), devices=devices,
                          profiles=profiles, ephemeral=container.ephemeral)
        await self._instances.from_peer(row)  # its own keys, MACs and base image; never another server's state
        await self._instances.validate_new(row)
        snapshots = [await self._snapshot_row(row, snap, target_pool) for snap in _ordered(index)]
        return ImportPlan(upload, row, snapshots, target_pool)

    async def _target_pool(self, index: BackupIndex, requested: str) -> str:
        """The pool asked for; else the backup's own if this server has it; else the default profile's (as
        Incus chooses)."""
        if requested:
            await self._store.pool(requested)
            return requested
        if index.pool:
            with contextlib.suppress(NotFound):
                await self._store.pool(index.pool)
                return index.pool
        root = root_disk((await self._store.profile("default")).devices)
        if root is None or not root[1].get("pool"):
            raise BadRequest(f"The backup's pool {index.pool!r} does not exist here and the default profile has no "
                             "root disk: import with -s POOL")
        return root[1]["pool"]

    async def _on_pool(self, devices: Devices, profiles: list[str], pool: str) -> dict[str, dict[str, str]]:
        """The instance's own devices with its root disk on `pool`: its own root device is pointed there, or,
        when the root disk comes from a profile on another pool, a root device of its own is added."""
        result = {k: dict(v) for k, v in devices.items()}
        own = root_disk(result)
        if own is not None:
            result[own[0]]["pool"] = pool
            return result
        profile_devices = [(await self._store.profile(p)).devices for p in profiles]
        expanded = root_disk(expand_devices(profile_devices, result))
        if expanded is None:
            result["root"] = {"type": "disk", "path": "/", "pool": pool}
        elif expanded[1].get("pool") != pool:
            result[expanded[0]] = {**expanded[1], "pool": pool}
        return result

    async def _snapshot_row(self, row: InstanceRow, snap: IndexSnapshot, pool: str) -> SnapshotRow:
        config = {k: v for k, v in (snap.config or {}).items() if not k.startswith("volatile.")}
        profiles = ["default"] if snap.profiles is None else list(snap.profiles)
        what = f"The backup's snapshot {snap.name!r}"
        try:
            validate_instance_config(config)
            devices = dict(snap.devices or {})
            validate_devices(devices)
        except StapesError as err:
            raise BadRequest(f"{what}: {err.message}") from None
        for profile in profiles:
            try:
                await self._store.profile(profile)
            except NotFound:
                raise BadRequest(f"{what} uses profile {profile!r}, which this server lacks: create it here first, "
                                 "or export with --instance-only") from None
        devices = await self._on_pool(devices, profiles, pool)
        return SnapshotRow(row.project, row.name, snap.name, snap.description, config, devices, profiles,
                           parse_time(snap.created_at, f"creation time of snapshot {snap.name!r}") or time.time())

    async def run_import(self, op: Operation, plan: ImportPlan) -> None:
        """Check every member, then extract into a new instance; nothing of it is left if anything fails or
        the operation is cancelled. The upload and the canonical archive are removed in every case."""
        canonical = plan.upload.with_suffix(".canonical")
        try:
            pool = await self._storage.driver(plan.pool)
            usage = await pool.usage()
            room = usage["total"] - usage["used"] - reserve_for(usage["total"])
            config, _ = await self._instances.expand(plan.row)
            privileged = is_true(config.get("security.privileged"))
            args = ["check", str(plan.upload), f"--room={max(room, 0)}", f"--out={canonical}",
                    f"--out-room={max(await asyncio.to_thread(self._import_room), 0)}",
                    *[f"--snapshot={s.name}" for s in plan.snapshots]]
            if privileged:
                args.append("--devices")
            else:
                args.append(f"--max-id={await self._max_id(plan.row)}")
            op.update_metadata(progress={"stage": "check", "text": "checking the backup"})
            summary = await _run_checker(args)
            await asyncio.to_thread(_check_canonical, canonical)
            if not summary["container_seen"]:
                raise BadRequest(f"The backup holds no {archive.CONTAINER}/ (the instance's files)")
            missing = sorted({s.name for s in plan.snapshots} - set(summary["snapshots_seen"]))
            if missing:
                raise BadRequest(f"The backup lists snapshots it holds no files for: {', '.join(missing)}")
            volume = Volume.of(plan.row.type, plan.row.project, plan.row.name)
            total = int(summary["data_bytes"])
            check = self._instances.driver(plan.row.type).check_volume_layout

            async def fill(path: Path) -> None:
                for snap in plan.snapshots:
                    target = await pool.prepare_snapshot_target(volume, snap.name)
                    await self._extract(op, canonical, target, f"{archive.SNAPSHOTS}/{snap.name}", pool, total,
                                        check)
                    await self._instances.record_snapshot(snap)
                await self._extract(op, canonical, path, archive.CONTAINER, pool, total, check)

            await self._instances.create_with(plan.row, fill)
        finally:
            await asyncio.to_thread(plan.upload.unlink, True)
            await asyncio.to_thread(canonical.unlink, True)

    async def _max_id(self, row: InstanceRow) -> int:
        spec = await self._instances.spec(row)
        sizes = [r.size for r in spec.idmap if r.inside == 0]
        return (min(sizes) if sizes else 65536) - 1

    async def _extract(self, op: Operation, canonical: Path, target: Path, member: str, pool: PoolDriver,
                       total: int, check: Callable[[Path], None]) -> None:
        """GNU tar, one tree of the canonical archive the checker wrote; stopped (and the import failed) if the
        pool's free space falls to its reserve while it writes."""
        op.update_metadata(progress={"stage": "unpack", "text": f"unpacking {member}"})
        tool = await spawn_tool(archive.extract_argv(canonical, target, member), stdin=asyncio.subprocess.DEVNULL,
                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            waiting = asyncio.ensure_future(finish(tool, f"Unpacking the backup's {member}"))
            while not waiting.done():
                await asyncio.wait([waiting], timeout=0.5)
                if not waiting.done():
                    usage = await pool.usage()
                    if usage["total"] - usage["used"] < reserve_for(usage["total"]):
                        raise PoolFull(f"Storage pool {pool.pool!r} filled up while the backup was unpacked "
                                       f"({total // 2**20} MiB): free space, or import into another pool with -s")
            await waiting
        finally:
            await kill(tool)
        await asyncio.to_thread(_after_extract, target, check)


def _check_canonical(canonical: Path) -> None:
    """The canonical archive is a plain tar (block 0 a ustar header, which GNU tar never decompresses)."""
    with canonical.open("rb") as handle:
        head = handle.read(512)
    if len(head) < 512 or archive.compression_of(head) != "none":
        raise InternalError("The checked backup was not rewritten as a plain tar")


def _after_extract(target: Path, check: Callable[[Path], None]) -> None:
    check(target)
    config = target / archive.INCUS_CONFIG
    if config.is_file() and not config.is_symlink():
        config.unlink()


def _ordered(index: BackupIndex) -> list[IndexSnapshot]:
    """Snapshots oldest first (the index lists them so)."""
    described = {s.name: s for s in (index.config.snapshots if index.config else None) or []}
    return [described[name] for name in index.snapshots or []]


def _write_record(directory: Path, record: BackupRecord) -> None:
    target = directory / f"{record.name}.json"
    staged = directory / f".{record.name}.json.tmp"
    staged.write_text(json.dumps(asdict(record)))
    os.chmod(staged, 0o600)
    os.replace(staged, target)


def _size(value: float) -> str:
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024:
            return f"{amount:.2f}{unit}"
        amount /= 1024
    return f"{amount:.2f}TiB"


async def _run_checker(args: list[str]) -> dict[str, Any]:
    """backup_archive in a child process of its own (under a memory limit); a refusal is a 400."""
    proc = await process.spawn([sys.executable, "-m", "stapes.server.instances.backup_archive", *args],
                               stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                               stderr=asyncio.subprocess.PIPE)
    async with process.reaped(proc):
        stdout, stderr = await proc.communicate()
    try:
        result: dict[str, Any] = json.loads(stdout)
    except ValueError:
        raise BadRequest(f"The backup could not be read: {stderr.decode(errors='replace').strip()[-300:]}") from None
    if "error" in result:
        raise BadRequest(str(result["error"]))
    return result


async def _write_tarball(argv: list[str], compression: str, target: Path,
                         progress: Any) -> None:
    """tar | compressor > target (0600). tar's status 1 (a file changed while it was read: a running
    instance) is accepted, as Incus accepts it."""
    out = await asyncio.to_thread(os.open, target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    tools: list[Tool] = []
    try:
        tool_argv = archive.COMPRESSION_TOOLS.get(compression)
        if tool_argv is None:
            tools.append(await spawn_tool(argv, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                          stderr=asyncio.subprocess.PIPE))
        else:
            read_end, write_end = os.pipe()
            try:
                tools.append(await spawn_tool(argv, stdin=asyncio.subprocess.DEVNULL, stdout=write_end,
                                              stderr=asyncio.subprocess.PIPE))
                tools.append(await spawn_tool(tool_argv, stdin=read_end, stdout=out,
                                              stderr=asyncio.subprocess.PIPE))
            finally:
                os.close(read_end)
                os.close(write_end)
    except BaseException:
        for tool in tools:
            await kill(tool)
        raise
    finally:
        os.close(out)
    try:
        started = time.monotonic()
        waiting = asyncio.ensure_future(asyncio.gather(*(t.proc.wait() for t in tools)))
        while not waiting.done():
            await asyncio.wait([waiting], timeout=1.0)
            size = (await asyncio.to_thread(os.stat, target)).st_size
            progress(size, size / max(time.monotonic() - started, 0.001))
        codes = await waiting
        for tool, code in zip(tools, codes, strict=True):
            err = await tool.stderr.text() if tool.stderr is not None else ""
            if code != 0 and not (tool is tools[0] and code == 1):
                what = "tar" if tool is tools[0] else compression
                raise InternalError(f"Writing the backup failed ({what}, exit status {code}): {err.strip()[-500:]}")
            if code == 1:
                log.info("backup written while files changed: %s", err.strip()[-300:])
    finally:
        for tool in tools:
            await kill(tool)
