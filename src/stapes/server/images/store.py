"""Local image store: unified tarballs (metadata.yaml + rootfs/) kept by SHA-256 fingerprint."""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import yaml

from stapes.api.errors import BadRequest, Conflict, NotFound
from stapes.api.names import validate_alias_name
from stapes.server import process
from stapes.server.store.db import ImageRow, Store

ARCHITECTURE = {"x86_64": "x86_64", "aarch64": "aarch64"}.get(platform.machine(), platform.machine())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            props = {str(k): str(v) for k, v in (metadata.get("properties") or {}).items()}
            props.update(properties or {})
            row = ImageRow(
                fingerprint=fingerprint, filename=upload.name, size=upload.stat().st_size, type="container",
                architecture=str(metadata.get("architecture", ARCHITECTURE)), properties=props, public=public,
                created_at=float(metadata.get("creation_date") or time.time()),
            )
            await asyncio.to_thread(os.replace, upload, self.path(fingerprint))
        finally:
            upload.unlink(missing_ok=True)
        await self._store.create_image(row)
        return row

    async def _read_metadata(self, tarball: Path) -> dict[str, Any]:
        listing = await process.run(["tar", "-tf", str(tarball)], check=False)
        if listing.returncode != 0:
            raise BadRequest(f"The image is not a readable tarball: {listing.error_text}")
        names = {line.removeprefix("./").rstrip("/") for line in listing.stdout.decode().splitlines()}
        if "metadata.yaml" not in names:
            raise BadRequest("The image has no metadata.yaml: a unified image holds metadata.yaml and rootfs/")
        if not any(n == "rootfs" or n.startswith("rootfs/") for n in names):
            raise BadRequest("The image has no rootfs/ directory: a unified image holds metadata.yaml and rootfs/")
        member = "metadata.yaml" if "metadata.yaml" in listing.stdout.decode().splitlines() else "./metadata.yaml"
        raw = await process.run(["tar", "-xOf", str(tarball), member])
        try:
            metadata = yaml.safe_load(raw.stdout) or {}
        except yaml.YAMLError as err:
            raise BadRequest(f"The image's metadata.yaml is not valid YAML: {err}") from None
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
