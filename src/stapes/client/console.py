"""An instance's console from the client side: attach (websocket "0" both ways, "control" for the window size,
Incus's framing) and detach with Ctrl+a q, as Incus's client does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Callable
from typing import BinaryIO

import aiohttp

from stapes.client.connection import Connection

ESCAPE = 0x01  # Ctrl+a
DETACH = b"q"


class DetachFilter:
    """The keys typed: Ctrl+a q detaches, Ctrl+a Ctrl+a sends one Ctrl+a, Ctrl+a then any other key sends both
    (pure: unit-testable)."""

    def __init__(self) -> None:
        self.escaped = False
        self.detached = False

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self.detached:
                break
            if self.escaped:
                self.escaped = False
                if byte == DETACH[0]:
                    self.detached = True
                elif byte == ESCAPE:
                    out.append(ESCAPE)
                else:
                    out += bytes((ESCAPE, byte))
            elif byte == ESCAPE:
                self.escaped = True
            else:
                out.append(byte)
        return bytes(out)


async def attach(conn: Connection, name: str, stdin: BinaryIO, stdout: BinaryIO, size: tuple[int, int],
                 attached: Callable[[], None] | None = None) -> bool:
    """Until the user detaches (Ctrl+a q), stdin closes, or the server ends the session (the instance stopped,
    restarted or moved away); whether the server ended it. `attached` is called once the server accepted the
    session."""
    op = await conn.request("POST", f"/1.0/instances/{name}/console",
                            {"width": size[0], "height": size[1], "type": "console"})
    fds = op["metadata"]["fds"]
    async with contextlib.AsyncExitStack() as stack:
        control = await stack.enter_async_context(await conn.operation_websocket(op, fds["control"]))
        data = await stack.enter_async_context(await conn.operation_websocket(op, fds["0"]))
        if attached is not None:
            attached()
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(_output(data, stdout)), asyncio.create_task(_input(data, stdin)),
                 asyncio.create_task(_drain(control))]
        resizing = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGWINCH, _send_resize, control, stdout)
            resizing = True
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            ended = tasks[1] not in done
        finally:
            if resizing:
                loop.remove_signal_handler(signal.SIGWINCH)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await control.close()  # the detach: the server ends the session, the instance goes on
            with contextlib.suppress(Exception):
                await data.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.poll_until_done(op), 5)
    return ended


async def _output(ws: aiohttp.ClientWebSocketResponse, sink: BinaryIO) -> None:
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            sink.write(msg.data)
            sink.flush()
        elif msg.type != aiohttp.WSMsgType.TEXT:
            break


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


async def _input(ws: aiohttp.ClientWebSocketResponse, stdin: BinaryIO) -> None:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    fd = stdin.fileno()
    stop = threading.Event()

    def reader() -> None:  # a thread: a terminal's reads block, and the loop must not
        while not stop.is_set():
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
            if not chunk:
                return

    threading.Thread(target=reader, daemon=True, name="console stdin").start()
    keys = DetachFilter()
    try:
        while chunk := await queue.get():
            if out := keys.feed(chunk):
                await ws.send_bytes(out)
            if keys.detached:
                return
    finally:
        stop.set()


def _send_resize(ws: aiohttp.ClientWebSocketResponse, stdout: BinaryIO) -> None:
    try:
        size = os.get_terminal_size(stdout.fileno())
    except (OSError, ValueError):
        return
    asyncio.ensure_future(ws.send_json({"command": "window-resize",
                                        "args": {"width": str(size.columns), "height": str(size.lines)}}))


async def show_log(conn: Connection, name: str) -> bytes:
    return await conn.raw(f"/1.0/instances/{name}/console")


async def clear_log(conn: Connection, name: str) -> None:
    await conn.request("DELETE", f"/1.0/instances/{name}/console")

