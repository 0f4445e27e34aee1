"""`stapes config`: server and instance configuration, and the trust store."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import click
import yaml

from stapes.api.errors import BadRequest
from stapes.cli import render
from stapes.cli.common import client_for, config, key_values, parse, quiet
from stapes.cli.devices import register_device_commands

_INSTANCE_EDITABLE = ("config", "devices", "profiles", "description")


def _target(spec: str | None) -> tuple[Any, str]:
    """'' -> default server; 's1:' -> that server; '[s1:]c1' -> that instance."""
    conf = config()
    if not spec:
        return conf.remote(conf.default_remote), ""
    if spec.endswith(":"):
        return conf.remote(spec[:-1]), ""
    return parse(spec)


def _split_set_args(args: tuple[str, ...]) -> tuple[str | None, dict[str, str]]:
    """Incus's forms: 'KEY VALUE', 'KEY=VALUE...', 'TARGET KEY VALUE', 'TARGET KEY=VALUE...'."""
    if not args:
        raise BadRequest("Nothing to set: give KEY=VALUE or KEY VALUE")
    if all("=" in a for a in args):
        return None, key_values(args)
    if len(args) == 2 and "=" not in args[0] and not args[0].endswith(":") and "=" not in args[1]:
        return None, {args[0]: args[1]}
    target, rest = args[0], args[1:]
    if len(rest) == 2 and "=" not in rest[0]:
        return target, {rest[0]: rest[1]}
    return target, key_values(rest)


def register(cli: click.Group) -> None:
    @cli.group(name="config")
    def config_group() -> None:
        """Server and instance configuration, and trusted clients."""

    @config_group.command(name="set")
    @click.argument("args", nargs=-1, required=True)
    def config_set(args: tuple[str, ...]) -> None:
        """Set configuration keys.

        \b
        Examples:
          stapes config set core.https_address 127.0.0.1:8443
          stapes config set s1: core.https_address=127.0.0.2:8443
          stapes config set c1 limits.memory=128MiB limits.cpu=1
        """
        target, values = _split_set_args(args)
        remote, name = _target(target)
        with client_for(remote) as client:
            if name:
                client.update_instance(name, {"config": values})
            else:
                client.update_server_config(values)

    @config_group.command(name="unset")
    @click.argument("args", nargs=-1, required=True)
    def config_unset(args: tuple[str, ...]) -> None:
        """Remove configuration keys.

        \b
        Examples:
          stapes config unset core.https_address
          stapes config unset c1 limits.memory
        """
        target, keys = (None, list(args)) if len(args) == 1 else (args[0], list(args[1:]))
        remote, name = _target(target)
        with client_for(remote) as client:
            if name:
                instance = client.instance(name)
                missing = [k for k in keys if k not in instance["config"]]
                if missing:
                    raise BadRequest(f"Key {missing[0]!r} is not set on {name!r}")
                new = {k: v for k, v in instance["config"].items() if k not in keys}
                client.update_instance(name, {"config": new, "devices": instance["devices"],
                                              "profiles": instance["profiles"],
                                              "description": instance["description"]}, patch=False)
            else:
                client.update_server_config({k: "" for k in keys})

    @config_group.command(name="get")
    @click.argument("args", nargs=-1, required=True)
    def config_get(args: tuple[str, ...]) -> None:
        """Print one configuration value.

        \b
        Examples:
          stapes config get core.https_address
          stapes config get s1:c1 limits.memory
        """
        target, key = (None, args[0]) if len(args) == 1 else (args[0], args[1])
        remote, name = _target(target)
        with client_for(remote) as client:
            source = client.instance(name)["config"] if name else client.server().get("config", {})
        click.echo(source.get(key, ""))

    @config_group.command(name="show")
    @click.argument("target", required=False)
    @click.option("--expanded", is_flag=True, help="Show the configuration with profiles applied")
    def config_show(target: str | None, expanded: bool) -> None:
        """Show the server's or an instance's configuration as YAML.

        \b
        Examples:
          stapes config show
          stapes config show s1:c1 --expanded
        """
        remote, name = _target(target)
        with client_for(remote) as client:
            if not name:
                render.show_yaml({"config": client.server().get("config", {})})
                return
            instance = client.instance(name)
        if expanded:
            instance["config"], instance["devices"] = instance["expanded_config"], instance["expanded_devices"]
        render.show_yaml({k: instance[k] for k in ("name", "architecture", *_INSTANCE_EDITABLE, "ephemeral")})

    @config_group.command(name="edit")
    @click.argument("target", required=False)
    def config_edit(target: str | None) -> None:
        """Edit the configuration as YAML in $EDITOR (or read it from standard input).

        \b
        Examples:
          stapes config edit c1
          stapes config show c1 | sed s/64MiB/128MiB/ | stapes config edit c1
        """
        remote, name = _target(target)
        with client_for(remote) as client:
            if name:
                instance = client.instance(name)
                current = {k: instance[k] for k in _INSTANCE_EDITABLE}
            else:
                current = {"config": client.server().get("config", {})}
            new = _edit_yaml(current)
            if name:
                client.update_instance(name, {k: new.get(k, current[k]) for k in _INSTANCE_EDITABLE}, patch=False)
            else:
                client.update_server_config(new.get("config") or {}, replace=True)

    @config_group.group(name="device")
    def config_device() -> None:
        """An instance's devices (disks, nics): add, remove, list, show, get, set, unset, override."""

    register_device_commands(config_device, "instance", "INSTANCE")

    @config_group.group(name="trust")
    def trust() -> None:
        """Clients trusted by a server."""

    @trust.command(name="add")
    @click.argument("name")
    def trust_add(name: str) -> None:
        """Create a single-use trust token for a new client named NAME.

        \b
        Examples:
          stapes config trust add laptop
          stapes config trust add s1:laptop
          T=$(stapes config trust add s1:laptop -q)      (-q: only the token)
        """
        remote, client_name = parse(name)
        with client_for(remote) as client:
            token = client.create_token(client_name)
        click.echo(token if quiet() else f"Client {client_name} certificate add token:\n{token}")

    @trust.command(name="list")
    @click.argument("remote", required=False)
    @click.option("-f", "--format", "fmt", type=click.Choice(render.FORMATS), default="table")
    def trust_list(remote: str | None, fmt: str) -> None:
        """List trusted client certificates.

        \b
        Example:
          stapes config trust list s1:
        """
        target, _ = _target(remote if remote is None or remote.endswith(":") else remote + ":")
        with client_for(target) as client:
            certs = client.certificates()
        render.table(["NAME", "TYPE", "FINGERPRINT"],
                     [[c["name"], c["type"], c["fingerprint"][:12]] for c in certs], fmt, raw=certs)

    @trust.command(name="remove")
    @click.argument("fingerprint")
    def trust_remove(fingerprint: str) -> None:
        """Stop trusting a client (by fingerprint or its prefix).

        \b
        Example:
          stapes config trust remove s1:1a2b3c4d
        """
        remote, fp = parse(fingerprint)
        with client_for(remote) as client:
            client.remove_certificate(fp)


def _edit_yaml(current: dict[str, Any]) -> dict[str, Any]:
    text = yaml.safe_dump(current, sort_keys=True)
    if not sys.stdin.isatty():
        new_text = sys.stdin.read()
    else:
        with tempfile.NamedTemporaryFile("w+", suffix=".yaml", delete=False) as handle:
            handle.write(text)
            path = handle.name
        try:
            subprocess.run([os.environ.get("EDITOR") or os.environ.get("VISUAL") or "vi", path], check=True)
            with open(path) as handle:
                new_text = handle.read()
        finally:
            os.unlink(path)
    try:
        new = yaml.safe_load(new_text) or {}
    except yaml.YAMLError as err:
        raise BadRequest(f"The edited text is not valid YAML: {err}") from None
    if not isinstance(new, dict):
        raise BadRequest("The edited YAML must be a mapping")
    return new
