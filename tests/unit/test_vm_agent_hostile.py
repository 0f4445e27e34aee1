"""A hostile guest agent (root inside the VM controls the port's other end) against the host side: a unix socket
stands in for QEMU's agent.sock, with a fake agent that breaks the protocol the way a hostile review did."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import WSMsgType

from stapes.cli import render
from stapes.cli.listing import parse_columns, rows
from stapes.server.instances import exec_session, vm_agent
from stapes.server.instances.driver import ExecRequest
from stapes.server.instances.service import InstanceService
from stapes.server.instances.vm_agent import Frame, encode

H = struct.Struct(">BII")
Guest = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def frames(reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, int, bytes]]:
    decoder = vm_agent.FrameDecoder()
    while data := await reader.read(65536):
        for frame in decoder.feed(data):
            yield frame


def welcome() -> bytes:
    return encode(Frame.WELCOME, 0, b"stapes-agent 1")


@contextlib.asynccontextmanager
async def fake_agent(tmp_path: Path, guest: Guest) -> AsyncIterator[Path]:
    path = tmp_path / "agent.sock"
    tasks: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await guest(reader, writer)

    server = await asyncio.start_unix_server(serve, str(path))
    try:
        yield path
    finally:
        vm_agent.disconnect(path)
        server.close()
        for task in tasks:
            task.cancel()


def request(*command: str, interactive: bool = False) -> ExecRequest:
    return ExecRequest(command=list(command), environment={}, cwd="/", user=0, group=0, interactive=interactive)


async def started_then(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       then: Callable[[int], Awaitable[None]]) -> None:
    """Answers HELLO and the first OPEN, then does `then(session)`; reads (and drops) what comes after."""
    async for kind, session, _ in frames(reader):
        if kind == Frame.HELLO:
            writer.write(welcome())
        elif kind == Frame.OPEN:
            writer.write(encode(Frame.STARTED, session, struct.pack(">I", 4242)))
            await then(session)


# H2: output beyond the window
async def test_output_beyond_the_window_drops_the_agent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sent = 0

    async def flood(session: int) -> None:
        nonlocal sent
        chunk = encode(Frame.OUTPUT, session, b"A" * vm_agent.MAX_PAYLOAD)
        with contextlib.suppress(ConnectionError):
            while sent < 64 << 20:  # never waits for an ACK
                writer.write(chunk)
                await writer.drain()
                sent += vm_agent.MAX_PAYLOAD

    async def guest(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal writer
        writer = w
        await started_then(reader, w, flood)

    writer: Any = None
    caplog.set_level(logging.WARNING, logger=vm_agent.__name__)
    async with fake_agent(tmp_path, guest) as path:
        proc = await vm_agent.exec_in_guest(path, request("cat"))
        # The consumer never reads stdout: a stalled websocket client.
        assert await asyncio.wait_for(proc.wait(), 10) == 1
        assert proc.failure is not None and "broke its protocol" in proc.failure and "window" in proc.failure
        queued = sum(len(chunk) for chunk in proc.stdout._chunks)
        assert queued <= vm_agent.WINDOW + vm_agent.MAX_PAYLOAD
        assert sent < 16 << 20  # dropped at once, not after the guest sent what it liked
        assert len([r for r in caplog.records if "broke its protocol" in r.getMessage()]) == 1


async def test_output_within_the_window_is_kept() -> None:
    conn: Any = SimpleNamespace(send=lambda *a: None, forget=lambda s: None, drain=None)
    proc = vm_agent.GuestProcess(conn, 1, False, (80, 24))
    for _ in range(vm_agent.WINDOW // 1024):
        assert proc.frame(Frame.OUTPUT, b"x" * 1024)
    assert await proc.stdout.read(10) == b"x" * 10
    proc.frame(Frame.ERROR_OUTPUT, b"e" * (vm_agent.MAX_PAYLOAD + 10))  # within the window + one frame
    with pytest.raises(vm_agent.ProtocolError):
        proc.frame(Frame.OUTPUT, b"x")


# M1: floods
async def test_ready_after_ready_writes_one_hello(tmp_path: Path) -> None:
    host_wrote = bytearray()
    done = asyncio.Event()

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host_wrote.extend(await reader.read(65536))  # the first HELLO
        writer.write(welcome())
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(encode(Frame.READY, 0, b"stapes-agent 1") * 1500)  # within the budget of useless frames
        await writer.drain()
        await asyncio.sleep(0.3)
        done.set()
        with contextlib.suppress(TimeoutError):
            while data := await asyncio.wait_for(reader.read(65536), 0.3):
                host_wrote.extend(data)

    async with fake_agent(tmp_path, guest) as path:
        conn = vm_agent.connection(path)
        await conn.ready(5)
        await done.wait()
        await asyncio.sleep(0.5)
    hellos = host_wrote.count(vm_agent.hello_frame())
    assert 2 <= hellos <= 3  # the first, one for the READYs (maybe one more HELLO_RETRY later): not 1501


async def test_a_flood_of_useless_frames_drops_the_agent(tmp_path: Path) -> None:
    async def flood(session: int) -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(20):
                writer.write(encode(Frame.OUTPUT, session + 1000, b"x") * 1000)  # a session that is not there
                await writer.drain()

    async def guest(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal writer
        writer = w
        await started_then(reader, w, flood)

    writer: Any = None
    async with fake_agent(tmp_path, guest) as path:
        proc = await vm_agent.exec_in_guest(path, request("sleep", "60"))
        assert await asyncio.wait_for(proc.wait(), 10) == 1
        assert proc.failure is not None and "serve nothing" in proc.failure


async def test_an_agent_that_does_not_read_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(welcome())
        await asyncio.sleep(30)  # never reads again

    async with fake_agent(tmp_path, guest) as path:
        conn = vm_agent.connection(path)
        await conn.ready(5)
        sent = 0
        while conn.connected and sent < 40:  # up to 10 MiB of frames, the agent reading none
            conn.send(Frame.RESIZE, 1, b"x" * vm_agent.MAX_PAYLOAD)
            sent += 1
        assert not conn.connected and sent < 20
        assert any("does not read" in r.getMessage() for r in caplog.records)


# L1: INFO-REPLY
def test_info_reply_is_validated() -> None:
    evil = "\x1b]52;c;ZXZpbA==\x1b\\\x1b[2J[blink]10.0.0.5[/blink]"
    text = "\n".join([
        "link eth0 52:54:00:12:34:56 up 1500",
        f"addr eth0 inet {evil} 24 global",
        "addr eth0 inet 10.0.0.5 24 global",
        "addr eth0 inet 10.0.0.6 33 global",  # prefix out of range
        "addr eth0 inet6 10.0.0.7 64 global",  # family mismatch
        "addr eth0 inet6 fe80::1%evil\x1b[2J 64 link",  # a scope id
        "addr eth0 inet6 2001:db8::1 64 host",  # unknown scope
        "addr eth0 inet6 2001:DB8::2 64 global",
        "link \x1b[31mred 52:54:00:12:34:57 up 1500",
        "link eth1 52:54:00:12:34:zz up 1500",
        "link eth2 [blink]x[/blink] up 1500",
        "link a-name-far-too-long 52:54:00:12:34:58 up 1500",
    ])
    network = vm_agent.parse_info(text)
    assert sorted(network) == ["eth0"]
    assert [a["address"] for a in network["eth0"]["addresses"]] == ["10.0.0.5", "2001:db8::2"]
    many = "\n".join(f"link e{n} 52:54:00:00:{n >> 8 & 255:02x}:{n & 255:02x} up 1500" for n in range(13000))
    many += "\n" + "\n".join(f"addr e1 inet 10.0.{n >> 8}.{n & 255} 24 global" for n in range(1000))
    network = vm_agent.parse_info(many)
    assert len(network) == vm_agent.MAX_INTERFACES
    assert len(network["e1"]["addresses"]) == vm_agent.MAX_ADDRESSES


def test_table_cells_are_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    evil = "\x1b]52;c;ZXZpbA==\x07\x1b[2J[blink]10.0.0.5[/blink]\u202e"
    instance = {"name": "v1", "status": "Running", "description": f"desc {evil}",
                "state": {"network": {"eth0": {"type": "broadcast", "addresses": [
                    {"family": "inet", "address": evil, "netmask": "24", "scope": "global"}]}}}}
    cells = rows([instance], parse_columns("n4d"))
    render.table(["NAME", "IPV4", "DESCRIPTION"], cells)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "[blink]10.0.0.5[/blink]" in out  # shown as it is, never read as markup
    render.table(["NAME", "IPV4", "DESCRIPTION"], cells, fmt="csv")
    assert "\x1b" not in capsys.readouterr().out
    assert render.printable("a\tb\nc\x1b[0m\x9b") == "a b\nc[0m"


# L2: list
async def test_render_all_with_state_renders_at_once() -> None:
    active = 0
    most = 0

    async def slow_render(row: Any, *, with_state: bool) -> dict[str, Any]:
        nonlocal active, most
        active += 1
        most = max(most, active)
        await asyncio.sleep(0.2)
        active -= 1
        return {"name": row.name}

    async def instances(project: str | None) -> list[Any]:
        return [SimpleNamespace(name=f"v{n}") for n in range(20)]

    service: Any = SimpleNamespace(_store=SimpleNamespace(instances=instances), render=slow_render)
    start = time.monotonic()
    found = await InstanceService.render_all(service, None, with_state=True)
    assert [f["name"] for f in found] == [f"v{n}" for n in range(20)]
    assert time.monotonic() - start < 2.0 and 1 < most <= 8  # one at a time would take 4 s


async def test_a_silent_agent_is_not_waited_on_again(tmp_path: Path) -> None:
    answer = asyncio.Event()

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for kind, session, _ in frames(reader):
            if kind == Frame.HELLO:
                await answer.wait()  # booting
                writer.write(welcome())
            elif kind == Frame.INFO:
                writer.write(encode(Frame.INFO_REPLY, session, b"addr lo inet 127.0.0.1 8 local\n"))

    async with fake_agent(tmp_path, guest) as path:
        start = time.monotonic()
        assert await vm_agent.guest_addresses(path, timeout=0.5) == {}
        assert time.monotonic() - start >= 0.4
        start = time.monotonic()
        assert await vm_agent.guest_addresses(path, timeout=0.5) == {}
        assert time.monotonic() - start < 0.1  # remembered: not waited on again
        answer.set()  # the agent comes up: its WELCOME ends the silence
        for _ in range(50):
            if not vm_agent.connection(path).silent:
                break
            await asyncio.sleep(0.02)
        network = await vm_agent.guest_addresses(path, timeout=2)
        assert network["lo"]["addresses"][0]["address"] == "127.0.0.1"


# L3: stdin
async def test_stdin_over_acknowledged_is_a_protocol_error() -> None:
    stdin = vm_agent.GuestStdin(lambda kind, payload: None)
    stdin.write(b"x" * 100)
    stdin.acknowledged(60)
    with pytest.raises(vm_agent.ProtocolError):
        stdin.acknowledged(41)


async def test_stdin_drain_waits_for_the_connection() -> None:
    flushed = asyncio.Event()

    async def connection_drain() -> None:
        await flushed.wait()

    stdin = vm_agent.GuestStdin(lambda kind, payload: None, connection_drain)
    stdin.write(b"x" * 100)
    drain = asyncio.create_task(stdin.drain())
    await asyncio.sleep(0.05)
    assert not drain.done()  # handed to the transport is not written towards the guest
    flushed.set()
    await asyncio.wait_for(drain, 1)


async def test_over_acknowledging_stdin_fails_the_session(tmp_path: Path) -> None:
    async def ack(session: int) -> None:
        writer.write(encode(Frame.STDIN_ACK, session, struct.pack(">I", 1 << 20)))

    async def guest(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal writer
        writer = w
        await started_then(reader, w, ack)

    writer: Any = None
    async with fake_agent(tmp_path, guest) as path:
        proc = await vm_agent.exec_in_guest(path, request("cat"))
        assert await asyncio.wait_for(proc.wait(), 5) == 1
        assert proc.failure is not None and "acknowledged" in proc.failure


# L4: FAILED
async def test_failed_message_is_short_and_plain() -> None:
    conn: Any = SimpleNamespace(send=lambda *a: None, forget=lambda s: None, drain=None)
    proc = vm_agent.GuestProcess(conn, 1, False, (80, 24))
    proc.frame(Frame.FAILED, struct.pack(">I", 1) + b"\x1b[2J\x07bad\r\n" * 30000)
    assert proc.returncode == 1 and proc.failure is not None
    assert len(proc.failure) < 600 and "bad" in proc.failure
    assert not any(ord(c) < 32 or c == "\x7f" for c in proc.failure)


# L5: no exit status
class _Socket:
    """A client's exec websocket: sends nothing (or `messages`), then stays open."""

    def __init__(self, messages: list[str] | None = None) -> None:
        self.messages = list(messages or [])
        self.closed = asyncio.Event()
        self.sent: list[bytes] = []

    def __aiter__(self) -> _Socket:
        return self

    async def __anext__(self) -> Any:
        if self.messages:
            return SimpleNamespace(type=WSMsgType.TEXT, data=self.messages.pop(0))
        await self.closed.wait()
        raise StopAsyncIteration

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    async def send_str(self, data: str) -> None:
        pass

    async def close(self) -> None:
        self.closed.set()


class _Op:
    def __init__(self, sockets: dict[str, _Socket]) -> None:
        self.sockets = sockets
        self.metadata: dict[str, Any] = {}

    async def channel(self, name: str, timeout: float | None = None) -> _Socket:
        if name not in self.sockets:
            await asyncio.Event().wait()
        return self.sockets[name]

    def channel_attached(self, name: str) -> bool:
        return name in self.sockets

    def release(self, name: str) -> None:
        pass


def _silent_guest_process(eof: bool, interactive: bool) -> tuple[vm_agent.GuestProcess, list[int]]:
    """A guest process whose agent sends its outputs' ends (`eof`) but never the exit status."""
    sent: list[int] = []
    conn: Any = SimpleNamespace(send=lambda kind, session, payload=b"": sent.append(kind),
                                forget=lambda s: None, drain=None)
    proc = vm_agent.GuestProcess(conn, 1, interactive, (80, 24))
    proc.frame(Frame.STARTED, struct.pack(">I", 42))
    if eof:
        proc.frame(Frame.OUTPUT_EOF, b"\x01")
        proc.frame(Frame.OUTPUT_EOF, b"\x02")
    return proc, sent


@pytest.mark.parametrize("interactive", [False, True])
async def test_killed_command_without_exit_status_ends(monkeypatch: pytest.MonkeyPatch, interactive: bool,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(exec_session, "EXIT_DEADLINE", 0.3, raising=False)
    proc, sent = _silent_guest_process(eof=False, interactive=interactive)

    async def exec_(spec: Any, req: Any, stdio: Any) -> vm_agent.GuestProcess:
        return proc

    driver: Any = SimpleNamespace(exec_host_pty=False, exec=exec_, exec_failure_prefix=b"",
                                  exec_failure=lambda head, code: None)
    names = ["0"] if interactive else ["0", "1", "2"]
    sockets = {name: _Socket() for name in names}
    sockets["control"] = _Socket(['{"command": "signal", "signal": 9}'])
    op: Any = _Op(sockets)
    result = await asyncio.wait_for(exec_session.run_exec(op, driver, None, request("sleep", "60",  # type: ignore
                                                                                      interactive=interactive),
                                                          80, 24), 5)
    assert result == {"return": 137} and Frame.SIGNAL in sent and Frame.CLOSE in sent
    assert any("no exit status" in r.getMessage() for r in caplog.records)


async def test_output_ended_without_exit_status_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exec_session, "EXIT_DEADLINE", 0.3, raising=False)
    proc, sent = _silent_guest_process(eof=True, interactive=False)

    async def exec_(spec: Any, req: Any, stdio: Any) -> vm_agent.GuestProcess:
        return proc

    driver: Any = SimpleNamespace(exec_host_pty=False, exec=exec_, exec_failure_prefix=b"",
                                  exec_failure=lambda head, code: None)
    op: Any = _Op({name: _Socket() for name in ("0", "1", "2")})
    result = await asyncio.wait_for(exec_session.run_exec(op, driver, None, request("x"), 80, 24), 5)  # type: ignore
    assert result == {"return": 137} and Frame.CLOSE in sent


async def test_exit_status_in_time_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exec_session, "EXIT_DEADLINE", 1.0, raising=False)
    proc, _ = _silent_guest_process(eof=True, interactive=False)

    async def exec_(spec: Any, req: Any, stdio: Any) -> vm_agent.GuestProcess:
        asyncio.get_running_loop().call_later(0.2, proc.frame, Frame.EXIT, struct.pack(">I", 3))
        return proc

    driver: Any = SimpleNamespace(exec_host_pty=False, exec=exec_, exec_failure_prefix=b"",
                                  exec_failure=lambda head, code: None)
    op: Any = _Op({name: _Socket() for name in ("0", "1", "2")})
    result = await asyncio.wait_for(exec_session.run_exec(op, driver, None, request("x"), 80, 24), 5)  # type: ignore
    assert result == {"return": 3}
