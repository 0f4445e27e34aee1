"""Load: 20 concurrent moves between two servers, then 200 concurrent API clients listing instances and
polling operations while 20 more moves run the other way. Reports the daemons' memory and open file
descriptors before and after (nothing should grow once the load ends), and the latency of
`GET /1.0/instances` under load.

    .venv/bin/python bench/soak.py [--moves 20] [--clients 200] [--seconds 20]     (or: make soak)

Exits non-zero if a move failed, a request failed, or a daemon kept more descriptors than it started with.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402

from tests.integration.harness import STAPES, Cli, Cluster, Server  # noqa: E402


def moves(cli: Cli, names: list[str], source: str, target: str) -> tuple[int, float]:
    started = time.monotonic()
    procs = [subprocess.Popen([STAPES, "move", f"{source}:{n}", f"{target}:", "-q"], env=cli.env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in names]
    failed = 0
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failed += 1
            print(f"  a move failed: {err.strip()}", file=sys.stderr)
    return failed, time.monotonic() - started


def settle(server: Server) -> tuple[int, int]:
    time.sleep(3)
    return server.rss(), server.open_fds()


async def api_clients(server: Server, cli: Cli, clients: int, seconds: float) -> tuple[list[float], int, int]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(cli.conf_dir / "client.crt", cli.conf_dir / "client.key")
    latencies: list[float] = []
    counts = {"ok": 0, "failed": 0}
    deadline = time.monotonic() + seconds

    async def one(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            try:
                started = time.monotonic()
                async with session.get(f"{server.url}/1.0/instances?recursion=1") as resp:
                    await resp.read()
                    ok = resp.status == 200
                latencies.append(time.monotonic() - started)
                async with session.get(f"{server.url}/1.0/operations?recursion=1") as resp:
                    ops = (await resp.json())["metadata"]
                    ok = ok and resp.status == 200
                for op in (ops.get("running") or [])[:2]:
                    async with session.get(f"{server.url}/1.0/operations/{op['id']}") as resp:
                        await resp.read()
                counts["ok" if ok else "failed"] += 1
            except (aiohttp.ClientError, OSError, TimeoutError):
                counts["failed"] += 1

    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=1),
                                      timeout=aiohttp.ClientTimeout(total=60)) for _ in range(clients)]
    try:
        await asyncio.gather(*(one(s) for s in sessions))
    finally:
        for s in sessions:
            await s.close()
    return latencies, counts["ok"], counts["failed"]


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1000, ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    cluster = Cluster()
    try:
        s1, s2 = cluster.server("s1", "127.0.0.1"), cluster.server("s2", "127.0.0.2")
        cli = cluster.cli()
        cli.trust(s1, "s1")
        cli.trust(s2, "s2")
        names = [f"m{i}" for i in range(args.moves)]
        for name in names:
            cli.run("init", "s1:busybox", name, "-q")
        cli.json("list", "s1:")
        cli.json("list", "s2:")
        before = {s.name: settle(s) for s in (s1, s2)}

        failed_out, took_out = moves(cli, names, "s1", "s2")
        loop_result: list[object] = []

        def back() -> None:
            loop_result.append(moves(cli, names, "s2", "s1"))

        import threading
        mover = threading.Thread(target=back)
        mover.start()
        latencies, ok, failed_requests = asyncio.run(api_clients(s2, cli, args.clients, args.seconds))
        mover.join()
        failed_back, took_back = loop_result[0]  # type: ignore[misc]
        after = {s.name: settle(s) for s in (s1, s2)}
        # The same client load once more, without moves: a leak grows again, a warmed-up heap does not.
        latencies2, ok2, failed2 = asyncio.run(api_clients(s2, cli, args.clients, args.seconds))
        failed_requests += failed2
        again = {s.name: settle(s) for s in (s1, s2)}
        final = {s: [i["name"] for i in cli.json("list", f"{s}:")] for s in ("s1", "s2")}
    finally:
        cluster.close()

    p50, p99 = percentiles(latencies)
    print(f"{args.moves} concurrent moves s1 -> s2: {args.moves - failed_out} ok, {failed_out} failed, "
          f"{took_out:.1f} s")
    print(f"{args.moves} concurrent moves s2 -> s1 under API load: {args.moves - failed_back} ok, {failed_back} "
          f"failed, {took_back:.1f} s")
    print(f"{args.clients} API clients for {args.seconds:.0f} s on s2: {ok} rounds ok, {failed_requests} failed; "
          f"GET /1.0/instances?recursion=1 p50 {p50:.0f} ms, p99 {p99:.0f} ms ({len(latencies)} requests)")
    q50, q99 = percentiles(latencies2)
    print(f"second round of {args.clients} API clients, no moves: {ok2} rounds ok, {failed2} failed; "
          f"p50 {q50:.0f} ms, p99 {q99:.0f} ms")
    print("| server | RSS before | after load | after a second round | fds before | after | after second |")
    print("|---|---|---|---|---|---|---|")
    for name in ("s1", "s2"):
        (rss0, fd0), (rss1, fd1), (rss2, fd2) = before[name], after[name], again[name]
        print(f"| {name} | {rss0 / 2**20:.1f} MiB | {rss1 / 2**20:.1f} MiB | {rss2 / 2**20:.1f} MiB "
              f"({(rss2 - rss1) / 2**20:+.1f}) | {fd0} | {fd1} | {fd2} |")
    lost = sorted(set(names) - set(final["s1"]))
    print(f"instances at the end: s1 {len(final['s1'])}, s2 {len(final['s2'])}; lost: {lost or 'none'}")
    leaked = [n for n in ("s1", "s2") if after[n][1] > before[n][1] or again[n][1] > before[n][1]]
    bad = failed_out or failed_back or failed_requests or lost or final["s2"] or leaked
    if leaked:
        print(f"descriptors not given back by: {', '.join(leaked)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
