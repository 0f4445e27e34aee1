"""What every command needs: the client configuration, a client for a remote, key=value parsing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from stapes.api.errors import BadRequest
from stapes.client.client import Client
from stapes.client.config import LOCAL, ClientConfig, Remote


def config() -> ClientConfig:
    ctx = click.get_current_context()
    root = ctx.find_root()
    if root.obj is None:
        root.obj = ClientConfig.load()
    conf: ClientConfig = root.obj
    return conf


def project_override() -> str | None:
    value = click.get_current_context().find_root().params.get("project")
    return str(value) if value else None


def global_option(name: str) -> bool:
    return bool(click.get_current_context().find_root().params.get(name))


def quiet() -> bool:
    """`-q` on the line (global): print only the essential result."""
    return global_option("quiet")


@contextmanager
def client_for(remote: Remote) -> Iterator[Client]:
    if global_option("force_local"):  # Incus's --force-local: the local unix socket, whatever was named
        remote = config().remote(LOCAL)
    client = Client(remote.name, config(), project_override())
    try:
        yield client
    finally:
        client.close()


def parse(spec: str) -> tuple[Remote, str]:
    return config().parse(spec)


def parse_remote_only(spec: str | None) -> Remote:
    """'s1:' or 's1' (a bare remote name) or nothing -> the remote."""
    conf = config()
    if not spec:
        return conf.remote(conf.default_remote)
    return conf.remote(spec.rstrip(":"))


def key_values(pairs: tuple[str, ...] | list[str], what: str = "setting") -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadRequest(f"Invalid {what} {pair!r}: use KEY=VALUE")
        result[key] = value
    return result


def device_overrides(specs: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """'-d root,size=10GiB' (Incus's form): NAME,KEY=VALUE[,KEY=VALUE...]."""
    result: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, sep, rest = spec.partition(",")
        if not sep or not name:
            raise BadRequest(f"Invalid device override {spec!r}: use NAME,KEY=VALUE[,KEY=VALUE]")
        result.setdefault(name, {}).update(key_values(rest.split(","), "device setting"))
    return result
