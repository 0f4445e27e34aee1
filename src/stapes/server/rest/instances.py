"""/1.0/instances and everything below it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from stapes.api.config_keys import validate_instance_config
from stapes.api.errors import BadRequest, NotFound
from stapes.api.filters import matches
from stapes.api.names import validate_entity_name
from stapes.api.requests import (
    ExecPost,
    InstancePost,
    InstancePut,
    InstanceSource,
    InstancesPost,
    InstanceStatePut,
    SnapshotPost,
    SnapshotsPost,
    decode,
    fields_set,
)
from stapes.api.status import StatusCode
from stapes.server.instances.driver import ExecRequest
from stapes.server.migration.protocol import PREFERENCE as TRANSPORTS
from stapes.server.migration.service import channel_names
from stapes.server.operations import Operation
from stapes.server.rest import backups
from stapes.server.rest.common import (
    async_operation,
    body,
    daemon,
    instance_url,
    project,
    raw_body,
    recursion,
    start_task,
    sync,
)
from stapes.server.store.db import InstanceRow


def routes(r: web.RouteTableDef) -> None:
    @r.get("/1.0/instances")
    async def list_instances(request: web.Request) -> web.Response:
        d = daemon(request)
        all_projects = request.query.get("all-projects") in ("true", "1")
        proj = None if all_projects else await project(request)
        level = recursion(request)
        expression = request.query.get("filter", "")
        if level == 0 and not expression:
            rows = await d.store.instances(proj)
            return sync([instance_url(row.name, row.project) for row in rows])
        rendered = [i for i in await d.instances.render_all(proj, with_state=level >= 2) if matches(i, expression)]
        if level == 0:
            return sync([instance_url(i["name"], i["project"]) for i in rendered])
        return sync(rendered)

    @r.post("/1.0/instances")
    async def create_instance(request: web.Request) -> web.Response:
        if request.content_type == backups.BACKUP_CONTENT_TYPE:  # `import`: a backup tarball as the body
            return await backups.import_backup(request)
        d = daemon(request)
        proj = await project(request)
        data = await body(request, InstancesPost)
        source = data.source or InstanceSource()
        image: str | None = None
        if source.type == "image":
            image = source.alias or source.fingerprint
            if not image:
                raise BadRequest("An image source needs an 'alias' or a 'fingerprint'")
            if source.server:
                raise BadRequest("Images from other servers are not supported yet: import the image here first")
        elif source.type == "copy":
            raise BadRequest("Copying an instance on the same server is not supported yet: copy through a remote")
        elif source.type not in ("none", "migration"):
            raise BadRequest(f"Unknown source type {source.type!r}: use image, migration or none")
        row = InstanceRow(
            project=proj, name=data.name, type=data.type or "container", architecture="",
            description=data.description, config=dict(data.config or {}), devices=dict(data.devices or {}),
            profiles=["default"] if data.profiles is None else list(data.profiles), ephemeral=data.ephemeral,
        )
        if not row.name:
            raise BadRequest("The instance needs a name")
        if image is not None:
            await d.images.resolve(image)
        if source.type == "migration" and source.refresh and await _exists(request, proj, row.name):
            return await _refresh_migration(request, row, source)
        if source.type == "migration":
            await d.instances.from_peer(row)
        await d.instances.validate_new(row)
        if source.type == "migration":
            return _receive_migration(request, row, source)
        start = data.start

        async def work(op: Operation) -> None:
            await d.instances.create(row, image, op)
            if start:
                await d.instances.change_state(proj, row.name, "start")

        return start_task(request, "Creating instance", proj, work, row.name)

    @r.get("/1.0/instances/{name}")
    async def get_instance(request: web.Request) -> web.Response:
        d = daemon(request)
        row = await d.instances.get(await project(request), request.match_info["name"])
        return sync(await d.instances.render(row, with_state=recursion(request) >= 1))

    async def update(request: web.Request, replace: bool) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        await d.instances.get(proj, name)
        raw = await raw_body(request)
        data, present = decode(raw, InstancePut), fields_set(raw)
        if replace and data.restore:
            snapshot = data.restore
            await d.instances.snapshot(proj, name, snapshot)

            async def restore(op: Operation) -> None:
                await d.instances.restore_snapshot(proj, name, snapshot)

            return start_task(request, "Restoring snapshot", proj, restore, name)
        changes: dict[str, Any] = {}
        if replace or "config" in present:
            changes["config"] = dict(data.config or {})
        if replace or "devices" in present:
            changes["devices"] = dict(data.devices or {})
        if "profiles" in present:
            changes["profiles"] = list(data.profiles or [])
        if data.description is not None:
            changes["description"] = data.description
        if data.ephemeral is not None:
            changes["ephemeral"] = data.ephemeral
        await d.instances.update(proj, name, changes, replace=replace)
        if replace:  # Incus answers PUT with an (already finished) operation
            return start_task(request, "Updating instance", proj, None, name)
        return sync()

    @r.put("/1.0/instances/{name}")
    async def replace_instance(request: web.Request) -> web.Response:
        return await update(request, True)

    @r.patch("/1.0/instances/{name}")
    async def patch_instance(request: web.Request) -> web.Response:
        return await update(request, False)

    @r.delete("/1.0/instances/{name}")
    async def delete_instance(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        await d.instances.get(proj, name)

        async def work(op: Operation) -> None:
            await d.instances.delete(proj, name)

        return start_task(request, "Deleting instance", proj, work, name)

    @r.post("/1.0/instances/{name}")
    async def rename_or_migrate(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        await d.instances.get(proj, name)
        data = await body(request, InstancePost)
        if data.migration:
            return await _send_migration(request, proj, name, data)
        if data.pool or data.project:
            raise BadRequest("Moving an instance to another pool or project goes through the client: "
                             "'stapes move NAME NAME -s POOL' or '--target-project PROJECT'")
        new_name = data.name
        if not new_name:
            raise BadRequest("Renaming needs a new 'name'")
        await d.instances.rename(proj, name, new_name)
        return start_task(request, "Renaming instance", proj, None, new_name)

    @r.get("/1.0/instances/{name}/state")
    async def get_state(request: web.Request) -> web.Response:
        d = daemon(request)
        row = await d.instances.get(await project(request), request.match_info["name"])
        return sync((await d.instances.render(row, with_state=True))["state"])

    @r.put("/1.0/instances/{name}/state")
    async def change_state(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        await d.instances.get(proj, name)
        data = await body(request, InstanceStatePut)
        action = data.action
        if action not in ("start", "stop", "restart", "freeze", "unfreeze"):
            raise BadRequest(f"Unknown action {action!r}: use start, stop, restart, freeze or unfreeze")
        if data.stateful:
            raise BadRequest("Stateful start and stop are not supported yet")
        timeout, force = data.timeout, data.force

        async def work(op: Operation) -> None:
            await d.instances.change_state(proj, name, action, timeout=timeout, force=force)

        descriptions = {"start": "Starting", "stop": "Stopping", "restart": "Restarting", "freeze": "Freezing",
                        "unfreeze": "Unfreezing"}
        return start_task(request, f"{descriptions[action]} instance", proj, work, name)

    @r.post("/1.0/instances/{name}/exec")
    async def exec_command(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        data = await body(request, ExecPost)
        if not data.command:
            raise BadRequest("exec needs a 'command': a non-empty list of strings")
        if not data.wait_for_websocket:
            raise BadRequest("exec without websockets ('wait-for-websocket': false) is not supported yet")
        user, group = data.user or 0, data.group or 0
        width, height = data.width or 80, data.height or 24  # 0: not a terminal (Incus sends it)
        if not (0 < width <= 10000 and 0 < height <= 10000):
            raise BadRequest("exec 'width' and 'height' must be between 0 and 10000")
        await d.instances.check_running(proj, name)
        await d.instances.check_exec_ids(proj, name, user, group)  # never (uid_t)-1, never outside the map
        interactive = data.interactive
        exec_request = ExecRequest(command=data.command, environment=dict(data.environment or {}),
                                   cwd=data.cwd or "", user=user, group=group, interactive=interactive)
        channels = ("0", "control") if interactive else ("0", "1", "2", "control")
        op = d.operations.create(op_class="websocket", description="Executing command", project=proj,
                                 resources={"instances": [instance_url(name, proj)]}, channels=channels)
        op.metadata["fds"] = dict(op.secrets)

        async def work(op: Operation) -> dict[str, Any]:
            return await d.instances.exec(op, proj, name, exec_request, width, height)

        op.start(work)
        return async_operation(op)

    @r.get("/1.0/instances/{name}/snapshots")
    async def list_snapshots(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        row = await d.instances.get(proj, name)
        snaps = await d.instances.snapshots(proj, name)
        if recursion(request):
            return sync([d.instances.render_snapshot(row, s) for s in snaps])
        return sync([f"/1.0/instances/{name}/snapshots/{s.name}" for s in snaps])

    @r.post("/1.0/instances/{name}/snapshots")
    async def create_snapshot(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        await d.instances.get(proj, name)
        data = await body(request, SnapshotsPost)
        if data.stateful:
            raise BadRequest("Stateful snapshots are not supported yet")
        snapshot = data.name
        if snapshot:
            validate_entity_name("snapshot", snapshot)

        async def work(op: Operation) -> None:
            await d.instances.create_snapshot(proj, name, snapshot or None, data.description)

        return start_task(request, "Snapshotting instance", proj, work, name)

    @r.get("/1.0/instances/{name}/snapshots/{snapshot}")
    async def get_snapshot(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        row = await d.instances.get(proj, request.match_info["name"])
        snap = await d.instances.snapshot(proj, row.name, request.match_info["snapshot"])
        return sync(d.instances.render_snapshot(row, snap))

    @r.delete("/1.0/instances/{name}/snapshots/{snapshot}")
    async def delete_snapshot(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name, snapshot = request.match_info["name"], request.match_info["snapshot"]
        await d.instances.snapshot(proj, name, snapshot)

        async def work(op: Operation) -> None:
            await d.instances.delete_snapshot(proj, name, snapshot)

        return start_task(request, "Deleting snapshot", proj, work, name)

    @r.post("/1.0/instances/{name}/snapshots/{snapshot}")
    async def rename_snapshot(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name, snapshot = request.match_info["name"], request.match_info["snapshot"]
        data = await body(request, SnapshotPost)
        if data.migration:
            raise BadRequest("Migrating a single snapshot is not supported: copy the instance")
        await d.instances.rename_snapshot(proj, name, snapshot, data.name)
        return start_task(request, "Renaming snapshot", proj, None, name)

    @r.get("/1.0/instances/{name}/logs")
    async def list_logs(request: web.Request) -> web.Response:
        d = daemon(request)
        proj = await project(request)
        name = request.match_info["name"]
        files = await d.instances.log_files(proj, name)
        return sync([f"/1.0/instances/{name}/logs/{f}" for f, path in files.items() if path.exists()])

    @r.get("/1.0/instances/{name}/logs/{file}")
    async def get_log(request: web.Request) -> web.StreamResponse:
        d = daemon(request)
        files = await d.instances.log_files(await project(request), request.match_info["name"])
        path = files.get(request.match_info["file"])
        if path is None or not path.exists():
            raise NotFound(f"Log file {request.match_info['file']!r} not found")
        text = await asyncio.to_thread(path.read_bytes)
        return web.Response(body=text, content_type="text/plain")


def _migration_operation(request: web.Request, description: str, project: str, name: str, websockets: bool,
                         live: bool) -> Operation:
    op = daemon(request).operations.create(
        op_class="websocket" if websockets else "task", description=description, project=project,
        resources={"instances": [instance_url(name, project)]},
        channels=channel_names(live) if websockets else ())
    if websockets:
        op.metadata.update(op.secrets)  # Incus puts the secrets at the top of the metadata
    return op


def _start_claimed(request: web.Request, op: Operation, project: str, name: str,
                   work: Callable[[Operation], Awaitable[None]]) -> web.Response:
    """Run a migration operation with the instance claimed for it from this moment to its end: a second
    move, a delete, start, rename or snapshot of it is refused at once, naming this operation."""
    try:
        release = daemon(request).instances.mark_busy(project, name, op)
    except BaseException:
        op.finish_without_task(StatusCode.CANCELLED, "refused: the instance is busy")
        raise

    op.when_settled(release)
    op.start(work)
    return async_operation(op)


async def _send_migration(request: web.Request, project_name: str, name: str, data: InstancePost) -> web.Response:
    """Source side: without a target, wait for the target (pull) or the client (relay) to dial us; with a
    target, dial it (push)."""
    d = daemon(request)
    await d.migration.check_source(project_name, name, data.live)
    d.instances.check_idle(project_name, name)
    target = data.target
    if target is not None:
        check_peer(target.operation, target.secrets, target.certificate, "target", data.live)
    if data.transport is not None and data.transport not in TRANSPORTS:
        raise BadRequest(f"Unknown transport {data.transport!r}: use one of {', '.join(TRANSPORTS)}")
    if data.keep_running and not data.live:
        raise BadRequest("keep_running applies to a live copy only: add live=true, or leave it out")
    op = _migration_operation(request, "Migrating instance", project_name, name, websockets=target is None,
                              live=data.live)
    instance_only = data.instance_only or data.container_only

    async def work(op: Operation) -> None:
        await d.migration.run_source(op, project_name, name, target, data.transport, instance_only, live=data.live,
                                     keep_running=data.keep_running)

    return _start_claimed(request, op, project_name, name, work)


def _receive_migration(request: web.Request, row: InstanceRow, source: InstanceSource) -> web.Response:
    """Target side: pull dials the source's operation; push waits for the source (or a relaying client)."""
    d = daemon(request)
    _check_migration_source(source)
    d.instances.check_idle(row.project, row.name)  # refused before an operation exists for it
    op = _migration_operation(request, "Creating instance", row.project, row.name, websockets=source.mode == "push",
                              live=source.live)

    async def work(op: Operation) -> None:
        await d.migration.run_sink(op, row, source)

    return _start_claimed(request, op, row.project, row.name, work)


def check_peer(operation: str, secrets: dict[str, str] | None, certificate: str, side: str, live: bool) -> None:
    """The other server's operation, as a client handed it over: checked before anything starts."""
    if not operation.startswith("https://"):
        raise BadRequest(f"The {side}'s operation must be an https:// URL of its /1.0/operations/<id>")
    missing = [n for n in channel_names(live) if not (secrets or {}).get(n)]
    if missing:
        hint = " (a live move needs one for 'criu'; or move with --stateless)" if "criu" in missing else ""
        raise BadRequest(f"No secret given for the {side}'s {', '.join(missing)} websocket(s){hint}")
    if "BEGIN CERTIFICATE" not in certificate:
        raise BadRequest(f"The {side}'s certificate (PEM) is required: it is pinned for the transfer")


def _check_migration_source(source: InstanceSource) -> None:
    if source.mode not in ("pull", "push"):
        raise BadRequest(f"Unknown migration mode {source.mode!r}: use pull or push (relay is push on both ends)")
    if source.mode == "pull":
        check_peer(source.operation, source.secrets, source.certificate, "source", source.live)


async def _exists(request: web.Request, project_name: str, name: str) -> bool:
    try:
        await daemon(request).instances.get(project_name, name)
    except NotFound:
        return False
    return True


async def _refresh_migration(request: web.Request, row: InstanceRow, source: InstanceSource) -> web.Response:
    """copy --refresh onto an existing copy."""
    d = daemon(request)
    _check_migration_source(source)
    if source.live:
        raise BadRequest("A refresh copies a stopped instance's files: refresh without live")
    validate_instance_config(row.config)
    for profile in row.profiles:
        await d.store.profile(profile)
    d.instances.check_idle(row.project, row.name)
    op = _migration_operation(request, "Refreshing instance", row.project, row.name,
                              websockets=source.mode == "push", live=False)

    async def work(op: Operation) -> None:
        await d.migration.run_refresh(op, row, source)

    return _start_claimed(request, op, row.project, row.name, work)
