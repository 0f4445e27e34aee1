"""/1.0/images and /1.0/images/aliases."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from stapes.api.errors import BadRequest, Conflict, NotFound, RequestTooLarge
from stapes.api.names import validate_entity_name
from stapes.api.requests import BuiltinImageSource, ImageAlias, ImageAliasesPost, ImagesPost
from stapes.api.timefmt import iso
from stapes.server.images.busybox import build_busybox_image
from stapes.server.operations import Operation
from stapes.server.rest.common import body, daemon, recursion, start_task, sync
from stapes.server.store.db import ImageRow

BUILTIN_IMAGES = {"busybox": build_busybox_image}
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
        "expires_at": iso(0), "auto_update": False, "cached": False, "profiles": ["default"],
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
        upload = _temp_upload(d.paths.images)
        try:
            if request.content_type == "application/json":
                data = await body(request, ImagesPost)
                source = data.source or BuiltinImageSource()
                aliases = list(data.aliases or [])
                builder = BUILTIN_IMAGES.get(source.name) if source.type == "builtin" else None
                if builder is None:
                    raise BadRequest(
                        "Only built-in images can be made from JSON ({'source': {'type': 'builtin', "
                        "'name': 'busybox'}}); upload a unified tarball as the request body to import one")
                await builder(upload)
            else:
                await _receive_upload(request, upload)
                header = request.headers.get("X-Incus-aliases") or request.headers.get("X-Stapes-Aliases") or ""
                aliases = [ImageAlias(name=a) for a in header.split(",") if a]
            for alias in aliases:
                validate_entity_name("image alias", alias.name)
        except BaseException:
            upload.unlink(missing_ok=True)  # a failed build or upload leaves no temporary file
            raise
        public = request.headers.get("X-Incus-public") in ("true", "1")

        async def work(op: Operation) -> dict[str, Any]:
            row = await d.images.import_file(upload, public=public)
            for alias in aliases:
                await d.images.set_alias(alias.name, row.fingerprint, alias.description)
            return {"fingerprint": row.fingerprint, "size": row.size}

        return start_task(request, "Importing image", "default", work)

    @r.get("/1.0/images/aliases")
    async def list_aliases(request: web.Request) -> web.Response:
        aliases = await daemon(request).store.aliases()
        if recursion(request):
            return sync([{"name": n, "target": fp, "description": desc, "type": "container"}
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

    @r.get("/1.0/images/aliases/{name}")
    async def get_alias(request: web.Request) -> web.Response:
        aliases = await daemon(request).store.aliases()
        name = request.match_info["name"]
        if name not in aliases:
            raise NotFound(f"Image alias {name!r} not found")
        fp, desc = aliases[name]
        return sync({"name": name, "target": fp, "description": desc, "type": "container"})

    @r.delete("/1.0/images/aliases/{name}")
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
