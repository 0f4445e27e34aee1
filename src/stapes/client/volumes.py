"""Custom storage volumes from the client's side: typed calls, and copy/move within one server or between two
(pull, push, relay: the same requests as the Incus client, on the same relay and failure handling as an
instance's migration in `stapes.client.migration`).

A move is a copy followed by deleting the source, which happens only after both servers reported success.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stapes.api.errors import BadRequest
from stapes.client.client import AsyncClient
from stapes.client.connection import Json
from stapes.client.migration import MODES, MigrationResult, _cancel, _finish, _op_path, _server_address

CHANNELS = ("control", "fs")


def volumes_path(pool: str) -> str:
    return f"/1.0/storage-pools/{pool}/volumes"


def volume_path(pool: str, name: str) -> str:
    return f"/1.0/storage-pools/{pool}/volumes/custom/{name}"


async def list_volumes(client: AsyncClient, pool: str) -> list[Json]:
    result: list[Json] = await client.conn.request("GET", volumes_path(pool), params={"recursion": "1"})
    return result


async def get_volume(client: AsyncClient, pool: str, name: str) -> Json:
    result: Json = await client.conn.request("GET", volume_path(pool, name))
    return result


async def create_volume(client: AsyncClient, pool: str, name: str, config: dict[str, str],
                        description: str = "") -> None:
    await _settle(client, await client.conn.request(
        "POST", f"{volumes_path(pool)}/custom", {"name": name, "type": "custom", "content_type": "filesystem",
                                                 "config": config, "description": description}))


async def update_volume(client: AsyncClient, pool: str, name: str, body: Json, *, patch: bool = True) -> None:
    await _settle(client, await client.conn.request("PATCH" if patch else "PUT", volume_path(pool, name), body))


async def rename_volume(client: AsyncClient, pool: str, name: str, new_name: str) -> None:
    await _settle(client, await client.conn.request("POST", volume_path(pool, name), {"name": new_name}))


async def delete_volume(client: AsyncClient, pool: str, name: str) -> None:
    await _settle(client, await client.conn.request("DELETE", volume_path(pool, name)))


async def _settle(client: AsyncClient, result: Any) -> Any:
    """An answer that is an operation is waited for (its failure raised)."""
    if isinstance(result, dict) and "id" in result and "class" in result:
        return await client.conn.wait(result)
    return result


@dataclass(frozen=True)
class VolumeTransfer:
    message: str
    migration: MigrationResult | None = None


async def check_movable(client: AsyncClient, pool: str, name: str, volume: Json) -> None:
    """A moved volume goes away from its server: never from under an instance that attaches it."""
    users = [u.split("?")[0].rsplit("/", 1)[-1] for u in volume.get("used_by") or [] if "/instances/" in u]
    running = []
    for user in users:
        state = await client.conn.request("GET", f"/1.0/instances/{user}/state")
        if (state or {}).get("status") != "Stopped":
            running.append(user)
    if running:
        raise BadRequest(f"Storage volume {pool}/{name} is attached to running instance(s) {', '.join(running)}: "
                         "stop them and detach it ('stapes storage volume detach') before moving it, or copy it")
    if volume.get("used_by"):
        raise BadRequest(f"Storage volume {pool}/{name} is used by {', '.join(volume['used_by'])}: detach it "
                         f"('stapes storage volume detach {pool} {name} INSTANCE') before moving it, or copy it")


async def transfer_volume(source: AsyncClient, pool: str, name: str, target: AsyncClient, target_pool: str,
                          new_name: str, *, move: bool, mode: str = "pull",
                          progress: Callable[[Json], None] | None = None) -> VolumeTransfer:
    """`stapes storage volume copy/move`: within one server (a copy, a rename, another pool) or between two."""
    if mode not in MODES:
        raise BadRequest(f"Unknown transfer mode {mode!r}: use pull, push or relay")
    volume = await get_volume(source, pool, name)
    if move:
        await check_movable(source, pool, name, volume)
    where = f"{source.remote.name}:{pool}/{name} to {target.remote.name}:{target_pool}/{new_name}"
    same_server = source.remote.name == target.remote.name
    if same_server:
        if move and (pool, name) == (target_pool, new_name):
            raise BadRequest("The storage volume is already there: name another server, pool or name")
        if move:
            body = {"name": new_name, "pool": "" if target_pool == pool else target_pool}
            await _settle(source, await source.conn.request("POST", volume_path(pool, name), body))
            return VolumeTransfer(f"Moved {where}")
        await _settle(target, await target.conn.request("POST", f"{volumes_path(target_pool)}/custom", {
            "name": new_name, "type": "custom", "description": volume.get("description", ""),
            "config": volume.get("config") or {}, "source": {"type": "copy", "pool": pool, "name": name}}))
        return VolumeTransfer(f"Copied {where}")
    result = await _migrate(source, pool, name, target, target_pool, new_name, volume, mode, progress)
    if move:
        await delete_volume(source, pool, name)
        return VolumeTransfer(f"Moved {where} ({mode}, {result.transport})", result)
    return VolumeTransfer(f"Copied {where} ({mode}, {result.transport})", result)


async def _migrate(source: AsyncClient, pool: str, name: str, target: AsyncClient, target_pool: str,
                   new_name: str, volume: Json, mode: str, progress: Callable[[Json], None] | None
                   ) -> MigrationResult:
    body: dict[str, Any] = {"name": new_name, "type": "custom", "content_type": volume.get("content_type") or
                            "filesystem", "description": volume.get("description", ""),
                            "config": volume.get("config") or {}}
    migration = {"type": "migration", "volume_only": True}
    source_request: dict[str, Any] = {"migration": True, "volume_only": True, "name": name}
    source_op: Json | None = None
    target_op: Json | None = None
    try:
        if mode == "pull":
            source_url, source_cert = await _server_address(source)
            source_op = await source.conn.request("POST", volume_path(pool, name), source_request)
            secrets = {k: source_op["metadata"][k] for k in CHANNELS}
            body["source"] = {**migration, "mode": "pull", "operation": f"{source_url}{_op_path(source_op)}",
                              "certificate": source_cert, "secrets": secrets}
            target_op = await target.conn.request("POST", f"{volumes_path(target_pool)}/custom", body)
        else:
            body["source"] = {**migration, "mode": "push"}
            target_op = await target.conn.request("POST", f"{volumes_path(target_pool)}/custom", body)
            if mode == "push":
                target_url, target_cert = await _server_address(target)
                secrets = {k: target_op["metadata"][k] for k in CHANNELS}
                source_request["target"] = {"operation": f"{target_url}{_op_path(target_op)}",
                                            "certificate": target_cert, "secrets": secrets}
            source_op = await source.conn.request("POST", volume_path(pool, name), source_request)
        return await _finish(source, source_op, target, target_op, relay=CHANNELS if mode == "relay" else (),
                             progress=progress)
    except BaseException:
        await asyncio.shield(_cancel(source, source_op, target, target_op))
        raise
