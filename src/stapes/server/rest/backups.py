"""/1.0/instances/<name>/backups (export) and the backup upload of POST /1.0/instances (import)."""

from __future__ import annotations

import time

from aiohttp import web

from stapes.api.backups import DEFAULT_ALGORITHM, InstanceBackupPost, InstanceBackupsPost, parse_time
from stapes.api.errors import BadRequest
from stapes.server.operations import Operation
from stapes.server.rest.common import async_operation, body, daemon, instance_url, project, recursion, sync

BACKUP_CONTENT_TYPE = "application/octet-stream"


def _backup_url(name: str, backup: str, project_name: str) -> str:
    suffix = "" if project_name == "default" else f"?project={project_name}"
    return f"/1.0/instances/{name}/backups/{backup}{suffix}"


def _operation(request: web.Request, description: str, project_name: str, name: str, backup: str | None,
               may_cancel: bool) -> Operation:
    resources = {"instances": [instance_url(name, project_name)]}
    if backup is not None:
        resources["backups"] = [_backup_url(name, backup, project_name)]
    return daemon(request).operations.create(op_class="task", description=description, project=project_name,
                                             resources=resources, may_cancel=may_cancel)


def routes(r: web.RouteTableDef) -> None:
    @r.get("/1.0/instances/{name}/backups")
    async def list_backups(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        records = await d.backups.records(proj, name)
        if recursion(request):
            return sync([r.to_json() for r in records])
        return sync([_backup_url(name, r.name, proj) for r in records])

    @r.post("/1.0/instances/{name}/backups")
    async def create_backup(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        data = await body(request, InstanceBackupsPost)
        backup = data.name or await d.backups.next_name(proj, name)
        compression = data.compression_algorithm or DEFAULT_ALGORITHM
        expires_at = parse_time(data.expires_at, "expires_at")
        if expires_at and expires_at <= time.time():
            raise BadRequest("expires_at is in the past: give a later time, or none for a backup that never expires")
        d.instances.check_idle(proj, name)
        await d.backups.check_create(proj, name, backup, compression)
        instance_only = data.instance_only or data.container_only
        op = _operation(request, "Backing up instance", proj, name, backup, may_cancel=True)

        async def work(op: Operation) -> None:
            await d.backups.create(op, proj, name, backup, expires_at=expires_at, instance_only=instance_only,
                                   compression=compression)

        op.start(work)
        return async_operation(op)

    @r.get("/1.0/instances/{name}/backups/{backup}")
    async def get_backup(request: web.Request) -> web.Response:
        d = daemon(request)
        record = await d.backups.get(await project(request), request.match_info["name"], request.match_info["backup"])
        return sync(record.to_json())

    @r.delete("/1.0/instances/{name}/backups/{backup}")
    async def delete_backup(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name, backup = request.match_info["name"], request.match_info["backup"]
        await d.backups.delete(proj, name, backup)
        op = _operation(request, "Removing instance backup", proj, name, None, may_cancel=False)
        op.start(_nothing)  # Incus answers with an operation: this one has already done its work
        return async_operation(op)

    @r.post("/1.0/instances/{name}/backups/{backup}")
    async def rename_backup(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name, backup = request.match_info["name"], request.match_info["backup"]
        data = await body(request, InstanceBackupPost)
        await d.backups.rename(proj, name, backup, data.name)
        op = _operation(request, "Renaming instance backup", proj, name, None, may_cancel=False)
        op.start(_nothing)
        return async_operation(op)

    @r.get("/1.0/instances/{name}/backups/{backup}/export")
    async def export_backup(request: web.Request) -> web.StreamResponse:
        d = daemon(request)
        proj = await project(request)
        name, backup = request.match_info["name"], request.match_info["backup"]
        await d.backups.get(proj, name, backup)
        # sendfile from the kernel: never read into memory; an open file survives the backup's removal.
        return web.FileResponse(d.backups.tarball(proj, name, backup), headers={
            "Content-Type": BACKUP_CONTENT_TYPE, "Content-Disposition": f'attachment; filename="{backup}.backup"'})


async def _nothing(op: Operation) -> None:
    return None


async def import_backup(request: web.Request) -> web.Response:
    """POST /1.0/instances with a backup tarball as the body (Incus's `incus import`): `X-Incus-pool` and
    `X-Incus-name` override the pool and the name. The upload and its index are checked before answering;
    the operation (cancellable) checks every member, then creates the instance."""
    d = daemon(request)
    proj = await project(request)
    upload = await d.backups.receive_upload(request.content, request.content_length)
    try:
        plan = await d.backups.inspect(upload, proj, pool=request.headers.get("X-Incus-pool", ""),
                                       name=request.headers.get("X-Incus-name", ""))
        d.instances.check_idle(proj, plan.row.name)
    except BaseException:
        upload.unlink(missing_ok=True)
        raise
    op = _operation(request, "Restoring backup", proj, plan.row.name, None, may_cancel=True)

    async def work(op: Operation) -> None:
        await d.backups.run_import(op, plan)

    op.start(work)
    return async_operation(op)
