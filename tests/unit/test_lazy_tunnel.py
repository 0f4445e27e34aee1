"""The source's side of a lazy move's memory (migration/service.py `_lazy_tunnel`), over a real websocket pair and
a real socketpair standing for CRIU's page server: the target's closing request ("I have every page") reaches
CRIU only once the target confirmed, and a tunnel that ends unconfirmed stops CRIU before CRIU could see its
socket end (it would take that for "all sent" and end the container on the source)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from stapes.server.instances.lxc_live import _lazy_tunnel
from stapes.server.streams import Channel

REQUEST = struct.Struct("=I4xQQQ")
GET, FORCE_CLOSE = 7, 0x1024


async def _read(sock: socket.socket, size: int, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while len(data) < size:
            chunk = await loop.sock_recv(sock, size - len(data))
            if not chunk:
                break
            data += chunk
    return data


async def test_the_closing_request_waits_for_the_confirmation(channels: tuple[Channel, Channel]) -> None:
    source, target = channels
    ours, criu = socket.socketpair()
    criu.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    confirmed = asyncio.Event()
    aborted: list[bool] = []

    async def abort() -> None:
        aborted.append(True)

    tunnel = asyncio.ensure_future(_lazy_tunnel(reader, writer, source, confirmed, abort))
    get, close = REQUEST.pack(GET, 1, 0x7000, 1), REQUEST.pack(FORCE_CLOSE, 0, 0, 0)
    stream = get + close
    for piece in (stream[:20], stream[20:45], stream[45:]):  # records split anyhow by the websocket messages
        await target.send(piece)
    assert await _read(criu, REQUEST.size, 5) == get
    with pytest.raises(TimeoutError):  # held back: the target has not confirmed
        await _read(criu, 1, 0.3)
    confirmed.set()
    assert await _read(criu, REQUEST.size, 5) == close
    criu.sendall(b"\0\0\0\0")  # CRIU's answer to the close, then its end
    criu.shutdown(socket.SHUT_WR)
    assert [c async for c in target.stream()] == [b"\0\0\0\0"]
    await target.barrier()
    await asyncio.wait_for(tunnel, 5)
    assert await _read(criu, 1, 5) == b""  # the end, once confirmed
    assert aborted == []
    criu.close()


async def test_an_unconfirmed_end_stops_criu_before_its_socket_ends(channels: tuple[Channel, Channel]) -> None:
    source, target = channels
    ours, criu = socket.socketpair()
    criu.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    seen_by_criu: list[bytes | str] = []

    async def abort() -> None:  # what CRIU sees on its socket when it is stopped
        try:
            seen_by_criu.append(criu.recv(1))
        except BlockingIOError:
            seen_by_criu.append("nothing yet")

    tunnel = asyncio.ensure_future(_lazy_tunnel(reader, writer, source, asyncio.Event(), abort))
    await target.send(REQUEST.pack(FORCE_CLOSE, 0, 0, 0))  # the target had every page, then failed
    await target.barrier()  # and its side ended
    await asyncio.sleep(0.2)
    tunnel.cancel()  # the source gives up on the target's failure
    await asyncio.gather(tunnel, return_exceptions=True)
    assert seen_by_criu == ["nothing yet"]
    criu.close()
