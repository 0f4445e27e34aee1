"""`stapes storage volume`: custom storage volumes (create, list, attach to instances, copy and move)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from stapes.api.errors import BadRequest
from stapes.cli import render
from stapes.cli.common import config, key_values, parse, project_override
from stapes.client import volumes as api
from stapes.client.client import AsyncClient
from stapes.client.config import Remote
from stapes.client.migration import MODES

T = TypeVar("T")


def _run(remote: Remote, work: Callable[[AsyncClient], Awaitable[T]]) -> T:
    async def go() -> T:
        client = AsyncClient.connect(remote.name, config(), project_override())
        try:
            return await work(client)
        finally:
            await client.close()

    return asyncio.run(go())


def _pool_volume(spec: str) -> tuple[Remote, str, str]:
    """'[remote:]pool/volume' -> (remote, pool, volume)."""
    remote, rest = parse(spec)
    pool, sep, name = rest.partition("/")
    if not sep or not pool or not name:
        raise BadRequest(f"{spec!r}: name the volume as [REMOTE:]POOL/VOLUME")
    return remote, pool, name


def _instance_on(remote: Remote, instance: str) -> str:
    """The instance named with or without the pool's remote (another remote cannot attach the volume)."""
    if ":" not in instance:
        return instance
    other, name = parse(instance)
    if other.name != remote.name:
        raise BadRequest(f"The instance must be on the volume's server ({remote.name}), not on {other.name}")
    return name


def register(storage: click.Group) -> None:
    @storage.group(name="volume", help="Manage custom storage volumes.")
    def volume() -> None:
        pass

    @volume.command(name="create")
    @click.argument("pool")
    @click.argument("name")
    @click.argument("settings", nargs=-1)
    @click.option("--description", default="")
    def create(pool: str, name: str, settings: tuple[str, ...], description: str) -> None:
        """Create a custom (filesystem) volume in a pool.

        \b
        Examples:
          stapes storage volume create default data
          stapes storage volume create s1:fast logs user.purpose=logs --description "web logs"
        """
        remote, pool_name = parse(pool)
        _run(remote, lambda c: api.create_volume(c, pool_name, name, key_values(settings), description))
        click.echo(f"Storage volume {name} created")

    @volume.command(name="list")
    @click.argument("pool")
    @click.option("-f", "--format", "fmt", type=click.Choice(render.FORMATS), default="table")
    def list_cmd(pool: str, fmt: str) -> None:
        """List a pool's volumes: the instances' own (container) and the custom ones.

        \b
        Examples:
          stapes storage volume list default
          stapes storage volume list s1:default -f json
        """
        remote, pool_name = parse(pool)
        items: list[dict[str, Any]] = _run(remote, lambda c: api.list_volumes(c, pool_name))
        render.table(["TYPE", "NAME", "DESCRIPTION", "CONTENT-TYPE", "USED BY"],
                     [[i["type"], i["name"], i.get("description", ""), i.get("content_type", ""),
                       str(len(i.get("used_by") or []))] for i in items], fmt, raw=items)

    @volume.command(name="show")
    @click.argument("pool")
    @click.argument("name")
    def show(pool: str, name: str) -> None:
        """Show a custom volume as YAML.

        \b
        Examples:
          stapes storage volume show default data
        """
        remote, pool_name = parse(pool)
        render.show_yaml(_run(remote, lambda c: api.get_volume(c, pool_name, name)))

    @volume.command(name="info")
    @click.argument("pool")
    @click.argument("name")
    def info(pool: str, name: str) -> None:
        """Show a custom volume's details and which instances use it.

        \b
        Examples:
          stapes storage volume info s1:default data
        """
        remote, pool_name = parse(pool)
        vol = _run(remote, lambda c: api.get_volume(c, pool_name, name))
        click.echo(f"Name: {vol['name']}\nType: {vol['type']}\nContent type: {vol['content_type']}\n"
                   f"Description: {vol.get('description', '')}\nCreated: {vol.get('created_at', '')}\nUsed by:")
        for user in vol.get("used_by") or []:
            click.echo(f"  {user}")

    @volume.command(name="get")
    @click.argument("pool")
    @click.argument("name")
    @click.argument("key")
    def get(pool: str, name: str, key: str) -> None:
        """Print one configuration key of a custom volume.

        \b
        Examples:
          stapes storage volume get default data user.purpose
        """
        remote, pool_name = parse(pool)
        click.echo((_run(remote, lambda c: api.get_volume(c, pool_name, name))["config"] or {}).get(key, ""))

    @volume.command(name="set")
    @click.argument("pool")
    @click.argument("name")
    @click.argument("args", nargs=-1, required=True)
    def set_cmd(pool: str, name: str, args: tuple[str, ...]) -> None:
        """Set configuration keys of a custom volume (KEY=VALUE or KEY VALUE).

        \b
        Examples:
          stapes storage volume set default data user.purpose=cache
        """
        values = {args[0]: args[1]} if len(args) == 2 and "=" not in args[0] else key_values(args)
        remote, pool_name = parse(pool)
        _run(remote, lambda c: api.update_volume(c, pool_name, name, {"config": values}))

    @volume.command(name="unset")
    @click.argument("pool")
    @click.argument("name")
    @click.argument("keys", nargs=-1, required=True)
    def unset(pool: str, name: str, keys: tuple[str, ...]) -> None:
        """Remove configuration keys of a custom volume.

        \b
        Examples:
          stapes storage volume unset default data user.purpose
        """
        remote, pool_name = parse(pool)

        async def work(c: AsyncClient) -> None:
            current = await api.get_volume(c, pool_name, name)
            await api.update_volume(c, pool_name, name, {
                "description": current.get("description", ""),
                "config": {k: v for k, v in (current["config"] or {}).items() if k not in keys}}, patch=False)

        _run(remote, work)

    @volume.command(name="delete")
    @click.argument("pool")
    @click.argument("names", nargs=-1, required=True)
    def delete(pool: str, names: tuple[str, ...]) -> None:
        """Delete custom volumes (refused while an instance attaches one).

        \b
        Examples:
          stapes storage volume delete default data
        """
        remote, pool_name = parse(pool)

        async def work(c: AsyncClient) -> None:
            for name in names:
                await api.delete_volume(c, pool_name, name)

        _run(remote, work)

    @volume.command(name="rename")
    @click.argument("pool")
    @click.argument("name")
    @click.argument("new_name")
    def rename(pool: str, name: str, new_name: str) -> None:
        """Rename a custom volume (refused while an instance attaches it).

        \b
        Examples:
          stapes storage volume rename default data data-old
        """
        remote, pool_name = parse(pool)
        _run(remote, lambda c: api.rename_volume(c, pool_name, name, new_name))

    @volume.command(name="attach")
    @click.argument("pool")
    @click.argument("name")
    @click.argument("instance")
    @click.argument("rest", nargs=-1, required=True)
    def attach(pool: str, name: str, instance: str, rest: tuple[str, ...]) -> None:
        """Attach a custom volume to an instance as a disk: INSTANCE [DEVICE_NAME] PATH.

        The device is named after the volume unless a name is given. A running container gets it at once.

        \b
        Examples:
          stapes storage volume attach default data c1 /srv/data
          stapes storage volume attach s1:default data c1 datadisk /srv/data
        """
        if len(rest) > 2:
            raise BadRequest("attach takes POOL VOLUME INSTANCE [DEVICE_NAME] PATH")
        device, path = (rest[0], rest[1]) if len(rest) == 2 else (name, rest[0])
        remote, pool_name = parse(pool)
        instance = _instance_on(remote, instance)

        async def work(c: AsyncClient) -> None:
            await api.get_volume(c, pool_name, name)
            current = await c.instance(instance)
            if device in (current.get("devices") or {}):
                raise BadRequest(f"Instance {instance!r} already has a device {device!r}: give another device name")
            devices = dict(current.get("devices") or {})
            devices[device] = {"type": "disk", "pool": pool_name, "source": name, "path": path}
            await c.update_instance(instance, {"devices": devices})

        _run(remote, work)

    @volume.command(name="detach")
    @click.argument("pool")
    @click.argument("name")
    @click.argument("instance")
    @click.argument("device", required=False)
    def detach(pool: str, name: str, instance: str, device: str | None) -> None:
        """Detach a custom volume from an instance (at once from a running container).

        \b
        Examples:
          stapes storage volume detach default data c1
        """
        remote, pool_name = parse(pool)
        name_of_instance = _instance_on(remote, instance)

        async def work(c: AsyncClient) -> None:
            current = await c.instance(name_of_instance)
            devices = dict(current.get("devices") or {})
            found = [n for n, d in devices.items() if d.get("type") == "disk" and d.get("pool") == pool_name
                     and d.get("source") == name and device in (None, n)]
            if not found:
                raise BadRequest(f"Instance {instance!r} has no disk device attaching {pool_name}/{name}")
            for n in found:
                del devices[n]
            body = {k: current[k] for k in ("profiles", "description", "ephemeral") if k in current}
            body["config"] = {k: v for k, v in (current.get("config") or {}).items() if not k.startswith("volatile.")}
            body["devices"] = devices
            await c.update_instance(name_of_instance, body, patch=False)

        _run(remote, work)

    def transfer(move: bool, source: str, destination: str, mode: str, quiet: bool) -> None:
        src_remote, pool, name = _pool_volume(source)
        if ":" in destination and "/" not in destination.partition(":")[2]:
            destination = f"{destination.rstrip(':')}:{pool}/{name}" if destination.endswith(":") else destination
        dst_remote, target_pool, new_name = _pool_volume(destination)

        async def go() -> str:
            conf, project = config(), project_override()
            src = AsyncClient.connect(src_remote.name, conf, project)
            dst = AsyncClient.connect(dst_remote.name, conf, project)
            try:
                with render.progress(f"{'Moving' if move else 'Copying'} {pool}/{name}", quiet) as update:
                    result = await api.transfer_volume(src, pool, name, dst, target_pool, new_name, move=move,
                                                       mode=mode, progress=update)
                return result.message
            finally:
                await src.close()
                await dst.close()

        render.success(asyncio.run(go()), quiet)

    mode_option = click.option("--mode", type=click.Choice(MODES), default="pull", show_default=True,
                               help="pull: the target dials the source; push: the source dials the target; "
                                    "relay: this client dials both and relays the data")

    @volume.command(name="copy")
    @click.argument("source")
    @click.argument("destination")
    @mode_option
    @click.option("-q", "--quiet", is_flag=True, help="No progress output")
    def copy(source: str, destination: str, mode: str, quiet: bool) -> None:
        """Copy a custom volume: within a server, or to another one ([REMOTE:]POOL/VOLUME).

        \b
        Examples:
          stapes storage volume copy default/data default/data-copy
          stapes storage volume copy s1:default/data s2:default/data --mode push
          stapes storage volume copy s1:default/data s2:
        """
        transfer(False, source, destination, mode, quiet)

    @volume.command(name="move")
    @click.argument("source")
    @click.argument("destination")
    @mode_option
    @click.option("-q", "--quiet", is_flag=True, help="No progress output")
    def move(source: str, destination: str, mode: str, quiet: bool) -> None:
        """Move a custom volume to another pool or server; the source is deleted once the target has it.

        Refused while a running instance attaches the volume.

        \b
        Examples:
          stapes storage volume move default/data fast/data
          stapes storage volume move s1:default/data s2:default/data --mode relay
        """
        transfer(True, source, destination, mode, quiet)
