"""Backup tarballs in Incus's non-optimized layout, written by GNU tar and checked member by member before any
member is extracted.

Layout (as Incus's `genericVFSBackupVolume` writes it): `backup/index.yaml` (the instance, its snapshots, pool,
profiles and volume), `backup/container/` (the volume: `rootfs/`, `metadata.yaml`, `templates/`, and Incus's
`backup.yaml`), `backup/snapshots/<snapshot>/` (each snapshot's volume).

The archive comes from whoever holds a trusted certificate, possibly hostile. `check_members` (in a child
process of its own, under a memory limit: Python's tarfile reads a pax header whole) reads it once, decompressed
by the tool its magic names, and refuses anything that could write outside the new volume or more than the pool
holds; as it goes it writes the accepted members again as a canonical plain PAX tar (normalized names, type,
mode, owner, mtime, link target, the restored xattrs as SCHILY.xattr.* records, data streamed; sparse files as
GNU sparse 1.0). Only that canonical file, block 0 a ustar header Python wrote, is extracted by GNU tar, member
names selected, into the empty volume: the upload itself never reaches GNU tar, whose reading of it may differ
from Python's (a gzip header whose FEXTRA holds a tar, a garbage block, two long-name headers in a row). A
stream Python stopped reading anywhere but at its end (only zero blocks may follow) is refused. Refused:
absolute names, `..` and `.` components (a leading `./` excepted), names outside the layout, a member below a
symlink of the archive (even one made earlier in it), a symlink where a directory was, hard links leaving their
own tree or passing a symlink, block and character devices for an unprivileged instance (its root could never
have made them; overlayfs whiteouts, char 0:0, excepted), owners beyond an unprivileged instance's id range (in
POSIX ACLs too), and more data than the pool has room for.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

INDEX = "backup/index.yaml"
CONTAINER = "backup/container"
SNAPSHOTS = "backup/snapshots"
INCUS_CONFIG = "backup.yaml"  # Incus keeps the instance's config in its volume: written for Incus, dropped here
MAX_INDEX_BYTES = 1 << 20  # as Incus reads it
CHECKER_MEMORY = 1 << 30
ENTRY_COST = 4096  # what a directory or inode costs the pool, besides its data

COMPRESSION_TOOLS: dict[str, list[str]] = {"gzip": ["gzip", "-c", "-n"], "zstd": ["zstd", "-c", "-q", "-T0"],
                                           "xz": ["xz", "-c", "-T0"], "bzip2": ["bzip2", "-c"]}
DECOMPRESSION_TOOLS: dict[str, list[str]] = {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dcq"],
                                             "xz": ["xz", "-dc"], "bzip2": ["bzip2", "-dc"]}
TAR_CREATE = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse", "--one-file-system"]
# What an import restores of the archive's extended attributes: users', file capabilities and ACLs (never
# security.selinux or trusted.*, which the host's own security machinery reads).
XATTRS_RESTORED = ["user.*", "security.capability", "system.posix_acl_access", "system.posix_acl_default"]
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_IDS = {0x02: "user", 0x08: "group"}  # ACL_USER, ACL_GROUP: the entries that name an id
BUFSIZE = 1 << 16  # what the checker reads of the decompressed stream at a time
COPY = 1 << 20


class ArchiveRefused(Exception):
    """The archive breaks a rule: the message names the member and the rule."""


def compression_of(head: bytes) -> str | None:
    """The compression a file starting with `head` (at least 512 bytes when available) uses; None: not a
    tarball at all (pure: unit-tested)."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head[257:262] == b"ustar":
        return "none"
    return None


def _bre(text: str) -> str:
    """`text` as a literal in a GNU tar --transform (basic regular expression, '#' as the delimiter, which no
    name may hold)."""
    return "".join("\\" + c if c in "\\.[]*^$" else c for c in text)


def export_argv(pool_root: Path, volume: Path, snapshots: Iterable[Path], work: Path) -> list[str]:
    """GNU tar writing the backup to stdout: `work` holds index.yaml and backup.yaml; the volume and each
    snapshot directory lie below `pool_root`. Names are renamed into the layout by anchored transforms that
    never touch symlink targets (S); the volume's own backup.yaml (from Incus) is left out for ours."""
    vol = volume.relative_to(pool_root).as_posix()
    snaps = [s.relative_to(pool_root).as_posix() for s in snapshots]
    snap_parent = f"{vol.split('/', 1)[0]}-snapshots/{vol.split('/', 1)[1]}"
    transforms = [f"s#^{_bre(vol)}$#{CONTAINER}#S", f"s#^{_bre(vol)}/#{CONTAINER}/#S",
                  f"s#^{_bre(snap_parent)}/#{SNAPSHOTS}/#S", f"s#^index\\.yaml$#{INDEX}#S",
                  f"s#^{_bre(INCUS_CONFIG)}$#{CONTAINER}/{INCUS_CONFIG}#S"]
    excluded = [f"--exclude={path}/{INCUS_CONFIG}" for path in (vol, *snaps)]
    return ["tar", "-cf", "-", *TAR_CREATE, *[f"--transform={t}" for t in transforms], "--anchored",
            "--no-wildcards", *excluded, "-C", str(work), "index.yaml", "-C", str(pool_root), vol, "-C", str(work),
            INCUS_CONFIG, *(["-C", str(pool_root), *snaps] if snaps else [])]


def extract_argv(canonical: Path, target: Path, member: str) -> list[str]:
    """GNU tar extracting one tree (`backup/container` or `backup/snapshots/<s>`) of the canonical archive the
    checker wrote (never the upload) into the empty directory `target`, with owners, modes and the restored
    xattrs. Its block 0 is a ustar header, which GNU tar always reads as an uncompressed archive (the
    service checks it first); Python marks binary pax values with `hdrcharset`, which GNU tar does not know
    (and need not: it takes SCHILY.xattr values as bytes)."""
    strip = member.count("/") + 1
    return ["tar", "-xf", str(canonical), "-C", str(target), f"--strip-components={strip}", "--numeric-owner",
            "--same-owner", "--same-permissions", "--xattrs", *[f"--xattrs-include={x}" for x in XATTRS_RESTORED],
            "--warning=no-unknown-keyword", "--no-wildcards", "--anchored", "--delay-directory-restore", "--",
            member]


@dataclass
class Policy:
    """What the archive may hold. `room`: the bytes the pool can take; `max_id`: the highest owner an
    unprivileged instance has (None: privileged); `devices`: device nodes allowed (privileged)."""

    snapshots: frozenset[str]
    room: int
    max_id: int | None = 65535
    devices: bool = False


@dataclass
class Summary:
    data_bytes: int = 0
    members: int = 0
    largest: int = 0
    snapshots_seen: set[str] = field(default_factory=set)
    container_seen: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"data_bytes": self.data_bytes, "members": self.members, "largest": self.largest,
                "snapshots_seen": sorted(self.snapshots_seen), "container_seen": self.container_seen}


def _parts(name: str, what: str) -> list[str]:
    if "\x00" in name:
        raise ArchiveRefused(f"The backup's {what} {name!r} holds a NUL character")
    if name.startswith("/"):
        raise ArchiveRefused(f"The backup's {what} {name!r} is an absolute path: every member must lie below "
                             "backup/")
    parts = [p for p in name.split("/") if p != ""]
    while parts[:1] == ["."]:  # ./backup/...: as `tar -C dir .` writes
        parts.pop(0)
    if ".." in parts:
        raise ArchiveRefused(f"The backup's {what} {name!r} climbs out with '..'")
    if "." in parts:  # backup/container/. would be the volume directory itself
        raise ArchiveRefused(f"The backup's {what} {name!r} holds a '.' component")
    return parts


class Checker:
    """Member by member, in archive order (pure: unit-tested with hand-made members)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.summary = Summary()
        self._symlinks: set[str] = set()
        self._directories: set[str] = set()

    def _tree(self, parts: list[str], name: str) -> str | None:
        """The tree a member belongs to: 'container', 'snapshot:<name>', or None for the layout's own entries
        (backup/, backup/snapshots/, backup/index.yaml)."""
        path = "/".join(parts)
        if path in ("backup", SNAPSHOTS, INDEX):
            return None
        if parts[:2] == ["backup", "container"]:
            return "container"
        if parts[:2] == ["backup", "snapshots"] and len(parts) >= 3:
            if parts[2] not in self.policy.snapshots:
                raise ArchiveRefused(f"The backup holds files of snapshot {parts[2]!r} ({name!r}), which its "
                                     "index.yaml does not list")
            return f"snapshot:{parts[2]}"
        if path in ("backup/container.bin", "backup/virtual-machine.img") or path.startswith("backup/volume"):
            raise ArchiveRefused(f"The backup holds {name!r}: an optimized (pool-specific) or virtual-machine "
                                 "backup, which this server cannot import; export it without --optimized-storage")
        raise ArchiveRefused(f"The backup holds {name!r}, outside its layout (backup/index.yaml, "
                             "backup/container/, backup/snapshots/<snapshot>/)")

    def _below_symlink(self, parts: list[str]) -> str | None:
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self._symlinks:
                return prefix
        return None

    def member(self, name: str, kind: str, size: int, data_size: int, linkname: str = "", uid: int = 0,
               gid: int = 0, devmajor: int = 0, devminor: int = 0) -> bool:
        """`kind`: file, dir, symlink, hardlink, char, block, fifo (anything else is refused); `size` the
        apparent size, `data_size` what is written (less for a sparse file). True: a member below a tree's root,
        which is extracted (the layout's own entries and the trees' roots never are)."""
        parts = _parts(name, "member")
        if not parts:
            raise ArchiveRefused(f"The backup holds a member with an empty name ({name!r})")
        path = "/".join(parts)
        tree = self._tree(parts, name)
        self.summary.members += 1
        if (via := self._below_symlink(parts)) is not None:
            raise ArchiveRefused(f"The backup's member {name!r} lies below {via!r}, a symbolic link of the archive: "
                                 "it would be written through the link")
        if path in self._symlinks:
            raise ArchiveRefused(f"The backup holds {name!r} twice, the first time as a symbolic link")
        if tree is None:
            if kind not in ("dir", "file") or (path == INDEX) != (kind == "file"):
                raise ArchiveRefused(f"The backup's {name!r} must be a {'file' if path == INDEX else 'directory'}")
            return False
        inside = parts[2 if tree == "container" else 3:]
        if inside in ([], ["rootfs"]) and kind != "dir":
            raise ArchiveRefused(f"The backup's {name!r} must be a directory (a {kind} was found)")
        if tree == "container":
            self.summary.container_seen = True
        else:
            self.summary.snapshots_seen.add(tree.split(":", 1)[1])
        self._owner(name, uid, gid)
        if kind == "dir":
            self._directories.add(path)
            self._charge(name, ENTRY_COST, ENTRY_COST)
        elif kind == "file":
            self._charge(name, size, data_size + ENTRY_COST)
        elif kind == "symlink":
            if path in self._directories:
                raise ArchiveRefused(f"The backup's symbolic link {name!r} replaces a directory of the archive")
            self._symlinks.add(path)
            self._charge(name, 0, ENTRY_COST)
        elif kind == "hardlink":
            self._hardlink(name, tree, linkname)
        elif kind in ("char", "block"):
            whiteout = kind == "char" and devmajor == 0 and devminor == 0
            if not self.policy.devices and not whiteout:
                raise ArchiveRefused(
                    f"The backup holds the {kind} device {name!r} ({devmajor}:{devminor}): an unprivileged "
                    "container cannot have made it, so it is refused; import it as a privileged container "
                    "(security.privileged=true in its configuration), or remove the device from the archive")
            self._charge(name, 0, ENTRY_COST)
        elif kind == "fifo":
            self._charge(name, 0, ENTRY_COST)
        else:
            raise ArchiveRefused(f"The backup's member {name!r} is of a kind that is not accepted ({kind})")
        return bool(inside)

    def xattrs(self, name: str, pax_headers: Mapping[str, str]) -> dict[str, str]:
        """The SCHILY.xattr records of a member that an import restores; POSIX ACLs must name only ids an
        unprivileged instance has."""
        kept = {}
        for key, value in pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            xattr = key.removeprefix("SCHILY.xattr.")
            if not any(fnmatch.fnmatchcase(xattr, pattern) for pattern in XATTRS_RESTORED):
                continue
            if xattr in ACL_XATTRS:
                self._acl(name, xattr, value.encode("utf-8", "surrogateescape"))
            kept[key] = value
        return kept

    def _acl(self, name: str, xattr: str, raw: bytes) -> None:
        if len(raw) < 4 or (len(raw) - 4) % 8 or struct.unpack_from("<I", raw)[0] != 2:
            raise ArchiveRefused(f"The backup's member {name!r} has a malformed ACL ({xattr})")
        limit = self.policy.max_id
        if limit is None:
            return
        for offset in range(4, len(raw), 8):
            tag, _, ident = struct.unpack_from("<HHI", raw, offset)
            if tag in _ACL_IDS and ident > limit:
                raise ArchiveRefused(f"The backup's member {name!r} has an ACL ({xattr}) naming {_ACL_IDS[tag]} "
                                     f"{ident}, beyond the ids of an unprivileged container (0 to {limit})")

    def _owner(self, name: str, uid: int, gid: int) -> None:
        limit = self.policy.max_id
        if limit is not None and (uid > limit or gid > limit or uid < 0 or gid < 0):
            raise ArchiveRefused(f"The backup's member {name!r} belongs to {uid}:{gid}, beyond the ids of an "
                                 f"unprivileged container (0 to {limit})")

    def _hardlink(self, name: str, tree: str, linkname: str) -> None:
        target = _parts(linkname, f"hard link {name!r} to")
        target_path = "/".join(target)
        if not target or self._tree(target, linkname) != tree or target_path in (CONTAINER, SNAPSHOTS):
            raise ArchiveRefused(f"The backup's hard link {name!r} points to {linkname!r}, outside its own tree")
        if (via := self._below_symlink(target)) is not None or target_path in self._symlinks:
            raise ArchiveRefused(f"The backup's hard link {name!r} to {linkname!r} passes through {via or linkname!r}, "
                                 "a symbolic link of the archive")
        self._charge(name, 0, 0)

    def _charge(self, name: str, size: int, data: int) -> None:
        self.summary.data_bytes += data
        self.summary.largest = max(self.summary.largest, size)
        room = self.policy.room
        if size > room or self.summary.data_bytes > room:
            raise ArchiveRefused(
                f"The backup is larger than the pool has room for: at {name!r} it needs "
                f"{max(size, self.summary.data_bytes) // 2**20} MiB, and {room // 2**20} MiB are free; free space "
                "or import into another pool with -s")

    def finish(self) -> Summary:
        return self.summary


_KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file", tarfile.DIRTYPE: "dir",
          tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
          tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo", tarfile.GNUTYPE_SPARSE: "file"}


def _kind(info: tarfile.TarInfo) -> str:
    return _KINDS.get(info.type, f"type {info.type!r}")


def _data_size(info: tarfile.TarInfo) -> int:
    sparse = getattr(info, "sparse", None)
    if sparse:
        return sum(length for _, length in sparse)
    return info.size


class _Tail:
    """The decompressed stream, its last bytes kept: where Python's tarfile stopped must be the end."""

    KEEP = 4 * BUFSIZE

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.kept = bytearray()
        self.kept_at = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.kept += data
        if len(self.kept) > 2 * self.KEEP:
            drop = len(self.kept) - self.KEEP
            del self.kept[:drop]
            self.kept_at += drop
        return data

    def rest_is_zero(self, start: int) -> bool:
        """Nothing but zero bytes (end-of-archive blocks, blocking) from `start` to the end of the stream."""
        if start < self.kept_at:
            return False
        rest = self.kept[start - self.kept_at:]
        if rest.count(0) != len(rest):
            return False
        while chunk := self.raw.read(COPY):
            if chunk.count(0) != len(chunk):
                return False
        return True


class _Bounded:
    """The canonical archive's file, never past `room` bytes."""

    def __init__(self, out: IO[bytes], room: int) -> None:
        self.out, self.room, self.written = out, room, 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > self.room:
            raise ArchiveRefused(f"The backup, unpacked, is larger than the {max(self.room, 0) // 2**20} MiB this "
                                 "server has free for it")
        return self.out.write(data)


class _Regions:
    """A member's data as the canonical archive stores it: `prefix` (a sparse map), then `length` bytes read
    from the archive's stream."""

    def __init__(self, stream: Any, prefix: bytes, length: int) -> None:
        self.stream, self.prefix, self.left = stream, prefix, length

    def read(self, size: int = -1) -> bytes:
        """`size` bytes (tarfile's copy wants them all), fewer only at the end."""
        if size < 0:
            size = len(self.prefix) + self.left
        head, self.prefix = self.prefix[:size], self.prefix[size:]
        want = min(size - len(head), self.left)
        data: bytes = self.stream.read(want) if want else b""
        if len(data) < want:
            raise ArchiveRefused("The backup ends in the middle of a member's data")
        self.left -= len(data)
        return head + data


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
          "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}


def _canonical(info: tarfile.TarInfo, kind: str, xattrs: dict[str, str], stream: Any) -> tuple[tarfile.TarInfo, Any]:
    """The member as the canonical archive holds it (only what was checked), and its data."""
    parts = _parts(info.name, "member")
    out = tarfile.TarInfo("/".join(parts))
    out.type = _TYPES[kind]
    out.mode = info.mode & 0o7777
    out.uid, out.gid, out.uname, out.gname = info.uid, info.gid, "", ""
    out.mtime = info.mtime
    out.pax_headers = dict(xattrs)
    if kind == "hardlink":
        out.linkname = "/".join(_parts(info.linkname, "hard link target"))
    elif kind == "symlink":
        out.linkname = info.linkname
    elif kind in ("char", "block"):
        out.devmajor, out.devminor = info.devmajor, info.devminor
    if kind != "file":
        return out, None
    stream.seek(info.offset_data)
    sparse = getattr(info, "sparse", None)
    if not sparse:
        out.size = info.size
        return out, _Regions(stream, b"", info.size)
    # GNU sparse 1.0: the map (count, then offset and length of each region) in the data's first blocks
    sparse_map = "".join([f"{len(sparse)}\n", *(f"{offset}\n{length}\n" for offset, length in sparse)]).encode()
    sparse_map += b"\0" * (-len(sparse_map) % tarfile.BLOCKSIZE)
    stored = sum(length for _, length in sparse)
    out.pax_headers.update({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": out.name,
                            "GNU.sparse.realsize": str(info.size)})
    out.size = len(sparse_map) + stored
    return out, _Regions(stream, sparse_map, stored)


def check_members(stream: IO[bytes], policy: Policy, out: IO[bytes] | None = None, out_room: int = 0) -> Summary:
    """Every member checked, in order; with `out`, the accepted members written again there as the canonical
    plain PAX tar that is extracted (at most `out_room` bytes)."""
    checker = Checker(policy)
    tail = _Tail(stream)
    # closed (flushed) only once the whole archive passed; a refused one's file is removed by the service
    canonical = None if out is None else tarfile.open(  # noqa: SIM115
        fileobj=cast(IO[bytes], _Bounded(out, out_room)), mode="w|", format=tarfile.PAX_FORMAT, bufsize=BUFSIZE)
    try:
        with tarfile.open(fileobj=cast(IO[bytes], tail), mode="r|", bufsize=BUFSIZE) as archive:
            for info in archive:
                kind = _kind(info)
                extracted = checker.member(info.name, kind, info.size, _data_size(info), info.linkname, info.uid,
                                           info.gid, info.devmajor, info.devminor)
                xattrs = checker.xattrs(info.name, info.pax_headers)
                if canonical is None or not extracted:
                    continue
                member, data = _canonical(info, kind, xattrs, archive.fileobj)
                canonical.addfile(member, data)
            if not tail.rest_is_zero(archive.offset):
                raise ArchiveRefused(f"The backup holds data past the end of its members (at byte {archive.offset}"
                                     "): a damaged archive, or one tar programs would read differently")
        if canonical is not None:
            canonical.close()
    except tarfile.TarError as err:
        raise ArchiveRefused(f"The backup is not a readable tarball: {err}") from None
    finally:
        if canonical is not None and not getattr(canonical, "closed", True):
            cast(Any, canonical.fileobj).closed = True  # nothing more is written
    return checker.finish()


def read_index(stream: IO[bytes]) -> bytes:
    """backup/index.yaml's bytes (Incus and Stapes write it first), at most MAX_INDEX_BYTES."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for info in archive:
                if "/".join(_parts(info.name, "member")) != INDEX:
                    continue
                if not info.isfile() or info.size > MAX_INDEX_BYTES:
                    raise ArchiveRefused(f"The backup's {INDEX} must be a file of at most {MAX_INDEX_BYTES} bytes")
                handle = archive.extractfile(info)
                assert handle is not None
                return handle.read(MAX_INDEX_BYTES)
    except tarfile.TarError as err:
        raise ArchiveRefused(f"The backup is not a readable tarball: {err}") from None
    raise ArchiveRefused(f"The backup has no {INDEX}: it is not an instance backup (made by 'export')")


def _open_decompressed(path: Path) -> tuple[IO[bytes], subprocess.Popen[bytes] | None]:
    with path.open("rb") as handle:
        head = handle.read(512)
    algorithm = compression_of(head)
    if algorithm is None:
        raise ArchiveRefused("The backup is not a tarball (plain, gzip, zstd, xz or bzip2)")
    if algorithm == "none":
        return path.open("rb"), None
    proc = subprocess.Popen([*DECOMPRESSION_TOOLS[algorithm], "--", str(path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
    assert proc.stdout is not None
    return proc.stdout, proc


def main(argv: list[str] | None = None) -> None:
    """The child process: `index FILE` prints {"index": text}; `check FILE --room N [--snapshot S]...
    [--max-id N] [--devices] [--out CANONICAL --out-room N]` prints the summary (and writes the canonical
    archive, a new file). A refusal prints {"error": message} and exits 2."""
    resource.setrlimit(resource.RLIMIT_AS, (CHECKER_MEMORY, CHECKER_MEMORY))
    parser = argparse.ArgumentParser(prog="backup-check")
    parser.add_argument("mode", choices=["index", "check"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--room", type=int, default=0)
    parser.add_argument("--snapshot", action="append", default=[])
    parser.add_argument("--max-id", type=int, default=-1)
    parser.add_argument("--devices", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--out-room", type=int, default=0)
    args = parser.parse_args(argv)
    proc = None
    try:
        stream, proc = _open_decompressed(args.file)
        with stream:
            if args.mode == "index":
                result: dict[str, Any] = {"index": read_index(stream).decode(errors="replace")}
            else:
                policy = Policy(frozenset(args.snapshot), args.room, None if args.max_id < 0 else args.max_id,
                                args.devices)
                if args.out is None:
                    result = check_members(stream, policy).to_json()
                else:
                    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        result = check_members(stream, policy, out, args.out_room).to_json()
                if proc is not None and proc.wait() != 0:
                    raise ArchiveRefused("The backup's compressed data is corrupt or truncated")
    except ArchiveRefused as err:
        json.dump({"error": str(err)}, sys.stdout)
        sys.exit(2)
    except MemoryError:
        json.dump({"error": "The backup's headers are too large to read (more than 1 GiB of memory)"}, sys.stdout)
        sys.exit(2)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
