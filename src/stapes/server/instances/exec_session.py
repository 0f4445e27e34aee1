"""One `exec`: the process in the container joined to the operation's websockets (Incus's framing).

Non-interactive: channel "0" carries stdin (binary messages; a close ends it), "1" and "2" carry stdout and
stderr (closed at EOF). Interactive: a pty, with "0" carrying both directions; the end of the output is an
empty text message (Incus's barrier: its client stops reading there), then the socket closes. "control" takes
JSON messages: {"command": "signal", "signal": N} and {"command": "window-resize", "args": {"width",
"height"}} (numbers or strings, as Incus's client sends them). The operation ends with metadata {"return":
exit status}, once the websockets are closed; a command that could not be executed (as the driver reports
it) fails the operation with Incus's words ("Command not found") and still carries the status (127).
Output is read only as fast as the client takes it. An interactive client that closes "0" has hung up: the
command gets SIGHUP, then a kill. Once the command exited, its output is relayed only briefly (a background
process that inherited it never holds the operation open).

Two kinds of driver: one whose exec spawns a host tool (LXC's lxc-attach) gets pipes, or for `-t` the slave of
a host pty this module reads the master of; one that carries the command's terminal itself (a VM's guest agent:
`exec_host_pty` False on the driver) returns an `ExecProcess`, whose stdout is the terminal with `-t`, and which
resizes the guest's pty itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import pty
import signal
import struct
import termios
import tty
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from aiohttp import WSMessage, WSMsgType, web

from stapes.api.errors import BadRequest, InternalError
from stapes.server.instances.driver import ExecRequest, InstanceDriver, InstanceSpec
from stapes.server.operations import Operation
from stapes.server.process import forget

CONNECT_TIMEOUT = 30.0
MAX_CONTROL_MESSAGE = 64 * 1024  # a signal or a window size: anything larger on the control socket is ignored
MAX_WINDOW = 10000  # columns or rows, as the exec request's width and height
OUTPUT_GRACE = 0.5  # after the command exits: how long its output may stay quiet before it is over
DRAIN_LIMIT = 3.0  # after the command exits: the longest its output is still relayed (a background process
# that inherited stdout may keep it open, or keep writing, forever)
TERMINAL_SETUP = 2.0  # how long input waits for lxc-attach to set its terminal up (it flushes what came before)
HANGUP_GRACE = 2.0  # after a hang-up (the client closed "0"): how long the command has to end before a kill
PTY_QUEUE = 16  # pty reads (up to 64 KiB each) waiting for the websocket; reading pauses while it is full
SIGNALS = frozenset(signal.valid_signals()) - {0}
EXIT_DEADLINE = 10.0  # a carried command (a VM's): how long its exit status may keep away once it was killed or
# its output ended; then the session is closed and the status reported as 137 (the guest may never send it)

log = logging.getLogger(__name__)


class _Input(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


class _Output(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class _Signalled(Protocol):
    """What signals and ends a command: asyncio's Process, or an ExecProcess."""

    @property
    def returncode(self) -> int | None: ...
    def send_signal(self, signum: int) -> None: ...
    def kill(self) -> None: ...


class ExecProcess(_Signalled, Protocol):
    """What exec returns for a driver that carries the command's terminal itself (`exec_host_pty` False; QEMU's
    guest agent: vm_agent.GuestProcess). With a terminal, `stdout` is its output and `stdin` its input, and
    `stderr` is None."""

    @property
    def stdin(self) -> _Input: ...
    @property
    def stdout(self) -> _Output: ...
    @property
    def stderr(self) -> _Output | None: ...
    @property
    def failure(self) -> str | None:
        """Why the command never ran ("Command not found"), once it is over; None when it ran."""
    async def wait(self) -> int: ...
    def resize(self, width: int, height: int) -> None: ...
    def close(self) -> None:
        """The session is over here: what is left of the command is killed, its resources go."""


class _Head:
    """The first output of a command, held back while it reads as the driver's own report that the command
    could not be executed (then it is dropped and the operation fails with a clear error instead). Only output
    that starts as such a report waits, up to its first line."""

    LIMIT = 4096

    def __init__(self, driver: InstanceDriver) -> None:
        self.driver = driver
        self.first = b""
        self.held = b""
        self.deciding = True

    def take(self, chunk: bytes) -> bytes:
        """What to send now: `chunk`, after what was held of the first output once that turned out ordinary."""
        if not self.deciding:
            held, self.held = self.held, b""
            return held + chunk
        self.held += chunk
        self.first = self.held
        text = self.held.lstrip(b"\r\n")
        prefix = self.driver.exec_failure_prefix
        if not prefix or not text.startswith(prefix[:len(text)]):
            return self._decided(False)
        if b"\n" in text or len(self.held) > self.LIMIT:
            return self._decided(any(self.driver.exec_failure(self.held, code) for code in (126, 127)))
        return b""

    def _decided(self, report: bool) -> bytes:
        self.deciding = False
        if report:
            return b""  # kept until the exit status says whether it is dropped
        held, self.held = self.held, b""
        return held

    def finish(self, code: int) -> bytes:
        """At the end, with the exit status: what is left to send (nothing when it was the driver's report)."""
        held, self.held = self.held, b""
        return b"" if self.failure(code) else held

    def failure(self, code: int) -> str | None:
        return self.driver.exec_failure(self.first, code)


async def run_exec(op: Operation, driver: InstanceDriver, spec: InstanceSpec, request: ExecRequest,
                   width: int, height: int) -> dict[str, Any]:
    names = ["0"] if request.interactive else ["0", "1", "2"]
    try:
        sockets = {name: await op.channel(name, CONNECT_TIMEOUT) for name in names}
    except TimeoutError:
        missing = [name for name in names if not op.channel_attached(name)]
        raise InternalError(f"The client did not open the exec websocket(s) {', '.join(missing)} within "
                            f"{CONNECT_TIMEOUT:.0f}s; open every websocket named in the operation's 'fds'") from None
    head = _Head(driver)
    failure: str | None = None
    try:
        if not getattr(driver, "exec_host_pty", True):
            code, failure = await _run_carried(op, driver, spec, request, sockets, width, height)
        elif request.interactive:
            code = await _run_interactive(op, driver, spec, request, sockets, width, height, head)
        else:
            code = await _run_pipes(op, driver, spec, request, sockets, head)
    finally:
        if op.channel_attached("control"):
            sockets["control"] = await op.channel("control")
        for ws in sockets.values():
            with contextlib.suppress(Exception):
                await ws.close()
        for name in [*names, "control"]:
            op.release(name)
    if (failure := failure or head.failure(code)) is not None:
        op.metadata["return"] = code
        raise BadRequest(failure)
    return {"return": code}


async def _run_pipes(op: Operation, driver: InstanceDriver, spec: InstanceSpec, request: ExecRequest,
                     sockets: dict[str, web.WebSocketResponse], head: _Head) -> int:
    pipe = asyncio.subprocess.PIPE
    proc = await driver.exec(spec, request, (pipe, pipe, pipe))
    assert isinstance(proc, asyncio.subprocess.Process)
    assert proc.stdin and proc.stdout and proc.stderr
    stdin_task = asyncio.create_task(_ws_to_stdin(sockets["0"], proc.stdin))
    control_task = asyncio.create_task(_control(op, proc, None))
    wait_task = asyncio.create_task(_exit_status(proc))
    try:
        await asyncio.gather(_stream_to_ws(proc.stdout, sockets["1"], wait_task),
                             _stream_to_ws(proc.stderr, sockets["2"], wait_task, head))
        return await wait_task
    finally:
        forget(proc)
        for task in (stdin_task, control_task, wait_task):
            task.cancel()
        # What a background process still holds of the pipes: their other ends go now (it gets EPIPE).
        for stream in (proc.stdout, proc.stderr):
            with contextlib.suppress(Exception):
                stream._transport.close()  # type: ignore[attr-defined]
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _exit_status(proc: asyncio.subprocess.Process) -> int:
    """The command's status as soon as it exits: Process.wait (before Python 3.12) also waits for its pipes to
    close, which a background process that inherited them may never do."""
    while proc.returncode is None:  # noqa: ASYNC110 (nothing else tells of the exit alone)
        await asyncio.sleep(0.1)
    return proc.returncode


async def _ws_to_stdin(ws: web.WebSocketResponse, stdin: _Input) -> None:
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                stdin.write(msg.data)
                await stdin.drain()
            elif msg.type == WSMsgType.TEXT:
                if not msg.data:
                    break
                stdin.write(msg.data.encode())
                await stdin.drain()
            else:
                break
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        with contextlib.suppress(Exception):
            stdin.close()


async def _stream_to_ws(stream: _Output, ws: web.WebSocketResponse, exited: asyncio.Task[int],
                        head: _Head | None = None) -> None:
    """Until EOF; once the command exited, only while its output keeps coming (each read within OUTPUT_GRACE)
    and for DRAIN_LIMIT at most: a background process that inherited the pipe never holds the session open."""
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    while True:
        read = asyncio.ensure_future(stream.read(65536))
        if not exited.done():
            await asyncio.wait({read, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not read.done():
            if deadline is None:
                deadline = loop.time() + DRAIN_LIMIT
            await asyncio.wait({read}, timeout=max(0.0, min(OUTPUT_GRACE, deadline - loop.time())))
        if not read.done():
            read.cancel()
            break
        if not (chunk := read.result()):
            break
        if exited.done() and deadline is None:
            deadline = loop.time() + DRAIN_LIMIT
        if head is not None:
            chunk = head.take(chunk)
        if chunk:
            with contextlib.suppress(ConnectionError):
                await ws.send_bytes(chunk)
        if deadline is not None and loop.time() >= deadline:
            break
    if head is not None and (rest := head.finish(await exited)):
        with contextlib.suppress(ConnectionError):
            await ws.send_bytes(rest)
    with contextlib.suppress(Exception):
        await ws.close()


async def _control(op: Operation, proc: _Signalled, resize: Callable[[int, int], None] | None) -> None:
    """The control socket is optional (as in Incus: pylxd never opens it); signals and resizes (`resize`: of the
    command's terminal, width and height) arrive on it once a client does."""
    ws = await op.channel("control")
    try:
        await _control_messages(ws, proc, resize)
    finally:
        # As Incus does: a client that closes the control socket (or vanishes) while the command runs ends it.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


async def _control_messages(ws: web.WebSocketResponse, proc: _Signalled,
                            resize: Callable[[int, int], None] | None) -> None:
    async for msg in ws:
        if msg.type != WSMsgType.TEXT or len(msg.data) > MAX_CONTROL_MESSAGE:
            continue
        try:
            command = json.loads(msg.data)
        except (json.JSONDecodeError, RecursionError):
            continue
        if not isinstance(command, dict):
            continue
        # A malformed command (a list for a number, a size out of range) is ignored, as unparsable text is.
        with contextlib.suppress(ProcessLookupError, ValueError, TypeError, AttributeError, OverflowError):
            if command.get("command") == "signal":
                signum = int(command.get("signal", 15))
                if signum in SIGNALS:
                    proc.send_signal(signum)
            elif command.get("command") == "window-resize" and resize is not None:
                args = command.get("args") or {}
                width, height = window_size(args.get("width")), window_size(args.get("height"))
                if width and height:
                    resize(width, height)


def window_size(value: object) -> int | None:
    """A width or height from a control message: a whole number (Incus's client sends strings) in range."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 0 < number <= MAX_WINDOW else None


def _resize(fd: int, width: int, height: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


async def _run_interactive(op: Operation, driver: InstanceDriver, spec: InstanceSpec, request: ExecRequest,
                           sockets: dict[str, web.WebSocketResponse], width: int, height: int, head: _Head) -> int:
    master, slave = pty.openpty()
    # Only a transport: the line discipline the command sees is the one of its own pty in the container
    # (lxc-attach's), so this one passes bytes through untouched, both ways.
    tty.setraw(slave)
    mode = termios.tcgetattr(slave)
    mode[1] &= ~termios.ONLCR  # what lxc-attach sets back when it exits: no translation
    termios.tcsetattr(slave, termios.TCSANOW, mode)
    _resize(master, width, height)
    probe = _Probe(os.dup(slave))
    try:
        proc = await driver.exec(spec, request, (slave, slave, slave))
        assert isinstance(proc, asyncio.subprocess.Process)
    except BaseException:
        probe.close()
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    reader = _PtyReader(master)
    ws = sockets["0"]
    control_task = asyncio.create_task(_control(op, proc, lambda width, height: _resize(master, width, height)))
    wait_task = asyncio.create_task(proc.wait())
    input_task = asyncio.create_task(_ws_to_pty(ws, master, _terminal_taken(probe, wait_task)))

    async def send(chunk: bytes) -> None:
        if chunk:
            with contextlib.suppress(ConnectionError):
                await ws.send_bytes(chunk)

    try:
        reader.resume()
        hung_up = False
        while not wait_task.done():
            if input_task.done():  # the client closed "0" (or vanished): its terminal hung up
                hung_up = True
                await _hang_up(proc, wait_task)
                break
            get = asyncio.create_task(reader.get())
            await asyncio.wait({get, wait_task, input_task}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                continue
            if not (chunk := get.result()):  # the pty's end: the command goes too, or the client hangs up
                await asyncio.wait({wait_task, input_task}, return_when=asyncio.FIRST_COMPLETED)
                continue
            await send(head.take(chunk))
        code = await wait_task
        # The command is gone; what it wrote last may still be on its way through the pty: read until the pty
        # reports its end (EIO) or stays quiet for a moment (and for DRAIN_LIMIT at most: a background process
        # may hold the pty open and keep writing).
        deadline = asyncio.get_running_loop().time() + DRAIN_LIMIT
        with contextlib.suppress(TimeoutError):
            while not hung_up and asyncio.get_running_loop().time() < deadline and (
                    chunk := await asyncio.wait_for(reader.get(), OUTPUT_GRACE)):
                await send(head.take(chunk))
        await send(head.finish(code))
        with contextlib.suppress(ConnectionError):
            await ws.send_str("")  # the barrier: the output is over
        return code
    finally:
        forget(proc)
        reader.stop()
        probe.close()
        os.close(master)
        control_task.cancel()
        input_task.cancel()
        wait_task.cancel()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _run_carried(op: Operation, driver: InstanceDriver, spec: InstanceSpec, request: ExecRequest,
                       sockets: dict[str, web.WebSocketResponse], width: int, height: int) -> tuple[int, str | None]:
    """A driver that carries the command's stdio or terminal itself (a VM's guest agent): its streams to the
    websockets as for pipes; with a terminal, "0" both ways, a hang-up when the client closes it, and the
    barrier at the end. Returns the exit status and why the command never ran (None: it ran)."""
    pipe = asyncio.subprocess.PIPE
    proc = cast(ExecProcess, await driver.exec(spec, request, (pipe, pipe, pipe)))
    tasks: list[asyncio.Task[Any]] = []
    try:
        if request.interactive:
            proc.resize(width, height)
        watched = _Watched(proc)
        tasks.append(asyncio.create_task(_control(op, watched, proc.resize if request.interactive else None)))
        wait_task = asyncio.create_task(_carried_status(proc, watched.ending))
        tasks.append(wait_task)
        if not request.interactive:
            assert proc.stderr is not None
            tasks.append(asyncio.create_task(_ws_to_stdin(sockets["0"], proc.stdin)))
            await asyncio.gather(_stream_to_ws(proc.stdout, sockets["1"], wait_task),
                                 _stream_to_ws(proc.stderr, sockets["2"], wait_task))
            watched.ending.set()  # both outputs ended: the exit status is due
            return await wait_task, proc.failure
        ws = sockets["0"]
        input_task = asyncio.create_task(_ws_to_terminal(ws, proc.stdin))
        tasks.append(input_task)

        async def send(chunk: bytes) -> None:
            if chunk:
                with contextlib.suppress(ConnectionError):
                    await ws.send_bytes(chunk)

        hung_up = False
        while not wait_task.done():
            if input_task.done():  # the client closed "0" (or vanished): its terminal hung up
                hung_up = True
                await _hang_up(watched, wait_task)
                break
            read = asyncio.create_task(proc.stdout.read(65536))
            await asyncio.wait({read, wait_task, input_task}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                read.cancel()
                continue
            if not (chunk := read.result()):  # the terminal's end: the command goes too
                watched.ending.set()
                await asyncio.wait({wait_task, input_task}, return_when=asyncio.FIRST_COMPLETED)
                continue
            await send(chunk)
        code = await wait_task
        # What the command wrote last (the agent sends it before the exit status), then what a background
        # process still writes: while it keeps coming, for DRAIN_LIMIT at most.
        deadline = asyncio.get_running_loop().time() + DRAIN_LIMIT
        with contextlib.suppress(TimeoutError):
            while not hung_up and asyncio.get_running_loop().time() < deadline and (
                    chunk := await asyncio.wait_for(proc.stdout.read(65536), OUTPUT_GRACE)):
                await send(chunk)
        with contextlib.suppress(ConnectionError):
            await ws.send_str("")  # the barrier: the output is over
        return code, proc.failure
    finally:
        for task in tasks:
            task.cancel()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.close()


class _Watched:
    """A carried command as the control socket and a hang-up signal it: a kill sets `ending` (its exit
    status is due)."""

    def __init__(self, proc: ExecProcess) -> None:
        self.proc = proc
        self.ending = asyncio.Event()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def send_signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            self.ending.set()
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.ending.set()
        self.proc.kill()


async def _carried_status(proc: ExecProcess, ending: asyncio.Event) -> int:
    """The command's exit status; once `ending` is set (killed, or its output over), within EXIT_DEADLINE, else
    the session is closed and the status is 137: a guest that never says the command exited holds nothing."""
    wait = asyncio.ensure_future(proc.wait())
    end = asyncio.ensure_future(ending.wait())
    try:
        await asyncio.wait({wait, end}, return_when=asyncio.FIRST_COMPLETED)
        if not wait.done():
            await asyncio.wait({wait}, timeout=EXIT_DEADLINE)
        if wait.done():
            return wait.result()
        log.warning("exec: the guest sent no exit status within %.0f s of the command's end (killed, or its output "
                    "closed): session closed, status reported as 137", EXIT_DEADLINE)
        proc.close()
        return 137
    finally:
        wait.cancel()
        end.cancel()


def _typed(msg: WSMessage) -> bytes | None:
    """What a terminal's input message carries (text frames as UTF-8); None once the client closed it."""
    if msg.type == WSMsgType.BINARY:
        return bytes(msg.data)
    if msg.type == WSMsgType.TEXT:
        return str(msg.data).encode()
    return None


async def _ws_to_terminal(ws: web.WebSocketResponse, stdin: _Input) -> None:
    """Typed input to a carried terminal, until the client closes "0" (or its connection fails)."""
    with contextlib.suppress(ConnectionError, BrokenPipeError):
        async for msg in ws:
            if (data := _typed(msg)) is None:
                break
            if data:
                stdin.write(data)
                await stdin.drain()


async def _hang_up(proc: _Signalled, exited: asyncio.Task[int]) -> None:
    """As a terminal's hang-up: SIGHUP first, a kill if the command is still there after HANGUP_GRACE."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGHUP)
    await asyncio.wait({exited}, timeout=HANGUP_GRACE)
    if not exited.done():
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.wait({exited})


class _Translation:
    """lxc-attach turns output translation (OPOST + ONLCR: a \r before each \n) on for its terminal before it
    relays anything, not knowing its output already went through the container's pty, and sets the old mode
    back when it exits: every line would end in \r\r\n. The first read that finds it on turns it off; until
    then (and then once more) what is read was translated, and is translated back."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.off = False

    def read_translated(self) -> bool:
        """Before a read: whether what waits in the pty went through the translation."""
        with contextlib.suppress(termios.error, OSError):
            mode = termios.tcgetattr(self.master)  # a master's settings are its slave's
            if mode[1] & termios.OPOST and mode[1] & termios.ONLCR:
                mode[1] &= ~termios.ONLCR
                termios.tcsetattr(self.master, termios.TCSANOW, mode)
                self.off = True
                return True
        return not self.off


class _PtyReader:
    """The pty's output, read as it comes but never far ahead of the websocket: at most PTY_QUEUE reads wait
    to be sent; while they do, the pty is not read (the command blocks on its full pty, as on a slow terminal)."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.translation = _Translation(master)
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=PTY_QUEUE)
        self.loop = asyncio.get_running_loop()
        self.reading = False
        self.ended = False

    def resume(self) -> None:
        if not self.reading and not self.ended and not self.queue.full():
            self.loop.add_reader(self.master, self._read)
            self.reading = True

    def stop(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.master)
            self.reading = False

    async def get(self) -> bytes:
        chunk = await self.queue.get()
        self.resume()
        return chunk

    def _read(self) -> None:
        translated = self.translation.read_translated()
        try:
            data = os.read(self.master, 65536)
            if translated:
                data = data.replace(b"\r\n", b"\n")  # ONLCR's exact inverse: each \n got one \r before it
        except BlockingIOError:
            return
        except OSError:  # EIO: nothing holds the pty's other end any more
            self.ended = True
            data = b""
        self.queue.put_nowait(data)
        if self.ended or self.queue.full():
            self.stop()


class _Probe:
    """A descriptor of our pty's slave, kept only until the command's terminal is set up: an open slave would
    keep the pty from reporting its end."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


async def _terminal_taken(probe: _Probe, exited: asyncio.Task[int]) -> None:
    """lxc-attach sets its own terminal mode on ours with TCSAFLUSH, which drops input written before: input
    waits until it has (OPOST on again: ours starts with it off), or the command ended, for TERMINAL_SETUP at
    most (a driver whose tool leaves the terminal alone)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TERMINAL_SETUP
    try:
        while probe.fd is not None and loop.time() < deadline and not exited.done():
            try:
                if termios.tcgetattr(probe.fd)[1] & termios.OPOST:
                    return
            except termios.error:
                return
            await asyncio.sleep(0.005)
    finally:
        probe.close()


async def _ws_to_pty(ws: web.WebSocketResponse, master: int, ready: Awaitable[None]) -> None:
    """Typed input, once the command's terminal is set up, until the client closes "0" (or its connection
    fails): then it is gone."""
    await ready
    async for msg in ws:
        if (data := _typed(msg)) is None:
            break
        while data:
            try:
                written = os.write(master, data)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            except OSError:  # the pty's other end is gone (the command with it): the input is dropped
                break
            data = data[written:]
