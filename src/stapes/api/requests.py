"""Request bodies, parsed once into typed objects.

Field names follow Incus's JSON. Unknown fields are ignored (Incus clients send more than Stapes uses);
a field of the wrong type is a 400 that names the field. Maps that Go clients may send as `null` accept
None. Every handler decodes its body with `decode()`, never with `dict.get` chains.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from stapes.api.errors import BadRequest

StrMap = dict[str, str]
DeviceMap = dict[str, dict[str, str]]


class Body(msgspec.Struct, omit_defaults=True):
    """Base of all request bodies."""


class InstanceSource(Body):
    type: str = "none"
    alias: str = ""
    fingerprint: str = ""
    server: str = ""
    mode: str = "pull"
    operation: str = ""
    certificate: str = ""
    secrets: StrMap | None = None
    live: bool = False
    instance_only: bool = False
    container_only: bool = False
    refresh: bool = False


class InstancesPost(Body):
    name: str = ""
    type: str = ""
    architecture: str = ""
    description: str = ""
    config: StrMap | None = None
    devices: DeviceMap | None = None
    profiles: list[str] | None = None
    ephemeral: bool = False
    source: InstanceSource | None = None
    start: bool = False


class InstancePut(Body):
    """PUT replaces; PATCH merges (only the fields present change: see `fields_set`)."""

    description: str | None = None
    config: StrMap | None = None
    devices: DeviceMap | None = None
    profiles: list[str] | None = None
    ephemeral: bool | None = None
    architecture: str = ""
    stateful: bool = False
    restore: str = ""


class MigrationTarget(Body):
    operation: str = ""
    certificate: str = ""
    secrets: StrMap | None = None


class InstancePost(Body):
    """Rename, or become a migration source."""

    name: str = ""
    migration: bool = False
    live: bool = False
    instance_only: bool = False
    container_only: bool = False
    target: MigrationTarget | None = None
    transport: str | None = None  # Stapes: narrow the transports offered (benchmarks, tests)
    keep_running: bool = False  # Stapes: a live copy, the instance keeps running here too
    pool: str = ""
    project: str = ""


class InstanceStatePut(Body):
    action: str = ""
    timeout: float = -1
    force: bool = False
    stateful: bool = False


class ExecPost(Body):
    command: list[str] = msgspec.field(default_factory=list)
    environment: StrMap | None = None
    wait_for_websocket: bool = msgspec.field(default=False, name="wait-for-websocket")
    record_output: bool = msgspec.field(default=False, name="record-output")
    interactive: bool = False
    width: int | None = None  # None or 0: not a terminal's size (80x24 then)
    height: int | None = None
    cwd: str | None = None  # None (pylxd sends null for what it leaves out): the defaults
    user: int | None = None
    group: int | None = None


NO_ID = 2**32 - 1  # (uid_t)-1: "leave unchanged" to setuid()/setgid(), so never an id to run as


def check_exec_ids(user: int, group: int, uids: int, gids: int) -> None:
    """exec's `user` and `group` must be ids the container has: 0 to `uids`-1 and 0 to `gids`-1 (the size of
    an unprivileged container's map; NO_ID for a privileged one). Pure: unit-tested."""
    for what, value, count in (("user", user, min(uids, NO_ID)), ("group", group, min(gids, NO_ID))):
        if not 0 <= value < count:
            raise BadRequest(f"exec {what!r} {value} is not an id of this container: use 0 to {count - 1}")


class SnapshotsPost(Body):
    name: str = ""
    description: str = ""
    stateful: bool = False


class SnapshotPost(Body):
    name: str = ""
    migration: bool = False
    live: bool = False


class ServerPut(Body):
    config: StrMap | None = None


class CertificatesPost(Body):
    name: str = ""
    type: str = "client"
    certificate: str = ""
    password: str = ""
    trust_token: str = ""
    token: bool = False
    restricted: bool = False
    projects: list[str] | None = None
    description: str = ""


class EntityPost(Body):
    """Create a profile, project or storage pool."""

    name: str = ""
    description: str = ""
    config: StrMap | None = None
    devices: DeviceMap | None = None
    driver: str = ""


class EntityPut(Body):
    description: str | None = None
    config: StrMap | None = None
    devices: DeviceMap | None = None


class NetworksPost(Body):
    name: str = ""
    type: str = "bridge"
    description: str = ""
    config: StrMap | None = None


class Rename(Body):
    name: str = ""


class BuiltinImageSource(Body):
    type: str = ""
    name: str = ""


class ImageAlias(Body):
    name: str = ""
    description: str = ""


class ImagesPost(Body):
    source: BuiltinImageSource | None = None
    aliases: list[ImageAlias] | None = None
    public: bool = False
    properties: dict[str, str] | None = None  # publish: over the instance's metadata.yaml properties


class ImageAliasesPost(Body):
    name: str = ""
    target: str = ""
    description: str = ""


B = TypeVar("B", bound=Body)


def decode(raw: bytes, kind: type[B]) -> B:
    """The body as `kind`; a clear 400 for anything else (what is wrong, and where)."""
    if not raw.strip():
        raw = b"{}"
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as err:
        raise BadRequest(f"Invalid request body: {err}") from None
    except msgspec.DecodeError as err:
        raise BadRequest(f"The request body is not valid JSON: {err}") from None


def fields_set(raw: bytes) -> set[str]:
    """Which top-level fields a PATCH body names (an absent field keeps its value)."""
    try:
        data = msgspec.json.decode(raw or b"{}")
    except msgspec.DecodeError:
        return set()
    return set(data) if isinstance(data, dict) else set()
