"""Instance commands: launch, init, start, stop, restart, delete, list, info, exec."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from stapes.api.errors import BadRequest
from stapes.cli import listing, render, units
from stapes.cli.common import client_for, config, device_overrides, key_values, parse, parse_remote_only
from stapes.cli.terminal import raw_terminal
from stapes.client.client import ExecError


def _server_info(name: str | None) -> None:
    """As `incus info` without an instance: what the server is and runs on."""
    with client_for(parse_remote_only(name.rstrip(":") if name else None)) as client:
        info = client.server()
        networks = client.collection("network")
    env = info.get("environment") or {}
    lines = [
        ("Server", f"{env.get('server', '')} {env.get('server_version', '')}"),
        ("Server name", env.get("server_name", "")), ("Addresses", ", ".join(env.get("addresses") or []) or "-"),
        ("Certificate fingerprint", env.get("certificate_fingerprint", "")),
        ("Kernel", f"{env.get('kernel', '')} {env.get('kernel_version', '')} ({env.get('kernel_architecture', '')})"),
        ("Container driver", f"{env.get('driver', '')} {env.get('driver_version', '')}"),
        ("Firewall", env.get("firewall", "")),
        ("Storage drivers", ", ".join(d["name"] for d in env.get("storage_supported_drivers") or [])),
        ("Instance types", ", ".join(env.get("instance_types") or [])),
        ("VM accelerator", vm_accelerator_summary(env.get("vm_accelerator") or {})),
        ("Unprivileged containers", env.get("unprivileged", "")),
        ("Live container moves", live_summary((env.get("live_migration") or {}).get("container") or {})),
        ("Networks", ", ".join(f"{n['name']} ({n['config'].get('ipv4.address', '')})" for n in networks) or "-"),
        ("API extensions", str(len(info.get("api_extensions") or []))),
    ]
    for key, value in lines:
        click.echo(f"{key}: {value}")


def vm_accelerator_summary(accel: dict[str, Any]) -> str:
    """One line of `GET /1.0`'s environment.vm_accelerator (pure)."""
    if not accel:
        return "-"
    if not accel.get("name"):
        return f"none: {accel.get('reason', '')}"
    version = f"QEMU {accel['qemu_version']}, " if accel.get("qemu_version") else ""
    return f"{accel['name']} ({version}{accel.get('reason', '')})"


def live_summary(support: dict[str, Any]) -> str:
    """One line of `GET /1.0`'s environment.live_migration.container (pure: unit-tested)."""
    if not support:
        return "-"
    if not support.get("available"):
        return f"no: {support.get('reason', '')}"
    precopy = "pre-copy" if support.get("incremental_memory") else "no pre-copy (no soft-dirty tracking)"
    return f"yes (CRIU {support.get('version', '')}, {precopy})"


def _addresses(instance: dict[str, Any], family: str) -> str:
    """As `incus list`: each global address with its interface, one per line."""
    network = (instance.get("state") or {}).get("network") or {}
    return "\n".join(f"{a['address']} ({name})" for name, iface in sorted(network.items()) if name != "lo"
                     for a in iface.get("addresses") or [] if a["family"] == family and a["scope"] == "global")


def _bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.2f}{unit}" if value else ""
        size /= 1024
    return ""


def _create(image_spec: str, name_spec: str | None, config: tuple[str, ...], profiles: tuple[str, ...],
            no_profiles: bool, storage: str | None, devices: tuple[str, ...], ephemeral: bool, instance_type: str,
            description: str, start: bool, quiet: bool) -> None:
    image_remote, image = parse(image_spec)
    if name_spec:
        remote, name = parse(name_spec) if ":" in name_spec else (image_remote, name_spec)
    else:
        raise BadRequest("Give the new instance a name: stapes launch IMAGE NAME")
    if remote.name != image_remote.name:
        raise BadRequest(
            f"The image is on {image_remote.name!r} but the instance would go to {remote.name!r}: copying images "
            "between servers is not supported yet; import the image on the target server first")
    if no_profiles and profiles:
        raise BadRequest("--no-profiles and --profile exclude each other")
    body: dict[str, Any] = {
        "name": name, "type": instance_type, "description": description, "ephemeral": ephemeral,
        "source": {"type": "image", "alias": image}, "config": key_values(config),
        "profiles": [] if no_profiles else (list(profiles) if profiles else None), "devices": {}, "start": start,
    }
    with client_for(remote) as client:
        overrides = device_overrides(devices)
        if storage:
            overrides.setdefault("root", {}).update({"pool": storage})
        if overrides:
            expanded: dict[str, dict[str, str]] = {}
            for profile in body["profiles"] if body["profiles"] is not None else ["default"]:
                expanded.update(client.entity("profile", profile)["devices"])
            for dev_name, values in overrides.items():
                base = expanded.get(dev_name)
                if base is None and dev_name == "root":
                    base = {"type": "disk", "path": "/"}
                if base is None and "type" not in values:
                    raise BadRequest(f"Device {dev_name!r} is in no profile: give its type too ({dev_name},type=...)")
                body["devices"][dev_name] = {**(base or {}), **values}
        verb = "Launching" if start else "Creating"
        with render.progress(f"{verb} {name}", quiet) as update:
            client.create_instance(body, update)
    render.success(f"{'Launched' if start else 'Created'} {remote.name}:{name}", quiet)


def _create_options(func: Any) -> Any:
    options = [
        click.option("-c", "--config", "config", multiple=True, metavar="KEY=VALUE", help="Instance configuration"),
        click.option("-p", "--profile", "profiles", multiple=True, help="Profile to apply (repeatable)"),
        click.option("--no-profiles", is_flag=True, help="Create the instance with no profiles"),
        click.option("-s", "--storage", help="Storage pool for the root disk"),
        click.option("-d", "--device", "devices", multiple=True, metavar="NAME,KEY=VALUE",
                     help="Override a device key (e.g. root,pool=fast)"),
        click.option("-e", "--ephemeral", is_flag=True, help="Delete the instance when it stops"),
        click.option("--type", "instance_type", type=click.Choice(["container", "virtual-machine"]),
                     default="container", help="Instance type"),
        click.option("--vm", "instance_type", flag_value="virtual-machine",
                     help="Create a virtual machine (the same as --type virtual-machine)"),
        click.option("--description", default="", help="Instance description"),
        click.option("-q", "--quiet", is_flag=True, help="No progress output"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("image")
    @click.argument("name", required=False)
    @_create_options
    def launch(image: str, name: str | None, **kwargs: Any) -> None:
        """Create and start an instance from an image.

        \b
        Examples:
          stapes launch busybox c1
          stapes launch s1:busybox c1 -c limits.memory=64MiB
          stapes launch busybox s1:c2 -s fast -p default -p extra
        """
        _create(image, name, start=True, **kwargs)

    @cli.command()
    @click.argument("image")
    @click.argument("name", required=False)
    @_create_options
    def init(image: str, name: str | None, **kwargs: Any) -> None:
        """Create an instance from an image without starting it.

        \b
        Example:
          stapes init busybox c1 -c limits.cpu=1
        """
        _create(image, name, start=False, **kwargs)

    def _state_command(action: str, past: str) -> Any:
        @click.argument("names", nargs=-1)
        @click.option("-q", "--quiet", is_flag=True, help="No progress output")
        @click.option("--all", "every", is_flag=True,
                      help=f"{action.title()} every instance that can be (the arguments are remotes: s1:)")
        def command(names: tuple[str, ...], quiet: bool, every: bool, timeout: int = -1, force: bool = False) -> None:
            if every:
                targets = _all_for(action, names)
            elif not names:
                raise BadRequest(f"Name the instances to {action}, or use --all: stapes {action} NAME...")
            else:
                targets = [parse(spec) for spec in names]
            for remote, name in targets:
                with client_for(remote) as client, render.progress(f"{action.title()}ing {name}", quiet):
                    client.change_state(name, action, timeout=timeout, force=force)
        command.__doc__ = f"""{action.title()} instances.

        \b
        Examples:
          stapes {action} c1 s1:c2
          stapes {action} --all s1:
        """
        return command

    def _all_for(action: str, remotes: tuple[str, ...]) -> list[tuple[Any, str]]:
        """`--all [REMOTE:]...`: the instances of each remote in a state the action applies to (as Incus)."""
        wanted = {"start": ("Stopped",), "stop": ("Running", "Frozen"), "restart": ("Running",),
                  "freeze": ("Running",), "unfreeze": ("Frozen",)}[action]
        found = []
        for spec in remotes or (None,):
            if spec is not None and not spec.endswith(":"):
                raise BadRequest(f"With --all the arguments are remotes ({spec}:), not instances")
            remote = parse_remote_only(spec)
            with client_for(remote) as client:
                found += [(remote, i["name"]) for i in sorted(client.instances(), key=lambda i: i["name"])
                          if i["status"] in wanted]
        return found

    cli.command(name="start")(_state_command("start", "started"))
    cli.command(name="freeze")(_state_command("freeze", "frozen"))
    cli.command(name="unfreeze")(_state_command("unfreeze", "unfrozen"))
    for action in ("stop", "restart"):
        cmd = _state_command(action, action)
        cmd = click.option("--timeout", type=int, default=-1,
                           help="Seconds to wait for a clean shutdown before killing (default 30)")(cmd)
        cmd = click.option("-f", "--force", is_flag=True, help="Kill the instance instead of shutting it down")(cmd)
        cli.command(name=action)(cmd)

    @cli.command()
    @click.argument("names", nargs=-1, required=True)
    @click.option("-f", "--force", is_flag=True, help="Stop a running instance (killing it) before deleting")
    @click.option("-q", "--quiet", is_flag=True, help="No progress output")
    def delete(names: tuple[str, ...], force: bool, quiet: bool) -> None:
        """Delete instances (they must be stopped unless --force).

        \b
        Example:
          stapes delete c1 s1:c2 --force
        """
        for spec in names:
            remote, name = parse(spec)
            with client_for(remote) as client:
                instance = client.instance(name)
                if instance["status"] not in ("Stopped", "Error"):  # a broken (Error) one: the server decides
                    if not force:
                        raise BadRequest(f"Instance {name!r} is {instance['status'].lower()}: stop it first, "
                                         "or use 'stapes delete --force'")
                    client.change_state(name, "stop", force=True)
                    if instance.get("ephemeral"):
                        continue  # stopping an ephemeral instance deleted it
                with render.progress(f"Deleting {name}", quiet):
                    client.delete_instance(name)

    @cli.command(name="rename")
    @click.argument("name")
    @click.argument("new_name")
    def rename(name: str, new_name: str) -> None:
        """Rename a stopped instance.

        \b
        Examples:
          stapes rename c1 web1
          stapes rename s1:c1 s1:web1
        """
        remote, old = parse(name)
        if ":" in new_name:
            new_remote, new_name = parse(new_name)
            if new_remote.name != remote.name:
                raise BadRequest(f"A rename stays on one server ({remote.name} here, {new_remote.name} there): "
                                 f"use 'stapes move {name} {new_remote.name}:{new_name}' to move it")
        with client_for(remote) as client:
            client.rename_instance(old, new_name)

    @cli.command(name="list")
    @click.argument("args", nargs=-1, metavar="[REMOTE:] [FILTER]...")
    @click.option("-f", "--format", "fmt", type=render.FormatType(), default="table",
                  help="table, compact, csv, json or yaml; ',noheader' hides the table header, ',header' adds one "
                       "to csv, ',raw' shows bytes as numbers")
    @click.option("-c", "--columns", default=None, help="Columns, by Incus's shorthand letters (default ns46tS), long "
                  "names (name,state,...) or config keys (user.role:ROLE)")
    @click.option("--fast", is_flag=True, help="The columns nsacPt")
    @click.option("--all-projects", is_flag=True, help="List instances of every project")
    def list_instances(args: tuple[str, ...], fmt: str, columns: str | None, fast: bool,
                       all_projects: bool) -> None:
        """List instances, filtered as Incus does.

        \b
        Filters (all must match):
          web                   names starting with web (or a regular expression: '.*web.*01$')
          status=running        also state=, type=container, architecture=, ipv4=10.0.0.0/24, ipv6=
          user.role=web         a configuration key (expanded); u.role=web abbreviates the namespace
        Columns (-c, commas optional between letters):
          4 IPv4  6 IPv6  a architecture  b storage pool  c created  d description  D disk usage
          e project  f base image  l last used  m memory  M memory%  n name  N processes  p PID
          P profiles  R remote  s state  S snapshots  t type  u CPU time  U started  L location
          or long names (name,state,ipv4) or [config:|devices:]KEY[:NAME][:MAXWIDTH]

        \b
        Examples:
          stapes list
          stapes list s1: status=running type=container
          stapes list web user.role=db -c ns,user.role:ROLE
          stapes list -c nsmMDu -f csv,noheader
          stapes list s1: --format json
        """
        remote_spec, filters = listing.split_target(args, set(config().remotes))
        target = parse_remote_only(remote_spec)
        spec = listing.columns_for(columns, all_projects=all_projects, fast=fast)
        listing.parse_columns(spec)  # refused before asking the server
        with client_for(target) as client:
            instances = client.instances(recursion=2, all_projects=all_projects)
        shown = [i for i in instances if listing.matches(i, filters)]
        chosen = listing.parse_columns(listing.drop_unlocated(spec, shown))
        raw_units = "raw" in render.split_format(fmt)[1]
        render.table([c.header for c in chosen], listing.rows(shown, chosen, raw_units, target.name), fmt, raw=shown)

    @cli.command()
    @click.argument("name", required=False)
    @click.option("--show-log", is_flag=True, help="Show the instance's LXC log")
    def info(name: str | None, show_log: bool) -> None:
        """Show an instance's details and state, or (no instance named) the server's.

        \b
        Examples:
          stapes info s1:c1 --show-log
          stapes info s1:
        """
        if name is None or name.endswith(":"):
            _server_info(name)
            return
        remote, instance_name = parse(name)
        with client_for(remote) as client:
            instance = client.instance(instance_name, with_state=True)
            state = instance.get("state") or {}
            lines = [
                ("Name", instance["name"]), ("Status", instance["status"].upper()),
                ("Type", instance["type"]), ("Architecture", instance["architecture"]),
                ("Project", instance["project"]), ("Created", units.when(instance["created_at"])),
                ("Last Used", units.when(instance["last_used_at"])), ("Profiles", ", ".join(instance["profiles"])),
            ]
            if instance["status"] == "Running":
                lines += [("PID", str(state.get("pid"))), ("Processes", str(state.get("processes"))),
                          ("Memory usage", _bytes((state.get("memory") or {}).get("usage", 0))),
                          ("CPU usage (in seconds)", units.seconds((state.get("cpu") or {}).get("usage", 0)))]
            for key, value in lines:
                click.echo(f"{key}: {value}")
            network = state.get("network") or {}
            for iface_name, iface in sorted(network.items()):
                if iface_name == "lo":
                    continue
                click.echo(f"Network {iface_name}: {iface.get('hwaddr', '')}, {iface.get('state', '')}")
                for addr in iface.get("addresses") or []:
                    click.echo(f"  {addr['family']}  {addr['address']}/{addr['netmask']} ({addr['scope']})")
            if show_log:
                click.echo("\nLog:\n")
                click.echo(client.instance_log(instance_name, "lxc.log").decode(errors="replace"))

    @cli.command()
    @click.argument("name")
    @click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
    @click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment variable to set")
    @click.option("--cwd", default="", help="Directory to run the command in")
    @click.option("--user", type=int, default=0, help="User ID to run as")
    @click.option("--group", type=int, default=0, help="Group ID to run as")
    @click.option("-t", "--force-interactive", is_flag=True, help="Force a terminal (pty)")
    @click.option("-T", "--force-noninteractive", is_flag=True, help="Never use a terminal")
    @click.option("-n", "--disable-stdin", is_flag=True, help="Do not send standard input")
    def exec(name: str, command: tuple[str, ...], env: tuple[str, ...], cwd: str, user: int, group: int,
             force_interactive: bool, force_noninteractive: bool, disable_stdin: bool) -> None:
        """Run a command in an instance; its exit status becomes ours.

        \b
        Examples:
          stapes exec c1 -- cat /etc/hostname
          echo hi | stapes exec s1:c1 -- cat
          stapes exec c1 --env A=1 --cwd /tmp -- sh -c 'echo $A; pwd'
        """
        if force_interactive and force_noninteractive:
            raise BadRequest("-t and -T exclude each other")
        remote, instance_name = parse(name)
        interactive = force_interactive or (not force_noninteractive and sys.stdin.isatty()
                                            and sys.stdout.isatty())
        stdin = None if disable_stdin else sys.stdin.buffer
        size = os.get_terminal_size() if interactive and sys.stdout.isatty() else os.terminal_size((80, 24))
        try:
            with client_for(remote) as client, raw_terminal(interactive and sys.stdin.isatty()):
                code = client.exec(instance_name, list(command),
                                   environment=key_values(env, "environment variable"), cwd=cwd, user=user,
                                   group=group, interactive=interactive, stdin=stdin, stdout=sys.stdout.buffer,
                                   stderr=sys.stderr.buffer, size=(size.columns, size.lines), forward_signals=True)
        except ExecError as err:  # the command never ran ("Command not found"): Incus's message and status
            render.error(err.message)
            code = err.code
        sys.exit(code)
