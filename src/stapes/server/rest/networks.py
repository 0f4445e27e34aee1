"""/1.0/networks: managed bridges (Incus's network API shape). Handlers parse and call the network service."""

from __future__ import annotations

from aiohttp import web

from stapes.api.requests import EntityPut, NetworksPost, decode, fields_set
from stapes.server.rest.common import body, daemon, raw_body, recursion, sync


async def list_networks(request: web.Request) -> web.Response:
    networks = daemon(request).networks
    rows = await networks.all()
    if recursion(request):
        return sync([networks.render(row, await networks.used_by(row.name)) for row in rows])
    return sync([f"/1.0/networks/{row.name}" for row in rows])


async def create_network(request: web.Request) -> web.Response:
    data = await body(request, NetworksPost)
    await daemon(request).networks.create(data.name, data.type or "bridge", dict(data.config or {}),
                                          data.description)
    return sync(status=201)


async def get_network(request: web.Request) -> web.Response:
    networks = daemon(request).networks
    row = await networks.get(request.match_info["name"])
    return sync(networks.render(row, await networks.used_by(row.name)))


async def _update(request: web.Request, replace: bool) -> web.Response:
    name = request.match_info["name"]
    await daemon(request).networks.get(name)
    raw = await raw_body(request)
    data, present = decode(raw, EntityPut), fields_set(raw)
    config = dict(data.config or {}) if replace or "config" in present else None
    await daemon(request).networks.update(name, config, data.description, replace=replace)
    return sync()


async def replace_network(request: web.Request) -> web.Response:
    return await _update(request, True)


async def patch_network(request: web.Request) -> web.Response:
    return await _update(request, False)


async def delete_network(request: web.Request) -> web.Response:
    await daemon(request).networks.delete(request.match_info["name"])
    return sync()


async def network_state(request: web.Request) -> web.Response:
    return sync(await daemon(request).networks.state(request.match_info["name"]))


async def network_leases(request: web.Request) -> web.Response:
    return sync(await daemon(request).networks.leases(request.match_info["name"]))


def routes(r: web.RouteTableDef) -> None:
    r.get("/1.0/networks")(list_networks)
    r.post("/1.0/networks")(create_network)
    r.get("/1.0/networks/{name}")(get_network)
    r.put("/1.0/networks/{name}")(replace_network)
    r.patch("/1.0/networks/{name}")(patch_network)
    r.delete("/1.0/networks/{name}")(delete_network)
    r.get("/1.0/networks/{name}/state")(network_state)
    r.get("/1.0/networks/{name}/leases")(network_leases)
