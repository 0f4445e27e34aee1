"""Custom storage volumes: request bodies (Incus's field names), names and configuration keys (no I/O)."""

from __future__ import annotations

from stapes.api.errors import BadRequest
from stapes.api.names import validate_entity_name
from stapes.api.requests import Body, StrMap

CONTENT_TYPES = ("filesystem",)
# Keys Incus takes on a custom volume that Stapes refuses rather than ignores, and why.
UNSUPPORTED_KEYS = {
    "size": "quotas on custom volumes are not supported yet (the volume takes what the pool has)",
    "block.filesystem": "block volumes come with virtual machines",
    "block.mount_options": "block volumes come with virtual machines",
    "security.shifted": "files are always seen through an id-mapped mount (never shifted on disk)",
    "security.unmapped": "files are always seen through an id-mapped mount",
}


class VolumeSource(Body):
    """`copy` (another volume on this server) or `migration` (from another server, pull or push)."""

    type: str = ""
    name: str = ""
    pool: str = ""
    mode: str = "pull"
    operation: str = ""
    certificate: str = ""
    secrets: StrMap | None = None
    volume_only: bool = False
    refresh: bool = False
    project: str = ""


class VolumesPost(Body):
    name: str = ""
    type: str = "custom"
    content_type: str = "filesystem"
    description: str = ""
    config: StrMap | None = None
    source: VolumeSource | None = None


class VolumePut(Body):
    description: str | None = None
    config: StrMap | None = None
    restore: str = ""


class VolumeTarget(Body):
    operation: str = ""
    certificate: str = ""
    secrets: StrMap | None = None


class VolumePost(Body):
    """Rename (`name`), move to another pool of this server (`pool`), or become a migration source."""

    name: str = ""
    pool: str = ""
    migration: bool = False
    target: VolumeTarget | None = None
    volume_only: bool = False
    project: str = ""


def validate_volume_name(name: str) -> None:
    """Entity rules (it names a directory and a URL path part), and no '/' (Incus's snapshot separator)."""
    validate_entity_name("storage volume", name)


def validate_volume_config(config: dict[str, str]) -> None:
    """`user.*` keys are free; Incus's other keys are refused, naming why (never silently ignored)."""
    for key, value in config.items():
        if key == "volatile.idmap.last":  # the server's record (storage/volumes.py); a copy carries it along
            if not isinstance(value, str) or not value.startswith("[") or not value.endswith("]"):
                raise BadRequest(f"Invalid value for {key!r}: an id map as JSON (Incus's form), '[]' if privileged")
            continue
        if key.startswith("user."):
            if not isinstance(value, str):
                raise BadRequest(f"Invalid value for {key!r}: it must be a string")
            continue
        reason = UNSUPPORTED_KEYS.get(key)
        if reason is not None:
            raise BadRequest(f"Storage volume key {key!r} is not supported: {reason}")
        raise BadRequest(f"Unknown storage volume key {key!r}: custom volumes take user.* keys only here")


def validate_content_type(content_type: str) -> None:
    if content_type not in CONTENT_TYPES:
        raise BadRequest(f"Storage volume content type {content_type!r} is not supported: only 'filesystem' "
                         "(block volumes come with virtual machines)")
