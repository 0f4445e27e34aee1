"""/1.0/instances/<name>/console: attach (a websocket operation), read and clear the console's log."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from stapes.api.errors import BadRequest
from stapes.api.requests import Body
from stapes.server.instances import console
from stapes.server.instances.exec_session import window_size
from stapes.server.operations import Operation
from stapes.server.rest.common import async_operation, body, daemon, instance_url, project, sync


class ConsolePost(Body):
    width: int | None = None
    height: int | None = None
    type: str = "console"


def routes(r: web.RouteTableDef) -> None:
    @r.post("/1.0/instances/{name}/console")
    async def attach(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        data = await body(request, ConsolePost)
        if data.type != "console":
            raise BadRequest(f"Console type {data.type!r} is not supported: instances here have a text console "
                             "only (type 'console'; a VM's is its serial port, it has no graphical one)")
        width, height = data.width or 80, data.height or 24
        if window_size(width) is None or window_size(height) is None:
            raise BadRequest("console 'width' and 'height' must be between 0 and 10000")
        driver, spec = await d.instances.runtime(proj, name)
        session = await console.session_console(driver, spec)
        op = d.operations.create(op_class="websocket", description="Showing console", project=proj,
                                 resources={"instances": [instance_url(name, proj)]}, channels=("0", "control"))
        op.metadata["fds"] = dict(op.secrets)

        async def work(op: Operation) -> dict[str, Any]:
            return await console.run_console(op, session, width, height)

        op.start(work)
        return async_operation(op)

    @r.get("/1.0/instances/{name}/console")
    async def show_log(request: web.Request) -> web.Response:
        driver, spec = await daemon(request).instances.runtime(await project(request), request.match_info["name"])
        text = await console.consoles_of(driver).log(spec)
        return web.Response(body=text, content_type="application/octet-stream")

    @r.delete("/1.0/instances/{name}/console")
    async def clear_log(request: web.Request) -> web.Response:
        driver, spec = await daemon(request).instances.runtime(await project(request), request.match_info["name"])
        await console.consoles_of(driver).clear(spec)
        return sync()
