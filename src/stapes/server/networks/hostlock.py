"""One lock for the whole host around choosing a subnet and making the bridge that claims it: servers on one
host each check their choice against the host's addresses, and without it two of them checking at once both
saw the subnet free (issue 16). An flock on a root-only file under /run: it goes with the process that held
it, however that process ends, and /run is emptied at boot."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from stapes.api.errors import InternalError

LOCK_PATH = Path("/run/stapes/networks.lock")
WAIT = 120.0  # making a bridge and starting its dnsmasq takes well under a second
POLL = 0.02


def _open(path: Path) -> int:
    """The lock file, in a directory only its owner (root) can write into, so no other user can take its
    place or hold it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path.parent)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise InternalError(f"{path.parent} is not a directory of this server's user: remove it")
    if info.st_mode & 0o077:
        os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_uid != os.geteuid():
        os.close(fd)
        raise InternalError(f"{path} is not this server's user's: remove it")
    return fd


@contextlib.asynccontextmanager
async def host_lock(path: Path = LOCK_PATH, wait: float = WAIT) -> AsyncIterator[None]:
    """Held while the body runs. Never blocks the event loop, and a cancelled wait takes nothing: the lock is
    tried without blocking, between short sleeps."""
    fd = await asyncio.to_thread(_open, path)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if loop.time() > deadline:
                    raise InternalError(f"Another server on this host has been changing its networks for more than "
                                        f"{wait:.0f}s (it holds {path}): try again") from None
                await asyncio.sleep(POLL)
        yield
    finally:
        os.close(fd)  # releases the lock
