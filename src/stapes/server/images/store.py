"""Local image store: unified tarballs (metadata.yaml + rootfs/) kept by SHA-256 fingerprint."""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import time
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


async def _layout(tarball: Path) -> tuple[str | None, bool]:
    """The name metadata.yaml has in the tarball (with or without './'), and whether it holds rootfs/. The
    listing is read line by line and never kept (an image of millions of entries costs no memory), to its
    end: a tarball that does not read to the end is refused now, not at its first launch."""
    proc = await process.spawn(["tar", "-tf", str(tarball)], stdin=asyncio.subprocess.DEVNULL,
                               stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    member, rootfs, tail = None, False, bytearray()

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
            except ValueError:  # a line longer than the stream's limit (64 KiB): no name is
                raise BadRequest("The image is not a readable tarball: it lists a name longer than 64 KiB") from None
            if await proc.wait() != 0:
                await asyncio.wait_for(draining, 5)
                reason = tail.decode(errors="replace").strip().splitlines()
                raise BadRequest(f"The image is not a readable tarball: {reason[-1] if reason else 'tar failed'}")
    finally:
        draining.cancel()
    return member, rootfs


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


class ImageStore:
    def __init__(self, store: Store, directory: Path) -> None:
        self._store = store
        self.directory = directory

    def path(self, fingerprint: str) -> Path:
        return self.directory / fingerprint

    async def resolve(self, name: str) -> ImageRow:
        """An alias, a full fingerprint or a unique fingerprint prefix."""
        aliases = await self._store.aliases()
        if name in aliases:
            name = aliases[name][0]
        matches = [row for row in await self._store.images() if row.fingerprint.startswith(name)] if name else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise BadRequest(f"Image prefix {name!r} is ambiguous: use more characters of the fingerprint")
        raise NotFound(f"Image {name!r} not found: 'image list' shows the images and aliases this server has")

    async def import_file(self, upload: Path, properties: dict[str, str] | None = None,
                          public: bool = False, existing_ok: bool = False) -> ImageRow:
        """Takes ownership of `upload` (moved into the store or deleted). `existing_ok`: the same image already
        in the store is the result (a rebuild from the cache), not a conflict."""
        try:
            fingerprint = await asyncio.to_thread(_sha256, upload)
            for existing in await self._store.images():
                if existing.fingerprint == fingerprint:
                    if existing_ok:
                        return existing
                    raise Conflict(f"Image {fingerprint[:12]} is already in the store")
            metadata = await self._read_metadata(upload)
            props, architecture, created = image_fields(metadata)
            props.update(properties or {})
            row = ImageRow(
                fingerprint=fingerprint, filename=upload.name, size=upload.stat().st_size, type="container",
                architecture=architecture, properties=props, public=public, created_at=created or time.time(),
            )
            await asyncio.to_thread(os.replace, upload, self.path(fingerprint))
        finally:
            upload.unlink(missing_ok=True)
        await self._store.create_image(row)
        return row

    async def _read_metadata(self, tarball: Path) -> dict[str, Any]:
        member, rootfs = await _layout(tarball)
        if member is None:
            raise BadRequest("The image has no metadata.yaml: a unified image holds metadata.yaml and rootfs/")
        if not rootfs:
            raise BadRequest("The image has no rootfs/ directory: a unified image holds metadata.yaml and rootfs/")
        raw = await _read_member(tarball, member, MAX_METADATA_BYTES)
        # Bounded (no aliases, nodes, depth, size) and parsed off the event loop.
        metadata = await asyncio.to_thread(load_yaml, raw, "The image's metadata.yaml", MAX_METADATA_BYTES)
        metadata = metadata or {}
        if not isinstance(metadata, dict):
            raise BadRequest("The image's metadata.yaml must be a mapping")
        return metadata

    async def unpack(self, fingerprint: str, target: Path) -> None:
        """Unpack the whole tarball into a container volume: Incus's layout, metadata.yaml beside rootfs/."""
        await process.run([
            "tar", "-xf", str(self.path(fingerprint)), "-C", str(target), "--numeric-owner",
            "--xattrs", "--xattrs-include=*", "--same-permissions",
        ])

    async def delete(self, fingerprint: str) -> None:
        await self._store.delete_image(fingerprint)
        self.path(fingerprint).unlink(missing_ok=True)

    async def set_alias(self, name: str, fingerprint: str, description: str = "") -> None:
        validate_alias_name(name)
        await self._store.set_alias(name, fingerprint, description)
