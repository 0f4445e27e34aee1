"""A real Incus daemon (Debian's incus-base) as a conformance peer.

It runs with its own state directory inside a network namespace the tests create; the Stapes servers and
both clients join that namespace, so every byte between the two implementations stays on its loopback.
Everything it made is removed again: its containers, its mounts (pools, shmounts), its loop devices and the
namespace itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stapes.server.images.busybox import build_busybox_image
from tests.integration.harness import Cli, Cluster, Server, in_netns, unmount_below

INCUSD = Path("/usr/libexec/incus/incusd")
ADDRESS = "127.0.0.1:8443"


def missing() -> str | None:
    """Why an Incus peer cannot run here, or None."""
    if not INCUSD.exists() or shutil.which("incus") is None:
        return "Incus (incus-base and incus-client) is not installed: make install adds them"
    if shutil.which("nsenter") is None or shutil.which("ip") is None:
        return "nsenter and ip are needed to give the Incus peer its own network namespace"
    return None


@contextmanager
def network_namespace() -> Iterator[str]:
    """A fresh namespace with only its loopback up."""
    name = f"stapes-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


class IncusPeer:
    def __init__(self, root: Path, netns: str) -> None:
        self.dir = root / "incus"
        self.dir.mkdir(mode=0o711)
        self.netns = netns
        self.log_path = root / "incusd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{ADDRESS}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([*in_netns(self.netns), str(INCUSD), "--group", "root"], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=dict(os.environ, INCUS_DIR=str(self.dir)))
        result = self.local("admin", "waitready", "--timeout", "60", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"incusd did not come up: {result.stderr}\n{self.log_path.read_text()[-2000:]}")

    def initialize(self, pool_driver: str = "dir") -> None:
        pool: dict[str, Any] = {"name": "default", "driver": pool_driver}
        if pool_driver == "btrfs":
            pool["config"] = {"size": "1GiB"}  # a loop file below the state directory
        preseed = {"config": {"core.https_address": ADDRESS}, "storage_pools": [pool],
                   "profiles": [{"name": "default", "devices": {"root": {"path": "/", "pool": "default",
                                                                          "type": "disk"}}}]}
        self.local("admin", "init", "--preseed", input=yaml.safe_dump(preseed))

    def local(self, *args: str, input: str | None = None, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The incus client on the daemon's unix socket (setup and inspection, not the thing under test)."""
        env = dict(os.environ, INCUS_DIR=str(self.dir))
        env.pop("INCUS_CONF", None)
        result = subprocess.run(["incus", *args], env=env, input=input, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"incus {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def instances(self) -> list[str]:
        return sorted(i["name"] for i in json.loads(self.local("list", "--format", "json").stdout))

    def rootfs(self, name: str) -> Path:
        return self.dir / "storage-pools/default/containers" / name / "rootfs"

    def trust_token(self, name: str) -> str:
        return self.local("config", "trust", "add", name, "--quiet").stdout.strip().splitlines()[-1]

    def kill(self) -> None:
        """As a crash: the daemon dies at once (its containers' monitors are stopped by close())."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.local("admin", "shutdown", "--timeout", "30", check=False, timeout=60)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        containers = self.dir / "containers"
        if containers.is_dir():
            for entry in containers.iterdir():
                subprocess.run(["lxc-stop", "-P", str(containers), "-n", entry.name, "-k"], capture_output=True,
                               timeout=30, check=False)
        unmount_below(self.dir)
        for loop in _loop_devices_below(self.dir):
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def _loop_devices_below(root: Path) -> list[str]:
    result = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                            capture_output=True, text=True, check=False)
    return [line.split()[0] for line in result.stdout.splitlines()
            if len(line.split()) > 1 and line.split()[1].startswith(str(root))]


class IncusClient:
    """The official client, with its own configuration, inside the namespace (it reaches both servers)."""

    def __init__(self, conf: Path, netns: str) -> None:
        self.conf = conf
        self.netns = netns
        conf.mkdir(exist_ok=True)

    def run(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, INCUS_CONF=str(self.conf), HOME=str(self.conf))
        env.pop("INCUS_DIR", None)
        result = subprocess.run([*in_netns(self.netns), "incus", *args], env=env, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"incus {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def names(self, remote: str) -> list[str]:
        return sorted(i["name"] for i in json.loads(self.run("list", f"{remote}:", "--format", "json").stdout))


@dataclass
class Peers:
    """An Incus server and a Stapes server in one namespace, with both clients trusted on both as remotes
    `inc:` and `st:`, and the busybox image on Incus."""

    cluster: Cluster
    incus: IncusPeer
    stapes: Server
    client: IncusClient  # the official client
    cli: Cli  # the stapes CLI


@contextmanager
def incus_and_stapes(pool_driver: str = "dir") -> Iterator[Peers]:
    cluster = Cluster()
    os.chmod(cluster.root, 0o711)  # Incus's unprivileged containers must traverse to their rootfs
    with network_namespace() as netns:
        incus = IncusPeer(cluster.root, netns)
        try:
            incus.start()
            incus.initialize(pool_driver)
            image = cluster.root / "busybox.tar.xz"
            asyncio.run(build_busybox_image(image))
            incus.local("image", "import", str(image), "--alias", "busybox")
            stapes = cluster.server("st", "127.0.0.2", netns=netns)
            client = IncusClient(cluster.root / "incus-client", netns)
            client.run("remote", "add", "inc", incus.url, "--accept-certificate", "--token",
                       incus.trust_token("client"))
            token = stapes.api("POST", "/1.0/certificates", {"name": "client", "type": "client", "token": True})
            client.run("remote", "add", "st", token["metadata"]["token"])
            cli = cluster.cli(netns=netns)
            cli.trust(stapes, "st")
            # LXC checks a bridge through /sys, which nsenter leaves showing the host's interfaces: in this
            # namespace Stapes's containers run without a nic, as the Incus peer's do (its preseed has none).
            cli.run("profile", "device", "remove", "st:default", "eth0")
            cli.run("remote", "add", "inc", incus.url, "--token", incus.trust_token("stapes-cli"))
            yield Peers(cluster, incus, stapes, client, cli)
        finally:
            incus.close()
            cluster.close()
