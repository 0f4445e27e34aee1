"""Minimal Debian system images, built on the server from the Debian archive with mmdebstrap.

The image boots with its own init (sysvinit: a basic container, as live migration wants it), brings eth0 up by
DHCP (ifupdown + dhclient, which sends the hostname so the network's DNS knows the container by name) and
halts on SIGPWR. A built image is kept in a cache shared by the servers of the host, so the archive is
fetched once a week at most.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from stapes.api.errors import BadRequest, InternalError
from stapes.server import process
from stapes.server.images.store import ARCHITECTURE

RELEASES = {"12": "bookworm", "13": "trixie"}
PACKAGES = ("sysvinit-core", "ifupdown", "isc-dhcp-client", "iproute2", "iputils-ping", "netbase", "procps")
RECIPE = "1"  # bump when the packages or the files written below change: the cache then rebuilds
CACHE_LIFETIME = 7 * 86400
BUILD_TIMEOUT = 1800.0  # a mirror that stops answering must not hold the build operation for ever
DEFAULT_CACHE = Path("/var/cache/stapes/images")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
EXCLUDED = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/locale/*",
            "/usr/share/lintian/*")
INTERFACES = "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n"
Progress = Callable[[str], None]


def cache_dir() -> Path:
    return Path(os.environ.get("STAPES_IMAGE_CACHE") or DEFAULT_CACHE)


def release_of(name: str) -> str:
    """'debian/12' -> '12'; anything else is refused with the names that exist."""
    distribution, _, release = name.partition("/")
    if distribution != "debian" or release not in RELEASES:
        known = ", ".join(f"debian/{r}" for r in RELEASES)
        raise BadRequest(f"Unknown image {name!r}: the images Stapes builds are busybox, {known}")
    return release


def mmdebstrap_argv(release: str, target: Path, mirror: str) -> list[str]:
    """(pure: unit-tested) A minbase system with the packages above, documentation left out."""
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright"]
    argv += [f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDED]
    return [*argv, RELEASES[release], str(target), mirror]


def customise(root: Path, release: str) -> None:
    """What a container needs beyond the packages. Blocking: run it in a thread."""
    inittab = root / "etc/inittab"
    lines = []
    for line in inittab.read_text().splitlines():
        if "getty" in line or line.startswith(("pn::", "po::")):
            continue  # no consoles to serve; power events other than the halt request
        if line.startswith("pf::"):
            line = "pf::powerwait:/sbin/shutdown -h now"  # LXC asks a container to halt with SIGPWR
        lines.append(line)
    inittab.write_text("\n".join(lines) + "\n")
    (root / "etc/network/interfaces").write_text(INTERFACES)
    (root / "etc/hostname").write_text("debian\n")
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (root / leftover).glob("*"):
            if path.is_file():
                path.unlink()
    metadata = {
        "architecture": ARCHITECTURE, "creation_date": int(time.time()),
        "properties": {"os": "debian", "release": RELEASES[release], "version": release, "init": "sysvinit",
                       "description": f"Debian {release} ({RELEASES[release]}) minimal, built by Stapes"},
        "templates": {},
    }
    (root.parent / "metadata.yaml").write_text(yaml.safe_dump(metadata))


async def cached_or_prepared(cached: Path, upload: Path, progress: Progress) -> bool:
    """A fresh cached build copied to `upload` (True); otherwise (False) the cache exists and mmdebstrap is
    there to build into it (BadRequest saying how to install it when not)."""
    cache = cached.parent
    if await asyncio.to_thread(_fresh, cached):
        progress(f"using the cached build {cached}")
        await asyncio.to_thread(shutil.copyfile, cached, upload)
        return True
    if shutil.which("mmdebstrap") is None:
        raise BadRequest("mmdebstrap is not installed on the server: install the mmdebstrap package "
                         "(make install does)")
    await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
    return False


async def build_debian_image(name: str, upload: Path, progress: Progress) -> None:
    """Write the unified image tarball of `name` (debian/12, debian/13) to `upload`, from the cache if fresh."""
    release = release_of(name)
    cache = cache_dir()
    cached = cache / f"debian-{release}-{ARCHITECTURE}-r{RECIPE}.tar.zst"
    if await cached_or_prepared(cached, upload, progress):
        return
    with tempfile.TemporaryDirectory(prefix="stapes-debian-", dir=cache) as tmp:
        os.chmod(tmp, 0o755)
        root = Path(tmp) / "rootfs"
        mirror = os.environ.get("STAPES_DEBIAN_MIRROR") or DEFAULT_MIRROR
        await _run_reporting(mmdebstrap_argv(release, root, mirror), progress)
        progress("customising the system for a container")
        await asyncio.to_thread(customise, root, release)
        progress("packing the image")
        packed = Path(tmp) / "image.tar.zst"
        await process.run(["tar", "--zstd", "-cf", str(packed), "--numeric-owner", "--xattrs",
                           "--xattrs-include=*", "-C", tmp, "metadata.yaml", "rootfs"], timeout=1800)
        await asyncio.to_thread(shutil.copyfile, packed, upload)
        await asyncio.to_thread(os.replace, packed, cached)  # complete, then visible to other builds


def _fresh(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime < CACHE_LIFETIME
    except OSError:
        return False


async def _run_reporting(argv: list[str], progress: Progress) -> None:
    """Run mmdebstrap, passing each of its 'I: ...' lines on as the build's progress."""
    proc = await process.spawn(argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                               stderr=asyncio.subprocess.PIPE)
    tail: list[str] = []
    try:
        async with process.reaped(proc), asyncio.timeout(BUILD_TIMEOUT):
            assert proc.stderr is not None
            async for raw in proc.stderr:
                line = raw.decode(errors="replace").strip()
                tail = (tail + [line])[-5:]
                if line.startswith("I: "):
                    progress(line[3:])
            code = await proc.wait()
    except TimeoutError:
        raise InternalError(f"mmdebstrap did not finish within {BUILD_TIMEOUT:.0f} s (last: {' / '.join(tail)}): "
                            "check that the server reaches the Debian mirror, or set STAPES_DEBIAN_MIRROR") from None
    if code != 0:
        raise InternalError(f"mmdebstrap failed (exit status {code}): {' / '.join(tail)}")
