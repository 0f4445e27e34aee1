"""`stapes move` and `stapes copy`: between servers (pull, push, relay), or within one server."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from stapes.api.errors import BadRequest
from stapes.cli import render
from stapes.cli.common import config, device_overrides, key_values, parse, project_override
from stapes.client.client import AsyncClient
from stapes.client.config import Remote
from stapes.client.migration import MODES, Overrides
from stapes.client.move import transfer


def _options(func: Any) -> Any:
    options = [
        click.option("--mode", type=click.Choice(MODES), default="pull", show_default=True,
                     help="pull: the target dials the source; push: the source dials the target; relay: this "
                          "client dials both and relays the data"),
        click.option("-c", "--config", "config_", multiple=True, metavar="KEY=VALUE",
                     help="Configuration to set on the target"),
        click.option("-d", "--device", "devices", multiple=True, metavar="NAME,KEY=VALUE",
                     help="Device override on the target"),
        click.option("-s", "--storage", help="Storage pool on the target"),
        click.option("-p", "--profile", "profiles", multiple=True, help="Profile on the target (repeatable)"),
        click.option("--no-profiles", is_flag=True, help="No profiles on the target"),
        click.option("--target-project", help="Project on the target"),
        click.option("--instance-only", is_flag=True, help="Leave the snapshots behind"),
        click.option("--stateless", is_flag=True,
                     help="Stop a running instance, move it and start it on the target (without it, a running "
                          "container moves live)"),
        click.option("--target", "member", help="Cluster member to move to"),
        click.option("--transport", type=click.Choice(["auto", "tar-stream", "rsync"]), default="auto",
                     help="Force a transport (auto: the best both servers can do)"),
        click.option("-q", "--quiet", is_flag=True, help="No progress output"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _destination(source_remote: Remote, source_name: str, spec: str | None) -> tuple[Remote, str]:
    conf = config()
    if not spec:
        return source_remote, source_name
    if ":" in spec:
        remote, name = conf.parse(spec)
        return remote, name or source_name
    return conf.remote(conf.default_remote), spec


async def _transfer(move: bool, source_spec: str, dest_spec: str | None, mode: str, overrides: Overrides,
                    target_project: str | None, stateless: bool, quiet: bool) -> str:
    conf = config()
    source_remote, name = conf.parse(source_spec)
    target_remote, new_name = _destination(source_remote, name, dest_spec)
    project = project_override()
    source = AsyncClient.connect(source_remote.name, conf, project)
    target = AsyncClient.connect(target_remote.name, conf, target_project or project)
    try:
        with render.progress(f"{'Moving' if move else 'Copying'} {name}", quiet) as update:
            result = await transfer(source, name, target, new_name, move=move, mode=mode, overrides=overrides,
                                    stateless=stateless, progress=update)
        return result.message
    finally:
        await source.close()
        await target.close()


def _run(move: bool, source: str, destination: str | None, mode: str, config_: tuple[str, ...],
         devices: tuple[str, ...], storage: str | None, profiles: tuple[str, ...], no_profiles: bool,
         target_project: str | None, instance_only: bool, stateless: bool, member: str | None, transport: str,
         quiet: bool, refresh: bool = False) -> None:
    if member:
        raise BadRequest("--target names a cluster member, and this server is not clustered")
    if no_profiles and profiles:
        raise BadRequest("--no-profiles and --profile exclude each other")
    parse(source)
    overrides = Overrides(config=key_values(config_), devices=device_overrides(devices),
                          profiles=[] if no_profiles else (list(profiles) if profiles else None), storage=storage,
                          instance_only=instance_only, transport=None if transport == "auto" else transport,
                          refresh=refresh)
    message = asyncio.run(_transfer(move, source, destination, mode, overrides, target_project, stateless, quiet))
    render.success(message, quiet)


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("source")
    @click.argument("destination", required=False)
    @_options
    def move(source: str, destination: str | None, **kwargs: Any) -> None:
        """Move an instance to another server, or rename it, or move it to another pool or project.

        \b
        Examples:
          stapes move s1:c1 s2:              (same name on s2, the target pulls)
          stapes move s1:c1 s2:web --mode push
          stapes move c1 s2: --mode relay -c limits.memory=128MiB -s fast
          stapes move c1 c2                  (rename)
        """
        _run(True, source, destination, **kwargs)

    @cli.command()
    @click.argument("source")
    @click.argument("destination", required=False)
    @_options
    @click.option("--refresh", is_flag=True, help="Update an existing copy, sending only what changed")
    def copy(source: str, destination: str | None, **kwargs: Any) -> None:
        """Copy an instance to another server (or to the same one under another name).

        \b
        Examples:
          stapes copy s1:c1 s2:
          stapes copy s1:c1 s2:c1-copy --mode relay --no-profiles -p default
        """
        _run(False, source, destination, **kwargs)
