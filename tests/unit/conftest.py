from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from stapes.server.streams import Channel


@pytest.fixture
async def channels() -> AsyncIterator[tuple[Channel, Channel]]:
    """Two ends of one real websocket on 127.0.0.1, as a migration's `criu` channel: (server side, client
    side), with the daemon's message size limit."""
    accepted: asyncio.Future[web.WebSocketResponse] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=16 << 20)
        await ws.prepare(request)
        accepted.set_result(ws)
        await done.wait()
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"http://127.0.0.1:{port}/",
                                                                          max_msg_size=16 << 20) as client:
            try:
                yield Channel("criu", await accepted), Channel("criu", client)
            finally:
                done.set()
    finally:
        await runner.cleanup()
