"""One `exec`: the process in the container joined to the operation's websockets (Incus's framing).

Non-interactive: channel "0" carries stdin (binary messages; a close ends it), "1" and "2" carry stdout and
stderr (closed at EOF). Interactive: a pty, with "0" carrying both directions. "control" takes JSON
messages: {"command": "signal", "signal": N} and {"command": "window-resize", "args": {"width", "height"}}.
The operation ends with metadata {"return": exit status}.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import struct
import termios
from typing import Any

from aiohttp import WSMsgType, web

from stapes.api.errors import InternalError
from stapes.server.instances.driver import ExecRequest, InstanceDriver, InstanceSpec
from stapes.server.operations import Operation
from stapes.server.process import forget

CONNECT_TIMEOUT = 30.0
MAX_CONTROL_MESSAGE = 64 * 1024  # a signal or a window size: anything larger on the control socket is ignored


async def run_exec(op: Operation, driver: InstanceDriver, spec: InstanceSpec, request: ExecRequest,
                   width: int, height: int) -> dict[str, Any]:
    names = ["0"] if request.interactive else ["0", "1", "2"]
    try:
        sockets = {name: await op.channel(name, CONNECT_TIMEOUT) for name in names}
    except TimeoutError:
        missing = [name for name in names if not op.channel_attached(name)]
        raise InternalError(f"The client did not open the exec websocket(s) {', '.join(missing)} within "
                            f"{CONNECT_TIMEOUT:.0f}s; open every websocket named in the operation's 'fds'") from None
    try:
        if request.interactive:
            code = await _run_interactive(op, driver, spec, request, sockets, width, height)
        else:
            code = await _run_pipes(op, driver, spec, request, sockets)
    finally:
        if op.channel_attached("control"):
            sockets["control"] = await op.channel("control")
        for ws in sockets.values():
            with contextlib.suppress(Exception):
                await ws.close()
        for name in [*names, "control"]:
            op.release(name)
    return {"return": code}


async def _run_pipes(op: Operation, driver: InstanceDriver, spec: InstanceSpec, request: ExecRequest,
                     sockets: dict[str, web.WebSocketResponse]) -> int:
    pipe = asyncio.subprocess.PIPE
    proc = await driver.exec(spec, request, (pipe, pipe, pipe))
    assert proc.stdin and proc.stdout and proc.stderr
    stdin_task = asyncio.create_task(_ws_to_stdin(sockets["0"], proc.stdin))
    control_task = asyncio.create_task(_control(op, proc, None))
    try:
        await asyncio.gather(_stream_to_ws(proc.stdout, sockets["1"]), _stream_to_ws(proc.stderr, sockets["2"]))
        return await proc.wait()
    finally:
        forget(proc)
        for task in (stdin_task, control_task):
            task.cancel()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _ws_to_stdin(ws: web.WebSocketResponse, stdin: asyncio.StreamWriter) -> None:
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


async def _stream_to_ws(stream: asyncio.StreamReader, ws: web.WebSocketResponse) -> None:
    while chunk := await stream.read(65536):
        with contextlib.suppress(ConnectionError):
            await ws.send_bytes(chunk)
    with contextlib.suppress(Exception):
        await ws.close()


async def _control(op: Operation, proc: asyncio.subprocess.Process, master: int | None) -> None:
    """The control socket is optional (as in Incus: pylxd never opens it); signals and resizes arrive on it
    once a client does."""
    ws = await op.channel("control")
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
        with contextlib.suppress(ProcessLookupError, ValueError, TypeError, AttributeError, struct.error):
            if command.get("command") == "signal":
                proc.send_signal(int(command.get("signal", 15)))
            elif command.get("command") == "window-resize" and master is not None:
                args = command.get("args") or {}
                _resize(master, int(args.get("width", 80)), int(args.get("height", 24)))


def _resize(fd: int, width: int, height: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


async def _run_interactive(op: Operation, driver: InstanceDriver, spec: InstanceSpec, request: ExecRequest,
                           sockets: dict[str, web.WebSocketResponse], width: int, height: int) -> int:
    master, slave = pty.openpty()
    _resize(master, width, height)
    try:
        proc = await driver.exec(spec, request, (slave, slave, slave))
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    loop = asyncio.get_running_loop()
    output: asyncio.Queue[bytes] = asyncio.Queue()
    loop.add_reader(master, _read_pty, master, output)
    ws = sockets["0"]
    control_task = asyncio.create_task(_control(op, proc, master))
    input_task = asyncio.create_task(_ws_to_pty(ws, master))
    try:
        wait_task = asyncio.create_task(proc.wait())
        while True:
            get = asyncio.create_task(output.get())
            done, _ = await asyncio.wait({get, wait_task}, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                chunk = get.result()
                if not chunk:
                    break
                with contextlib.suppress(ConnectionError):
                    await ws.send_bytes(chunk)
            else:
                get.cancel()
                break
        code = await wait_task
        while not output.empty():
            chunk = output.get_nowait()
            if chunk:
                with contextlib.suppress(ConnectionError):
                    await ws.send_bytes(chunk)
        return code
    finally:
        forget(proc)
        loop.remove_reader(master)
        os.close(master)
        control_task.cancel()
        input_task.cancel()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _read_pty(master: int, output: asyncio.Queue[bytes]) -> None:
    try:
        data = os.read(master, 65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    output.put_nowait(data)


async def _ws_to_pty(ws: web.WebSocketResponse, master: int) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            data = msg.data
        elif msg.type == WSMsgType.TEXT and msg.data:
            data = msg.data.encode()
        else:
            break
        while data:
            try:
                written = os.write(master, data)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            except OSError:
                return
            data = data[written:]
