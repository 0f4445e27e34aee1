"""/1.0/operations: status, wait, cancel, websockets; and /1.0/events."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import WSMsgType, web

from stapes.api.errors import BadRequest, Forbidden
from stapes.server.rest.common import caller, daemon, recursion, sync
from stapes.server.streams import CLOSE_TIMEOUT, MAX_MESSAGE


def routes(r: web.RouteTableDef) -> None:
    @r.get("/1.0/operations")
    async def list_operations(request: web.Request) -> web.Response:
        d = daemon(request)
        project = None if request.query.get("all-projects") in ("true", "1") else (
            request.query.get("project") or "default")
        grouped: dict[str, list[object]] = {}
        for op in d.operations.list(project):
            key = op.status.label.lower()
            grouped.setdefault(key, []).append(op.to_json() if recursion(request) else op.url)
        return sync(grouped)

    @r.get("/1.0/operations/{id}")
    async def get_operation(request: web.Request) -> web.Response:
        return sync(daemon(request).operations.get(request.match_info["id"]).to_json())

    @r.delete("/1.0/operations/{id}")
    async def cancel_operation(request: web.Request) -> web.Response:
        await daemon(request).operations.get(request.match_info["id"]).cancel()
        return sync()

    @r.get("/1.0/operations/{id}/wait")
    async def wait_operation(request: web.Request) -> web.Response:
        op = daemon(request).operations.get(request.match_info["id"])
        try:
            timeout = float(request.query.get("timeout", "-1"))
        except ValueError:
            raise BadRequest("timeout must be a number of seconds (-1: no limit)") from None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(op.done.wait(), None if timeout < 0 else timeout)
        return sync(op.to_json())

    @r.get("/1.0/operations/{id}/websocket")
    async def operation_websocket(request: web.Request) -> web.StreamResponse:
        op = daemon(request).operations.get(request.match_info["id"])
        secret = request.query.get("secret", "")
        if not secret:
            if not caller(request).trusted:
                raise Forbidden("A websocket secret is required")
            raise BadRequest("Missing 'secret' query parameter")
        name = op.claim_channel(secret)  # refused before the upgrade: wrong, used or finished
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, compress=False, timeout=CLOSE_TIMEOUT, heartbeat=30)
        try:
            await ws.prepare(request)
        except BaseException:
            op.unclaim_channel(name)
            raise
        await op.attach(name, ws)
        return ws

    @r.get("/1.0/events")
    async def events(request: web.Request) -> web.StreamResponse:
        d = daemon(request)
        types = frozenset(t for t in request.query.get("type", "operation,logging,lifecycle").split(",") if t)
        project = None if request.query.get("all-projects") in ("true", "1") else (
            request.query.get("project") or None)
        ws = web.WebSocketResponse(heartbeat=30, compress=False)
        await ws.prepare(request)
        listener = d.events.subscribe(types, project)

        async def drain_incoming() -> None:
            async for msg in ws:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break

        reader = asyncio.create_task(drain_incoming())
        try:
            while not reader.done():
                getter = asyncio.create_task(listener.queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                await ws.send_json(getter.result())
        except ConnectionError:
            pass
        finally:
            d.events.unsubscribe(listener)
            reader.cancel()
            await ws.close()
        return ws
