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

Root inside the guest controls the agent's end of the port: nothing it sends is trusted. Output beyond the
window (WINDOW + one frame unacknowledged), an acknowledgement of more stdin than was sent, or a flood of frames
that serve nothing (for sessions that do not exist, READY after READY: more than USELESS_PER_SECOND) are a
broken protocol: the connection is dropped and its sessions fail with that reason (logged once). A guest that
does not read what the host writes (more than WRITE_BUFFER_LIMIT waiting, plus a window per session) is dropped
too. INFO-REPLY is validated field by field (names, MACs, addresses, prefixes, scopes; at most MAX_INTERFACES
x MAX_ADDRESSES), FAILED's message is cut to MAX_MESSAGE bytes without control characters; a VM whose agent
did not answer an INFO is not asked again for SILENT_FOR seconds (`list` never waits on it twice).

Why a Stapes agent rather than Debian's qemu-guest-agent: docs/vm.md ("The guest agent").
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import re
import signal
import struct
import time
import unicodedata
from collections import deque
from collections.abc import Awaitable, Callable
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
WRITE_BUFFER_LIMIT = 1 << 20  # bytes waiting for the agent to read (plus WINDOW per session) before it is dropped
USELESS_PER_SECOND = 2048  # frames that serve nothing (unknown sessions, repeated READY) before the agent is dropped
HELLO_RETRY = 1.0  # a READY while a HELLO is outstanding: the HELLO is said again at most this often
SILENT_FOR = 30.0  # an agent that did not answer INFO is not asked again for this long
MAX_MESSAGE = 512  # bytes of FAILED's message kept
MAX_INTERFACES = 64
MAX_ADDRESSES = 64  # per interface
_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_ADDRESS = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_SCOPES = frozenset({"global", "link", "local"})
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
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
    """The byte stream is not the agent's protocol (a frame too large, output beyond its window, stdin
    acknowledged that was never sent, a flood of useless frames): the connection is dropped."""


def printable(text: str, keep_newlines: bool = False) -> str:
    """`text` without control characters (C0, DEL, C1; bidirectional overrides), tabs as spaces; newlines
    kept only if asked (pure: unit-tested)."""
    return "".join(
        " " if char == "\t" else char for char in text
        if (char == "\n" and keep_newlines) or char == "\t"
        or not (unicodedata.category(char) == "Cc" or char in _BIDI))


class AgentNotRunning(Unavailable):
    """The VM's agent did not answer: the guest is still booting, or its image has no Stapes agent."""


class AgentSilent(AgentNotRunning):
    """The agent's socket is there, yet nothing answered its HELLO in time."""


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
        buffer, offset = self._buffer, 0
        while len(buffer) - offset >= HEADER.size:
            kind, session, length = HEADER.unpack_from(buffer, offset)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"the agent sent a frame of {length} bytes (at most {MAX_PAYLOAD})")
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            frames.append((kind, session, bytes(buffer[offset + HEADER.size:end])))
            offset = end
        del buffer[:offset]
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
    MTU and state; the host fills `host_name` (the tap) and counters if it knows them. The guest's word is
    checked field by field (a line with anything out of shape is dropped), and at most MAX_INTERFACES
    interfaces with MAX_ADDRESSES addresses each are kept: what reaches an admin's terminal is only names,
    MACs and addresses."""
    network: dict[str, dict[str, Any]] = {}

    def interface(name: str) -> dict[str, Any] | None:
        if name not in network and len(network) >= MAX_INTERFACES:
            return None
        return network.setdefault(name, {
            "addresses": [], "counters": {"bytes_received": 0, "bytes_sent": 0, "packets_received": 0,
                                          "packets_sent": 0},
            "hwaddr": "", "host_name": "", "mtu": 0, "state": "down", "type": "broadcast",
        })

    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not _NAME.fullmatch(fields[1]):
            continue
        if len(fields) == 5 and fields[0] == "link":
            mac, state, mtu = fields[2:]
            if not _MAC.fullmatch(mac) or state not in ("up", "down") or not (mtu.isascii() and mtu.isdigit()
                                                                              and len(mtu) <= 10):
                continue
            entry = interface(fields[1])
            if entry is None:
                continue
            entry["hwaddr"] = "" if mac == "00:00:00:00:00:00" else mac.lower()
            entry["state"] = state
            entry["mtu"] = min(int(mtu), 0xFFFFFFFF)
            if fields[1] == "lo":
                entry["type"] = "loopback"
        elif len(fields) == 6 and fields[0] == "addr":
            address = _address(*fields[2:])
            if address is None:
                continue
            entry = interface(fields[1])
            if entry is not None and len(entry["addresses"]) < MAX_ADDRESSES:
                entry["addresses"].append(address)
    return network


def _address(family: str, text: str, prefix: str, scope: str) -> dict[str, str] | None:
    """One "addr" line's fields, checked: None if any is out of shape."""
    version = {"inet": 4, "inet6": 6}.get(family)
    if version is None or scope not in _SCOPES or not _ADDRESS.fullmatch(text):
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version != version or not (prefix.isascii() and prefix.isdigit() and len(prefix) <= 3
                                          and int(prefix) <= address.max_prefixlen):
        return None
    return {"family": family, "address": str(address), "netmask": str(int(prefix)), "scope": scope}


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

    @property
    def ended(self) -> bool:
        """The end was fed (there may be output left to read)."""
        return self._eof

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
    unacknowledged, the rest waits here and `drain` waits for it, then for the connection's own buffer
    (`drain_connection`: what was handed to the transport has gone towards the guest)."""

    def __init__(self, send: Callable[[int, bytes], None],
                 drain_connection: Callable[[], Awaitable[None]] | None = None) -> None:
        self._send = send
        self._drain_connection = drain_connection
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
        if self._drain_connection is not None and not self._gone:
            await self._drain_connection()
        if self._gone:
            raise BrokenPipeError("the command's stdin is closed")

    def close(self) -> None:
        self._closing = True
        self._pump()

    def is_closing(self) -> bool:
        return self._closing

    def acknowledged(self, count: int) -> None:
        """The agent wrote `count` bytes of what was sent: more than is unacknowledged is a broken protocol."""
        if count > self._unacked:
            raise ProtocolError(f"the agent acknowledged {count} bytes of stdin, of {self._unacked} sent")
        self._unacked -= count
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
        self._outstanding = 0  # output received and not yet acknowledged (read by the consumer)
        self.stdin = GuestStdin(self._send, connection.drain)
        self.stdout = GuestStream(self._acknowledge)
        self.stderr: GuestStream | None = None if interactive else GuestStream(self._acknowledge)

    def _send(self, kind: int, payload: bytes) -> None:
        if not self._closed:
            self._connection.send(kind, self.session, payload)

    def _acknowledge(self, count: int) -> None:
        if count:
            self._outstanding -= count
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
    def frame(self, kind: int, payload: bytes) -> bool:
        """One frame of this session: whether it served anything (the connection counts those that did not).
        ProtocolError when the agent broke its side: output beyond the window (the agent reads a session's
        output only WINDOW bytes ahead of the acknowledgements, so more than a frame beyond that is a guest that
        ignores flow control: nothing of it is kept), stdin acknowledged that was never sent."""
        if kind in (Frame.OUTPUT, Frame.ERROR_OUTPUT):
            if not payload:
                return False
            self._outstanding += len(payload)
            if self._outstanding > WINDOW + MAX_PAYLOAD:
                raise ProtocolError(f"the agent sent {self._outstanding} bytes of output unacknowledged (its "
                                    f"window is {WINDOW})")
            stream = self.stdout if kind == Frame.OUTPUT else self.stderr
            if stream is None:
                return False
            stream.feed_data(payload)
        elif kind == Frame.STARTED and len(payload) >= 4 and not self.started.done():
            self.pid = struct.unpack_from(">I", payload)[0]
            self.started.set_result(None)
        elif kind == Frame.OUTPUT_EOF and payload[:1] in (b"\x01", b"\x02"):
            stream = self.stdout if payload[0] == 1 else self.stderr
            if stream is None or stream.ended:
                return False
            stream.feed_eof()
        elif kind == Frame.STDIN_ACK and len(payload) >= 4 and payload[:4] != b"\0\0\0\0":
            self.stdin.acknowledged(struct.unpack_from(">I", payload)[0])
        elif kind == Frame.EXIT and len(payload) >= 4 and self.returncode is None:
            self._finish(struct.unpack_from(">I", payload)[0], None, streams=False)
        elif kind == Frame.FAILED and len(payload) >= 4:
            code = struct.unpack_from(">I", payload)[0]
            message = printable(payload[4:4 + MAX_MESSAGE].decode(errors="replace")).strip()
            self._finish(code, _EXEC_FAILURES.get(code) or f"The guest agent could not run the command: {message}")
            self._connection.forget(self.session)
        else:
            return False
        return True

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
    """The daemon's one connection to a VM's agent socket; every exec of the VM goes over it. Nothing the
    agent sends is trusted (the module's docstring): a broken protocol, a flood of useless frames or an agent
    that does not read drop the connection, and its sessions fail saying why."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._welcome = asyncio.Event()
        self._connect_lock = asyncio.Lock()
        self._sessions: dict[int, GuestProcess] = {}
        self._infos: dict[int, _InfoRequest] = {}
        self._ids = itertools.count(1)
        self._hello_at: float | None = None  # when the outstanding HELLO (no WELCOME yet) was sent
        self._hello_retry: asyncio.TimerHandle | None = None
        self._useless = 0  # frames that served nothing in the current second
        self._useless_since = 0.0
        self._silent_until = 0.0  # guest_addresses: the agent did not answer; not asked again before this
        self.version = ""

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def silent(self) -> bool:
        """The agent did not answer an INFO lately (SILENT_FOR): `list` does not wait on it again."""
        return time.monotonic() < self._silent_until

    def mark_silent(self) -> None:
        self._silent_until = time.monotonic() + SILENT_FOR

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
                self._useless, self._useless_since = 0, time.monotonic()
                self._reader_task = asyncio.create_task(self._read(reader, writer))
                self._hello()
        try:
            await asyncio.wait_for(self._welcome.wait(), timeout)
        except TimeoutError:
            raise AgentSilent(
                f"The VM's agent is not running (no answer within {timeout:.0f} s): the VM may still be booting "
                "(try again in a moment), or its image has no Stapes agent (agent/stapes-agent.c)") from None

    def send(self, kind: int, session: int, payload: bytes = b"") -> None:
        """One frame to the agent. An agent that does not read (more than WRITE_BUFFER_LIMIT waiting, plus
        each session's stdin window) is dropped: its sessions fail."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        writer.write(encode(kind, session, payload))
        waiting = writer.transport.get_write_buffer_size()
        if waiting > WRITE_BUFFER_LIMIT + WINDOW * len(self._sessions):
            self._drop(writer, f"The VM's agent does not read what the host sends ({waiting} bytes waiting)",
                       warn=True)

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

    def _hello(self) -> None:
        self._hello_at = asyncio.get_running_loop().time()
        if self._hello_retry is not None:
            self._hello_retry.cancel()
            self._hello_retry = None
        self.send(Frame.HELLO, 0, HELLO_MAGIC)

    def _hello_again(self) -> None:
        self._hello_retry = None
        if self._hello_at is not None and self.connected:
            self._hello()

    def _drop(self, writer: asyncio.StreamWriter, why: str, warn: bool = False) -> None:
        """The end of this connection (`writer`'s): at once, without flushing what the agent did not read;
        its sessions fail with `why` (logged once, when the agent is to blame)."""
        if self._writer is not writer:  # already dropped, or a newer connection's
            writer.transport.abort()
            return
        if warn:
            log.warning("agent %s: %s: connection dropped", self.path, why)
        self._writer = None
        writer.transport.abort()
        self._welcome.clear()
        self._hello_at = None
        if self._hello_retry is not None:
            self._hello_retry.cancel()
            self._hello_retry = None
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
        self._fail_all(why)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        why, warn = "The connection to the VM's agent was lost (the VM stopped or rebooted)", False
        try:
            while self._writer is writer and (chunk := await reader.read(65536)):
                for kind, session, payload in decoder.feed(chunk):
                    self._dispatch(kind, session, payload)
                    if self._writer is not writer:  # dropped by what the frame caused (an agent that does not read)
                        return
                await asyncio.sleep(0)  # at most one read's frames at a time: other clients' work goes on
        except ProtocolError as err:
            why, warn = f"The VM's agent broke its protocol ({err})", True
        except (ConnectionError, OSError):
            pass
        finally:
            self._drop(writer, why, warn)

    def _dispatch(self, kind: int, session: int, payload: bytes) -> None:
        if session == 0:
            if kind == Frame.WELCOME and self._hello_at is not None:
                self.version = printable(payload[:64].decode(errors="replace"))
                self._hello_at = None
                if self._hello_retry is not None:
                    self._hello_retry.cancel()
                    self._hello_retry = None
                self._silent_until = 0.0
                self._welcome.set()
            elif kind == Frame.READY:
                # The agent (re)started: nothing of ours runs there any more. Greet it again: at once if no
                # HELLO is outstanding, else once the outstanding one is HELLO_RETRY old (READY after READY
                # never makes the host write more than that).
                self._fail_all("The VM's agent restarted (the guest rebooted?) while the command ran")
                self._welcome.clear()
                if self._hello_at is None:
                    self._hello()
                else:
                    self._useless_frame()
                    if self._hello_retry is None:
                        loop = asyncio.get_running_loop()
                        self._hello_retry = loop.call_at(self._hello_at + HELLO_RETRY, self._hello_again)
            else:
                self._useless_frame()
            return
        if kind == Frame.INFO_REPLY:
            pending = self._infos.pop(session, None)
            if pending is not None and not pending.reply.done():
                pending.reply.set_result(payload)
            else:
                self._useless_frame()
            return
        process = self._sessions.get(session)
        if process is None or not process.frame(kind, payload):
            self._useless_frame()

    def _useless_frame(self) -> None:
        """A frame that served nothing (a session that is not there, READY after READY, WELCOME unasked):
        a few come late after a session ends; a flood is a guest keeping the daemon busy."""
        now = time.monotonic()
        if now - self._useless_since >= 1.0:
            self._useless, self._useless_since = 0, now
        self._useless += 1
        if self._useless > USELESS_PER_SECOND:
            raise ProtocolError(f"more than {USELESS_PER_SECOND} frames a second that serve nothing")

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
    within `timeout` (a VM still booting: `list` never waits longer), and for SILENT_FOR after that, unless the
    agent says WELCOME meanwhile (a `list` of many such VMs does not wait on each one every time)."""
    conn = connection(agent_socket)
    if conn.silent:
        return {}
    try:
        async with asyncio.timeout(timeout):
            await conn.ready(timeout)
            reply = await conn.info(timeout)
    except TimeoutError:
        conn.mark_silent()
        return {}
    except AgentSilent:  # no WELCOME in time (not a socket that is not there yet: a VM starting)
        conn.mark_silent()
        return {}
    except AgentNotRunning:
        return {}
    return parse_info(reply.decode(errors="replace"))
