"""Servers killed in the middle of a VM's live move: the guest runs on the source again where it was, exactly
once, and the target keeps nothing (test_vm_live.py has the moves themselves)."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.integration.harness import STAPES, Cluster, wait_for
from tests.integration.test_vm_exec import agent_up, qemu_processes
from tests.integration.test_vm_live import counter, heartbeats, running_vm


@pytest.mark.parametrize(("point", "killed"), [
    ("source-before-checkpoint", "source"),  # the disk mirrored, the memory not sent yet
    ("source-after-checkpoint", "source"),  # the guest paused and its state sent; nothing confirmed
    ("target-before-commit", "target"),  # the target holds the whole state, paused
])
def test_a_server_killed_during_a_live_move_loses_nothing(cluster: Cluster, point: str, killed: str) -> None:
    """The source's guest runs again where it was (a killed source finds it at its restart), exactly once,
    and the target keeps nothing."""
    env = {"STAPES_PAUSE_AT": point, "STAPES_MIGRATION_IDLE_TIMEOUT": "5"}
    s1 = cluster.server("s1", "127.0.0.1", env if killed == "source" else {})
    s2 = cluster.server("s2", "127.0.0.2", env if killed == "target" else {})
    two = cluster.cli()
    two.trust(s1, "s1")
    two.trust(s2, "s2")
    running_vm(two, "v3")
    victim = s1 if killed == "source" else s2
    move = subprocess.Popen([STAPES, "move", "s1:v3", "s2:"], env=two.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (victim.state_dir / f"paused-at-{point}").exists(), 120, f"the move at {point}")
        victim.kill()
        _, err = move.communicate(timeout=120)
    finally:
        if move.poll() is None:
            move.kill()
            move.wait()
    assert move.returncode != 0, err
    (victim.state_dir / f"paused-at-{point}").unlink(missing_ok=True)
    victim.env.pop("STAPES_PAUSE_AT", None)
    victim.start()
    wait_for(lambda: not s1.running_operations() and not s2.running_operations(), 60, "operations to end")
    assert two.json("list", "s2:") == []
    (state,) = two.json("list", "s1:")
    assert state["status"] == "Running", state
    assert len(qemu_processes(s1)) == 1 and qemu_processes(s2) == []
    seen = heartbeats(two, "s1:v3")[-1]
    wait_for(lambda: heartbeats(two, "s1:v3")[-1] > seen + 1, 30, "the heartbeat going on on the source")
    agent_up(two, "s1:v3")
    values = counter(two, "s1:v3")
    assert values == list(range(len(values)))
    two.run("delete", "s1:v3", "--force")


def test_live_moves_cancelled_in_their_memory_phase_leave_the_vm_on_the_source(cluster: Cluster) -> None:
    """The relay client killed (both links cut at once), then a Ctrl-C of a pull move (the client cancels both
    operations): each time the guest runs on on the source, untouched, and the target keeps nothing."""
    s1 = cluster.server("s1", "127.0.0.1", {"STAPES_MIGRATION_IDLE_TIMEOUT": "5"})
    s2 = cluster.server("s2", "127.0.0.2", {"STAPES_MIGRATION_IDLE_TIMEOUT": "5"})
    two = cluster.cli()
    two.trust(s1, "s1")
    two.trust(s2, "s2")
    running_vm(two, "v4")
    # The memory phase never ends on its own (at most 1 ms of downtime allowed: 32 KiB, which the guest dirties
    # in every pass); the disk is mirrored in seconds under the same cap.
    two.run("config", "set", "s1:v4", "migration.bandwidth=32MiB", "migration.downtime=1")

    def in_memory_phase() -> bool:
        return any((op.get("metadata") or {}).get("live_stage") == "memory" for op in s1.running_operations())

    for mode, how in (("relay", signal.SIGKILL), ("pull", signal.SIGINT)):
        move = subprocess.Popen([STAPES, "move", "s1:v4", "s2:", "--mode", mode], env=two.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(in_memory_phase, 120, "the memory phase")
            move.send_signal(how)
            out, err = move.communicate(timeout=120)
        finally:
            if move.poll() is None:
                move.kill()
                move.wait()
        assert move.returncode != 0, (mode, out, err)
        wait_for(lambda: not s1.running_operations() and not s2.running_operations(), 60, "operations to end")
        assert two.json("list", "s2:") == [] and qemu_processes(s2) == [], (mode, out, err)
        (state,) = two.json("list", "s1:")
        assert state["status"] == "Running", (mode, state)
        seen = heartbeats(two, "s1:v4")[-1]
        wait_for(lambda seen=seen: heartbeats(two, "s1:v4")[-1] > seen + 1, 30,
                 "the heartbeat going on on the source")
        values = counter(two, "s1:v4")
        assert values == list(range(len(values))), mode
    two.run("delete", "s1:v4", "--force")
