"""`stapes remote`: the servers this client knows."""

from __future__ import annotations

import asyncio

import click

from stapes.api.errors import BadRequest
from stapes.api.tokens import decode_token
from stapes.cli import render
from stapes.cli.common import config
from stapes.client.client import add_remote_with_token
from stapes.client.config import LOCAL


def register(cli: click.Group) -> None:
    @cli.group()
    def remote() -> None:
        """Manage remote servers."""

    @remote.command(name="add")
    @click.argument("name")
    @click.argument("address", required=False)
    @click.option("--token", help="Trust token printed by 'stapes config trust add' on the server")
    def add(name: str, address: str | None, token: str | None) -> None:
        """Add a remote server, trusting this client with a token.

        \b
        Examples:
          stapes remote add s1 https://127.0.0.1:8443 --token TOKEN
          stapes remote add s1 TOKEN        (the server address comes from the token)
        """
        if token is None and address is not None:
            try:
                decode_token(address)
                token, address = address, None
            except ValueError:
                pass
        if token is None:
            raise BadRequest("A trust token is needed: run 'stapes config trust add NAME' on the server, then "
                             "'stapes remote add NAME URL --token TOKEN'")
        added = asyncio.run(add_remote_with_token(config(), name, token, address))
        render.success(f"Remote {name} added ({added.addr}); this client is trusted")

    @remote.command(name="list")
    @click.option("-f", "--format", "fmt", type=render.FormatType(), default="table",
                  help="table, csv, json, yaml or compact (csv,header / table,noheader)")
    def list_remotes(fmt: str) -> None:
        """List remotes.

        \b
        Example:
          stapes remote list -f csv
        """
        conf = config()
        rows = [[n + (" (current)" if n == conf.default_remote else ""), r.addr, r.protocol, r.project or "default"]
                for n, r in sorted(conf.remotes.items())]
        render.table(["NAME", "URL", "PROTOCOL", "PROJECT"], rows, fmt)

    @remote.command(name="remove")
    @click.argument("name")
    def remove(name: str) -> None:
        """Remove a remote.

        \b
        Example:
          stapes remote remove s2
        """
        conf = config()
        conf.remote(name)
        if name == LOCAL:
            raise BadRequest("The local remote cannot be removed")
        if name == conf.default_remote:
            raise BadRequest(f"{name!r} is the default remote: switch to another one first")
        del conf.remotes[name]
        conf.server_cert(name).unlink(missing_ok=True)
        conf.save()

    @remote.command(name="rename")
    @click.argument("old")
    @click.argument("new")
    def rename(old: str, new: str) -> None:
        """Rename a remote (its pinned certificate, and the default remote, follow).

        \b
        Example:
          stapes remote rename s1 lab
        """
        conf = config()
        conf.rename_remote(old.rstrip(":"), new.rstrip(":"))
        conf.save()

    @remote.command(name="set-url")
    @click.argument("name")
    @click.argument("url")
    def set_url(name: str, url: str) -> None:
        """Change a remote's address (the pinned certificate stays: the server must be the same one).

        \b
        Examples:
          stapes remote set-url s1 https://10.0.0.5:8443
          stapes remote set-url s1 10.0.0.5        (https:// and port 8443 are added)
        """
        conf = config()
        target = conf.remote(name.rstrip(":"))
        if (target.name == LOCAL or target.is_unix) and not url.startswith("unix:"):
            raise BadRequest(f"{target.name!r} is a unix socket remote: give a unix:// address")
        target.addr = _https_url(url) if not url.startswith("unix:") else url
        conf.save()

    @remote.command(name="switch")
    @click.argument("name")
    def switch(name: str) -> None:
        """Make NAME the default remote.

        \b
        Example:
          stapes remote switch s1
        """
        conf = config()
        conf.remote(name)
        conf.default_remote = name
        conf.save()

    @remote.command(name="get-default")
    def get_default() -> None:
        """Print the default remote.

        \b
        Example:
          stapes remote get-default
        """
        click.echo(config().default_remote)


def _https_url(url: str) -> str:
    """Incus's remote address forms: 'host', 'host:port', 'https://host[:port]', '[v6]:port' -> https://host:port."""
    address = url.removeprefix("https://").rstrip("/")
    if not address:
        raise BadRequest(f"Invalid remote address {url!r}")
    if address.count(":") > 1 and not address.startswith("["):
        address = f"[{address}]"  # a bare IPv6 address
    if address.endswith("]") or ":" not in address:
        address += ":8443"
    return f"https://{address}"
