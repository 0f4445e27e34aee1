"""The real guest agent (agent/stapes-agent.c, built here with gcc) against vm_agent, on this host: a small
stand-in for QEMU's chardev joins the daemon's socket to the agent's (-s), as QEMU joins agent.sock to the
guest's virtio-serial port. A host that goes away shows to the agent as its socket closing (as POLLHUP on
the port)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stapes.server.images.agent import build_agent
from stapes.server.instances import vm_agent
from stapes.server.instances.driver import ExecRequest

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the agent")


@dataclass
class Guest:
    host_socket: Path
    agent: asyncio.subprocess.Process
    bridge: Bridge


class Bridge:
    """One host client at a time, as QEMU's chardev server; the agent's side is dropped when the host's is."""

    def __init__(self, host_path: Path, guest_path: Path) -> None:
        self.host_path, self.guest_path = host_path, guest_path
        self.guest: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.servers: list[asyncio.Server] = []
        self.host_writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.servers.append(await asyncio.start_unix_server(self._guest, str(self.guest_path)))
        self.servers.append(await asyncio.start_unix_server(self._host, str(self.host_path)))

    async def _guest(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.guest.put((reader, writer))

    async def _host(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.host_writers.append(writer)
        greader, gwriter = await self.guest.get()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, gwriter), pump(greader, writer))

    def drop_host(self) -> None:
        for writer in self.host_writers:
            writer.close()

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        self.drop_host()


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_agent(tmp_path_factory.mktemp("agent"))


@pytest.fixture
async def guest(agent_binary: Path, tmp_path: Path) -> AsyncIterator[Guest]:
    bridge = Bridge(tmp_path / "agent.sock", tmp_path / "guest.sock")
    await bridge.start()
    agent = await asyncio.create_subprocess_exec(str(agent_binary), "-s", str(tmp_path / "guest.sock"),
                                                 stderr=subprocess.DEVNULL)
    try:
        yield Guest(tmp_path / "agent.sock", agent, bridge)
    finally:
        vm_agent.disconnect(tmp_path / "agent.sock")
        agent.kill()
        await agent.wait()
        await bridge.close()


def req(*command: str, interactive: bool = False, cwd: str = "/", **env: str) -> ExecRequest:
    return ExecRequest(command=list(command), environment=env, cwd=cwd, user=os.getuid(), group=os.getgid(),
                       interactive=interactive)


async def read_all(stream: vm_agent.GuestStream | None) -> bytes:
    assert stream is not None
    out = b""
    while chunk := await stream.read(65536):
        out += chunk
    return out


async def run(guest: Guest, request: ExecRequest, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    proc = await vm_agent.exec_in_guest(guest.host_socket, request, None)
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
        out, err = await asyncio.wait_for(asyncio.gather(read_all(proc.stdout), read_all(proc.stderr)), 20)
        return await asyncio.wait_for(proc.wait(), 10), out, err
    finally:
        proc.close()


async def test_output_status_and_stdin(guest: Guest) -> None:
    code, out, err = await run(guest, req("sh", "-c", "echo out; echo err >&2; pwd; echo $FOO; cat; exit 3",
                                          cwd="/tmp", FOO="bar"), stdin=b"typed\n")
    assert (code, out, err) == (3, b"out\n/tmp\nbar\ntyped\n", b"err\n")


async def test_command_not_found_and_not_executable(guest: Guest, tmp_path: Path) -> None:
    proc = await vm_agent.exec_in_guest(guest.host_socket, req("no-such-command-here"), None)
    assert await proc.wait() == 127 and proc.failure == "Command not found"
    assert await read_all(proc.stdout) == b""
    plain = tmp_path / "plain"
    plain.write_text("data")
    proc = await vm_agent.exec_in_guest(guest.host_socket, req(str(plain)), None)
    assert await proc.wait() == 126 and proc.failure == "Command not executable"


async def test_signal_and_status(guest: Guest) -> None:
    proc = await vm_agent.exec_in_guest(guest.host_socket, req("sleep", "30"), None)
    assert proc.pid > 0
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 128 + signal.SIGTERM
    proc.close()


async def test_terminal_and_resize(guest: Guest) -> None:
    proc = await vm_agent.exec_in_guest(guest.host_socket, req("sh", "-c", "stty size; read x; stty size; echo $TERM",
                                                               interactive=True), None, window=(100, 30))
    assert proc.stderr is None
    out = b""
    while b"30 100" not in out:
        out += await asyncio.wait_for(proc.stdout.read(), 10)
    proc.resize(120, 40)
    proc.stdin.write(b"go\n")
    while b"xterm" not in out:
        out += await asyncio.wait_for(proc.stdout.read(), 10)
    assert b"40 120" in out and b"go" in out  # the typed line is echoed by the guest's pty
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    proc.close()


async def test_sessions_at_once_and_a_slow_consumer(guest: Guest) -> None:
    """A session whose output nobody reads (far beyond the window) does not hold up the others."""
    flood = await vm_agent.exec_in_guest(guest.host_socket, req("sh", "-c", "yes flood | head -c 20000000"), None)
    results = await asyncio.gather(*(run(guest, req("sh", "-c", f"echo {n}; exit {n}")) for n in range(8)))
    assert results == [(n, f"{n}\n".encode(), b"") for n in range(8)]
    assert flood.returncode is None  # still blocked on its window
    got = len(await asyncio.wait_for(read_all(flood.stdout), 60))
    assert got == 20000000 and await flood.wait() == 0
    flood.close()


async def test_large_stdin_through(guest: Guest) -> None:
    data = os.urandom(3 << 20)
    code, out, _ = await run(guest, req("sh", "-c", "cat | sha256sum"), stdin=data)
    import hashlib
    assert code == 0 and out.split()[0].decode() == hashlib.sha256(data).hexdigest()


async def test_a_new_host_connection_ends_the_old_sessions(guest: Guest) -> None:
    proc = await vm_agent.exec_in_guest(guest.host_socket, req("sh", "-c", "echo $$; exec sleep 60"), None)
    pid = int((await asyncio.wait_for(proc.stdout.read(), 10)).strip())
    vm_agent.disconnect(guest.host_socket)  # as a daemon that went away
    guest.bridge.drop_host()
    assert await asyncio.wait_for(proc.wait(), 10) == 1 and proc.failure and "lost" in proc.failure
    # The next connection's HELLO kills what the earlier one left.
    code, out, _ = await run(guest, req("echo", "again"))
    assert (code, out) == (0, b"again\n")
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the earlier connection's command still runs")


async def test_addresses(guest: Guest) -> None:
    network = await vm_agent.guest_addresses(guest.host_socket, timeout=5)
    assert any(a["address"] == "127.0.0.1" for a in network["lo"]["addresses"])


async def test_no_agent_is_said_clearly(tmp_path: Path) -> None:
    server = await asyncio.start_unix_server(lambda r, w: None, str(tmp_path / "silent.sock"))
    try:
        vm_agent_timeout = vm_agent.AGENT_TIMEOUT
        vm_agent.AGENT_TIMEOUT = 0.5
        with pytest.raises(vm_agent.AgentNotRunning, match="agent is not running.*booting"):
            await vm_agent.exec_in_guest(tmp_path / "silent.sock", req("true"), None)
    finally:
        vm_agent.AGENT_TIMEOUT = vm_agent_timeout
        vm_agent.disconnect(tmp_path / "silent.sock")
        server.close()
    assert await vm_agent.guest_addresses(tmp_path / "nothing.sock", timeout=0.2) == {}
