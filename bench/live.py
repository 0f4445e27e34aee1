"""Benchmark: live moves of running containers holding 64 and 256 MiB of memory, between two local servers,
against CRIU's own dump + restore of the same container in the same run (the physical floor).

    .venv/bin/python bench/live.py [--repeat 3] [--sizes 64,256] [--privileged] [--incus]

For each size: a container runs a static helper that fills that much memory with random bytes and then
sleeps, beside a shell loop. The floor is `lxc-checkpoint -s` then `lxc-checkpoint -r` of that container on
its own server, with the same CRIU, configuration and image directory as the daemon uses (frozen = dump +
restore). Then `stapes move` runs back and forth between the servers, timed as a user runs it (the whole
command, start-up included). The frozen time is measured from inside: the helper wakes every 5 ms and records
each pause longer than 50 ms by the wall clock (CRIU's time namespace hides a freeze from the monotonic and
boot clocks), and the longest one during the move is how long the container did not run; the source's own
figure (from the checkpoint until the target confirmed) is printed beside it. Everything on the real disk.

--incus adds the anchor: the same containers moved live by `incus move` between two real Incus 6.0 servers on
this host (bench/incus_pair.py), with the same CRIU, timed and measured the same way. Incus's containers are
privileged (it cannot restore an id-mapped root) and carry `raw.lxc` lines without which its restore fails
here (no console pty, no AppArmor profile); use --privileged to compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.incus_pair import client as incus_client  # noqa: E402
from bench.incus_pair import incus_pair  # noqa: E402
from tests.integration.harness import STAPES, Cli, Cluster, Server  # noqa: E402

# Fills its memory, then wakes every 5 ms and records each pause longer than 50 ms by the wall clock
# (CLOCK_REALTIME: CRIU's time namespace hides a freeze from the monotonic and boot clocks, not from this one).
HOLD_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    size_t size = (size_t)atol(argv[1]) << 20;
    char *memory = malloc(size);
    int fd = open("/dev/urandom", O_RDONLY);
    for (size_t done = 0; done < size;) {
        ssize_t got = read(fd, memory + done, size - done > 1 << 20 ? 1 << 20 : size - done);
        if (got <= 0) return 1;
        done += (size_t)got;
    }
    close(fd);
    double previous = now();
    for (;;) {
        struct timespec tick = {0, 5000000};
        nanosleep(&tick, NULL);
        double current = now();
        if (current - previous > 0.05) {
            FILE *gaps = fopen("/root/gaps", "a");
            if (gaps) { fprintf(gaps, "%.6f %.6f\n", current, current - previous); fclose(gaps); }
        }
        previous = current;
    }
}
"""


def build_helper(directory: Path) -> Path:
    source, binary = directory / "hold.c", directory / "hold"
    source.write_text(HOLD_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def rootfs(server: Server, name: str) -> Path:
    return server.state_dir / "storage-pools/default/containers" / name / "rootfs"


WORKLOAD = "setsid /usr/local/bin/hold {size} </dev/null >/dev/null 2>&1 &"


def wait_filled(run: Callable[[str], str], size: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the helper filled its memory
        out = run("grep VmRSS /proc/$(pidof hold)/status")
        if out.split() and int(out.split()[1]) >= size * 1024 * 0.95:
            return
        time.sleep(0.5)
    raise RuntimeError("the memory helper never filled its memory")


def prepare(cli: Cli, server: Server, remote: str, name: str, size: int, helper: Path, privileged: bool,
            lazy: bool = False) -> None:
    args = (["-c", "security.privileged=true"] if privileged else []) + (["-c", "migration.lazy=true"] if lazy else [])
    cli.run("launch", f"{remote}:busybox", name, "-q", *args)
    target = rootfs(server, name) / "usr/local/bin/hold"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(helper.read_bytes())
    target.chmod(0o755)
    cli.run("exec", f"{remote}:{name}", "--", "sh", "-c", WORKLOAD.format(size=size))
    wait_filled(lambda command: cli.run("exec", f"{remote}:{name}", "--", "sh", "-c", command, check=False).stdout,
                size)


def criu_floor(server: Server, name: str, scratch: Path) -> tuple[float, float, int]:
    """CRIU alone, as liblxc drives it: (dump seconds, restore seconds, image bytes)."""
    env = dict(os.environ)
    env["PATH"] = f"/opt/stapes/criu/sbin:{env['PATH']}"
    env["CRIU_CONFIG_FILE"] = str(server.state_dir / "criu.conf")
    images = scratch / f"floor-{name}-{time.monotonic_ns()}"
    images.mkdir()
    lxc = ["-P", str(server.state_dir / "containers"), "-n", name, "-D", str(images)]
    start = time.perf_counter()
    subprocess.run(["lxc-checkpoint", *lxc, "-s"], env=env, check=True, capture_output=True)
    dumped = time.perf_counter()
    subprocess.run(["lxc-checkpoint", *lxc, "-r"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    restored = time.perf_counter()
    size = sum(p.stat().st_size for p in images.iterdir() if p.is_file())
    subprocess.run(["rm", "-rf", str(images)], check=True)
    return dumped - start, restored - dumped, size


def longest_gap(gaps: str, since: float) -> float:
    """The longest pause the helper recorded (lines 'when gap') that ended after `since` (pure)."""
    found = [line.split() for line in gaps.splitlines()]
    return max((float(gap) for when, gap in (f for f in found if len(f) == 2) if float(when) >= since), default=0.0)


def wall() -> float:
    return time.time()


def live_move(cli: Cli, name: str, source: str, target: str) -> tuple[float, float, float]:
    """(total seconds of the command, frozen seconds seen from inside, frozen as the source reported)."""
    before = wall()
    start = time.perf_counter()
    result = subprocess.run([STAPES, "move", f"{source}:{name}", f"{target}:"], env=cli.env(),
                            capture_output=True, text=True, check=True)
    total = time.perf_counter() - start
    reported = float(result.stdout.split("frozen ")[1].split("s")[0])
    time.sleep(0.3)  # the helper records its pause at its first wake-up after the restore
    gaps = cli.run("exec", f"{target}:{name}", "--", "cat", "/root/gaps", check=False).stdout
    return total, longest_gap(gaps, before), reported


def incus_moves(scratch: Path, helper: Path, sizes: list[int], repeat: int) -> dict[int, tuple[float, float]]:
    """Median (total, frozen) of `incus move` of a running privileged container between two Incus servers."""
    config = scratch / "criu.conf"
    config.write_text("network-lock nftables\n")
    found: dict[int, tuple[float, float]] = {}
    with incus_pair(scratch, config) as (a, b, conf):
        for size in sizes:
            name = f"live{size}"
            # What Incus needs here to restore a container (BRIEF §5): no console pty on either side, no
            # AppArmor profile named on a host without AppArmor; privileged (its id-mapped root is not restored).
            incus_client(conf, a, "launch", "a:busybox", f"a:{name}", "-c", "security.privileged=true",
                         "-c", "raw.lxc=lxc.console.path = none\nlxc.apparmor.profile =")
            incus_client(conf, a, "file", "push", str(helper), f"a:{name}/usr/local/bin/hold", "--mode", "0755",
                         "--create-dirs")
            incus_client(conf, a, "exec", f"a:{name}", "--", "sh", "-c", WORKLOAD.format(size=size))
            wait_filled(lambda command, n=name: incus_client(conf, a, "exec", f"a:{n}", "--", "sh", "-c",  # type: ignore[misc]
                                                             command).stdout, size)
            runs, where = [], ("a", "b")
            for _ in range(repeat):
                before = wall()
                start = time.perf_counter()
                incus_client(conf, a, "move", f"{where[0]}:{name}", f"{where[1]}:")
                total = time.perf_counter() - start
                time.sleep(0.3)
                gaps = incus_client(conf, a, "exec", f"{where[1]}:{name}", "--", "sh", "-c",
                                    "cat /root/gaps 2>/dev/null; true").stdout
                runs.append((total, longest_gap(gaps, before)))
                where = (where[1], where[0])
            found[size] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            print(json.dumps({"incus_memory_mib": size, "incus_total_s": round(found[size][0], 3),
                              "incus_frozen_s": round(found[size][1], 3)}), flush=True)
            incus_client(conf, a, "delete", f"{where[0]}:{name}", "--force")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--privileged", action="store_true", help="privileged containers (default: unprivileged)")
    parser.add_argument("--incus", action="store_true", help="also move the same containers between two Incus servers")
    parser.add_argument("--lazy", action="store_true", help="the moved containers use lazy pages (post-copy)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="stapes-bench-live-", dir="/var/tmp"))
    helper = build_helper(scratch)
    cluster = Cluster()
    results = []
    try:
        s1, s2 = cluster.server("s1", "127.0.0.1"), cluster.server("s2", "127.0.0.2")
        cli = cluster.cli()
        cli.trust(s1, "s1")
        cli.trust(s2, "s2")
        sizes = [int(s) for s in args.sizes.split(",")]
        for size in sizes:
            floor_name, moved = f"floor{size}", f"live{size}"
            prepare(cli, s1, "s1", floor_name, size, helper, args.privileged)
            prepare(cli, s1, "s1", moved, size, helper, args.privileged, args.lazy)
            floors, moves = [], []
            where = ("s1", "s2")
            for _ in range(args.repeat):  # interleaved: the floor, then a move, on the same machine state
                floors.append(criu_floor(s1, floor_name, scratch))
                moves.append(live_move(cli, moved, *where))
                where = (where[1], where[0])
            dump = statistics.median(f[0] for f in floors)
            restore = statistics.median(f[1] for f in floors)
            total = statistics.median(m[0] for m in moves)
            frozen = statistics.median(m[1] for m in moves)
            reported = statistics.median(m[2] for m in moves)
            row = {"memory_mib": size, "criu_dump_s": round(dump, 3), "criu_restore_s": round(restore, 3),
                   "criu_images_mib": round(statistics.median(f[2] for f in floors) / 2**20, 1),
                   "stapes_total_s": round(total, 3), "stapes_frozen_s": round(frozen, 3),
                   "stapes_frozen_reported_s": round(reported, 3),
                   "frozen_ratio": round(frozen / (dump + restore), 2),
                   "total_ratio": round(total / (dump + restore), 2)}
            results.append(row)
            print(json.dumps(row), flush=True)
            cli.run("delete", f"s1:{floor_name}", "--force")
            cli.run("delete", f"{where[0]}:{moved}", "--force")
        cluster.close()
        incus = incus_moves(scratch, helper, sizes, args.repeat) if args.incus else {}
    finally:
        cluster.close()
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    for r in results:
        if r["memory_mib"] in incus:
            r["incus_total_s"], r["incus_frozen_s"] = (round(v, 3) for v in incus[r["memory_mib"]])
    print(f"\n{'memory':>8} {'CRIU dump+restore':>18} {'stapes frozen':>14} {'ratio':>6} {'stapes total':>13} "
          f"{'ratio':>6}")
    for r in results:
        floor = r["criu_dump_s"] + r["criu_restore_s"]
        print(f"{r['memory_mib']:>5}MiB {floor:>17.2f}s {r['stapes_frozen_s']:>13.2f}s {r['frozen_ratio']:>5}x "
              f"{r['stapes_total_s']:>12.2f}s {r['total_ratio']:>5}x")
        if "incus_total_s" in r:
            print(f"{'':>8} {'Incus 6.0:':>18} {r['incus_frozen_s']:>13.2f}s "
                  f"{r['incus_frozen_s'] / floor:>5.2f}x {r['incus_total_s']:>12.2f}s "
                  f"{r['incus_total_s'] / floor:>5.2f}x")


if __name__ == "__main__":
    main()
