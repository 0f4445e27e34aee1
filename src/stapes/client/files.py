"""Files inside instances over Incus's file API (`/1.0/instances/<name>/files`), and `publish`.

Streams in both directions: a pushed file is sent from its open handle (or standard input) as it is read, a
pulled file is written to its sink chunk by chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import quote

import aiohttp

from stapes.api.errors import StapesError, Unavailable, error_for_status
from stapes.client.connection import Connection, Json

Progress = Callable[[Json], None]
MAX_LISTING = 64 << 20  # a directory's listing, as JSON
MAX_LINK_TARGET = 4096


@dataclass(frozen=True)
class RemoteFile:
    kind: str  # file, directory or symlink
    uid: int
    gid: int
    mode: int
    size: int = 0


def _info(headers: Any) -> RemoteFile:
    def number(key: str, base: int = 10, default: int = 0) -> int:
        try:
            return int(headers.get(key, ""), base)
        except ValueError:
            return default

    return RemoteFile(headers.get("X-Incus-type", "file"), number("X-Incus-uid"), number("X-Incus-gid"),
                      number("X-Incus-mode", 8, 0o644), number("Content-Length"))


def _url(conn: Connection, instance: str) -> str:
    return f"{conn.base_url}/1.0/instances/{quote(instance, safe='')}/files"


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    data = await response.read()
    try:
        message = str(json.loads(data).get("error"))
    except (json.JSONDecodeError, AttributeError):
        message = data.decode(errors="replace").strip() or response.reason or "error"
    raise error_for_status(response.status, message)


def _unreachable(conn: Connection, err: Exception) -> StapesError:
    return Unavailable(f"Cannot reach {conn.description}: {err}")


async def stat(conn: Connection, instance: str, path: str) -> RemoteFile | None:
    """The file's type, owner and mode (HEAD); None when there is nothing at the path."""
    try:
        async with conn.session.head(_url(conn, instance), params=conn._params({"path": path}, None)) as response:
            if response.status == 404:
                return None
            await _raise_for(response)
            return _info(response.headers)
    except aiohttp.ClientConnectionError as err:
        raise _unreachable(conn, err) from None


async def pull(conn: Connection, instance: str, path: str,
               sink: Callable[[RemoteFile], Callable[[bytes], None]]) -> tuple[RemoteFile, list[str] | str | None]:
    """GET one path. A file's bytes go to `sink(info)`'s writer as they arrive (the result's second item is
    None); a directory gives its entries' names, a symlink its target."""
    try:
        async with conn.session.get(_url(conn, instance), params=conn._params({"path": path}, None)) as response:
            await _raise_for(response)
            info = _info(response.headers)
            if info.kind == "directory":
                listing = json.loads(await _read_bounded(response, MAX_LISTING, f"{path}'s listing"))
                names = listing.get("metadata") if isinstance(listing, dict) else None
                if not isinstance(names, list):
                    raise StapesError(f"{path}: the server's directory listing is not a list")
                return info, names
            if info.kind == "symlink":
                target = await _read_bounded(response, MAX_LINK_TARGET, f"{path}'s symlink target")
                return info, target.decode(errors="surrogateescape")
            write = sink(info)
            async for chunk in response.content.iter_chunked(1 << 20):
                write(chunk)
            return info, None
    except aiohttp.ClientConnectionError as err:
        raise _unreachable(conn, err) from None


async def _read_bounded(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    data = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        data += chunk
        if len(data) > limit:
            raise StapesError(f"{what} is larger than {limit} bytes: refused")
    return bytes(data)


async def _post(conn: Connection, instance: str, path: str, headers: dict[str, str], data: Any) -> None:
    try:
        async with conn.session.post(_url(conn, instance), params=conn._params({"path": path}, None),
                                     headers=headers, data=data) as response:
            await _raise_for(response)
    except aiohttp.ClientConnectionError as err:
        raise _unreachable(conn, err) from None


def _owner_headers(kind: str, uid: int | None, gid: int | None, mode: int | None) -> dict[str, str]:
    headers = {"X-Incus-type": kind, "Content-Type": "application/octet-stream"}
    if uid is not None:
        headers["X-Incus-uid"] = str(uid)
    if gid is not None:
        headers["X-Incus-gid"] = str(gid)
    if mode is not None:
        headers["X-Incus-mode"] = f"0{mode:o}"  # a leading 0: octal, as Incus parses it
    return headers


async def push_file(conn: Connection, instance: str, path: str, source: BinaryIO | bytes, *, uid: int | None = None,
                    gid: int | None = None, mode: int | None = None, append: bool = False) -> None:
    headers = _owner_headers("file", uid, gid, mode)
    headers["X-Incus-write"] = "append" if append else "overwrite"
    await _post(conn, instance, path, headers, source)


async def mkdir(conn: Connection, instance: str, path: str, *, uid: int | None = None, gid: int | None = None,
                mode: int | None = None, parents: bool = False) -> None:
    """A directory (one that exists is left as it is); `parents`: the missing ones above it too."""
    if parents:
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts)):
            await _post(conn, instance, "/" + "/".join(parts[:depth]), _owner_headers("directory", uid, gid, None),
                        b"")
    await _post(conn, instance, path, _owner_headers("directory", uid, gid, mode), b"")


async def symlink(conn: Connection, instance: str, path: str, target: str, *, uid: int | None = None,
                  gid: int | None = None) -> None:
    await _post(conn, instance, path, _owner_headers("symlink", uid, gid, None),
                target.encode(errors="surrogateescape"))


async def delete(conn: Connection, instance: str, path: str, *, force: bool = False) -> None:
    try:
        async with conn.session.delete(_url(conn, instance), params=conn._params({"path": path}, None),
                                       headers={"X-Incus-force": "true" if force else "false"}) as response:
            await _raise_for(response)
    except aiohttp.ClientConnectionError as err:
        raise _unreachable(conn, err) from None


async def publish(conn: Connection, source: str, *, aliases: list[str], properties: dict[str, str], public: bool,
                  progress: Progress | None = None) -> Json:
    """An image from a stopped instance or a snapshot ('c1/snap0'): the finished operation."""
    body = {"source": {"type": "snapshot" if "/" in source else "instance", "name": source},
            "aliases": [{"name": a} for a in aliases], "properties": properties, "public": public}
    op = await conn.request("POST", "/1.0/images", body)
    if progress is not None:
        async for current in conn.poll(op):
            progress(current)
    return await conn.wait(op)
