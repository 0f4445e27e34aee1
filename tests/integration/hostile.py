"""A client and a migration peer that say whatever a test wants, as a hostile one would.

`Raw` speaks HTTP to a server over its unix socket (root, trusted) or over HTTPS with any certificate (or
none); `HostileSource` plays the source of a push migration: it takes the target's websocket secrets and
then sends its own header, file streams and control messages, byte for byte as the test writes them.
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from stapes.certs import ensure_certificate
from stapes.server.migration import migrate_pb2 as pb
from tests.integration.harness import Server


class Raw:
    def __init__(self, server: Server, *, cert_dir: Path | None = None, unix: bool = True) -> None:
        self.server = server
        timeout = aiohttp.ClientTimeout(total=120)
        if unix:
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=str(server.state_dir / "unix.socket"))
            self.base = "http://stapes"
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            if cert_dir is not None:
                crt, key = cert_dir / "client.crt", cert_dir / "client.key"
                ensure_certificate(crt, key, server=False)
                context.load_cert_chain(crt, key)
            connector = aiohttp.TCPConnector(ssl=context, force_close=True)
            self.base = server.url
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> Raw:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with self.session.request(method, self.base + path, data=data, headers=hdrs) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except json.JSONDecodeError:
                return resp.status, {"raw": text}

    async def wait(self, op: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        status, body = await self.call("GET", f"/1.0/operations/{op['id']}/wait?timeout={timeout}")
        assert status == 200, body
        return dict(body["metadata"])

    async def ws(self, op: dict[str, Any], secret: str) -> aiohttp.ClientWebSocketResponse:
        return await self.session.ws_connect(f"{self.base}/1.0/operations/{op['id']}/websocket",
                                             params={"secret": secret}, max_msg_size=0)


def header(*, snapshots: list[pb.Snapshot] | None = None, transports: tuple[str, ...] = ("tar-stream",),
           total: int = 0, names: list[str] | None = None) -> bytes:
    snaps = snapshots or []
    return pb.MigrationHeader(
        fs=pb.RSYNC, snapshotNames=names if names is not None else [s.name for s in snaps],
        snapshots=snaps, stapesTransports=list(transports), stapesTotalBytes=total,
        rsyncFeatures=pb.rsyncFeatures(xattrs=False, delete=False, compress=False, bidirectional=False),
    ).SerializeToString()


def control(success: bool, message: str = "") -> bytes:
    return pb.MigrationControl(success=success, message=message).SerializeToString()


def tar_of(build: Callable[[tarfile.TarFile], None]) -> bytes:
    """A tar stream made member by member, escapes included (Python's tarfile writes what it is told)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        build(tar)
    return out.getvalue()


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info)


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def add_link(tar: tarfile.TarFile, name: str, target: str, *, hard: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    tar.addfile(info)


def add_device(tar: tarfile.TarFile, name: str, major: int, minor: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.mode = tarfile.BLKTYPE, major, minor, 0o666
    tar.addfile(info)


class HostileSource:
    """The source end of a push migration into `server`, played by the test."""

    def __init__(self, raw: Raw, name: str) -> None:
        self.raw = raw
        self.name = name
        self.op: dict[str, Any] = {}
        self.control: aiohttp.ClientWebSocketResponse | None = None
        self.fs: aiohttp.ClientWebSocketResponse | None = None

    async def start(self, **extra: Any) -> None:
        """`extra`: more of the instance's request body (its devices, say)."""
        status, body = await self.raw.call("POST", "/1.0/instances", {
            "name": self.name, "source": {"type": "migration", "mode": "push"}, **extra})
        assert status == 202, body
        self.op = body["metadata"]
        self.control = await self.raw.ws(self.op, self.op["metadata"]["control"])
        self.fs = await self.raw.ws(self.op, self.op["metadata"]["fs"])

    async def offer(self, data: bytes) -> bytes | None:
        """Send a header; the target's answer (None if it hung up instead)."""
        assert self.control is not None
        await self.control.send_bytes(data)
        msg = await self.control.receive(timeout=30)
        return bytes(msg.data) if msg.type == aiohttp.WSMsgType.BINARY else None

    async def send_stream(self, data: bytes) -> None:
        assert self.fs is not None
        for start in range(0, len(data), 1 << 16):
            await self.fs.send_bytes(data[start:start + (1 << 16)])
        await self.fs.send_str("")

    async def finish(self) -> dict[str, Any]:
        """Report success, then wait for the target's verdict."""
        assert self.control is not None
        with_suppressed = asyncio.create_task(self.control.send_bytes(control(True)))
        await asyncio.gather(with_suppressed, return_exceptions=True)
        return await self.raw.wait(self.op)

    async def close(self) -> None:
        for ws in (self.control, self.fs):
            if ws is not None:
                await ws.close()
