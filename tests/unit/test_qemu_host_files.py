"""What the QEMU driver does on the host without a QEMU: the files of a VM's volume a migration peer may have
written (qemu.nvram, its temporary name), the refresh that received them, the pid file's identity check, and
the console log the server bounds itself."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stapes.api.errors import BadRequest, InternalError
from stapes.server.instances.accel import Accelerator, QemuHost
from stapes.server.instances.driver import InstanceSpec
from stapes.server.instances.qemu import QemuDriver, _ensure_nvram, lock_holder, running_pid
from stapes.server.instances.qemu_console import ConsoleLog, SerialConsoles
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration.sink import MigrationSink
from stapes.server.storage.base import BLOCK, check_layout

VICTIM = b"a host file the peer wants overwritten\n" * 100


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    directory = tmp_path / "virtual-machines" / "v1"
    directory.mkdir(parents=True)
    with (directory / "root.img").open("wb") as disk:
        disk.truncate(1 << 20)
    return directory


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "OVMF_VARS.fd"
    path.write_bytes(os.urandom(4096) * 16)
    return path


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


def test_the_nvram_is_never_written_through_a_link_a_peer_left(volume: Path, template: Path, victim: Path) -> None:
    """H1: `.qemu.nvram.tmp -> /a/host/file` in the volume (a refresh's rsync -l put it there): the old code
    copied OVMF's variables into the host file, made it 0600 and renamed the link, which QEMU then opened
    read-write."""
    (volume / ".qemu.nvram.tmp").symlink_to(victim)
    nvram = _ensure_nvram(volume, template)
    assert victim.read_bytes() == VICTIM and victim.stat().st_mode & 0o777 == 0o644, "the host file is untouched"
    assert not nvram.is_symlink() and nvram.read_bytes() == template.read_bytes()
    assert nvram.stat().st_mode & 0o777 == 0o600
    assert not os.path.lexists(volume / ".qemu.nvram.tmp")


def test_an_nvram_that_is_not_a_regular_file_is_refused(volume: Path, template: Path, victim: Path) -> None:
    (volume / "qemu.nvram").symlink_to(victim)
    with pytest.raises(InternalError, match="not a regular file"):
        _ensure_nvram(volume, template)
    assert victim.read_bytes() == VICTIM


def test_an_existing_nvram_is_kept(volume: Path, template: Path) -> None:
    (volume / "qemu.nvram").write_bytes(b"the guest's own variables")
    assert _ensure_nvram(volume, template).read_bytes() == b"the guest's own variables"


async def test_a_start_checks_the_volume_layout_before_touching_it(tmp_path: Path, volume: Path, template: Path,
                                                                   victim: Path) -> None:
    """H1: a volume that fails the layout check never starts (and nothing in it is followed first)."""
    (volume / ".qemu.nvram.tmp").symlink_to(victim)
    host = QemuHost("/bin/false", Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), template)
    driver = QemuDriver(tmp_path / "qemu", tmp_path, "t1", host)
    driver.use_accelerator(Accelerator("tcg", "test"))
    spec = InstanceSpec("default", "v1", {}, {"root": {"type": "disk", "path": "/", "pool": "default"}}, volume, {},
                        disk=volume / "root.img")
    with pytest.raises(BadRequest, match="symlink"):
        await driver.start(spec)
    assert victim.read_bytes() == VICTIM
    assert not (volume / "qemu.nvram").exists()


class _Receiver:
    """A refresh's transport that receives what a hostile peer sends: a link named like the nvram's temporary."""

    def __init__(self, victim: Path) -> None:
        self.victim = victim

    async def receive(self, target: Path, *, snapshot: bool, size: int | None) -> None:
        (target / ".qemu.nvram.tmp").symlink_to(self.victim)
        os.mkfifo(target / "fifo")
        (target / "templates").mkdir(exist_ok=True)
        (target / "templates" / "hosts").symlink_to("/etc/hosts")
        (target / "metadata.yaml").write_text("architecture: x86_64\n")


async def test_a_refresh_that_received_links_leaves_none_in_the_volume(volume: Path, victim: Path) -> None:
    """H1: a refresh receives into the existing volume; the layout check refused it, but the old code left the
    link in place for the next start to follow."""
    sink = object.__new__(MigrationSink)
    sink._instances = SimpleNamespace(driver=lambda kind: SimpleNamespace(  # type: ignore[attr-defined]
        check_volume_layout=lambda path: check_layout(path, BLOCK)))
    pool: Any = SimpleNamespace(pool="default", usage=lambda: _usage())
    row: Any = SimpleNamespace(type="virtual-machine", project="default", name="v1")
    offer, answer = pb.MigrationHeader(), pb.MigrationHeader()
    with pytest.raises(BadRequest) as refused:
        await sink._receive_volumes(None, row, volume, pool, _Receiver(victim), offer,  # type: ignore[arg-type]
                                    answer, refresh=True, channels={}, live=None)
    message = refused.value.message
    assert "neither a directory nor a regular file" in message, message
    assert ".qemu.nvram.tmp" in message and "fifo" in message and "templates/hosts" in message, message
    check_layout(volume, BLOCK)  # what is left passes
    assert (volume / "metadata.yaml").is_file() and (volume / "root.img").is_file()
    assert victim.read_bytes() == VICTIM


async def _usage() -> dict[str, int]:
    return {"total": 1 << 40, "used": 0}


def _spoofer(pid_file: Path, *, lock: bool) -> subprocess.Popen[bytes]:
    """A process whose command line reads as this server's QEMU (`qemu-system-x86_64 ... -pidfile PATH`)."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(pid_file)!r}, os.O_WRONLY | os.O_CREAT, 0o600)\n"
            + ("fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n" if lock else "") +
            "os.write(fd, b'%d\\n' % os.getpid()); print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen(["qemu-system-x86_64", "-c", code, "-pidfile", str(pid_file)], executable=sys.executable,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONHOME": sys.base_prefix})
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "qemu" / "v1"
    directory.mkdir(parents=True, mode=0o700)
    yield directory


def test_a_reused_pid_with_a_spoofed_command_line_is_not_taken_for_qemu(runtime: Path) -> None:
    """L7: the pid in the file and a command line naming it were all the old check asked; anyone can make both.
    QEMU holds a write lock on its pid file for as long as it runs: that is the identity."""
    proc = _spoofer(runtime / "qemu.pid", lock=False)
    try:
        assert int((runtime / "qemu.pid").read_text()) == proc.pid
        assert running_pid(runtime) is None
    finally:
        proc.kill()
        proc.wait()


def test_the_process_holding_the_pid_files_lock_is_the_one(runtime: Path) -> None:
    proc = _spoofer(runtime / "qemu.pid", lock=True)
    try:
        (runtime / "qemu.pid").write_text("1\n")  # whatever the file says
        assert lock_holder(runtime / "qemu.pid") == proc.pid
        assert running_pid(runtime) == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert running_pid(runtime) is None
    fd = os.open(runtime / "qemu.pid", os.O_WRONLY)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # our own lock: we are no QEMU
        assert running_pid(runtime) is None
    finally:
        os.close(fd)


def test_the_console_log_stays_bounded(tmp_path: Path) -> None:
    log = ConsoleLog(tmp_path / "console.log", limit=64 << 10)
    written = b""
    for i in range(400):
        chunk = (b"%06d " % i) * 1000
        log.append(chunk)
        written += chunk
        assert (tmp_path / "console.log").stat().st_size <= 2 * (64 << 10)
    log.close()
    data = (tmp_path / "console.log").read_bytes()
    assert len(data) >= 64 << 10 and written.endswith(data)


async def test_a_guest_flooding_its_serial_port_never_fills_the_disk(tmp_path: Path) -> None:
    """H3: the server's own connection to the console socket writes the log; 8 MiB printed leave at most twice
    the limit on disk, the last of it intact; an attached session gets the output too."""
    runtime = tmp_path / "qemu" / "v1"
    runtime.mkdir(parents=True)
    printed = b"".join(b"line %07d of a guest flooding its serial port\n" % i for i in range(180_000))
    done = asyncio.Event()

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for start in range(0, len(printed), 65536):
            writer.write(printed[start:start + 65536])
            await writer.drain()
        done.set()
        await reader.read()  # until the server hangs up
        writer.close()

    server = await asyncio.start_unix_server(guest, str(runtime / "console.sock"))
    spec = InstanceSpec("default", "v1", {}, {}, tmp_path, {})
    consoles = SerialConsoles(lambda s: runtime, log_limit=256 << 10)
    largest = 0
    try:
        console = await consoles.attach(spec)
        queue = console.attach()
        assert (await asyncio.wait_for(queue.get(), 10) or b"").startswith(b"line 0000000 ")
        console.detach(queue)
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                largest = max(largest, (runtime / "console.log").stat().st_size)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        log = await consoles.log(spec)
        assert printed.endswith(log) and len(log) == 256 << 10
        assert (runtime / "console.log").stat().st_size <= 2 * (256 << 10)
        assert largest <= 3 * (256 << 10), "never more on disk than the log's bound (and a write being trimmed)"
        await consoles.clear(spec)
        assert await consoles.log(spec) == b""
    finally:
        await consoles.close_all()
        server.close()
