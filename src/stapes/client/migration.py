"""Copying and moving instances between servers, from the client's side: the same requests the Incus client
sends, for pull (the target dials the source), push (the source dials the target) and relay (this client
dials both and copies the bytes itself).

A move is a copy followed by deleting the source, and the source is deleted only after both servers reported
success. Whatever fails, both operations are cancelled and the error says which side failed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from stapes.api.errors import BadRequest, Conflict, StapesError
from stapes.client.client import AsyncClient
from stapes.client.connection import Json
from stapes.client.failures import SideFailure, failure_message

MODES = ("pull", "push", "relay")
CHANNELS = ("control", "fs")
LIVE_CHANNELS = ("control", "fs", "criu")  # a live move adds the running state's websocket


@dataclass(frozen=True)
class MigrationResult:
    transport: str
    frozen_s: float = 0.0  # live: from the checkpoint until the target confirmed it runs (as the source saw it)
    source: Json = field(default_factory=dict)  # each operation's final metadata
    target: Json = field(default_factory=dict)


class MigrationFailed(StapesError):
    """One side of a migration failed; the message says which side and why."""


@dataclass
class Overrides:
    config: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, str]] = field(default_factory=dict)
    profiles: list[str] | None = None  # None: keep the source's profiles; []: no profiles
    storage: str | None = None
    instance_only: bool = False
    transport: str | None = None  # narrow the source's offer (tests, benchmarks); None: the best both can do
    refresh: bool = False  # bring an existing copy up to date (only what changed is sent)


def target_body(instance: Json, new_name: str, overrides: Overrides, profile_devices: dict[str, dict[str, str]],
                *, same_machine: bool = False) -> dict[str, Any]:
    """The instance as the target creates it: the source's own config and devices with the overrides applied
    (pure: unit-tested). Volatile keys stay behind except the base image and, for `same_machine` (a move, or
    a live VM copy: a clone whose guest holds them in its memory), the nics' MAC addresses and the UUID; a
    copy is a new machine, with new ones, as Incus does."""
    config = {k: v for k, v in instance["config"].items()
              if not k.startswith("volatile.") or k == "volatile.base_image"
              or (same_machine and (k.endswith(".hwaddr") or k == "volatile.uuid"))}
    config.update(overrides.config)
    devices = {name: dict(dev) for name, dev in instance["devices"].items()}
    for name, values in overrides.devices.items():
        base = devices.get(name) or profile_devices.get(name)
        if base is None and "type" not in values:
            raise BadRequest(f"Device {name!r} is not on the instance or its profiles: give its type too")
        devices[name] = {**(base or {}), **values}
    if overrides.storage:
        root_name = next((n for n, d in {**profile_devices, **devices}.items()
                          if d.get("type") == "disk" and d.get("path") == "/"), "root")
        base = devices.get(root_name) or profile_devices.get(root_name) or {"type": "disk", "path": "/"}
        devices[root_name] = {**base, "pool": overrides.storage}
    profiles = instance["profiles"] if overrides.profiles is None else overrides.profiles
    return {"name": new_name, "type": instance["type"], "architecture": instance["architecture"],
            "description": instance["description"], "ephemeral": instance["ephemeral"], "config": config,
            "devices": devices, "profiles": profiles}


async def _server_address(client: AsyncClient) -> tuple[str, str]:
    """(https base URL the other server can reach, certificate PEM)."""
    info = await client.server()
    env = info.get("environment") or {}
    if not client.remote.is_unix:
        url = client.remote.addr.rstrip("/")
    elif env.get("addresses"):
        url = f"https://{env['addresses'][0]}"
    else:
        raise BadRequest(f"The server behind {client.remote.name!r} is not listening on the network, so the other "
                         "server cannot reach it: set core.https_address on it")
    return url, str(env.get("certificate") or "")


async def _relay(source: AsyncClient, source_op: Json, target: AsyncClient, target_op: Json,
                 channels: tuple[str, ...]) -> None:
    """Open both ends of every channel and copy each message across, in both directions."""
    async with contextlib.AsyncExitStack() as stack:
        pumps = []
        for name in channels:
            src_ws = await stack.enter_async_context(
                await source.conn.operation_websocket(source_op, source_op["metadata"][name]))
            dst_ws = await stack.enter_async_context(
                await target.conn.operation_websocket(target_op, target_op["metadata"][name]))
            pumps += [asyncio.create_task(_pump(src_ws, dst_ws)), asyncio.create_task(_pump(dst_ws, src_ws))]
        try:
            await asyncio.gather(*pumps)
        finally:
            for pump in pumps:
                pump.cancel()


async def _pump(reader: aiohttp.ClientWebSocketResponse, writer: aiohttp.ClientWebSocketResponse) -> None:
    async for msg in reader:
        if msg.type == aiohttp.WSMsgType.BINARY:
            await writer.send_bytes(msg.data)
        elif msg.type == aiohttp.WSMsgType.TEXT:
            await writer.send_str(msg.data)
        else:
            break
    with contextlib.suppress(Exception):
        await writer.close()


async def copy_instance(source: AsyncClient, name: str, target: AsyncClient, new_name: str, *, mode: str = "pull",
                        overrides: Overrides | None = None, progress: Callable[[Json], None] | None = None,
                        move: bool = False, live: bool = False, keep_running: bool = False,
                        same_machine: bool = False) -> MigrationResult:
    """One migration between two servers. `move`: the source goes away after (it keeps its MACs and UUID);
    `live`: a running instance moves with its state (`keep_running`: and goes on running on the source, a
    live copy); `same_machine`: a copy keeps them too (a live VM copy: its guest carries them)."""
    if mode not in MODES:
        raise BadRequest(f"Unknown transfer mode {mode!r}: use pull, push or relay")
    overrides = overrides or Overrides()
    instance = await source.instance(name)
    profile_devices: dict[str, dict[str, str]] = {}
    profiles = instance["profiles"] if overrides.profiles is None else overrides.profiles
    for profile in profiles:
        profile_devices.update((await target.entity("profile", profile))["devices"])
    body = target_body(instance, new_name, overrides, profile_devices, same_machine=move or same_machine)
    channels = LIVE_CHANNELS if live else CHANNELS
    migration = {"type": "migration", "live": live, "instance_only": overrides.instance_only,
                 "refresh": overrides.refresh}
    source_request: dict[str, Any] = {"migration": True, "live": live, "instance_only": overrides.instance_only}
    if keep_running:
        source_request["keep_running"] = True
    if overrides.transport:
        source_request["transport"] = overrides.transport

    source_op: Json | None = None
    target_op: Json | None = None
    try:
        if mode == "pull":
            source_url, source_cert = await _server_address(source)
            source_op = await source.conn.request("POST", f"/1.0/instances/{name}", source_request)
            secrets = {k: source_op["metadata"][k] for k in channels}
            body["source"] = {**migration, "mode": "pull", "operation": f"{source_url}{_op_path(source_op)}",
                              "certificate": source_cert, "secrets": secrets}
            target_op = await _create_target(target, new_name, body)
        else:
            body["source"] = {**migration, "mode": "push"}
            target_op = await _create_target(target, new_name, body)
            if mode == "push":
                target_url, target_cert = await _server_address(target)
                secrets = {k: target_op["metadata"][k] for k in channels}
                source_request["target"] = {"operation": f"{target_url}{_op_path(target_op)}",
                                            "certificate": target_cert, "secrets": secrets}
            source_op = await source.conn.request("POST", f"/1.0/instances/{name}", source_request)
        return await _finish(source, source_op, target, target_op, relay=channels if mode == "relay" else (),
                             progress=progress)
    except BaseException:
        await asyncio.shield(_cancel(source, source_op, target, target_op))
        raise


async def _create_target(target: AsyncClient, new_name: str, body: dict[str, Any]) -> Json:
    """The target's operation; a name taken there says which server and what to do (the user's own name for
    that server: only the client knows it)."""
    try:
        return await target.conn.request("POST", "/1.0/instances", body)
    except Conflict as err:
        if "already exists" not in err.message:
            raise
        remote = target.remote.name
        raise Conflict(f"Instance {new_name!r} already exists on {remote}: choose another name "
                       f"({remote}:NEWNAME) or delete the one there (a copy can update it: copy --refresh)") from None


PEER_GRACE = 15.0  # how long the other side may take to fail on its own after one side failed
PEER_GIVE_UP = 30.0  # and then to end once it was cancelled


def _op_path(op: Json) -> str:
    return f"/1.0/operations/{op['id']}"


async def _finish(source: AsyncClient, source_op: Json, target: AsyncClient, target_op: Json, *,
                  relay: tuple[str, ...], progress: Callable[[Json], None] | None) -> MigrationResult:
    async def watch_target() -> Json:
        async for current in target.conn.poll(target_op):
            if progress is not None:
                progress(current)
        return await target.conn.request("GET", _op_path(target_op))

    async def watch_source() -> Json:
        """The source's figures too, where it publishes a progress of its own (a VM's live move: QEMU's)."""
        async for current in source.conn.poll(source_op):
            if progress is not None and isinstance((current.get("metadata") or {}).get("vm"), dict):
                progress(current)
        return await source.conn.request("GET", _op_path(source_op))

    tasks = {"source": asyncio.create_task(watch_source()),
             "target": asyncio.create_task(watch_target())}
    relay_task = asyncio.create_task(_relay(source, source_op, target, target_op, relay)) if relay else None
    try:
        pending = set(tasks.values())
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [side for side, task in tasks.items()
                      if task in done and (task.exception() or task.result()["status_code"] != 200)]
            if failed and pending:
                # One side failed: the other usually fails too, with its own reason, at once. One that does
                # not is told to stop, and is not waited for forever (an Incus push-mode target may never
                # end its half on its own).
                done, pending = await asyncio.wait(pending, timeout=PEER_GRACE)
                if pending:
                    client, op = (target, target_op) if failed[0] == "source" else (source, source_op)
                    with contextlib.suppress(Exception):
                        await client.cancel_operation(op["id"])
                    await asyncio.wait(pending, timeout=PEER_GIVE_UP)
                break
        results: dict[str, Json] = {}
        for side, task in tasks.items():
            if task.done() and task.exception() is not None:
                # The server could not be asked (killed, unreachable): its error stands for its result.
                failure = task.exception()
                results[side] = {"status_code": 400, "status": "Failure",
                                 "err": failure.message if isinstance(failure, StapesError) else str(failure)}
            elif task.done():
                results[side] = task.result()
            else:
                task.cancel()
                results[side] = {"status_code": 400, "status": "Failure",
                                 "err": "did not end after the other side failed, even when cancelled"}
    finally:
        for task in tasks.values():
            task.cancel()
        if relay_task is not None:
            relay_task.cancel()
            with contextlib.suppress(BaseException):
                await relay_task
    failures = [(side, op) for side, op in results.items() if op["status_code"] != 200]
    if failures:
        # The root cause first, the other side's consequential failure short after it (client/failures.py).
        raise MigrationFailed(failure_message([
            SideFailure(side, (target if side == "target" else source).remote.name, op.get("err") or op["status"])
            for side, op in failures]))
    source_meta = results["source"].get("metadata") or {}
    target_meta = results["target"].get("metadata") or {}
    return MigrationResult(str(target_meta.get("transport", "rsync")),
                           float((source_meta.get("live") or {}).get("frozen_s") or 0.0), source_meta, target_meta)


async def _cancel(source: AsyncClient, source_op: Json | None, target: AsyncClient, target_op: Json | None) -> None:
    """Cancel both sides and wait (bounded) until each has ended: the instance stays busy while its operation
    runs, so returning earlier would let the user's next command find it busy."""
    started = [(client, op) for client, op in ((target, target_op), (source, source_op)) if op is not None]
    for client, op in started:
        with contextlib.suppress(Exception):
            await client.cancel_operation(op["id"])

    async def ended(client: AsyncClient, op: Json) -> None:
        with contextlib.suppress(Exception):
            await client.conn.poll_until_done(op)

    waits = [asyncio.create_task(ended(c, op)) for c, op in started]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=PEER_GIVE_UP)
        for task in pending:
            task.cancel()
