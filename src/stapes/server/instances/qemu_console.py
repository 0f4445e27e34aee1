"""A VM's console: its serial port, which QEMU serves on `console.sock` in the VM's runtime directory and
copies into `console.log` beside it (QEMU writes that file itself, whether anyone is attached or not; each
start of the VM begins it afresh, as a container's).

The server holds one connection to the socket per running VM, opened by the first session and kept until
QEMU ends it (QEMU's socket chardev takes one client at a time); the output fans out to every attached
session, and a session's input goes to the serial port. A serial port has no window size: resizes are
ignored. The log is the file QEMU writes (append mode), so clearing it is a truncation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from stapes.api.errors import InternalError
from stapes.server.instances.console import CLIENT_BACKLOG, LOG_LIMIT, ConsoleProvider, ConsoleSession
from stapes.server.instances.driver import InstanceSpec
from stapes.server.instances.qemu_machine import CONSOLE_LOG, CONSOLE_SOCKET

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5.0


class SerialConsole:
    """One connection to a VM's serial console socket, shared by the sessions attached to it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.sessions: set[asyncio.Queue[bytes | None]] = set()
        self.closed = False
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while data := await self._reader.read(65536):
                for queue in list(self.sessions):
                    if queue.qsize() * 65536 > CLIENT_BACKLOG:
                        self.sessions.discard(queue)
                        queue.put_nowait(None)  # a session that stopped reading is detached
                    else:
                        queue.put_nowait(data)
        except (ConnectionError, OSError):
            pass
        finally:
            self._end()

    def _end(self) -> None:
        self.closed = True
        for queue in self.sessions:
            queue.put_nowait(None)
        self.sessions.clear()
        self._writer.close()

    def resize(self, width: int, height: int) -> None:
        """A serial port has no window size."""

    def attach(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        if self.closed:
            queue.put_nowait(None)
        else:
            self.sessions.add(queue)
        return queue

    def detach(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.sessions.discard(queue)

    async def write(self, data: bytes) -> None:
        if self.closed:
            return
        with contextlib.suppress(ConnectionError, OSError):
            self._writer.write(data)
            await self._writer.drain()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if not self.closed:
            self._end()


def _read_tail(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - LOG_LIMIT))
            return handle.read(LOG_LIMIT)
    except FileNotFoundError:
        return b""


def truncate(path: Path) -> None:
    """Empties the log (a new run starts it afresh, as a container's does; DELETE .../console). QEMU appends to
    it, so it goes on writing at the new end."""
    _truncate(path)


def _truncate(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)


def trim_log(path: Path, limit: int = LOG_LIMIT) -> None:
    """Before a start: the log keeps only the last `limit` bytes of earlier runs (QEMU appends to it)."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > limit:
            data = _read_tail(path)
            temporary = path.with_name(f".{path.name}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            temporary.replace(path)


class SerialConsoles(ConsoleProvider):
    """The consoles of one server's VMs; `runtime_dir` says where a VM's sockets are."""

    def __init__(self, runtime_dir: Callable[[InstanceSpec], Path]) -> None:
        self._runtime_dir = runtime_dir
        self._open: dict[str, SerialConsole] = {}
        self._lock = asyncio.Lock()

    async def session(self, spec: InstanceSpec) -> ConsoleSession | None:
        async with self._lock:
            console = self._open.get(spec.runtime_name)
            if console is not None and not console.closed:
                return console
            path = self._runtime_dir(spec) / CONSOLE_SOCKET
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as err:
                raise InternalError(f"The console of {spec.name!r} could not be reached ({path}: "
                                    f"{getattr(err, 'strerror', None) or err or 'no answer'})") from None
            console = SerialConsole(reader, writer)
            self._open[spec.runtime_name] = console
            return console

    async def log(self, spec: InstanceSpec) -> bytes:
        return await asyncio.to_thread(_read_tail, self._runtime_dir(spec) / CONSOLE_LOG)

    async def clear(self, spec: InstanceSpec) -> None:
        await asyncio.to_thread(_truncate, self._runtime_dir(spec) / CONSOLE_LOG)

    async def close(self, spec: InstanceSpec) -> None:
        console = self._open.pop(spec.runtime_name, None)
        if console is not None:
            await console.close()

    async def close_all(self) -> None:
        for name in list(self._open):
            console = self._open.pop(name)
            await console.close()
