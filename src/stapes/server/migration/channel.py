"""A migration websocket, seen the same way from both ends (aiohttp server or client side).

Framing, as Incus: binary messages carry data; an empty text message (a "barrier") ends one stream, so
several streams can follow each other on one socket; control messages are one protobuf per binary message.

Every message in either direction counts as activity: `idle_timeout()` abandons a migration whose peer
went silent (alive on TCP, or not) instead of keeping an incomplete instance forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import aiohttp

from stapes.api.errors import StapesError

MAX_MESSAGE = 16 << 20  # one websocket message; senders use 1 MiB at most (Incus far less)
# A migration closes its sockets only once everything was said; waiting long for the peer's close frame
# serves nothing (an Incus peer sends none until its own operation ends).
CLOSE_TIMEOUT = 0.5
def _seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from the environment; anything else stops the daemon at start with a
    message naming the variable (not a traceback, and not a silently different timeout)."""
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 10**6:
        raise SystemExit(f"stapesd: {name}={text!r} is not a number of seconds: unset it, or give one such as 120")
    return value


IDLE_TIMEOUT = _seconds_from_env("STAPES_MIGRATION_IDLE_TIMEOUT", 120.0)


class ChannelClosed(StapesError):
    """The other side went away in the middle of a migration."""


class PeerIdle(StapesError):
    """Nothing arrived from, and nothing could be sent to, the other side for too long."""


class Channel:
    def __init__(self, name: str, ws: Any) -> None:
        self.name = name
        self.ws = ws
        self.on_activity: Callable[[], None] = lambda: None

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as err:
            raise ChannelClosed(f"The {self.name} connection was lost while sending: {err}") from None
        self.on_activity()

    async def barrier(self) -> None:
        try:
            await self.ws.send_str("")
        except (ConnectionError, RuntimeError) as err:
            raise ChannelClosed(f"The {self.name} connection was lost: {err}") from None
        self.on_activity()

    async def receive(self) -> bytes | None:
        """The next binary message; None at a barrier. Raises ChannelClosed if the socket closes."""
        msg = await self.ws.receive()
        self.on_activity()
        if msg.type == aiohttp.WSMsgType.BINARY:
            return bytes(msg.data)
        if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "":
            return None
        if msg.type == aiohttp.WSMsgType.TEXT:
            return str(msg.data).encode()
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise ChannelClosed(f"The {self.name} connection failed: {msg.data}")
        raise ChannelClosed(f"The {self.name} connection closed before the migration finished")

    async def stream(self) -> AsyncIterator[bytes]:
        """Binary messages up to the next barrier."""
        while (data := await self.receive()) is not None:
            yield data

    async def close(self) -> None:
        """Bounded, and quiet: closing a broken socket is not worth an error of its own. After a cancelled
        send, aiohttp keeps the cancelled drain waiter and raises CancelledError from close(): that one is
        not ours to propagate, unless our own task is being cancelled."""
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:  # noqa: S110 - see above
            pass


@contextlib.asynccontextmanager
async def idle_timeout(channels: Iterable[Channel], seconds: float, peer: str) -> AsyncIterator[None]:
    """Raise PeerIdle when no message moved on any of the channels for `seconds`."""
    loop = asyncio.get_running_loop()
    channels = list(channels)
    deadline = asyncio.timeout_at(loop.time() + seconds)
    try:
        async with deadline:
            def active() -> None:
                deadline.reschedule(loop.time() + seconds)

            for channel in channels:
                channel.on_activity = active
            yield
    except TimeoutError:
        if not deadline.expired():
            raise
        raise PeerIdle(f"The {peer} stopped responding: nothing moved on the migration connections for "
                       f"{seconds:.0f}s, so the migration was abandoned") from None
    finally:
        for channel in channels:
            channel.on_activity = lambda: None
