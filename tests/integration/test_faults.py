"""Faults during a move, in every mode: a server killed at each step, the connection between the servers cut
or stalled, the target pool full, a server restarted. After each, the instance exists exactly once, on the
source, and starts; nothing of it is left on the target (volume, LXC definition, row, operation, process,
temporary file); and the error says which side failed.

Timings: a killed peer is noticed at once (its sockets close); a stalled one after the idle timeout, set to
4 s here (120 s by default).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.fstree import fingerprint
from tests.integration.harness import STAPES, Cli, Cluster, Server, free_port, wait_for
from tests.integration.hostile import Raw

MODES = ["pull", "push", "relay"]
IDLE = "4"
SLOW_MIB, SLOW_RATE = 48, "16MiB"  # three seconds of transfer: a window to strike in


def _servers(cluster: Cluster, pause: str = "", trusted: bool = True) -> tuple[Server, Server, Cli]:
    env = {"STAPES_MIGRATION_IDLE_TIMEOUT": IDLE, **({"STAPES_PAUSE_AT": pause} if pause else {})}
    s1 = cluster.server("s1", "127.0.0.1", env)
    s2 = cluster.server("s2", "127.0.0.2", env)
    cli = cluster.cli()
    if trusted:
        cli.trust(s1, "s1")
        cli.trust(s2, "s2")
    return s1, s2, cli


def _container(server: Server, *, slow: bool) -> dict[str, tuple[object, ...]]:
    pool = "default"
    if slow:
        pool = "slow"
        server.api("POST", "/1.0/storage-pools", {"name": "slow", "driver": "dir",
                                                  "config": {"rsync.bwlimit": SLOW_RATE}})
    server.run_op("POST", "/1.0/instances", {"name": "c1", "source": {"type": "image", "alias": "busybox"},
                                             "devices": {"root": {"type": "disk", "path": "/", "pool": pool}}})
    root = _rootfs(server, pool)
    if slow:
        subprocess.run(["dd", "if=/dev/urandom", f"of={root / 'random.bin'}", "bs=1M", f"count={SLOW_MIB}",
                        "status=none"], check=True)
    return fingerprint(root)


def _rootfs(server: Server, pool: str) -> Path:
    return server.state_dir / "storage-pools" / pool / "containers" / "c1" / "rootfs"


def _transferring(target: Server) -> bool:
    return any(((op.get("metadata") or {}).get("progress") or {}).get("bytes", 0) > 0
               for op in target.running_operations())


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _assert_exactly_once_on_the_source(cluster: Cluster, s1: Server, s2: Server,
                                       before: dict[str, tuple[object, ...]], pool: str) -> None:
    try:
        wait_for(lambda: not s1.running_operations() and not s2.running_operations(), 30, "operations to end")
    except AssertionError:
        still = [(s, op["description"], op["metadata"].get("progress")) for s in (s1, s2)
                 for op in s.running_operations()]
        raise AssertionError(f"operations still running: {still}") from None
    assert fingerprint(_rootfs(s1, pool)) == before
    assert s1.instances() == [("c1", "Stopped")]
    assert s2.instances() == []
    for leftover in (s2.state_dir / "storage-pools/default/containers", s2.state_dir / "containers"):
        assert not any(leftover.iterdir()), f"left on the target: {list(leftover.iterdir())}"
    temporary = [p for p in cluster.root.rglob("*") if p.name.startswith((".stapes-send-", "upload-"))]
    assert not temporary, temporary
    ours = {s1.pid, s2.pid}
    strays = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in ours:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("dnsmasq ") and _parent(proc) in ours:
            continue  # a server's own DHCP server, which lives as long as the server
        if str(cluster.root) in cmdline and "stapesd" not in cmdline:
            strays.append(cmdline)
    assert not strays, strays
    for action in ("start", "stop"):  # the source is neither locked nor damaged
        result = s1.run_op("PUT", "/1.0/instances/c1/state", {"action": action, "force": True})
        assert result["status"] == "Success", result


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ["source", "target"])
@pytest.mark.parametrize("when", ["before-header", "mid-fs", "before-commit"])
def test_a_server_killed_during_a_move(cluster: Cluster, mode: str, side: str, when: str) -> None:
    s1, s2, cli = _servers(cluster, "" if when == "mid-fs" else f"{side}-{when}")
    slow = when == "mid-fs"
    before = _container(s1, slow=slow)
    transport = ["--transport", "rsync"] if slow else []
    move = subprocess.Popen([STAPES, "move", "s1:c1", "s2:", "-s", "default", "--mode", mode, *transport],
                            env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = s1 if side == "source" else s2
    if slow:
        wait_for(lambda: _transferring(s2), 30, "the transfer to start")
    else:
        wait_for((victim.state_dir / f"paused-at-{side}-{when}").exists, 30, f"the {side} to reach {when}")
    victim.kill()
    _, err = move.communicate(timeout=90)
    assert move.returncode != 0 and err.startswith("Error: "), err
    victim.start()  # what the killed server had half-done is cleaned up when it comes back
    _assert_exactly_once_on_the_source(cluster, s1, s2, before, "slow" if slow else "default")


def test_a_server_stopped_gracefully_during_a_move(cluster: Cluster) -> None:
    """SIGTERM (a restart) mid-transfer: the operation is cancelled and rolled back before the server exits."""
    s1, s2, cli = _servers(cluster)
    before = _container(s1, slow=True)
    move = subprocess.Popen([STAPES, "move", "s1:c1", "s2:", "-s", "default", "--transport", "rsync"],
                            env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: _transferring(s2), 30, "the transfer to start")
    s2.stop()
    _, err = move.communicate(timeout=90)
    assert move.returncode != 0 and "Error: " in err, err
    s2.start()
    _assert_exactly_once_on_the_source(cluster, s1, s2, before, "slow")


@pytest.mark.parametrize("mode", MODES)
def test_target_pool_full(cluster: Cluster, mode: str, tmp_path: Path) -> None:
    s1, s2, cli = _servers(cluster)
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(mount)], check=True)
    try:
        cli.run("storage", "create", "s2:small", "dir", f"source={mount / 'pool'}")
        before = _container(s1, slow=True)
        err = cli.fails("move", "s1:c1", "s2:", "-s", "small", "--mode", mode)
        assert "the target (s2)" in err and "full" in err, err
        assert not any((mount / "pool/containers").iterdir())
        _assert_exactly_once_on_the_source(cluster, s1, s2, before, "slow")
    finally:
        cli.run("storage", "delete", "s2:small", check=False)
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Proxy:
    """A TCP relay in front of a server, which a test can cut (every connection closed) or stall
    (every connection kept open, nothing forwarded any more)."""

    def __init__(self, server: Server) -> None:
        self.target = (server.host, server.port)
        self.listener = socket.create_server(("127.0.0.1", free_port("127.0.0.1")))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.stalled = threading.Event()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, op_id: str) -> str:
        return f"https://127.0.0.1:{self.port}/1.0/operations/{op_id}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.stalled.is_set() and not self.closed:
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        for sock in self.sockets:
            with __import__("contextlib").suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def stall(self) -> None:
        self.stalled.set()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.cut()


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("fault", ["cut", "stall"])
async def test_the_link_between_the_servers_breaks(cluster: Cluster, mode: str, fault: str) -> None:
    """The test plays the client, so that only the server-to-server connection runs through the proxy."""
    s1, s2, _ = _servers(cluster, trusted=False)
    before = _container(s1, slow=True)
    proxy = Proxy(s1 if mode == "pull" else s2)
    cert1, cert2 = ((s.state_dir / "server.crt").read_text() for s in (s1, s2))
    started = time.monotonic()
    try:
        async with Raw(s1) as src, Raw(s2) as dst:
            if mode == "pull":
                _, body = await src.call("POST", "/1.0/instances/c1", {"migration": True, "transport": "rsync"})
                source_op = body["metadata"]
                secrets = {k: source_op["metadata"][k] for k in ("control", "fs")}
                _, body = await dst.call("POST", "/1.0/instances", {
                    "name": "c1", "source": {"type": "migration", "mode": "pull", "operation": proxy.url(
                        source_op["id"]), "certificate": cert1, "secrets": secrets}})
                target_op = body["metadata"]
            else:
                _, body = await dst.call("POST", "/1.0/instances", {
                    "name": "c1", "source": {"type": "migration", "mode": "push"}})
                target_op = body["metadata"]
                secrets = {k: target_op["metadata"][k] for k in ("control", "fs")}
                _, body = await src.call("POST", "/1.0/instances/c1", {
                    "migration": True, "transport": "rsync",
                    "target": {"operation": proxy.url(target_op["id"]), "certificate": cert2, "secrets": secrets}})
                source_op = body["metadata"]
            await asyncio.to_thread(wait_for, lambda: _transferring(s2), 30, "the transfer to start")
            proxy.cut() if fault == "cut" else proxy.stall()
            results = await asyncio.gather(src.wait(source_op, 60), dst.wait(target_op, 60))
    finally:
        proxy.close()
    assert time.monotonic() - started < 45
    source_result, target_result = results
    assert target_result["status"] == "Failure" and target_result["err"], target_result
    assert source_result["status"] == "Failure" and source_result["err"], source_result
    if fault == "stall":
        assert "stopped responding" in target_result["err"] + source_result["err"]
    _assert_exactly_once_on_the_source(cluster, s1, s2, before, "slow")
    assert "failed" in s2.log()  # the failure is in the target's log, with its reason
    assert os.path.exists(s1.state_dir / "unix.socket")


def test_the_relaying_clients_link_is_cut(cluster: Cluster) -> None:
    """Relay: the data runs through the client, so the link to cut is the client's to the target."""
    s1, s2, cli = _servers(cluster)
    before = _container(s1, slow=True)
    proxy = Proxy(s2)
    try:
        cli.trust(dataclasses.replace(s2, host="127.0.0.1", port=proxy.port, proc=None), "s2p")
        for token in s2.running_operations():  # already trusted: the second token was not needed; revoke it
            s2.api("DELETE", f"/1.0/operations/{token['id']}")
        move = subprocess.Popen([STAPES, "move", "s1:c1", "s2p:", "-s", "default", "--mode", "relay",
                                 "--transport", "rsync"], env=cli.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for(lambda: _transferring(s2), 30, "the transfer to start")
        proxy.cut()
        _, err = move.communicate(timeout=90)
        assert move.returncode != 0 and err.startswith("Error: "), err
    finally:
        proxy.close()
    _assert_exactly_once_on_the_source(cluster, s1, s2, before, "slow")
