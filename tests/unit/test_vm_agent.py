"""The guest agent's protocol, host side (pure: no VM, no agent)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapes.api.errors import BadRequest
from stapes.server.instances import vm_agent
from stapes.server.instances.driver import ExecRequest
from stapes.server.instances.vm_agent import Frame, FrameDecoder, ProtocolError, encode


def request(command: list[str], interactive: bool = False, **env: str) -> ExecRequest:
    return ExecRequest(command=command, environment=env, cwd="/tmp", user=1000, group=100, interactive=interactive)


def test_frame_layout() -> None:
    assert encode(Frame.STDIN, 7, b"hi") == b"\x03\x00\x00\x00\x07\x00\x00\x00\x02hi"
    assert vm_agent.hello_frame() == b"\x01" + b"\0" * 4 + b"\0\0\0\x08STAPES01"


@given(st.lists(st.tuples(st.sampled_from(list(Frame)), st.integers(0, 2**32 - 1), st.binary(max_size=300))),
       st.integers(1, 50))
def test_decoder_reassembles_any_split(frames: list[tuple[int, int, bytes]], piece: int) -> None:
    stream = b"".join(encode(kind, session, payload) for kind, session, payload in frames)
    decoder = FrameDecoder()
    got = []
    for start in range(0, len(stream), piece):
        got += decoder.feed(stream[start:start + piece])
    assert got == [(int(kind), session, payload) for kind, session, payload in frames]


def test_decoder_refuses_an_oversized_frame() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">BII", Frame.OUTPUT, 1, vm_agent.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        encode(Frame.STDIN, 1, b"x" * (vm_agent.MAX_PAYLOAD + 1))


def test_open_payload() -> None:
    payload = vm_agent.encode_open(request(["ls", "-l"], interactive=True, FOO="bar"), rows=30, cols=100)
    flags, uid, gid, rows, cols, argc, envc = struct.unpack_from(">BIIHHHH", payload)
    assert (flags, uid, gid, rows, cols, argc) == (1, 1000, 100, 30, 100, 2)
    strings = payload[struct.calcsize(">BIIHHHH"):].split(b"\0")
    assert strings[-1] == b"" and strings[:3] == [b"/tmp", b"ls", b"-l"]
    env = strings[3:-1]
    assert len(env) == envc and b"FOO=bar" in env and b"TERM=xterm" in env and b"HOME=/" in env


def test_open_refuses_what_the_agent_cannot_carry() -> None:
    with pytest.raises(BadRequest, match="NUL"):
        vm_agent.encode_open(request(["echo", "a\0b"]), 24, 80)
    with pytest.raises(BadRequest, match="empty"):
        vm_agent.encode_open(request([]), 24, 80)
    with pytest.raises(BadRequest, match="larger"):
        vm_agent.encode_open(request(["echo", "x" * vm_agent.MAX_PAYLOAD]), 24, 80)
    with pytest.raises(BadRequest, match="variable name"):
        vm_agent.encode_open(ExecRequest(["true"], {"A=B": "c"}, "", 0, 0, False), 24, 80)


def test_info_as_network_state() -> None:
    text = ("link lo 00:00:00:00:00:00 up 65536\nlink eth0 52:54:00:12:34:56 up 1500\n"
            "addr lo inet 127.0.0.1 8 local\naddr eth0 inet 10.1.2.3 24 global\n"
            "addr eth0 inet6 fe80::1 64 link\nbogus line\n")
    network = vm_agent.parse_info(text)
    assert network["lo"]["type"] == "loopback" and network["lo"]["hwaddr"] == ""
    eth0 = network["eth0"]
    assert (eth0["hwaddr"], eth0["mtu"], eth0["state"]) == ("52:54:00:12:34:56", 1500, "up")
    assert eth0["addresses"] == [
        {"family": "inet", "address": "10.1.2.3", "netmask": "24", "scope": "global"},
        {"family": "inet6", "address": "fe80::1", "netmask": "64", "scope": "link"},
    ]


async def test_stdin_keeps_to_its_window() -> None:
    sent: list[tuple[int, bytes]] = []
    stdin = vm_agent.GuestStdin(lambda kind, payload: sent.append((kind, payload)))
    stdin.write(b"x" * (vm_agent.WINDOW + 1000))
    assert sum(len(p) for _, p in sent) == vm_agent.WINDOW
    assert all(len(p) <= vm_agent.CHUNK for _, p in sent)
    stdin.close()
    assert all(kind == Frame.STDIN for kind, _ in sent)  # EOF waits behind the data
    stdin.acknowledged(vm_agent.CHUNK)
    await stdin.drain()
    assert sum(len(p) for kind, p in sent if kind == Frame.STDIN) == vm_agent.WINDOW + 1000
    assert sent[-1] == (Frame.STDIN_EOF, b"")


async def test_output_is_acknowledged_as_read() -> None:
    acks: list[int] = []
    stream = vm_agent.GuestStream(acks.append)
    stream.feed_data(b"hello world")
    assert await stream.read(5) == b"hello"
    assert await stream.read(100) == b" world"
    stream.feed_eof()
    assert await stream.read() == b""
    assert acks == [5, 6]


def test_exec_failure_words() -> None:
    assert vm_agent.exec_failure(b"stapes-agent: nope: No such file", 127) == "Command not found"
    assert vm_agent.exec_failure(b"stapes-agent: x", 126) == "Command not executable"
    assert vm_agent.exec_failure(b"ordinary output", 127) is None
