"""Running external tools without blocking the event loop, and reaping what they leave behind.

The daemon is a child subreaper: `lxc-start` daemonizes its monitor, which would otherwise be re-parented
to PID 1 (slow to reap on this kind of host). Orphans re-parented to us are reaped by `ChildReaper`, which
never touches the children asyncio itself waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stapes.api.errors import InternalError

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
# Spawning and reaping exclude each other (a reaper must never take a child a spawn has not recorded yet);
# one lock per event loop (the daemon has one; in-process tests make one per test).
_spawn_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _spawn_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _spawn_locks.get(loop)
    if lock is None:
        lock = _spawn_locks[loop] = asyncio.Lock()
    return lock

_our_children: set[int] = set()


@dataclass
class Result:
    argv: Sequence[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def error_text(self) -> str:
        text = (self.stderr or self.stdout).decode(errors="replace").strip()
        return text.splitlines()[-1] if text else f"exit status {self.returncode}"


async def spawn(argv: Sequence[str], **kwargs: Any) -> asyncio.subprocess.Process:
    """Start a tool with close_fds (a leaked descriptor once broke an LXC checkpoint)."""
    async with _spawn_lock():
        proc = await asyncio.create_subprocess_exec(*argv, close_fds=True, **kwargs)
        _our_children.add(proc.pid)
    return proc


def forget(proc: asyncio.subprocess.Process) -> None:
    _our_children.discard(proc.pid)


@contextlib.asynccontextmanager
async def reaped(proc: asyncio.subprocess.Process) -> AsyncIterator[asyncio.subprocess.Process]:
    """While the caller talks to the tool: if it fails or is cancelled, the tool is killed and reaped."""
    try:
        yield proc
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    finally:
        forget(proc)


async def run(
    argv: Sequence[str], *, input: bytes | None = None, check: bool = True, timeout: float | None = None,
    cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
) -> Result:
    proc = await spawn(
        argv, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd,
        env=None if env is None else dict(env),
    )
    async with reaped(proc):
        stdout, stderr = await asyncio.wait_for(proc.communicate(input), timeout)
    assert proc.returncode is not None
    result = Result(argv, proc.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise InternalError(f"{argv[0]} failed: {result.error_text}")
    return result


class ChildReaper:
    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning("could not become a child subreaper: %s", os.strerror(ctypes.get_errno()))
            return
        self._task = asyncio.create_task(self._loop(), name="child reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            async with _spawn_lock():
                for pid in _zombie_children():
                    if pid not in _our_children:
                        with contextlib.suppress(ChildProcessError):
                            os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks


def _zombie_children() -> list[int]:
    pids: list[int] = []
    task_dir = Path("/proc/self/task")
    for task in task_dir.iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat.rpartition(")")[2].split()[0] == "Z":
                pids.append(int(pid))
    return pids
