"""Instances move between a real Incus 6.0 server and a Stapes server, both ways, in every mode, on dir and on
btrfs pools, driven by the official `incus` client and by the `stapes` CLI: files, owners, modes, xattrs,
sparse files, device nodes, snapshots and config arrive; the source goes only once the target confirmed; a
peer killed half-way loses nothing and leaves nothing; what cannot be exchanged is refused before any byte."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.fstree import fingerprint, populate
from tests.integration.harness import Cli, Server, in_netns, wait_for
from tests.integration.incus_peer import IncusClient, IncusPeer, incus_and_stapes, missing

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

MODES = ["pull", "push", "relay"]


@dataclass
class Interop:
    incus: IncusPeer
    stapes: Server
    client: IncusClient  # the official client, remotes inc: and st:
    cli: Cli  # the stapes CLI, remotes inc: and st:
    stapes_pool: str  # where instances land on the Stapes side
    pool_driver: str

    def to_stapes(self) -> list[str]:
        return ["-s", self.stapes_pool]

    def stapes_rootfs(self, name: str) -> Path:
        return self.stapes.state_dir / "storage-pools" / self.stapes_pool / "containers" / name / "rootfs"

    def stapes_snapshot(self, name: str, snap: str) -> Path:
        return (self.stapes.state_dir / "storage-pools" / self.stapes_pool / "containers-snapshots" / name / snap
                / "rootfs")

    def incus_snapshot(self, name: str, snap: str) -> Path:
        return self.incus.dir / "storage-pools/default/containers-snapshots" / name / snap / "rootfs"


@pytest.fixture(scope="module", params=["dir", "btrfs"])
def interop(request: pytest.FixtureRequest) -> Iterator[Interop]:
    with incus_and_stapes(request.param) as peers:
        assert f"driver: {request.param}" in peers.incus.local("storage", "show", "default").stdout
        pool = "default"
        if request.param == "btrfs":
            pool = "bt"
            peers.stapes.api("POST", "/1.0/storage-pools", {"name": pool, "driver": "btrfs",
                                                           "config": {"size": "700MiB"}})
        yield Interop(peers.incus, peers.stapes, peers.client, peers.cli, pool, request.param)


def content(root: Path) -> dict[str, tuple[object, ...]]:
    """The fingerprint without hard-link identity (Incus runs rsync without --hard-links, so a hard link
    arrives, and leaves, as a second copy of the file) and without /etc/hostname (Stapes names the instance
    inside, as the hostname template of Incus's standard images does; this image has none). Everything else
    must be identical."""
    return {path: entry[:7] + entry[8:] if len(entry) > 8 else entry for path, entry in fingerprint(root).items()
            if path != "etc/hostname"}


def make_incus_container(env: Interop, name: str) -> dict[str, dict[str, tuple[object, ...]]]:
    """A stopped Incus container with a rich tree, a config key and a snapshot that differs from it."""
    env.incus.local("init", "busybox", name, "-c", "user.note=from incus")
    root = env.incus.rootfs(name)
    populate(root)
    env.incus.local("snapshot", "create", name, "snap0")
    (root / "data/after-snapshot.txt").write_text("written after the snapshot\n")
    return {"rootfs": content(root), "snap0": content(env.incus_snapshot(name, "snap0"))}


def check_running(run: list[str], env: Interop, remote: str, name: str) -> None:
    client = env.client
    client.run("start", f"{remote}:{name}")
    try:
        shown = client.run("exec", f"{remote}:{name}", "--", "cat", "/data/after-snapshot.txt").stdout
        assert shown == "written after the snapshot\n", (run, shown)
    finally:
        client.run("stop", f"{remote}:{name}", "--force")


@pytest.mark.parametrize("mode", MODES)
def test_incus_client_moves_an_instance_to_stapes_and_back(interop: Interop, mode: str) -> None:
    env, name = interop, f"c-{mode}"
    before = make_incus_container(env, name)

    env.client.run("move", f"inc:{name}", f"st:{name}", "--mode", mode, *env.to_stapes())
    assert name not in env.incus.instances()
    arrived = env.stapes.api("GET", f"/1.0/instances/{name}?recursion=1")
    assert arrived["status"] == "Stopped" and arrived["config"]["user.note"] == "from incus"
    assert "volatile.incomplete" not in arrived["config"]
    assert [s["name"] for s in env.stapes.api("GET", f"/1.0/instances/{name}/snapshots?recursion=1")] == ["snap0"]
    assert content(env.stapes_rootfs(name)) == before["rootfs"]
    assert (env.stapes_rootfs(name) / "etc/hostname").read_text() == f"{name}\n"
    assert content(env.stapes_snapshot(name, "snap0")) == before["snap0"]
    check_running(["to stapes", mode], env, "st", name)

    env.client.run("move", f"st:{name}", f"inc:{name}", "--mode", mode, "-s", "default")
    assert name not in [n for n, _ in env.stapes.instances()]
    assert not env.stapes_rootfs(name).parent.exists()
    assert content(env.incus.rootfs(name)) == before["rootfs"]
    assert content(env.incus_snapshot(name, "snap0")) == before["snap0"]
    shown = env.client.run("config", "get", f"inc:{name}", "user.note").stdout.strip()
    assert shown == "from incus"
    check_running(["back to incus", mode], env, "inc", name)
    env.incus.local("delete", name)


@pytest.mark.parametrize("mode", MODES)
def test_incus_client_copies_a_stapes_instance_to_incus(interop: Interop, mode: str) -> None:
    env, name = interop, f"s-{mode}"
    env.cli.run("init", "st:busybox", f"st:{name}", "-q", "-s", env.stapes_pool, "-c", "user.note=from stapes")
    populate(env.stapes_rootfs(name))
    env.cli.run("snapshot", "create", f"st:{name}", "first")
    (env.stapes_rootfs(name) / "data/after-snapshot.txt").write_text("written after the snapshot\n")
    before = content(env.stapes_rootfs(name))

    env.client.run("copy", f"st:{name}", f"inc:{name}", "--mode", mode, "-s", "default")
    assert [n for n, _ in env.stapes.instances()].count(name) == 1  # a copy leaves the source
    assert content(env.incus.rootfs(name)) == before
    assert content(env.incus_snapshot(name, "first")) == content(env.stapes_snapshot(name, "first"))
    assert env.client.run("config", "get", f"inc:{name}", "user.note").stdout.strip() == "from stapes"
    check_running(["copy to incus", mode], env, "inc", name)
    env.incus.local("delete", name)
    env.cli.run("delete", f"st:{name}")


@pytest.mark.parametrize("mode", MODES)
def test_stapes_cli_moves_both_ways(interop: Interop, mode: str) -> None:
    """The stapes CLI and library drive an Incus remote as they drive a Stapes one (waits in whole seconds)."""
    env, name = interop, f"cli-{mode}"
    before = make_incus_container(env, name)
    moved = env.cli.run("move", f"inc:{name}", f"st:{name}", "--mode", mode, *env.to_stapes())
    assert f"Moved inc:{name} to st:{name} ({mode}, rsync)" in moved.stdout, moved.stdout
    assert name not in env.incus.instances()
    assert content(env.stapes_rootfs(name)) == before["rootfs"]
    env.cli.run("copy", f"st:{name}", f"inc:{name}-copy", "--mode", mode, "-s", "default")
    env.cli.run("move", f"st:{name}", f"inc:{name}", "--mode", mode, "-s", "default")
    assert name not in [n for n, _ in env.stapes.instances()]
    assert content(env.incus.rootfs(name)) == before["rootfs"] == content(env.incus.rootfs(f"{name}-copy"))
    assert content(env.incus_snapshot(name, "snap0")) == before["snap0"]
    assert {name, f"{name}-copy"} <= {i["name"] for i in env.cli.json("list", "inc:")}
    env.incus.local("delete", name, f"{name}-copy")


def test_incus_only_keys_travel_or_are_refused_by_name(interop: Interop) -> None:
    """Keys that only tune what Stapes does not do are kept (and come back to Incus); keys that would change
    how the container runs are refused before any transfer, naming the key."""
    env, name = interop, "keys"
    env.incus.local("init", "busybox", name, "-c", "snapshots.schedule=@daily", "-c", "boot.autostart.priority=5",
                    "-c", "cloud-init.user-data=#cloud-config")
    env.client.run("move", f"inc:{name}", f"st:{name}", *env.to_stapes())
    config = env.stapes.api("GET", f"/1.0/instances/{name}")["config"]
    assert (config["snapshots.schedule"], config["boot.autostart.priority"]) == ("@daily", "5")
    env.client.run("move", f"st:{name}", f"inc:{name}", "-s", "default")
    assert env.client.run("config", "get", f"inc:{name}", "snapshots.schedule").stdout.strip() == "@daily"

    env.incus.local("config", "set", name, "security.nesting=true")
    result = env.client.run("move", f"inc:{name}", f"st:{name}", *env.to_stapes(), check=False)
    assert result.returncode != 0 and "security.nesting" in result.stderr, result.stderr
    assert "incus config unset" in result.stderr
    assert name in env.incus.instances() and name not in [n for n, _ in env.stapes.instances()]
    env.incus.local("delete", name)


def test_a_running_incus_container_is_copied_in_two_passes(interop: Interop) -> None:
    """Incus copies a running container statelessly: the volume while it runs, then a final sync."""
    env, name = interop, "running"
    if env.pool_driver != "dir":
        pytest.skip("the pool does not change the two passes")
    env.incus.local("launch", "busybox", name)
    try:
        (env.incus.rootfs(name) / "marker").write_text("copied while running\n")
        env.client.run("copy", f"inc:{name}", f"st:{name}", "--stateless")
        assert (env.stapes_rootfs(name) / "marker").read_text() == "copied while running\n"
        assert env.stapes.api("GET", f"/1.0/instances/{name}")["status"] == "Stopped"
        # A live move is refused by the target before anything moves, saying what to do instead.
        refused = env.stapes.raw("POST", "/1.0/instances", {
            "name": f"{name}-live", "source": {"type": "migration", "mode": "pull", "live": True,
                                              "operation": f"{env.incus.url}/1.0/operations/0", "certificate": "x",
                                              "secrets": {"control": "0" * 64, "fs": "0" * 64}}})
        assert refused["error_code"] == 400 and "--stateless" in refused["error"], refused
        assert name in env.incus.instances() and f"{name}-live" not in [n for n, _ in env.stapes.instances()]
    finally:
        env.incus.local("delete", name, "--force")
    env.cli.run("delete", f"st:{name}")


def test_what_cannot_be_exchanged_is_refused_before_any_transfer(interop: Interop) -> None:
    env, name = interop, "odd"
    env.incus.local("init", "busybox", name)
    env.incus.local("config", "device", "add", name, "fwd", "proxy", "listen=tcp:127.0.0.1:1234",
                    "connect=tcp:127.0.0.1:80")
    result = env.client.run("move", f"inc:{name}", f"st:{name}", *env.to_stapes(), check=False)
    assert result.returncode != 0
    assert "proxy" in result.stderr, result.stderr
    assert name in env.incus.instances() and name not in [n for n, _ in env.stapes.instances()]
    assert not env.stapes_rootfs(name).parent.exists()
    env.incus.local("delete", name)


def _slow_source_tree(root: Path) -> None:
    subprocess.run(["dd", "if=/dev/urandom", f"of={root / 'blob'}", "bs=1M", "count=48", "status=none"], check=True)


def test_killed_incus_source_loses_nothing_and_leaves_nothing(interop: Interop) -> None:
    env, name = interop, "kill-src"
    if env.pool_driver != "dir":
        pytest.skip("the dir matrix covers killed peers; btrfs adds nothing to what a killed daemon leaves")
    env.incus.local("init", "busybox", name)
    _slow_source_tree(env.incus.rootfs(name))
    before = content(env.incus.rootfs(name))
    env.incus.local("storage", "set", "default", "rsync.bwlimit=8MiB")  # ~6 s: time to kill it
    move = subprocess.Popen([*in_netns(env.client.netns), "incus", "move", f"inc:{name}", f"st:{name}"],
                            env=_client_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _receiving(env.stapes), 60, "the transfer to start")
        env.incus.kill()
        move.communicate(timeout=120)
        assert move.returncode != 0
        wait_for(lambda: name not in [n for n, _ in env.stapes.instances()], 150, "Stapes to drop the copy")
        assert not env.stapes_rootfs(name).parent.exists()
        assert env.stapes.running_operations() == []
    finally:
        if move.poll() is None:
            move.kill()
        if env.incus.proc is None:
            env.incus.start()
    env.incus.local("storage", "unset", "default", "rsync.bwlimit")
    assert name in env.incus.instances()
    assert content(env.incus.rootfs(name)) == before
    env.incus.local("delete", name)


def test_killed_stapes_source_loses_nothing(interop: Interop) -> None:
    env, name = interop, "kill-st"
    if env.pool_driver != "dir":
        pytest.skip("the dir matrix covers killed peers")
    env.cli.run("init", "st:busybox", f"st:{name}", "-q")
    _slow_source_tree(env.stapes_rootfs(name))
    before = content(env.stapes_rootfs(name))
    env.cli.run("storage", "set", "st:default", "rsync.bwlimit=8MiB")
    move = subprocess.Popen([*in_netns(env.client.netns), "incus", "move", f"st:{name}", f"inc:{name}"],
                            env=_client_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _receiving(env.stapes), 60, "the transfer to start")
        env.stapes.kill()
        _, err = move.communicate(timeout=120)
        assert move.returncode != 0
    finally:
        if move.poll() is None:
            move.kill()
        if env.stapes.proc is None:
            env.stapes.start()
    env.cli.run("storage", "unset", "st:default", "rsync.bwlimit")
    assert [n for n, _ in env.stapes.instances()].count(name) == 1
    assert content(env.stapes_rootfs(name)) == before
    wait_for(lambda: name not in env.incus.instances(), 60, "Incus to drop its partial copy")
    env.cli.run("delete", f"st:{name}")


def _client_env(env: Interop) -> dict[str, str]:
    return dict(os.environ, INCUS_CONF=str(env.client.conf), HOME=str(env.client.conf))


def _receiving(server: Server) -> bool:
    """A migration operation on the server has moved more than a MiB (sending or receiving)."""
    return any((op["metadata"] or {}).get("progress", {}).get("bytes", 0) > 2**20
               for op in server.running_operations())
