"""Benchmark: copying a stopped container between two local servers, in every mode and transport, as a
ratio to the physical floor measured in the same run: `tar -c | tar -x` of the same rootfs.

    .venv/bin/python bench/migration.py [--repeat 3] [--btrfs] [--disk]

Datasets: (a) 200 MiB of random data, (b) 20,000 files of 4 KiB. Each figure is the median of --repeat
runs of the client library's copy (a move is the same transfer plus deleting the source). The floor is
measured again right before each transport's runs, so both see the same machine state.

By default everything (both servers' state, the floor's copies) lives on a tmpfs: on this machine's
virtual disk, small-file writes vary by a factor of five from one run to the next (writeback, discard),
which drowns what the benchmark is about. --disk measures on the real disk instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stapes.client.client import AsyncClient, add_remote_with_token  # noqa: E402
from stapes.client.config import ClientConfig  # noqa: E402
from stapes.client.migration import Overrides, copy_instance  # noqa: E402

BIN = Path(sys.executable).parent


def free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_server(root: Path, name: str, host: str) -> subprocess.Popen[bytes]:
    state = root / name
    proc = subprocess.Popen([str(BIN / "stapesd"), "--state-dir", str(state), "--https-address",
                             f"{host}:{free_port(host)}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        if (state / "unix.socket").exists():
            time.sleep(0.3)
            return proc
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not start")


def fill(rootfs: Path, dataset: str) -> int:
    if dataset == "random-200MiB":
        subprocess.run(["dd", "if=/dev/urandom", f"of={rootfs / 'random.bin'}", "bs=1M", "count=200",
                        "status=none"], check=True)
    else:
        base = rootfs / "small"
        for d in range(100):
            sub = base / f"d{d:03}"
            sub.mkdir(parents=True)
            for f in range(200):
                (sub / f"f{f:03}").write_bytes(os.urandom(4096))
    subprocess.run(["sync"], check=True)
    return int(subprocess.run(["du", "-sb", str(rootfs)], capture_output=True, text=True).stdout.split()[0])


def tar_floor(volume: Path, scratch: Path, repeat: int, *, sync: bool = False) -> float:
    """`sync`: include writing the copy back to disk, when the timed commands do too."""
    times = []
    for _ in range(repeat):
        target = scratch / "tar-copy"
        target.mkdir(parents=True)
        start = time.perf_counter()
        subprocess.run(f"tar -C {volume} -cf - . | tar -C {target} -xf -", shell=True, check=True)
        if sync:
            subprocess.run(["sync"], check=True)
        times.append(time.perf_counter() - start)
        shutil.rmtree(target)
    return statistics.median(times)


async def time_copies(config: ClientConfig, name: str, mode: str, transport: str, pool: str | None,
                      repeat: int) -> tuple[float, str]:
    times, used = [], ""
    for i in range(repeat):
        source = AsyncClient.connect("s1", config)
        target = AsyncClient.connect("s2", config)
        try:
            start = time.perf_counter()
            used = (await copy_instance(source, name, target, f"{name}-{i}", mode=mode,
                                       overrides=Overrides(transport=transport, storage=pool))).transport
            times.append(time.perf_counter() - start)
            await target.delete_instance(f"{name}-{i}")
        finally:
            await source.close()
            await target.close()
    return statistics.median(times), used


async def main_async(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="stapes-bench-"))
    if not args.disk:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8G", "tmpfs", str(root)], check=True)
    servers = [start_server(root, "s1", "127.0.0.1"), start_server(root, "s2", "127.0.0.2")]
    try:
        config = ClientConfig.load(root / "client")
        for name in ("s1", "s2"):
            os.environ["STAPES_DIR"] = str(root / name)
            local = AsyncClient.connect("local", ClientConfig.load(root / f"root-{name}"))
            token = await local.create_token("bench")
            if args.btrfs:
                await local.create_entity("pool", {"name": "bt", "driver": "btrfs", "config": {"size": "2GiB"}})
            await local.close()
            await add_remote_with_token(config, name, token)
        results = []
        for dataset in ("random-200MiB", "20000x4KiB"):
            name = "a" if dataset.startswith("random") else "b"
            pools = [None] + (["bt"] if args.btrfs else [])
            for pool in pools:
                s1 = AsyncClient.connect("s1", config)
                await s1.create_instance({"name": f"{name}{pool or ''}", "source": {"type": "image",
                                                                                  "alias": "busybox"},
                                          "devices": {"root": {"type": "disk", "path": "/", "pool": pool}}
                                          if pool else {}})
                await s1.close()
                pool_dir = root / "s1" / "storage-pools" / (pool or "default") / "containers" / f"{name}{pool or ''}"
                size = fill(pool_dir / "rootfs", dataset)
                print(f"\n{dataset} ({size / 2**20:.0f} MiB, pool {pool or 'dir'}):", flush=True)
                transports = ["btrfs"] if pool else ["tar-stream", "rsync"]
                for transport in transports:
                    floor = tar_floor(pool_dir, pool_dir.parent.parent / "scratch", args.repeat)
                    print(f"  floor  tar | tar    {floor:6.2f} s", flush=True)
                    for mode in ("pull", "push", "relay"):
                        seconds, used = await time_copies(config, f"{name}{pool or ''}", mode, transport, pool,
                                                          args.repeat)
                        ratio = seconds / floor
                        print(f"  {mode:<6} {used:<11} {seconds:6.2f} s  {ratio:5.2f}x", flush=True)
                        results.append((dataset, pool or "dir", mode, used, seconds, floor, ratio))
        print("\n| dataset | pool | mode | transport | seconds | tar\\|tar seconds | ratio |")
        print("|---|---|---|---|---:|---:|---:|")
        for dataset, pool, mode, used, seconds, floor, ratio in results:
            print(f"| {dataset} | {pool} | {mode} | {used} | {seconds:.2f} | {floor:.2f} | {ratio:.2f}x |")
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(30)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in mounts:
            if mount.startswith(str(root)):
                subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        if not args.disk:
            subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--btrfs", action="store_true", help="also measure btrfs send/receive between btrfs pools")
    parser.add_argument("--disk", action="store_true", help="measure on the real disk instead of a tmpfs")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
