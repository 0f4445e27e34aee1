"""Live moves of running containers (CRIU): processes go on where they were, in every mode; an established TCP
connection survives; and whatever fails (CRIU refusing, the restore failing, the target killed after the
checkpoint), the container runs on the source again, its processes unchanged, and the target holds nothing.
The witness is a counting shell loop (tests/integration/counter.py)."""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import counter
from tests.integration.harness import STAPES, Cli, Cluster, Server, wait_for


def _in(cli: Cli, where: str) -> counter.Exec:
    return lambda command: cli.run("exec", where, "--", *command, check=False).stdout


def _start_counter(cli: Cli, where: str) -> tuple[int, int]:
    return counter.start(_in(cli, where))


def _assert_counted_on(cli: Cli, where: str, seen: int, pid: int) -> int:
    return counter.assert_counting(_in(cli, where), seen, pid)


def _assert_nothing_on(server: Server, cli: Cli, remote: str) -> None:
    assert cli.json("list", f"{remote}:") == []
    for leftover in (server.state_dir / "storage-pools/default/containers", server.state_dir / "containers"):
        assert not leftover.exists() or not any(leftover.iterdir()), list(leftover.iterdir())
    assert not list((server.state_dir / "migrations").glob("*")), "a checkpoint was left behind"


def test_a_running_container_moves_live_in_every_mode(s1: Server, s2: Server, two: Cli) -> None:
    support = s1.api("GET", "/1.0")["environment"]["live_migration"]["container"]
    assert support["available"], support["reason"]
    two.run("launch", "s1:busybox", "c1", "-q")  # unprivileged, with a nic on the server's bridge
    mac = two.json("list", "s1:")[0]["config"]["volatile.eth0.hwaddr"]
    seen, pid = _start_counter(two, "s1:c1")
    two.run("config", "set", "s1:c1", "migration.incremental.memory=true")
    for mode, source, target in (("pull", "s1", "s2"), ("push", "s2", "s1"), ("relay", "s1", "s2")):
        out = two.run("move", f"{source}:c1", f"{target}:", "--mode", mode).stdout
        assert "live: frozen" in out, out
        if support["incremental_memory"]:
            assert "Pre-copy round 1:" in out, out
        else:  # said in one line, then one final dump
            assert f"Pre-copy: migration.incremental.memory is set, but {support['incremental_memory_reason']}" \
                in out, out
        assert two.json("list", f"{source}:") == []
        moved = two.json("list", f"{target}:")[0]
        assert moved["status"] == "Running" and moved["config"]["volatile.eth0.hwaddr"] == mac
        seen = _assert_counted_on(two, f"{target}:c1", seen, pid)
    # The source's leftovers are gone: its volume, its LXC directory, its checkpoint.
    _assert_nothing_on(s1, two, "s1")
    # A live copy: both run, each from the same state.
    two.run("copy", "s2:c1", "s1:c1")
    assert [i["status"] for i in two.json("list", "s1:")] == ["Running"]
    seen = _assert_counted_on(two, "s1:c1", seen, pid)
    _assert_counted_on(two, "s2:c1", seen, pid)


def test_incremental_memory_in_rounds(s1: Server, s2: Server, two: Cli) -> None:
    """Pre-copy rounds until the goal (here: never reached, 3 rounds at most), then the final dump."""
    support = s1.api("GET", "/1.0")["environment"]["live_migration"]["container"]
    if not support["incremental_memory"]:
        pytest.skip(f"no pre-copy on this host: {support['incremental_memory_reason']}")
    two.run("launch", "s1:busybox", "c1", "-q", "-c", "migration.incremental.memory=true",
            "-c", "migration.incremental.memory.goal=100", "-c", "migration.incremental.memory.iterations=3")
    seen, pid = _start_counter(two, "s1:c1")
    out = two.run("move", "s1:c1", "s2:").stdout
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("Pre-copy")] == [
        "Pre-copy round 1", "Pre-copy round 2", "Pre-copy round 3"], out
    _assert_counted_on(two, "s2:c1", seen, pid)


@contextlib.contextmanager
def _host_bridge() -> Iterator[tuple[str, str]]:
    """A bridge both servers' containers can join (one host: the same network on both), with an address."""
    name = f"stpt{secrets.token_hex(3)}"
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{subnet}.1/24", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield name, subnet
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def _exchange(conn: socket.socket, text: bytes) -> bytes:
    conn.sendall(text)
    received = b""
    while not received.endswith(b"\n"):
        chunk = conn.recv(100)
        if not chunk:
            break
        received += chunk
    return received


def test_an_established_tcp_connection_survives_the_move(s1: Server, s2: Server, two: Cli) -> None:
    with _host_bridge() as (bridge, subnet):
        s1.run_op("POST", "/1.0/instances", {
            "name": "web", "source": {"type": "image", "alias": "busybox"}, "profiles": [],
            "devices": {"root": {"type": "disk", "path": "/", "pool": "default"},
                        "eth0": {"type": "nic", "nictype": "bridged", "parent": bridge, "name": "eth0"}}})
        two.run("start", "s1:web")
        two.run("exec", "s1:web", "--", "ip", "addr", "add", f"{subnet}.2/24", "dev", "eth0")
        two.run("exec", "s1:web", "--", "sh", "-c",
                "setsid nc -l -p 5000 -e /bin/cat </dev/null >/dev/null 2>&1 &")
        conn = None
        for _ in range(50):
            with contextlib.suppress(OSError):
                conn = socket.create_connection((f"{subnet}.2", 5000), timeout=10)
                break
            subprocess.run(["sleep", "0.1"], check=False)
        assert conn is not None, "the echo server in the container never answered"
        with conn:
            assert _exchange(conn, b"before the move\n") == b"before the move\n"
            two.run("move", "s1:web", "s2:")
            assert two.json("list", "s2:")[0]["status"] == "Running"
            assert _exchange(conn, b"after the move\n") == b"after the move\n"


def _servers(cluster: Cluster, s1_env: dict[str, str], s2_env: dict[str, str]) -> tuple[Server, Server, Cli]:
    s1 = cluster.server("s1", "127.0.0.1", s1_env)
    s2 = cluster.server("s2", "127.0.0.2", s2_env)
    cli = cluster.cli()
    cli.trust(s1, "s1")
    cli.trust(s2, "s2")
    return s1, s2, cli


@contextlib.contextmanager
def _move_in_background(cli: Cli, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`stapes move ...` running while the test acts on the servers; never left running after the test."""
    move = subprocess.Popen([STAPES, "move", *args], env=cli.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield move
    finally:
        if move.poll() is None:
            move.kill()
            move.communicate()


def _running_counter(cli: Cli, *config: str) -> tuple[int, int, dict[str, str]]:
    cli.run("launch", "s1:busybox", "c1", "-q", *(arg for key in config for arg in ("-c", key)))
    seen, pid = _start_counter(cli, "s1:c1")
    return seen, pid, cli.json("list", "s1:")[0]["config"]


def _fill_memory(cli: Cli, megabytes: int) -> None:
    """A process in s1:c1 that holds `megabytes` MB of written memory (a shell variable)."""
    cli.run("exec", "s1:c1", "--", "sh", "-c",
            f"setsid sh -c 'x=$(head -c {megabytes}000000 /dev/zero | tr \"\\\\0\" a); echo held > /root/held; "
            "sleep 100000' </dev/null >/dev/null 2>&1 &")
    wait_for(lambda: cli.run("exec", "s1:c1", "--", "cat", "/root/held", check=False).stdout == "held\n", 60,
             "the memory to be filled")


def _assert_as_it_was(cli: Cli, seen: int, pid: int, config: dict[str, str]) -> None:
    instance = cli.json("list", "s1:")[0]
    assert instance["status"] == "Running" and instance["config"] == config
    _assert_counted_on(cli, "s1:c1", seen, pid)


def test_what_criu_cannot_checkpoint_keeps_running_on_the_source(cluster: Cluster) -> None:
    s1, s2, cli = _servers(cluster, {}, {})
    seen, pid, config = _running_counter(cli)
    # A process whose session leader is outside the container (started by exec without setsid).
    cli.run("exec", "s1:c1", "--", "sh", "-c", "sleep 1000 </dev/null >/dev/null 2>&1 &")
    err = cli.fails("move", "s1:c1", "s2:")
    assert "session leader" in err and "keeps running" in err, err
    _assert_as_it_was(cli, seen, pid, config)
    _assert_nothing_on(s2, cli, "s2")


@pytest.mark.parametrize("lazy", [False, True])
def test_a_failed_restore_leaves_it_running_on_the_source(cluster: Cluster, lazy: bool) -> None:
    """Lazy: the target fails after its restore, before it confirmed: the source stops CRIU, which lets the
    container go on with its memory untouched (no restore needed)."""
    s1, s2, cli = _servers(cluster, {}, {"STAPES_FAIL_AT": "target-before-commit"})
    seen, pid, config = _running_counter(cli, *(["migration.lazy=true", "security.privileged=true"] if lazy else []))
    err = cli.fails("move", "s1:c1", "s2:", "--mode", "push")
    assert "on purpose" in err and "runs on the source again" in err, err
    _assert_as_it_was(cli, seen, pid, config)
    _assert_nothing_on(s2, cli, "s2")
    assert subprocess.run(["lxc-ls", "-P", str(s2.state_dir / "containers")], capture_output=True,
                          text=True).stdout.strip() == ""


@pytest.mark.parametrize("mode", ["pull", "relay"])
def test_the_target_killed_after_the_checkpoint(cluster: Cluster, mode: str) -> None:
    s1, s2, cli = _servers(cluster, {"STAPES_PAUSE_AT": "source-after-checkpoint"}, {})
    seen, pid, config = _running_counter(cli)
    with _move_in_background(cli, "s1:c1", "s2:", "--mode", mode) as move:
        marker = s1.state_dir / "paused-at-source-after-checkpoint"
        wait_for(marker.exists, 30, "the source to checkpoint")
        assert cli.json("list", "s1:")[0]["status"] == "Stopped"  # checkpointed: its processes ended here
        s2.kill()
        marker.unlink()
        _, err = move.communicate(timeout=60)
    assert move.returncode != 0 and "runs on the source again" in err, err
    _assert_as_it_was(cli, seen, pid, config)
    s2.start()
    _assert_nothing_on(s2, cli, "s2")


def test_the_link_cut_after_the_checkpoint(cluster: Cluster) -> None:
    """Relay: the client carries every byte; killing it cuts the link between the servers at once."""
    s1, s2, cli = _servers(cluster, {"STAPES_PAUSE_AT": "source-after-checkpoint"}, {})
    seen, pid, config = _running_counter(cli)
    with _move_in_background(cli, "s1:c1", "s2:", "--mode", "relay") as move:
        marker = s1.state_dir / "paused-at-source-after-checkpoint"
        wait_for(marker.exists, 30, "the source to checkpoint")
        move.kill()
        move.wait(timeout=10)
        marker.unlink()
    wait_for(lambda: not s1.running_operations() and not s2.running_operations(), 60, "both sides to give up")
    _assert_as_it_was(cli, seen, pid, config)
    _assert_nothing_on(s2, cli, "s2")


def test_the_target_killed_while_the_memory_streams(cluster: Cluster) -> None:
    """The pages travel while CRIU writes them; a target that stops reading and dies leaves the source
    blocked in the middle of them: it must put the container back from its own, complete checkpoint."""
    s1, s2, cli = _servers(cluster, {}, {"STAPES_PAUSE_AT": "target-before-state"})
    seen, pid, config = _running_counter(cli)
    _fill_memory(cli, 32)  # more than the sockets between the servers hold
    with _move_in_background(cli, "s1:c1", "s2:") as move:
        wait_for((s2.state_dir / "paused-at-target-before-state").exists, 30, "the target to wait")

        def stage() -> str:
            ops = [op for op in s1.running_operations() if op["description"] == "Migrating instance"]
            return str(ops[0]["metadata"].get("live_stage")) if ops else "gone"

        wait_for(lambda: stage() == "transfer", 30, "the source to have checkpointed")
        assert cli.json("list", "s1:")[0]["status"] == "Stopped"
        assert not list((s2.state_dir / "migrations").glob("*/final/pages-*.img"))  # nothing read yet
        s2.kill()
        _, err = move.communicate(timeout=60)
    assert move.returncode != 0 and "runs on the source again" in err, err
    _assert_as_it_was(cli, seen, pid, config)
    s2.start()
    _assert_nothing_on(s2, cli, "s2")


def _killed_at(s1: Server, cli: Cli, point: str) -> str:
    """`stapes move s1:c1 s2:` with the source killed (SIGKILL) at `point`; the client's error."""
    with _move_in_background(cli, "s1:c1", "s2:") as move:
        wait_for((s1.state_dir / f"paused-at-{point}").exists, 30, f"the source to reach {point}")
        s1.kill()
        (s1.state_dir / f"paused-at-{point}").unlink()
        _, err = move.communicate(timeout=60)
    assert move.returncode != 0, err
    return err


def test_the_source_killed_after_the_checkpoint(cluster: Cluster) -> None:
    """The container's processes exist only in the checkpoint then: the source puts them back at start."""
    s1, s2, cli = _servers(cluster, {"STAPES_PAUSE_AT": "source-after-checkpoint"}, {})
    seen, pid, config = _running_counter(cli)
    _killed_at(s1, cli, "source-after-checkpoint")
    wait_for(lambda: not s2.running_operations(), 60, "the target to give up")
    _assert_nothing_on(s2, cli, "s2")
    s1.start()
    _assert_as_it_was(cli, seen, pid, config)  # restored, not booted afresh: same process, same count
    assert "runs again here, from its checkpoint" in s1.log()
    assert not list((s1.state_dir / "migrations").glob("*"))


def test_the_source_killed_once_the_target_runs_it(cluster: Cluster) -> None:
    """After the target confirmed, a source that restarts must not run the container a second time."""
    s1, s2, cli = _servers(cluster, {"STAPES_PAUSE_AT": "source-after-handover"}, {})
    seen, pid, _ = _running_counter(cli)
    _killed_at(s1, cli, "source-after-handover")
    s1.start()
    assert [i["status"] for i in cli.json("list", "s1:")] == ["Stopped"]
    assert [i["status"] for i in cli.json("list", "s2:")] == ["Running"]
    _assert_counted_on(cli, "s2:c1", seen, pid)
    cli.run("delete", "s1:c1")  # what the client would have done: the move is then whole
    _assert_nothing_on(s1, cli, "s1")


def test_what_the_target_cannot_restore_is_refused_before_anything_stops(cluster: Cluster, tmp_path: Path) -> None:
    """A target without a working CRIU says so in its answer: the source never checkpoints."""
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 3.17'\n")
    fake.chmod(0o755)
    s1, s2, cli = _servers(cluster, {}, {"STAPES_CRIU": str(fake), "STAPES_CRIU_PREFIX": str(tmp_path / "none"),
                                         "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert not s2.api("GET", "/1.0")["environment"]["live_migration"]["container"]["available"]
    seen, pid, config = _running_counter(cli)
    err = cli.fails("move", "s1:c1", "s2:")
    assert "older than 4.2" in err and "--stateless" in err, err
    _assert_as_it_was(cli, seen, pid, config)
    _assert_nothing_on(s2, cli, "s2")


def test_a_move_cancelled_after_the_checkpoint(cluster: Cluster) -> None:
    s1, s2, cli = _servers(cluster, {"STAPES_PAUSE_AT": "source-after-checkpoint"}, {})
    seen, pid, config = _running_counter(cli)
    with _move_in_background(cli, "s1:c1", "s2:", "--mode", "push") as move:
        wait_for((s1.state_dir / "paused-at-source-after-checkpoint").exists, 30, "the source to checkpoint")
        source_op = next(op for op in s1.running_operations() if op["description"] == "Migrating instance")
        s1.api("DELETE", f"/1.0/operations/{source_op['id']}")
        _, err = move.communicate(timeout=60)
    assert move.returncode != 0, err
    _assert_as_it_was(cli, seen, pid, config)
    _assert_nothing_on(s2, cli, "s2")


def test_lazy_pages_restore_first_and_bring_the_memory_after(s1: Server, s2: Server, two: Cli) -> None:
    """migration.lazy: the target restores the container before its memory arrives (post-copy); the loop
    goes on, its pages fetched on demand, and the source ends once all of them were taken."""
    support = s1.api("GET", "/1.0")["environment"]["live_migration"]["container"]
    assert support["lazy_pages"], support["lazy_pages_reason"]
    # Unprivileged, it needs userfaultfd in its user namespace, which this host does not allow: refused first.
    two.run("launch", "s1:busybox", "u1", "-q", "-c", "migration.lazy=true")
    err = two.fails("move", "s1:u1", "s2:")
    assert "vm.unprivileged_userfaultfd" in err, err
    assert [i["status"] for i in two.json("list", "s1:")] == ["Running"]
    two.run("delete", "s1:u1", "--force")
    two.run("launch", "s1:busybox", "c1", "-q", "-c", "migration.lazy=true", "-c", "security.privileged=true")
    seen, pid = _start_counter(two, "s1:c1")
    for mode, source, target in (("pull", "s1", "s2"), ("relay", "s2", "s1")):
        out = two.run("move", f"{source}:c1", f"{target}:", "--mode", mode).stdout
        assert "live: frozen" in out, out
        assert two.json("list", f"{source}:") == []
        seen = _assert_counted_on(two, f"{target}:c1", seen, pid)
    _assert_nothing_on(s2, two, "s2")


def _restored_processes(server: Server) -> list[str]:
    """The states (R, S, T...) of every process of the one container under `server`'s lxcpath."""
    lxc_path = server.state_dir / "containers"
    names = [entry.name for entry in lxc_path.iterdir() if (entry / "config").exists()]
    assert len(names) == 1, names
    info = subprocess.run(["lxc-info", "-P", str(lxc_path), "-n", names[0], "-p", "-H"], capture_output=True,
                          text=True, timeout=30).stdout.strip()
    assert info.isdigit(), f"the restored container has no init: {info!r}"
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            states[int(stat.parent.name)] = fields[0]
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, pending = [], [int(info)]
    while pending:
        pid = pending.pop()
        if pid in states:
            found.append(states[pid])
        pending.extend(children.get(pid, []))
    return found


def _counted_lines(server: Server) -> int:
    counters = list((server.state_dir / "storage-pools/default/containers").glob("*/rootfs/root/counter"))
    assert len(counters) == 1, counters
    return len(counters[0].read_text().splitlines())


def test_the_target_killed_during_its_restore_never_runs_a_second_copy(cluster: Cluster) -> None:
    """The restore outlives the target's death (lxc-checkpoint runs in its own session), but the restored copy
    stays stopped until the source hands it over, which a dead target never hears: while the source runs the
    container again, the target's copy writes nothing; its restart removes it."""
    s1, s2, cli = _servers(cluster, {}, {"STAPES_PAUSE_AT": "target-before-commit"})
    seen, pid, config = _running_counter(cli)
    with _move_in_background(cli, "s1:c1", "s2:") as move:
        marker = s2.state_dir / "paused-at-target-before-commit"
        wait_for(marker.exists, 60, "the target to restore")
        s2.kill()
        _, err = move.communicate(timeout=60)
    assert move.returncode != 0 and "runs on the source again" in err, err
    _assert_as_it_was(cli, seen, pid, config)
    states = _restored_processes(s2)
    assert states and set(states) == {"T"}, f"the target's restored copy runs: {states}"
    written = _counted_lines(s2)
    subprocess.run(["sleep", "1.5"], check=True)  # the source's copy counts 15 more meanwhile
    assert _counted_lines(s2) == written, "two copies ran: the target's wrote its counter too"
    s2.start()
    _assert_nothing_on(s2, cli, "s2")
    assert subprocess.run(["lxc-ls", "-P", str(s2.state_dir / "containers")], capture_output=True,
                          text=True).stdout.strip() == ""
    _assert_as_it_was(cli, seen, pid, config)


def test_the_target_killed_once_handed_over_keeps_the_only_copy(cluster: Cluster) -> None:
    """Once the source gave its copy up, the target's is the only one: a target that dies before it recorded
    the new instance keeps it at its restart (running, same processes) instead of removing it."""
    s1, s2, cli = _servers(cluster, {}, {"STAPES_PAUSE_AT": "target-after-release"})
    seen, pid, _ = _running_counter(cli)
    with _move_in_background(cli, "s1:c1", "s2:") as move:
        wait_for((s2.state_dir / "paused-at-target-after-release").exists, 60, "the target to be handed it")
        s2.kill()
        move.communicate(timeout=60)
    assert [i["status"] for i in cli.json("list", "s1:")] == ["Stopped"]  # handed over: never run again here
    s2.start()
    assert [i["status"] for i in cli.json("list", "s2:")] == ["Running"]
    _assert_counted_on(cli, "s2:c1", seen, pid)
    assert "its source had handed it over" in s2.log()
    cli.run("delete", "s1:c1")
    _assert_nothing_on(s1, cli, "s1")


def test_the_source_killed_while_its_dump_runs(cluster: Cluster) -> None:
    """lxc-checkpoint outlives the source server (its own session) and stops the container once its dump is
    complete: the source's next start waits for it to end and restores the container from what it wrote."""
    s1, s2, cli = _servers(cluster, {}, {})
    seen, pid, config = _running_counter(cli)
    _fill_memory(cli, 300)  # a dump long enough to kill the server in the middle of it

    def dumping() -> bool:
        return subprocess.run(["pgrep", "-f", f"lxc-checkpoint -P {s1.state_dir / 'containers'} .* -s"],
                              capture_output=True).returncode == 0

    with _move_in_background(cli, "s1:c1", "s2:") as move:
        wait_for(dumping, 60, "the source's dump to begin")
        s1.kill()
        assert dumping(), "the dump ended before the server was killed: nothing proven"
        move.communicate(timeout=60)
    assert move.returncode != 0
    wait_for(lambda: not s2.running_operations(), 60, "the target to give up")
    _assert_nothing_on(s2, cli, "s2")
    s1.start()
    _assert_as_it_was(cli, seen, pid, config)  # restored from the dump that finished without its server
    assert "runs again here, from its checkpoint" in s1.log()
    assert not list((s1.state_dir / "migrations").glob("*"))
