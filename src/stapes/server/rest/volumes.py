"""/1.0/storage-pools/<pool>/volumes: custom storage volumes (and the instances' own, listed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from stapes.api.errors import BadRequest
from stapes.api.requests import InstanceSource, MigrationTarget, decode, fields_set
from stapes.api.status import StatusCode
from stapes.api.volumes import VolumePost, VolumePut, VolumeSource, VolumesPost, validate_volume_name
from stapes.server.migration.volumes import CHANNELS
from stapes.server.operations import Operation
from stapes.server.rest.common import async_operation, body, daemon, project, raw_body, recursion, sync
from stapes.server.rest.instances import check_peer
from stapes.server.storage.volumes import volume_url
from stapes.server.store.db import VolumeRow

CUSTOM = "/1.0/storage-pools/{pool}/volumes/custom/{name}"


def _operation(request: web.Request, description: str, pool: str, name: str, proj: str, *,
               websockets: bool) -> Operation:
    op = daemon(request).operations.create(
        op_class="websocket" if websockets else "task", description=description, project=proj,
        resources={"storage_volumes": [volume_url(pool, name, proj)]}, channels=CHANNELS if websockets else ())
    if websockets:
        op.metadata.update(op.secrets)
    return op


def _start_claimed(request: web.Request, op: Operation, pool: str, proj: str, name: str,
                   work: Callable[[Operation], Awaitable[None]]) -> web.Response:
    """The volume is claimed for the operation until it ends: a delete, rename or second move is refused."""
    try:
        release = daemon(request).volumes.mark_busy(pool, proj, name, op.id, op.description)
    except BaseException:
        op.finish_without_task(StatusCode.CANCELLED, "refused: the storage volume is busy")
        raise
    op.when_settled(release)
    op.start(work)
    return async_operation(op)


def _migration_source(source: VolumeSource) -> InstanceSource:
    if source.mode not in ("pull", "push"):
        raise BadRequest(f"Unknown migration mode {source.mode!r}: use pull or push (relay is push on both ends)")
    if source.mode == "pull":
        check_peer(source.operation, source.secrets, source.certificate, "source", False)
    return InstanceSource(type="migration", mode=source.mode, operation=source.operation,
                          certificate=source.certificate, secrets=source.secrets)


def routes(r: web.RouteTableDef) -> None:
    async def listing(request: web.Request, custom_only: bool) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        pool = request.match_info["pool"]
        items = await d.volumes.render_all(pool, proj, recursion=recursion(request) >= 1)
        if custom_only:
            items = [i for i in items if (i["type"] if isinstance(i, dict) else i.split("/")[-2]) == "custom"]
        return sync(items)

    @r.get("/1.0/storage-pools/{pool}/volumes")
    async def list_volumes(request: web.Request) -> web.Response:
        return await listing(request, False)

    @r.get("/1.0/storage-pools/{pool}/volumes/custom")
    async def list_custom(request: web.Request) -> web.Response:
        return await listing(request, True)

    async def create(request: web.Request, volume_type: str) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        pool = request.match_info["pool"]
        data = await body(request, VolumesPost)
        if (volume_type or data.type or "custom") != "custom":
            raise BadRequest(f"Only custom storage volumes can be created (not {volume_type or data.type!r}): "
                             "instances make their own")
        row = VolumeRow(pool, proj, data.name, data.description, data.content_type or "filesystem",
                        dict(data.config or {}))
        source = data.source or VolumeSource()
        if source.type in ("", "none"):
            await d.volumes.create(row)
            return sync()
        if source.type == "copy":
            if not source.name:
                raise BadRequest("A copy needs the source volume's 'name'")
            origin_pool = source.pool or pool
            await d.volumes.get(origin_pool, proj, source.name)
            await d.volumes.validate_new(row)
            op = _operation(request, "Copying storage volume", pool, row.name, proj, websockets=False)

            async def copy(op: Operation) -> None:
                await d.volumes.copy_local(origin_pool, source.name, row)

            return _start_claimed(request, op, origin_pool, proj, source.name, copy)
        if source.type == "migration":
            peer = _migration_source(source)
            if source.refresh:
                raise BadRequest("Refreshing a storage volume is not supported yet: delete the copy and copy again")
            await d.volumes.validate_new(row)
            op = _operation(request, "Creating storage volume", pool, row.name, proj,
                            websockets=source.mode == "push")

            async def receive(op: Operation) -> None:
                await d.volume_migration.run_sink(op, row, peer)

            return _start_claimed(request, op, pool, proj, row.name, receive)
        raise BadRequest(f"Unknown storage volume source type {source.type!r}: use copy or migration")

    @r.post("/1.0/storage-pools/{pool}/volumes")
    async def create_volume(request: web.Request) -> web.Response:
        return await create(request, "")

    @r.post("/1.0/storage-pools/{pool}/volumes/{type}")
    async def create_typed(request: web.Request) -> web.Response:
        return await create(request, request.match_info["type"])

    @r.get(CUSTOM)
    async def get_volume(request: web.Request) -> web.Response:
        d = daemon(request)
        row = await d.volumes.get(request.match_info["pool"], await project(request), request.match_info["name"])
        return sync(await d.volumes.render(row))

    async def update(request: web.Request, replace: bool) -> web.Response:
        d = daemon(request)
        raw = await raw_body(request)
        data = decode(raw, VolumePut)
        if data.restore:
            raise BadRequest("Storage volume snapshots are not supported yet: nothing to restore")
        present = fields_set(raw)
        await d.volumes.update(request.match_info["pool"], await project(request), request.match_info["name"],
                               data.description if (replace or "description" in present) else None,
                               data.config if (replace or "config" in present) else None, replace=replace)
        return sync()

    @r.put(CUSTOM)
    async def replace_volume(request: web.Request) -> web.Response:
        return await update(request, True)

    @r.patch(CUSTOM)
    async def patch_volume(request: web.Request) -> web.Response:
        return await update(request, False)

    @r.delete(CUSTOM)
    async def delete_volume(request: web.Request) -> web.Response:
        d = daemon(request)
        await d.volumes.delete(request.match_info["pool"], await project(request), request.match_info["name"])
        return sync()

    @r.post(CUSTOM)
    async def rename_or_migrate(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        pool, name = request.match_info["pool"], request.match_info["name"]
        data = await body(request, VolumePost)
        await d.volumes.get(pool, proj, name)
        if data.project and data.project != proj:
            raise BadRequest("Moving a storage volume to another project is not supported yet")
        if data.migration:
            target = data.target
            if target is not None:
                check_peer(target.operation, target.secrets, target.certificate, "target", False)
            d.volumes.check_idle(pool, proj, name)
            op = _operation(request, "Migrating storage volume", pool, name, proj, websockets=target is None)
            peer = None if target is None else MigrationTarget(operation=target.operation,
                                                               certificate=target.certificate,
                                                               secrets=target.secrets)

            async def send(op: Operation) -> None:
                await d.volume_migration.run_source(op, pool, proj, name, peer)

            return _start_claimed(request, op, pool, proj, name, send)
        new = data.name or name
        validate_volume_name(new)
        if data.pool and data.pool != pool:
            await d.store.pool(data.pool)
            op = _operation(request, "Moving storage volume", data.pool, new, proj, websockets=False)

            async def move(op: Operation) -> None:  # the source stays claimed by the operation throughout
                await d.volumes.move_local(pool, proj, name, data.pool, new, op.id)

            await d.volumes.check_moveable(pool, proj, name)
            return _start_claimed(request, op, pool, proj, name, move)
        if new == name:
            raise BadRequest("Nothing to do: give a new 'name', another 'pool', or 'migration': true")
        await d.volumes.rename(pool, proj, name, new)
        return sync()

    @r.get(CUSTOM + "/snapshots")
    async def list_snapshots(request: web.Request) -> web.Response:
        await daemon(request).volumes.get(request.match_info["pool"], await project(request),
                                          request.match_info["name"])
        return sync([])
