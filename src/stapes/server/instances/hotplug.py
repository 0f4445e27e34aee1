"""Disks attached to (or detached from) a running container: the same mount LXC makes at start, made live.

The server's mount of the volume (id-mapped, below the container's LXC directory, as at start) is cloned
(`open_tree`), made read-only if the disk says so (`mount_setattr`), and the clone is attached inside the
container's mount namespace (`move_mount`). Joining another mount namespace needs a single-threaded process,
so a short helper process does that part (`python -m stapes.server.instances.hotplug`); the server never
changes its own namespaces. The directory inside is created beforehand by the container's own root
(`lxc-attach mkdir -p`), as LXC's `create=dir` does.

A detach unmounts the disk (not lazily: a volume still in use inside stays attached, and the detach fails),
then looks for any other mount of the volume left in the container (its root may have bind-mounted it
elsewhere): those are reported (`VolumesHeld`), and the service keeps the volume in use by the instance until
it stops. A change that fails half-way is undone: the container's mounts are as before the call.

The server's mounts are named by a hash of the device name (`mount_dir`), never by the name itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stapes.api.errors import BadRequest, Conflict, InternalError

if TYPE_CHECKING:
    from stapes.server.instances.driver import InstanceSpec

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_RDONLY = 0x1
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MNT_DETACH = 2
_CLONE_NEWNS = 0x00020000


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _setns(fd: int) -> None:
    """Join a mount namespace (os.setns is Python 3.12's): only a single-threaded process may."""
    _check(_libc.setns(fd, _CLONE_NEWNS), "setns (mount namespace)")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def attach(pid: int, source: str, target: str, readonly: bool = False) -> None:
    """`source` (a host path: the server's mount of the volume) mounted on `target` inside the container."""
    tree = _check(_libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source),
                                _OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC), f"open_tree {source}")
    if readonly:  # before it is attached: never writable inside, not for a moment
        attr = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY)
        _check(_libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, ctypes.byref(attr),
                             ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr (read-only)")
    namespace = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    _setns(namespace)  # also makes the namespace's root our root: `target` resolves inside
    _check(_libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH),
           f"move_mount to {target}")


def detach(pid: int, target: str) -> None:
    """Not lazily (MNT_DETACH would leave it reachable through open files and working directories)."""
    namespace = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    _setns(namespace)
    result = _libc.umount2(os.fsencode(target), 0)
    if result < 0 and ctypes.get_errno() == 16:  # EBUSY
        raise OSError(16, f"umount {target}: a process inside uses it (an open file, a working directory) or "
                          "something is mounted below it")
    _check(result, f"umount {target}")


# The server's side (asyncio), used by the LXC driver.

MkDir = Callable[[str], Awaitable[str]]  # creates a directory inside the container; an error text, or ""


@dataclass(frozen=True)
class Plug:
    """One attached custom volume: the volume's directory, where inside, and whether read-only."""

    volume: Path
    path: str
    readonly: bool


class VolumesHeld(Conflict):
    """The detach took place, but the container still mounts the volume elsewhere (its root bound it there):
    `devices` are the detached disk devices whose volume it still holds."""

    def __init__(self, message: str, devices: list[str]) -> None:
        super().__init__(message)
        self.devices = devices


def plugs(spec: InstanceSpec | None) -> dict[str, Plug]:
    if spec is None:
        return {}
    return {name: Plug(path, spec.devices[name]["path"], spec.devices[name].get("readonly") in ("true", "1"))
            for name, path in spec.volumes.items()}


def mount_dir(mounts: Path, dev_name: str) -> Path:
    """The server's mount of a disk's volume in `mounts`: named by a hash, so that no device name (`..`)
    ever becomes a path part; checked to be exactly a child of `mounts`."""
    child = mounts / ("d" + hashlib.sha256(dev_name.encode()).hexdigest()[:32])
    if os.path.normpath(child.parent) != os.path.normpath(mounts) or not child.name.isalnum():
        raise InternalError(f"Bad mount directory for disk device {dev_name!r}")
    return child


async def replug(old: InstanceSpec | None, new: InstanceSpec, *, pid: int, mounts: Path, mkdir: MkDir) -> None:
    """Apply the change of a running container's attached volumes from `old` to `new`; on any failure undo
    what was done. Raises VolumesHeld (after the change) if a detached volume is still mounted inside."""
    from stapes.server.instances import idmapped

    before, after = plugs(old), plugs(new)
    idmap = (old or new).idmap  # the map the container runs with
    added = {n: p for n, p in after.items() if before.get(n) != p}
    removed = {n: p for n, p in before.items() if after.get(n) != p}
    if idmap and any(p.readonly for p in added.values()):
        raise BadRequest(f"Cannot attach a read-only disk to running unprivileged {new.name!r}: its root could "
                         "make it writable again (a mount made from outside is not locked); stop it first: "
                         "read-only is applied at start")
    helper = [sys.executable, "-m", "stapes.server.instances.hotplug"]

    async def run(*args: str) -> str:
        from stapes.server import process

        result = await process.run([*helper, *args], check=False, timeout=30)
        return "" if result.returncode == 0 else (result.error_text or f"exit status {result.returncode}")

    async def do_detach(name: str, plug: Plug) -> None:
        error = await run("detach", str(pid), plug.path)
        if error:
            raise InternalError(f"Cannot detach disk device {name!r} from running {new.name!r} at {plug.path}: "
                                f"{error}")
        if idmap:
            await asyncio.to_thread(idmapped.unmount, mount_dir(mounts, name))
            with contextlib.suppress(OSError):
                mount_dir(mounts, name).rmdir()

    async def do_attach(name: str, plug: Plug) -> None:
        volume = plug.volume
        if volume.is_symlink() or not volume.is_dir():
            raise InternalError(f"Cannot attach disk device {name!r}: its storage volume is missing ({volume})")
        source = volume
        if idmap:
            await asyncio.to_thread(mounts.mkdir, 0o711, False, True)
            source = mount_dir(mounts, name)
            await asyncio.to_thread(idmapped.mount, volume, source, idmap)
        made = await mkdir(plug.path)
        error = await run("attach", str(pid), str(source), plug.path, *(["ro"] if plug.readonly else []))
        if error:
            if idmap:
                await asyncio.to_thread(idmapped.unmount, source)
            raise InternalError(f"Cannot attach disk device {name!r} to running {new.name!r} at {plug.path}: "
                                f"{error}" + (f" (mkdir -p: {made})" if made else ""))

    done: list[tuple[str, str, Plug]] = []
    try:
        for name, plug in sorted(removed.items()):
            await do_detach(name, plug)
            done.append(("detached", name, plug))
        for name, plug in sorted(added.items()):
            await do_attach(name, plug)
            done.append(("attached", name, plug))
    except BaseException:
        async def undo() -> None:
            for what, name, plug in reversed(done):
                try:
                    await (do_detach(name, plug) if what == "attached" else do_attach(name, plug))
                except Exception as err:  # said in the log: the caller sees the reason of the failure itself
                    log.error("%s: undoing the %s of disk device %s: %s", new.name, what[:-1], name, err)

        await asyncio.shield(undo())
        raise
    still = set(after.values())
    held: dict[str, list[str]] = {}
    for name, plug in sorted(removed.items()):
        if any(p.volume == plug.volume for p in still):
            continue  # still attached by another (or the changed) device
        where = await asyncio.to_thread(mounted_inside, pid, plug.volume)
        if where:
            held[name] = where
    if held:
        said = "; ".join(f"{n} at {', '.join(w)}" for n, w in held.items())
        raise VolumesHeld(f"Detached, but {new.name!r} still mounts the volume of disk device {said} (mounted again "
                          f"from inside): it stays in use by {new.name!r} until it stops", sorted(held))


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (\\040 for a space)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mountinfo(path: Path) -> list[tuple[str, str, str]]:
    """(major:minor, root in its filesystem, mount point) of each mount in a mountinfo file."""
    entries = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5:
            entries.append((fields[2], _unescape(fields[3]), _unescape(fields[4])))
    return entries


def identity(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> tuple[str, str]:
    """The filesystem (major:minor) and the path inside it of a host directory, as mountinfo names mounts."""
    real = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    for entry in _mountinfo(mountinfo):  # the last mount on the longest matching mount point covers it
        point = entry[2]
        covers = real == point or real.startswith(point.rstrip("/") + "/")
        if covers and (best is None or len(point) >= len(best[2])):
            best = entry
    if best is None:
        raise InternalError(f"No mount holds {real}")
    inside = os.path.relpath(real, best[2])
    root = os.path.normpath(os.path.join(best[1], inside)) if inside != "." else best[1]
    return best[0], root


def mounted_inside(pid: int, volume: Path) -> list[str]:
    """Where the container (its init `pid`) still mounts `volume` or a directory in it."""
    device, root = identity(volume)
    found = []
    for dev, mount_root, point in _mountinfo(Path(f"/proc/{pid}/mountinfo")):
        if dev == device and (mount_root == root or mount_root.startswith(root.rstrip("/") + "/")):
            found.append(point)
    return found


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["attach"] and len(argv) in (4, 5):
            attach(int(argv[1]), argv[2], argv[3], argv[4:] == ["ro"])
        elif argv[:1] == ["detach"] and len(argv) == 3:
            detach(int(argv[1]), argv[2])
        else:
            print("usage: hotplug attach PID SOURCE TARGET [ro] | detach PID TARGET", file=sys.stderr)
            return 2
    except OSError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
