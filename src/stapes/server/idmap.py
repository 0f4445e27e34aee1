"""User-namespace id maps: the map an unprivileged container runs with (root's range in /etc/subuid and
/etc/subgid), its record in `volatile.idmap.*`, and unshifting files that arrive shifted.

Stapes keeps a container's files unshifted on disk (owned by the ids the container sees) and gives LXC an
id-mapped mount of the rootfs (`idmap=container`): creating, moving and changing `security.privileged` never
rewrite owners, and a volume moves between servers whatever their maps (docs/security.md says why). Files that
arrive shifted (an Incus source without id-mapped mounts keeps its container's files owned by host ids, e.g.
1000000 for root inside) are shifted back once, on receipt."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MAX_ID = 2**32 - 1


@dataclass(frozen=True)
class IdRange:
    uid: bool
    gid: bool
    host: int
    inside: int
    size: int

    def inside_id(self, host_id: int) -> int | None:
        if self.host <= host_id < self.host + self.size:
            return host_id - self.host + self.inside
        return None


def check_ranges(ranges: list[IdRange]) -> None:
    """A map that is sane: ids within 32 bits, non-empty ranges, each host id mapped at most once per kind."""
    for r in ranges:
        if not (r.uid or r.gid) or r.size <= 0 or min(r.host, r.inside) < 0 or \
                max(r.host, r.inside) + r.size - 1 > MAX_ID:
            raise ValueError(f"an impossible id range (host {r.host}, inside {r.inside}, size {r.size})")
    for kind in ("uid", "gid"):
        spans = sorted((r.host, r.host + r.size) for r in ranges if getattr(r, kind))
        if any(end > start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)):
            raise ValueError(f"overlapping {kind} ranges")


def ids_from_zero(ranges: list[IdRange] | tuple[IdRange, ...], kind: str) -> int:
    """How many ids of `kind` ("uid" or "gid") a container has from 0 up without a gap; MAX_ID (every id but
    (uid_t)-1) without a map, as a privileged container has."""
    if not ranges:
        return MAX_ID
    covered = 0
    for r in sorted((r for r in ranges if getattr(r, kind)), key=lambda r: r.inside):
        if r.inside > covered:
            break
        covered = max(covered, r.inside + r.size)
    return covered


def _map(ranges: list[IdRange], host_id: int, kind: str) -> int:
    for r in ranges:
        if getattr(r, kind) and (inside := r.inside_id(host_id)) is not None:
            return inside
    return host_id


def unshift(root: Path, ranges: list[IdRange]) -> int:
    """Give every file below `root` (itself included, symlinks not followed) the owner it has inside the
    container; returns how many changed. Blocking: run it in a thread."""
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            uid, gid = _map(ranges, st.st_uid, "uid"), _map(ranges, st.st_gid, "gid")
            if (uid, gid) != (st.st_uid, st.st_gid):
                mode = st.st_mode
                os.lchown(path, uid, gid)
                if not os.path.islink(path) and mode & 0o6000:
                    os.chmod(path, mode & 0o7777)  # chown clears setuid/setgid: keep them
                changed += 1
    return changed


SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")
MAX_MAP = 1_000_000_000  # Incus's default: every unprivileged container shares root's whole allocation


class NoAllocation(Exception):
    """The host gives root no subordinate ids (unprivileged containers need them)."""


def parse_allocation(text: str, user: str = "root") -> tuple[int, int] | None:
    """The first `user:start:count` (or `0:start:count`) line of /etc/subuid or /etc/subgid (pure)."""
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, "0") and parts[1].isdigit() and parts[2].isdigit() \
                and int(parts[2]) >= 65536:
            return int(parts[1]), min(int(parts[2]), MAX_MAP)
    return None


def container_map(subuid: Path = SUBUID, subgid: Path = SUBGID) -> list[IdRange]:
    """The map of an unprivileged container: root's allocation, ids inside from 0. Blocking (reads files)."""
    found = []
    for path, uid in ((subuid, True), (subgid, False)):
        try:
            allocation = parse_allocation(path.read_text())
        except OSError:
            allocation = None
        if allocation is None:
            raise NoAllocation(f"{path} gives root no range of at least 65536 ids: add a line such as "
                               f"'root:1000000:1000000000' to {path} (make install does), or run the container "
                               "privileged with security.privileged=true")
        found.append(IdRange(uid=uid, gid=not uid, host=allocation[0], inside=0, size=allocation[1]))
    return found


def to_volatile(ranges: list[IdRange]) -> str:
    """Incus's `volatile.idmap.*` format, so the keys read the same on both."""
    return json.dumps([{"Isuid": r.uid, "Isgid": r.gid, "Hostid": r.host, "Nsid": r.inside, "Maprange": r.size}
                       for r in ranges], separators=(",", ":"))


def from_volatile(text: str) -> list[IdRange]:
    """The map recorded in a `volatile.idmap.*` key; ValueError for anything that is not a sane map."""
    try:
        items = json.loads(text or "[]")
        ranges = [IdRange(uid=bool(i["Isuid"]), gid=bool(i["Isgid"]), host=int(i["Hostid"]), inside=int(i["Nsid"]),
                          size=int(i["Maprange"])) for i in items]
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"not an id map: {err}") from None
    check_ranges(ranges)
    return ranges
