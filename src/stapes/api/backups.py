"""Instance backups: the request bodies and the shape of a backup's index.yaml (Incus's `backup.Info` with its
embedded `config.Config`), parsed like any request body (pure: no I/O)."""

from __future__ import annotations

import datetime
from typing import Any

import msgspec

from stapes.api.errors import BadRequest
from stapes.api.names import validate_entity_name
from stapes.api.requests import Body, DeviceMap, StrMap

MAX_SNAPSHOTS = 1000
# Compression algorithms a backup may use, and the file name Incus's client gives each.
EXTENSIONS = {"none": ".tar", "gzip": ".tar.gz", "zstd": ".tar.zst", "xz": ".tar.xz", "bzip2": ".tar.bz2"}
ALGORITHMS = tuple(EXTENSIONS)
DEFAULT_ALGORITHM = "gzip"  # Incus's backups.compression_algorithm default


class InstanceBackupsPost(Body):
    name: str = ""
    expires_at: str | None = None
    instance_only: bool = False
    container_only: bool = False
    optimized_storage: bool = False
    compression_algorithm: str = ""


class InstanceBackupPost(Body):
    name: str = ""


class IndexInstance(msgspec.Struct):
    name: str = ""
    type: str = "container"
    architecture: str = ""
    description: str = ""
    config: StrMap | None = None
    devices: DeviceMap | None = None
    profiles: list[str] | None = None
    ephemeral: bool = False
    stateful: bool = False


class IndexSnapshot(msgspec.Struct):
    name: str = ""
    description: str = ""
    config: StrMap | None = None
    devices: DeviceMap | None = None
    profiles: list[str] | None = None
    created_at: Any = None  # RFC 3339 text (YAML may also give a timestamp)
    stateful: bool = False


class IndexConfig(msgspec.Struct):
    container: IndexInstance | None = None
    snapshots: list[IndexSnapshot] | None = None


class BackupIndex(msgspec.Struct):
    name: str = ""
    backend: str = ""
    pool: str = ""
    snapshots: list[str] | None = None
    optimized: bool | None = None
    type: str = ""
    config: IndexConfig | None = None


def parse_index(document: Any) -> BackupIndex:
    """The loaded YAML as a BackupIndex, checked for what any import needs (a 400 naming what is wrong)."""
    if not isinstance(document, dict):
        raise BadRequest("The backup's index.yaml must be a mapping")
    try:
        index = msgspec.convert(document, type=BackupIndex, strict=False)
    except msgspec.ValidationError as err:
        raise BadRequest(f"Invalid backup index.yaml: {err}") from None
    if index.optimized:
        raise BadRequest("The backup is in a pool's optimized format (--optimized-storage): this server imports "
                         "only plain backups; export it again without --optimized-storage")
    if index.type not in ("", "container"):
        raise BadRequest(f"The backup is of a {index.type!r}: only containers can be imported here")
    if index.config is None or index.config.container is None:
        raise BadRequest("The backup's index.yaml has no instance configuration (config.container): it was made "
                         "by a server too old to import from, or is not an instance backup")
    if index.config.container.type not in ("", "container"):
        raise BadRequest(f"The backup is of a {index.config.container.type!r}: only containers can be imported here")
    listed = list(index.snapshots or [])
    described = [s.name for s in index.config.snapshots or []]
    if len(listed) > MAX_SNAPSHOTS:
        raise BadRequest(f"The backup lists {len(listed)} snapshots, more than the {MAX_SNAPSHOTS} accepted")
    for name in listed:
        validate_entity_name("snapshot", name)
    if len(set(listed)) != len(listed):
        raise BadRequest("The backup's index.yaml lists a snapshot twice")
    if sorted(listed) != sorted(described):
        raise BadRequest(f"The backup's snapshot list ({', '.join(listed) or 'none'}) does not match the snapshots "
                         f"it describes ({', '.join(described) or 'none'})")
    for snap in index.config.snapshots or []:
        if snap.stateful:
            raise BadRequest(f"The backup's snapshot {snap.name!r} is stateful: stateful snapshots are not supported")
    return index


def parse_time(value: Any, what: str) -> float:
    """An RFC 3339 time (Go's zero time, or nothing: 0)."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, datetime.datetime):
        moment = value
    elif not isinstance(value, str):
        raise BadRequest(f"Invalid {what} {value!r}: use an RFC 3339 time such as 2030-01-01T00:00:00Z")
    else:
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"Invalid {what} {value!r}: use an RFC 3339 time such as 2030-01-01T00:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    if moment.year <= 1:
        return 0.0
    return moment.timestamp()
