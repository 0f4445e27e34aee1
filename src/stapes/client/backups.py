"""Backup tarballs to and from a server, streamed in chunks (never whole in memory), with byte progress."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

import aiohttp

from stapes.api.errors import Unavailable, error_for_status
from stapes.client.connection import Connection, Json

CHUNK = 1 << 20
ByteProgress = Callable[[int, int | None], None]  # bytes so far, total (None: unknown)


async def download(conn: Connection, path: str, sink: BinaryIO, progress: ByteProgress | None = None) -> int:
    """GET `path` into `sink`; returns the bytes written."""
    written = 0
    try:
        async with conn.session.get(conn.base_url + path, params=conn._params(None, None)) as response:
            if response.status >= 400:
                raise _error(response.status, await response.read())
            total = response.content_length
            async for chunk in response.content.iter_chunked(CHUNK):
                await asyncio.to_thread(sink.write, chunk)
                written += len(chunk)
                if progress is not None:
                    progress(written, total)
    except (aiohttp.ClientConnectionError, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, aiohttp.ClientConnectionError):
            raise
        raise Unavailable(f"Cannot reach {conn.description}: {err}") from None
    await asyncio.to_thread(sink.flush)
    return written


async def upload(conn: Connection, source: BinaryIO, *, pool: str = "", name: str = "", size: int | None = None,
                 progress: ByteProgress | None = None) -> Json:
    """POST /1.0/instances with the tarball as the body (as `incus import` sends it); the operation."""
    headers = {"Content-Type": "application/octet-stream"}
    if pool:
        headers["X-Incus-pool"] = pool
    if name:
        headers["X-Incus-name"] = name

    async def chunks() -> AsyncIterator[bytes]:
        sent = 0
        while chunk := await asyncio.to_thread(source.read, CHUNK):
            sent += len(chunk)
            if progress is not None:
                progress(sent, size)
            yield chunk

    return await conn.request("POST", "/1.0/instances", data=chunks(), headers=headers)


def _error(status: int, data: bytes) -> Exception:
    try:
        return error_for_status(status, str(json.loads(data).get("error")))
    except (ValueError, AttributeError):
        return error_for_status(status, data.decode(errors="replace"))
