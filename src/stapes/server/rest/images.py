"""/1.0/images and /1.0/images/aliases."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from stapes.api.errors import BadRequest, Conflict, NotFound, RequestTooLarge
from stapes.api.names import validate_alias_name
from stapes.api.requests import BuiltinImageSource, ImageAlias, ImageAliasesPost, ImagesPost
from stapes.api.timefmt import NEVER, iso
from stapes.server.images.busybox import build_busybox_image
from stapes.server.images.busybox_vm import build_busybox_vm_image
from stapes.server.images.debian import build_debian_image, release_of
from stapes.server.images.debian_vm import build_debian_vm_image
from stapes.server.operations import Operation
from stapes.server.rest import publish
from stapes.server.rest.common import body, daemon, recursion, start_task, sync
from stapes.server.store.db import ImageRow

Builder = Callable[[Path, Callable[[str], None]], Awaitable[None]]


def _builder(source: BuiltinImageSource) -> tuple[Builder, str]:
    """The image a JSON request asks the server to build, and the alias it gets unless others are given."""
    if source.type == "builtin" and source.name == "busybox":
        return (lambda upload, progress: build_busybox_image(upload)), ""
    if source.type == "builtin" and source.name == "busybox-vm":
        return (lambda upload, progress: build_busybox_vm_image(upload)), "busybox-vm"
    if source.type == "builtin" and source.name.startswith("debian/") and source.name.endswith("/vm"):
        vm_name = source.name.removesuffix("/vm")
        release_of(vm_name)
        return (lambda upload, progress: build_debian_vm_image(vm_name, upload, progress)), source.name
    if source.type == "builtin" and source.name.startswith("debian/"):
        release_of(source.name)  # an unknown release is refused before any operation starts
        name = source.name
        return (lambda upload, progress: build_debian_image(name, upload, progress)), name
    raise BadRequest("Only built-in images can be made from JSON ({'source': {'type': 'builtin', 'name': "
                     "'busybox'}}, or 'busybox-vm', 'debian/12', 'debian/13', 'debian/12/vm', 'debian/13/vm'); upload "
                     "a unified tarball as the request body (or a metadata tarball and a qcow2 rootfs.img as "
                     "multipart/form-data) to import one")
MAX_IMAGE_SIZE = 16 << 30
FREE_SPACE_MARGIN = 256 << 20  # an upload never fills the server's disk


async def render_image(request: web.Request, row: ImageRow) -> dict[str, Any]:
    aliases = await daemon(request).store.aliases()
    created = row.created_at
    return {
        "fingerprint": row.fingerprint, "filename": row.filename, "size": row.size, "type": row.type,
        "architecture": row.architecture, "properties": row.properties, "public": row.public,
        "aliases": [{"name": n, "description": desc} for n, (fp, desc) in aliases.items() if fp == row.fingerprint],
        "created_at": iso(created), "uploaded_at": iso(created), "last_used_at": iso(0),
        "expires_at": NEVER, "auto_update": False, "cached": False, "profiles": ["default"],
    }


def routes(r: web.RouteTableDef) -> None:
    @r.get("/1.0/images")
    async def list_images(request: web.Request) -> web.Response:
        rows = await daemon(request).store.images()
        if recursion(request):
            return sync([await render_image(request, row) for row in rows])
        return sync([f"/1.0/images/{row.fingerprint}" for row in rows])

    @r.post("/1.0/images")
    async def create_image(request: web.Request) -> web.Response:
        d = daemon(request)
        aliases: list[ImageAlias] = []
        build: Builder | None = None
        if request.content_type == "application/json":
            data = await body(request, ImagesPost)
            if data.source is not None and data.source.type in publish.SOURCE_TYPES:
                return await publish.start(request, data)  # an image from an instance or a snapshot
            aliases = list(data.aliases or [])
            build, default_alias = _builder(data.source or BuiltinImageSource())
            if not aliases and default_alias:
                aliases = [ImageAlias(name=default_alias)]
        for alias in aliases:
            validate_alias_name(alias.name)
        upload = _temp_upload(d.paths.images)
        rootfs: Path | None = None
        if build is None:
            try:
                if request.content_type == "multipart/form-data":
                    rootfs = _temp_upload(d.paths.images)
                    await _receive_split_upload(request, upload, rootfs)
                else:
                    await _receive_upload(request, upload)
            except BaseException:
                upload.unlink(missing_ok=True)  # a failed upload leaves no temporary file
                if rootfs is not None:
                    rootfs.unlink(missing_ok=True)
                raise
            header = request.headers.get("X-Incus-aliases") or request.headers.get("X-Stapes-Aliases") or ""
            aliases = [ImageAlias(name=a) for a in header.split(",") if a]
            for alias in aliases:
                validate_alias_name(alias.name)
        public = request.headers.get("X-Incus-public") in ("true", "1")
        builder = build
        split = rootfs

        async def work(op: Operation) -> dict[str, Any]:
            try:
                if builder is not None:
                    await builder(upload, lambda stage: op.update_metadata(progress={"stage": stage, "text": stage}))
                    op.update_metadata(progress={"stage": "import", "text": "importing the image"})
                row = await d.images.import_file(upload, public=public, existing_ok=builder is not None,
                                                 rootfs=split)
            finally:
                upload.unlink(missing_ok=True)  # imported (moved away) or failed: never left behind
                if split is not None:
                    split.unlink(missing_ok=True)
            for alias in aliases:
                await d.images.set_alias(alias.name, row.fingerprint, alias.description)
            return {"fingerprint": row.fingerprint, "size": row.size}

        return start_task(request, "Building image" if build else "Importing image", "default", work)

    @r.get("/1.0/images/aliases")
    async def list_aliases(request: web.Request) -> web.Response:
        aliases = await daemon(request).store.aliases()
        if recursion(request):
            types = await _types(request)
            return sync([{"name": n, "target": fp, "description": desc, "type": types.get(fp, "container")}
                         for n, (fp, desc) in aliases.items()])
        return sync([f"/1.0/images/aliases/{n}" for n in aliases])

    @r.post("/1.0/images/aliases")
    async def create_alias(request: web.Request) -> web.Response:
        d = daemon(request)
        data = await body(request, ImageAliasesPost)
        row = await d.images.resolve(data.target)
        if data.name in await d.store.aliases():
            raise Conflict(f"Alias {data.name!r} already exists: delete it first")
        await d.images.set_alias(data.name, row.fingerprint, data.description)
        return sync()

    @r.get("/1.0/images/aliases/{name:.+}")
    async def get_alias(request: web.Request) -> web.Response:
        aliases = await daemon(request).store.aliases()
        name = request.match_info["name"]
        if name not in aliases:
            raise NotFound(f"Image alias {name!r} not found")
        fp, desc = aliases[name]
        types = await _types(request)
        return sync({"name": name, "target": fp, "description": desc, "type": types.get(fp, "container")})

    @r.delete("/1.0/images/aliases/{name:.+}")
    async def delete_alias(request: web.Request) -> web.Response:
        if not await daemon(request).store.delete_alias(request.match_info["name"]):
            raise NotFound(f"Image alias {request.match_info['name']!r} not found")
        return sync()

    @r.get("/1.0/images/{fingerprint}")
    async def get_image(request: web.Request) -> web.Response:
        row = await daemon(request).images.resolve(request.match_info["fingerprint"])
        return sync(await render_image(request, row))

    @r.delete("/1.0/images/{fingerprint}")
    async def delete_image(request: web.Request) -> web.Response:
        d = daemon(request)
        row = await d.images.resolve(request.match_info["fingerprint"])

        async def work(op: Operation) -> None:
            await d.images.delete(row.fingerprint)

        return start_task(request, "Deleting image", "default", work)


async def _types(request: web.Request) -> dict[str, str]:
    return {row.fingerprint: row.type for row in await daemon(request).store.images()}


async def _receive_split_upload(request: web.Request, metadata: Path, rootfs: Path) -> None:
    """Incus's split image upload (multipart/form-data): the part "metadata" (a tarball of metadata.yaml and
    templates/), then "rootfs.img" (a VM's qcow2 disk); "rootfs" (a container's squashfs) is refused. Both parts
    stream to disk within the same bounds as a unified upload."""
    stat = await asyncio.to_thread(os.statvfs, metadata.parent)
    room = min(MAX_IMAGE_SIZE, stat.f_bavail * stat.f_frsize - FREE_SPACE_MARGIN)
    if request.content_length is not None and request.content_length > room:
        raise RequestTooLarge(f"The image ({request.content_length} bytes) is larger than this server takes "
                              f"({max(room, 0)} bytes: at most {MAX_IMAGE_SIZE}, and what the disk has free)")
    reader = await request.multipart()
    seen: set[str] = set()
    written = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadRequest("A split image upload holds two files, 'metadata' and 'rootfs.img', not nested parts")
        name = part.name or ""
        if name == "rootfs":
            raise BadRequest("Split container images (a squashfs rootfs) are not supported: import a unified "
                             "tarball (metadata.yaml + rootfs/)")
        if name not in ("metadata", "rootfs.img") or name in seen:
            raise BadRequest(f"Unexpected part {name[:64]!r} in a split image upload: 'metadata' then 'rootfs.img'")
        seen.add(name)
        with (metadata if name == "metadata" else rootfs).open("wb") as out:
            while chunk := await part.read_chunk(1 << 20):
                written += len(chunk)
                if written > room:
                    raise RequestTooLarge(f"The image is larger than this server takes ({max(room, 0)} bytes: at "
                                          f"most {MAX_IMAGE_SIZE}, and what the disk has free)")
                await asyncio.to_thread(out.write, chunk)
    if seen != {"metadata", "rootfs.img"}:
        raise BadRequest("A split image upload needs both parts: 'metadata' (the tarball) and 'rootfs.img' (qcow2)")


async def _receive_upload(request: web.Request, upload: Path) -> None:
    """Stream the body to disk, never past MAX_IMAGE_SIZE nor into the last FREE_SPACE_MARGIN of the disk."""
    stat = await asyncio.to_thread(os.statvfs, upload.parent)
    room = min(MAX_IMAGE_SIZE, stat.f_bavail * stat.f_frsize - FREE_SPACE_MARGIN)
    if request.content_length is not None and request.content_length > room:
        raise RequestTooLarge(f"The image ({request.content_length} bytes) is larger than this server takes "
                              f"({max(room, 0)} bytes: at most {MAX_IMAGE_SIZE}, and what the disk has free)")
    written = 0
    with upload.open("wb") as out:
        async for chunk in request.content.iter_chunked(1 << 20):
            written += len(chunk)
            if written > room:
                raise RequestTooLarge(f"The image is larger than this server takes ({max(room, 0)} bytes: at "
                                      f"most {MAX_IMAGE_SIZE}, and what the disk has free)")
            await asyncio.to_thread(out.write, chunk)


def _temp_upload(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", dir=directory)
    os.close(fd)
    return Path(name)
