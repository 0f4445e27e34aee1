"""Interactive exec through a real pty, from `stapes` and from the official `incus` client: a prompt, input,
the command's own controlling terminal, window resizes, ^C reaching the command through the pty's line
discipline, the exit status passed on, and the user's terminal restored however the client ends."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterator

import pytest

from tests.integration.harness import STAPES, Cli, Cluster, Server, wait_for
from tests.integration.hostile import Raw

TIMEOUT = 20.0


class Terminal:
    """A client process on a pty of its own; the test holds both ends (the slave to check its settings)."""

    def __init__(self, argv: list[str], env: dict[str, str], size: tuple[int, int] = (80, 24)) -> None:
        self.master, self.slave = os.openpty()
        self.resize(*size, notify=False)
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave, env=env,
                                     start_new_session=True, close_fds=True)
        os.set_blocking(self.master, False)
        self.output = b""

    def resize(self, columns: int, rows: int, notify: bool = True) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        if notify:
            self.proc.send_signal(signal.SIGWINCH)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = TIMEOUT) -> re.Match[bytes]:
        """Read until `pattern` appears in what came since the last match; then consume up to it."""
        deadline = time.monotonic() + timeout
        while True:
            if found := re.search(pattern, self.output):
                self.output = self.output[found.end():]
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} never came; got {self.output[-2000:]!r}")
            try:
                self.output += os.read(self.master, 65536)
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:  # EIO: the client is gone and closed the pty
                time.sleep(0.05)

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def settings(self) -> list[object]:
        return termios.tcgetattr(self.slave)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    try:
        yield opened
    finally:
        for terminal in opened:
            terminal.close()


def stapes_terminal(cli: Cli, terminals: list[Terminal], *args: str, size: tuple[int, int] = (80, 24)) -> Terminal:
    terminal = Terminal([STAPES, *args], {**cli.env(), "TERM": "xterm"}, size)
    terminals.append(terminal)
    return terminal


PROMPT = rb"/ # "


def test_interactive_shell_from_stapes(cli: Cli, terminals: list[Terminal]) -> None:
    cli.run("launch", "busybox", "c1")
    term = stapes_terminal(cli, terminals, "exec", "c1", "--", "sh", size=(100, 30))
    term.expect(PROMPT)
    term.send(b"echo $((6*7))\r")
    term.expect(rb"\r\n42\r\n")
    term.expect(PROMPT)
    term.send(b"tty; stty size\r")
    term.expect(rb"/dev/pts/\d+\r\n30 100\r\n")
    # The client passes a resize of its terminal on (SIGWINCH); the command's pty takes the new size.
    term.resize(132, 41)
    time.sleep(0.5)
    term.send(b"stty size\r")
    term.expect(rb"\r\n41 132\r\n")
    # ^C typed is a byte through the raw terminal; the command's pty makes it SIGINT for its foreground job.
    term.send(b"sleep 100; echo slept\r")
    time.sleep(1)
    term.send(b"\x03")
    term.expect(PROMPT)
    term.send(b"echo alive\r")
    term.expect(rb"\r\nalive\r\n")
    assert b"slept" not in term.output
    term.send(b"exit 4\r")
    assert term.wait() == 4
    assert term.settings() == term.before


def test_pty_output_before_exit_arrives(cli: Cli, terminals: list[Terminal]) -> None:
    cli.run("launch", "busybox", "c1")
    term = stapes_terminal(cli, terminals, "exec", "-t", "c1", "--", "sh", "-c", "echo hi; tty; exit 4")
    term.expect(rb"hi\r\n/dev/pts/\d+\r\n")
    assert term.wait() == 4
    # Not a terminal on our side: -t forces one there all the same, and a missing command is said plainly.
    result = cli.run("exec", "-t", "c1", "--", "sh", "-c", "echo hi; tty; exit 4", check=False)
    assert result.returncode == 4 and re.match(r"hi\r?\n/dev/pts/\d+", result.stdout), result
    # Input written at once (a pipe) reaches the command: none of it is lost while lxc-attach sets its
    # terminal up (it flushes what came before).
    result = cli.run("exec", "-t", "c1", "--", "sh", "-c", "read x; echo got $x; exit 3", input="hello\n",
                     check=False, timeout=30)
    assert result.returncode == 3 and "got hello" in result.stdout, result


@pytest.mark.parametrize("mode", ["-t", "-T"])
def test_missing_command_is_a_clear_error(cli: Cli, mode: str) -> None:
    cli.run("launch", "busybox", "c1")
    result = cli.run("exec", mode, "c1", "--", "nosuch", check=False)
    assert result.returncode == 127
    assert result.stderr.strip() == "Error: Command not found", result.stderr
    assert "lxc" not in result.stdout + result.stderr
    result = cli.run("exec", mode, "c1", "--", "/etc/passwd", check=False)
    assert (result.returncode, result.stderr.strip()) == (126, "Error: Command not executable")
    # A command that runs and exits 127 itself is not mistaken for one that was never found.
    result = cli.run("exec", mode, "c1", "--", "sh", "-c", "echo out; echo err >&2; exit 127", check=False)
    assert result.returncode == 127 and "out" in result.stdout and "Error" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_terminal_restored_when_the_client_is_killed(cli: Cli, s1: Server, terminals: list[Terminal],
                                                     signum: signal.Signals) -> None:
    cli.run("launch", "busybox", "c1")
    term = stapes_terminal(cli, terminals, "exec", "c1", "--", "sh")
    term.expect(PROMPT)
    assert term.settings() != term.before  # raw while the session runs
    term.send(b"sleep 300\r")
    time.sleep(0.5)
    term.proc.send_signal(signum)
    assert term.wait() == 128 + signum
    assert term.settings() == term.before
    # The session ended in the container too: no sleep left behind.
    deadline = time.monotonic() + TIMEOUT
    while "sleep 300" in cli.run("exec", "c1", "--", "ps").stdout:
        assert time.monotonic() < deadline, "the interactive command outlived its client"
        time.sleep(0.5)


def test_terminal_restored_after_an_error(cli: Cli, terminals: list[Terminal]) -> None:
    cli.run("launch", "busybox", "c1")
    term = stapes_terminal(cli, terminals, "exec", "c1", "--", "nosuch")
    term.expect(rb"Error: Command not found")
    assert term.wait() == 127
    assert term.settings() == term.before


@pytest.mark.skipif(shutil.which("incus") is None, reason="incus-client is not installed")
def test_interactive_shell_from_incus(cluster: Cluster, s1: Server, terminals: list[Terminal]) -> None:
    conf = cluster.root / "incus-client"
    conf.mkdir()
    env = dict(os.environ, INCUS_CONF=str(conf), HOME=str(conf), TERM="xterm")
    token = cluster.cli(s1).run("config", "trust", "add", "incus-user").stdout.strip().splitlines()[-1]
    subprocess.run(["incus", "remote", "add", "st", token], env=env, check=True, capture_output=True, timeout=60)
    cluster.cli(s1).run("launch", "busybox", "c1")
    term = Terminal(["incus", "exec", "st:c1", "--", "sh"], env, (90, 20))
    terminals.append(term)
    term.expect(PROMPT)
    term.send(b"echo $((6*7)); stty size\r")
    term.expect(rb"\r\n42\r\n20 90\r\n")
    term.resize(120, 33)
    time.sleep(0.5)
    term.send(b"stty size\r")
    term.expect(rb"\r\n33 120\r\n")
    term.send(b"sleep 100\r")
    time.sleep(1)
    term.send(b"\x03")
    term.expect(PROMPT)
    term.send(b"exit 4\r")
    assert term.wait() == 4
    assert term.settings() == term.before
    result = subprocess.run(["incus", "exec", "st:c1", "--", "nosuch"], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 127 and "Command not found" in result.stderr, result


def _exec_body(command: list[str], interactive: bool) -> dict[str, object]:
    return {"command": command, "interactive": interactive, "wait-for-websocket": True, "width": 80, "height": 24}


def _leftovers(cli: Cli, pattern: str) -> list[str]:
    return [line for line in cli.run("exec", "c1", "--", "ps").stdout.splitlines()
            if pattern in line]


async def test_a_stalled_client_never_grows_the_daemon(cli: Cli, s1: Server) -> None:
    """`cat /dev/zero` on a pty, and a client that opens "0" and reads nothing: the pty is read only as fast
    as the websocket takes it. Then the client closes "0" (never having opened "control"): that is a hang-up,
    the command and the operation end."""
    cli.run("launch", "busybox", "c1")
    async with Raw(s1) as raw:
        status, body = await raw.call("POST", "/1.0/instances/c1/exec", _exec_body(["cat", "/dev/zero"], True))
        assert status == 202, body
        op = body["metadata"]
        before = s1.rss()
        ws = await raw.ws(op, op["metadata"]["fds"]["0"])
        await asyncio.sleep(5)
        grown = s1.rss() - before
        assert grown < 64 * 1024 * 1024, f"the daemon grew by {grown >> 20} MiB for a client that reads nothing"
        await ws.close()
        done = await raw.wait(op, 30)
        assert done["status"] != "Running", done
    assert not _leftovers(cli, "cat /dev/zero"), "the command outlived its client"
    assert not s1.running_operations()


@pytest.mark.parametrize("mode", ["-T", "-t"])
def test_a_background_process_holding_the_output_does_not_hold_the_exec(cli: Cli, mode: str) -> None:
    """The command exits; a process it left behind keeps the inherited output open (and keeps writing): the
    exec ends all the same, soon, with the command's status."""
    cli.run("launch", "busybox", "c1")
    started = time.monotonic()
    result = cli.run("exec", mode, "c1", "--", "sh", "-c", "(while :; do echo x; sleep 0.2; done) & echo hi; exit 3",
                     check=False, timeout=30)
    assert result.returncode == 3, result
    # The command's own line arrived (the loop in the background may print its first "x" before or after it).
    assert "hi" in [line.strip() for line in result.stdout.splitlines()], result
    assert time.monotonic() - started < 15
    # Its output went with the session: the loop left behind ends on its next write.
    wait_for(lambda: not _leftovers(cli, "while :"), 15, "the background writer to end")
