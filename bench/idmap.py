"""Benchmark: what shifting a container's files on disk would cost, beside the id-mapped mount Stapes uses
(which costs nothing per file), on the same rootfs and as a ratio to copying it (`tar -c | tar -x`).

    .venv/bin/python bench/idmap.py [--image PATH] [--repeat 3] [--tmpfs]

The rootfs comes from a unified image tarball (default: the Debian 12 build in Stapes's image cache, else the
busybox image built now). Shift = chown every file from container ids to host ids (+1000000), as LXC did
before id-mapped mounts and as a receiving server does for a peer whose map differs; unshift = back. The
runs are interleaved (shift, unshift, copy) so each sees the same disk state.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from migration import tar_floor  # noqa: E402

from stapes.server.idmap import IdRange, unshift  # noqa: E402
from stapes.server.images.busybox import build_busybox_image  # noqa: E402
from stapes.server.images.debian import cache_dir  # noqa: E402

SHIFT = [IdRange(uid=True, gid=True, host=0, inside=1000000, size=65536)]  # inside 0 -> host 1000000
UNSHIFT = [IdRange(uid=True, gid=True, host=1000000, inside=0, size=65536)]


def default_image(scratch: Path) -> Path:
    cached = sorted(cache_dir().glob("debian-12-*.tar.zst"))
    if cached:
        return cached[-1]
    image = scratch / "busybox.tar.gz"
    asyncio.run(build_busybox_image(image))
    return image


def timed(func: object, *args: object) -> tuple[float, object]:
    start = time.perf_counter()
    result = func(*args)  # type: ignore[operator]
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tmpfs", action="store_true", help="work on /dev/shm instead of the real disk")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stapes-bench-idmap-", dir="/dev/shm" if args.tmpfs else "/var/tmp") \
            as tmp:
        scratch = Path(tmp)
        image = args.image or default_image(scratch)
        volume = scratch / "volume"
        volume.mkdir()
        subprocess.run(["tar", "-xf", str(image), "-C", str(volume), "--numeric-owner"], check=True)
        rootfs = volume / "rootfs"
        files = sum(1 for _ in rootfs.rglob("*"))
        shifts, unshifts, copies = [], [], []
        for _ in range(args.repeat):
            seconds, changed = timed(unshift, rootfs, SHIFT)
            shifts.append(seconds)
            seconds, back = timed(unshift, rootfs, UNSHIFT)
            unshifts.append(seconds)
            assert changed == back, (changed, back)
            copies.append(tar_floor(rootfs, scratch / "floor", 1))
            shutil.rmtree(scratch / "floor", ignore_errors=True)
        floor = statistics.median(copies)
        print(f"image {image.name}: {files} files, on {'tmpfs' if args.tmpfs else 'disk'}")
        print(f"  copy (tar | tar, the floor):   {floor:.3f} s")
        for label, runs in (("shift on disk (chown +1e6)", shifts), ("unshift on disk (chown back)", unshifts)):
            median = statistics.median(runs)
            print(f"  {label:29s} {median:.3f} s  ({median / floor:.2f}x the copy)")
        print("  id-mapped mount (what Stapes does): 0 s per file (one mount_setattr at start)")


if __name__ == "__main__":
    main()
