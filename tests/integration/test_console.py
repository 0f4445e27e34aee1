"""`stapes console`: a container's /dev/console (the server's own pty) through a real pty on the client side,
typing into a shell that runs on the console, Ctrl+a q detaching (the container runs on), the console's log
(bounded, root's alone), a stopped instance refused, the official `incus` client reading the log, and the
console surviving a live move."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.harness import Cli, Cluster, Server, _UnixConnection, wait_for
from tests.integration.test_interactive import Terminal, stapes_terminal, terminals  # noqa: F401

TIMEOUT = 20.0


def _console_log(server: Server, name: str) -> bytes:
    conn = _UnixConnection(server.state_dir / "unix.socket", 30)
    try:
        conn.request("GET", f"/1.0/instances/{name}/console")
        response = conn.getresponse()
        assert response.status == 200, response.read()
        return response.read()
    finally:
        conn.close()


def test_attach_type_detach_and_log(cli: Cli, s1: Server, terminals: list[Terminal]) -> None:  # noqa: F811
    cli.run("launch", "busybox", "c1")
    term = stapes_terminal(cli, terminals, "console", "c1")
    term.expect(rb"To detach from the console, press: <ctrl>\+a q")
    time.sleep(0.5)  # the session attached: the output below is new
    cli.run("exec", "c1", "--", "sh", "-c", "echo marker-one > /dev/console")
    term.expect(rb"marker-one\r\n")
    # A shell on the console (the busybox image runs no getty): what is typed reaches it.
    cli.run("exec", "c1", "--", "sh", "-c", "setsid sh -c 'exec sh -i </dev/console >/dev/console 2>&1' &")
    term.expect(rb"/ # ")
    term.send(b"echo $((6*7))\r")
    term.expect(rb"\r\n42\r\n")
    # Ctrl+a Ctrl+a sends one Ctrl+a (here: the shell's line editor sees ^A, moving to the line's start).
    term.send(b"echo b\x01\x01echo a;\r")
    term.expect(rb"a\r\nb\r\n")
    term.send(b"\x01q")
    assert term.wait() == 0, term.output
    assert term.settings() == term.before  # the terminal restored
    assert cli.json("list")[0]["status"] == "Running"
    # The shell on the console is still there (the detach touched nothing inside).
    assert "sh -i" in cli.run("exec", "c1", "--", "ps").stdout
    out = cli.run("console", "c1", "--show-log").stdout
    assert "marker-one" in out and "42" in out, out
    log = s1.state_dir / "containers" / "c1" / "console.log"
    wait_for(lambda: b"marker-one" in log.read_bytes(), 5, "the log file")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and log.stat().st_uid == 0
    # DELETE clears it.
    s1.api("DELETE", "/1.0/instances/c1/console")
    assert b"marker-one" not in _console_log(s1, "c1")


def test_the_log_is_bounded_and_a_stopped_instance_is_refused(cli: Cli, s1: Server) -> None:
    cli.run("launch", "busybox", "c1")
    cli.run("exec", "c1", "--", "sh", "-c", "echo first-line > /dev/console; "
            "i=0; while [ $i -lt 3000 ]; do echo 0123456789012345678901234567890123456789012345678901234567890123"
            "; i=$((i+1)); done > /dev/console; echo last-line > /dev/console")
    wait_for(lambda: b"last-line" in _console_log(s1, "c1"), 10, "the last line")
    log = _console_log(s1, "c1")
    assert len(log) <= 128 * 1024 and b"first-line" not in log
    cli.run("stop", "c1", "--force")
    # The log of the last run stays readable; attaching is refused, saying why.
    wait_for(lambda: "last-line" in cli.run("console", "c1", "--show-log").stdout, 5, "the log after the stop")
    err = cli.fails("console", "c1")
    assert "is not running" in err and "stapes start c1" in err, err


def test_a_privileged_container_has_a_console_too(cli: Cli, s1: Server) -> None:
    cli.run("launch", "busybox", "c1", "-c", "security.privileged=true")
    cli.run("exec", "c1", "--", "sh", "-c", "echo privileged-marker > /dev/console")
    wait_for(lambda: b"privileged-marker" in _console_log(s1, "c1"), 5, "the privileged container's line")
    # A restart gives it a fresh console (and log); the old pty is unmounted, the new one mounted once.
    cli.run("restart", "c1", "--force")
    cli.run("exec", "c1", "--", "sh", "-c", "echo after-restart > /dev/console")
    wait_for(lambda: b"after-restart" in _console_log(s1, "c1"), 5, "the line after the restart")
    assert b"privileged-marker" not in _console_log(s1, "c1")
    point = str(s1.state_dir / "containers" / "c1" / "console")
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if line.split()[4] == point]
    assert len(mounts) == 1, mounts
    cli.run("delete", "c1", "--force")
    assert not (s1.state_dir / "containers" / "c1").exists()


@pytest.mark.skipif(shutil.which("incus") is None, reason="incus-client is not installed")
def test_incus_reads_the_console_log(cluster: Cluster, s1: Server) -> None:
    conf = cluster.root / "incus-client"
    conf.mkdir()
    env = dict(os.environ, INCUS_CONF=str(conf), HOME=str(conf), TERM="xterm")
    token = cluster.cli(s1).run("config", "trust", "add", "incus-user").stdout.strip().splitlines()[-1]
    subprocess.run(["incus", "remote", "add", "st", token], env=env, check=True, capture_output=True, timeout=60)
    cli = cluster.cli(s1)
    cli.run("launch", "busybox", "c1")
    cli.run("exec", "c1", "--", "sh", "-c", "echo incus-marker > /dev/console")
    result = subprocess.run(["incus", "console", "st:c1", "--show-log"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "incus-marker" in result.stdout, (result.stdout, result.stderr)
    # And attaching from incus: its output arrives through the same websockets; Ctrl+a q detaches.
    term = Terminal(["incus", "console", "st:c1"], env, (80, 24))
    try:
        term.expect(rb"<ctrl>\+a q")
        time.sleep(0.5)
        cli.run("exec", "c1", "--", "sh", "-c", "echo from-incus > /dev/console")
        term.expect(rb"from-incus")
        # Incus's client reads one key at a time (it drops what follows Ctrl+a in the same read): typed apart.
        term.send(b"\x01")
        time.sleep(0.3)
        term.send(b"q")
        assert term.wait() == 0
    finally:
        term.close()
    assert cli.json("list")[0]["status"] == "Running"


def test_the_console_survives_a_live_move(s1: Server, s2: Server, two: Cli,
                                          terminals: list[Terminal]) -> None:  # noqa: F811
    support = s1.api("GET", "/1.0")["environment"]["live_migration"]["container"]
    if not support["available"]:
        pytest.skip(support["reason"])
    two.run("launch", "s1:busybox", "c1", "-q")
    term = stapes_terminal(two, terminals, "console", "s1:c1")
    term.expect(rb"<ctrl>\+a q")
    time.sleep(0.5)
    two.run("exec", "s1:c1", "--", "sh", "-c", "echo before-move > /dev/console")
    term.expect(rb"before-move")
    assert b"before-move" in _console_log(s1, "c1")
    out = two.run("move", "s1:c1", "s2:").stdout
    assert "live: frozen" in out, out
    # The session on the source ends with the source's copy, saying so; the terminal is restored.
    assert term.wait() == 0
    term.expect(rb"The console of 'c1' closed: the instance stopped, restarted or moved")
    assert term.settings() == term.before
    two.run("exec", "s2:c1", "--", "sh", "-c", "echo after-move > /dev/console")
    wait_for(lambda: b"after-move" in _console_log(s2, "c1"), 5, "the line written after the move")
    # The moved container's console is the target's own pty (root's and the container root's alone).
    mounted = os.stat(s2.state_dir / "containers" / "c1" / "console")
    assert stat.S_ISCHR(mounted.st_mode) and os.major(mounted.st_rdev) == 136  # a pty slave of the host's devpts
    assert stat.S_IMODE(mounted.st_mode) & 0o007 == 0
    # And the source left nothing mounted behind.
    assert not (s1.state_dir / "containers" / "c1").exists()


def test_a_process_holding_the_console_survives_a_live_move(s1: Server, s2: Server, two: Cli,
                                                            terminals: list[Terminal]) -> None:  # noqa: F811
    """A getty's case: a shell with the console as its stdio (and controlling tty) is checkpointed with the
    console an external tty and restored on the target's new console, where what is typed reaches it."""
    support = s1.api("GET", "/1.0")["environment"]["live_migration"]["container"]
    if not support["available"]:
        pytest.skip(support["reason"])
    two.run("launch", "s1:busybox", "c1", "-q")
    two.run("exec", "s1:c1", "--", "sh", "-c", "setsid sh -c 'exec sh -i </dev/console >/dev/console 2>&1' &")
    wait_for(lambda: b"/ # " in _console_log(s1, "c1"), 5, "the shell's prompt on the console")
    pid = next(line.split()[0] for line in two.run("exec", "s1:c1", "--", "ps").stdout.splitlines()
               if line.endswith(" sh -i"))
    out = two.run("move", "s1:c1", "s2:", "--mode", "pull").stdout
    assert "live: frozen" in out, out
    assert [i["status"] for i in two.json("list", "s2:")] == ["Running"] and two.json("list", "s1:") == []
    # The same shell (its pid kept), still on the console: its tty is the target's new pty, /dev/console there.
    assert "sh -i" in two.run("exec", "s2:c1", "--", "ps").stdout
    devices = two.run("exec", "s2:c1", "--", "stat", "-L", "-c", "%t:%T", f"/proc/{pid}/fd/0",
                      "/dev/console").stdout.split()
    mounted = os.stat(s2.state_dir / "containers" / "c1" / "console").st_rdev
    assert devices == [f"{os.major(mounted):x}:{os.minor(mounted):x}"] * 2, devices
    term = stapes_terminal(two, terminals, "console", "s2:c1")
    term.expect(rb"<ctrl>\+a q")
    time.sleep(0.5)
    term.send(b"echo moved-$((6*7))\r")
    term.expect(rb"moved-42\r\n")
    wait_for(lambda: b"moved-42" in _console_log(s2, "c1"), 5, "the shell's answer in the target's console log")
    term.send(b"\x01q")
    assert term.wait() == 0, term.output
    assert not (s1.state_dir / "containers" / "c1").exists()


def test_a_failed_move_resumes_the_process_holding_the_console_on_the_source(cluster: Cluster) -> None:
    """The target fails after the checkpoint: the source restores it on a console of its own, the shell there."""
    s1 = cluster.server("s1", "127.0.0.1", {})
    s2 = cluster.server("s2", "127.0.0.2", {"STAPES_FAIL_AT": "target-before-commit"})
    cli = cluster.cli()
    cli.trust(s1, "s1")
    cli.trust(s2, "s2")
    support = s1.api("GET", "/1.0")["environment"]["live_migration"]["container"]
    if not support["available"]:
        pytest.skip(support["reason"])
    cli.run("launch", "s1:busybox", "c1", "-q")
    cli.run("exec", "s1:c1", "--", "sh", "-c", "setsid sh -c 'exec sh -i </dev/console >/dev/console 2>&1' &")
    wait_for(lambda: b"/ # " in _console_log(s1, "c1"), 5, "the shell's prompt on the console")
    err = cli.fails("move", "s1:c1", "s2:", "--mode", "push")
    assert "on purpose" in err and "runs on the source again" in err, err
    assert [i["status"] for i in cli.json("list", "s1:")] == ["Running"] and cli.json("list", "s2:") == []
    # Its shell is on the source's new console.
    assert "sh -i" in cli.run("exec", "s1:c1", "--", "ps").stdout
    point = s1.state_dir / "containers" / "c1" / "console"
    devices = cli.run("exec", "s1:c1", "--", "sh", "-c", "stat -L -c %t:%T /proc/$(ps | awk '/ sh -i$/ "
                      "{print $1}')/fd/0").stdout.split()
    mounted = os.stat(point).st_rdev
    assert devices == [f"{os.major(mounted):x}:{os.minor(mounted):x}"], devices
