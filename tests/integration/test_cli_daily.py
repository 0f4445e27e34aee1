"""The everyday command line against real servers: ephemeral instances, config device, aliases, remotes,
--all, version, completion, global options anywhere, list filters and columns, trust add -q."""

from __future__ import annotations

import time
from pathlib import Path

from stapes.api.tokens import decode_token
from tests.integration.harness import Cli, Cluster, Server, wait_for


def _names(cli: Cli, *args: str) -> list[str]:
    return cli.run("list", *args, "-c", "n", "-f", "csv").stdout.split()


def _volumes(s1: Server, name: str) -> list[Path]:
    return [p for p in s1.state_dir.glob(f"*/*/containers/{name}")] + list(
        s1.state_dir.glob(f"*/*/*/containers/{name}"))


def test_ephemeral_deleted_on_stop_and_on_poweroff_kept_on_restart(s1: Server, cli: Cli) -> None:
    cli.run("launch", "busybox", "e1", "-e", "-q")
    assert _volumes(s1, "e1"), "the test must see the volume it expects to vanish"
    assert "EPHEMERAL" in cli.run("list", "-c", "nt", "-f", "csv").stdout
    cli.run("restart", "e1", "--timeout", "20")
    assert ("e1", "Running") in s1.instances()  # Incus keeps an ephemeral instance across a restart
    time.sleep(5)  # the watch of self-stopped instances looks every 2s: a restart is not a stop to it
    assert ("e1", "Running") in s1.instances()
    cli.run("stop", "e1", "--timeout", "20")
    assert "e1" not in [n for n, _ in s1.instances()]
    assert not _volumes(s1, "e1")

    cli.run("launch", "busybox", "e2", "-e", "-q")
    cli.run("launch", "busybox", "keep", "-q")  # a persistent one that powers off stays, stopped
    cli.run("exec", "e2", "--", "poweroff", check=False)
    cli.run("exec", "keep", "--", "poweroff", check=False)
    wait_for(lambda: "e2" not in [n for n, _ in s1.instances()], 30, "the powered-off ephemeral e2 to go")
    assert not _volumes(s1, "e2")
    wait_for(lambda: ("keep", "Stopped") in s1.instances(), 30, "keep to stop")
    time.sleep(5)
    assert ("keep", "Stopped") in s1.instances()


def test_made_ephemeral_while_running_goes_on_poweroff(s1: Server, cli: Cli) -> None:
    cli.run("launch", "busybox", "late", "-q")
    s1.api("PATCH", "/1.0/instances/late", {"ephemeral": True})  # no ephemeral one ran before: no watch yet
    cli.run("exec", "late", "--", "poweroff", check=False)
    wait_for(lambda: "late" not in [n for n, _ in s1.instances()], 30, "the powered-off, now ephemeral, late to go")


def test_config_device_on_stopped_and_running(cluster: Cluster, s1: Server, cli: Cli) -> None:
    share = cluster.root / "share"
    share.mkdir()
    share.chmod(0o777)
    (share / "hello").write_text("from the host\n")
    (share / "hello").chmod(0o644)
    cli.run("init", "busybox", "c1", "-q")
    out = cli.run("config", "device", "add", "c1", "data", "disk", f"source={share}", "path=/mnt/data").stdout
    assert "added" in out and "running" not in out
    assert "unsupported type 'gpu'" in cli.fails("config", "device", "add", "c1", "g", "gpu")
    assert "unknown key 'bogus'" in cli.fails("config", "device", "add", "c1", "x", "disk", "path=/x",
                                              f"source={share}", "bogus=1")
    assert cli.run("config", "device", "list", "c1").stdout.split() == ["data"]
    assert f"source: {share}" in cli.run("config", "device", "show", "c1").stdout
    cli.run("start", "c1")
    assert cli.run("exec", "c1", "--", "cat", "/mnt/data/hello").stdout == "from the host\n"
    cli.run("exec", "c1", "--", "touch", "/mnt/data/rw")
    assert (share / "rw").exists()

    out = cli.run("config", "device", "set", "c1", "data", "readonly=true").stdout
    assert "takes effect at its next start" in out
    assert cli.run("config", "device", "get", "c1", "data", "readonly").stdout.strip() == "true"
    cli.run("restart", "c1", "--timeout", "20")
    assert cli.run("exec", "c1", "--", "touch", "/mnt/data/ro", check=False).returncode != 0
    assert not (share / "ro").exists()
    cli.run("config", "device", "unset", "c1", "data", "readonly")
    assert cli.run("config", "device", "get", "c1", "data", "readonly").stdout.strip() == ""

    assert "comes from a profile" in cli.fails("config", "device", "set", "c1", "root", "size=1GiB")
    cli.run("config", "device", "override", "c1", "root", "size=1GiB")
    assert "size: 1GiB" in cli.run("config", "device", "show", "c1").stdout

    out = cli.run("config", "device", "remove", "c1", "data").stdout
    assert "next start" in out
    cli.run("restart", "c1", "--timeout", "20")
    assert cli.run("exec", "c1", "--", "test", "-e", "/mnt/data/hello", check=False).returncode != 0
    assert "does not exist" in cli.fails("config", "device", "remove", "c1", "data")

    # the profile's device commands: the same code
    cli.run("profile", "create", "extra")
    cli.run("profile", "device", "add", "extra", "data", "disk", f"source={share}", "path=/srv")
    cli.run("profile", "device", "set", "extra", "data", "readonly", "true")
    assert cli.run("profile", "device", "get", "extra", "data", "readonly").stdout.strip() == "true"
    cli.run("profile", "device", "unset", "extra", "data", "readonly")
    assert "readonly" not in cli.run("profile", "device", "show", "extra").stdout
    assert cli.run("profile", "device", "list", "extra").stdout.split() == ["data"]
    cli.run("profile", "device", "remove", "extra", "data")
    assert cli.run("profile", "device", "list", "extra").stdout.split() == []


def test_aliases(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-q")
    cli.run("alias", "add", "names", "list -c n -f csv")
    cli.run("alias", "add", "state", "list @ARG1@ -c ns -f csv")
    assert cli.run("names").stdout.split() == ["c1"]
    assert cli.run("state", "c1").stdout.strip() == "c1,STOPPED"
    assert "names" in cli.run("alias", "list", "-f", "csv").stdout
    assert "already exists" in cli.fails("alias", "add", "names", "list")
    cli.run("alias", "rename", "names", "n")
    assert cli.run("n").stdout.split() == ["c1"]
    cli.run("alias", "remove", "n")
    assert "n" not in cli.run("alias", "list", "-f", "csv").stdout.split(",")
    assert cli.run("n", check=False).returncode != 0
    assert "does not exist" in cli.fails("alias", "remove", "n")


def test_remote_rename_and_set_url(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-q")
    cli.run("remote", "rename", "s1", "lab")
    remotes = cli.run("remote", "list", "-f", "csv").stdout
    assert "lab," in remotes and "s1," not in remotes
    assert _names(cli, "lab:") == ["c1"]  # its pinned certificate moved with it
    assert (cli.conf_dir / "servercerts" / "lab.crt").exists()
    assert not (cli.conf_dir / "servercerts" / "s1.crt").exists()
    cli.run("remote", "switch", "lab")
    cli.run("remote", "rename", "lab", "lab2")
    assert cli.run("remote", "get-default").stdout.strip() == "lab2"
    cli.run("remote", "set-url", "lab2", "https://127.0.0.1:1")
    assert "127.0.0.1:1" in cli.run("remote", "list", "-f", "csv").stdout
    assert cli.run("list", "lab2:", check=False).returncode != 0
    cli.run("remote", "set-url", "lab2", s1.url)
    assert _names(cli, "lab2:") == ["c1"]
    assert "cannot be renamed" in cli.fails("remote", "rename", "local", "x")


def test_start_stop_all_and_rename_with_remote(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "a", "-q")
    cli.run("init", "busybox", "b", "-q")
    cli.run("start", "--all")
    assert sorted(s1.instances()) == [("a", "Running"), ("b", "Running")]
    cli.run("stop", "--all", "s1:", "--timeout", "20")
    assert sorted(s1.instances()) == [("a", "Stopped"), ("b", "Stopped")]
    assert "remotes" in cli.fails("start", "--all", "a")
    assert "--all" in cli.fails("start")
    cli.run("rename", "s1:a", "s1:web")
    assert sorted(n for n, _ in s1.instances()) == ["b", "web"]
    assert "stapes move" in cli.fails("rename", "s1:web", "local:a")


def test_version_and_completion(s1: Server, cli: Cli) -> None:
    lines = cli.run("version").stdout.splitlines()
    assert lines[0].startswith("Client version: ") and lines[1].startswith("Server version: ")
    assert lines[1] != "Server version: unreachable"
    assert cli.run("version", "s1:").stdout.splitlines()[1] == lines[1]
    bash = cli.run("completion", "bash").stdout
    assert "complete -o" in bash and "_STAPES_COMPLETE=bash_complete" in bash
    assert "#compdef stapes" in cli.run("completion", "zsh").stdout
    assert "complete --no-files --command stapes" in cli.run("completion", "fish").stdout
    assert cli.run("completion", "tcsh", check=False).returncode != 0


def test_global_options_anywhere_and_quiet_trust_token(s1: Server, cli: Cli) -> None:
    cli.run("launch", "busybox", "c1", "-q")
    cli.run("project", "create", "staging")
    assert _names(cli) == ["c1"]
    assert _names(cli, "s1:", "--project", "staging") == []
    assert cli.run("--project", "staging", "list", "-c", "n", "-f", "csv").stdout.split() == []
    assert cli.run("list", "--project", "nosuch", check=False).returncode != 0
    # nothing after -- is ours
    assert cli.run("exec", "c1", "--", "echo", "--project", "x", "-q").stdout.strip() == "--project x -q"
    debug = cli.run("list", "--debug").stderr
    assert "GET http://stapes/1.0/instances" in debug and "-> 200" in debug
    assert "GET" not in cli.run("list").stderr
    failed = cli.run("info", "nosuch", "--debug", check=False)
    assert failed.returncode != 0 and "-> 404" in failed.stderr and "Error: " in failed.stderr

    token = cli.run("config", "trust", "add", "s1:me", "-q").stdout
    assert len(token.splitlines()) == 1
    assert decode_token(token.strip())
    assert "token" in cli.run("config", "trust", "add", "s1:you").stdout


def test_list_filters_columns_and_csv(s1: Server, cli: Cli) -> None:
    cli.run("launch", "busybox", "web1", "-c", "user.role=web", "-c", "limits.memory=64MiB", "-q")
    cli.run("init", "busybox", "db1", "-c", "user.role=db", "-q")
    assert _names(cli, "s1:", "status=running") == ["web1"]
    assert _names(cli, "status=stopped") == ["db1"]
    assert _names(cli, "user.role=db") == ["db1"]
    assert _names(cli, "u.role=web") == ["web1"]
    assert _names(cli, "type=container") == ["db1", "web1"]
    assert _names(cli, "we") == ["web1"]
    assert _names(cli, "s1:d") == ["db1"]
    assert _names(cli, "status=running", "user.role=db") == []
    out = cli.run("list", "-c", "ns,user.role:ROLE", "-f", "csv,header").stdout.splitlines()
    assert out == ["NAME,STATE,ROLE", "db1,STOPPED,db", "web1,RUNNING,web"]
    row = cli.run("list", "web1", "-c", "nmMNpu", "-f", "csv").stdout.strip().split(",")
    assert row[0] == "web1" and row[1].endswith(("KiB", "MiB")) and row[2].endswith("%"), row
    assert int(row[3]) >= 1 and int(row[4]) > 1 and row[5].endswith("s"), row
    assert cli.run("list", "web1", "-c", "m", "-f", "csv,raw").stdout.strip().isdigit()
    assert cli.run("list", "db1", "-c", "name,state,type", "-f", "csv").stdout.strip() == "db1,STOPPED,CONTAINER"
    table = cli.run("list", "-c", "ns", "-f", "table,noheader").stdout
    assert "web1" in table and "NAME" not in table
    assert [i["name"] for i in cli.json("list", "status=running")] == ["web1"]
    assert "Unknown column shorthand char 'z'" in cli.fails("list", "-c", "nz")


def test_ephemeral_survives_a_stateless_move(s1: Server, s2: Server, two: Cli) -> None:
    two.run("launch", "s1:busybox", "s1:e1", "-e", "-q")
    two.run("move", "s1:e1", "s2:", "--stateless", "-q")
    assert "e1" not in [n for n, _ in s1.instances()]
    assert ("e1", "Running") in s2.instances()
    assert s2.api("GET", "/1.0/instances/e1")["ephemeral"] is True  # ephemeral again once it runs there
    two.run("stop", "s2:e1", "--timeout", "20")
    assert "e1" not in [n for n, _ in s2.instances()]


def test_delete_force_of_a_running_ephemeral_instance(s1: Server, cli: Cli) -> None:
    cli.run("launch", "busybox", "e1", "-e", "-q")
    cli.run("delete", "e1", "--force")
    assert "e1" not in [n for n, _ in s1.instances()]
