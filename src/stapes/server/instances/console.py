"""Consoles: what a session attaches to, as drivers declare it (`ConsoleProvider`, a driver's `consoles`), the
websocket session itself (`run_console`), and containers' consoles: a pty the daemon owns, bind-mounted as the
container's /dev/console. (A VM's console is its serial port, served by QEMU: qemu_console.py.)

Why not LXC's own console (`lxc.console.path`): liblxc 5.0 allocates it from the container's devpts when
`lxc.pty.max` > 1 and does not allocate it again on a restore, so `lxc-checkpoint -r` fails ("lxc.console.path
configured on source host but not target") and a live move could not even fall back to the source; with
`lxc.pty.max = 1` the restore works, but the restored monitor never sets the console's log or ring buffer up
again, and the container has a single pty (tried here, docs/migration.md). So containers keep
`lxc.console.path = none`, and the server gives them a console of its own:

- before each start or restore, a pty pair from the host's devpts; its slave owned by the container's root
  (0620), bind-mounted on the file `console` in the container's LXC directory, which the configuration's
  `dev/console` bind mount names (render_config; CRIU's restore cannot mount through a symbolic link). A checkpoint
  records that mount as an external one (liblxc maps every bind mount by its target), so the target's restore
  mounts its own console there.
- the daemon reads the master without ever blocking: the output goes to the attached sessions and to a ring
  buffer of LOG_LIMIT bytes, written to `console.log` (0600, root) in the LXC directory a moment later.
- a session is a websocket operation ("0" both ways, "control" with window-resize); closing it detaches and
  never touches the container.
- a live move with a process inside holding the console open (a getty): CRIU cannot dump a tty whose master is
  outside the container, so the dump names the console's slave an external tty (`external tty[rdev:dev]`, its
  st_rdev and the st_dev of the host's devpts, as CRIU keys it; liblxc does the same for its own console), and
  the restore (on the target, or on the source when the move fails) hands the new console's slave to CRIU in
  its place (`inherit-fd fd[N]:tty[rdev:dev]`, the key read from the checkpoint's tty-info image, one
  descriptor per key, inherited through lxc-checkpoint, whose restore closes none). /dev/tty held by a process
  the console controls (busybox's ash keeps it for job control) is external too and becomes the new console as
  well: CRIU dumps /dev/tty only beside a pty of the same session. Both reach CRIU in the operation's own
  configuration file (CRIU_CONFIG_FILE): lxc-checkpoint's options are fixed. Unread input in the tty at the
  dump is lost, and in /proc the restored descriptors read as the host's /dev/pts/N (same device as the
  container's /dev/console).

Limits: the console lives as long as the daemon process (a daemon restart leaves a running container without
a console until its next start or move); the log starts afresh on the target of a move.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import stat
import struct
import termios
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

from aiohttp import WSMsgType

from stapes.api.errors import BadRequest, InternalError
from stapes.api.status import StatusCode
from stapes.server import process
from stapes.server.instances import criu_images
from stapes.server.instances.driver import InstanceDriver, InstanceSpec
from stapes.server.instances.exec_session import window_size
from stapes.server.operations import Operation

log = logging.getLogger(__name__)

LINK = "console"  # in the container's LXC directory: the slave of its console pty, bind-mounted on a file
LOG = "console.log"  # beside it: the console's last LOG_LIMIT bytes, root's alone
LOG_LIMIT = 128 * 1024
FLUSH_DELAY = 0.2  # seconds between output and its copy in console.log
CLIENT_BACKLOG = 1 << 20  # bytes queued for one session that does not read: beyond, it is detached
CONNECT_TIMEOUT = 30.0
MAX_CONTROL_MESSAGE = 64 * 1024


def mount_entry(lxc_dir: Path, fstab: Any) -> str:
    """The configuration line that makes the server's pty the container's /dev/console."""
    return f"lxc.mount.entry = {fstab(str(lxc_dir / LINK))} dev/console none bind,create=file 0 0  # console"


def _tty_key(rdev: int, dev: int) -> str:
    """CRIU's name of a tty: `tty[<st_rdev>:<st_dev>]` in hexadecimal (criu/tty.c)."""
    return f"tty[{rdev:x}:{dev:x}]"


def external_ttys(state: Path) -> list[str]:
    """The keys of the external ttys a checkpoint's processes hold (the console of the source: one at most)."""
    image = state / "tty-info.img"
    if not image.is_file():
        return []
    keys = []
    for entry in criu_images.load(image):
        if entry.get("type") in ("EXT_TTY", 5):
            rdev, dev = entry.get("rdev"), entry.get("dev")
            if not isinstance(rdev, int) or not isinstance(dev, int) or isinstance(rdev, bool) or \
                    isinstance(dev, bool):
                raise criu_images.refused("holds an external tty without its device numbers (tty-info.img)")
            keys.append(_tty_key(rdev, dev))
    return sorted(set(keys))


DEV_TTY = os.makedev(5, 0)  # /dev/tty: a process's controlling terminal, whichever it is


def _dev_tty_keys(console: os.stat_result) -> list[str]:
    """The keys of /dev/tty as the processes whose controlling tty is the console hold it (busybox's ash keeps
    it open for job control): CRIU dumps /dev/tty only with a pty of its session in the dump ("ctty
    inheritance detected"), so it is external too and becomes the new console as well (what it stands for).
    None when a process of the same mount namespace holds /dev/tty for another terminal (a pty of the
    container's own): CRIU restores that one itself, and an external /dev/tty would take it from it."""
    wanted = (os.major(console.st_rdev), os.minor(console.st_rdev))
    holders: list[tuple[int, bool, set[int]]] = []  # mount namespace, controlled by the console, /dev/tty's st_dev
    namespaces = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
            tty = int(text[text.rindex(")") + 2:].split()[4])
            namespace = os.stat(Path(entry.path, "ns/mnt")).st_ino
            held = set()
            for fd in os.scandir(Path(entry.path, "fd")):
                found = os.stat(fd.path)
                if stat.S_ISCHR(found.st_mode) and found.st_rdev == DEV_TTY:
                    held.add(found.st_dev)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        controlled = (os.major(tty), os.minor(tty)) == wanted
        if controlled:
            namespaces.add(namespace)
        if held:
            holders.append((namespace, controlled, held))
    mine = [(controlled, held) for namespace, controlled, held in holders if namespace in namespaces]
    if any(not controlled for controlled, _ in mine):
        return []
    return sorted({_tty_key(DEV_TTY, dev) for _, held in mine for dev in held})


_TTY_FAILURES = ("tty", "master peer")


def explain_dump_failure(name: str, detail: str) -> str:
    """One line for a checkpoint CRIU refused over a terminal a process inside holds open (the console itself
    moves: what is left is a terminal from outside the container, or /dev/tty beside one of the container's
    own ptys)."""
    if not any(marker in detail for marker in _TTY_FAILURES):
        return detail
    return (f"a process in {name!r} holds open a terminal CRIU cannot checkpoint (one from outside the container, "
            f"or /dev/tty): stop that process, or move with --stateless (CRIU: {detail})")


def _root_ids(spec: InstanceSpec) -> tuple[int, int]:
    """The host uid and gid of the container's root (0, 0 for a privileged container)."""
    uid = next((r.host - r.inside for r in spec.idmap if r.uid and r.inside <= 0 < r.inside + r.size), 0)
    gid = next((r.host - r.inside for r in spec.idmap if r.gid and r.inside <= 0 < r.inside + r.size), 0)
    return uid, gid


def _resize(fd: int, width: int, height: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _write_log(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    temporary.replace(path)


def _read_log(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(LOG_LIMIT)
    except FileNotFoundError:
        return b""


async def _unmount(point: Path) -> None:
    """Whatever is mounted on the console's mount point (an earlier run's pty), until nothing is."""
    for _ in range(8):
        if not await asyncio.to_thread(os.path.ismount, point):
            return
        await process.run(["umount", "-l", str(point)], check=False, timeout=30)


class ConsoleSession(Protocol):
    """What a console session attaches to (a container's pty, a VM's serial port): output fans out to the
    queues of the attached sessions (None ends a session), input goes in with `write`."""

    def resize(self, width: int, height: int) -> None: ...

    def attach(self) -> asyncio.Queue[bytes | None]: ...

    def detach(self, queue: asyncio.Queue[bytes | None]) -> None: ...

    async def write(self, data: bytes) -> None: ...


class ConsoleProvider(ABC):
    """What a driver declares as its `consoles` when its instances have a text console: the console of a
    running instance, and the log of its last run. (A driver without one has no `consoles`.)"""

    @abstractmethod
    async def session(self, spec: InstanceSpec) -> ConsoleSession | None:
        """The console of the running instance `spec`; None when this server has none for it now."""

    @abstractmethod
    async def log(self, spec: InstanceSpec) -> bytes:
        """The console's output so far (of its last run, for a stopped instance)."""

    @abstractmethod
    async def clear(self, spec: InstanceSpec) -> None: ...


class Console:
    """One container's console pty, read by the event loop as long as it exists."""

    def __init__(self, lxc_dir: Path, master: int, slave: int) -> None:
        self.lxc_dir = lxc_dir
        self.master = master
        self.slave = slave  # kept open: the master never reads EIO while no process inside holds the console
        self.buffer = bytearray()
        self.sessions: set[asyncio.Queue[bytes | None]] = set()
        self._flush: asyncio.Task[None] | None = None
        self._closed = False
        os.set_blocking(master, False)
        asyncio.get_running_loop().add_reader(master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        self.buffer += data
        if len(self.buffer) > LOG_LIMIT:
            del self.buffer[:len(self.buffer) - LOG_LIMIT]
        for queue in list(self.sessions):
            if queue.qsize() * 65536 > CLIENT_BACKLOG:
                self.sessions.discard(queue)
                queue.put_nowait(None)  # a session that stopped reading is detached, the console goes on
            else:
                queue.put_nowait(data)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._write_later())

    async def _write_later(self) -> None:
        await asyncio.sleep(FLUSH_DELAY)
        await self.save()

    async def save(self) -> None:
        if not self._closed or self.buffer:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_write_log, self.lxc_dir / LOG, bytes(self.buffer))

    async def write(self, data: bytes) -> None:
        """Input: to the container's console, waiting (not blocking) while its pty is full."""
        while data and not self._closed:
            try:
                written = os.write(self.master, data)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            except OSError:
                return
            data = data[written:]

    def resize(self, width: int, height: int) -> None:
        if not self._closed:
            _resize(self.master, width, height)

    def attach(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        if self._closed:  # the container stopped or restarted since the session was asked for: it ends at once
            queue.put_nowait(None)
        else:
            self.sessions.add(queue)
        return queue

    def detach(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.sessions.discard(queue)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        asyncio.get_running_loop().remove_reader(self.master)
        if self._flush is not None:
            self._flush.cancel()
        for queue in self.sessions:
            queue.put_nowait(None)
        self.sessions.clear()
        await self.save()
        os.close(self.master)
        os.close(self.slave)


class Consoles(ConsoleProvider):
    """The consoles of one server's containers, by runtime name."""

    def __init__(self, lxc_path: Path) -> None:
        self.lxc_path = lxc_path
        self._open: dict[str, Console] = {}

    def get(self, spec: InstanceSpec) -> Console | None:
        return self._open.get(spec.runtime_name)

    async def session(self, spec: InstanceSpec) -> ConsoleSession | None:
        return self.get(spec)

    async def prepare(self, spec: InstanceSpec, lxc_dir: Path) -> None:
        """A fresh console for a container about to start or be restored: the link the configuration's
        /dev/console mount names points at its slave, and the log starts empty."""
        await self.close(spec)
        master, slave = os.openpty()
        try:
            path = os.ttyname(slave)
            uid, gid = _root_ids(spec)

            def place() -> None:
                os.set_inheritable(master, False)
                os.set_inheritable(slave, False)
                os.chown(path, uid, gid)
                os.chmod(path, 0o620)
                point = lxc_dir / LINK
                if point.is_symlink() or (point.exists() and not point.is_file()):
                    raise InternalError(f"{point} is not a regular file: the console cannot be mounted there")
                if not point.exists():
                    os.close(os.open(point, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
                _write_log(lxc_dir / LOG, b"")

            await asyncio.to_thread(place)
            await _unmount(lxc_dir / LINK)
            result = await process.run(["mount", "--bind", path, str(lxc_dir / LINK)], check=False, timeout=30)
            if result.returncode != 0:
                raise InternalError(f"The console of {spec.name!r} could not be mounted: {result.error_text}")
            _resize(master, 80, 24)
            self._open[spec.runtime_name] = Console(lxc_dir, master, slave)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise

    def dump_options(self, spec: InstanceSpec) -> str:
        """CRIU's configuration lines for a checkpoint: the console's slave, held open by a process inside (a
        getty), is a tty whose master is outside the container (ours): external, as CRIU names it."""
        try:
            found = os.stat(self.lxc_path / spec.runtime_name / LINK)
        except OSError:
            return ""
        if not stat.S_ISCHR(found.st_mode):
            return ""
        keys = [_tty_key(found.st_rdev, found.st_dev), *_dev_tty_keys(found)]
        return "".join(f"external {key}\n" for key in keys)

    def restore_options(self, spec: InstanceSpec, state: Path) -> tuple[str, tuple[int, ...]]:
        """CRIU's configuration lines for a restore, and the descriptors they name (the caller's to close): the
        external ttys of the checkpoint become the slave of the console prepare() gave the container. One
        descriptor each: CRIU moves each into its store and closes it."""
        keys = external_ttys(state)
        console = self.get(spec)
        if not keys or console is None:
            return "", ()
        fds = tuple(os.dup(console.slave) for _ in keys)  # passed to lxc-checkpoint (pass_fds), CRIU inherits them
        return "".join(f"inherit-fd fd[{fd}]:{key}\n" for fd, key in zip(fds, keys, strict=True)), fds

    async def close(self, spec: InstanceSpec) -> None:
        console = self._open.pop(spec.runtime_name, None)
        if console is not None:
            await console.close()
        await _unmount(self.lxc_path / spec.runtime_name / LINK)

    async def log(self, spec: InstanceSpec) -> bytes:
        """The console's output so far (of its last run, for a stopped instance)."""
        if (console := self.get(spec)) is not None:
            return bytes(console.buffer)
        return await asyncio.to_thread(_read_log, self.lxc_path / spec.runtime_name / LOG)

    async def clear(self, spec: InstanceSpec) -> None:
        if (console := self.get(spec)) is not None:
            console.buffer.clear()
        path = self.lxc_path / spec.runtime_name / LOG
        if await asyncio.to_thread(path.exists):
            await asyncio.to_thread(_write_log, path, b"")

    async def close_all(self) -> None:
        for console in list(self._open.values()):
            await console.close()
        self._open.clear()


async def run_console(op: Operation, console: ConsoleSession, width: int, height: int) -> dict[str, Any]:
    """One session: the console's output to websocket "0", what arrives on it to the console, until the client
    closes "0" or "control" (a detach: the container goes on)."""
    try:
        ws = await op.channel("0", CONNECT_TIMEOUT)
    except TimeoutError:
        raise InternalError(f"The client did not open the console websocket within {CONNECT_TIMEOUT:.0f}s") from None
    console.resize(width, height)
    queue = console.attach()

    async def output() -> None:
        while (data := await queue.get()) is not None:
            with contextlib.suppress(ConnectionError):
                await ws.send_bytes(data)

    async def input_() -> None:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await console.write(msg.data)
            elif msg.type == WSMsgType.TEXT and msg.data:
                await console.write(msg.data.encode())
            elif msg.type != WSMsgType.TEXT:
                break

    async def control() -> None:
        control_ws = await op.channel("control")
        async for msg in control_ws:
            if msg.type != WSMsgType.TEXT or len(msg.data) > MAX_CONTROL_MESSAGE:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                continue
            with contextlib.suppress(ValueError, RecursionError, AttributeError, TypeError):
                command = json.loads(msg.data)
                if command.get("command") == "window-resize":
                    args = command.get("args") or {}
                    w, h = window_size(args.get("width")), window_size(args.get("height"))
                    if w and h:
                        console.resize(w, h)

    tasks = [asyncio.create_task(output()), asyncio.create_task(input_())]
    control_task = asyncio.create_task(control())
    try:
        await asyncio.wait({*tasks, control_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        console.detach(queue)
        for task in (*tasks, control_task):
            task.cancel()
        for name in ("0", "control"):
            if op.channel_attached(name):
                with contextlib.suppress(Exception):
                    await (await op.channel(name)).close()
            op.release(name)
    return {}


def consoles_of(driver: InstanceDriver) -> ConsoleProvider:
    """The driver's declaration of its consoles (its `consoles`)."""
    consoles = getattr(driver, "consoles", None)
    if not isinstance(consoles, ConsoleProvider):
        raise BadRequest(f"The console of a {driver.instance_type} is not supported by this server")
    return consoles


async def session_console(driver: InstanceDriver, spec: InstanceSpec) -> ConsoleSession:
    """The console a new session attaches to: the instance must be running (400 otherwise)."""
    consoles = consoles_of(driver)
    if (await driver.state(spec, detail=False)).status != StatusCode.RUNNING:
        raise BadRequest(f"Instance {spec.name!r} is not running: start it first ('stapes start {spec.name}'); "
                         f"its last console output: 'stapes console {spec.name} --show-log'")
    console = await consoles.session(spec)
    if console is None:
        raise BadRequest(f"Instance {spec.name!r} has no console on this server now (it was started by an earlier "
                         f"run of the server, or by an older Stapes): restart it to get one")
    return console

