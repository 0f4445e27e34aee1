"""The byte streams below storage and migration: a migration websocket seen the same way from both ends
(aiohttp server or client side), and the helpers that pump a tool's output onto it or its content into a
tool (spawn, pump, finish, kill).

Framing, as Incus: binary messages carry data; an empty text message (a "barrier") ends one stream, so
several streams can follow each other on one socket; control messages are one protobuf per binary message.

Every message in either direction counts as activity: `idle_timeout()` abandons a migration whose peer
went silent (alive on TCP, or not) instead of keeping an incomplete instance forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from stapes.api.errors import InternalError, StapesError
from stapes.server import process
from stapes.server.progress import Progress

MAX_MESSAGE = 16 << 20  # one websocket message; senders use 1 MiB at most (Incus far less)
# A migration closes its sockets only once everything was said; waiting long for the peer's close frame
# serves nothing (an Incus peer sends none until its own operation ends).
CLOSE_TIMEOUT = 0.5
def _seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from the environment; anything else stops the daemon at start with a
    message naming the variable (not a traceback, and not a silently different timeout)."""
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 10**6:
        raise SystemExit(f"stapesd: {name}={text!r} is not a number of seconds: unset it, or give one such as 120")
    return value


IDLE_TIMEOUT = _seconds_from_env("STAPES_MIGRATION_IDLE_TIMEOUT", 120.0)


class ChannelClosed(StapesError):
    """The other side went away in the middle of a migration."""


class PeerIdle(StapesError):
    """Nothing arrived from, and nothing could be sent to, the other side for too long."""


class Channel:
    def __init__(self, name: str, ws: Any) -> None:
        self.name = name
        self.ws = ws
        self.on_activity: Callable[[], None] = lambda: None

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as err:
            raise ChannelClosed(f"The {self.name} connection was lost while sending: {err}") from None
        self.on_activity()

    async def barrier(self) -> None:
        try:
            await self.ws.send_str("")
        except (ConnectionError, RuntimeError) as err:
            raise ChannelClosed(f"The {self.name} connection was lost: {err}") from None
        self.on_activity()

    async def receive(self) -> bytes | None:
        """The next binary message; None at a barrier. Raises ChannelClosed if the socket closes."""
        msg = await self.ws.receive()
        self.on_activity()
        if msg.type == aiohttp.WSMsgType.BINARY:
            return bytes(msg.data)
        if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "":
            return None
        if msg.type == aiohttp.WSMsgType.TEXT:
            return str(msg.data).encode()
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise ChannelClosed(f"The {self.name} connection failed: {msg.data}")
        raise ChannelClosed(f"The {self.name} connection closed before the migration finished")

    async def stream(self) -> AsyncIterator[bytes]:
        """Binary messages up to the next barrier."""
        while (data := await self.receive()) is not None:
            yield data

    async def close(self) -> None:
        """Bounded, and quiet: closing a broken socket is not worth an error of its own. After a cancelled
        send, aiohttp keeps the cancelled drain waiter and raises CancelledError from close(): that one is
        not ours to propagate, unless our own task is being cancelled."""
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:  # noqa: S110 - see above
            pass


@contextlib.asynccontextmanager
async def idle_timeout(channels: Iterable[Channel], seconds: float, peer: str) -> AsyncIterator[None]:
    """Raise PeerIdle when no message moved on any of the channels for `seconds`."""
    loop = asyncio.get_running_loop()
    channels = list(channels)
    deadline = asyncio.timeout_at(loop.time() + seconds)
    try:
        async with deadline:
            def active() -> None:
                deadline.reschedule(loop.time() + seconds)

            for channel in channels:
                channel.on_activity = active
            yield
    except TimeoutError:
        if not deadline.expired():
            raise
        raise PeerIdle(f"The {peer} stopped responding: nothing moved on the migration connections for "
                       f"{seconds:.0f}s, so the migration was abandoned") from None
    finally:
        for channel in channels:
            channel.on_activity = lambda: None


CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031


async def spawn_tool(argv: list[str], **kwargs: Any) -> Tool:
    """Pipes of 1 MiB instead of 64 KiB: a quarter of the wake-ups and system calls per byte moved. A process
    group of its own: rsync forks (its receiver writes files from a second process), and a transfer that is
    abandoned must stop writing before its files are removed."""
    proc = await process.spawn(argv, start_new_session=True, **kwargs)
    for stream in (proc.stdin, proc.stdout):
        transport = getattr(stream, "transport", None) or getattr(stream, "_transport", None)
        pipe = transport.get_extra_info("pipe") if transport is not None else None
        if pipe is not None:
            # A fast tool may already have written everything and the pipe be closed: nothing to tune then.
            with contextlib.suppress(OSError, ValueError):
                fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
    return Tool(proc, Stderr(proc) if proc.stderr is not None else None)


async def stdout_to_channel(stream: asyncio.StreamReader, channel: Channel, progress: Progress | None) -> None:
    while chunk := await stream.read(CHUNK):
        await channel.send(chunk)
        if progress is not None:
            progress.advance(len(chunk))
    await channel.barrier()


Admit = Callable[[int], Awaitable[None]]  # raises when a receiver may not write that many more bytes


async def channel_to_stdin(channel: Channel, stdin: asyncio.StreamWriter, progress: Progress | None,
                           admit: Admit | None = None) -> None:
    """`admit` is awaited with each message's size before it is written (storage/bound.py)."""
    try:
        async for chunk in channel.stream():
            if admit is not None:
                await admit(len(chunk))
            stdin.write(chunk)
            await stdin.drain()
            if progress is not None:
                progress.advance(len(chunk))
    finally:
        with contextlib.suppress(Exception):
            stdin.close()


async def channel_to_socket(channel: Channel, writer: asyncio.StreamWriter, *,
                            before_end: Callable[[], Awaitable[None]] | None = None) -> None:
    """Messages up to the next barrier written to a socket, whose sending half is then closed; `before_end`
    runs first (shielded) once the stream has ended, however it ended."""
    try:
        async for chunk in channel.stream():
            writer.write(chunk)
            await writer.drain()
    finally:
        if before_end is not None:
            await asyncio.shield(before_end())
        with contextlib.suppress(Exception):
            writer.write_eof()


async def tool_to_channel(argv: list[str], channel: Channel, progress: Progress | None, what: str) -> None:
    """A tool's output sent as one stream; the tool is killed and reaped whatever happens."""
    proc = await spawn_tool(argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                            stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        await stdout_to_channel(proc.stdout, channel, progress)
        await finish(proc, what)
    finally:
        await kill(proc)


async def channel_to_tool(argv: list[str], channel: Channel, progress: Progress | None, what: str,
                          admit: Admit | None = None) -> None:
    """One stream fed to a tool's input; the tool is killed and reaped whatever happens."""
    proc = await spawn_tool(argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                            stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdin is not None
        await channel_to_stdin(channel, proc.stdin, progress, admit)
        await finish(proc, what)
    finally:
        await kill(proc)


STDERR_KEEP = 64 * 1024


class Stderr:
    """A tool's stderr, drained while it runs (a chatty tool must never block on a full pipe while we wait
    for its stdout), keeping the last STDERR_KEEP bytes for the error message."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._tail = bytearray()
        self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while chunk := await self._stream.read(65536):
            self._tail += chunk
            del self._tail[:-STDERR_KEEP]

    async def text(self) -> str:
        with contextlib.suppress(Exception):
            await self._task
        return self._tail.decode(errors="replace")

    def cancel(self) -> None:
        self._task.cancel()


@dataclass
class Tool:
    """A tool spawned for a transfer, with its stderr drained while it runs."""

    proc: asyncio.subprocess.Process
    stderr: Stderr | None

    @property
    def stdin(self) -> asyncio.StreamWriter | None:
        return self.proc.stdin

    @property
    def stdout(self) -> asyncio.StreamReader | None:
        return self.proc.stdout


async def finish(tool: Tool, what: str) -> None:
    err = await tool.stderr.text() if tool.stderr is not None else ""
    code = await tool.proc.wait()
    process.forget(tool.proc)
    if code != 0:
        raise InternalError(f"{what} failed: {root_cause(err) or f'exit status {code}'}")


_GENERIC = ("Exiting with failure status", "Error is not recoverable", "error in rsync protocol data stream",
            "rsync error:", "connection unexpectedly closed")


def root_cause(stderr: str) -> str:
    """The first line that says what went wrong, not the tool's closing summary (pure: unit-tested)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if not any(generic in line for generic in _GENERIC):
            return line
    return lines[-1] if lines else ""


async def kill(tool: Tool) -> None:
    if tool.proc.returncode is None:  # not reaped yet, so the group id is still the tool's own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(tool.proc.pid, signal.SIGKILL)
        await tool.proc.wait()
    if tool.stderr is not None:
        tool.stderr.cancel()
    process.forget(tool.proc)


async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: Channel, *,
                 before_peer_end: Callable[[], Awaitable[None]] | None = None) -> None:
    """A local stream socket (one end of a socketpair) carried over a migration channel, both ways; each
    direction ends with a barrier.
    `before_peer_end` runs when the far side has ended, before our socket is told."""

    try:
        await asyncio.gather(stdout_to_channel(reader, channel, None),
                             channel_to_socket(channel, writer, before_end=before_peer_end))
    except BaseException:
        drop(writer)
        raise
    writer.close()  # what is still buffered goes out first


def drop(writer: asyncio.StreamWriter) -> None:
    """The socket's transport off the event loop at once, its buffer discarded. A `close()` keeps it watched
    until the buffer drained (forever, if the peer reads no more); a raw close of its socket then frees the
    number while the loop still watches it, and the next pipe or socket opened on that number breaks."""
    writer.transport.abort()

