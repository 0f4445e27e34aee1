"""`stapes snapshot`: point-in-time copies of an instance's files and configuration."""

from __future__ import annotations

import click

from stapes.cli import render
from stapes.cli.common import client_for, parse


def register(cli: click.Group) -> None:
    @cli.group()
    def snapshot() -> None:
        """Manage instance snapshots (they travel with the instance on move and copy)."""

    @snapshot.command(name="create")
    @click.argument("instance")
    @click.argument("name", required=False, default="")
    def create(instance: str, name: str) -> None:
        """Snapshot an instance (named snapN when no name is given).

        \b
        Example:
          stapes snapshot create s1:c1 before-upgrade
        """
        remote, instance_name = parse(instance)
        with client_for(remote) as client:
            client.create_snapshot(instance_name, name)

    @snapshot.command(name="list")
    @click.argument("instance")
    @click.option("-f", "--format", "fmt", type=click.Choice(render.FORMATS), default="table")
    def list_snapshots(instance: str, fmt: str) -> None:
        """List an instance's snapshots.

        \b
        Examples:
          stapes snapshot list s1:c1
          stapes snapshot list c1 --format json
        """
        remote, instance_name = parse(instance)
        with client_for(remote) as client:
            snaps = client.snapshots(instance_name)
        render.table(["NAME", "TAKEN AT", "DESCRIPTION"], [[s["name"], s["created_at"], s["description"]]
                                                            for s in snaps], fmt, raw=snaps)

    @snapshot.command(name="restore")
    @click.argument("instance")
    @click.argument("name")
    def restore(instance: str, name: str) -> None:
        """Put a stopped instance back to a snapshot (files, configuration, devices, profiles).

        \b
        Example:
          stapes snapshot restore c1 before-upgrade
        """
        remote, instance_name = parse(instance)
        with client_for(remote) as client:
            client.restore_snapshot(instance_name, name)

    @snapshot.command(name="delete")
    @click.argument("instance")
    @click.argument("names", nargs=-1, required=True)
    def delete(instance: str, names: tuple[str, ...]) -> None:
        """Delete snapshots.

        \b
        Examples:
          stapes snapshot delete s1:c1 snap0 snap1
        """
        remote, instance_name = parse(instance)
        with client_for(remote) as client:
            for name in names:
                client.delete_snapshot(instance_name, name)

    @snapshot.command(name="rename")
    @click.argument("instance")
    @click.argument("name")
    @click.argument("new_name")
    def rename(instance: str, name: str, new_name: str) -> None:
        """Rename a snapshot.

        \b
        Examples:
          stapes snapshot rename s1:c1 snap0 before-upgrade
        """
        remote, instance_name = parse(instance)
        with client_for(remote) as client:
            client.rename_snapshot(instance_name, name, new_name)
