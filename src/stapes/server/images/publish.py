"""`publish`: an image from a stopped container or one of its snapshots (Incus's `POST /1.0/images` with
`source: {type: "instance" | "container" | "snapshot", name: "c1" | "c1/snap0"}`).

The image is what the store already imports: a unified tarball of metadata.yaml (the volume's own, with a
new architecture, creation date and the given properties) and rootfs/, written by `tar` from an argument
list, off the event loop, keeping numeric owners, modes, xattrs, device nodes and hard links and never
following a symlink. The instance is held (nothing starts, changes or moves it) until tar has read it; a
running instance is refused, as Incus's server does (its client's --force stops it first).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stapes.api.documents import load_yaml
from stapes.api.errors import BadRequest, InternalError, RequestTooLarge, StapesError
from stapes.api.status import StatusCode
from stapes.server import process
from stapes.server.images.store import ARCHITECTURE, MAX_METADATA_BYTES
from stapes.server.operations import Operation
from stapes.server.storage.base import Volume

if TYPE_CHECKING:
    from stapes.server.daemon import Daemon

FREE_SPACE_MARGIN = 256 << 20  # as for uploads: an image never fills the server's disk
STAGE = "create_image_from_container_pack"


def source_of(kind: str, name: str) -> tuple[str, str | None]:
    """(instance, snapshot or None) from a request's source, checked as Incus does. Pure: unit-tested."""
    if not name:
        raise BadRequest("No source provided: give source.name, the instance (or 'instance/snapshot')")
    if kind == "snapshot":
        instance, sep, snapshot = name.partition("/")
        if not sep or not instance or not snapshot or "/" in snapshot:
            raise BadRequest(f"{name!r} is not a snapshot: use 'instance/snapshot'")
        return instance, snapshot
    if kind in ("instance", "container"):
        if "/" in name:
            raise BadRequest(f"{name!r} is a snapshot: use source type 'snapshot'")
        return name, None
    raise BadRequest(f"Bad source type {kind!r} for an image: use instance or snapshot (or builtin)")


def image_metadata(existing: Any, architecture: str, properties: dict[str, str], now: float) -> dict[str, Any]:
    """The new image's metadata.yaml: the volume's own (its templates and properties), with this architecture
    and creation date, and the given properties over the old ones. Pure: unit-tested."""
    metadata = dict(existing) if isinstance(existing, dict) else {}
    old = metadata.get("properties")
    merged = {str(k): str(v) for k, v in old.items()} if isinstance(old, dict) else {}
    merged.update(properties)
    metadata.update(architecture=architecture, creation_date=int(now), properties=merged)
    return metadata


def _read_volume_metadata(volume: Path) -> Any:
    """The volume's metadata.yaml (from its image), read without following a symlink and bounded."""
    try:
        fd = os.open(volume / "metadata.yaml", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        data = os.read(fd, MAX_METADATA_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return load_yaml(data, "The instance's metadata.yaml", MAX_METADATA_BYTES)
    except StapesError:
        return {}  # a broken one is replaced, not carried into the image


def _tree_size(root: Path) -> int:
    """Roughly what tar will write (the figure progress and the space check are measured against): a file's
    allocated blocks, not its apparent size (tar --sparse writes no holes)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            data = min(st.st_size, st.st_blocks * 512) if stat.S_ISREG(st.st_mode) else 0
            total += 512 + (data + 511) // 512 * 512
    return total


def _free(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


async def publish(d: Daemon, op: Operation, project: str, kind: str, name: str, properties: dict[str, str],
                  public: bool) -> Any:
    """Build the tarball and import it; returns the store's row."""
    instance, snapshot = source_of(kind, name)
    instances = d.instances
    row = await instances.get(project, instance)
    if row.type != "container":
        raise BadRequest(f"Instance {instance!r} is a virtual machine: only containers can be published here")
    d.paths.images.mkdir(parents=True, exist_ok=True)
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="publish-", dir=d.paths.images))
    upload = work.with_suffix(".tar")
    try:
        async with instances.changing(project, instance):
            row = await instances.get(project, instance)
            spec = await instances.spec(row)
            if snapshot is None:
                if await instances.status(row) != StatusCode.STOPPED:
                    raise BadRequest(f"Cannot publish the running instance {instance!r}: stop it first (the "
                                     "client's --force stops it and starts it again)")
                volume = spec.volume
            else:
                await instances.snapshot(project, instance, snapshot)
                pool = await instances.pool_of(spec)
                volume = pool.snapshot_path(Volume.of(row.type, project, instance), snapshot)
            await asyncio.to_thread(instances.driver(row.type).check_volume_layout, volume)
            existing = await asyncio.to_thread(_read_volume_metadata, volume)
            metadata = image_metadata(existing, row.architecture or ARCHITECTURE, properties, time.time())
            text = yaml.safe_dump(metadata, default_flow_style=False, sort_keys=True)
            await asyncio.to_thread((work / "metadata.yaml").write_text, text)
            total = await asyncio.to_thread(_tree_size, volume / "rootfs")
            if await asyncio.to_thread(has_templates, volume):
                total += await asyncio.to_thread(_tree_size, volume / "templates")
            room = await asyncio.to_thread(_free, d.paths.images) - FREE_SPACE_MARGIN
            if total > room:
                raise RequestTooLarge(f"The image of {name!r} (about {total} bytes) does not fit on this server's "
                                      f"disk ({max(room, 0)} bytes free beyond the margin)")
            await _pack(op, upload, work, volume, total, room)
        return await d.images.import_file(upload, public=public)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
        upload.unlink(missing_ok=True)


def has_templates(volume: Path) -> bool:
    """The volume's templates/ (from its image, which metadata.yaml's templates entries name): a real
    directory, never a symlink."""
    try:
        return stat.S_ISDIR(os.lstat(volume / "templates").st_mode)
    except OSError:
        return False


def pack_argv(upload: Path, metadata_dir: Path, volume: Path, templates: bool) -> list[str]:
    """tar's arguments: metadata.yaml, rootfs/ and templates/ (when the volume has them, so metadata's
    templates entries still name files). Pure: unit-tested."""
    return ["tar", "-cf", str(upload), "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse",
            "-C", str(metadata_dir), "metadata.yaml", "-C", str(volume), "rootfs",
            *(["templates"] if templates else [])]


async def _pack(op: Operation, upload: Path, metadata_dir: Path, volume: Path, total: int, room: int) -> None:
    argv = pack_argv(upload, metadata_dir, volume, await asyncio.to_thread(has_templates, volume))
    proc = await process.spawn(argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                               stderr=asyncio.subprocess.PIPE)
    started = time.monotonic()
    tail = bytearray()

    async def drain_stderr() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(65536):
            tail.extend(chunk)
            del tail[:-4096]

    async with process.reaped(proc):
        errors = asyncio.create_task(drain_stderr())
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 0.5)
                break
            except TimeoutError:
                pass
            written = upload.stat().st_size if upload.exists() else 0
            if written > room:
                proc.kill()
                raise RequestTooLarge("The image does not fit on this server's disk")
            _progress(op, written, total, time.monotonic() - started)
        await asyncio.wait_for(errors, 5)
        stderr = tail.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise InternalError(f"Packing the image failed: {stderr.splitlines()[-1] if stderr else 'tar failed'}")
    written = upload.stat().st_size
    _progress(op, written, max(total, written), time.monotonic() - started)


def _progress(op: Operation, written: int, total: int, elapsed: float) -> None:
    percent = min(100, int(100 * written / total)) if total > 0 else 0
    rate = int(written / elapsed) if elapsed > 0 else 0
    op.update_metadata(**{
        f"{STAGE}_progress": f"Image pack: {percent}% ({rate >> 20}MB/s)",
        "progress": {"stage": STAGE, "text": f"Image pack: {percent}%", "bytes": written, "total": total,
                     "rate": rate, "percent": percent},
    })
