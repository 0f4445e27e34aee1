"""Files that arrive shifted on disk (an Incus source without id-mapped mounts keeps its container's files
owned by host ids, e.g. 1000000 for root inside) are shifted back to the ids the container sees, which is how
Stapes keeps files on disk."""

from __future__ import annotations

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
