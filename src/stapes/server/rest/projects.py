"""/1.0/projects: namespaces for instances."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from stapes.api.config_keys import SERVER_NAMESPACES, validate_config
from stapes.api.errors import BadRequest, Conflict
from stapes.api.names import validate_entity_name
from stapes.api.requests import EntityPost, EntityPut, Rename, decode, fields_set
from stapes.server.rest.common import body, daemon, instance_url, raw_body, recursion, sync
from stapes.server.store.db import ProjectRow


async def render(request: web.Request, row: ProjectRow) -> dict[str, Any]:
    instances = await daemon(request).store.instances(row.name)
    return {"name": row.name, "description": row.description, "config": row.config,
            "used_by": [instance_url(i.name, i.project) for i in instances]}


def _validate_config(config: dict[str, str]) -> None:
    validate_config(config, {}, SERVER_NAMESPACES, "project configuration")


async def _refuse_not_empty(request: web.Request, name: str) -> None:
    """Instances and custom storage volumes belong to their project (a volume's directory is named by it)."""
    d = daemon(request)
    if await d.store.instances(name):
        raise BadRequest(f"Project {name!r} is not empty: delete or move its instances first")
    volumes = [f"{v.pool}/{v.name}" for v in await d.store.volumes() if v.project == name]
    if volumes:
        raise BadRequest(f"Project {name!r} is not empty: it holds storage volumes {', '.join(sorted(volumes))}; "
                         "delete them first ('stapes storage volume delete POOL NAME --project "
                         f"{name}')")


def routes(r: web.RouteTableDef) -> None:
    @r.get("/1.0/projects")
    async def list_projects(request: web.Request) -> web.Response:
        rows = await daemon(request).store.projects()
        if recursion(request):
            return sync([await render(request, row) for row in rows])
        return sync([f"/1.0/projects/{row.name}" for row in rows])

    @r.post("/1.0/projects")
    async def create_project(request: web.Request) -> web.Response:
        data = await body(request, EntityPost)
        row = ProjectRow(data.name, data.description, data.config or {})
        validate_entity_name("project", row.name)
        _validate_config(row.config)
        try:
            await daemon(request).store.create_project(row)
        except Conflict:
            raise Conflict(f"Project {row.name!r} already exists") from None
        return sync()

    @r.get("/1.0/projects/{name}")
    async def get_project(request: web.Request) -> web.Response:
        return sync(await render(request, await daemon(request).store.project(request.match_info["name"])))

    async def update(request: web.Request, replace: bool) -> web.Response:
        d = daemon(request)
        row = await d.store.project(request.match_info["name"])
        raw = await raw_body(request)
        data, present = decode(raw, EntityPut), fields_set(raw)
        if replace or "config" in present:
            config = data.config or {}
            row.config = config if replace else {**row.config, **config}
        if data.description is not None:
            row.description = data.description
        _validate_config(row.config)
        await d.store.update_project(row)
        return sync()

    @r.put("/1.0/projects/{name}")
    async def replace_project(request: web.Request) -> web.Response:
        return await update(request, True)

    @r.patch("/1.0/projects/{name}")
    async def patch_project(request: web.Request) -> web.Response:
        return await update(request, False)

    @r.post("/1.0/projects/{name}")
    async def rename_project(request: web.Request) -> web.Response:
        d = daemon(request)
        name = request.match_info["name"]
        new = (await body(request, Rename)).name
        validate_entity_name("project", new)
        await d.store.project(name)
        if name == "default":
            raise BadRequest("The default project cannot be renamed")
        await _refuse_not_empty(request, name)
        try:
            await d.store.rename_project(name, new)
        except Conflict:
            raise Conflict(f"Project {new!r} already exists") from None
        return sync()

    @r.delete("/1.0/projects/{name}")
    async def delete_project(request: web.Request) -> web.Response:
        d = daemon(request)
        name = request.match_info["name"]
        await d.store.project(name)
        if name == "default":
            raise BadRequest("The default project cannot be deleted")
        await _refuse_not_empty(request, name)
        await d.store.delete_project(name)
        return sync()
