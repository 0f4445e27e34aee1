"""Lazy (post-copy) live moves: the container's memory never crosses a socket another local user could reach,
and whatever breaks, every wait on CRIU ends and leaves a settled state (issue 16, defects 4 and 6)."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.integration.harness import Cluster, Server, wait_for
from tests.integration.test_live_migration import (
    _assert_counted_on,
    _assert_nothing_on,
    _move_in_background,
    _running_counter,
    _servers,
)

LAZY = ("migration.lazy=true", "security.privileged=true")  # lazy pages need a privileged container here
_ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix: a listening socket


def _listeners() -> dict[int, str]:
    """Socket inode -> what it is, for every listening TCP (IPv4, IPv6) and unix socket of this network
    namespace (the host's: a container's own sockets live in its own)."""
    found: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                found[int(fields[9])] = f"{table} {fields[1]}"
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & _ACCEPTING:
            found[int(fields[6])] = f"unix {fields[7] if len(fields) > 7 else '(unnamed)'}"
    return found


def _descendants(roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _socket_inodes(pids: Iterable[int]) -> dict[int, int]:
    """Socket inode -> a process holding it."""
    inodes = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[int(target[8:-1])] = pid
    return inodes


class _ListenerWatch:
    """Every listening socket that the servers (or a tool they run) open while it watches, beyond those open
    when it started. Other tests on the host open listeners too: only ours count."""

    def __init__(self, servers: list[Server]) -> None:
        self._servers = [s.pid for s in servers]
        self._before = set(_listeners())
        self.opened: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            new = {inode: what for inode, what in _listeners().items() if inode not in self._before}
            if new:
                ours = _socket_inodes(_descendants(self._servers))
                for inode, what in new.items():
                    if inode in ours and inode not in self.opened:  # judged now: its directory may go soon
                        what = _absolute(what, ours[inode])
                        name = what.partition(" ")[2]
                        closed = name.startswith("/") and _only_root_reaches(Path(name))
                        self.opened[inode] = f"{what} (root's only)" if closed else what
            time.sleep(0.005)

    def stop(self) -> dict[int, str]:
        self._stop.set()
        self._thread.join(10)
        return self.opened


def _absolute(what: str, pid: int) -> str:
    """A unix socket bound to a relative path is where its process's working directory was."""
    kind, _, name = what.partition(" ")
    if kind == "unix" and not name.startswith(("/", "@", "(")):
        try:
            name = os.path.join(os.readlink(f"/proc/{pid}/cwd"), name)
        except OSError:
            name = f"{name} (relative, its process gone)"
    return f"{kind} {name}"


def _only_root_reaches(path: Path) -> bool:
    """Some directory above `path` is root's and closed to everyone else."""
    for parent in path.parents:
        try:
            info = parent.stat()
        except OSError:
            continue
        if info.st_uid == 0 and not info.st_mode & stat.S_IXOTH and (info.st_gid == 0 or
                                                                      not info.st_mode & stat.S_IXGRP):
            return True
    return False


@pytest.mark.parametrize("lazy", [True, False])
def test_a_live_move_opens_no_socket_a_local_user_could_reach(cluster: Cluster, lazy: bool) -> None:
    """While the source's CRIU serves the memory and the target's lazy-pages daemon fetches it (or, without
    lazy pages, while the checkpoint and the volume travel), no TCP listener is open (any local user could
    connect to one first and take the memory, or break the move), and any unix socket bound is in a directory
    only root can reach."""
    s1, s2, cli = _servers(cluster, {"STAPES_PAUSE_AT": "source-after-checkpoint"}, {})
    seen, pid, _ = _running_counter(cli, *(LAZY if lazy else ()))
    watch = _ListenerWatch([s1, s2])
    try:
        with _move_in_background(cli, "s1:c1", "s2:") as move:
            marker = s1.state_dir / "paused-at-source-after-checkpoint"
            wait_for(marker.exists, 30, "the source's CRIU to serve the memory")
            time.sleep(0.5)  # the watch looks meanwhile
            marker.unlink()
            out, err = move.communicate(timeout=120)
    finally:
        opened = watch.stop()
    assert move.returncode == 0, err
    assert "live: frozen" in out, out
    if lazy:  # the watch sees what the tools open: the target's lazy-pages daemon binds a socket for the restore
        assert any("/lazy-pages.socket" in what for what in opened.values()), opened
    tcp = [what for what in opened.values() if what.startswith("tcp")]
    assert tcp == [], f"a lazy move listened on TCP: {tcp}"
    for what in opened.values():
        name = what.split(" ", 1)[1]
        if name.startswith("@") and name.endswith("/command"):
            continue  # liblxc's command socket of the restored container (its monitor's, root's only)
        assert not name.startswith("@"), f"an abstract unix socket anyone may connect to: {name}"
        assert name == "(unnamed)" or name.endswith(" (root's only)"), f"{name} is reachable by other users"
    _assert_counted_on(cli, "s2:c1", seen, pid)
    _assert_nothing_on(s1, cli, "s1")


def _leftovers(server: Server) -> list[str]:
    """CRIU or liblxc processes working for `server`, and processes in its containers' cgroups."""
    tag = f"stapes-{hashlib.sha256(str(server.state_dir.resolve()).encode()).hexdigest()[:8]}.payload."
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cgroups = (entry / "cgroup").read_text()
            ended = (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if ended:  # killed, holding nothing, waiting for whoever inherited it to reap it (init reaps slowly here)
            continue
        if (str(server.state_dir) in argv and ("criu" in argv or "lxc-checkpoint" in argv)) or tag in cgroups:
            found.append(f"{entry.name}: {argv[:200]}")
    return found


def test_a_lazy_restore_whose_source_dies_ends_settled(cluster: Cluster) -> None:
    """The source is killed (SIGKILL) once it sent everything but the memory: the target's restore waits for
    pages that will never come. Within a bound the target gives up and nothing of the move is left there: no
    CRIU, no half-restored processes, no instance, no volume; and its listings answer."""
    s1, s2, cli = _servers(cluster, {"STAPES_PAUSE_AT": "source-before-memory"}, {})
    _running_counter(cli, *LAZY)
    with _move_in_background(cli, "s1:c1", "s2:") as move:
        wait_for((s1.state_dir / "paused-at-source-before-memory").exists, 60, "the source to send the state")
        wait_for(lambda: _leftovers(s2), 30, "the target's restore to start")
        time.sleep(1)  # the restore waits for its first pages
        s1.kill()
        killed = time.monotonic()
        _, err = move.communicate(timeout=120)
        assert move.returncode != 0, err
    wait_for(lambda: not s2.running_operations(), 60, "the target to give up")
    assert time.monotonic() - killed < 60
    assert _leftovers(s2) == []
    assert s2.api("GET", "/1.0/instances?recursion=1") == []
    _assert_nothing_on(s2, cli, "s2")
