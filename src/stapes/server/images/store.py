"""Local image store, by SHA-256 fingerprint, in Incus's formats.

Containers: a unified tarball (metadata.yaml + rootfs/), kept as it came. Virtual machines: metadata.yaml (and
templates/) with a qcow2 disk, `rootfs.img`, either unified in one tarball or split (a metadata tarball and the
qcow2 file; the fingerprint is then the SHA-256 of both, in that order, as Incus's). A VM image is kept split:
`<fingerprint>` the metadata tarball, `<fingerprint>.rootfs` the qcow2, checked on import: a qcow2 only (never a
probed format), no backing file, no external data file, no encryption, a bounded virtual size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from stapes.api.documents import check_record_size, load_yaml
from stapes.api.errors import BadRequest, Conflict, NotFound
from stapes.api.names import validate_alias_name
from stapes.server import process
from stapes.server.store.db import ImageRow, Store

ARCHITECTURE = {"x86_64": "x86_64", "aarch64": "aarch64"}.get(platform.machine(), platform.machine())
MAX_METADATA_BYTES = 256 << 10  # an image's metadata.yaml: Incus's are a few KiB
MAX_PROPERTIES = 256
MAX_PROPERTY_CHARS = 4096
MAX_RECORD_BYTES = 64 << 10  # the image's row, as stored and served
MAX_DISK_SIZE = 1 << 40  # a VM image's virtual disk size
CONTAINER, VIRTUAL_MACHINE = "container", "virtual-machine"
ROOTFS_IMAGE = "rootfs.img"
QEMU_IMG_TIMEOUT = 120.0


def image_fields(metadata: dict[str, Any]) -> tuple[dict[str, str], str, float | None]:
    """The properties, architecture and creation date an image's metadata.yaml gives its record, checked and
    bounded (pure: unit-tested)."""
    properties = metadata.get("properties") or {}
    if not isinstance(properties, dict) or len(properties) > MAX_PROPERTIES:
        raise BadRequest(f"The image's metadata.yaml 'properties' must be a mapping of at most {MAX_PROPERTIES} "
                         "entries")
    props: dict[str, str] = {}
    for key, value in properties.items():
        name, text = str(key), str(value)
        if isinstance(value, dict | list):
            raise BadRequest(f"The image's property {name[:64]!r} must be a plain value, not a list or mapping")
        if not 0 < len(name) <= 255 or len(text) > MAX_PROPERTY_CHARS:
            raise BadRequest(f"The image's property {name[:64]!r}: names of 1 to 255 and values of at most "
                             f"{MAX_PROPERTY_CHARS} characters")
        props[name] = text
    architecture = metadata.get("architecture", ARCHITECTURE)
    if not isinstance(architecture, str) or not 0 < len(architecture) <= 64:
        raise BadRequest("The image's metadata.yaml 'architecture' must be a name such as x86_64")
    created = metadata.get("creation_date")
    if created is not None and (isinstance(created, bool) or not isinstance(created, int | float)
                                or not 0 <= created < 2**40):
        raise BadRequest("The image's metadata.yaml 'creation_date' must be a Unix time in seconds")
    check_record_size({"properties": props, "architecture": architecture}, "The image's metadata",
                      MAX_RECORD_BYTES)
    return props, architecture, None if created is None else float(created)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def _layout(tarball: Path) -> tuple[str | None, bool, str | None]:
    """The name metadata.yaml has in the tarball (with or without './'), whether it holds rootfs/, and the name
    of its rootfs.img (a VM image's disk) if it has one. The listing is read line by line and never kept (an
    image of millions of entries costs no memory), to its end: a tarball that does not read to the end is
    refused now, not at its first launch."""
    proc = await process.spawn(["tar", "-tf", str(tarball)], stdin=asyncio.subprocess.DEVNULL,
                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    member, rootfs, disk, tail = None, False, None, bytearray()

    async def drain_stderr() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(65536):
            tail.extend(chunk)
            del tail[:-4096]

    draining = asyncio.create_task(drain_stderr())
    try:
        async with process.reaped(proc):
            assert proc.stdout is not None
            try:
                while line := await proc.stdout.readline():
                    name = line.decode(errors="replace").rstrip("\n")
                    if name.removeprefix("./") == "metadata.yaml" and member is None:
                        member = name
                    rootfs = rootfs or name.removeprefix("./").split("/")[0] == "rootfs"
                    if name.removeprefix("./") == ROOTFS_IMAGE and disk is None:
                        disk = name
            except ValueError:  # a line longer than the stream's limit (64 KiB): no name is
                raise BadRequest("The image is not a readable tarball: it lists a name longer than 64 KiB") from None
            if await proc.wait() != 0:
                await asyncio.wait_for(draining, 5)
                reason = tail.decode(errors="replace").strip().splitlines()
                raise BadRequest(f"The image is not a readable tarball: {reason[-1] if reason else 'tar failed'}")
    finally:
        draining.cancel()
    return member, rootfs, disk


async def _read_member(tarball: Path, member: str, limit: int) -> bytes:
    """One member of a tarball, read no further than `limit` bytes (one more says it is too large)."""
    proc = await process.spawn(["tar", "-xOf", str(tarball), member], stdin=asyncio.subprocess.DEVNULL,
                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    async with process.reaped(proc):
        assert proc.stdout is not None
        data = bytearray()
        while len(data) <= limit and (chunk := await proc.stdout.read(65536)):
            data += chunk
        if len(data) > limit:
            raise BadRequest(f"The image's {member} is larger than the {limit} bytes accepted")
        if await proc.wait() != 0:
            raise BadRequest(f"The image's {member} could not be read from the tarball")
    return bytes(data)


def check_disk_info(info: dict[str, Any]) -> int:
    """What `qemu-img info --output=json -f qcow2` says of a VM image's disk, checked (pure: unit-tested):
    its virtual size; BadRequest for anything that would make QEMU read beyond the file itself."""
    if info.get("format") != "qcow2":
        raise BadRequest(f"The image's {ROOTFS_IMAGE} is not a qcow2 disk")
    if any(key in info for key in ("backing-filename", "full-backing-filename", "backing-filename-format")):
        raise BadRequest(f"The image's {ROOTFS_IMAGE} names a backing file ({info.get('backing-filename')!r}): "
                         "refused, an image holds its whole disk")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file") or data.get("data-file-raw"):
        raise BadRequest(f"The image's {ROOTFS_IMAGE} keeps its data in an external file "
                         f"({data.get('data-file')!r}): refused")
    if info.get("encrypted") or data.get("encrypt"):
        raise BadRequest(f"The image's {ROOTFS_IMAGE} is encrypted: refused")
    if data.get("corrupt"):
        raise BadRequest(f"The image's {ROOTFS_IMAGE} is marked corrupt")
    size = info.get("virtual-size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_DISK_SIZE:
        raise BadRequest(f"The image's {ROOTFS_IMAGE} has a virtual size of {size!r} bytes: at most "
                         f"{MAX_DISK_SIZE} are accepted")
    return size


async def disk_info(path: Path) -> int:
    """The qcow2 at `path`, read by qemu-img as qcow2 only (no format is probed), checked: its virtual size."""
    try:
        result = await process.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(path)], check=False,
                                   timeout=QEMU_IMG_TIMEOUT)
    except FileNotFoundError:
        raise BadRequest("qemu-img is not installed on the server (scripts/setup-vm.sh installs qemu-utils)"
                         ) from None
    if result.returncode != 0:
        raise BadRequest(f"The image's {ROOTFS_IMAGE} is not a readable qcow2 disk: {result.error_text}")
    try:
        info = json.loads(result.stdout)
    except ValueError:
        raise BadRequest(f"qemu-img could not describe the image's {ROOTFS_IMAGE}") from None
    if not isinstance(info, dict):
        raise BadRequest(f"qemu-img could not describe the image's {ROOTFS_IMAGE}")
    return check_disk_info(info)


def _sha256_of(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class ImageStore:
    def __init__(self, store: Store, directory: Path) -> None:
        self._store = store
        self.directory = directory
        # Built-in images made on first use: alias -> (builder writing the image's tarball, description).
        self.builtins: dict[str, tuple[Callable[[Path], Awaitable[None]], str]] = {}
        self._building = asyncio.Lock()

    def path(self, fingerprint: str) -> Path:
        return self.directory / fingerprint

    async def resolve(self, name: str) -> ImageRow:
        """An alias, a full fingerprint or a unique fingerprint prefix; a built-in image's alias is built and
        imported on first use (not at every server start: the VM image takes seconds to put together)."""
        try:
            return await self._resolve(name)
        except NotFound:
            if name not in self.builtins:
                raise
        async with self._building:
            with contextlib.suppress(NotFound):
                return await self._resolve(name)  # another request built it meanwhile
            build, description = self.builtins[name]
            upload = self.directory / f"{name}-build.tar"
            try:
                await build(upload)
                row = await self.import_file(upload, existing_ok=True)
                await self.set_alias(name, row.fingerprint, description)
            finally:
                upload.unlink(missing_ok=True)  # imported (moved away) or failed: never left behind
            return row

    async def _resolve(self, name: str) -> ImageRow:
        aliases = await self._store.aliases()
        if name in aliases:
            name = aliases[name][0]
        matches = [row for row in await self._store.images() if row.fingerprint.startswith(name)] if name else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise BadRequest(f"Image prefix {name!r} is ambiguous: use more characters of the fingerprint")
        raise NotFound(f"Image {name!r} not found: 'image list' shows the images and aliases this server has")

    def disk_path(self, fingerprint: str) -> Path:
        """A VM image's qcow2 disk (its metadata tarball is path(fingerprint))."""
        return self.directory / f"{fingerprint}.rootfs"

    async def import_file(self, upload: Path, properties: dict[str, str] | None = None,
                          public: bool = False, existing_ok: bool = False, rootfs: Path | None = None) -> ImageRow:
        """Takes ownership of `upload` (moved into the store or deleted), and of `rootfs` (a split VM image's
        qcow2 disk: `upload` is then its metadata tarball). `existing_ok`: the same image already in the store
        is the result (a rebuild from the cache), not a conflict."""
        parts = [upload] if rootfs is None else [upload, rootfs]
        staged: list[Path] = []
        try:
            fingerprint = await asyncio.to_thread(_sha256_of, *parts)
            for existing in await self._store.images():
                if existing.fingerprint == fingerprint:
                    if existing_ok:
                        return existing
                    raise Conflict(f"Image {fingerprint[:12]} is already in the store")
            metadata, kind, member = await self._read_metadata(upload, split=rootfs is not None)
            props, architecture, created = image_fields(metadata)
            props.update(properties or {})
            size = sum(part.stat().st_size for part in parts)
            if kind == VIRTUAL_MACHINE:
                disk = self.directory / f".{fingerprint}.rootfs.tmp"
                staged.append(disk)
                if rootfs is not None:
                    await asyncio.to_thread(os.replace, rootfs, disk)
                else:
                    assert member is not None
                    await self._extract_disk(upload, member, disk)
                await disk_info(disk)
                if rootfs is None:  # unified: kept split, the metadata (and templates) as a tarball of its own
                    meta = self.directory / f".{fingerprint}.meta.tmp"
                    staged.append(meta)
                    await self._metadata_tarball(upload, meta)
                    await asyncio.to_thread(os.replace, meta, upload)
                await asyncio.to_thread(os.replace, disk, self.disk_path(fingerprint))
            row = ImageRow(
                fingerprint=fingerprint, filename=upload.name, size=size, type=kind,
                architecture=architecture, properties=props, public=public, created_at=created or time.time(),
            )
            await asyncio.to_thread(os.replace, upload, self.path(fingerprint))
        finally:
            for path in (*parts, *staged):
                path.unlink(missing_ok=True)
        try:
            await self._store.create_image(row)
        except BaseException:
            self.path(fingerprint).unlink(missing_ok=True)
            self.disk_path(fingerprint).unlink(missing_ok=True)
            raise
        return row

    async def _extract_disk(self, tarball: Path, member: str, disk: Path) -> None:
        """The tarball's `member` into the file `disk`, streamed (no size kept in memory)."""
        with disk.open("wb") as out:
            proc = await process.spawn(["tar", "-xOf", str(tarball), member], stdin=asyncio.subprocess.DEVNULL,
                                       stdout=out.fileno(), stderr=asyncio.subprocess.DEVNULL)
            async with process.reaped(proc):
                if await proc.wait() != 0:
                    raise BadRequest(f"The image's {member} could not be read from the tarball")

    async def _metadata_tarball(self, tarball: Path, target: Path) -> None:
        """The unified tarball's metadata.yaml and templates/ as a tarball of their own."""
        with tempfile.TemporaryDirectory(prefix=".meta-", dir=self.directory) as tmp:
            await process.run(["tar", "-xf", str(tarball), "-C", tmp, "--no-same-owner", "--no-same-permissions",
                               "--exclude", ROOTFS_IMAGE, "--exclude", f"./{ROOTFS_IMAGE}", "--exclude", "rootfs",
                               "--exclude", "./rootfs"], timeout=QEMU_IMG_TIMEOUT)
            names = [name for name in ("metadata.yaml", "templates") if (Path(tmp) / name).exists()]
            await process.run(["tar", "-cf", str(target), "-C", tmp, *names])

    async def _read_metadata(self, tarball: Path, split: bool = False) -> tuple[dict[str, Any], str, str | None]:
        """The image's metadata.yaml, its type (a container's tarball holds rootfs/, a unified VM image's
        rootfs.img, a split VM image's metadata tarball neither) and the name of the rootfs.img member."""
        member, rootfs, disk = await _layout(tarball)
        if member is None:
            raise BadRequest("The image has no metadata.yaml: a unified image holds metadata.yaml and rootfs/ "
                             "(a container) or rootfs.img (a virtual machine)")
        if split:
            if rootfs or disk:
                raise BadRequest("A split image's metadata tarball holds metadata.yaml (and templates/), not the "
                                 "root filesystem")
            kind = VIRTUAL_MACHINE
        elif rootfs and disk:
            raise BadRequest("The image holds both rootfs/ (a container's) and rootfs.img (a virtual machine's)")
        elif disk:
            kind = VIRTUAL_MACHINE
        elif rootfs:
            kind = CONTAINER
        else:
            raise BadRequest("The image has no rootfs/ directory nor rootfs.img: a unified image holds "
                             "metadata.yaml and rootfs/ (a container) or rootfs.img (a virtual machine)")
        raw = await _read_member(tarball, member, MAX_METADATA_BYTES)
        # Bounded (no aliases, nodes, depth, size) and parsed off the event loop.
        metadata = await asyncio.to_thread(load_yaml, raw, "The image's metadata.yaml", MAX_METADATA_BYTES)
        metadata = metadata or {}
        if not isinstance(metadata, dict):
            raise BadRequest("The image's metadata.yaml must be a mapping")
        return metadata, kind, disk

    async def disk_size(self, fingerprint: str) -> int:
        """A VM image's virtual disk size: the least its root disk can be."""
        return await disk_info(self.disk_path(fingerprint))

    async def unpack(self, fingerprint: str, target: Path, disk: Path | None = None) -> None:
        """Into an instance volume, Incus's layout. A container's: the whole tarball, metadata.yaml beside
        rootfs/. A VM's: metadata.yaml and templates/ into the config directory `target`, the disk into `disk`
        (default target/root.img) raw and sparse; a `disk` that exists (the pool made it, sized, with its
        attributes) is written in place (it must be at least the image's virtual size), else it is created."""
        if not self.disk_path(fingerprint).exists():
            await process.run([
                "tar", "-xf", str(self.path(fingerprint)), "-C", str(target), "--numeric-owner",
                "--xattrs", "--xattrs-include=*", "--same-permissions",
            ])
            return
        await process.run(["tar", "-xf", str(self.path(fingerprint)), "-C", str(target), "--no-same-owner",
                           "--no-same-permissions", "metadata.yaml", "--wildcards", "--no-wildcards-match-slash",
                           "templates*"], check=False)
        if not (target / "metadata.yaml").exists():
            raise BadRequest(f"Image {fingerprint[:12]}'s metadata could not be unpacked")
        disk = disk or target / "root.img"
        source = self.disk_path(fingerprint)
        size = await disk_info(source)
        argv = ["qemu-img", "convert", "-f", "qcow2", "-O", "raw"]
        if disk.exists():
            if disk.stat().st_size < size:
                raise BadRequest(f"The root disk ({disk.stat().st_size} bytes) is smaller than image "
                                 f"{fingerprint[:12]}'s disk ({size} bytes): give it at least that size")
            argv += ["-n", "--target-is-zero"] if disk.stat().st_blocks == 0 else ["-n"]
        else:
            argv += ["-S", "4k"]
        await process.run([*argv, str(source), str(disk)], timeout=3600)

    async def delete(self, fingerprint: str) -> None:
        await self._store.delete_image(fingerprint)
        self.path(fingerprint).unlink(missing_ok=True)
        self.disk_path(fingerprint).unlink(missing_ok=True)

    async def set_alias(self, name: str, fingerprint: str, description: str = "") -> None:
        validate_alias_name(name)
        await self._store.set_alias(name, fingerprint, description)
