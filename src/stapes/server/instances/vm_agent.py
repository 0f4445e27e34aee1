"""The host side of Stapes's guest agent (agent/stapes-agent.c): commands run inside a virtual machine.

QEMU serves the agent's virtio-serial port (name `org.stapes.agent`) as a unix socket, `<runtime>/agent.sock`,
a chardev server taking one client at a time: the daemon keeps one connection per VM (`AgentConnection`) and
multiplexes every exec of that VM over it; a dropped connection (QEMU stopped, the daemon restarted) is made
again at the next use.

Protocol: frames both ways, integers big-endian, `type u8 | session u32 | length u32 | payload`. Session 0 is
the connection itself; the host picks the other ids, one per command or INFO request.

Host -> agent
    HELLO 0x01      (session 0) "STAPES01": a new host connection; the agent kills the sessions of an earlier
                    one (a daemon that restarted) and answers WELCOME
    OPEN 0x02       flags u8 (1: tty), uid u32, gid u32, rows u16, cols u16, argc u16, envc u16, then cwd, argv and
                    "K=V" strings, each NUL-terminated -> STARTED or FAILED
    STDIN 0x03      data; at most WINDOW bytes unacknowledged (STDIN-ACK) per session
    STDIN_EOF 0x04  close stdin once written (ignored with a tty)
    RESIZE 0x05     rows u16, cols u16 (the guest's TIOCSWINSZ: SIGWINCH to the pty's foreground)
    SIGNAL 0x06     signal u32
    ACK 0x07        bytes u32 of output the host consumed (the agent stops reading a session WINDOW bytes ahead)
    CLOSE 0x08      the host is done with the session: the agent kills what is left of it
    INFO 0x09       -> INFO-REPLY
Agent -> host
    READY 0x80      (session 0) the agent opened its port (it started, or the guest rebooted): the host's sessions
                    on this connection are gone; the host says HELLO again
    WELCOME 0x81    (session 0) the answer to HELLO, "stapes-agent N"
    STARTED 0x82    pid u32
    OUTPUT 0x83 / ERROR_OUTPUT 0x84   stdout (the tty with one) / stderr
    OUTPUT_EOF 0x85 stream u8 (1 or 2)
    EXIT 0x86       status u32 (exit status, or 128 + signal), after the output there at the exit
    FAILED 0x87     code u32 (127 not found, 126 not executable, 1 other), message; the session is over
    STDIN_ACK 0x88  bytes u32 written to the command's stdin
    INFO_REPLY 0x89 lines "link NAME MAC up|down MTU" and "addr NAME inet|inet6 ADDRESS PREFIX SCOPE"

Why a Stapes agent rather than Debian's qemu-guest-agent: docs/vm.md ("The guest agent").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from stapes.api.errors import BadRequest, Unavailable
from stapes.server.instances.driver import ExecRequest

log = logging.getLogger(__name__)

HEADER = struct.Struct(">BII")
HELLO_MAGIC = b"STAPES01"
MAX_PAYLOAD = 256 * 1024  # the agent refuses larger frames
CHUNK = 32 * 1024  # stdin frames
WINDOW = 256 * 1024  # unacknowledged bytes per session and direction (the agent's figure too)
AGENT_TIMEOUT = 5.0  # how long a connection waits for the agent's WELCOME before "not running"
START_TIMEOUT = 15.0  # OPEN -> STARTED or FAILED (a fork and exec in a slow TCG guest)
INFO_TIMEOUT = 1.0  # guest_addresses: `list` must never wait long for a VM
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_WINDOW = 0xFFFF
EXEC_FAILURE_PREFIX = b"stapes-agent: "
_EXEC_FAILURES = {127: "Command not found", 126: "Command not executable"}


class Frame(IntEnum):
    HELLO = 0x01
    OPEN = 0x02
    STDIN = 0x03
    STDIN_EOF = 0x04
    RESIZE = 0x05
    SIGNAL = 0x06
    ACK = 0x07
    CLOSE = 0x08
    INFO = 0x09
    READY = 0x80
    WELCOME = 0x81
    STARTED = 0x82
    OUTPUT = 0x83
    ERROR_OUTPUT = 0x84
    OUTPUT_EOF = 0x85
    EXIT = 0x86
    FAILED = 0x87
    STDIN_ACK = 0x88
    INFO_REPLY = 0x89


class ProtocolError(Exception):
    """The byte stream is not the agent's protocol (a frame too large): the connection is dropped."""


class AgentNotRunning(Unavailable):
    """The VM's agent did not answer: the guest is still booting, or its image has no Stapes agent."""


def encode(kind: int, session: int, payload: bytes = b"") -> bytes:
    """One frame (pure: unit-tested)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a frame's payload is at most {MAX_PAYLOAD} bytes, not {len(payload)}")
    return HEADER.pack(kind, session, len(payload)) + payload


class FrameDecoder:
    """Frames from a byte stream that comes in pieces of any size (pure: unit-tested)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            kind, session, length = HEADER.unpack_from(self._buffer)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"the agent sent a frame of {length} bytes (at most {MAX_PAYLOAD})")
            if len(self._buffer) < HEADER.size + length:
                break
            frames.append((kind, session, bytes(self._buffer[HEADER.size:HEADER.size + length])))
            del self._buffer[:HEADER.size + length]
        return frames


def hello_frame() -> bytes:
    return encode(Frame.HELLO, 0, HELLO_MAGIC)


def guest_environment(request: ExecRequest) -> dict[str, str]:
    """Incus's defaults under what the request asks for (the driver adds the instance's environment.* keys
    to the request before)."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root" if request.user == 0 else "/", "LANG": "C.UTF-8"}
    if request.interactive:
        env["TERM"] = "xterm"
    env.update(request.environment)
    return env


def encode_open(request: ExecRequest, rows: int, cols: int) -> bytes:
    """OPEN's payload (pure: unit-tested). Refuses what the agent could not carry: NULs inside strings, more
    than 65535 arguments or variables, more than a frame's size."""
    env = guest_environment(request)
    strings = [request.cwd, *request.command, *(f"{key}={value}" for key, value in env.items())]
    if not request.command or not request.command[0]:
        raise BadRequest("The command to run is empty")
    if any("\0" in text for text in strings):
        raise BadRequest("The command, its environment and working directory cannot hold NUL characters")
    if any(not key or "=" in key for key in env):
        raise BadRequest(f"Invalid environment variable name in {sorted(env)!r}")
    if len(request.command) > 0xFFFF or len(env) > 0xFFFF:
        raise BadRequest("Too many arguments or environment variables for the guest agent")
    for value, what in ((request.user, "user"), (request.group, "group")):
        if not 0 <= value <= 0xFFFFFFFF:
            raise BadRequest(f"The {what} id {value} is out of range")
    head = struct.pack(">BIIHHHH", 1 if request.interactive else 0, request.user, request.group,
                       min(max(rows, 0), MAX_WINDOW), min(max(cols, 0), MAX_WINDOW), len(request.command), len(env))
    payload = head + b"".join(text.encode() + b"\0" for text in strings)
    if len(payload) > MAX_PAYLOAD:
        raise BadRequest(f"The command and its environment are larger than the guest agent takes ({MAX_PAYLOAD} "
                         "bytes)")
    return payload


def parse_info(text: str) -> dict[str, dict[str, Any]]:
    """INFO-REPLY as Incus's instance state `network` (pure: unit-tested): per interface its addresses, MAC,
    MTU and state; the host fills `host_name` (the tap) and counters if it knows them."""
    network: dict[str, dict[str, Any]] = {}

    def interface(name: str) -> dict[str, Any]:
        return network.setdefault(name, {
            "addresses": [], "counters": {"bytes_received": 0, "bytes_sent": 0, "packets_received": 0,
                                          "packets_sent": 0},
            "hwaddr": "", "host_name": "", "mtu": 0, "state": "down", "type": "broadcast",
        })

    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[0] == "link":
            entry = interface(fields[1])
            entry["hwaddr"] = "" if fields[2] == "00:00:00:00:00:00" else fields[2]
            entry["state"] = "up" if fields[3] == "up" else "down"
            entry["mtu"] = int(fields[4]) if fields[4].isdigit() else 0
            if fields[1] == "lo":
                entry["type"] = "loopback"
        elif len(fields) == 6 and fields[0] == "addr" and fields[2] in ("inet", "inet6"):
            interface(fields[1])["addresses"].append(
                {"family": fields[2], "address": fields[3], "netmask": fields[4], "scope": fields[5]})
    return network


def exec_failure(head: bytes, code: int) -> str | None:
    """Incus's words for a command the agent could not execute (for a driver's exec_failure: the GuestProcess
    reports it as `failure` already; this reads it back from output that starts with the agent's report)."""
    if code in _EXEC_FAILURES and head.lstrip(b"\r\n").startswith(EXEC_FAILURE_PREFIX):
        return _EXEC_FAILURES[code]
    return None


class GuestStream:
    """A command's output (stdout, stderr, or its terminal) as the agent sends it: `read` as
    asyncio.StreamReader's; what is read is acknowledged to the agent, which reads on in the guest only
    WINDOW bytes ahead of the consumer."""

    def __init__(self, acknowledge: Callable[[int], None]) -> None:
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._ready = asyncio.Event()
        self._acknowledge = acknowledge

    def feed_data(self, data: bytes) -> None:
        if data and not self._eof:
            self._chunks.append(data)
            self._ready.set()

    def feed_eof(self) -> None:
        self._eof = True
        self._ready.set()

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def read(self, n: int = -1) -> bytes:
        while not self._chunks and not self._eof:
            self._ready.clear()
            await self._ready.wait()
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        if 0 < n < len(chunk):
            chunk, rest = chunk[:n], chunk[n:]
            self._chunks.appendleft(rest)
        self._acknowledge(len(chunk))
        return chunk


class GuestStdin:
    """The command's stdin: write, drain, close as asyncio.StreamWriter's; at most WINDOW bytes travel
    unacknowledged, the rest waits here and `drain` waits for it."""

    def __init__(self, send: Callable[[int, bytes], None]) -> None:
        self._send = send
        self._pending = bytearray()
        self._unacked = 0
        self._closing = False
        self._closed = False
        self._gone = False
        self._flushed = asyncio.Event()
        self._flushed.set()

    def write(self, data: bytes) -> None:
        if self._closing or self._gone:  # as a closed transport's: dropped (drain says the pipe is broken)
            return
        self._pending += data
        self._pump()

    async def drain(self) -> None:
        await self._flushed.wait()
        if self._gone:
            raise BrokenPipeError("the command's stdin is closed")

    def close(self) -> None:
        self._closing = True
        self._pump()

    def is_closing(self) -> bool:
        return self._closing

    def acknowledged(self, count: int) -> None:
        self._unacked = max(0, self._unacked - count)
        self._pump()

    def gone(self) -> None:
        """The session ended: nothing more is written."""
        self._gone = True
        self._pending.clear()
        self._flushed.set()

    def _pump(self) -> None:
        while self._pending and self._unacked < WINDOW and not self._gone:
            size = min(CHUNK, WINDOW - self._unacked, len(self._pending))
            chunk = bytes(self._pending[:size])
            del self._pending[:size]
            self._unacked += size
            self._send(Frame.STDIN, chunk)
        if self._pending:
            self._flushed.clear()
        else:
            self._flushed.set()
            if self._closing and not self._closed and not self._gone:
                self._closed = True
                self._send(Frame.STDIN_EOF, b"")


class GuestProcess:
    """One command in the guest, with the subset of asyncio.subprocess.Process that exec_session drives
    (exec_session.ExecProcess): `stdin`, `stdout` (the terminal with a tty) and `stderr` (None with a tty),
    `pid`, `returncode`, `wait`, `send_signal`, `kill`, plus `resize` (the guest's pty), `failure` (why the
    command never ran, in Incus's words) and `close` (the host is done: the agent kills what is left)."""

    def __init__(self, connection: AgentConnection, session: int, interactive: bool, window: tuple[int, int]
                 ) -> None:
        self._connection = connection
        self.session = session
        self.interactive = interactive
        self.pid = -1
        self.returncode: int | None = None
        self.failure: str | None = None
        self.started = asyncio.get_running_loop().create_future()
        self._exited = asyncio.Event()
        self._window = window
        self._closed = False
        self.stdin = GuestStdin(self._send)
        self.stdout = GuestStream(self._acknowledge)
        self.stderr: GuestStream | None = None if interactive else GuestStream(self._acknowledge)

    def _send(self, kind: int, payload: bytes) -> None:
        if not self._closed:
            self._connection.send(kind, self.session, payload)

    def _acknowledge(self, count: int) -> None:
        if count:
            self._send(Frame.ACK, struct.pack(">I", count))

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(f"the command in the guest (session {self.session}) has exited")
        self._send(Frame.SIGNAL, struct.pack(">I", int(signum)))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def resize(self, width: int, height: int) -> None:
        if not self.interactive or (width, height) == self._window or not (0 < width <= MAX_WINDOW
                                                                            and 0 < height <= MAX_WINDOW):
            return
        self._window = (width, height)
        self._send(Frame.RESIZE, struct.pack(">HH", height, width))

    def close(self) -> None:
        """The host is done with the command (it may still run: the agent then kills its process group)."""
        if not self._closed:
            self._send(Frame.CLOSE, b"")
            self._closed = True
            self._connection.forget(self.session)
            self._finish(self.returncode if self.returncode is not None else 137, None)

    # From the connection
    def frame(self, kind: int, payload: bytes) -> None:
        if kind == Frame.STARTED and len(payload) >= 4:
            self.pid = struct.unpack_from(">I", payload)[0]
            if not self.started.done():
                self.started.set_result(None)
        elif kind == Frame.OUTPUT:
            self.stdout.feed_data(payload)
        elif kind == Frame.ERROR_OUTPUT and self.stderr is not None:
            self.stderr.feed_data(payload)
        elif kind == Frame.OUTPUT_EOF and payload:
            stream = self.stdout if payload[0] == 1 else self.stderr
            if stream is not None:
                stream.feed_eof()
        elif kind == Frame.STDIN_ACK and len(payload) >= 4:
            self.stdin.acknowledged(struct.unpack_from(">I", payload)[0])
        elif kind == Frame.EXIT and len(payload) >= 4:
            self._finish(struct.unpack_from(">I", payload)[0], None, streams=False)
        elif kind == Frame.FAILED and len(payload) >= 4:
            code = struct.unpack_from(">I", payload)[0]
            message = payload[4:].decode(errors="replace")
            self._finish(code, _EXEC_FAILURES.get(code) or f"The guest agent could not run the command: {message}")
            self._connection.forget(self.session)

    def lost(self, why: str) -> None:
        """The connection to the agent ended (the VM stopped, its agent restarted) before the command did."""
        self._finish(self.returncode if self.returncode is not None else 1,
                     None if self.returncode is not None else why)

    def _finish(self, code: int, failure: str | None, streams: bool = True) -> None:
        if self.returncode is None:
            self.returncode = code
            self.failure = failure
        self._exited.set()
        if not self.started.done():
            self.started.set_result(None)
        if streams:
            self.stdout.feed_eof()
            if self.stderr is not None:
                self.stderr.feed_eof()
            self.stdin.gone()


@dataclass
class _InfoRequest:
    reply: asyncio.Future[bytes]


class AgentConnection:
    """The daemon's one connection to a VM's agent socket; every exec of the VM goes over it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._welcome = asyncio.Event()
        self._connect_lock = asyncio.Lock()
        self._sessions: dict[int, GuestProcess] = {}
        self._infos: dict[int, _InfoRequest] = {}
        self._ids = itertools.count(1)
        self.version = ""

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def ready(self, timeout: float) -> None:
        """Connected, and the agent said WELCOME, within `timeout`; AgentNotRunning otherwise."""
        async with self._connect_lock:
            if not self.connected:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), timeout)
                except (OSError, TimeoutError) as err:
                    raise AgentNotRunning(f"The VM's agent socket cannot be reached ({err}): is the VM running?"
                                          ) from None
                self._writer = writer
                self._welcome.clear()
                self._reader_task = asyncio.create_task(self._read(reader, writer))
                writer.write(hello_frame())
        try:
            await asyncio.wait_for(self._welcome.wait(), timeout)
        except TimeoutError:
            raise AgentNotRunning(
                f"The VM's agent is not running (no answer within {timeout:.0f} s): the VM may still be booting "
                "(try again in a moment), or its image has no Stapes agent (agent/stapes-agent.c)") from None

    def send(self, kind: int, session: int, payload: bytes = b"") -> None:
        if self.connected:
            assert self._writer is not None
            self._writer.write(encode(kind, session, payload))

    async def drain(self) -> None:
        if self.connected:
            assert self._writer is not None
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()

    def forget(self, session: int) -> None:
        self._sessions.pop(session, None)

    async def open(self, request: ExecRequest, window: tuple[int, int]) -> GuestProcess:
        session = next(self._ids)
        process = GuestProcess(self, session, request.interactive, window)
        payload = encode_open(request, window[1], window[0])
        self._sessions[session] = process
        self.send(Frame.OPEN, session, payload)
        try:
            await self.drain()
            await asyncio.wait_for(asyncio.shield(process.started), START_TIMEOUT)
        except BaseException:
            process.close()
            raise
        return process

    async def info(self, timeout: float) -> bytes:
        request = next(self._ids)
        pending = _InfoRequest(asyncio.get_running_loop().create_future())
        self._infos[request] = pending
        try:
            self.send(Frame.INFO, request)
            return await asyncio.wait_for(pending.reply, timeout)
        finally:
            self._infos.pop(request, None)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        why = "The connection to the VM's agent was lost (the VM stopped or rebooted)"
        try:
            while chunk := await reader.read(65536):
                for kind, session, payload in decoder.feed(chunk):
                    self._dispatch(kind, session, payload)
        except ProtocolError as err:
            log.warning("agent %s: %s: reconnecting", self.path, err)
            why = f"The VM's agent broke its protocol ({err})"
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            if self._writer is writer or self._writer is None:  # not a newer connection's sessions
                self._writer = None
                self._welcome.clear()
                self._fail_all(why)

    def _dispatch(self, kind: int, session: int, payload: bytes) -> None:
        if session == 0:
            if kind == Frame.WELCOME:
                self.version = payload.decode(errors="replace")
                self._welcome.set()
            elif kind == Frame.READY:
                # The agent (re)started: nothing of ours runs there any more. Greet it again.
                self._fail_all("The VM's agent restarted (the guest rebooted?) while the command ran")
                self.send(Frame.HELLO, 0, HELLO_MAGIC)
            return
        if kind == Frame.INFO_REPLY:
            pending = self._infos.pop(session, None)
            if pending is not None and not pending.reply.done():
                pending.reply.set_result(payload)
            return
        process = self._sessions.get(session)
        if process is not None:
            process.frame(kind, payload)

    def _fail_all(self, why: str) -> None:
        sessions, self._sessions = self._sessions, {}
        for process in sessions.values():
            process.lost(why)


_connections: dict[Path, AgentConnection] = {}


def connection(agent_socket: Path) -> AgentConnection:
    """The daemon's connection to this agent socket (made at its first use, and again after it dropped)."""
    conn = _connections.get(agent_socket)
    if conn is None:
        conn = _connections[agent_socket] = AgentConnection(agent_socket)
    return conn


def disconnect(agent_socket: Path) -> None:
    """The VM stopped (or is deleted): drop the connection and what ran over it."""
    conn = _connections.pop(agent_socket, None)
    if conn is not None:
        conn.close()


async def exec_in_guest(agent_socket: Path, request: ExecRequest, stdio: tuple[Any, Any, Any] | None = None,
                        window: tuple[int, int] | None = None) -> GuestProcess:
    """Start `request` in the VM whose agent listens on `agent_socket`. `stdio` is ignored (the agent carries
    stdin/stdout/stderr, or the terminal, itself); `window` (width, height): the terminal's size, else the
    request's width and height if it has them, else 80x24. A command that could not be executed is returned
    finished, its `failure` saying why; an agent that does not answer raises AgentNotRunning."""
    if window is None:
        window = (getattr(request, "width", 0) or 80, getattr(request, "height", 0) or 24)
    conn = connection(agent_socket)
    await conn.ready(AGENT_TIMEOUT)
    try:
        return await conn.open(request, window)
    except TimeoutError:
        raise AgentNotRunning(f"The VM's agent did not start the command within {START_TIMEOUT:.0f} s") from None


async def guest_addresses(agent_socket: Path, timeout: float = INFO_TIMEOUT) -> dict[str, dict[str, Any]]:
    """The guest's interfaces and addresses in Incus's `network` state shape; {} when the agent does not answer
    within `timeout` (a VM still booting: `list` never waits longer)."""
    conn = connection(agent_socket)
    try:
        await conn.ready(timeout)
        return parse_info((await conn.info(timeout)).decode(errors="replace"))
    except (AgentNotRunning, TimeoutError):
        return {}
