"""`stapes operation` and `stapes monitor`."""

from __future__ import annotations

import asyncio
import contextlib
import json

import click

from stapes.cli import render
from stapes.cli.common import client_for, config, parse, parse_remote_only, project_override
from stapes.client.client import AsyncClient


def register(cli: click.Group) -> None:
    @cli.group()
    def operation() -> None:
        """Background operations."""

    @operation.command(name="list")
    @click.argument("remote", required=False)
    @click.option("-f", "--format", "fmt", type=click.Choice(render.FORMATS), default="table")
    def list_ops(remote: str | None, fmt: str) -> None:
        """List operations (finished ones are kept five minutes).

        \b
        Examples:
          stapes operation list s1:
          stapes operation list --format json
        """
        with client_for(parse_remote_only(remote)) as client:
            ops = client.operations()
        rows = [[o["id"], o["class"].upper(), o["description"], o["status"].upper(),
                 "YES" if o["may_cancel"] else "NO", o["created_at"]] for o in ops]
        render.table(["ID", "TYPE", "DESCRIPTION", "STATUS", "CANCELABLE", "CREATED"], rows, fmt, raw=ops)

    @operation.command(name="show")
    @click.argument("op_id")
    def show(op_id: str) -> None:
        """Show an operation as YAML.

        \b
        Examples:
          stapes operation show s1:4f1c2b9e-0d6a-4c1e-9a55-2f9d3e7b8c10
        """
        remote, name = parse(op_id)
        with client_for(remote) as client:
            render.show_yaml(client.operation(name))

    @operation.command(name="delete")
    @click.argument("op_id")
    def delete(op_id: str) -> None:
        """Cancel an operation.

        \b
        Example:
          stapes operation delete s1:7e0d7c8a-...
        """
        remote, name = parse(op_id)
        with client_for(remote) as client:
            client.cancel_operation(name)

    @cli.command()
    @click.argument("remote", required=False)
    @click.option("--type", "types", multiple=True, default=("operation", "lifecycle", "logging"),
                  help="Event type to show (repeatable)")
    @click.option("--all-projects", is_flag=True)
    def monitor(remote: str | None, types: tuple[str, ...], all_projects: bool) -> None:
        """Print the server's events as JSON lines until interrupted.

        \b
        Example:
          stapes monitor s1: --type lifecycle
        """
        target = parse_remote_only(remote)

        async def follow() -> None:
            client = AsyncClient.connect(target.name, config(), project_override())
            try:
                async for event in client.events(list(types), all_projects):
                    click.echo(json.dumps(event))
            finally:
                await client.close()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(follow())
