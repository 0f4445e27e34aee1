"""Files inside an instance's root filesystem, resolved as the instance sees them, never through the host.

A container's rootfs belongs to whoever runs inside it (or to the image's author): any component of a path
may be a symlink to a host directory. `openat2(RESOLVE_IN_ROOT)` resolves every component, symlinks
included, inside the root, so `/etc -> /host/etc` stays in the rootfs. Only regular files are read or
written: a FIFO or a device node planted at the path is refused, not opened for writing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

_SYS_OPENAT2 = 437  # x86_64 and aarch64 share the generic syscall number
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_IN_ROOT = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class OutsideRoot(OSError):
    """The path cannot be opened as a regular file inside the root."""


def _openat2(dirfd: int, path: str, flags: int, mode: int) -> int:
    mode = mode if flags & os.O_CREAT else 0  # the kernel refuses a mode without O_CREAT
    how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV)
    fd = int(_libc.syscall(_SYS_OPENAT2, dirfd, path.encode(), ctypes.byref(how), ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{os.strerror(code)}: {path}")
    return fd


def _open_regular(root: Path, path: str, flags: int, mode: int = 0o644) -> int:
    # O_NOFOLLOW: the root itself must be a real directory (a received `rootfs -> /` is refused here).
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # O_NONBLOCK: a FIFO at the path must not hang the server; O_TRUNC never (a device would take it).
        fd = _openat2(rootfd, path, flags | os.O_NONBLOCK, mode)
    finally:
        os.close(rootfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutsideRoot(errno.EINVAL, f"{path} in {root} is not a regular file")
    return fd


def read_text(root: Path, path: str) -> str:
    fd = _open_regular(root, path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        return handle.read(1 << 20).decode(errors="replace")


def write_text(root: Path, path: str, text: str) -> None:
    """Create or replace a regular file's contents, inside `root` only."""
    fd = _open_regular(root, path, os.O_WRONLY | os.O_CREAT)
    with os.fdopen(fd, "wb") as handle:
        handle.truncate(0)
        handle.write(text.encode())
