"""Benchmark: launch, start, stop, exec and list with N instances through Stapes, and the raw lxc-* tools
doing the same work in the same run, printed as milliseconds per call and as a ratio.

    .venv/bin/python bench/lifecycle.py [--count 200]

The raw baseline: untar the same image + write an LXC config + lxc-start (launch), lxc-start (start),
lxc-stop -k (stop --force), lxc-attach -- true (exec), lxc-ls --fancy (list).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stapes.client.client import Client  # noqa: E402
from stapes.client.config import ClientConfig  # noqa: E402
from stapes.server.images.busybox import build_busybox_image  # noqa: E402
from stapes.server.instances.driver import InstanceSpec  # noqa: E402
from stapes.server.instances.lxc import cgroup_v2_only, render_config  # noqa: E402

BIN = Path(sys.executable).parent


def timed(label: str, count: int, action: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for i in range(count):
        action(i)
    per_call = (time.perf_counter() - start) * 1000 / count
    print(f"  {label:<10} {per_call:8.1f} ms/call", flush=True)
    return per_call


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def bench_stapes(root: Path, count: int, list_calls: int) -> dict[str, float]:
    state = root / "stapes-state"
    server = subprocess.Popen([str(BIN / "stapesd"), "--state-dir", str(state)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if (state / "unix.socket").exists():
                break
            time.sleep(0.1)
        os.environ["STAPES_DIR"] = str(state)
        client = Client("local", ClientConfig.load(root / "client"))
        names = [f"b{i}" for i in range(count)]
        results = {"launch": timed("launch", count, lambda i: client.create_instance(
            {"name": names[i], "source": {"type": "image", "alias": "busybox"}, "start": True}))}
        results["exec"] = timed("exec", count, lambda i: client.exec(names[i], ["true"]))
        results["list"] = timed("list", list_calls, lambda i: client.instances(recursion=2))
        results["stop"] = timed("stop", count, lambda i: client.change_state(names[i], "stop", force=True))
        results["start"] = timed("start", count, lambda i: client.change_state(names[i], "start"))
        for name in names:
            client.change_state(name, "stop", force=True)
            client.delete_instance(name)
        client.close()
    finally:
        server.terminate()
        server.wait(30)
    return results


def bench_raw(root: Path, count: int, list_calls: int) -> dict[str, float]:
    import asyncio

    lxc_path = root / "raw-lxc"
    lxc_path.mkdir()
    tarball = root / "busybox.tar.gz"
    asyncio.run(build_busybox_image(tarball))
    cgroup2 = cgroup_v2_only()
    names = [f"r{i}" for i in range(count)]

    def launch(i: int) -> None:
        volume = root / "raw-volumes" / names[i]
        volume.mkdir(parents=True)
        run("tar", "-xf", str(tarball), "-C", str(volume), "--numeric-owner")
        spec = InstanceSpec("default", names[i], {}, {}, volume)
        (lxc_path / names[i]).mkdir()
        config = render_config(spec, lxc_dir=lxc_path / names[i], server_id="rawbench", cgroup2=cgroup2,
                               apparmor=False)
        (lxc_path / names[i] / "config").write_text(config)
        run("lxc-start", "-P", str(lxc_path), "-n", names[i])

    results = {"launch": timed("launch", count, launch)}
    results["exec"] = timed("exec", count, lambda i: run("lxc-attach", "-P", str(lxc_path), "-n", names[i],
                                                         "--clear-env", "--", "true"))
    results["list"] = timed("list", list_calls, lambda i: run("lxc-ls", "-P", str(lxc_path), "--fancy"))
    results["stop"] = timed("stop", count, lambda i: run("lxc-stop", "-P", str(lxc_path), "-n", names[i], "-k"))
    results["start"] = timed("start", count, lambda i: run("lxc-start", "-P", str(lxc_path), "-n", names[i]))
    for name in names:
        subprocess.run(["lxc-stop", "-P", str(lxc_path), "-n", name, "-k"], capture_output=True, check=False)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="instances (default 200)")
    parser.add_argument("--list-calls", type=int, default=20, help="list calls with all instances present")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="stapes-bench-"))
    try:
        print(f"raw lxc-* tools, {args.count} containers:")
        raw = bench_raw(root, args.count, args.list_calls)
        print(f"stapes (client library -> stapesd -> lxc-*), {args.count} containers:")
        stapes = bench_stapes(root, args.count, args.list_calls)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n| operation | stapes ms/call | raw lxc-* ms/call | ratio |")
    print("|---|---:|---:|---:|")
    for op in ("launch", "start", "stop", "exec", "list"):
        print(f"| {op} | {stapes[op]:.1f} | {raw[op]:.1f} | {stapes[op] / raw[op]:.2f}x |")


if __name__ == "__main__":
    main()
