"""Moving instances between a real Incus 6.0 server and a Stapes server: the whole `incus copy` / `stapes copy`
command as a user runs it, each direction and mode, as a ratio to the physical floor measured in the same run
(`tar -c | tar -x` of the same rootfs). The servers share one network namespace made for the run.

    .venv/bin/python bench/interop.py [--repeat 3] [--size-mib 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.migration import tar_floor  # noqa: E402
from tests.integration.incus_peer import incus_and_stapes, missing  # noqa: E402

MODES = ("pull", "push", "relay")


def timed(run: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(run, env=env, check=True, capture_output=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=200)
    args = parser.parse_args()
    if reason := missing():
        sys.exit(f"bench/interop: {reason}")
    with incus_and_stapes("dir") as peers:
        incus, stapes, client, cli, netns = peers.incus, peers.stapes, peers.client, peers.cli, peers.incus.netns
        incus.local("init", "busybox", "src")
        subprocess.run(["dd", "if=/dev/urandom", f"of={incus.rootfs('src') / 'random.bin'}", "bs=1M",
                        f"count={args.size_mib}", "status=none"], check=True)
        cli.run("init", "st:busybox", "st:src", "-q")
        shutil.copy(incus.rootfs("src") / "random.bin", stapes.state_dir / "storage-pools/default/containers/"
                    "src/rootfs/random.bin")
        floor = tar_floor(incus.rootfs("src"), peers.cluster.root / "scratch", args.repeat, sync=True)
        incus_env = dict(os.environ, INCUS_CONF=str(client.conf), HOME=str(client.conf))
        ns = ["nsenter", f"--net=/run/netns/{netns}", "--"]
        cases = []
        for mode in MODES:
            for tool, direction in (("incus", "incus->stapes"), ("incus", "stapes->incus"),
                                    ("stapes", "incus->stapes"), ("stapes", "stapes->incus")):
                src, dst = ("inc", "st") if direction == "incus->stapes" else ("st", "inc")
                times = []
                for i in range(args.repeat):
                    name = f"c-{mode}-{i}"
                    if tool == "incus":
                        run, env = [*ns, "incus", "copy", f"{src}:src", f"{dst}:{name}", "--mode", mode], incus_env
                    else:
                        run, env = [*ns, str(Path(sys.executable).parent / "stapes"), "copy", f"{src}:src",
                                    f"{dst}:{name}", "--mode", mode], cli.env()
                    times.append(timed(run, env))
                    if dst == "inc":
                        incus.local("delete", name)
                    else:
                        stapes.api("DELETE", f"/1.0/instances/{name}")
                        time.sleep(0.5)
                cases.append((direction, tool, mode, statistics.median(times)))
        print(f"Incus {incus.local('version').stdout.split()[-1]} <-> Stapes, {args.size_mib} MiB random "
              f"+ busybox, dir pools, real disk, median of {args.repeat}")
        print(f"floor: tar -c | tar -x  {floor:6.2f} s")
        print(f"{'direction':15} {'client':7} {'mode':6} {'seconds':>8} {'x floor':>8}")
        for direction, tool, mode, seconds in cases:
            print(f"{direction:15} {tool:7} {mode:6} {seconds:8.2f} {seconds / floor:8.1f}")


if __name__ == "__main__":
    main()
