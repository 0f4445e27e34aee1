"""Benchmark: a running VM's live move, against a direct QEMU-to-QEMU migration of the same guest in the same run.

    .venv/bin/python bench/vm_live.py [--quick]     (as root; --quick: 256 MiB only, else also 1 GiB)

(a) Stapes: the whole `stapes move s1:vm s2:` a user runs (migration.stateful=true), pull, push and relay once
    each, idle and with memory dirtied (a tmpfs rewritten by dd without end): wall time, QEMU's downtime and
    memory sent from the CLI's last line, and the guest's own wall-clock gap (a loop in the guest appending
    its clock (adjtimex, µs) every 10 ms to a tmpfs; the largest step between consecutive lines after the move).
(b) The floor: two QEMUs started by hand from the same machine record (Stapes's running.json; no nics), the
    source booted from a copy of the VM's disk and UEFI variables, the destination `-incoming defer` with an
    empty sparse disk of the same size; the same NBD mirror over a unix socket and the same migration
    (pause-before-switchover, block-job-cancel, migrate-continue) over another, driven with qemu.qmp. Idle
    guest only (no exec without Stapes's agent). Total from the first QMP command to `completed`.

Leaves nothing behind: servers, QEMU processes (by PID), bridges, dnsmasq, nftables tables, temp dirs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.qmp import QMPClient  # noqa: E402

from bench.migration import start_server  # noqa: E402
from bench.vm import clean_up, setup, wait_heartbeat  # noqa: E402
from stapes.server.instances import qemu_policy as policy  # noqa: E402
from stapes.server.instances.qemu_machine import Disk, Machine, argv  # noqa: E402

BIN = Path(sys.executable).parent
MiB = 2**20
DIRTY = ("mkdir -p /run/dirty && mount -t tmpfs -o size=64m tmpfs /run/dirty; "
         "setsid sh -c 'while :; do dd if=/dev/urandom of=/run/dirty/a bs=1M count=32 2>/dev/null; done' "
         "</dev/null >/dev/null 2>&1 &")
GAP = ("mkdir -p /run/gapfs && mount -t tmpfs -o size=16m tmpfs /run/gapfs; "
       "setsid sh -c 'while :; do adjtimex | sed -n \"s/.*tv_sec: *//p;s/.*tv_usec: *//p\" | tr \"\\n\" \" \" "
       ">> /run/gapfs/gap; echo >> /run/gapfs/gap; usleep 10000; done' </dev/null >/dev/null 2>&1 &")
# (busybox's date has no %N: the guest's wall clock in microseconds from adjtimex, "sec usec" a line)


def cli(conf: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "stapes"), *args], check=check, env={**os.environ, "STAPES_CONF": str(conf)},
                          capture_output=True, text=True)


def wait_agent(conf: Path, where: str, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cli(conf, "exec", where, "--", "true", check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the agent of {where} did not answer within {timeout:.0f}s")


def guest_gap_ms(conf: Path, where: str) -> float:
    out = cli(conf, "exec", where, "--", "cat", "/run/gapfs/gap").stdout
    pairs = [line.split() for line in out.splitlines()]
    stamps = [int(p[0]) * 10**6 + int(p[1]) for p in pairs if len(p) == 2 and p[0].isdigit() and p[1].isdigit()]
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return max(steps) / 1e3 if steps else float("nan")


def stapes_move(conf: Path, src: str, dst: str, mode: str) -> dict[str, Any]:
    cli(conf, "exec", f"{src}:vm", "--", "sh", "-c", ": > /run/gapfs/gap")
    time.sleep(1.0)
    start = time.perf_counter()
    out = cli(conf, "move", f"{src}:vm", f"{dst}:", "--mode", mode).stdout
    wall = time.perf_counter() - start
    last = out.strip().splitlines()[-1]
    m = re.search(r"downtime (\d+) ms \(QEMU's figure\), (\d+) MiB of memory in (\d+) passes", last)
    time.sleep(1.0)
    gap = guest_gap_ms(conf, f"{dst}:vm")
    return {"mode": mode, "wall": wall, "downtime": int(m[1]) if m else None, "mib": int(m[2]) if m else None,
            "passes": int(m[3]) if m else None, "gap": gap, "line": last}


# ---- the floor: QEMU to QEMU, by hand -------------------------------------------------------------------

def machine_record(runtime: Path) -> tuple[Machine, str]:
    record = json.loads((runtime / "running.json").read_text())
    fields = {f.name for f in dataclasses.fields(Machine)}
    return Machine.from_json({k: v for k, v in record.items() if k in fields}), record["argv"][0]


def by_hand(machine: Machine, binary: str, workdir: Path, name: str, disk: Path, nvram: Path,
            extra: tuple[str, ...]) -> Machine:
    runtime = workdir / name
    runtime.mkdir()
    disks = tuple(dataclasses.replace(d, path=str(disk)) if d.name == "root" else d for d in machine.disks)
    assert all(isinstance(d, Disk) for d in disks)
    return dataclasses.replace(machine, runtime=str(runtime), firmware_vars=str(nvram), disks=disks, nics=(),
                               extra=extra)


def spawn(machine: Machine, binary: str, pids: list[int]) -> subprocess.Popen[bytes]:
    args = [a for a in argv(machine, binary, None, None) if a != "-S"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    pids.append(proc.pid)
    qmp = Path(machine.path("qmp.sock"))
    while not qmp.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU by hand exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.01)
    return proc


async def direct_migration(src: Machine, dst: Machine, workdir: Path) -> dict[str, Any]:
    nbd, mig = str(workdir / "nbd.sock"), str(workdir / "mig.sock")
    s, d = QMPClient("src"), QMPClient("dst")
    await s.connect(src.path("qmp.sock"))
    await d.connect(dst.path("qmp.sock"))
    try:
        pol = policy.LivePolicy()
        disk_bytes = Path(dst.disks[0].path).stat().st_size
        steps = policy.downtime_steps(pol, src.memory_mib * MiB + disk_bytes)
        start = time.perf_counter()
        await d.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}, "max-connections": 1})
        await d.execute("blockdev-set-active", {"node-name": "root", "active": True})
        await d.execute("block-export-add", {"type": "nbd", "id": "exp", "node-name": "root", "name": "root",
                                             "writable": True})
        await d.execute("migrate-incoming", {"uri": f"unix:{mig}"})
        await s.execute("blockdev-add", {"driver": "nbd", "node-name": "mirror", "export": "root",
                                         "server": {"type": "unix", "path": nbd}})
        await s.execute("blockdev-mirror", {"job-id": "mirror", "device": "root", "target": "mirror",
                                            "sync": "full", "auto-dismiss": False})
        while True:
            jobs = [j for j in await s.execute("query-block-jobs") if j.get("device") == "mirror"]
            if not jobs or jobs[0].get("status") in ("concluded", "null", "aborting"):
                raise RuntimeError(f"the mirror ended: {jobs}")
            if jobs[0].get("ready"):
                break
            await asyncio.sleep(0.002)
        disk_s = time.perf_counter() - start
        await s.execute("block-job-change", {"id": "mirror", "type": "mirror", "copy-mode": "write-blocking"})
        await s.execute("migrate-set-capabilities", {"capabilities": policy.capabilities(pol)})
        await s.execute("migrate-set-parameters", policy.parameters(pol, steps))
        await s.execute("migrate", {"uri": f"unix:{mig}"})
        while (status := (await s.execute("query-migrate")).get("status")) != "pre-switchover":
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"migration {status}")
            await asyncio.sleep(0.002)
        await s.execute("block-job-cancel", {"device": "mirror"})
        while True:
            jobs = [j for j in await s.execute("query-block-jobs") if j.get("device") == "mirror"]
            if not jobs or jobs[0].get("status") == "concluded":
                break
            await asyncio.sleep(0.002)
        if jobs:
            await s.execute("job-dismiss", {"id": "mirror"})
        await s.execute("migrate-continue", {"state": "pre-switchover"})
        while (answer := await s.execute("query-migrate")).get("status") != "completed":
            if answer.get("status") in ("failed", "cancelled"):
                raise RuntimeError(f"migration {answer.get('status')}: {answer.get('error-desc')}")
            await asyncio.sleep(0.002)
        total = time.perf_counter() - start
        while (await d.execute("query-migrate")).get("status") != "completed":
            await asyncio.sleep(0.002)
        await d.execute("cont")
        return {"total": total, "disk_s": disk_s, "downtime": answer.get("downtime"),
                "mib": answer.get("ram", {}).get("transferred", 0) / MiB}
    finally:
        await s.disconnect()
        await d.disconnect()


def floor(machine: Machine, binary: str, vmdir: Path, workdir: Path, pids: list[int]) -> dict[str, Any]:
    workdir.mkdir()
    disk_src, nvram_src = workdir / "src-root.img", workdir / "src.nvram"
    disk_dst, nvram_dst = workdir / "dst-root.img", workdir / "dst.nvram"
    subprocess.run(["cp", "--sparse=always", str(vmdir / "root.img"), str(disk_src)], check=True)
    shutil.copy(vmdir / "qemu.nvram", nvram_src)
    shutil.copy(vmdir / "qemu.nvram", nvram_dst)
    with disk_dst.open("wb") as f:
        f.truncate(disk_src.stat().st_size)
    src = by_hand(machine, binary, workdir, "src", disk_src, nvram_src, ())
    dst = by_hand(machine, binary, workdir, "dst", disk_dst, nvram_dst, ("-incoming", "defer"))
    procs = [spawn(src, binary, pids)]
    try:
        wait_heartbeat(src.path("console.sock"))
        procs.append(spawn(dst, binary, pids))
        time.sleep(2)
        return asyncio.run(direct_migration(src, dst, workdir))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(30)
            pids.remove(proc.pid)
        shutil.rmtree(workdir, ignore_errors=True)


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 MiB guests only")
    parser.add_argument("--deadline", type=float, default=0, help="stop measuring at this UNIX time (0: none)")
    args = parser.parse_args()
    sizes = ["256MiB"] if args.quick else ["256MiB", "1GiB"]
    root = Path(tempfile.mkdtemp(prefix="stapes-bench-vmlive-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    servers = [start_server(root, "s1", "127.0.0.1"), start_server(root, "s2", "127.0.0.2")]
    pids: list[int] = []
    rows: list[tuple[str, str, dict[str, Any]]] = []
    floors: dict[str, dict[str, Any]] = {}
    try:
        conf = asyncio.run(setup(root))
        for size in sizes:
            for workload in ("idle", "dirty"):
                if args.deadline and time.time() > args.deadline:
                    print("deadline reached: stopping here", flush=True)
                    raise SystemExit(0)
                cli(conf, "launch", "s1:busybox-vm", "vm", "--vm", "-d", "root,size=256MiB", "-c",
                    "migration.stateful=true", "-c", f"limits.memory={size}")
                wait_agent(conf, "s1:vm")
                if workload == "dirty":
                    cli(conf, "exec", "s1:vm", "--", "sh", "-c", DIRTY)
                cli(conf, "exec", "s1:vm", "--", "sh", "-c", GAP)
                time.sleep(3)
                where = "s1"
                for mode in ("pull", "push", "relay"):
                    other = "s2" if where == "s1" else "s1"
                    r = stapes_move(conf, where, other, mode)
                    rows.append((size, workload, r))
                    print(f"{size} {workload:<5} stapes {mode:<5} wall {r['wall']:.2f} s, downtime "
                          f"{fmt(r['downtime'])} ms, {fmt(r['mib'])} MiB, guest gap {r['gap']:.0f} ms  "
                          f"[{r['line']}]", flush=True)
                    where = other
                    if args.deadline and time.time() > args.deadline:
                        break
                if size not in floors and not (args.deadline and time.time() > args.deadline):
                    machine, binary = machine_record(root / where / "qemu" / "vm")
                    cli(conf, "stop", f"{where}:vm", "--force")
                    vmdir = root / where / "storage-pools" / "default" / "virtual-machines" / "vm"
                    f = floor(machine, binary, vmdir, root / "floor", pids)
                    floors[size] = f
                    print(f"{size} idle  direct QEMU->QEMU total {f['total']:.2f} s (disk READY {f['disk_s']:.2f} s),"
                          f" downtime {f['downtime']} ms, {f['mib']:.0f} MiB", flush=True)
                cli(conf, "delete", f"{where}:vm", "--force")
    finally:
        print("\n| memory | guest | mode | stapes move s | downtime ms | MiB sent | guest gap ms | direct s | "
              "direct downtime ms | direct MiB | total ratio | downtime ratio |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for size, workload, r in rows:
            f = floors.get(size)
            tr = f"{r['wall'] / f['total']:.1f}x" if f else "-"
            dr = f"{r['downtime'] / f['downtime']:.1f}x" if f and r["downtime"] and f["downtime"] else "-"
            print(f"| {size} | {workload} | {r['mode']} | {r['wall']:.2f} | {fmt(r['downtime'])} | {fmt(r['mib'])} | "
                  f"{r['gap']:.0f} | {fmt(f and f['total'], '.2f')} | {fmt(f and f['downtime'])} | "
                  f"{fmt(f and f['mib'])} | {tr} | {dr} |")
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        clean_up(servers, root)


if __name__ == "__main__":
    main()
