"""`stapes list`: Incus's filters and columns (cmd/incus/list.go), as pure functions of the API objects.

Filters (all must match): a bare word is a name prefix or a regular expression on the whole name (`web`,
`.*web.*01$`); `status=running` (`state=`), `type=container`, `architecture=`, `location=`, `ipv4=ADDR|CIDR`,
`ipv6=...` (several values with ','); any other `key=value` is a configuration key of the expanded config
whose value matches (a regular expression), the namespace abbreviable (`u.role=web` for `user.role=web`).

Columns: Incus's shorthand letters, commas optional between them; a long name (`name,state,ipv4`) where it is
one of LONG_NAMES; `[config:|devices:]KEY[:NAME][:MAXWIDTH]` for a configuration or device key (with a '.').
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from stapes.api.errors import BadRequest
from stapes.cli import units

Json = dict[str, Any]
DEFAULT_COLUMNS = "ns46tSL"
DEFAULT_COLUMNS_ALL_PROJECTS = "ens46tSL"
FAST_COLUMNS = "nsacPt"


@dataclass(frozen=True)
class Column:
    header: str
    data: Callable[[Json, bool], str]  # (instance, raw units) -> cell


def size(value: float | None, raw: bool) -> str:
    """Memory and disk in MiB/GiB as Incus shows them ('' for none); bytes with the format option 'raw'."""
    if not value:
        return ""
    return str(int(value)) if raw else units.size(value)


def _state(i: Json) -> Json:
    return i.get("state") or {}


def _active(i: Json) -> bool:
    return str(i.get("status", "")).lower() not in ("stopped", "error", "")


def _addresses(i: Json, family: str) -> str:
    """As Incus: each address that is neither link- nor host-local, with its interface, one per line."""
    if not _active(i):
        return ""
    found = [f"{a['address']} ({name})" for name, iface in (_state(i).get("network") or {}).items()
             if iface.get("type") != "loopback" and name != "lo"
             for a in iface.get("addresses") or [] if a.get("family") == family
             and a.get("scope") not in ("link", "local")]
    return "\n".join(sorted(found, reverse=True))


def _date(value: str | None) -> str:
    """Incus's dateLayout, local time: 2026/12/01 23:55 UTC; '' for none (or the zero time)."""
    if not value or value.startswith("0001-") or value.startswith("1970-01-01"):
        return ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return moment.astimezone().strftime("%Y/%m/%d %H:%M ") + (time.strftime("%Z") or "UTC")


def parse_bytes(text: str) -> int | None:
    """'256MiB', '1GB', '512' -> bytes (Incus's ParseByteSizeString); None for '50%' or garbage."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTPE]i?B|B)?\s*", text)
    if not match:
        return None
    number, unit = float(match.group(1)), match.group(2) or "B"
    powers = {"K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
    if unit == "B":
        return int(number)
    base = 1024 if "i" in unit else 1000
    return int(number * base ** powers[unit[0]])


def _memory_percent(i: Json, raw: bool) -> str:
    usage = (_state(i).get("memory") or {}).get("usage") or 0
    limit = parse_bytes((i.get("expanded_config") or {}).get("limits.memory", "")) if usage and _active(i) else None
    return f"{usage / limit * 100:.1f}%" if limit else ""


def _root_disk(i: Json) -> str:
    return next((n for n, d in (i.get("expanded_devices") or {}).items()
                 if d.get("type") == "disk" and d.get("path") == "/"), "")


def _type(i: Json, raw: bool) -> str:
    kind = str(i.get("type") or "container").upper()
    return f"{kind} (EPHEMERAL)" if i.get("ephemeral") else kind


def _when_active(value: Callable[[Json], str]) -> Callable[[Json, bool], str]:
    return lambda i, raw: value(i) if _active(i) else ""


SHORTHAND: dict[str, Column] = {
    "4": Column("IPV4", lambda i, raw: _addresses(i, "inet")),
    "6": Column("IPV6", lambda i, raw: _addresses(i, "inet6")),
    "a": Column("ARCHITECTURE", lambda i, raw: str(i.get("architecture", ""))),
    "b": Column("STORAGE POOL", lambda i, raw: str((i.get("expanded_devices") or {}).get(_root_disk(i), {})
                                                   .get("pool", ""))),
    "c": Column("CREATED AT", lambda i, raw: _date(i.get("created_at"))),
    "d": Column("DESCRIPTION", lambda i, raw: str(i.get("description", ""))),
    "D": Column("DISK USAGE", lambda i, raw: size(((_state(i).get("disk") or {}).get(_root_disk(i)) or {})
                                                  .get("usage"), raw)),
    "e": Column("PROJECT", lambda i, raw: str(i.get("project", ""))),
    "f": Column("BASE IMAGE", lambda i, raw: (i.get("config") or {}).get("volatile.base_image", "")[:12]),
    "F": Column("BASE IMAGE", lambda i, raw: (i.get("config") or {}).get("volatile.base_image", "")),
    "l": Column("LAST USED AT", lambda i, raw: _date(i.get("last_used_at"))),
    "m": Column("MEMORY USAGE", lambda i, raw: size((_state(i).get("memory") or {}).get("usage"), raw)
                if _active(i) else ""),
    "M": Column("MEMORY USAGE%", _memory_percent),
    "n": Column("NAME", lambda i, raw: str(i.get("name", ""))),
    "N": Column("PROCESSES", _when_active(lambda i: str(_state(i).get("processes", "")))),
    "p": Column("PID", _when_active(lambda i: str(_state(i).get("pid", "")))),
    "P": Column("PROFILES", lambda i, raw: "\n".join(i.get("profiles") or [])),
    "R": Column("REMOTE", lambda i, raw: ""),  # filled in by rows(): the remote is not in the object
    "S": Column("SNAPSHOTS", lambda i, raw: str(len(i.get("snapshots") or []))),
    "s": Column("STATE", lambda i, raw: str(i.get("status", "")).upper()),
    "t": Column("TYPE", _type),
    "u": Column("CPU USAGE", lambda i, raw: f"{((_state(i).get('cpu') or {}).get('usage') or 0) // 10**9}s"
                if _active(i) and (_state(i).get("cpu") or {}).get("usage") else ""),
    "U": Column("STARTED AT", lambda i, raw: _date(_state(i).get("started_at")) if _active(i) else ""),
    "L": Column("LOCATION", lambda i, raw: "" if i.get("location") in (None, "none") else str(i["location"])),
}

LONG_NAMES = {
    "ipv4": "4", "ipv6": "6", "architecture": "a", "storage_pool": "b", "pool": "b", "created": "c",
    "created_at": "c", "description": "d", "disk": "D", "disk_usage": "D", "project": "e", "base_image": "f",
    "last_used": "l", "last_used_at": "l", "memory": "m", "memory_usage": "m", "memory_percent": "M",
    "name": "n", "processes": "N", "pid": "p", "profiles": "P", "remote": "R", "snapshots": "S", "state": "s",
    "status": "s", "type": "t", "cpu": "u", "cpu_usage": "u", "started": "U", "started_at": "U",
    "location": "L",
}


def _key_column(entry: str) -> Column:
    fields = entry.split(":")
    kind = "config"
    if fields[0] in ("config", "devices") and len(fields) > 1:
        kind = fields.pop(0)
    if len(fields) > 3:
        raise BadRequest(f"Invalid config key column format (too many fields): {entry!r}")
    key = fields[0]
    header = key
    if len(fields) > 1:
        if not fields[1] and len(fields) != 3:
            raise BadRequest(f"Invalid name in {entry!r}: empty only when a maximum width follows")
        header = fields[1] or key
    width = -1
    if len(fields) > 2:
        try:
            width = int(fields[2])
        except ValueError:
            raise BadRequest(f"Invalid max width (must be an integer) {fields[2]!r} in {entry!r}") from None
        if width < -1:
            raise BadRequest(f"Invalid max width (must be -1, 0 or a positive integer) {fields[2]!r} in {entry!r}")
        width = len(header) if width == 0 else width

    def cut(value: str) -> str:
        return value[:width] if width > 0 else value

    if kind == "config":
        return Column(header, lambda i, raw: cut(str((i.get("config") or {}).get(
            key, (i.get("expanded_config") or {}).get(key, "")))))
    device, _, device_key = key.partition(".")

    def device_value(i: Json, raw: bool) -> str:
        local = (i.get("devices") or {}).get(device) or {}
        expanded = (i.get("expanded_devices") or {}).get(device) or {}
        return cut(str(local.get(device_key, expanded.get(device_key, "")))) if device_key else ""

    return Column(header, device_value)


def parse_columns(spec: str) -> list[Column]:
    columns: list[Column] = []
    for entry in spec.split(","):
        if not entry:
            raise BadRequest(f"Empty column entry (redundant, leading or trailing comma) in {spec!r}")
        if "." in entry:
            columns.append(_key_column(entry))
        elif entry.lower() in LONG_NAMES:
            columns.append(SHORTHAND[LONG_NAMES[entry.lower()]])
        else:
            for letter in entry:
                if letter not in SHORTHAND:
                    raise BadRequest(f"Unknown column shorthand char {letter!r} in {entry!r}: use any of "
                                     f"{''.join(SHORTHAND)}, or a config key (user.role)")
                columns.append(SHORTHAND[letter])
    return columns


def columns_for(spec: str | None, *, all_projects: bool, fast: bool) -> str:
    """The column spec Incus would use for these options (the default drops L where nothing has a location)."""
    if fast and spec is not None:
        raise BadRequest("--fast and --columns exclude each other")
    if fast:
        return "e" + FAST_COLUMNS if all_projects else FAST_COLUMNS
    if spec is None:
        return DEFAULT_COLUMNS_ALL_PROJECTS if all_projects else DEFAULT_COLUMNS
    return spec


def drop_unlocated(spec: str, instances: Sequence[Json]) -> str:
    """The default layouts' L (location) only shows where some instance has a location (a cluster)."""
    if spec in (DEFAULT_COLUMNS, DEFAULT_COLUMNS_ALL_PROJECTS) and not any(
            i.get("location") not in (None, "", "none") for i in instances):
        return spec.replace("L", "")
    return spec


# filters
def _name_matches(name: str, word: str) -> bool:
    pattern = word if "^" in word or "$" in word else f"^{word}$"
    try:
        return bool(re.search(f"({pattern}|^{re.escape(word)}.*)", name))
    except re.error:
        return name.startswith(word)


def _net_matches(i: Json, query: str, family: str) -> bool:
    try:
        subnet = ipaddress.ip_network(query, strict=False) if "/" in query else None
    except ValueError:
        subnet = None
    for iface in (_state(i).get("network") or {}).values():
        for addr in iface.get("addresses") or []:
            if addr.get("family") != family:
                continue
            if addr.get("address") == query:
                return True
            if subnet is not None:
                try:
                    if ipaddress.ip_address(addr["address"]) in subnet:
                        return True
                except ValueError:
                    continue
    return False


def _config_key(config: dict[str, str], key: str) -> str | None:
    """The key itself, or the one whose namespace `key`'s first part abbreviates (u.role -> user.role)."""
    if key in config:
        return key
    head, _, tail = key.partition(".")
    found = sorted(k for k in config if k.partition(".")[2] == tail and k.partition(".")[0].startswith(head))
    return found[0] if len(found) == 1 else None


def _value_matches(value: str, wanted: str) -> bool:
    if value == wanted or value.lower() == wanted.lower():
        return True
    try:
        return re.fullmatch(wanted, value) is not None
    except re.error:
        return False


def _one_matches(i: Json, key: str, value: str) -> bool:
    lower = key.lower()
    if lower in ("status", "state"):
        return str(i.get("status", "")).lower() == value.lower()
    if lower == "type":
        return str(i.get("type", "")).lower() == value.lower()
    if lower == "architecture":
        return str(i.get("architecture", "")) == value
    if lower == "location":
        return str(i.get("location", "")) == value
    if lower in ("ipv4", "ipv6"):
        return _net_matches(i, value, "inet" if lower == "ipv4" else "inet6")
    if lower == "name":
        return _name_matches(str(i.get("name", "")), value)
    if lower in ("description", "project", "ephemeral"):
        return _value_matches(str(i.get(lower, "")).lower(), value.lower())
    config = i.get("expanded_config") or {}
    found = _config_key(config, key)
    return found is not None and _value_matches(config[found], value)


def matches(i: Json, filters: Sequence[str]) -> bool:
    for spec in filters:
        key, sep, value = spec.partition("=")
        if not sep:
            if not _name_matches(str(i.get("name", "")), spec):
                return False
            continue
        if key.lower() in ("status", "state", "type", "architecture", "location", "ipv4", "ipv6"):
            if not any(_one_matches(i, key, v) for v in value.split(",")):
                return False
        elif not _one_matches(i, key, value):
            return False
    return True


def rows(instances: Sequence[Json], columns: Sequence[Column], raw: bool = False, remote: str = ""
         ) -> list[list[str]]:
    """The table's cells, by name; `raw`: bytes as numbers (Incus's `-f csv,raw`)."""
    return [[remote if c is SHORTHAND["R"] else c.data(i, raw) for c in columns]
            for i in sorted(instances, key=lambda i: str(i.get("name", "")))]


def split_target(args: Sequence[str], remotes: set[str]) -> tuple[str | None, list[str]]:
    """`list [REMOTE:][FILTER] [FILTER]...`: a first word with ':' and no '=' names a remote (and a first
    filter), as in Incus: 's1:' or 's1:web'; a remote that does not exist is an error, not a filter."""
    if args and ":" in args[0] and "=" not in args[0]:
        head, _, tail = args[0].partition(":")
        if head not in remotes:
            raise BadRequest(f"Remote {head!r} does not exist: see 'stapes remote list', or add it with "
                             "'stapes remote add NAME URL --token TOKEN'")
        return head, ([tail] if tail else []) + list(args[1:])
    return None, list(args)
