"""A failed or cancelled move leaves the source exactly as it was and nothing of the instance on the target.

Killed servers, broken links and full pools, in every mode: test_faults.py."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.integration.fstree import fingerprint
from tests.integration.harness import STAPES, Cli, Server

BIG_MIB = 200
SLOW = "40MiB"  # rsync.bwlimit on the source pool: the transfer lasts five seconds, long enough to interrupt


def _big_container(server: Server, cli: Cli, name: str = "big", pool: str = "default"
                   ) -> dict[str, tuple[object, ...]]:
    cli.run("init", "s1:busybox", name, "-s", pool, "-q")
    root = server.state_dir / "storage-pools" / pool / "containers" / name / "rootfs"
    subprocess.run(["dd", "if=/dev/urandom", f"of={root / 'random.bin'}", "bs=1M", f"count={BIG_MIB}",
                    "status=none"], check=True)
    return fingerprint(root)


def _slow_container(server: Server, cli: Cli) -> dict[str, tuple[object, ...]]:
    cli.run("storage", "create", "s1:slow", "dir", f"rsync.bwlimit={SLOW}")
    return _big_container(server, cli, pool="slow")


def _assert_untouched(s1: Server, s2: Server, cli: Cli, name: str, before: dict[str, tuple[object, ...]],
                      pool: str = "slow") -> None:
    root = s1.state_dir / "storage-pools" / pool / "containers" / name / "rootfs"
    assert fingerprint(root) == before
    assert [(i["name"], i["status"]) for i in cli.json("list", "s1:")] == [(name, "Stopped")]
    assert cli.json("list", "s2:") == []
    volumes = s2.state_dir / "storage-pools/default/containers"
    assert not any(volumes.iterdir()), f"left on the target: {list(volumes.iterdir())}"
    assert not any((s2.state_dir / "containers").iterdir())
    cli.run("start", f"s1:{name}")  # the source is not locked or damaged
    cli.run("stop", f"s1:{name}", "--force")


def _background_copy(cli: Cli, *args: str) -> subprocess.Popen[str]:
    # As from a terminal: a runner that started us in the background may have set SIGINT to ignored, and
    # Python keeps an ignored SIGINT ignored, so Ctrl-C would never reach the CLI.
    return subprocess.Popen([STAPES, "copy", *args], env=cli.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_transfer(cli: Cli, remote: str) -> str:
    """The id of the target operation once bytes are flowing."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for op in cli.json("operation", "list", remote):
            progress = (op.get("metadata") or {}).get("progress") or {}
            if op["status"] == "Running" and progress.get("bytes", 0) > 0:
                return str(op["id"])
        time.sleep(0.1)
    raise AssertionError("the transfer never started")


def test_refused_before_anything_moves(s1: Server, s2: Server, two: Cli) -> None:
    two.run("init", "s1:busybox", "c1", "-q")
    two.run("init", "s2:busybox", "taken", "-q")
    cases = {
        ("copy", "s1:c1", "s2:taken"): "already exists",
        ("copy", "s1:c1", "s2:", "-s", "nosuch"): "Storage pool 'nosuch' not found",
        ("copy", "s1:c1", "s2:", "-p", "nosuch"): "Profile 'nosuch' not found",
        ("copy", "s1:c1", "s2:", "--target-project", "nosuch"): "Project 'nosuch' not found",
        ("copy", "s1:nosuch", "s2:"): "Instance 'nosuch' not found",
        ("copy", "s1:c1", "s2:", "-c", "limits.bogus=1"): "Unknown instance configuration key",
        ("move", "s1:c1", "s2:9bad"): "must not start with a digit",
        ("move", "s1:c1", "s2:", "--target", "member1"): "not clustered",
    }
    for args, expected in cases.items():
        assert expected in two.fails(*args), args
        # The refused command returns only once both sides ended: nothing left running holds c1 busy.
        for remote in ("s1:", "s2:"):
            assert [op["description"] for op in two.json("operation", "list", remote)
                    if op["status"] in ("Running", "Cancelling")] == [], (args, remote)
    assert two.run("copy", "s1:c1", "s2:", "--mode", "teleport", check=False).returncode == 2
    assert [i["name"] for i in two.json("list", "s1:")] == ["c1"]
    assert [i["name"] for i in two.json("list", "s2:")] == ["taken"]


@pytest.mark.parametrize("mode", ["pull", "relay"])
def test_cancelled_on_the_target(s1: Server, s2: Server, two: Cli, mode: str) -> None:
    before = _slow_container(s1, two)
    copy = _background_copy(two, "s1:big", "s2:", "-s", "default", "--mode", mode, "--transport", "rsync")
    op_id = _wait_for_transfer(two, "s2:")
    two.run("operation", "delete", f"s2:{op_id}")
    _, err = copy.communicate(timeout=60)
    assert copy.returncode != 0 and "Migration failed" in err and "cancel" in err.lower()
    _assert_untouched(s1, s2, two, "big", before)


def test_client_interrupted(s1: Server, s2: Server, two: Cli) -> None:
    before = _slow_container(s1, two)
    copy = _background_copy(two, "s1:big", "s2:", "-s", "default", "--transport", "rsync")
    _wait_for_transfer(two, "s2:")
    copy.send_signal(signal.SIGINT)
    _, err = copy.communicate(timeout=60)
    assert copy.returncode == 130 and "interrupted" in err
    _wait_until_idle(two)
    _assert_untouched(s1, s2, two, "big", before)


def test_relay_client_killed(s1: Server, s2: Server, two: Cli) -> None:
    """The relaying client vanishes: both servers see their sockets drop and clean up by themselves."""
    before = _slow_container(s1, two)
    copy = _background_copy(two, "s1:big", "s2:", "-s", "default", "--mode", "relay", "--transport", "rsync")
    _wait_for_transfer(two, "s2:")
    copy.kill()
    copy.communicate(timeout=30)
    _wait_until_idle(two)
    _assert_untouched(s1, s2, two, "big", before)


def _wait_until_idle(cli: Cli) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = [op for remote in ("s1:", "s2:") for op in cli.json("operation", "list", remote)
                   if op["status"] == "Running"]
        if not running:
            return
        time.sleep(0.2)
    raise AssertionError(f"operations still running: {json.dumps(running)[:500]}")



def test_an_instance_taking_part_in_a_migration_is_busy(s1: Server, s2: Server, two: Cli) -> None:
    """A second move, a delete, start, rename or snapshot of it is refused at once, naming the operation; the
    move then completes and the instance exists exactly once."""
    before = _slow_container(s1, two)
    two.run("storage", "set", "s1:slow", "rsync.bwlimit=12MiB")  # ~17 s: time for every refusal below
    first = subprocess.Popen([STAPES, "move", "s1:big", "s2:", "-s", "default", "--transport", "rsync"],
                             env=two.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_transfer(two, "s2:")
    refused = [("move", "s1:big", "s2:again", "-s", "default"), ("copy", "s1:big", "s2:third", "-s", "default"),
               ("delete", "s1:big"), ("start", "s1:big"), ("rename", "s1:big", "other"),
               ("snapshot", "create", "s1:big"), ("config", "set", "s1:big", "user.x=1"),
               ("start", "s2:big"), ("delete", "s2:big")]
    for args in refused:
        started = time.monotonic()
        err = two.fails(*args)
        assert "busy" in err and "operation" in err, (args, err)
        assert time.monotonic() - started < 10, args  # at once, not after the move
    arriving = s2.api("GET", "/1.0/instances/big")
    assert not any(k == "volatile.incomplete" for k in {**arriving["config"], **arriving["expanded_config"]})
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert two.json("list", "s1:") == []
    assert [(i["name"], i["status"]) for i in two.json("list", "s2:")] == [("big", "Stopped")]
    assert fingerprint(s2.state_dir / "storage-pools/default/containers/big/rootfs") == before
