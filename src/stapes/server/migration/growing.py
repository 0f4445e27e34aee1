"""Files sent while a checkpoint is still writing them, so the transfer overlaps the dump instead of
following it (the container is frozen for both).

Only files the driver declares as written front to back and never rewritten (CRIU's `pages-<n>.img`) are
followed: every byte below a file's current size is final, so the sender reads up to it, sends it, and
looks again, until the writer has ended and one last look found nothing new. Everything else in the
checkpoint goes afterwards, in the tar that leaves these files out.

Wire format on the `criu` channel (Stapes only; negotiated by `stapesStreamedState`): binary messages
`<one byte n><n bytes of file name><data>`, each appending its data to that file; a barrier ends them.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stapes.api.errors import InternalError
from stapes.server.streams import CHUNK, Channel

POLL = 0.005  # how long the sender waits before looking again at files that did not grow
MAX_FILES = 4096  # more growing files than any container has processes with memory of their own


def _message_at(path: Path, offset: int, prefix: bytes) -> bytearray:
    """`prefix` and the file's next CHUNK bytes from `offset`, read in place (no copy of the data)."""
    message = bytearray(len(prefix) + CHUNK)
    message[:len(prefix)] = prefix
    with path.open("rb", buffering=0) as file:
        file.seek(offset)
        got = file.readinto(memoryview(message)[len(prefix):]) or 0
    del message[len(prefix) + got:]
    return message


def _growing_names(directory: Path, pattern: re.Pattern[str]) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory)
                  if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False))


async def send_growing(directory: Path, pattern: re.Pattern[str], writer: asyncio.Future[Any],
                       channel: Channel) -> dict[str, int]:
    """Follow the files of `directory` matching `pattern` while `writer` runs, then send what is left of them
    and a barrier. Returns the bytes sent per file (the tar that follows leaves these files out). If the
    writer fails, whatever was sent is of no use: the caller stops this and says so on the control channel."""
    sent: dict[str, int] = {}
    while True:
        finished = writer.done()  # decided before looking: what is found after the writer ended is complete
        grew = False
        for name in await asyncio.to_thread(_growing_names, directory, pattern):
            if len(name.encode()) > 255:
                continue
            prefix = bytes([len(name.encode())]) + name.encode()
            while len(message := await asyncio.to_thread(_message_at, directory / name, sent.get(name, 0),
                                                         prefix)) > len(prefix):
                await channel.send(message)
                sent[name] = sent.get(name, 0) + len(message) - len(prefix)
                grew = True
        if finished:
            break
        if not grew:
            await asyncio.wait({writer}, timeout=POLL)
    await channel.barrier()
    return sent


def _append(directory: Path, name: str, data: memoryview, first: bool, mode: int) -> None:
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if first else 0)
    fd = os.open(directory / name, flags, 0o600)
    try:
        if first:
            os.fchmod(fd, mode & 0o755)  # as the checkpoint made it (not through the umask; never set-id)
        view = data
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


async def receive_growing(directory: Path, pattern: re.Pattern[str], mode: int, channel: Channel,
                          admit: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Write the followed files into `directory` (which holds none yet), with `mode`, until the barrier. Names
    outside `pattern` and more than MAX_FILES files are refused: the peer is not trusted with paths. `admit`
    (directory name, bytes) raises before bytes beyond the checkpoint's bound are written."""
    received: dict[str, int] = {}
    async for message in channel.stream():
        length = message[0] if message else 0
        name = message[1:1 + length].decode("ascii", "replace")
        if not length or len(message) < 1 + length or not pattern.fullmatch(name):
            raise InternalError(f"Protocol error: the source sent a state file named {name!r}, which is not one a "
                                "checkpoint writes while it runs")
        if name not in received and len(received) >= MAX_FILES:
            raise InternalError(f"Protocol error: the source sent more than {MAX_FILES} growing state files")
        if admit is not None:
            admit(directory.name, len(message) - 1 - length)
        await asyncio.to_thread(_append, directory, name, memoryview(message)[1 + length:], name not in received,
                                mode)
        received[name] = received.get(name, 0) + len(message) - 1 - length
    return received
