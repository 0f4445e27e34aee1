"""/1.0/storage-pools."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from stapes.api.devices import root_disk
from stapes.api.errors import BadRequest
from stapes.api.requests import EntityPost, EntityPut
from stapes.server.rest.common import body, daemon, instance_url, recursion, sync
from stapes.server.storage.base import TUNABLE_KEYS, check_tunables
from stapes.server.storage.volumes import volume_url
from stapes.server.store.db import PoolRow


async def used_by(request: web.Request, pool: str) -> list[str]:
    d = daemon(request)
    users = [f"/1.0/profiles/{p.name}" for p in await d.store.profiles()
             if (root := root_disk(p.devices)) and root[1].get("pool") == pool]
    for row in await d.store.instances():
        spec_root = root_disk((await d.instances.expand(row))[1])
        if spec_root and spec_root[1].get("pool") == pool:
            users.append(instance_url(row.name, row.project))
    users += [volume_url(pool, v.name, v.project) for v in await d.store.volumes(pool)]  # custom volumes
    return users


async def render(request: web.Request, row: PoolRow) -> dict[str, Any]:
    return {"name": row.name, "driver": row.driver, "description": row.description, "config": row.config,
            "status": "Created", "locations": ["none"], "used_by": await used_by(request, row.name)}


def routes(r: web.RouteTableDef) -> None:
    @r.get("/1.0/storage-pools")
    async def list_pools(request: web.Request) -> web.Response:
        rows = await daemon(request).store.pools()
        if recursion(request):
            return sync([await render(request, row) for row in rows])
        return sync([f"/1.0/storage-pools/{row.name}" for row in rows])

    @r.post("/1.0/storage-pools")
    async def create_pool(request: web.Request) -> web.Response:
        data = await body(request, EntityPost)
        await daemon(request).storage.create(data.name, data.driver, data.config or {}, data.description)
        return sync()

    @r.get("/1.0/storage-pools/{name}")
    async def get_pool(request: web.Request) -> web.Response:
        return sync(await render(request, await daemon(request).store.pool(request.match_info["name"])))

    @r.get("/1.0/storage-pools/{name}/resources")
    async def pool_resources(request: web.Request) -> web.Response:
        usage = await (await daemon(request).storage.driver(request.match_info["name"])).usage()
        return sync({"space": usage, "inodes": {"used": 0, "total": 0}})

    async def update(request: web.Request, replace: bool) -> web.Response:
        d = daemon(request)
        row = await d.store.pool(request.match_info["name"])
        data = await body(request, EntityPut)
        if data.description is not None:
            row.description = data.description
        config = data.config or {}
        fixed = {k: v for k, v in row.config.items() if k not in TUNABLE_KEYS}
        changed = [k for k in config if k not in TUNABLE_KEYS and config[k] != fixed.get(k)]
        if changed:
            raise BadRequest(f"{', '.join(sorted(changed))} cannot change once the pool exists; only "
                             f"{', '.join(TUNABLE_KEYS)} can")
        old = {} if replace else {k: v for k, v in row.config.items() if k in TUNABLE_KEYS}
        merged = {**old, **{k: v for k, v in config.items() if k in TUNABLE_KEYS}}
        tunables = {k: v for k, v in merged.items() if v}  # an empty value unsets the key
        check_tunables(tunables)
        row.config = {**fixed, **tunables}
        await d.store.update_pool(row)
        return sync()

    @r.put("/1.0/storage-pools/{name}")
    async def replace_pool(request: web.Request) -> web.Response:
        return await update(request, True)

    @r.patch("/1.0/storage-pools/{name}")
    async def patch_pool(request: web.Request) -> web.Response:
        return await update(request, False)

    @r.delete("/1.0/storage-pools/{name}")
    async def delete_pool(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await daemon(request).storage.delete(name, await used_by(request, name))
        return sync()
