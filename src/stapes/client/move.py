"""`move` and `copy` as one library call, the same one the CLI makes: a pure plan of the steps (rename, stop
first, live, delete the source once the target confirmed), then the steps themselves.

Scripts call `transfer()`; `plan()` holds every rule and is unit-tested on its own.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from stapes.api.config_keys import is_true
from stapes.api.errors import BadRequest
from stapes.client.client import AsyncClient
from stapes.client.connection import Json
from stapes.client.migration import MigrationResult, Overrides, copy_instance


@dataclass(frozen=True)
class Situation:
    """What the plan depends on, as the client sees it before anything happens."""

    move: bool
    running: bool
    stateless: bool
    same_server: bool
    same_place: bool  # same server and project, and nothing to change on the way (no pool, config, ...)
    same_name: bool
    same_project: bool
    instance_type: str = "container"
    stateful: bool = False  # the instance's migration.stateful (VMs move live only with it)
    incus_peer: bool = False  # one of the two servers is Incus (not Stapes)


@dataclass(frozen=True)
class Plan:
    rename_only: bool = False
    stop_first: bool = False  # stop the source, transfer, start the result (stateless)
    live: bool = False  # transfer the running instance with its state
    keep_running: bool = False  # live copy: the source goes on running too
    delete_source: bool = False  # after both servers confirmed
    through_landing: bool = False  # same server, name and project (another pool): a temporary name, then swap
    clone: bool = False  # a copy that keeps the MACs and UUID (as a move does): a live VM copy, whose guest
    # carries them in its memory


def plan(situation: Situation) -> Plan:
    """The steps of a move or copy (pure: unit-tested).

    - A move within one server, project and pool is a rename.
    - A stopped instance is transferred as it is.
    - A running one is stopped first and started again after (--stateless); without --stateless, a container
      moves live (a copy keeps the source running), a VM only with migration.stateful=true and is refused
      otherwise (saying how to go on), and nothing moves live within one server (there is nothing to gain).
    """
    s = situation
    if s.move and s.same_place:
        if s.same_name:
            raise BadRequest("The instance is already there: name another server, a new name, a pool (-s) or a "
                             "project (--target-project)")
        return Plan(rename_only=True)
    landing = s.move and s.same_server and s.same_name and s.same_project
    if not s.running:
        return Plan(delete_source=s.move, through_landing=landing)
    if not s.stateless and s.instance_type != "container" and not s.stateful:
        raise BadRequest(f"The {s.instance_type} is running and has no migration.stateful=true: stop it first, "
                         "set migration.stateful=true to move it live, or add --stateless to stop it, "
                         f"{'move' if s.move else 'copy'} it and start it again")
    live = not s.stateless
    if live and s.instance_type != "container" and s.incus_peer:
        raise BadRequest(f"The {s.instance_type} cannot move live between Stapes and Incus: an Incus server "
                         "rebuilds its own device tree, so QEMU's stream cannot match it; stop it first, or add "
                         f"--stateless to stop it, {'move' if s.move else 'copy'} it and start it again")
    if live and s.same_server:
        raise BadRequest("A running instance cannot move live within one server: add --stateless to stop it, "
                         f"{'move' if s.move else 'copy'} it and start it again")
    if live:  # a VM's guest carries its MACs and UUID in its memory: a live copy of it is a clone
        return Plan(live=True, keep_running=not s.move, delete_source=s.move,
                    clone=not s.move and s.instance_type != "container")
    return Plan(stop_first=True, delete_source=s.move, through_landing=landing)


@dataclass(frozen=True)
class TransferResult:
    message: str
    migration: MigrationResult | None  # None for a rename


async def transfer(source: AsyncClient, name: str, target: AsyncClient, new_name: str, *, move: bool,
                   mode: str = "pull", overrides: Overrides | None = None, stateless: bool = False,
                   progress: Callable[[Json], None] | None = None) -> TransferResult:
    """Move or copy `name` from `source` to `target` as `new_name`; on failure the source is as it was."""
    overrides = overrides or Overrides()
    instance = await source.instance(name)
    same_server = source.remote.name == target.remote.name
    same_project = (source.conn.project or "default") == (target.conn.project or "default")
    unchanged = (not overrides.storage and not overrides.config and not overrides.devices
                 and overrides.profiles is None)
    running = instance["status"] != "Stopped"
    kind = instance.get("type") or "container"
    incus_peer = False
    if running and not stateless and kind != "container":  # who the servers are matters for a live VM only
        for client in (source, target):
            environment = (await client.server()).get("environment") or {}
            incus_peer = incus_peer or environment.get("server") != "stapes"
    steps = plan(Situation(
        move=move, running=instance["status"] != "Stopped", stateless=stateless, same_server=same_server,
        same_place=same_server and same_project and unchanged, same_name=new_name == name,
        same_project=same_project, instance_type=kind,
        stateful=is_true((instance.get("config") or {}).get("migration.stateful")), incus_peer=incus_peer))
    where = f"{source.remote.name}:{name} to {target.remote.name}:{new_name}"
    if steps.rename_only:
        await source.rename_instance(name, new_name)
        return TransferResult(f"Renamed {name} to {new_name}", None)
    landing = f"{name[:50]}-moving-{secrets.token_hex(3)}" if steps.through_landing else new_name
    # Stopping an ephemeral instance deletes it: it is persistent while it moves, ephemeral again after.
    ephemeral = steps.stop_first and bool(instance.get("ephemeral"))
    if ephemeral:
        await source.update_instance(name, {"ephemeral": False})
    if steps.stop_first:
        try:
            await source.change_state(name, "stop", timeout=30)
        except BaseException:
            if ephemeral:
                await asyncio.shield(source.update_instance(name, {"ephemeral": True}))
            raise
    try:
        result = await copy_instance(source, name, target, landing, mode=mode, overrides=overrides,
                                     progress=progress, move=move, live=steps.live,
                                     keep_running=steps.keep_running, same_machine=steps.clone)
    except BaseException:
        if steps.stop_first:
            await asyncio.shield(source.change_state(name, "start"))
        if ephemeral:
            await asyncio.shield(source.update_instance(name, {"ephemeral": True}))
        raise
    if steps.delete_source:
        await source.delete_instance(name)
        if steps.through_landing:
            await target.rename_instance(landing, new_name)
    if steps.stop_first:
        if move:
            await target.change_state(new_name, "start")
        else:
            await source.change_state(name, "start")
        if ephemeral:
            await (target.update_instance(new_name, {"ephemeral": True}) if move
                   else source.update_instance(name, {"ephemeral": True}))
    how = f"{mode}, {result.transport}" + (f", live: {live_summary(result)}" if steps.live else "")
    lines = [f"{'Moved' if move else 'Copied'} {where} ({how})", *precopy_lines(result.source)]
    return TransferResult("\n".join(lines), result)


def live_summary(result: MigrationResult) -> str:
    """A live move's last figures (pure): a VM's downtime as QEMU measured it, a container's freeze."""
    figures = result.source.get("live") or {}
    if isinstance(figures.get("downtime_ms"), int):
        return (f"downtime {figures['downtime_ms']} ms (QEMU's figure), "
                f"{(figures.get('memory_bytes') or 0) / 2**20:.0f} MiB of memory in "
                f"{figures.get('iterations') or 0} passes, total {figures.get('total_s') or 0:.2f}s")
    return f"frozen {result.frozen_s:.2f}s"


def precopy_lines(source_metadata: Json) -> list[str]:
    """What the source's pre-copy did, round by round, or why it did none (pure: unit-tested)."""
    if note := source_metadata.get("precopy"):
        return [f"Pre-copy: {note}"]
    return [f"Pre-copy round {r['round']}: {r['pages_written']} pages written, {r['pages_skipped']} unchanged "
            f"({r['synced_percent']}% in sync), {r['bytes'] / 2**20:.1f} MiB in {r['seconds']:.2f}s"
            for r in source_metadata.get("precopy_rounds") or []]
