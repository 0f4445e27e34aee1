"""A small SFTP (version 3) server over an instance's rootfs: what the official `incus` client speaks for
`incus file push/pull/delete/mkdir` (`GET /1.0/instances/<name>/sftp` with `Upgrade: sftp`).

Every request goes through `files.Root`, so paths resolve inside the rootfs only, exactly as for the REST
file API. Requests are answered one at a time, in order (a pipelining client matches answers by id); a packet
larger than MAX_PACKET ends the session. What one client can hold is bounded daemon-wide (`Limits`): at most
MAX_SESSIONS sessions and a number of open handles well below RLIMIT_NOFILE (and MAX_HANDLES per session); a
session idle for IDLE_TIMEOUT seconds is ended. A directory handle reads its entries lazily, a batch per
READDIR, from its own descriptor. Every mutating request asks `check` first (the instance is not held by a
migration, as for the REST file API), and every write checks the volume's free space at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from stapes.api.errors import BadRequest, Forbidden, NotFound, RequestTooLarge, StapesError, Unavailable
from stapes.server.instances.files import FileInfo, Root, room_of, split

log = logging.getLogger(__name__)

MAX_PACKET = 512 << 10  # pkg/sftp (Incus's client) sends at most 128 KiB of data per packet
MAX_READ = 256 << 10
MAX_HANDLES = 256  # per session
MAX_SESSIONS = 64  # daemon-wide
IDLE_TIMEOUT = 600.0  # seconds without a request
DIR_BATCH = 100
MAX_OFFSET = (1 << 63) - 1

# packet types
INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK = range(11, 21)
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
# status codes
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE, OP_UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8
# attribute flags and open flags
A_SIZE, A_UIDGID, A_PERMISSIONS, A_ACMODTIME, A_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000
F_READ, F_WRITE, F_APPEND, F_CREAT, F_TRUNC, F_EXCL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20


class _Malformed(Exception):
    pass


def _handle_budget() -> int:
    """Open handles daemon-wide: an eighth of the descriptors the daemon may open (a directory's handle holds
    two), at most 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, (soft if soft != resource.RLIM_INFINITY else 1 << 20) // 8))


class Limits:
    """What every SFTP session of the daemon holds together: sessions, open handles (descriptors)."""

    def __init__(self, sessions: int = MAX_SESSIONS, handles: int | None = None) -> None:
        self.max_sessions, self.max_handles = sessions, _handle_budget() if handles is None else handles
        self.sessions: set[Session] = set()
        self.handles = 0

    def check(self) -> None:
        """Refused before a session starts (before the upgrade) when the daemon has too many."""
        if len(self.sessions) >= self.max_sessions:
            raise Unavailable(f"Too many SFTP sessions on this server (at most {self.max_sessions}): close some "
                              "and try again")

    def admit(self, session: Session) -> None:
        if len(self.sessions) >= self.max_sessions:
            raise Unavailable(f"Too many SFTP sessions on this server (at most {self.max_sessions}): close some "
                              "and try again")
        self.sessions.add(session)

    def leave(self, session: Session) -> None:
        self.sessions.discard(session)

    def end(self, key: tuple[str, str]) -> None:
        """End the sessions on an instance (moved, renamed or deleted)."""
        for session in list(self.sessions):
            if session.key == key:
                session.stop()


LIMITS = Limits()


class Reader:
    """Parses nothing: takes the bytes aiohttp's protocol feeds after the upgrade (its `set_parser` shape)."""

    def __init__(self, pause: Callable[[], None] = lambda: None, resume: Callable[[], None] = lambda: None,
                 limit: int = 4 << 20) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._event = asyncio.Event()
        self._pause, self._resume, self._limit = pause, resume, limit
        self._paused = False

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._buffer += data
        self._event.set()
        if len(self._buffer) > self._limit and not self._paused:
            self._paused = True
            self._pause()
        return False, b""

    def feed_eof(self) -> None:
        self._eof = True
        self._event.set()

    async def read_exactly(self, n: int, timeout: float | None = None) -> bytes | None:
        """n bytes; None at EOF or after `timeout` seconds without them."""
        while len(self._buffer) < n:
            if self._eof:
                return None
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                return None
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        if self._paused and len(self._buffer) < self._limit // 2:
            self._paused = False
            self._resume()
        return data


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Malformed("short packet")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def offset(self) -> int:
        """A file offset or size: at most 2**63 - 1 (what the kernel takes)."""
        value = self.u64()
        if value > MAX_OFFSET:
            raise _Malformed("offset out of range")
        return value

    def string(self) -> bytes:
        return self.take(self.u32())

    def text(self) -> str:
        return self.string().decode("utf-8", errors="surrogateescape")

    def attrs(self) -> dict[str, int]:
        flags = self.u32()
        out: dict[str, int] = {}
        if flags & A_SIZE:
            out["size"] = self.offset()
        if flags & A_UIDGID:
            out["uid"], out["gid"] = self.u32(), self.u32()
        if flags & A_PERMISSIONS:
            out["mode"] = self.u32()
        if flags & A_ACMODTIME:
            out["atime"], out["mtime"] = self.u32(), self.u32()
        if flags & A_EXTENDED:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return out


def _string(value: bytes | str) -> bytes:
    raw = value.encode("utf-8", errors="surrogateescape") if isinstance(value, str) else value
    return struct.pack(">I", len(raw)) + raw


def encode_attrs(info: FileInfo) -> bytes:
    mtime = int(info.mtime) & 0xFFFFFFFF
    return struct.pack(">IQIIIII", A_SIZE | A_UIDGID | A_PERMISSIONS | A_ACMODTIME, info.size, info.uid, info.gid,
                       info.st_mode, mtime, mtime)


@dataclass
class _Handle:
    fd: int = -1
    writable: bool = False
    append: bool = False
    entries: os._ScandirIterator[str] | None = None  # a directory's, read lazily (scandir on dir_fd)
    dir_fd: int = -1  # its entries are stat'ed relative to it
    is_dir: bool = False

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dir_fd = -1
        if self.entries is not None:
            self.entries.close()
            self.entries = None


def _read_batch(entries: Iterator[os.DirEntry[str]]) -> list[tuple[str, FileInfo]]:
    batch: list[tuple[str, FileInfo]] = []
    for entry in entries:
        try:
            batch.append((entry.name, FileInfo.of(entry.stat(follow_symlinks=False))))
        except OSError:
            continue  # gone meanwhile
        if len(batch) >= DIR_BATCH:
            break
    return batch


_MUTATING = frozenset((WRITE, SETSTAT, FSETSTAT, REMOVE, MKDIR, RMDIR, RENAME, SYMLINK))


class Session:
    def __init__(self, root: Root, reader: Reader, write: Callable[[bytes], Awaitable[None]], *,
                 check: Callable[[], None] = lambda: None, limits: Limits | None = None,
                 key: tuple[str, str] = ("", ""), idle_timeout: float = IDLE_TIMEOUT) -> None:
        """`check` raises (a StapesError) when the instance may not be changed now; `key`: (project, name)."""
        self.root, self.reader, self._write, self._check = root, reader, write, check
        self.limits = LIMITS if limits is None else limits
        self.key, self.idle_timeout = key, idle_timeout
        self.handles: dict[bytes, _Handle] = {}
        self._next = 0
        self._stopped = False

    def stop(self) -> None:
        """End the session (from another task) once the request in progress is answered: its handles are
        closed, the connection ends."""
        self._stopped = True
        self.reader.feed_eof()

    async def run(self) -> None:
        """Until the client closes, goes idle, sends garbage, or `stop`. Raises StapesError (Unavailable) only
        when the daemon has too many sessions already, before anything is read."""
        self.limits.admit(self)
        try:
            while not self._stopped:
                header = await self.reader.read_exactly(4, self.idle_timeout)
                if header is None:
                    return
                length = struct.unpack(">I", header)[0]
                if not 5 <= length <= MAX_PACKET:
                    return
                packet = await self.reader.read_exactly(length, self.idle_timeout)
                if packet is None:
                    return
                answer = await self._answer(packet[0], _Cursor(packet[1:]))
                try:  # a client that stops reading is idle too
                    await asyncio.wait_for(self._write(struct.pack(">I", len(answer)) + answer), self.idle_timeout)
                except TimeoutError:
                    return
        finally:
            self.limits.leave(self)
            await asyncio.shield(asyncio.to_thread(self._close_all))

    def _close_all(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.limits.handles -= len(self.handles)
        self.handles.clear()

    async def _answer(self, kind: int, c: _Cursor) -> bytes:
        if kind == INIT:
            return bytes([VERSION]) + struct.pack(">I", 3)
        try:
            request_id = c.u32()
        except _Malformed:
            return bytes([STATUS]) + struct.pack(">II", 0, BAD_MESSAGE) + _string("bad packet") + _string("")
        try:
            body = await self._dispatch(kind, c)
            return bytes([body[0]]) + struct.pack(">I", request_id) + body[1:]
        except _Malformed:
            return _status(request_id, BAD_MESSAGE, "malformed request")
        except NotFound as err:
            return _status(request_id, NO_SUCH_FILE, err.message)
        except Forbidden as err:
            return _status(request_id, PERMISSION_DENIED, err.message)
        except StapesError as err:
            return _status(request_id, FAILURE, err.message)
        except OSError as err:
            code = NO_SUCH_FILE if isinstance(err, FileNotFoundError) else FAILURE
            return _status(request_id, code, os.strerror(err.errno or 0))
        except Exception:  # a bug, not the client's: this request fails, the session goes on
            log.exception("SFTP request %d failed", kind)
            return _status(request_id, FAILURE, "internal error")

    def _handle(self, c: _Cursor) -> _Handle:
        handle = self.handles.get(c.string())
        if handle is None:
            raise BadRequest("unknown handle")
        return handle

    def _reserve(self) -> None:
        """Room for one more handle, in this session and daemon-wide (checked before its fd is opened)."""
        if len(self.handles) >= MAX_HANDLES:
            raise BadRequest(f"too many open handles (at most {MAX_HANDLES})")
        if self.limits.handles >= self.limits.max_handles:
            raise Unavailable(f"too many open SFTP handles on this server (at most {self.limits.max_handles})")
        self.limits.handles += 1  # released by _new_handle's caller failing, or CLOSE, or the session's end

    def _new_handle(self, handle: _Handle) -> bytes:
        self._next += 1
        key = str(self._next).encode()
        self.handles[key] = handle
        return bytes([HANDLE]) + _string(key)

    async def _dispatch(self, kind: int, c: _Cursor) -> bytes:
        if kind in _MUTATING:
            self._check()
        if kind in (OPEN, OPENDIR):
            self._reserve()
            try:
                return await self._open(kind, c)
            except BaseException:
                self.limits.handles -= 1
                raise
        return await self._request(kind, c)

    async def _open(self, kind: int, c: _Cursor) -> bytes:
        root = self.root
        run = asyncio.to_thread
        if kind == OPENDIR:
            fd = await run(root.open_dir, c.text())
            try:
                entries = os.scandir(fd)  # reads a duplicate of fd, stats relative to fd itself
            except BaseException:
                os.close(fd)
                raise
            return self._new_handle(_Handle(entries=entries, dir_fd=fd, is_dir=True))
        path, flags, _ = c.text(), c.u32(), c.attrs()
        if flags & (F_WRITE | F_APPEND):
            self._check()
            fd = await run(root.open_in_place, path, create=bool(flags & F_CREAT), truncate=bool(flags & F_TRUNC),
                           append=bool(flags & F_APPEND), exclusive=bool(flags & F_EXCL))
            return self._new_handle(_Handle(fd=fd, writable=True, append=bool(flags & F_APPEND)))
        if (await run(root.lstat, path)).kind == "directory":  # pkg/sftp opens one before reading it
            return self._new_handle(_Handle(fd=await run(root.open_dir, path)))
        _, fd = await run(root.open_read, path)
        return self._new_handle(_Handle(fd=fd))

    async def _request(self, kind: int, c: _Cursor) -> bytes:
        root = self.root
        run = asyncio.to_thread
        if kind in (LSTAT, STAT):
            path = c.text()
            info = await run(root.lstat if kind == LSTAT else root.stat, path)
            return bytes([ATTRS]) + encode_attrs(info)
        if kind == FSTAT:
            handle = self._handle(c)
            if handle.fd < 0:
                raise BadRequest("not a file handle")
            return bytes([ATTRS]) + encode_attrs(FileInfo.of(await run(os.fstat, handle.fd)))
        if kind == CLOSE:
            key = c.string()
            closing = self.handles.pop(key, None)
            if closing is None:
                raise BadRequest("unknown handle")
            self.limits.handles -= 1
            await run(closing.close)
            return _ok()
        if kind == READ:
            handle, offset, length = self._handle(c), c.offset(), c.u32()
            if handle.fd < 0 or handle.writable:
                raise BadRequest("not a handle open for reading")
            data = await run(os.pread, handle.fd, min(length, MAX_READ), offset)
            if not data:
                return bytes([STATUS]) + struct.pack(">I", EOF) + _string("EOF") + _string("")
            return bytes([DATA]) + _string(data)
        if kind == WRITE:
            handle, offset, data = self._handle(c), c.offset(), c.string()
            if not handle.writable:
                raise BadRequest("not a handle open for writing")
            if offset + len(data) > MAX_OFFSET:
                raise _Malformed("offset out of range")
            await run(_write_at, handle.fd, data, None if handle.append else offset)
            return _ok()
        if kind in (SETSTAT, FSETSTAT):
            target: str | _Handle = c.text() if kind == SETSTAT else self._handle(c)
            attrs = c.attrs()
            uid, gid = attrs.get("uid"), attrs.get("gid")
            mode = attrs["mode"] & 0o7777 if "mode" in attrs else None
            if isinstance(target, str):
                if "size" in attrs:
                    raise BadRequest("Truncating by path is not supported: open the file for writing")
                await run(root.set_attributes, target, uid=uid, gid=gid, mode=mode)
            else:
                if "size" in attrs:
                    if not target.writable:
                        raise BadRequest("Only a file open for writing can be truncated")
                    await run(_truncate, target.fd, attrs["size"])
                await run(_set_handle_attributes, root, target, uid, gid, mode)
            return _ok()
        if kind == READDIR:
            handle = self._handle(c)
            if not handle.is_dir or handle.entries is None:
                raise BadRequest("not a directory handle")
            batch = await run(_read_batch, handle.entries)
            if not batch:
                return bytes([STATUS]) + struct.pack(">I", EOF) + _string("EOF") + _string("")
            body = b"".join(_string(name) + _string(name) + encode_attrs(info) for name, info in batch)
            return bytes([NAME]) + struct.pack(">I", len(batch)) + body
        if kind == REMOVE:
            await run(root.remove_file, c.text())
            return _ok()
        if kind == RMDIR:
            await run(root.rmdir, c.text())
            return _ok()
        if kind == MKDIR:
            path, attrs = c.text(), c.attrs()
            await run(lambda: root.mkdir(path, uid=None, gid=None,
                                         mode=attrs["mode"] & 0o7777 if "mode" in attrs else None))
            return _ok()
        if kind == REALPATH:
            parent, name = split(c.text() or "/")
            clean = os.path.join(parent, name) if name else "/"
            return bytes([NAME]) + struct.pack(">I", 1) + _string(clean) + _string(clean) + struct.pack(">I", 0)
        if kind == READLINK:
            target = await run(root.readlink, c.text())
            return bytes([NAME]) + struct.pack(">I", 1) + _string(target) + _string(target) + struct.pack(">I", 0)
        if kind == SYMLINK:
            # pkg/sftp's order (Incus's client and server): the target first, then the link's path.
            target, link = c.text(), c.text()
            await run(lambda: root.symlink(link, target, uid=None, gid=None))
            return _ok()
        return bytes([STATUS]) + struct.pack(">I", OP_UNSUPPORTED) + _string("unsupported") + _string("")


def _ok() -> bytes:
    return bytes([STATUS]) + struct.pack(">I", OK) + _string("") + _string("")


def _status(request_id: int, code: int, message: str) -> bytes:
    return bytes([STATUS]) + struct.pack(">II", request_id, code) + _string(message) + _string("")


def _grows_by(fd: int, end: int) -> int:
    return max(0, end - os.fstat(fd).st_size)


def _check_room(fd: int, growth: int) -> None:
    """The volume's free space now (shared with every other push and session), less the margin."""
    if growth > 0:
        room = room_of(fd)
        if growth > room:
            raise RequestTooLarge(f"the file does not fit in the instance's volume ({max(room, 0)} bytes free)")


def _truncate(fd: int, size: int) -> None:
    _check_room(fd, _grows_by(fd, size))
    os.ftruncate(fd, size)


def _write_at(fd: int, data: bytes, offset: int | None) -> None:
    """At `offset`, or at the end (append: the offset the client gave is ignored, as O_APPEND does)."""
    end = (os.fstat(fd).st_size if offset is None else offset) + len(data)
    _check_room(fd, _grows_by(fd, end))
    view = memoryview(data)
    while view:
        written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[written:]
        if offset is not None:
            offset += written


def _set_handle_attributes(root: Root, handle: _Handle, uid: int | None, gid: int | None, mode: int | None) -> None:
    root.check_ids(uid, gid)
    if handle.fd < 0:
        raise BadRequest("not a file handle")
    if uid is not None or gid is not None:
        os.fchown(handle.fd, -1 if uid is None else uid, -1 if gid is None else gid)
    if mode is not None and stat.S_ISREG(os.fstat(handle.fd).st_mode):
        os.fchmod(handle.fd, mode)
