"""A VM's console: its serial port, which QEMU serves on `console.sock` in the VM's runtime directory.

The server holds one connection to the socket per running VM (QEMU's socket chardev takes one client at a
time), opened as soon as the VM starts, before its CPUs run (QEMU starts with -S), and again when a restarted
server finds the VM running. The output fans out to every attached session and into `console.log` beside the
socket, which the server writes and bounds itself: it keeps the last LOG_LIMIT bytes at least and 2 *
LOG_LIMIT at most (past that, it is cut back to its last LOG_LIMIT bytes), whatever the guest prints (QEMU's
own `logfile=` would grow without bound: a guest writing /dev/urandom to its serial port filled the host's
disk). Each start of the VM begins the log afresh, as a container's. A session's input goes to the serial
port; a serial port has no window size: resizes are ignored.

Why not QEMU's `-chardev ringbuf` (bounded inside QEMU, read with `ringbuf-read`): a ring buffer is gone with
the QEMU that held it, so a VM that powered off, crashed or was killed leaves no log of its last run, and it
takes no interactive session besides (a second chardev and a hub in front of the serial port). What the guest
prints while the server is down is lost (QEMU drops serial output that no client reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from stapes.api.errors import InternalError
from stapes.server.instances.console import CLIENT_BACKLOG, FLUSH_DELAY, ConsoleProvider, ConsoleSession
from stapes.server.instances.driver import InstanceSpec
from stapes.server.instances.qemu_machine import CONSOLE_LOG, CONSOLE_SOCKET

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5.0
LOG_LIMIT = 1 << 20  # what GET .../console serves at most: the console log keeps between this and twice it


def _open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


class ConsoleLog:
    """console.log, appended to by the server and cut back to its last `limit` bytes whenever it passes twice
    that. Blocking methods: call them in a thread (one at a time: SerialConsole's writer task)."""

    def __init__(self, path: Path, limit: int = LOG_LIMIT) -> None:
        self.path = path
        self.limit = limit
        self._fd = _open_log(path)
        self._size = os.fstat(self._fd).st_size

    def append(self, data: bytes) -> None:
        if self._fd < 0:
            return
        os.write(self._fd, data)
        self._size += len(data)
        if self._size > 2 * self.limit:
            self._trim()

    def _trim(self) -> None:
        tail = _read_tail(self.path, self.limit)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, tail)
        finally:
            os.close(fd)
        temporary.replace(self.path)
        os.close(self._fd)
        self._fd = _open_log(self.path)
        self._size = os.fstat(self._fd).st_size

    def clear(self) -> None:
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)  # O_APPEND: the next write goes to the new end
            self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SerialConsole:
    """The server's connection to a VM's serial console socket: shared by the sessions attached to it, and
    copied into the VM's bounded console log."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log_file: ConsoleLog) -> None:
        self._reader = reader
        self._writer = writer
        self.log = log_file
        self.sessions: set[asyncio.Queue[bytes | None]] = set()
        self.closed = False
        self._pending = bytearray()  # output not yet in the log (at most its limit: older bytes are dropped)
        self._saving = asyncio.Lock()  # one write into the log at a time, in the order the output came
        self._flush: asyncio.Task[None] | None = None
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
                self._pending += data
                if len(self._pending) > self.log.limit:
                    del self._pending[:len(self._pending) - self.log.limit]
                if self._flush is None or self._flush.done():
                    self._flush = asyncio.create_task(self._write_later())
        except (ConnectionError, OSError):
            pass
        finally:
            self._end()
            await self._save()
            async with self._saving:
                await asyncio.to_thread(self.log.close)

    async def _write_later(self) -> None:
        await asyncio.sleep(FLUSH_DELAY)
        await self._save()

    async def _save(self) -> None:
        async with self._saving:
            while self._pending:
                data = bytes(self._pending)
                self._pending.clear()
                try:
                    await asyncio.to_thread(self.log.append, data)
                except OSError as err:
                    log.warning("the console log %s could not be written: %s", self.log.path, err)
                    return

    async def flush(self) -> None:
        """What the console printed so far, in its log (tests, the log's readers)."""
        if self._flush is not None and not self._flush.done():
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush
        await self._save()

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

    async def clear(self) -> None:
        async with self._saving:
            self._pending.clear()
            await asyncio.to_thread(self.log.clear)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._flush is not None:
            self._flush.cancel()
        if not self.closed:
            self._end()
        await self._save()
        async with self._saving:
            await asyncio.to_thread(self.log.close)


def _read_tail(path: Path, limit: int = LOG_LIMIT) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(max(0, size - limit))
        return handle.read(limit)


def truncate(path: Path) -> None:
    """Empties the log (a new run starts it afresh, as a container's does; DELETE .../console)."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)


def trim_log(path: Path, limit: int = LOG_LIMIT) -> None:
    """A log the server appends to across runs (qemu.log) keeps only its last `limit` bytes: before a start."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > limit:
            data = _read_tail(path, limit)
            temporary = path.with_name(f".{path.name}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            temporary.replace(path)


class SerialConsoles(ConsoleProvider):
    """The consoles of one server's VMs; `runtime_dir` says where a VM's sockets are."""

    def __init__(self, runtime_dir: Callable[[InstanceSpec], Path], log_limit: int = LOG_LIMIT) -> None:
        self._runtime_dir = runtime_dir
        self.log_limit = log_limit
        self._open: dict[str, SerialConsole] = {}
        self._lock = asyncio.Lock()

    async def attach(self, spec: InstanceSpec) -> SerialConsole:
        """The server's connection to the running VM's console (made now if it has none): from the VM's start,
        or from the moment a restarted server finds it running."""
        async with self._lock:
            console = self._open.get(spec.runtime_name)
            if console is not None and not console.closed:
                return console
            runtime = self._runtime_dir(spec)
            path = runtime / CONSOLE_SOCKET
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as err:
                raise InternalError(f"The console of {spec.name!r} could not be reached ({path}: "
                                    f"{getattr(err, 'strerror', None) or err or 'no answer'})") from None
            try:
                log_file = await asyncio.to_thread(ConsoleLog, runtime / CONSOLE_LOG, self.log_limit)
            except BaseException:
                writer.close()
                raise
            console = SerialConsole(reader, writer, log_file)
            self._open[spec.runtime_name] = console
            return console

    async def session(self, spec: InstanceSpec) -> ConsoleSession | None:
        return await self.attach(spec)

    async def log(self, spec: InstanceSpec) -> bytes:
        console = self._open.get(spec.runtime_name)
        if console is not None:
            await console.flush()
        return await asyncio.to_thread(_read_tail, self._runtime_dir(spec) / CONSOLE_LOG, self.log_limit)

    async def clear(self, spec: InstanceSpec) -> None:
        console = self._open.get(spec.runtime_name)
        if console is not None and not console.closed:
            await console.clear()
        else:
            await asyncio.to_thread(truncate, self._runtime_dir(spec) / CONSOLE_LOG)

    async def close(self, spec: InstanceSpec) -> None:
        console = self._open.pop(spec.runtime_name, None)
        if console is not None:
            await console.close()

    async def close_all(self) -> None:
        for name in list(self._open):
            console = self._open.pop(name)
            await console.close()
