"""Virtual machines: QEMU (`qemu-system-x86_64`, 10.x), driven over QMP with the `qemu.qmp` library.

Each VM has a runtime directory of its own, `<state root>/qemu/<runtime name>/` (0700, root's alone), with
the sockets QEMU serves (QMP, the serial console, the guest agent's port), its pid file, `qemu.log` (QEMU's
own messages), `console.log` (the last of what the serial console printed, bounded: qemu_console.py),
`machine.json` (what `define` made of the instance) and `running.json` (the machine the running QEMU was built
as: a live move's target needs it). Two servers on one host never collide: their state roots differ, and each
tap's name is a hash of the server, the instance and the nic.

QEMU runs in a session of its own, with its seccomp sandbox on (which rules out `-daemonize`: see
qemu_machine.SANDBOX), so it outlives stapesd: a restarted stapesd finds it by its pid file, checks that
the pid is still that QEMU (the process holding the write lock QEMU keeps on its pid file), and talks to it
again on its QMP socket. stapesd never stops a VM when it exits itself.

QEMU opens nothing by name in the VM's volume (a migration peer wrote it): the server checks the volume's
layout before every start, opens root.img and qemu.nvram itself (O_NOFOLLOW) and the nics' taps (not
persistent: they live as long as QEMU holds them), and passes the descriptors. Where the system user
`stapes-qemu` exists (scripts/setup-system.sh makes it), QEMU drops root for it once everything is open
(`-run-with user=`).

UEFI boot from Debian's OVMF: the code read-only from /usr/share/OVMF, the variables in a copy of the VM's
own, `qemu.nvram` in its config directory (Incus's name), made from OVMF_VARS_4M.fd at the first start.

A guest that powers off ends QEMU (`-action shutdown=poweroff`; a reboot resets the machine and QEMU goes
on): the server notices (a watch per running VM), removes its taps and sockets, and the VM is Stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import stat
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

from qemu.qmp import QMPClient, Runstate
from qemu.qmp.error import QMPError

from stapes.api.errors import BadRequest, InternalError
from stapes.api.status import StatusCode
from stapes.server import process
from stapes.server.instances import qemu_policy
from stapes.server.instances.accel import Accelerator, QemuHost
from stapes.server.instances.driver import (
    ExecRequest,
    InstanceDriver,
    InstanceSpec,
    LiveSource,
    LiveTarget,
    LiveTerms,
    RuntimeState,
)
from stapes.server.instances.qemu_console import SerialConsoles, trim_log, truncate
from stapes.server.instances.qemu_machine import (
    AGENT_SOCKET,
    CONSOLE_LOG,
    CONSOLE_SOCKET,
    FW_VARS_NODE,
    PID_FILE,
    QEMU_LOG,
    QMP_SOCKET,
    Fds,
    Machine,
    argv,
    check_instance,
    disk_node,
    machine_from_spec,
)
from stapes.server.migration.policy import PrecopySettings
from stapes.server.networks import bridge
from stapes.server.storage.base import BLOCK, check_layout

log = logging.getLogger(__name__)
# qemu.qmp logs every connection QEMU closes (a VM that powered off) as an error: ours to say, not its own.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

NVRAM = "qemu.nvram"  # in the VM's config directory: its UEFI variables
MACHINE = "machine.json"
RUNNING = "running.json"
START_TIMEOUT = 30.0  # from spawning QEMU to its QMP socket answering
QMP_TIMEOUT = 10.0  # one QMP command
STATE_TIMEOUT = 5.0  # reading one VM's state (connecting to QMP included)
QUIT_TIMEOUT = 10.0  # for QEMU to exit after `quit`, before it is killed
RUNTIME_FILES = (QMP_SOCKET, CONSOLE_SOCKET, AGENT_SOCKET, PID_FILE, RUNNING)
MAX_SOCKET_PATH = 107  # sun_path's 108 bytes, less its NUL
QEMU_USER = "stapes-qemu"  # the system user QEMU runs as, where it exists (scripts/setup-system.sh)
_PAUSED = {"paused", "suspended", "prelaunch", "inmigrate", "postmigrate", "finish-migrate", "save-vm",
           "restore-vm", "colo"}
_FAILED = {"internal-error": "QEMU hit an internal error", "io-error": "a disk I/O error paused it",
           "guest-panicked": "the guest kernel panicked", "watchdog": "the guest's watchdog fired",
           "debug": "it is stopped in a debugger"}


@dataclass
class _Vm:
    """A running QEMU this server talks to."""

    name: str
    runtime: Path
    pid: int
    client: QMPClient
    watch: asyncio.Task[None] | None = None
    taps: list[tuple[str, str]] = field(default_factory=list)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = QMP_TIMEOUT) -> Any:
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments), timeout)
        except TimeoutError:
            raise InternalError(f"QEMU of {self.name!r} did not answer {command!r} within {timeout:.0f}s") from None
        except (QMPError, ConnectionError, OSError) as err:
            raise InternalError(f"QEMU of {self.name!r} refused {command!r}: {err}") from None


# Starts QEMU ("$@", behind setsid: a session of its own) in the background, stdin from /dev/null, output
# appended to the log ($0), and prints its pid; the shell exits at once, so QEMU is nobody's asyncio child (the
# server, a child subreaper, reaps it when it ends; init does once the server is gone). setsid does not fork
# here (a background job of a non-interactive shell leads no process group): the pid printed is QEMU's.
LAUNCHER = '"$@" </dev/null >>"$0" 2>&1 & echo $!'


def _qmp_client(name: str) -> QMPClient:
    """A QMP client without qemu.qmp's default event queue, which nobody reads and which would grow for as long
    as the VM runs; whoever needs events (a live move) registers a listener of its own."""
    client = QMPClient(name)
    client.events.event_filter = lambda event: False  # the default listener cannot be removed: it takes none
    return client


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def is_our_qemu(cmdline: bytes, pid_file: Path) -> bool:
    """The command line of a QEMU this server started with `pid_file` (pure): a reused pid is not."""
    args = cmdline.split(b"\0")
    pid_arg = str(pid_file).encode()
    return bool(args) and b"qemu-system" in args[0] and any(
        a == b"-pidfile" and b == pid_arg for a, b in zip(args, args[1:], strict=False))


_FLOCK = "hhqqi4x"  # struct flock on Linux x86-64/arm64: l_type, l_whence, l_start, l_len, l_pid


def lock_holder(path: Path) -> int | None:
    """The pid of the process holding a write lock on `path` (QEMU locks its pid file for as long as it runs,
    lockf(3)); None when nobody does. A process that reused the pid holds no lock on the file. Blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        found = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return None
    finally:
        os.close(fd)
    kind, _, _, _, pid = struct.unpack(_FLOCK, found)
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


def qemu_uids() -> set[int]:
    """Whom a QEMU of this server runs as: root, or the QEMU user."""
    try:
        return {0, pwd.getpwnam(QEMU_USER).pw_uid}
    except KeyError:
        return {0}


def running_pid(runtime: Path) -> int | None:
    """The pid of the QEMU running from `runtime`, if it still runs (blocking): the process that holds the lock
    on its pid file, is root's or the QEMU user's, and whose command line names that pid file. The pid written
    in the file is not trusted: a process that reused it is not QEMU."""
    pid_file = runtime / PID_FILE
    pid = lock_holder(pid_file)
    if pid is None:
        return None
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if owner not in qemu_uids() or not is_our_qemu(cmdline, pid_file):
        return None
    return pid if _alive(pid) else None


def _supports_direct(path: Path) -> bool:
    """Whether the file system takes O_DIRECT (ext4, btrfs, xfs do; tmpfs does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _private_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def _proc_figures(pid: int) -> tuple[dict[str, int], dict[str, int]]:
    """QEMU's resident memory (and its peak) and the CPU time it used, in nanoseconds."""
    memory: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                memory["usage" if key == "VmRSS" else "usage_peak"] = int(value.split()[0]) * 1024
    cpu: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        cpu["usage"] = ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return memory, cpu


def _ensure_nvram(volume: Path, template: Path) -> Path:
    """The VM's UEFI variables: made from OVMF's template at its first start, kept from then on. Nothing a
    migration peer left in the volume is followed: the temporary name is removed (whatever it was) and made
    anew, exclusively, never through a link. Blocking."""
    nvram = volume / NVRAM
    directory = os.open(volume, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            mode = os.lstat(NVRAM, dir_fd=directory).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None:
            if not stat.S_ISREG(mode):
                raise InternalError(f"{nvram} is not a regular file: refusing to use it as the VM's UEFI variables")
            return nvram
        temporary = f".{NVRAM}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=directory)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=directory)
        try:
            with template.open("rb") as source:
                while chunk := source.read(1 << 20):
                    os.write(fd, chunk)  # a regular file: written whole
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, NVRAM, src_dir_fd=directory, dst_dir_fd=directory)
    finally:
        os.close(directory)
    return nvram


def _open_image(path: Path, *, direct: bool) -> int:
    """A disk or the UEFI variables, opened by the server for QEMU (read-write; O_DIRECT as QEMU's
    cache.direct=on asks): never through a link, a regular file only. Blocking."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise InternalError(f"{path} cannot be opened for the VM: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InternalError(f"{path} is not a regular file: refusing to give it to the VM")
    return fd


def _close_all(fds: Fds) -> None:
    for fd in (*fds.files.values(), *fds.taps.values()):
        with contextlib.suppress(OSError):
            os.close(fd)


def _clean_runtime(runtime: Path, taps: list[tuple[str, str]]) -> list[str]:
    """What a QEMU that ended leaves: its taps (those still this server's) and its sockets and pid file;
    the logs and machine.json stay. Returns the taps removed. Blocking."""
    removed = [name for name, alias in taps if bridge.delete_tap(name, alias)]
    for name in RUNTIME_FILES:
        with contextlib.suppress(FileNotFoundError):
            (runtime / name).unlink()
    return removed


def _recorded_taps(runtime: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads((runtime / RUNNING).read_text())
        return [(tap["name"], tap["alias"]) for tap in data.get("taps", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def qemu_user() -> tuple[str, int, int] | None:
    """The user QEMU drops root for (its name, uid, gid), when this host has it."""
    try:
        entry = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


class QemuDriver(InstanceDriver):
    instance_type: ClassVar[str] = "virtual-machine"
    # exec goes to the guest agent, which carries the terminal itself (exec_session.py): no host pty.
    exec_host_pty: ClassVar[bool] = False

    def __init__(self, runtime_root: Path, state_root: Path, server_id: str, host: QemuHost) -> None:
        self.runtime_root = runtime_root
        self.state_root = state_root
        self.server_id = server_id
        self.host = host
        self.accelerator = Accelerator("", "not probed yet")
        self._probed = asyncio.Event()
        self._vms: dict[str, _Vm] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._connecting: dict[str, asyncio.Lock] = {}  # QEMU's QMP socket takes one client at a time
        self.consoles = SerialConsoles(self.runtime_dir)
        self.user = qemu_user()

    # The accelerator, probed once per daemon start (accel.probe): starts wait for it.
    def use_accelerator(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self._probed.set()

    async def _accel(self) -> str:
        try:
            await asyncio.wait_for(self._probed.wait(), 30)
        except TimeoutError:
            raise InternalError("The accelerator probe has not finished: try again in a moment") from None
        if not self.accelerator.name:
            raise InternalError(f"Virtual machines cannot run here: {self.accelerator.reason}")
        return self.accelerator.name

    async def prepare(self) -> None:
        """At start: the runtime root, root's alone."""
        await asyncio.to_thread(_private_directory, self.runtime_root)

    def runtime_dir(self, spec: InstanceSpec) -> Path:
        """The VM's runtime directory; a hashed name when the runtime name would make a socket path longer than
        a unix socket takes (a long project and instance name, a deep state directory)."""
        directory = self.runtime_root / spec.runtime_name
        if len(str(directory / CONSOLE_SOCKET).encode()) > MAX_SOCKET_PATH:
            directory = self.runtime_root / ("~" + hashlib.sha256(spec.runtime_name.encode()).hexdigest()[:16])
        return directory

    def agent_socket(self, spec: InstanceSpec) -> Path:
        """The host end of the guest agent's virtio-serial port (org.stapes.agent)."""
        return self.runtime_dir(spec) / AGENT_SOCKET

    def check_volume_layout(self, volume: Path) -> None:
        """A VM's volume: its config directory with a regular root.img (the disk), nothing that leads out."""
        check_layout(volume, BLOCK)

    def check_instance(self, config: Mapping[str, str], devices: Mapping[str, Mapping[str, str]]) -> None:
        check_instance(config, devices)

    def _lock(self, spec: InstanceSpec) -> asyncio.Lock:
        return self._locks.setdefault(spec.runtime_name, asyncio.Lock())

    def _machine(self, spec: InstanceSpec, accel: str, *, direct: bool = True) -> Machine:
        machine_uuid = spec.config.get("volatile.uuid") or str(uuid.uuid5(uuid.NAMESPACE_URL, (
            f"stapes:{self.server_id}:{spec.runtime_name}")))
        machine = machine_from_spec(spec, accel=accel, runtime=self.runtime_dir(spec), uuid=machine_uuid,
                                    firmware_code=self.host.firmware_code, nvram=spec.volume / NVRAM,
                                    direct=direct,
                                    tap=lambda device: bridge.tap_name(self.server_id, spec.runtime_name, device))
        return dataclasses.replace(machine, machine_type=self.accelerator.machine_type)  # versioned: accel.py

    def _tap_aliases(self, machine: Machine, spec: InstanceSpec) -> list[tuple[str, str]]:
        return [(nic.tap, bridge.tap_alias(str(self.state_root), spec.runtime_name, nic.name))
                for nic in machine.nics]

    async def define(self, spec: InstanceSpec) -> None:
        """Checks what the instance asks for (unsupported devices and keys are refused, saying what is
        supported) and records the machine it makes."""
        machine = self._machine(spec, self.accelerator.name or "tcg")
        runtime = self.runtime_dir(spec)

        def write() -> None:
            _private_directory(runtime)
            temporary = runtime / f".{MACHINE}.tmp"
            temporary.write_text(machine.dumps())
            temporary.replace(runtime / MACHINE)

        await asyncio.to_thread(write)

    async def undefine(self, spec: InstanceSpec) -> None:
        runtime = self.runtime_dir(spec)
        async with self._lock(spec):
            if await asyncio.to_thread(running_pid, runtime) is not None:  # a restore being undone
                await self._stop_locked(spec, timeout=0, force=True)
            await self._forget(spec, runtime)
            await asyncio.to_thread(shutil.rmtree, runtime, True)
        self._locks.pop(spec.runtime_name, None)

    async def start(self, spec: InstanceSpec) -> None:
        accel = await self._accel()
        async with self._lock(spec):
            await self._start_locked(spec, accel)

    async def _start_locked(self, spec: InstanceSpec, accel: str, extra: tuple[str, ...] = (),
                            rebuild: Callable[[Machine, int], Machine] | None = None) -> None:
        runtime = self.runtime_dir(spec)
        if await asyncio.to_thread(running_pid, runtime) is not None:
            raise BadRequest(f"Instance {spec.name!r} is already running")
        try:  # what a migration peer, an image or a backup put there: directories and regular files only
            await asyncio.to_thread(check_layout, spec.volume, BLOCK)
        except BadRequest as err:
            raise BadRequest(f"Failed to start {spec.name!r}: {err.message}") from None
        disk = spec.disk
        if disk is None or disk.is_symlink() or not disk.is_file():
            raise InternalError(f"Failed to start {spec.name!r}: its root disk is not a file in its volume ({disk})")
        direct = await asyncio.to_thread(_supports_direct, disk)
        machine = self._machine(spec, accel, direct=direct)
        if rebuild is not None:  # a live move's target: the source's machine, on this server's files and taps
            machine = rebuild(machine, _host_memory_mib())
        if extra:
            machine = Machine.from_json({**machine.to_json(), "extra": list(extra)})
        taps = self._tap_aliases(machine, spec)
        binary = self.host.binary or "qemu-system-x86_64"
        user = self.user[0] if self.user is not None else None
        opened = Fds({}, {})

        def prepare() -> Fds:
            _private_directory(runtime)
            _clean_runtime(runtime, _recorded_taps(runtime))  # what a QEMU that died unnoticed left
            _ensure_nvram(spec.volume, self.host.firmware_vars)
            files: dict[str, int] = {}
            nics: dict[str, int] = {}
            fds = Fds(files, nics)
            try:
                files[FW_VARS_NODE] = _open_image(Path(machine.firmware_vars), direct=False)
                for index, disk in enumerate(machine.disks):
                    files[disk_node(index, disk)] = _open_image(Path(disk.path), direct=disk.direct)
                for nic in machine.nics:
                    nics[nic.name] = bridge.open_tap(nic.tap, nic.bridge, dict(taps)[nic.tap], nic.mtu)
                record = {**machine.to_json(), "taps": [{"name": n, "alias": a} for n, a in taps],
                          "argv": argv(machine, binary, fds, user)}
                temporary = runtime / f".{RUNNING}.tmp"
                temporary.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
                temporary.replace(runtime / RUNNING)
                truncate(runtime / CONSOLE_LOG)  # the log of this run only, as a container's
                trim_log(runtime / QEMU_LOG)
            except BaseException:
                _close_all(fds)
                raise
            return fds

        try:
            opened = await asyncio.to_thread(prepare)
            command = argv(machine, binary, opened, user)
            started = time.monotonic()
            vm = await self._spawn(spec, runtime, command, opened)
        except BaseException:
            _close_all(opened)
            await asyncio.to_thread(_clean_runtime, runtime, taps)
            raise
        _close_all(opened)  # QEMU holds them now (the taps live as long as it does)
        vm.taps = taps
        log.info("QEMU of %s (pid %d, %s%s) answers on QMP after %.3fs", spec.name, vm.pid, accel,
                 f", as {user}" if user else ", as root", time.monotonic() - started)
        try:
            try:
                await self.consoles.attach(spec)  # before the guest prints anything: it waits (-S) until cont
            except InternalError as err:
                log.warning("%s: %s (its console log starts later)", spec.name, err.message)
            if "-incoming" not in machine.extra:  # a live move's target runs once the state is in
                await vm.execute("cont")
        except BaseException:
            await self._stop_locked(spec, timeout=0, force=True)
            raise

    async def _spawn(self, spec: InstanceSpec, runtime: Path, command: list[str], fds: Fds) -> _Vm:
        """QEMU started detached: not this server's asyncio child (asyncio kills a child whose transport it
        closes, as at the server's exit), in a session of its own (no signal to the server's group reaches it),
        its output appended to qemu.log, the descriptors of `fds` inherited (through sh and setsid, which close
        none). Returns once QMP answers."""
        log_path = runtime / QEMU_LOG
        with log_path.open("ab") as log_file:
            log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting QEMU\n".encode())
        launcher = await process.spawn(
            ["sh", "-c", LAUNCHER, str(log_path), "setsid", *command], cwd=str(runtime),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            pass_fds=(*fds.files.values(), *fds.taps.values()))
        async with process.reaped(launcher):
            out, err = await asyncio.wait_for(launcher.communicate(), 30)
        if launcher.returncode != 0 or not out.split():
            raise InternalError(f"Failed to start {spec.name!r}: its launcher failed "
                                f"({err.decode(errors='replace').strip() or launcher.returncode})")
        pid = int(out.split()[-1])
        deadline = time.monotonic() + START_TIMEOUT
        client: QMPClient | None = None
        try:
            while True:
                if not await asyncio.to_thread(_alive, pid):
                    raise InternalError(f"Failed to start {spec.name!r}: QEMU exited: {self._qemu_error(runtime)}")
                if (runtime / QMP_SOCKET).exists():
                    client = _qmp_client(spec.runtime_name)
                    try:
                        await asyncio.wait_for(client.connect(str(runtime / QMP_SOCKET)), 5)
                        break
                    except (QMPError, OSError, TimeoutError):
                        client = None
                if time.monotonic() > deadline:
                    raise InternalError(f"Failed to start {spec.name!r}: QEMU's QMP socket did not answer within "
                                        f"{START_TIMEOUT:.0f}s")
                await asyncio.sleep(0.02)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await _exited(pid, QUIT_TIMEOUT)
            raise
        vm = _Vm(spec.name, runtime, pid, client)
        self._vms[spec.runtime_name] = vm
        vm.watch = asyncio.create_task(self._watch(spec, vm), name=f"qemu watch {spec.name}")
        return vm

    def _qemu_error(self, runtime: Path) -> str:
        try:
            lines = (runtime / QEMU_LOG).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        start = max((i for i, line in enumerate(lines) if line.startswith("--- ")), default=-1)
        messages = [line.removeprefix("qemu-system-x86_64: ") for line in lines[start + 1:] if line.strip()]
        return "; ".join(messages[-3:]) or "(nothing in its log)"

    async def _connected(self, spec: InstanceSpec, runtime: Path, pid: int) -> _Vm:
        """The QMP connection to the running QEMU `pid`: this run's, or a new one to a QEMU an earlier run of
        the server started (it is watched from then on, and its console logged again). One connection is made
        at a time: QEMU's QMP socket serves one client and leaves a second one unanswered until the first goes
        (two callers at once, as the power-state restore and a state request right after a server's start,
        would otherwise make the second wait for a greeting that never comes)."""
        vm = self._vms.get(spec.runtime_name)
        if vm is not None and vm.pid == pid and vm.client.runstate == Runstate.RUNNING:
            return vm
        async with self._connecting.setdefault(spec.runtime_name, asyncio.Lock()):
            vm = self._vms.get(spec.runtime_name)
            if vm is not None and vm.pid == pid and vm.client.runstate == Runstate.RUNNING:
                return vm  # made by the caller that held the lock
            if vm is not None:
                await self._drop(spec.runtime_name, vm)
            client = _qmp_client(spec.runtime_name)
            try:
                await asyncio.wait_for(client.connect(str(runtime / QMP_SOCKET)), STATE_TIMEOUT)
            except (QMPError, OSError, TimeoutError) as err:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), 1)
                raise InternalError(f"QEMU of {spec.name!r} (pid {pid}) does not answer on its QMP socket within "
                                    f"{STATE_TIMEOUT:.0f}s ({err or 'no greeting'})") from None
            vm = _Vm(spec.name, runtime, pid, client, taps=await asyncio.to_thread(_recorded_taps, runtime))
            self._vms[spec.runtime_name] = vm
            vm.watch = asyncio.create_task(self._watch(spec, vm), name=f"qemu watch {spec.name}")
        log.info("found the running QEMU of %s again (pid %d)", spec.name, pid)
        try:
            await self.consoles.attach(spec)
        except InternalError as err:
            log.warning("%s: %s", spec.name, err.message)
        return vm

    async def _drop(self, runtime_name: str, vm: _Vm) -> None:
        if self._vms.get(runtime_name) is vm:
            del self._vms[runtime_name]
        if vm.watch is not None and vm.watch is not asyncio.current_task():
            vm.watch.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(vm.client.disconnect(), 5)

    async def _watch(self, spec: InstanceSpec, vm: _Vm) -> None:
        """Until the QEMU ends (a poweroff inside, a crash, a kill): then its taps and sockets go."""
        try:
            await _exited(vm.pid, float("inf"), interval=0.5)
        except asyncio.CancelledError:
            return
        async with self._lock(spec):
            if self._vms.get(spec.runtime_name) is not vm:
                return  # stopped (and cleaned up) by the server meanwhile
            removed = await self._after_exit(spec, vm)
        log.info("QEMU of %s ended (pid %d)%s", spec.name, vm.pid,
                 f"; removed taps {', '.join(removed)}" if removed else "")

    async def _after_exit(self, spec: InstanceSpec, vm: _Vm) -> list[str]:
        await self._drop(spec.runtime_name, vm)
        await self.consoles.close(spec)
        self._agent_gone(spec)
        return await asyncio.to_thread(_clean_runtime, vm.runtime, vm.taps or _recorded_taps(vm.runtime))

    async def _forget(self, spec: InstanceSpec, runtime: Path) -> None:
        vm = self._vms.get(spec.runtime_name)
        if vm is not None:
            await self._drop(spec.runtime_name, vm)
        await self.consoles.close(spec)
        self._agent_gone(spec)
        await asyncio.to_thread(_clean_runtime, runtime, _recorded_taps(runtime))

    def _agent_gone(self, spec: InstanceSpec) -> None:
        """The VM stopped: the agent's connection (and what ran over it) goes too."""
        try:
            from stapes.server.instances import vm_agent
        except ImportError:
            return
        vm_agent.disconnect(self.agent_socket(spec))

    async def stop(self, spec: InstanceSpec, *, timeout: float, force: bool) -> None:
        async with self._lock(spec):
            await self._stop_locked(spec, timeout=timeout, force=force)

    async def _stop_locked(self, spec: InstanceSpec, *, timeout: float, force: bool) -> None:
        """ACPI's power button (the guest shuts down), then, after `timeout` or at once when `force`, QMP's
        `quit`, then SIGKILL. Whatever happens, the VM's taps and sockets are gone after."""
        runtime = self.runtime_dir(spec)
        pid = await asyncio.to_thread(running_pid, runtime)
        if pid is None:
            await self._forget(spec, runtime)
            return
        vm: _Vm | None = None
        with contextlib.suppress(InternalError):
            vm = await self._connected(spec, runtime, pid)
        try:
            if vm is not None and not force and timeout > 0:
                status = (await vm.execute("query-status")).get("status")
                if status in _PAUSED:
                    await vm.execute("cont")  # a paused guest cannot see its power button
                await vm.execute("system_powerdown")
                if await _exited(pid, timeout):
                    return
                log.info("%s did not power off within %.0fs: quitting QEMU", spec.name, timeout)
            if vm is not None:
                with contextlib.suppress(InternalError):
                    await vm.execute("quit", timeout=QUIT_TIMEOUT)
                if await _exited(pid, QUIT_TIMEOUT):
                    return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not await _exited(pid, QUIT_TIMEOUT):
                raise InternalError(f"Failed to stop {spec.name!r}: QEMU (pid {pid}) did not die")
        finally:
            if await asyncio.to_thread(running_pid, runtime) is None:
                await self._forget(spec, runtime)

    async def _running(self, spec: InstanceSpec) -> _Vm:
        runtime = self.runtime_dir(spec)
        pid = await asyncio.to_thread(running_pid, runtime)
        if pid is None:
            raise BadRequest(f"Instance {spec.name!r} is not running")
        return await self._connected(spec, runtime, pid)

    async def freeze(self, spec: InstanceSpec) -> None:
        await (await self._running(spec)).execute("stop")

    async def unfreeze(self, spec: InstanceSpec) -> None:
        await (await self._running(spec)).execute("cont")

    async def qmp(self, spec: InstanceSpec) -> QMPClient:
        """The QMP connection to the running VM (for a live move's session)."""
        return (await self._running(spec)).client

    # Live migration (qemu_live.py has the sessions; these are what they ask of the running QEMU).
    live_state_type: ClassVar[str | None] = "VM_QEMU"
    live_disk_mirrored: ClassVar[bool] = True

    async def execute(self, spec: InstanceSpec, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = QMP_TIMEOUT) -> Any:
        return await (await self._running(spec)).execute(command, arguments, timeout)

    async def pass_fd(self, spec: InstanceSpec, fd: int, name: str) -> None:
        """Hands QEMU a descriptor (SCM_RIGHTS on its QMP socket) as `name` (`getfd`); one at a time per VM: the
        next `getfd` takes whatever descriptor arrived last."""
        vm = await self._running(spec)
        async with self._connecting.setdefault(f"fd:{spec.runtime_name}", asyncio.Lock()):
            try:
                vm.client.send_fd_scm(fd)
            except (QMPError, OSError) as err:
                raise InternalError(f"QEMU of {spec.name!r} could not be handed a descriptor: {err}") from None
            await vm.execute("getfd", {"fdname": name})

    async def running_machine(self, spec: InstanceSpec) -> Machine:
        machine = await asyncio.to_thread(_running_machine, self.runtime_dir(spec))
        if machine is None:
            raise InternalError(f"The record of the running machine of {spec.name!r} is missing: restart it first")
        return machine

    async def agent_answers(self, spec: InstanceSpec, timeout: float = 2.0) -> bool:
        try:
            from stapes.server.instances import vm_agent
        except ImportError:
            return False
        deadline = time.monotonic() + timeout
        while True:
            if await vm_agent.guest_addresses(self.agent_socket(spec), timeout=min(2.0, timeout)):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)

    async def disk_size(self, spec: InstanceSpec) -> int:
        return 0 if spec.disk is None else (await asyncio.to_thread(spec.disk.stat)).st_size

    async def start_incoming(self, spec: InstanceSpec, rebuild: Callable[[Machine, int], Machine]) -> None:
        """A live move's target: QEMU built as the source's machine, waiting for its state (-incoming defer)."""
        accel = await self._accel()
        async with self._lock(spec):
            await self._start_locked(spec, accel, ("-incoming", "defer"), rebuild)

    async def cancel_migration(self, spec: InstanceSpec) -> None:
        """Whatever a live move left running in this QEMU ends, and its guest continues: the migration is
        cancelled (and waited for), the disk mirror too, its NBD node removed; a paused guest is continued."""
        from stapes.server.instances.qemu_live import MIRROR_JOB, MIRROR_NODE
        vm = await self._running(spec)
        migration = await vm.execute("query-migrate")
        if migration.get("status") in ("setup", "active", "pre-switchover", "device", "wait-unplug"):
            with contextlib.suppress(InternalError):
                await vm.execute("migrate_cancel")
            deadline = time.monotonic() + 30
            while (await vm.execute("query-migrate")).get("status") in ("cancelling", "active", "pre-switchover",
                                                                        "device", "setup"):
                if time.monotonic() > deadline:
                    raise InternalError("QEMU did not cancel its migration within 30s")
                await asyncio.sleep(0.02)
        jobs = await vm.execute("query-block-jobs")
        if any(isinstance(j, dict) and j.get("device") == MIRROR_JOB for j in jobs):
            with contextlib.suppress(InternalError):
                await vm.execute("block-job-cancel", {"device": MIRROR_JOB, "force": True})
            deadline = time.monotonic() + 30
            while any(isinstance(j, dict) and j.get("device") == MIRROR_JOB and j.get("status") != "concluded"
                      for j in await vm.execute("query-block-jobs")):
                if time.monotonic() > deadline:
                    raise InternalError("QEMU did not end its disk mirror within 30s")
                await asyncio.sleep(0.02)
            with contextlib.suppress(InternalError):
                await vm.execute("job-dismiss", {"id": MIRROR_JOB})
        nodes = await vm.execute("query-named-block-nodes", {"flat": True})
        if any(isinstance(n, dict) and n.get("node-name") == MIRROR_NODE for n in nodes):
            with contextlib.suppress(InternalError):
                await vm.execute("blockdev-del", {"node-name": MIRROR_NODE})
        if (await vm.execute("query-status")).get("status") in _PAUSED:
            await vm.execute("cont")

    def _live_refusal(self, where: str) -> str | None:
        if not self.accelerator.name:
            return f"virtual machines cannot run {where}: {self.accelerator.reason}"
        return qemu_policy.version_refusal(self.accelerator.name, self.accelerator.qemu_version)

    async def live_refusal(self, spec: InstanceSpec) -> str | None:
        if (refusal := self._live_refusal("here")) is not None:
            return refusal
        try:
            qemu_policy.check_config(spec.config)
        except BadRequest as err:
            return err.message
        return None

    async def accept_refusal(self, spec: InstanceSpec) -> str | None:
        await self._accel_probed()
        return self._live_refusal("on this server")

    async def _accel_probed(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._probed.wait(), 30)

    def live_source(self, spec: InstanceSpec, directory: Path, terms: LiveTerms, *, precopy: PrecopySettings,
                    keep_running: bool) -> LiveSource:
        from stapes.server.instances.qemu_live import QemuLiveSource
        return QemuLiveSource(self, spec, directory, terms)

    def live_target(self, spec: InstanceSpec, directory: Path) -> LiveTarget:
        from stapes.server.instances.qemu_live import QemuLiveTarget
        return QemuLiveTarget(self, spec, directory)

    async def recover_source(self, spec: InstanceSpec, directory: Path, *, complete: bool) -> bool:
        """The server stopped in the middle of a live move the target never confirmed: the VM's QEMU ran on (it
        outlives the server); its migration and mirror are cancelled and its guest continued, if paused."""
        if await asyncio.to_thread(running_pid, self.runtime_dir(spec)) is None:
            return False
        await self.cancel_migration(spec)
        return True

    async def release_moved(self, spec: InstanceSpec) -> None:
        """The server stopped after it handed the VM over: its paused QEMU here goes."""
        if await asyncio.to_thread(running_pid, self.runtime_dir(spec)) is not None:
            await self.stop(spec, timeout=0, force=True)

    async def state(self, spec: InstanceSpec, *, detail: bool) -> RuntimeState:
        runtime = self.runtime_dir(spec)
        pid = await asyncio.to_thread(running_pid, runtime)
        if pid is None:
            vm = self._vms.get(spec.runtime_name)
            if vm is not None or await asyncio.to_thread((runtime / PID_FILE).exists):
                async with self._lock(spec):  # it ended unnoticed (while the server was down): clean up now
                    if await asyncio.to_thread(running_pid, runtime) is None:
                        await self._forget(spec, runtime)
            return RuntimeState(StatusCode.STOPPED)
        try:
            async with asyncio.timeout(STATE_TIMEOUT):
                vm = await self._connected(spec, runtime, pid)
                answer = await vm.execute("query-status", timeout=STATE_TIMEOUT)
        except (InternalError, TimeoutError) as err:
            reason = err.message if isinstance(err, InternalError) else f"QMP did not answer within {STATE_TIMEOUT}s"
            return RuntimeState(StatusCode.ERROR, pid=pid, error=f"its state could not be read: {reason}")
        qemu_status = str(answer.get("status", ""))
        if qemu_status == "running":
            status = StatusCode.RUNNING
        elif qemu_status in _PAUSED:
            status = StatusCode.FROZEN
        elif qemu_status == "shutdown":
            status = StatusCode.STOPPING
        else:
            return RuntimeState(StatusCode.ERROR, pid=pid, error=_FAILED.get(
                qemu_status, f"QEMU reports its state as {qemu_status!r}"))
        state = RuntimeState(status, pid=pid, processes=-1)
        if detail:
            memory, cpu = await asyncio.to_thread(_proc_figures, pid)
            machine = await asyncio.to_thread(_running_machine, runtime)
            if machine is not None:
                memory["total"] = machine.memory_mib << 20
            state.memory = {"usage": 0, "usage_peak": 0, **memory}
            state.cpu = cpu or {"usage": 0}
            if machine is not None:
                state.network = await self._network(spec, machine)
        return state

    async def _network(self, spec: InstanceSpec, machine: Machine) -> dict[str, Any] | None:
        """The guest's interfaces and addresses from its agent (within a second: a VM still booting has none
        yet), each nic with its tap and the tap's counters; the taps alone when the agent does not answer."""
        taps = await asyncio.to_thread(_nic_states, machine)
        try:
            from stapes.server.instances import vm_agent
        except ImportError:
            return taps or None
        guest: dict[str, Any] = await vm_agent.guest_addresses(self.agent_socket(spec))
        if not guest:
            return taps or None
        by_mac = {nic.mac: taps[nic.name] for nic in machine.nics}
        for entry in guest.values():
            host = by_mac.get(str(entry.get("hwaddr", "")).lower())
            if host is not None:
                entry["host_name"] = host["host_name"]
                entry["counters"] = host["counters"] or entry.get("counters", {})
        return guest

    async def states(self, specs: list[InstanceSpec]) -> dict[str, RuntimeState]:
        limit = asyncio.Semaphore(8)

        async def one(spec: InstanceSpec) -> RuntimeState:
            async with limit:
                try:
                    return await asyncio.wait_for(self.state(spec, detail=False), STATE_TIMEOUT * 2)
                except TimeoutError:
                    return RuntimeState(StatusCode.ERROR, error="its state could not be read within "
                                        f"{STATE_TIMEOUT * 2:.0f}s")
                except Exception as err:  # one VM never fails the listing of the others
                    return RuntimeState(StatusCode.ERROR, error=f"its state could not be read: {err}")

        found = await asyncio.gather(*(one(spec) for spec in specs))
        return {spec.runtime_name: state for spec, state in zip(specs, found, strict=True)}

    async def exec(self, spec: InstanceSpec, request: ExecRequest, stdio: tuple[Any, Any, Any]
                   ) -> asyncio.subprocess.Process:
        await self._running(spec)
        try:
            from stapes.server.instances import vm_agent
        except ImportError:
            raise BadRequest("exec in virtual machines is not available in this version of the server") from None
        # The agent carries the command's stdio or terminal itself (exec_host_pty): an ExecProcess, not a host
        # process (exec_session.py casts it back).
        return cast(asyncio.subprocess.Process, await vm_agent.exec_in_guest(self.agent_socket(spec), request, stdio))

    def log_files(self, spec: InstanceSpec) -> dict[str, Path]:
        runtime = self.runtime_dir(spec)
        return {QEMU_LOG: runtime / QEMU_LOG, CONSOLE_LOG: runtime / CONSOLE_LOG}

    async def shutdown(self) -> None:
        """The server stops: its QMP connections close, its VMs run on."""
        for name, vm in list(self._vms.items()):
            await self._drop(name, vm)
        await self.consoles.close_all()


async def _exited(pid: int, timeout: float, interval: float = 0.1) -> bool:
    """Whether QEMU `pid` ended within `timeout` (it may be another's child: its /proc entry is what tells)."""
    deadline = time.monotonic() + timeout
    while True:
        if not await asyncio.to_thread(_alive, pid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


def _host_memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) >> 10
    return 0


def _running_machine(runtime: Path) -> Machine | None:
    try:
        data = json.loads((runtime / RUNNING).read_text())
        data.pop("taps", None)
        data.pop("argv", None)
        return Machine.from_json(data)
    except (OSError, ValueError, TypeError):
        return None


def _nic_states(machine: Machine) -> dict[str, Any]:
    """What the host sees of each nic (its tap's counters, the MAC); the guest's addresses come from its
    agent or the network's leases."""
    found: dict[str, Any] = {}
    for nic in machine.nics:
        counters = bridge.tap_counters(nic.tap)
        found[nic.name] = {"addresses": [], "counters": counters or {}, "hwaddr": nic.mac, "host_name": nic.tap,
                           "mtu": nic.mtu or 0, "state": "up" if counters is not None else "down",
                           "type": "broadcast"}
    return found
