"""Reaching a running VM as a user does, from `stapes` and from the official `incus` client: exec through the
guest agent (exit status, stdin, stderr, a command that is not there, a `-t` session on a real pty with a
window resize, several at once), the address it got on the bridge, its console log, and its lifecycle
(restart, freeze, rename, delete) with nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from tests.integration.harness import STAPES, Cli, Cluster, Server, wait_for
from tests.integration.test_incus_client import incus
from tests.integration.test_interactive import Terminal

BOOT = 120.0  # TCG on a busy 2-core machine: the tiny VM's agent answers after 15-25 s


def agent_up(cli: Cli, name: str) -> None:
    def answers() -> bool:
        result = cli.run("exec", name, "--", "true", check=False)
        if result.returncode != 0:
            # While it boots the server says so, rather than hanging or failing obscurely.
            assert "agent is not running" in result.stderr, result.stderr
        return result.returncode == 0

    wait_for(answers, BOOT, f"the agent of {name}")


def qemu_processes(server: Server) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{server.state_dir}"], capture_output=True, text=True)
    return out.stdout.split()


def test_exec_console_and_address_of_a_running_vm(cluster: Cluster, s1: Server, cli: Cli) -> None:
    cli.run("launch", "s1:busybox-vm", "v1", "--vm", "-d", "root,size=256MiB")
    agent_up(cli, "s1:v1")

    assert cli.run("exec", "s1:v1", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    assert cli.run("exec", "s1:v1", "--", "cat", input="hello VM\n").stdout == "hello VM\n"
    both = cli.run("exec", "s1:v1", "--", "sh", "-c", "echo out; echo err >&2")
    assert (both.stdout, both.stderr) == ("out\n", "err\n")
    missing = cli.run("exec", "s1:v1", "--", "no-such-command", check=False)
    assert missing.returncode == 127 and "not found" in missing.stderr.lower()
    assert cli.run("exec", "s1:v1", "--env", "WHO=stapes", "--", "sh", "-c", "echo $WHO").stdout == "stapes\n"

    # Several sessions at once over the one agent connection, each with its own output.
    procs = [subprocess.Popen([STAPES, "exec", "s1:v1", "--", "sh", "-c", f"sleep 1; echo session{i}"],
                              env=cli.env(), stdout=subprocess.PIPE, text=True) for i in range(4)]
    assert [p.communicate(timeout=60)[0] for p in procs] == [f"session{i}\n" for i in range(4)]

    # An interactive session on a pty: its size, a resize, and the exit status.
    term = Terminal([STAPES, "exec", "-t", "s1:v1", "--", "sh"], {**cli.env(), "TERM": "xterm"}, size=(80, 24))
    try:
        term.expect(rb"/ # ", timeout=60)  # typed once the prompt shows, as a user does
        term.send(b"stty size; echo end-$((6*7))\r")
        term.expect(rb"24 80\s+end-42", timeout=30)
        term.resize(100, 30)
        time.sleep(0.5)
        term.send(b"stty size; echo end-$((6*8))\r")
        term.expect(rb"30 100\s+end-48", timeout=30)
        term.send(b"exit 3\r")
        assert term.wait(30) == 3
    finally:
        term.close()

    # The address DHCP gave it on the managed bridge, in list and info.
    wait_for(lambda: cli.run("list", "s1:", "-c", "n4", "-f", "csv").stdout.strip() != "v1,", 60, "v1's address")
    listed = cli.run("list", "s1:", "-c", "nt4", "-f", "csv").stdout.strip()
    name, kind, address = listed.split(",", 2)
    assert (name, kind) == ("v1", "VIRTUAL-MACHINE") and address.endswith("(eth0)"), listed
    assert address.split()[0] in cli.run("info", "s1:v1").stdout

    log = cli.run("console", "s1:v1", "--show-log").stdout
    assert "heartbeat 1\n" in log and "heartbeat 2\n" in log


def test_vm_lifecycle_leaves_nothing(cluster: Cluster, s1: Server, cli: Cli) -> None:
    cli.run("launch", "s1:busybox-vm", "v1", "--vm", "-d", "root,size=256MiB")
    agent_up(cli, "s1:v1")
    cli.run("exec", "s1:v1", "--", "sh", "-c", "echo kept > /mnt/data/note; sync")
    [pid] = qemu_processes(s1)

    cli.run("freeze", "s1:v1")
    assert json.loads(cli.run("list", "s1:", "-f", "json").stdout)[0]["status"] == "Frozen"
    cli.run("unfreeze", "s1:v1")

    cli.run("restart", "s1:v1")  # the power button, then a new QEMU
    assert qemu_processes(s1) != [pid]
    agent_up(cli, "s1:v1")
    assert cli.run("exec", "s1:v1", "--", "cat", "/mnt/data/note").stdout == "kept\n"

    started = time.monotonic()
    cli.run("stop", "s1:v1")  # the guest powers off on the ACPI power button, well before the timeout
    assert time.monotonic() - started < 25
    assert qemu_processes(s1) == []
    cli.run("rename", "s1:v1", "s1:v2")
    cli.run("start", "s1:v2")
    agent_up(cli, "s1:v2")
    assert cli.run("exec", "s1:v2", "--", "cat", "/mnt/data/note").stdout == "kept\n"
    cli.run("delete", "s1:v2", "--force")
    assert qemu_processes(s1) == []
    assert not list((s1.state_dir / "storage-pools/default/virtual-machines").iterdir())
    assert not any((s1.state_dir / "qemu").iterdir())
    links = subprocess.run(["ip", "-d", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert f"stapes:{s1.state_dir}:/tap/" not in links  # the taps carry their owner in their alias


@pytest.mark.skipif(shutil.which("incus") is None, reason="incus-client is not installed")
def test_incus_client_launches_and_reaches_a_vm(cluster: Cluster, s1: Server) -> None:
    conf = cluster.root / "incus-client"
    conf.mkdir()
    cli = cluster.cli(s1)
    token = cli.run("config", "trust", "add", "incus-user").stdout.strip().splitlines()[-1]
    incus(conf, "remote", "add", "st", token)
    incus(conf, "launch", "st:busybox-vm", "st:v1", "--vm", "-d", "root,size=256MiB")
    listed = json.loads(incus(conf, "list", "st:", "--format", "json").stdout)
    assert [(i["name"], i["type"], i["status"]) for i in listed] == [("v1", "virtual-machine", "Running")]

    def answers() -> bool:
        return incus(conf, "exec", "st:v1", "--", "true", check=False).returncode == 0

    wait_for(answers, BOOT, "the agent through incus exec")
    assert incus(conf, "exec", "st:v1", "--", "sh", "-c", "echo from-incus; exit 5", check=False).returncode == 5
    assert incus(conf, "exec", "st:v1", "--", "cat", input="piped\n").stdout == "piped\n"
    assert "heartbeat" in incus(conf, "console", "st:v1", "--show-log").stdout
    incus(conf, "stop", "st:v1", "--force")
    incus(conf, "delete", "st:v1")
    assert qemu_processes(s1) == []
