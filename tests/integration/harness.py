"""Real stapesd processes and the real `stapes` CLI, for integration tests.

Every server gets its own state directory and its own loopback address; every process we start is ended by
PID, and every container a server ran is killed, even when the test fails.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
STAPES = str(BIN / "stapes")
STAPESD = str(BIN / "stapesd")


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("stapes", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@dataclass
class Server:
    name: str
    host: str
    state_dir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    netns: str | None = None  # run inside this network namespace (its own loopback)
    log_path: Path = field(init=False)
    _log_offset: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.log_path = self.state_dir.parent / f"{self.name}.log"
        if not self.port:
            self.port = free_port(self.host)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.address}"

    def start(self, timeout: float = 30) -> None:
        log = self.log_path.open("ab")
        self._log_offset = log.tell()
        self.proc = subprocess.Popen(
            [*in_netns(self.netns), STAPESD, "--state-dir", str(self.state_dir), "--https-address", self.address],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        sock = self.state_dir / "unix.socket"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stapesd {self.name} exited: {self.log_path.read_text()[-2000:]}")
            if sock.exists() and self._answers():
                return
            time.sleep(0.1)
        raise RuntimeError(f"stapesd {self.name} did not come up: {self.log_path.read_text()[-2000:]}")

    def _answers(self) -> bool:
        """Up once it says it is ready (after its accelerator probe and the instances it restarts) and, where
        its port is reachable from here, that port accepts connections."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            if b"stapesd ready" not in log.read():
                return False
        if self.netns is not None:  # its port is not reachable from here
            return True
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def kill_containers(self) -> None:
        """Failsafe: whatever the test left running under this server's lxcpath is killed."""
        lxc_path = self.state_dir / "containers"
        if not lxc_path.is_dir():
            return
        for entry in lxc_path.iterdir():
            if (entry / "config").exists():
                subprocess.run(["lxc-stop", "-P", str(lxc_path), "-n", entry.name, "-k"],
                               capture_output=True, timeout=30, check=False)

    def kill_vms(self) -> None:
        """Failsafe: every QEMU this server's VMs run in is killed (by its pid file, checked to be that QEMU)."""
        from stapes.server.networks.cleanup import kill_vms
        kill_vms(self.state_dir)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        """Resident memory of the daemon, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def open_fds(self) -> int:
        return len(list(Path(f"/proc/{self.pid}/fd").iterdir()))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def raw(self, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
        """One REST call over the unix socket, as root (no CLI start-up): the whole answer, errors included."""
        conn = _UnixConnection(self.state_dir / "unix.socket", timeout)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Content-Type": "application/json"})
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def api(self, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
        """The response's metadata; an error fails the test."""
        answer = self.raw(method, path, body, timeout)
        if answer.get("type") == "error":
            raise AssertionError(f"{method} {path}: {answer['error']}")
        return answer["metadata"]

    def run_op(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """An async call, waited for; the finished operation."""
        op = self.api(method, path, body)
        return dict(self.api("GET", f"/1.0/operations/{op['id']}/wait?timeout=120"))

    def instances(self) -> list[tuple[str, str]]:
        return [(i["name"], i["status"]) for i in self.api("GET", "/1.0/instances?recursion=1")]

    def running_operations(self) -> list[dict[str, Any]]:
        return list(self.api("GET", "/1.0/operations?recursion=1").get("running") or [])

    def local_env(self) -> dict[str, str]:
        return {"STAPES_DIR": str(self.state_dir)}


def in_netns(netns: str | None) -> list[str]:
    """The prefix that runs a command in a network namespace. Not `ip netns exec`: that also remounts /sys,
    hiding the cgroup hierarchies LXC needs."""
    return [] if netns is None else ["nsenter", f"--net=/run/netns/{netns}", "--"]


class Cli:
    """Runs `stapes` with its own client configuration directory."""

    def __init__(self, conf_dir: Path, default_server: Server | None = None, netns: str | None = None) -> None:
        self.conf_dir = conf_dir
        self.default_server = default_server
        self.netns = netns

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["STAPES_CONF"] = str(self.conf_dir)
        if self.default_server is not None:
            env["STAPES_DIR"] = str(self.default_server.state_dir)
        return env

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*in_netns(self.netns), STAPES, *args], env=self.env(), input=input,
                                capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"stapes {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def fails(self, *args: str, input: str | None = None) -> str:
        result = self.run(*args, input=input, check=False)
        assert result.returncode != 0, f"stapes {' '.join(args)} should have failed:\n{result.stdout}"
        assert result.stderr.startswith("Error: "), result.stderr
        return result.stderr

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--format", "json").stdout)

    def trust(self, server: Server, remote: str) -> None:
        """Create a token on the server (through its unix socket) and add the remote with it."""
        op = server.api("POST", "/1.0/certificates", {"name": f"client-{remote}", "type": "client", "token": True})
        self.run("remote", "add", remote, server.url, "--token", op["metadata"]["token"])


class Cluster:
    """A set of servers for one test, torn down completely afterwards."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="stapes-test-"))
        self.root.chmod(0o711)  # unprivileged containers' root (a high uid) must traverse to their files
        self.servers: list[Server] = []

    def server(self, name: str, host: str, env: dict[str, str] | None = None, netns: str | None = None) -> Server:
        # A namespace of our own has its own ports: no need to look for a free one.
        server = Server(name, host, self.root / name / "state", port=8443 if netns else 0, env=env or {},
                        netns=netns)
        server.state_dir.mkdir(parents=True)
        server.start()
        self.servers.append(server)
        return server

    def cli(self, default_server: Server | None = None, netns: str | None = None) -> Cli:
        return Cli(self.root / "client", default_server, netns)

    def close(self) -> None:
        if os.environ.get("STAPES_KEEP_LOGS"):  # debugging a test: its servers' logs survive it
            for server in self.servers:
                with contextlib.suppress(OSError):
                    shutil.copy(server.log_path, Path(os.environ["STAPES_KEEP_LOGS"]) / f"{server.name}.log")
        for server in self.servers:
            # The server first: stopping in the middle of a move, it may still run a container again from its
            # checkpoint, which a kill before the stop would miss.
            server.stop()
            server.kill_containers()
            server.kill_vms()
            cleanup_networks(server.state_dir)  # bridges, and the VMs' taps
        unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)


def cleanup_networks(state_dir: Path) -> None:
    """The bridges, nftables tables and dnsmasq a server's networks left on the host (they outlive the daemon,
    as Incus's do, so running containers keep their network)."""
    from stapes.server.networks.cleanup import cleanup
    cleanup(state_dir)


def unmount_below(root: Path) -> None:
    """Pools a test made (btrfs loop files) are unmounted; a loop mount frees its loop device with it."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(root))), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
