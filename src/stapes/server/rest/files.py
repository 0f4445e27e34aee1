"""/1.0/instances/<name>/files (Incus's file API) and /1.0/instances/<name>/sftp (what `incus file` speaks).

Parse the headers, call files.Root in a thread, stream the bytes: the rules (paths inside the rootfs only,
owners within the container's map, sizes within the volume) live in stapes.server.instances.files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from stapes.api.config_keys import is_true
from stapes.api.errors import BadRequest
from stapes.server.idmap import ids_from_zero
from stapes.server.instances import files
from stapes.server.instances.files import CHUNK, MAX_LINK_TARGET, Root, parse_id, parse_mode
from stapes.server.instances.sftp import LIMITS, Reader, Session
from stapes.server.rest.common import daemon, project, sync

if TYPE_CHECKING:
    from stapes.server.daemon import Daemon

log = logging.getLogger(__name__)


async def open_root(d: Daemon, proj: str, name: str) -> Root:
    """The instance's rootfs, held open; a container's only (a VM's disk is not the server's to read)."""
    row = await d.instances.get(proj, name)
    if row.type != "container":
        raise BadRequest(f"Instance {name!r} is a virtual machine: the file API works on containers only")
    spec = await d.instances.spec(row)
    return await asyncio.to_thread(Root, spec.volume / "rootfs", ids_from_zero(spec.idmap, "uid"),
                                   ids_from_zero(spec.idmap, "gid"))


def _path(request: web.Request) -> str:
    path = request.query.get("path", "")
    files.split(path)  # refused now when empty or too long
    return path


def routes(r: web.RouteTableDef) -> None:
    @r.get("/1.0/instances/{name}/files", allow_head=False)
    async def get_file(request: web.Request) -> web.StreamResponse:
        return await _get(request, head=False)

    @r.head("/1.0/instances/{name}/files")
    async def head_file(request: web.Request) -> web.StreamResponse:
        return await _get(request, head=True)

    @r.post("/1.0/instances/{name}/files")
    async def post_file(request: web.Request) -> web.Response:
        d, proj, name, path = daemon(request), await project(request), request.match_info["name"], _path(request)
        uid, gid = parse_id(request.headers.get("X-Incus-uid"), "uid"), parse_id(request.headers.get("X-Incus-gid"),
                                                                                  "gid")
        mode = parse_mode(request.headers.get("X-Incus-mode"))
        kind = request.headers.get("X-Incus-type") or "file"
        write = request.headers.get("X-Incus-write") or "overwrite"
        if write not in ("overwrite", "append"):
            raise BadRequest(f"Bad file write mode {write[:32]!r}: use overwrite or append")
        if kind not in ("file", "directory", "symlink"):
            raise BadRequest(f"Bad file type {kind[:32]!r}: use file, directory or symlink")
        d.instances.check_idle(proj, name)  # not while a migration copies its files
        root = await open_root(d, proj, name)
        try:
            if kind == "directory":
                await asyncio.to_thread(root.mkdir, path, uid=uid, gid=gid, mode=mode)
            elif kind == "symlink":
                target = await _read_bounded(request, MAX_LINK_TARGET + 1)
                if len(target) > MAX_LINK_TARGET:
                    raise BadRequest(f"A symlink's target is at most {MAX_LINK_TARGET} bytes")
                await asyncio.to_thread(root.symlink, path, target.decode(errors="surrogateescape"), uid=uid, gid=gid)
            else:
                writer = await asyncio.to_thread(root.begin_write, path, uid=uid, gid=gid, mode=mode,
                                                 append=write == "append", length=request.content_length)
                try:
                    async for chunk in request.content.iter_chunked(CHUNK):
                        await asyncio.to_thread(writer.write, chunk)
                    await asyncio.to_thread(writer.commit)
                except BaseException:
                    await asyncio.shield(asyncio.to_thread(writer.abort))
                    raise
        finally:
            await asyncio.to_thread(root.close)
        d.events.lifecycle("instance-file-pushed", f"/1.0/instances/{name}", proj, {"path": path})
        return sync()

    @r.delete("/1.0/instances/{name}/files")
    async def delete_file(request: web.Request) -> web.Response:
        d, proj, name, path = daemon(request), await project(request), request.match_info["name"], _path(request)
        recursive = is_true(request.headers.get("X-Incus-force"))
        d.instances.check_idle(proj, name)
        root = await open_root(d, proj, name)
        try:
            await asyncio.to_thread(root.delete, path, recursive=recursive)
        finally:
            await asyncio.to_thread(root.close)
        d.events.lifecycle("instance-file-deleted", f"/1.0/instances/{name}", proj, {"path": path})
        return sync()

    @r.get("/1.0/instances/{name}/sftp")
    async def sftp(request: web.Request) -> web.StreamResponse:
        d, proj, name = daemon(request), await project(request), request.match_info["name"]
        if (request.headers.get("Upgrade") or "").lower() != "sftp":
            raise BadRequest("This endpoint speaks SFTP: send 'Upgrade: sftp' and 'Connection: Upgrade'")
        LIMITS.check()  # before the upgrade: a refusal is an HTTP error
        _end_sessions_on_removal(d)
        root = await open_root(d, proj, name)
        try:
            return await _sftp_session(request, root, lambda: d.instances.check_idle(proj, name), (proj, name))
        finally:
            await asyncio.to_thread(root.close)


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    """The body up to EOF, at most `limit` bytes (a read may return less than asked before EOF)."""
    data = bytearray()
    while len(data) < limit:
        chunk = await request.content.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


_hooked: set[int] = set()


def _end_sessions_on_removal(d: Daemon) -> None:
    """Once per daemon: an instance renamed, moved or deleted ends its SFTP sessions (they hold its rootfs)."""
    if id(d.instances) in _hooked:
        return
    _hooked.add(id(d.instances))

    async def removed(project: str, name: str, new_name: str | None) -> None:
        LIMITS.end((project, name))

    d.instances.on_removed.append(removed)


async def _get(request: web.Request, head: bool) -> web.StreamResponse:
    d, proj, name, path = daemon(request), await project(request), request.match_info["name"], _path(request)
    root = await open_root(d, proj, name)
    fd = -1
    try:
        info = await asyncio.to_thread(root.lstat, path)
        headers = info.headers()
        if info.kind == "directory":
            entries = [] if head else await asyncio.to_thread(root.list_dir, path)
            response = sync(entries)
            response.headers.update(headers)
            return response
        if info.kind == "symlink":
            target = (await asyncio.to_thread(root.readlink, path)).encode(errors="surrogateescape")
            return web.Response(body=b"" if head else target, headers=headers,
                                content_type="application/octet-stream")
        if info.kind != "file":
            raise BadRequest(f"{path}: not a regular file, directory or symlink (a device, FIFO or socket)")
        if head:
            response = web.Response(headers=headers, content_type="application/octet-stream")
            response.headers["Content-Length"] = str(info.size)
            return response
        info, fd = await asyncio.to_thread(root.open_read, path)
        stream = web.StreamResponse(headers={**info.headers(), "Content-Type": "application/octet-stream"})
        stream.content_length = info.size
        await stream.prepare(request)
        remaining = info.size
        while remaining > 0:
            chunk = await asyncio.to_thread(os.read, fd, min(CHUNK, remaining))
            if not chunk:
                break
            await stream.write(chunk)
            remaining -= len(chunk)
        await stream.write_eof()
        d.events.lifecycle("instance-file-retrieved", f"/1.0/instances/{name}", proj, {"path": path})
        return stream
    finally:
        if fd >= 0:
            await asyncio.to_thread(os.close, fd)
        await asyncio.to_thread(root.close)


async def _sftp_session(request: web.Request, root: Root, check: Callable[[], None],
                        key: tuple[str, str]) -> web.StreamResponse:
    """Answer 101, then the connection carries SFTP until the client closes it. aiohttp upgrades only to
    websocket or tcp by itself, so the raw bytes are taken as its websocket support does: a payload parser
    set on the protocol, writes on the transport with the protocol's flow control."""
    protocol, transport = request.protocol, request.transport
    if transport is None:
        raise BadRequest("The connection closed before the SFTP session started")
    response = web.StreamResponse(status=101, headers={"Upgrade": "sftp", "Connection": "Upgrade"})
    response.force_close()
    await response.prepare(request)
    reader = Reader(transport.pause_reading, transport.resume_reading)
    protocol.set_parser(reader)  # type: ignore[arg-type]  # any object with feed_data/feed_eof

    async def write(data: bytes) -> None:
        if transport.is_closing():
            raise ConnectionResetError("the SFTP client went away")
        transport.write(data)
        await protocol._drain_helper()

    try:
        with contextlib.suppress(ConnectionError):
            await Session(root, reader, write, check=check, key=key).run()
    except Exception:  # after the upgrade nothing may reach aiohttp's error pages: the stream is SFTP's
        log.exception("SFTP session on %s/%s failed", *key)
    finally:
        transport.close()
    return response
