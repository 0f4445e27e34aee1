"""Id-mapped bind mounts made by the server itself (open_tree, mount_setattr, move_mount).

An unprivileged container's root is the unshifted rootfs seen through an id-mapped mount. LXC can make that
mount (`lxc.rootfs.options = idmap=container`), but CRIU cannot restore it: a restored container would see
its files as nobody's. So the server makes the mount itself, below the container's LXC directory, and LXC
bind-mounts it as an ordinary directory; a bind mount keeps the id mapping of the mount it copies, at the
first start as after a restore, on either server.

Blocking (system calls): run it in a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from stapes.server.idmap import IdRange

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_MOUNT_ATTR_NODEV = 0x00000004  # no device node opens: an unprivileged root never legitimately has one
_MNT_DETACH = 2


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def map_lines(ranges: Sequence[IdRange], uid: bool) -> str:
    """/proc/<pid>/uid_map (or gid_map) text for the ranges of one kind (pure: unit-tested)."""
    return "".join(f"{r.inside} {r.host} {r.size}\n" for r in ranges if (r.uid if uid else r.gid))


@contextlib.contextmanager
def _user_namespace(ranges: Sequence[IdRange]) -> Iterator[int]:
    """An fd of a user namespace with the container's map: a short-lived process made for it holds it."""
    holder = subprocess.Popen(["unshare", "--user", "sleep", "60"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True)
    try:
        proc = Path(f"/proc/{holder.pid}")
        own = os.stat("/proc/self/ns/user").st_ino
        for _ in range(2000):  # until unshare(1) has made its namespace (a few ms)
            if os.stat(proc / "ns/user").st_ino != own:
                break
            if holder.poll() is not None:
                raise OSError(f"unshare --user failed: {holder.stderr.read().decode() if holder.stderr else ''}")
            os.sched_yield()
        (proc / "uid_map").write_text(map_lines(ranges, uid=True))
        (proc / "gid_map").write_text(map_lines(ranges, uid=False))
        fd = os.open(proc / "ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        holder.kill()
        holder.wait()
        if holder.stderr is not None:
            holder.stderr.close()


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == target for line in mounts)


def unmount(path: Path) -> None:
    """Detach whatever is mounted on `path` (lazily: a process still inside keeps its view until it ends)."""
    while is_mounted(path):
        _check(_libc.umount2(os.fsencode(path), _MNT_DETACH), f"umount {path}")


def mount(source: Path, target: Path, ranges: Sequence[IdRange]) -> None:
    """`source` bind-mounted on `target`, its owners seen through `ranges` (whatever was mounted there first
    is detached)."""
    target.mkdir(mode=0o711, exist_ok=True)
    unmount(target)
    tree = _check(_libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source),
                                _OPEN_TREE_CLONE | os.O_CLOEXEC), f"open_tree {source}")
    try:
        with _user_namespace(ranges) as userns:
            attr = _MountAttr(attr_set=_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_NODEV, attr_clr=0, propagation=0,
                              userns_fd=userns)
            _check(_libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
                                 ctypes.sizeof(attr)), f"mount_setattr (idmap) on {source}")
        _check(_libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH),
               f"move_mount to {target}")
    finally:
        os.close(tree)
