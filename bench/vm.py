"""Benchmark: virtual machines, each figure a ratio to its floor measured in the same run.

    .venv/bin/python bench/vm.py [--repeat 3] [--tmpfs]

(a) Boot to first heartbeat: `stapes start` of the built-in tiny VM until `heartbeat 1` is in its console
    log, against QEMU started by hand with exactly the argv Stapes used (read from /proc/<pid>/cmdline).
(b) A stopped move of a VM whose 2 GiB disk holds 300 MiB of data: the whole `stapes move` command, every
    mode, against `cp --sparse=always` of the same disk file (+ sync, as the move writes it to disk too).

Runs on the real disk (under /var/tmp) unless --tmpfs. Leaves nothing behind: servers, QEMU processes,
instances and the state directories go at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from bench.migration import start_server  # noqa: E402
from stapes.client.client import AsyncClient, add_remote_with_token  # noqa: E402
from stapes.client.config import ClientConfig  # noqa: E402
from stapes.server.instances.qemu_machine import Machine, argv  # noqa: E402

BIN = Path(sys.executable).parent
MiB = 2**20


def stapes(conf: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([str(BIN / "stapes"), *args], check=True, env={**os.environ, "STAPES_CONF": str(conf)},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def wait_for_heartbeat(log: Path, started: float, timeout: float = 180) -> float:
    while time.perf_counter() - started < timeout:
        if log.exists() and b"heartbeat 1" in log.read_bytes():
            return time.perf_counter() - started
        time.sleep(0.02)
    raise RuntimeError(f"no heartbeat in {log} within {timeout:.0f}s")


def qemu_pid(runtime: Path) -> int:
    return int((runtime / "qemu.pid").read_text().split()[0])


def same_machine_by_hand(runtime: Path) -> list[str]:
    """The argv of the machine Stapes runs (its running.json), as QEMU started by hand takes it: QEMU opens the
    disk, the UEFI variables and its tap itself (Stapes passes them as descriptors it opened), and runs at once
    (Stapes starts it paused, -S, and continues once its console is attached)."""
    record = json.loads((runtime / "running.json").read_text())
    fields = {f.name for f in dataclasses.fields(Machine)}
    machine = Machine.from_json({k: v for k, v in record.items() if k in fields})
    recorded = record["argv"]
    user = recorded[recorded.index("-run-with") + 1].removeprefix("user=") if "-run-with" in recorded else None
    return [a for a in argv(machine, recorded[0], None, user) if a != "-S"]


def wait_heartbeat(console_path: str, marker: bytes = b"heartbeat 2", timeout: float = 240) -> None:
    """Reads a VM's serial console socket until the guest printed `marker`."""
    with socket.socket(socket.AF_UNIX) as console:
        console.connect(console_path)
        console.settimeout(timeout)
        seen = b""
        while marker not in seen:
            chunk = console.recv(65536)
            if not chunk:
                raise RuntimeError(f"the console closed before {marker.decode()!r}")
            seen = seen[-64:] + chunk


def boot_by_hand(argv: list[str], runtime: Path) -> float:
    """The same QEMU, same arguments, started directly (in Stapes's runtime directory: the VM is stopped);
    its serial console read straight from its socket, as the server reads it."""
    for leftover in ("console.sock", "qmp.sock", "agent.sock", "qemu.pid"):
        (runtime / leftover).unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while not (runtime / "console.sock").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU started by hand exited with {proc.returncode}")
            time.sleep(0.005)
        wait_heartbeat(str(runtime / "console.sock"), b"heartbeat 1", 180)
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait(30)


def write_data(path: Path, total: int) -> None:
    """`total` bytes of random data in 10 MiB runs spread over the disk (the rest stays holes)."""
    chunk = os.urandom(10 * MiB)
    size = path.stat().st_size
    runs = total // len(chunk)
    with path.open("r+b") as f:
        for i in range(runs):
            f.seek((size // runs) * i)
            f.write(chunk)
        os.fsync(f.fileno())


def cp_floor(disk: Path, scratch: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        target = scratch / "cp-copy.img"
        start = time.perf_counter()
        subprocess.run(["cp", "--sparse=always", str(disk), str(target)], check=True)
        subprocess.run(["sync"], check=True)
        times.append(time.perf_counter() - start)
        target.unlink()
    return statistics.median(times)


async def setup(root: Path) -> Path:
    config = ClientConfig.load(root / "client")
    for name in ("s1", "s2"):
        os.environ["STAPES_DIR"] = str(root / name)
        local = AsyncClient.connect("local", ClientConfig.load(root / f"root-{name}"))
        token = await local.create_token("bench")
        await local.close()
        await add_remote_with_token(config, name, token)
    return root / "client"


def clean_up(servers: list[subprocess.Popen[bytes]], root: Path) -> None:
    """Everything a VM benchmark started goes: its servers, their bridges, dnsmasq and nftables tables (as the
    demo does), the QEMUs they left, the mounts under `root`, and `root`."""
    for proc in servers:
        proc.terminate()
        proc.wait(30)
    for name in ("s1", "s2"):
        subprocess.run([sys.executable, "-m", "stapes.server.networks.cleanup", str(root / name)],
                       check=False, capture_output=True)
    for pidfile in root.glob("s*/qemu/*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted(mounts, reverse=True):
        if mount.startswith(str(root)):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tmpfs", action="store_true", help="measure on a tmpfs instead of the real disk")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="stapes-bench-vm-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    if args.tmpfs:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8G,mode=0711", "tmpfs", str(root)], check=True)
    servers = [start_server(root, "s1", "127.0.0.1"), start_server(root, "s2", "127.0.0.2")]
    try:
        conf = asyncio.run(setup(root))
        print(f"state on {'tmpfs' if args.tmpfs else 'the real disk'} ({root})")
        # (a) boot to first heartbeat
        stapes(conf, "init", "s1:busybox-vm", "boot", "--vm", "-q")
        runtime, log = root / "s1" / "qemu" / "boot", root / "s1" / "qemu" / "boot" / "console.log"
        ours, by_hand = [], []
        hand_argv: list[str] = []
        for _ in range(args.repeat):
            if log.exists():
                log.unlink()
            start = time.perf_counter()
            stapes(conf, "start", "s1:boot")
            ours.append(wait_for_heartbeat(log, start))
            hand_argv = same_machine_by_hand(runtime)
            stapes(conf, "stop", "s1:boot", "--force")
        for _ in range(args.repeat):
            by_hand.append(boot_by_hand(hand_argv, runtime))
        a, b = statistics.median(ours), statistics.median(by_hand)
        print(f"boot to first heartbeat: stapes start {a:.2f} s, QEMU by hand {b:.2f} s: {a / b:.2f}x")
        stapes(conf, "delete", "s1:boot")

        # (b) a stopped move of a 2 GiB disk holding 300 MiB
        stapes(conf, "init", "s1:busybox-vm", "big", "--vm", "-d", "root,size=2GiB", "-q")
        disk = root / "s1" / "storage-pools" / "default" / "virtual-machines" / "big" / "root.img"
        write_data(disk, 300 * MiB)
        print(f"disk: {disk.stat().st_size / 2**30:.1f} GiB apparent, {disk.stat().st_blocks * 512 / MiB:.0f} MiB "
              "allocated")
        rows = []
        floor = cp_floor(disk, root, args.repeat)
        print(f"  floor  cp --sparse=always + sync  {floor:6.2f} s")
        where = "s1"
        for mode in ("pull", "push", "relay"):
            times = []
            for _ in range(args.repeat):
                other = "s2" if where == "s1" else "s1"
                times.append(stapes(conf, "move", f"{where}:big", f"{other}:", "--mode", mode, "-q"))
                where = other
            seconds = statistics.median(times)
            rows.append((mode, seconds, seconds / floor))
            print(f"  {mode:<6} {seconds:6.2f} s  {seconds / floor:5.2f}x", flush=True)
        print("\n| mode | seconds | cp --sparse=always seconds | ratio |\n|---|---:|---:|---:|")
        for mode, seconds, ratio in rows:
            print(f"| {mode} | {seconds:.2f} | {floor:.2f} | {ratio:.2f}x |")
    finally:
        clean_up(servers, root)


if __name__ == "__main__":
    main()
