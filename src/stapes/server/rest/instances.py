"""/1.0/instances and everything below it."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from stapes.api.config_keys import validate_instance_config
from stapes.api.errors import BadRequest, NotFound
from stapes.api.filters import matches
from stapes.server.instances.driver import ExecRequest
from stapes.server.migration.protocol import PREFERENCE as TRANSPORTS
from stapes.server.operations import Operation
from stapes.server.rest.common import (
    async_operation,
    body,
    daemon,
    devices_map,
    instance_url,
    project,
    recursion,
    start_task,
    string_map,
    sync,
)
from stapes.server.store.db import InstanceRow


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"timeout must be a number of seconds, got {value!r}") from None


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
        d = daemon(request)
        proj = await project(request)
        data = await body(request)
        source = data.get("source") or {"type": "none"}
        source_type = source.get("type", "none")
        image: str | None = None
        if source_type == "image":
            image = source.get("alias") or source.get("fingerprint")
            if not image:
                raise BadRequest("An image source needs an 'alias' or a 'fingerprint'")
            if source.get("server"):
                raise BadRequest("Images from other servers are not supported yet: import the image here first")
        elif source_type == "copy":
            raise BadRequest("Copying an instance on the same server is not supported yet: copy through a remote")
        elif source_type not in ("none", "migration"):
            raise BadRequest(f"Unknown source type {source_type!r}: use image, migration or none")
        profiles = data.get("profiles")
        row = InstanceRow(
            project=proj, name=str(data.get("name") or ""), type=data.get("type") or "container",
            architecture="", description=str(data.get("description") or ""),
            config=string_map(data.get("config"), "config"), devices=devices_map(data.get("devices")),
            profiles=["default"] if profiles is None else [str(p) for p in profiles],
            ephemeral=bool(data.get("ephemeral")),
        )
        if not row.name:
            raise BadRequest("The instance needs a name")
        if image is not None:
            await d.images.resolve(image)
        if source_type == "migration" and source.get("refresh") and await _exists(request, proj, row.name):
            return await _refresh_migration(request, row, source)
        await d.instances.validate_new(row)
        if source_type == "migration":
            return _receive_migration(request, row, source)
        start = bool(data.get("start"))

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
        data = await body(request)
        if replace and data.get("restore"):
            snapshot = str(data["restore"])
            await d.instances.snapshot(proj, name, snapshot)

            async def restore(op: Operation) -> None:
                await d.instances.restore_snapshot(proj, name, snapshot)

            return start_task(request, "Restoring snapshot", proj, restore, name)
        changes: dict[str, Any] = {}
        if "config" in data:
            changes["config"] = string_map(data["config"], "config")
        if "devices" in data:
            changes["devices"] = devices_map(data["devices"])
        for key in ("profiles", "description"):
            if key in data:
                changes[key] = data[key]
        if replace:
            changes.setdefault("config", {})
            changes.setdefault("devices", {})
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
        data = await body(request)
        if data.get("migration"):
            return await _send_migration(request, proj, name, data)
        new_name = str(data.get("name") or "")
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
        data = await body(request)
        action = str(data.get("action") or "")
        if action not in ("start", "stop", "restart", "freeze", "unfreeze"):
            raise BadRequest(f"Unknown action {action!r}: use start, stop, restart, freeze or unfreeze")
        if data.get("stateful"):
            raise BadRequest("Stateful start and stop are not supported yet")
        timeout = _timeout(data.get("timeout"))
        force = bool(data.get("force"))

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
        data = await body(request)
        command = data.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            raise BadRequest("exec needs a 'command': a non-empty list of strings")
        if not data.get("wait-for-websocket", False):
            raise BadRequest("exec without websockets ('wait-for-websocket': false) is not supported yet")
        await d.instances.check_running(proj, name)
        interactive = bool(data.get("interactive"))
        exec_request = ExecRequest(
            command=command, environment=string_map(data.get("environment"), "environment"),
            cwd=str(data.get("cwd") or ""), user=int(data.get("user") or 0), group=int(data.get("group") or 0),
            interactive=interactive,
        )
        width, height = int(data.get("width") or 80), int(data.get("height") or 24)
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
        data = await body(request)
        if data.get("stateful"):
            raise BadRequest("Stateful snapshots are not supported yet")
        snapshot = str(data.get("name") or "")

        async def work(op: Operation) -> None:
            await d.instances.create_snapshot(proj, name, snapshot or None, str(data.get("description") or ""))

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
        data = await body(request)
        if data.get("migration"):
            raise BadRequest("Migrating a single snapshot is not supported: copy the instance")
        await d.instances.rename_snapshot(proj, name, snapshot, str(data.get("name") or ""))
        return start_task(request, "Renaming snapshot", proj, None, name)

    @r.get("/1.0/instances/{name}/backups")
    async def list_backups(request: web.Request) -> web.Response:
        await daemon(request).instances.get(await project(request), request.match_info["name"])
        return sync([])  # backups are not implemented: an instance never has any

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


MIGRATION_CHANNELS = ("control", "fs")


def _migration_operation(request: web.Request, description: str, project: str, name: str, websockets: bool
                         ) -> Operation:
    op = daemon(request).operations.create(
        op_class="websocket" if websockets else "task", description=description, project=project,
        resources={"instances": [instance_url(name, project)]}, channels=MIGRATION_CHANNELS if websockets else ())
    if websockets:
        op.metadata.update(op.secrets)  # Incus puts the secrets at the top of the metadata
    return op


async def _send_migration(request: web.Request, project_name: str, name: str, data: dict[str, Any]) -> web.Response:
    """Source side: without a target, wait for the target (pull) or the client (relay) to dial us; with a
    target, dial it (push)."""
    d = daemon(request)
    live = bool(data.get("live"))
    await d.migration.check_source(project_name, name, live)
    target = data.get("target")
    if target is not None and not isinstance(target, dict):
        raise BadRequest("'target' must be an object with operation, secrets and certificate")
    transport = data.get("transport")
    if transport is not None and transport not in TRANSPORTS:
        raise BadRequest(f"Unknown transport {transport!r}: use one of {', '.join(TRANSPORTS)}")
    op = _migration_operation(request, "Migrating instance", project_name, name, websockets=target is None)

    instance_only = bool(data.get("instance_only"))

    async def work(op: Operation) -> None:
        await d.migration.run_source(op, project_name, name, target, transport, instance_only)

    op.start(work)
    return async_operation(op)


def _receive_migration(request: web.Request, row: InstanceRow, source: dict[str, Any]) -> web.Response:
    """Target side: pull dials the source's operation; push waits for the source (or a relaying client)."""
    d = daemon(request)
    _check_migration_source(source)
    op = _migration_operation(request, "Creating instance", row.project, row.name,
                              websockets=source.get("mode") == "push")

    async def work(op: Operation) -> None:
        await d.migration.run_sink(op, row, source)

    op.start(work)
    return async_operation(op)


def _check_migration_source(source: dict[str, Any]) -> None:
    mode = source.get("mode") or "pull"
    if mode not in ("pull", "push"):
        raise BadRequest(f"Unknown migration mode {mode!r}: use pull or push (relay is push on both ends)")
    if source.get("live"):
        raise BadRequest("Live migration is not supported yet")
    if mode == "pull":
        for key in ("operation", "secrets", "certificate"):
            if not source.get(key):
                raise BadRequest(f"A pull migration needs the source's {key!r}")


async def _exists(request: web.Request, project_name: str, name: str) -> bool:
    try:
        await daemon(request).instances.get(project_name, name)
    except NotFound:
        return False
    return True


async def _refresh_migration(request: web.Request, row: InstanceRow, source: dict[str, Any]) -> web.Response:
    """copy --refresh onto an existing copy."""
    d = daemon(request)
    _check_migration_source(source)
    validate_instance_config(row.config)
    for profile in row.profiles:
        await d.store.profile(profile)
    op = _migration_operation(request, "Refreshing instance", row.project, row.name,
                              websockets=source.get("mode") == "push")

    async def work(op: Operation) -> None:
        await d.migration.run_refresh(op, row, source)

    op.start(work)
    return async_operation(op)
