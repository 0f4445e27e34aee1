"""Running VMs moving live between two real servers (migration.stateful=true): QEMU's stream and a disk mirror
over the daemons' own websockets, while the guest prints its heartbeat, dirties its memory and writes to its
disk; and each failure before the handover leaves it running on the source, nothing on the target."""

from __future__ import annotations

import re
import time

from tests.integration.harness import Cli, Cluster, Server, wait_for
from tests.integration.test_vm_exec import agent_up

# In the guest: memory dirtied without end (a tmpfs is RAM), and a counter appended to the data partition
# (fsynced each time), both detached from the exec that starts them.
WORKLOAD = ("mkdir -p /run/dirty && mount -t tmpfs -o size=64m tmpfs /run/dirty; "
            "setsid sh -c 'while :; do dd if=/dev/urandom of=/run/dirty/a bs=1M count=32 2>/dev/null; done' "
            "</dev/null >/dev/null 2>&1 & "
            "setsid sh -c 'i=0; while :; do echo $i >> /mnt/data/counter; sync; i=$((i+1)); sleep 0.1; done' "
            "</dev/null >/dev/null 2>&1 &")


def heartbeats(cli: Cli, name: str) -> list[int]:
    log = cli.run("console", name, "--show-log").stdout
    return [int(n) for n in re.findall(r"heartbeat (\d+)", log)]


def counter(cli: Cli, name: str) -> list[int]:
    out = cli.run("exec", name, "--", "cat", "/mnt/data/counter").stdout
    return [int(line) for line in out.split()]


def running_vm(two: Cli, name: str) -> None:
    two.run("launch", "s1:busybox-vm", name, "--vm", "-d", "root,size=256MiB", "-c", "migration.stateful=true")
    agent_up(two, f"s1:{name}")
    wait_for(lambda: bool(two.run("exec", f"s1:{name}", "--", "test", "-d", "/mnt/data", check=False).returncode
                          == 0), 60, "the data partition mounted")
    two.run("exec", f"s1:{name}", "--", "sh", "-c",
            "dd if=/dev/urandom of=/mnt/data/before bs=64k count=32 2>/dev/null; "
            "sha256sum /mnt/data/before > /mnt/data/before.sum; sync")
    two.run("exec", f"s1:{name}", "--", "sh", "-c", WORKLOAD)
    wait_for(lambda: len(counter(two, f"s1:{name}")) > 5, 60, "the guest's counter")


def test_a_running_vm_moves_live_in_every_mode_then_copies_live_as_a_clone(s1: Server, s2: Server,
                                                                             two: Cli) -> None:
    """One guest moved s1 -> s2 (pull), back (push), and again (relay), then copied live."""
    running_vm(two, "v1")
    identity = two.json("list", "s1:")[0]["config"]
    here = "s1"
    for mode, there in (("pull", "s2"), ("push", "s1"), ("relay", "s2")):
        before = heartbeats(two, f"{here}:v1")
        assert before, f"the console on {here} shows heartbeats"
        counted = counter(two, f"{here}:v1")
        out = two.run("move", f"{here}:v1", f"{there}:", "--mode", mode)
        assert f"({mode}, block-and-rsync, live: downtime " in out.stdout, out.stdout
        assert two.json("list", f"{here}:") == []
        (moved,) = two.json("list", f"{there}:")
        assert moved["status"] == "Running"
        for key in ("volatile.uuid", "volatile.eth0.hwaddr"):  # the same machine
            assert moved["config"][key] == identity[key], (mode, key)

        # The same guest runs on: its heartbeat continues (no reboot: the numbers go on from the source's), its
        # counter too, with nothing lost on the disk; the data written before the moves is there, bit for bit.
        wait_for(lambda there=there: len(heartbeats(two, f"{there}:v1")) >= 2, 60, "heartbeats on the target")
        after = heartbeats(two, f"{there}:v1")
        assert after[0] > before[-1] and after == list(range(after[0], after[0] + len(after))), (
            mode, before[-5:], after)
        agent_up(two, f"{there}:v1")
        wait_for(lambda there=there, counted=counted: len(counter(two, f"{there}:v1")) > len(counted) + 10, 60,
                 "the counter going on")
        values = counter(two, f"{there}:v1")
        assert values == list(range(len(values))), f"{mode}: the counter has a gap or a repeat"
        assert two.run("exec", f"{there}:v1", "--", "sha256sum", "-c", "/mnt/data/before.sum").returncode == 0
        here = there

    # `copy` with migration.stateful: the guest goes on on the source and runs on the target too, from the same
    # moment (the same boot's heartbeat on both); the copy keeps the MACs and the UUID its guest holds in
    # memory (a clone), where a stopped copy gets new ones.
    out = two.run("copy", "s2:v1", "s1:v1c")
    assert "(pull, block-and-rsync, live: downtime " in out.stdout, out.stdout
    states = {i["name"]: i["status"] for i in [*two.json("list", "s1:"), *two.json("list", "s2:")]}
    assert states == {"v1": "Running", "v1c": "Running"}, states
    copy = two.json("list", "s1:")[0]["config"]
    assert copy["volatile.uuid"] == identity["volatile.uuid"]
    assert copy["volatile.eth0.hwaddr"] == identity["volatile.eth0.hwaddr"]
    seen = heartbeats(two, "s2:v1")[-1]
    wait_for(lambda: heartbeats(two, "s2:v1")[-1] > seen + 1, 30, "the heartbeat going on on the source")
    wait_for(lambda: len(heartbeats(two, "s1:v1c")) >= 2, 60, "heartbeats on the copy")
    copied = heartbeats(two, "s1:v1c")
    assert copied[0] > 0 and copied == list(range(copied[0], copied[0] + len(copied))), copied[:5]
    agent_up(two, "s1:v1c")
    assert two.run("exec", "s1:v1c", "--", "sha256sum", "-c", "/mnt/data/before.sum").returncode == 0
    two.run("delete", "s1:v1c", "--force")
    two.run("delete", "s2:v1", "--force")


def test_a_failed_live_move_leaves_the_vm_running_on_the_source(cluster: Cluster) -> None:
    s1 = cluster.server("s1", "127.0.0.1")
    s2 = cluster.server("s2", "127.0.0.2", {"STAPES_FAIL_AT": "target-before-commit"})
    two = cluster.cli()
    two.trust(s1, "s1")
    two.trust(s2, "s2")
    running_vm(two, "v2")
    failed = two.run("move", "s1:v2", "s2:", check=False)
    assert failed.returncode != 0 and "target-before-commit" in failed.stderr, failed.stderr
    assert two.json("list", "s2:") == []
    (state,) = two.json("list", "s1:")
    assert state["status"] == "Running"
    seen = heartbeats(two, "s1:v2")[-1]
    wait_for(lambda: heartbeats(two, "s1:v2")[-1] > seen + 1, 30, "the heartbeat going on on the source")
    count = len(counter(two, "s1:v2"))
    time.sleep(1)
    assert len(counter(two, "s1:v2")) > count
    two.run("delete", "s1:v2", "--force")
