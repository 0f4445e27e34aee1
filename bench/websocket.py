"""Benchmark: how fast one migration websocket moves bytes between two processes on this host, over TLS, against
the same websocket carrying CRIU's pages as `server/migration/growing.py` sends and writes them.

    .venv/bin/python bench/websocket.py [--mib 256] [--repeat 3]

Why it exists: the freeze of a live move without lazy pages holds the copy of the memory, and on 2 cores that
copy is CPU-bound (docs/performance.md). Rows: `raw` = 1 MiB messages from memory to memory (the floor of the
websocket itself), `pages` = a real file of random bytes followed and sent by `send_growing`, received and
written by `receive_growing` into the real disk (/var/tmp), as a live move does. The sending side is the
websocket server, as a source is in pull mode. Medians of --repeat runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from stapes.certs import ensure_certificate  # noqa: E402
from stapes.server.migration.growing import receive_growing, send_growing  # noqa: E402
from stapes.server.migration.service import free_local_port  # noqa: E402
from stapes.server.streams import Channel  # noqa: E402

PAGES = re.compile(r"pages-[0-9]{1,9}\.img")
MESSAGE = 1 << 20


async def serve(scratch: Path, kind: str, mib: int, port: int) -> None:
    """The sending side: one connection, then it exits."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(scratch / "server.crt", scratch / "server.key")
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=16 << 20)
        await ws.prepare(request)
        channel = Channel("criu", ws)
        if kind == "raw":
            message = os.urandom(MESSAGE)
            for _ in range(mib):
                await channel.send(message)
            await channel.barrier()
        else:
            written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            written.set_result(None)
            await send_growing(scratch / "source", PAGES, written, channel)
        await ws.receive()  # the receiver's word that it has everything
        done.set()
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    (scratch / "listening").touch()
    await done.wait()
    await runner.cleanup()


async def receive(scratch: Path, kind: str, port: int) -> float:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(scratch / "server.crt")
    context.check_hostname = False
    target = scratch / "target"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"https://127.0.0.1:{port}/", ssl=context, max_msg_size=16 << 20) as ws:
        channel = Channel("criu", ws)
        started = time.perf_counter()
        if kind == "raw":
            async for _ in channel.stream():
                pass
        else:
            await receive_growing(target, PAGES, 0o644, channel)
        seconds = time.perf_counter() - started
        await ws.send_str("done")
    return seconds


def one_run(scratch: Path, kind: str, mib: int) -> float:
    """The sender in a process of its own (as the source's daemon is), this process receiving."""
    port = free_local_port()
    (scratch / "listening").unlink(missing_ok=True)
    sender = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--mib", str(mib), "--port", str(port),
                               "--scratch", str(scratch)])
    try:
        deadline = time.monotonic() + 30
        while not (scratch / "listening").exists():
            if time.monotonic() > deadline or sender.poll() is not None:
                raise SystemExit("the sending process did not start")
            time.sleep(0.05)
        return asyncio.run(receive(scratch, kind, port))
    finally:
        if sender.poll() is None:
            try:
                sender.wait(timeout=60)
            except subprocess.TimeoutExpired:
                sender.kill()
                sender.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", choices=["raw", "pages"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.scratch, args.serve, args.mib, args.port))
        return
    scratch = Path(tempfile.mkdtemp(prefix="stapes-bench-ws-", dir="/var/tmp"))
    try:
        ensure_certificate(scratch / "server.crt", scratch / "server.key", server=True)
        (scratch / "source").mkdir()
        with (scratch / "source" / "pages-1.img").open("wb") as pages:
            for _ in range(args.mib):
                pages.write(os.urandom(MESSAGE))
        for kind in ("raw", "pages"):
            runs = [one_run(scratch, kind, args.mib) for _ in range(args.repeat)]
            seconds = statistics.median(runs)
            print(f"{kind:>6}: {args.mib} MiB in {seconds:.3f} s = {args.mib * 2**20 / seconds / 1e6:.0f} MB/s "
                  f"(median of {args.repeat})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
