"""A file tree with every kind of thing a root filesystem holds, and a fingerprint of a tree that covers
content, mode, owner, xattrs, symlinks, hard links, sparse files, device nodes and fifos."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def populate(root: Path) -> None:
    data = root / "data"
    data.mkdir(mode=0o750)
    (data / "text.txt").write_text("hello stapes\n" * 100)
    os.chown(data / "text.txt", 1234, 5678)
    os.chmod(data / "text.txt", 0o640)
    (data / "random.bin").write_bytes(os.urandom(3 * 2**20 + 17))
    (data / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(data / "setuid", 0o4755)
    (data / "xattr.txt").write_text("x")
    os.setxattr(data / "xattr.txt", "user.stapes", b"kept")
    (data / "link").symlink_to("text.txt")
    (data / "dangling").symlink_to("/no/such/target")
    os.link(data / "random.bin", data / "hardlink.bin")
    with (data / "sparse.img").open("wb") as handle:
        handle.seek(64 * 2**20)
        handle.write(b"end")
    os.mknod(data / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(data / "fifo")
    (data / "empty-dir").mkdir(mode=0o700)
    os.utime(data / "text.txt", (1_600_000_000, 1_600_000_000))


def fingerprint(root: Path) -> dict[str, tuple[object, ...]]:
    result: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            entry: list[object] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISREG(st.st_mode):
                entry += [st.st_size, hashlib.sha256(path.read_bytes()).hexdigest(), int(st.st_mtime)]
                entry.append(inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None)
                entry.append(st.st_blocks * 512 < st.st_size)  # still sparse
                entry.append(sorted((k, os.getxattr(path, k)) for k in os.listxattr(path) if k.startswith("user.")))
            elif stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(path))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry.append(st.st_rdev)
            result[rel] = tuple(entry)
    return result
