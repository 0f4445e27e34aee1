"""How much one incoming migration may write into a pool, enforced while the bytes arrive (not afterwards, when
the disk is already full and the database beside it fails).

- A Stapes source declares its streams' size (`stapesTotalBytes`: the files' apparent size plus tar's cost per
  entry). A tar or btrfs stream may exceed it only by STREAM_MARGIN: 1/8 of it plus 16 MiB, for tar's own
  extended headers (long names, xattrs) and the files a running instance grew while they were sent. Past that
  the transfer stops.
- Whatever the transport and whoever the peer (an Incus source declares nothing; rsync sends deltas whose size
  nobody knows in advance), the pool's filesystem keeps RESERVE free: 256 MiB (as image uploads keep), or an
  eighth of a smaller filesystem. The pump looks at the free space (statvfs, in a thread) every CHECK_EVERY
  bytes, allowing for what is still in the pipe to the tool.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from stapes.api.errors import BadRequest, InternalError

MIB = 1 << 20
STREAM_MARGIN_SHARE = 8  # a stream may be 1/8 larger than declared ...
STREAM_MARGIN_BYTES = 16 * MIB  # ... plus this
RESERVE = 256 * MIB
RESERVE_SHARE = 8  # at most this share of a small filesystem is kept free
CHECK_EVERY = 4 * MIB
IN_FLIGHT = 2 * MIB  # written to the tool but maybe not on disk yet: its pipe (1 MiB) and its own buffers


class PoolFull(InternalError):
    """The target's pool filled up (or would have) during the transfer."""


class DeclaredSizeExceeded(BadRequest):
    """The source sent more than it said it would."""


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"


def stream_allowance(declared: int) -> int:
    """The most a tar or btrfs stream of `declared` bytes may carry (pure: unit-tested)."""
    return declared + declared // STREAM_MARGIN_SHARE + STREAM_MARGIN_BYTES


def reserve_for(total: int) -> int:
    """What stays free on a filesystem of `total` bytes (pure: unit-tested)."""
    return min(RESERVE, total // RESERVE_SHARE)


class ReceiveBound:
    """One migration's budget in one pool, shared by all its streams (snapshots, then the volume).
    `declared`: the source's stated size, None when it stated none (an Incus source) or when the transport
    is rsync. `stream` admits the bytes of a tar or btrfs stream, `delta` those of rsync (free space only);
    each raises before the bytes are written."""

    def __init__(self, pool: str, where: Path, declared: int | None) -> None:
        self.pool = pool
        self.where = where
        self.declared = declared
        self.allowed = None if declared is None else stream_allowance(declared)
        self.arrived = 0
        self._unchecked = CHECK_EVERY  # the first message is checked

    async def stream(self, size: int) -> None:
        self.arrived += size
        if self.allowed is not None and self.arrived > self.allowed:
            raise DeclaredSizeExceeded(
                f"The source sent more than it declared: {_mib(self.arrived)} arrived, {_mib(self.declared or 0)} "
                f"declared (a stream may exceed its size by {_mib(self.allowed - (self.declared or 0))} for its "
                "own headers), so the transfer was stopped and what it wrote removed: the source is misbehaving; "
                "check it (its version, or an instance growing fast while it moves) and move again")
        await self._space(size)

    async def delta(self, size: int) -> None:
        self.arrived += size
        await self._space(size)

    async def _space(self, size: int) -> None:
        self._unchecked += size
        if self._unchecked < CHECK_EVERY:
            return
        self._unchecked = 0
        stat = await asyncio.to_thread(os.statvfs, self.where)
        free, total = stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize
        reserve = reserve_for(total)
        # Until the next check, up to CHECK_EVERY more bytes go, besides this message and what is in flight.
        if free < reserve + size + CHECK_EVERY + IN_FLIGHT:
            declared = "no size declared" if self.declared is None else f"{_mib(self.declared)} declared"
            raise PoolFull(
                f"Storage pool {self.pool!r} is full: {_mib(free)} free of {_mib(total)} after {_mib(self.arrived)} "
                f"arrived ({declared}), and {_mib(reserve)} stay free for the server itself, so the transfer was "
                "stopped and what it wrote removed: free space in the pool, or choose another pool with -s")
