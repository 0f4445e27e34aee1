"""`stapes profile`, `stapes project`, `stapes storage`: one command set for the three alike collections."""

from __future__ import annotations

from typing import Any

import click

from stapes.api.errors import BadRequest
from stapes.cli import render, units, volume
from stapes.cli.common import client_for, config, key_values, parse, parse_remote_only
from stapes.cli.config import _edit_yaml
from stapes.cli.devices import register_device_commands


def _listing(kind: str, items: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    used = [str(len(i.get("used_by") or [])) for i in items]
    if kind == "pool":
        return (["NAME", "DRIVER", "DESCRIPTION", "USED BY"],
                [[i["name"], i["driver"], i.get("description", ""), n] for i, n in zip(items, used, strict=True)])
    if kind == "network":
        return (["NAME", "TYPE", "MANAGED", "IPV4", "IPV6", "DESCRIPTION", "USED BY"],
                [[i["name"], i["type"], "YES" if i.get("managed") else "NO", i["config"].get("ipv4.address", ""),
                  i["config"].get("ipv6.address", ""), i.get("description", ""), n]
                 for i, n in zip(items, used, strict=True)])
    return ["NAME", "DESCRIPTION", "USED BY"], [[i["name"], i.get("description", ""), n]
                                                 for i, n in zip(items, used, strict=True)]


# An entity and a key of it that the generated commands' examples use, per kind.
_SAMPLES = {"profile": ("default", "user.note", "web"), "project": ("staging", "user.note", "web"),
            "pool": ("default", "rsync.bwlimit", "50MiB"), "network": ("stapesbr0", "ipv4.nat", "true")}


def _example(*lines: str) -> str:
    return "\n\n\b\nExamples:\n" + "".join(f"  {line}\n" for line in lines)


def _entity_group(cli: click.Group, kind: str, group_name: str, noun: str, editable: tuple[str, ...]) -> click.Group:
    sample, key, value = _SAMPLES.get(kind, ("NAME", "user.note", "web"))
    g = f"stapes {group_name}"

    @cli.group(name=group_name, help=f"Manage {noun}s.")
    def group() -> None:
        pass

    @group.command(name="list", help=f"List {noun}s.\n\n\b\nExample:\n  stapes {group_name} list s1:")
    @click.argument("remote", required=False)
    @click.option("-f", "--format", "fmt", type=click.Choice(render.FORMATS), default="table")
    def list_cmd(remote: str | None, fmt: str) -> None:
        with client_for(parse_remote_only(remote)) as client:
            items = client.collection(kind)
        headers, rows = _listing(kind, items)
        render.table(headers, rows, fmt, raw=items)

    @group.command(name="show", help=f"Show a {noun} as YAML." + _example(f"{g} show s1:{sample}"))
    @click.argument("name")
    def show(name: str) -> None:
        remote, entity = parse(name)
        with client_for(remote) as client:
            render.show_yaml(client.entity(kind, entity))

    @group.command(name="get", help=f"Print one configuration key of a {noun}."
                   + _example(f"{g} get s1:{sample} {key}"))
    @click.argument("name")
    @click.argument("key")
    def get(name: str, key: str) -> None:
        remote, entity = parse(name)
        with client_for(remote) as client:
            click.echo(client.entity(kind, entity)["config"].get(key, ""))

    @group.command(name="set", help=f"Set configuration keys of a {noun} (KEY=VALUE or KEY VALUE)."
                   + _example(f"{g} set s1:{sample} {key}={value}", f"{g} set {sample} {key} {value}"))
    @click.argument("name")
    @click.argument("args", nargs=-1, required=True)
    def set_cmd(name: str, args: tuple[str, ...]) -> None:
        values = {args[0]: args[1]} if len(args) == 2 and "=" not in args[0] else key_values(args)
        remote, entity = parse(name)
        with client_for(remote) as client:
            client.update_entity(kind, entity, {"config": values})

    @group.command(name="unset", help=f"Remove configuration keys of a {noun}."
                   + _example(f"{g} unset s1:{sample} {key}"))
    @click.argument("name")
    @click.argument("keys", nargs=-1, required=True)
    def unset(name: str, keys: tuple[str, ...]) -> None:
        remote, entity = parse(name)
        with client_for(remote) as client:
            current = client.entity(kind, entity)
            body = {k: current[k] for k in editable}
            body["config"] = {k: v for k, v in current["config"].items() if k not in keys}
            client.update_entity(kind, entity, body, patch=False)

    @group.command(name="edit", help=f"Edit a {noun} as YAML in $EDITOR (or from standard input)."
                   + _example(f"{g} edit s1:{sample}", f"{g} edit {sample} < {sample}.yaml"))
    @click.argument("name")
    def edit(name: str) -> None:
        remote, entity = parse(name)
        with client_for(remote) as client:
            current = client.entity(kind, entity)
            new = _edit_yaml({k: current[k] for k in editable})
            client.update_entity(kind, entity, {k: new.get(k, current[k]) for k in editable}, patch=False)

    @group.command(name="delete", help=f"Delete a {noun}." + _example(f"{g} delete s1:old"))
    @click.argument("name")
    def delete(name: str) -> None:
        remote, entity = parse(name)
        with client_for(remote) as client:
            client.delete_entity(kind, entity)

    return group


def register(cli: click.Group) -> None:
    profile = _entity_group(cli, "profile", "profile", "profile", ("config", "devices", "description"))

    @profile.command(name="create")
    @click.argument("name")
    @click.option("--description", default="")
    def profile_create(name: str, description: str) -> None:
        """Create an empty profile.

        \b
        Example:
          stapes profile create small && stapes profile set small limits.memory=64MiB
        """
        remote, entity = parse(name)
        with client_for(remote) as client:
            client.create_entity("profile", {"name": entity, "description": description})

    @profile.command(name="rename")
    @click.argument("name")
    @click.argument("new_name")
    def profile_rename(name: str, new_name: str) -> None:
        """Rename a profile that no instance uses.

        \b
        Examples:
          stapes profile rename s1:small tiny
        """
        remote, entity = parse(name)
        with client_for(remote) as client:
            client.rename_entity("profile", entity, new_name)

    def _assign(instance: str, profile_name: str, add: bool) -> None:
        remote, name = parse(instance)
        with client_for(remote) as client:
            profiles = list(client.instance(name)["profiles"])
            if add:
                if profile_name in profiles:
                    raise BadRequest(f"Profile {profile_name!r} is already applied to {name!r}")
                profiles.append(profile_name)
            else:
                if profile_name not in profiles:
                    raise BadRequest(f"Profile {profile_name!r} is not applied to {name!r}")
                profiles.remove(profile_name)
            client.update_instance(name, {"profiles": profiles})

    @profile.command(name="add")
    @click.argument("instance")
    @click.argument("profile_name")
    def profile_add(instance: str, profile_name: str) -> None:
        """Apply a profile to an instance.

        \b
        Example:
          stapes profile add c1 small
        """
        _assign(instance, profile_name, True)

    @profile.command(name="remove")
    @click.argument("instance")
    @click.argument("profile_name")
    def profile_remove(instance: str, profile_name: str) -> None:
        """Remove a profile from an instance.

        \b
        Examples:
          stapes profile remove s1:c1 small
        """
        _assign(instance, profile_name, False)

    @profile.group(name="device")
    def profile_device() -> None:
        """Devices of a profile: add, remove, list, show, get, set, unset."""

    register_device_commands(profile_device, "profile", "PROFILE")

    project = _entity_group(cli, "project", "project", "project", ("config", "description"))

    @project.command(name="create")
    @click.argument("name")
    @click.option("--description", default="")
    def project_create(name: str, description: str) -> None:
        """Create a project.

        \b
        Example:
          stapes project create staging
        """
        remote, entity = parse(name)
        with client_for(remote) as client:
            client.create_entity("project", {"name": entity, "description": description})

    @project.command(name="rename")
    @click.argument("name")
    @click.argument("new_name")
    def project_rename(name: str, new_name: str) -> None:
        """Rename an empty project.

        \b
        Examples:
          stapes project rename s1:staging testing
        """
        remote, entity = parse(name)
        with client_for(remote) as client:
            client.rename_entity("project", entity, new_name)

    @project.command(name="switch")
    @click.argument("name")
    def project_switch(name: str) -> None:
        """Make NAME the project used for a remote ([remote:]project).

        \b
        Example:
          stapes project switch s1:staging
        """
        remote, entity = parse(name)
        with client_for(remote) as client:
            client.entity("project", entity)
        conf = config()
        conf.remotes[remote.name].project = "" if entity == "default" else entity
        conf.save()

    storage = _entity_group(cli, "pool", "storage", "storage pool", ("config", "description"))
    volume.register(storage)  # `stapes storage volume ...` (cli/volume.py)

    @storage.command(name="create")
    @click.argument("name")
    @click.argument("driver")
    @click.argument("settings", nargs=-1)
    @click.option("--description", default="")
    def storage_create(name: str, driver: str, settings: tuple[str, ...], description: str) -> None:
        """Create a storage pool.

        \b
        Examples:
          stapes storage create fast dir
          stapes storage create data dir source=/srv/stapes-data
        """
        remote, entity = parse(name)
        with client_for(remote) as client:
            client.create_entity("pool", {"name": entity, "driver": driver, "config": key_values(settings),
                                          "description": description})

    @storage.command(name="info")
    @click.argument("name")
    def storage_info(name: str) -> None:
        """Show a pool's space used and its total space.

        \b
        Examples:
          stapes storage info s1:default
        """
        remote, entity = parse(name)
        with client_for(remote) as client:
            usage: dict[str, Any] = client.pool_resources(entity)
        click.echo(f"space used: {units.size(usage['space']['used'])}\n"
                   f"total space: {units.size(usage['space']['total'])}")

    network = _entity_group(cli, "network", "network", "network", ("config", "description"))

    @network.command(name="create")
    @click.argument("name")
    @click.argument("settings", nargs=-1)
    @click.option("--type", "network_type", default="bridge", help="Network type (bridge)")
    @click.option("--description", default="")
    def network_create(name: str, settings: tuple[str, ...], network_type: str, description: str) -> None:
        """Create a managed bridge with DHCP, DNS and NAT; unused subnets are picked unless given.

        \b
        Examples:
          stapes network create s1:backend
          stapes network create lab ipv4.address=10.50.0.1/24 ipv6.address=none
        """
        remote, entity = parse(name)
        with client_for(remote) as client:
            client.create_entity("network", {"name": entity, "type": network_type, "config": key_values(settings),
                                             "description": description})
        click.echo(f"Network {entity} created")

    @network.command(name="info")
    @click.argument("name")
    def network_info(name: str) -> None:
        """Show a network's bridge: addresses, MAC, MTU, traffic.

        \b
        Examples:
          stapes network info s1:stapesbr0
        """
        remote, entity = parse(name)
        with client_for(remote) as client:
            net = client.entity("network", entity)
            state = client.network_state(entity)
        click.echo(f"Name: {entity}\nInterface: {net.get('interface', '')}\nMAC address: {state['hwaddr']}\n"
                   f"MTU: {state['mtu']}\nState: {state['state']}\nIP addresses:")
        for addr in state["addresses"]:
            click.echo(f"  {addr['family']}  {addr['address']}/{addr['netmask']} ({addr['scope']})")
        counters = state.get("counters") or {}
        click.echo(f"Traffic: {counters.get('bytes_received', 0)} bytes received, "
                   f"{counters.get('bytes_sent', 0)} bytes sent")

    @network.command(name="list-leases")
    @click.argument("name")
    @click.option("-f", "--format", "fmt", type=click.Choice(render.FORMATS), default="table")
    def network_leases(name: str, fmt: str) -> None:
        """List the addresses the network's DHCP server handed out to this server's instances.

        \b
        Examples:
          stapes network list-leases s1:stapesbr0
          stapes network list-leases stapesbr0 --format json
        """
        remote, entity = parse(name)
        with client_for(remote) as client:
            leases = client.network_leases(entity)
        render.table(["HOSTNAME", "MAC ADDRESS", "IP ADDRESS", "TYPE"],
                     [[x["hostname"], x["hwaddr"], x["address"], x["type"].upper()] for x in leases], fmt, raw=leases)
