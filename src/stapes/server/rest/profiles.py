"""/1.0/profiles. Profiles are server-wide (as an Incus project with features.profiles=false)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from stapes.api.config_keys import validate_instance_config
from stapes.api.devices import validate_devices
from stapes.api.errors import BadRequest, Conflict
from stapes.api.names import validate_entity_name
from stapes.api.requests import EntityPost, EntityPut, Rename, decode, fields_set
from stapes.server.rest.common import body, daemon, instance_url, raw_body, recursion, sync
from stapes.server.store.db import ProfileRow


async def used_by(request: web.Request, name: str) -> list[str]:
    """Instances, and snapshots (a restore brings their profiles back), that use the profile."""
    d = daemon(request)
    users = [instance_url(row.name, row.project) for row in await d.store.instances() if name in row.profiles]
    users += [f"/1.0/instances/{s.instance}/snapshots/{s.name}" + ("" if s.project == "default" else
                                                                   f"?project={s.project}")
              for s in await d.store.all_snapshots() if name in s.profiles]
    return users


async def render(request: web.Request, row: ProfileRow) -> dict[str, Any]:
    return {"name": row.name, "description": row.description, "config": row.config, "devices": row.devices,
            "used_by": await used_by(request, row.name), "project": "default"}


def _validate(row: ProfileRow) -> None:
    validate_instance_config(row.config)
    validate_devices(row.devices)


def routes(r: web.RouteTableDef) -> None:
    @r.get("/1.0/profiles")
    async def list_profiles(request: web.Request) -> web.Response:
        rows = await daemon(request).store.profiles()
        if recursion(request):
            return sync([await render(request, row) for row in rows])
        return sync([f"/1.0/profiles/{row.name}" for row in rows])

    @r.post("/1.0/profiles")
    async def create_profile(request: web.Request) -> web.Response:
        data = await body(request, EntityPost)
        row = ProfileRow(data.name, data.description, data.config or {}, data.devices or {})
        validate_entity_name("profile", row.name)
        _validate(row)
        await daemon(request).instances.check_profile_change(row)  # no instance uses it yet: its nics' networks
        try:
            await daemon(request).store.create_profile(row)
        except Conflict:
            raise Conflict(f"Profile {row.name!r} already exists") from None
        return sync()

    @r.get("/1.0/profiles/{name}")
    async def get_profile(request: web.Request) -> web.Response:
        return sync(await render(request, await daemon(request).store.profile(request.match_info["name"])))

    async def update(request: web.Request, replace: bool) -> web.Response:
        d = daemon(request)
        row = await d.store.profile(request.match_info["name"])
        raw = await raw_body(request)
        data, present = decode(raw, EntityPut), fields_set(raw)
        if replace or "config" in present:
            config = data.config or {}
            row.config = config if replace else {**row.config, **config}
        if replace or "devices" in present:
            devices = data.devices or {}
            row.devices = devices if replace else {**row.devices, **devices}
        if data.description is not None:
            row.description = data.description
        _validate(row)
        await d.instances.check_profile_change(row)  # every instance using it must stay valid
        await d.store.update_profile(row)
        await d.redefine_instances(profile=row.name)
        return sync()

    @r.put("/1.0/profiles/{name}")
    async def replace_profile(request: web.Request) -> web.Response:
        return await update(request, True)

    @r.patch("/1.0/profiles/{name}")
    async def patch_profile(request: web.Request) -> web.Response:
        return await update(request, False)

    @r.post("/1.0/profiles/{name}")
    async def rename_profile(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        new = (await body(request, Rename)).name
        validate_entity_name("profile", new)
        if name == "default":
            raise BadRequest("The default profile cannot be renamed")
        if await used_by(request, name):
            raise BadRequest(f"Profile {name!r} is in use: remove it from its instances first")
        await daemon(request).store.profile(name)
        try:
            await daemon(request).store.rename_profile(name, new)
        except Conflict:
            raise Conflict(f"Profile {new!r} already exists") from None
        return sync()

    @r.delete("/1.0/profiles/{name}")
    async def delete_profile(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await daemon(request).store.profile(name)
        if name == "default":
            raise BadRequest("The default profile cannot be deleted")
        users = await used_by(request, name)
        if users:
            raise BadRequest(f"Profile {name!r} is in use by {', '.join(users)}: remove it from them first")
        await daemon(request).store.delete_profile(name)
        return sync()
