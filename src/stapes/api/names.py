"""Name rules, the same as Incus's so that names valid there are valid here and the reverse."""

from __future__ import annotations

import re

from stapes.api.errors import BadRequest

_HOSTNAME_LABEL = re.compile(r"^[a-zA-Z0-9-]+$")
# No control characters (a NUL reached the kernel as a truncated interface alias), and fullmatch: `$` would
# let a trailing newline through.
_ENTITY_NAME = re.compile(r"[^/\\\s'\"`?*:#<>|\x00-\x1f\x7f]+")


def validate_instance_name(name: str) -> None:
    """Instance names double as hostnames: RFC 1123 labels that do not start with a digit."""
    what = f"Invalid instance name {name!r}"
    if not name:
        raise BadRequest("Invalid instance name: it must not be empty")
    if len(name) > 63:
        raise BadRequest(f"{what}: it must be at most 63 characters long")
    if not _HOSTNAME_LABEL.fullmatch(name):  # not match: `$` lets a trailing newline through
        raise BadRequest(f"{what}: only letters, digits and hyphens are allowed")
    if name[0] == "-" or name[0].isdigit():
        raise BadRequest(f"{what}: it must not start with a digit or a hyphen")
    if name[-1] == "-":
        raise BadRequest(f"{what}: it must not end with a hyphen")


def validate_entity_name(kind: str, name: str) -> None:
    """Profiles, projects, pools, aliases: anything that ends up in a URL path or a file name."""
    if not name:
        raise BadRequest(f"Invalid {kind} name: it must not be empty")
    if len(name) > 63:
        raise BadRequest(f"Invalid {kind} name {name!r}: it must be at most 63 characters long")
    if name in (".", "..") or not _ENTITY_NAME.fullmatch(name):
        raise BadRequest(
            f"Invalid {kind} name {name!r}: use letters, digits, '-', '_' or '.', without spaces, slashes or "
            "control characters"
        )


def validate_alias_name(name: str) -> None:
    """Image aliases may hold slashes, as Incus's do (debian/12); never an empty or dot-only part."""
    if not name or len(name) > 63:
        raise BadRequest(f"Invalid image alias name {name!r}: it must be 1 to 63 characters long")
    parts = name.split("/")
    if any(part in ("", ".", "..") or not _ENTITY_NAME.fullmatch(part) for part in parts):
        raise BadRequest(f"Invalid image alias name {name!r}: use letters, digits, '-', '_', '.' and '/' between "
                         "parts, without spaces")
