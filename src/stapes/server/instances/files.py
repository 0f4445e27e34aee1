"""Files inside a container, for `file push/pull/delete/mkdir` (Incus's /files API) and its SFTP channel.

The path comes from a client and the rootfs belongs to whoever is root inside the container, so every
path is resolved inside the rootfs and nowhere else: the parent directory of the final component is opened
with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` (a symlinked `/etc -> /host/etc`
or `../../..` stays in the rootfs; /proc magic links and other mounts are refused), and the final component
is then handled by name relative to that directory, never followed: a symlink there is read as a symlink,
replaced by an overwrite, and refused by an append. New files are written beside their target with
O_CREAT|O_EXCL|O_NOFOLLOW and renamed over it, owned and moded as the client said (root and 0644 or 0755
by default), and never larger than the free space of the volume's filesystem less a margin.

Owners are the container's ids: files are kept unshifted on disk (uid 0 inside is uid 0 on disk, privileged
or not; see idmap.py), so an id is written as it is, after checking it is one the container has.

Every method of `Root` blocks (system calls): run them in a thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from stapes.api.errors import BadRequest, Conflict, Forbidden, NotFound, RequestTooLarge, StapesError

_SYS_OPENAT2 = 437  # x86_64 and aarch64 share the generic syscall number
_RESOLVE = 0x10 | 0x02 | 0x01  # RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
_libc = ctypes.CDLL(None, use_errno=True)

MAX_PATH = 4096
MAX_LINK_TARGET = 4095
FREE_SPACE_MARGIN = 64 << 20  # a push never fills the volume's filesystem
CHUNK = 1 << 20
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2(dirfd: int, path: str, flags: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE)
    fd = int(_libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


@dataclass(frozen=True)
class FileInfo:
    kind: str  # file, directory, symlink, or other (a device, FIFO or socket)
    uid: int
    gid: int
    mode: int  # permission bits (with setuid, setgid, sticky)
    size: int
    mtime: float
    st_mode: int  # the whole st_mode, type bits included (SFTP's attributes)

    @classmethod
    def of(cls, st: os.stat_result) -> FileInfo:
        kind = ("directory" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode)
                else "file" if stat.S_ISREG(st.st_mode) else "other")
        return cls(kind, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime, st.st_mode)

    def headers(self) -> dict[str, str]:
        """Incus's response headers for GET and HEAD."""
        modified = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(self.mtime))
        return {"X-Incus-uid": str(self.uid), "X-Incus-gid": str(self.gid), "X-Incus-mode": f"{self.mode:04o}",
                "X-Incus-type": "file" if self.kind == "other" else self.kind, "X-Incus-modified": modified}


def split(path: str) -> tuple[str, str]:
    """A client's path, cleaned as Incus does (lexically, relative to the instance's /): its parent and final
    name ('' for / itself). Pure: unit-tested."""
    if not path:
        raise BadRequest("Missing path argument: give the file's path inside the instance")
    if "\0" in path or len(path) > MAX_PATH:
        raise BadRequest(f"Invalid path: at most {MAX_PATH} characters and no NUL")
    clean = posixpath.normpath("/" + path.lstrip("/"))
    if clean == "/":
        return "/", ""
    parent, name = posixpath.split(clean)
    return parent, name


def parse_mode(raw: str | None) -> int | None:
    """X-Incus-mode as Incus reads it: '0644' (octal with a leading 0) or decimal; None when absent."""
    if raw is None or raw.strip() in ("", "-1"):
        return None
    text = raw.strip().lower()
    try:
        value = int(text[2:], 8) if text.startswith("0o") else int(text, 8) if text.startswith("0") else int(text)
    except ValueError:
        raise BadRequest(f"Invalid file mode {raw[:32]!r}: use octal such as 0644") from None
    if not 0 <= value <= 0o7777:
        raise BadRequest(f"Invalid file mode {raw[:32]!r}: permission bits only (at most 07777)")
    return value


def parse_id(raw: str | None, what: str) -> int | None:
    if raw is None or raw.strip() in ("", "-1"):
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise BadRequest(f"Invalid {what} {raw[:32]!r}: a number") from None


def check_ids(uid: int | None, gid: int | None, uids: int, gids: int) -> None:
    """The owner asked for must be an id the container has (0 to its map's size - 1). Pure: unit-tested."""
    for what, value, count in (("uid", uid, uids), ("gid", gid, gids)):
        if value is not None and not 0 <= value < count:
            raise BadRequest(f"File {what} {value} is not an id of this container: use 0 to {count - 1}")


def error_for(err: OSError, path: str) -> StapesError:
    """What a failed system call tells the client (its path, never a host path)."""
    code = err.errno
    if code == errno.ENOENT:
        return NotFound(f"{path}: no such file or directory in the instance")
    if code == errno.EEXIST:
        return Conflict(f"{path}: already exists in the instance")
    if code == errno.ENOTEMPTY:
        return Conflict(f"{path}: the directory is not empty (delete it with --force)")
    if code == errno.ELOOP:
        return BadRequest(f"{path}: a symlink is in the way (symlinks are never followed at the final component, "
                          "nor out of the instance)")
    if code == errno.EXDEV:
        return BadRequest(f"{path}: crosses a mount point, which the file API does not follow")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Forbidden(f"{path}: {os.strerror(code)}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return RequestTooLarge(f"{path}: the instance's volume is full")
    return BadRequest(f"{path}: {os.strerror(code) if code else err}")


def _open_regular(parent: int, name: str, flags: int, clean: str, *, create: bool = False,
                  exclusive: bool = False) -> tuple[int, bool]:
    """The regular file `name` in `parent`, opened with `flags`; never a symlink, device, FIFO or socket, and
    never opened before its type is known: an O_PATH descriptor is checked first and the file reopened through
    it. `create`: a missing one is made (O_EXCL, 0600 until its owner and mode are set). Returns the fd and
    whether it was created."""
    if create:
        try:
            return os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=parent), True
        except FileExistsError:
            if exclusive:
                raise
    handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        st = os.fstat(handle)
        if stat.S_ISLNK(st.st_mode):
            raise BadRequest(f"{clean} is a symlink: it is not followed")
        if not stat.S_ISREG(st.st_mode) or st.st_dev != os.fstat(parent).st_dev:
            raise BadRequest(f"{clean} is not a regular file of the instance (a device, FIFO or socket)")
        return os.open(f"/proc/self/fd/{handle}", flags | os.O_CLOEXEC), False
    finally:
        os.close(handle)


class Root:
    """An instance's rootfs, held open by an O_PATH descriptor; every lookup starts from it."""

    def __init__(self, root: Path, uids: int, gids: int) -> None:
        # O_NOFOLLOW: the rootfs itself must be a real directory (a received `rootfs -> /` is refused here).
        try:
            self.fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise BadRequest(f"The instance's rootfs cannot be opened: {os.strerror(err.errno or 0)}") from None
        self.uids, self.gids = uids, gids

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_parent(self, path: str) -> tuple[int, str]:
        """The parent directory of `path` (an O_PATH fd resolved inside the root) and the final name."""
        parent, name = split(path)
        try:
            return _openat2(self.fd, parent.lstrip("/") or ".", os.O_PATH | os.O_DIRECTORY), name
        except OSError as err:
            raise error_for(err, parent) from None

    @contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        fd, name = self._open_parent(path)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def _clean(self, path: str) -> str:
        parent, name = split(path)
        return posixpath.join(parent, name)

    # reading
    def lstat(self, path: str) -> FileInfo:
        with self._parent(path) as (parent, name):
            try:
                return FileInfo.of(os.stat(name, dir_fd=parent, follow_symlinks=False) if name
                                   else os.fstat(self.fd))
            except OSError as err:
                raise error_for(err, self._clean(path)) from None

    def stat(self, path: str) -> FileInfo:
        """Following symlinks, inside the root only (SFTP's STAT)."""
        try:
            fd = _openat2(self.fd, self._clean(path).lstrip("/") or ".", os.O_PATH)
        except OSError as err:
            raise error_for(err, self._clean(path)) from None
        try:
            return FileInfo.of(os.fstat(fd))
        finally:
            os.close(fd)

    def open_read(self, path: str) -> tuple[FileInfo, int]:
        """A regular file opened for reading (a FIFO or device at the path is refused, never opened for long)."""
        with self._parent(path) as (parent, name):
            if not name:
                raise BadRequest("/ is a directory")
            try:
                fd, _ = _open_regular(parent, name, os.O_RDONLY, self._clean(path))
            except OSError as err:
                raise error_for(err, self._clean(path)) from None
            return FileInfo.of(os.fstat(fd)), fd

    def list_dir(self, path: str) -> list[str]:
        fd = self.open_dir(path)
        try:
            return sorted(os.listdir(fd))
        except OSError as err:
            raise error_for(err, self._clean(path)) from None
        finally:
            os.close(fd)

    def open_dir(self, path: str) -> int:
        with self._parent(path) as (parent, name):
            try:
                return os.open(name or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=parent if name else self.fd)
            except OSError as err:
                raise error_for(err, self._clean(path)) from None

    def readlink(self, path: str) -> str:
        with self._parent(path) as (parent, name):
            try:
                return os.readlink(name, dir_fd=parent)
            except OSError as err:
                raise error_for(err, self._clean(path)) from None

    # writing
    def check_ids(self, uid: int | None, gid: int | None) -> None:
        check_ids(uid, gid, self.uids, self.gids)

    def begin_write(self, path: str, *, uid: int | None, gid: int | None, mode: int | None, append: bool,
                    length: int | None = None) -> FileWriter:
        """A writer for a regular file. Overwrite: a new file beside the target, renamed over it at commit
        (an existing symlink there is replaced, not followed; an existing file keeps its owner and mode unless
        others are given). Append: the existing regular file (created when missing), never through a symlink."""
        self.check_ids(uid, gid)
        clean = self._clean(path)
        parent, name = self._open_parent(path)
        try:
            if not name:
                raise BadRequest("/ is a directory")
            room = room_of(parent)
            if length is not None and length > room:
                raise RequestTooLarge(f"{clean}: {length} bytes do not fit in the instance's volume ({max(room, 0)} "
                                      "bytes free)")
            try:
                existing: os.stat_result | None = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                raise BadRequest(f"{clean} is a directory")
            if existing is not None and not (stat.S_ISREG(existing.st_mode) or stat.S_ISLNK(existing.st_mode)):
                raise BadRequest(f"{clean} is not a regular file (a device, FIFO or socket): delete it first")
            if append:
                if existing is not None and stat.S_ISLNK(existing.st_mode):
                    raise BadRequest(f"{clean} is a symlink: append writes only to a regular file")
                fd, created = _open_regular(parent, name, os.O_WRONLY | os.O_APPEND, clean, create=True)
                if created:  # new: root and 0644 unless told otherwise
                    uid, gid = (0 if uid is None else uid), (0 if gid is None else gid)
                    mode = DEFAULT_FILE_MODE if mode is None else mode
                return FileWriter(parent, fd, None, name, room, uid, gid, mode)
            keep = existing is not None and stat.S_ISREG(existing.st_mode)
            final_uid = uid if uid is not None else existing.st_uid if keep and existing else 0
            final_gid = gid if gid is not None else existing.st_gid if keep and existing else 0
            final_mode = mode if mode is not None else (stat.S_IMODE(existing.st_mode) if keep and existing
                                                        else DEFAULT_FILE_MODE)
            temp = f".stapes-push.{secrets.token_hex(8)}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
            return FileWriter(parent, fd, temp, name, room, final_uid, final_gid, final_mode)
        except OSError as err:
            os.close(parent)
            raise error_for(err, clean) from None
        except BaseException:
            os.close(parent)
            raise

    def mkdir(self, path: str, *, uid: int | None, gid: int | None, mode: int | None,
              parents: bool = False) -> None:
        """A directory (Incus: one that exists already is left as it is). `parents`: the missing ones above
        it too, with the same owner and mode 0755."""
        self.check_ids(uid, gid)
        parent, name = split(path)
        if parents and parent != "/":
            self.mkdir(parent, uid=uid, gid=gid, mode=None, parents=True)
        if not name:
            return
        clean = posixpath.join(parent, name)
        with self._parent(path) as (pfd, _):
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                if not self._is_dir(clean):
                    raise Conflict(f"{clean} already exists and is not a directory") from None
                return
            except OSError as err:
                raise error_for(err, clean) from None
            try:  # replaced meanwhile (by the container): its error, not a crash
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                try:
                    os.fchown(fd, 0 if uid is None else uid, 0 if gid is None else gid)
                    os.fchmod(fd, DEFAULT_DIR_MODE if mode is None else mode)
                finally:
                    os.close(fd)
            except OSError as err:
                raise error_for(err, clean) from None

    def _is_dir(self, clean: str) -> bool:
        """A directory, or a symlink to one inside the root (mkdir -p through /var/run -> /run)."""
        try:
            fd = _openat2(self.fd, clean.lstrip("/"), os.O_PATH | os.O_DIRECTORY)
        except OSError:
            return False
        os.close(fd)
        return True

    def symlink(self, path: str, target: str, *, uid: int | None, gid: int | None) -> None:
        """A symlink (its target is only text: it is never followed here); an existing symlink is replaced."""
        self.check_ids(uid, gid)
        if not target or "\0" in target or len(target.encode()) > MAX_LINK_TARGET:
            raise BadRequest(f"Invalid symlink target: 1 to {MAX_LINK_TARGET} bytes, no NUL")
        clean = self._clean(path)
        with self._parent(path) as (parent, name):
            if not name:
                raise BadRequest("/ is a directory")
            try:
                try:
                    os.symlink(target, name, dir_fd=parent)
                except FileExistsError:
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        raise Conflict(f"{clean} already exists and is not a symlink") from None
                    if os.readlink(name, dir_fd=parent) != target:
                        temp = f".stapes-link.{secrets.token_hex(8)}"
                        os.symlink(target, temp, dir_fd=parent)
                        os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
                os.chown(name, 0 if uid is None else uid, 0 if gid is None else gid, dir_fd=parent,
                         follow_symlinks=False)
            except OSError as err:
                raise error_for(err, clean) from None

    def delete(self, path: str, *, recursive: bool = False) -> None:
        clean = self._clean(path)
        with self._parent(path) as (parent, name):
            if not name:
                raise BadRequest("The instance's / cannot be deleted")
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=parent)
                elif recursive:
                    # fd-based (never follows a symlink planted while it runs): shutil.rmtree.avoids_symlink_attacks
                    shutil.rmtree(name, dir_fd=parent)
                else:
                    os.rmdir(name, dir_fd=parent)
            except OSError as err:
                raise error_for(err, clean) from None

    def remove_file(self, path: str) -> None:
        """SFTP's REMOVE: not a directory."""
        with self._parent(path) as (parent, name):
            try:
                os.unlink(name, dir_fd=parent)
            except OSError as err:
                raise error_for(err, self._clean(path)) from None

    def rmdir(self, path: str) -> None:
        with self._parent(path) as (parent, name):
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError as err:
                raise error_for(err, self._clean(path)) from None

    def set_attributes(self, path: str, *, uid: int | None, gid: int | None, mode: int | None,
                       follow: bool = True) -> None:
        """SFTP's SETSTAT: the inode found inside the root (following symlinks there, as a path does)."""
        self.check_ids(uid, gid)
        clean = self._clean(path)
        try:
            fd = _openat2(self.fd, clean.lstrip("/") or ".", os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        except OSError as err:
            raise error_for(err, clean) from None
        try:
            set_fd_attributes(fd, uid=uid, gid=gid, mode=mode)
        except OSError as err:
            raise error_for(err, clean) from None
        finally:
            os.close(fd)

    def open_in_place(self, path: str, *, create: bool, truncate: bool, append: bool, exclusive: bool) -> int:
        """SFTP's OPEN for writing: the file itself (an SFTP client sets owner and mode after writing, by
        path). A symlink at the final component is replaced by a new file when creating, refused otherwise."""
        clean = self._clean(path)
        with self._parent(path) as (parent, name):
            if not name:
                raise BadRequest("/ is a directory")
            try:
                try:
                    st: os.stat_result | None = os.stat(name, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                if st is not None and stat.S_ISLNK(st.st_mode) and create and not exclusive:
                    os.unlink(name, dir_fd=parent)
                fd, created = _open_regular(parent, name, os.O_WRONLY | (os.O_APPEND if append else 0), clean,
                                            create=create, exclusive=exclusive)
                if created:
                    os.fchmod(fd, DEFAULT_FILE_MODE)
                elif truncate:
                    os.ftruncate(fd, 0)
            except OSError as err:
                raise error_for(err, clean) from None
            return fd

    def room(self) -> int:
        return room_of(self.fd)


def set_fd_attributes(fd: int, *, uid: int | None, gid: int | None, mode: int | None) -> None:
    """Owner, then mode (a chown clears setuid and setgid) of the inode an O_PATH fd refers to."""
    target = f"/proc/self/fd/{fd}"
    if uid is not None or gid is not None:
        os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid)
    if mode is not None and not stat.S_ISLNK(os.fstat(fd).st_mode):
        os.chmod(target, mode)


def room_of(fd: int) -> int:
    """Free bytes on the filesystem of `fd` now, less the margin (every push and SFTP write checks it as it
    writes, so concurrent ones share it)."""
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize - FREE_SPACE_MARGIN


class FileWriter:
    """One push in progress: `write` the chunks, then `commit` (or `abort`, which leaves nothing behind)."""

    def __init__(self, parent: int, fd: int, temp: str | None, name: str, room: int, uid: int | None,
                 gid: int | None, mode: int | None) -> None:
        self._parent, self._fd, self._temp, self._name = parent, fd, temp, name
        self._room, self.written = room, 0
        self._uid, self._gid, self._mode = uid, gid, mode
        self._open = True

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.written > self._room:
            raise RequestTooLarge(f"The file does not fit in the instance's volume ({max(self._room, 0)} bytes free)")
        room = room_of(self._fd)  # now: other pushes and SFTP sessions write to the same volume meanwhile
        if len(data) > room:
            raise RequestTooLarge(f"The file does not fit in the instance's volume ({max(room, 0)} bytes free)")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def commit(self) -> None:
        try:
            if self._uid is not None or self._gid is not None:
                os.fchown(self._fd, -1 if self._uid is None else self._uid, -1 if self._gid is None else self._gid)
            if self._mode is not None:
                os.fchmod(self._fd, self._mode)
            os.close(self._fd)
            self._fd = -1
            if self._temp is not None:
                os.rename(self._temp, self._name, src_dir_fd=self._parent, dst_dir_fd=self._parent)
                self._temp = None
        except OSError as err:
            self.abort()
            raise error_for(err, self._name) from None
        self._finish()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._temp is not None:
            with suppress(OSError):
                os.unlink(self._temp, dir_fd=self._parent)
            self._temp = None
        self._finish()

    def _finish(self) -> None:
        if self._open:
            self._open = False
            os.close(self._parent)
