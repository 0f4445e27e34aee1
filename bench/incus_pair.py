"""Two real Incus servers on one host, for the live-migration anchor (bench/live.py --incus).

Two incusd on one host collide where CRIU looks: liblxc's abstract sockets (one per network namespace) and
the source paths of the container's mounts, which CRIU expects to find again on the target (Incus's state
directory, /var/lib/incus). So each server gets a network namespace of its own, joined to the other's by a
veth pair, and a mount namespace of its own in which its state directory is mounted on /var/lib/incus. Both
run the CRIU that Stapes's setup built (first on their PATH, with the same configuration file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from stapes.server.images.busybox import build_busybox_image

INCUSD = "/usr/libexec/incus/incusd"
CRIU_DIR = "/opt/stapes/criu/sbin"


@dataclass
class IncusServer:
    name: str
    netns: str
    address: str
    state: Path
    proc: subprocess.Popen[bytes] | None = None

    def inside(self, *argv: str) -> list[str]:
        """A command in this server's network and mount namespaces (its /var/lib/incus)."""
        assert self.proc is not None
        return ["nsenter", "-t", str(self.proc.pid), "-m", "-n", "--", *argv]

    def local(self, *args: str, input: str | None = None) -> str:
        result = subprocess.run(self.inside("incus", *args), input=input, capture_output=True, text=True,
                                timeout=300, check=False, env={**os.environ, "INCUS_DIR": "/var/lib/incus"})
        if result.returncode != 0:
            raise RuntimeError(f"incus {' '.join(args)} on {self.name}: {result.stderr}")
        return result.stdout


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def incus_pair(root: Path, criu_config: Path) -> Iterator[tuple[IncusServer, IncusServer, Path]]:
    """Two initialised Incus servers with the busybox image; yields them and an incus client config directory
    (remotes `a` and `b`) whose commands run in the first one's network namespace (`client_argv`)."""
    tag = secrets.token_hex(3)
    subnet = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(250)}"
    servers = [IncusServer("a", f"stapes-inc-a-{tag}", f"{subnet}.1", root / "incus-a"),
               IncusServer("b", f"stapes-inc-b-{tag}", f"{subnet}.2", root / "incus-b")]
    try:
        for server in servers:
            _run("ip", "netns", "add", server.netns)
            _run("ip", "-n", server.netns, "link", "set", "lo", "up")
            server.state.mkdir(mode=0o711)
        _run("ip", "link", "add", f"vinca{tag}", "netns", servers[0].netns, "type", "veth", "peer", "name",
             f"vincb{tag}", "netns", servers[1].netns)
        for server, dev in zip(servers, (f"vinca{tag}", f"vincb{tag}"), strict=True):
            _run("ip", "-n", server.netns, "addr", "add", f"{server.address}/24", "dev", dev)
            _run("ip", "-n", server.netns, "link", "set", dev, "up")
        env = {**os.environ, "PATH": f"{CRIU_DIR}:{os.environ['PATH']}", "CRIU_CONFIG_FILE": str(criu_config)}
        env.pop("INCUS_DIR", None)
        image = root / "busybox.tar.xz"
        asyncio.run(build_busybox_image(image))
        for server in servers:
            logs = server.state.parent / f"incus-{server.name}-logs"
            logs.mkdir(mode=0o700)
            script = (f"mount --make-rprivate / && mount --bind {server.state} /var/lib/incus && "
                      f"mkdir -p /var/log/incus && mount --bind {logs} /var/log/incus && "
                      f"mkdir -p /run/incus && mount -t tmpfs tmpfs /run/incus && exec {INCUSD} --group root")
            log = (root / f"incusd-{server.name}.log").open("ab")
            # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the cgroup mounts LXC needs.
            server.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{server.netns}", "unshare", "-m", "sh",
                                            "-c", script],
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(RuntimeError):
                    server.local("admin", "waitready", "--timeout", "5")
                    break
                time.sleep(0.5)
            preseed = {"config": {"core.https_address": f"{server.address}:8443"},
                       "storage_pools": [{"name": "default", "driver": "dir"}],
                       "profiles": [{"name": "default", "devices": {
                           "root": {"path": "/", "pool": "default", "type": "disk"}}}]}
            server.local("admin", "init", "--preseed", input=yaml.safe_dump(preseed))
            server.local("image", "import", str(image), "--alias", "busybox")
        conf = root / "incus-client"
        conf.mkdir()
        for server in servers:
            token = server.local("config", "trust", "add", "bench", "--quiet").strip().splitlines()[-1]
            client(conf, servers[0], "remote", "add", server.name, token)
        yield servers[0], servers[1], conf
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                with contextlib.suppress(Exception):
                    for name in json.loads(server.local("list", "--format", "json")):
                        server.local("delete", name["name"], "--force")
                with contextlib.suppress(Exception):
                    server.local("admin", "shutdown", "--timeout", "30")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.proc.wait(30)
                if server.proc.poll() is None:
                    server.proc.kill()
                    server.proc.wait(10)
            subprocess.run(["ip", "netns", "delete", server.netns], capture_output=True, check=False)
            subprocess.run(["rm", "-rf", "--one-file-system", str(server.state)], check=False)


def client(conf: Path, server: IncusServer, *args: str) -> subprocess.CompletedProcess[str]:
    """The incus client, in `server`'s network namespace (it reaches the other through the veth)."""
    env = {**os.environ, "INCUS_CONF": str(conf), "HOME": str(conf)}
    result = subprocess.run(["nsenter", f"--net=/run/netns/{server.netns}", "incus", *args], env=env,
                            capture_output=True,
                            text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"incus {' '.join(args)}: {result.stderr}")
    return result
