"""A migration websocket, seen the same way from both ends (aiohttp server or client side).

Framing, as Incus: binary messages carry data; an empty text message (a "barrier") ends one stream, so
several streams can follow each other on one socket; control messages are one protobuf per binary message.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from stapes.api.errors import StapesError


class ChannelClosed(StapesError):
    """The other side went away in the middle of a migration."""


class Channel:
    def __init__(self, name: str, ws: Any) -> None:
        self.name = name
        self.ws = ws

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as err:
            raise ChannelClosed(f"The {self.name} connection was lost while sending: {err}") from None

    async def barrier(self) -> None:
        try:
            await self.ws.send_str("")
        except (ConnectionError, RuntimeError) as err:
            raise ChannelClosed(f"The {self.name} connection was lost: {err}") from None

    async def receive(self) -> bytes | None:
        """The next binary message; None at a barrier. Raises ChannelClosed if the socket closes."""
        msg = await self.ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            return bytes(msg.data)
        if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "":
            return None
        if msg.type == aiohttp.WSMsgType.TEXT:
            return str(msg.data).encode()
        raise ChannelClosed(f"The {self.name} connection closed before the migration finished")

    async def stream(self) -> AsyncIterator[bytes]:
        """Binary messages up to the next barrier."""
        while (data := await self.receive()) is not None:
            yield data

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken socket is not worth an error of its own
            await self.ws.close()
