"""Containers: exec streams, limits through cgroups, state changes, config edits, rename, logs."""

from __future__ import annotations

from pathlib import Path

from tests.integration.harness import Cli, Server


def _cgroup(s1: Server, controller: str, name: str, key: str) -> str:
    from stapes.server.paths import StatePaths

    server_id = StatePaths(s1.state_dir).server_id
    for base in (Path("/sys/fs/cgroup") / controller, Path("/sys/fs/cgroup")):
        path = base / f"stapes-{server_id}.payload.{name}" / key
        if path.exists():
            return path.read_text().strip()
    raise AssertionError(f"no cgroup file {key} for {name}")


def test_exec_streams_exit_code_env_cwd(s1: Server, cli: Cli) -> None:
    cli.run("launch", "busybox", "c1", "-q")
    out = cli.run("exec", "c1", "--", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (out.returncode, out.stdout, out.stderr) == (7, "out\n", "err\n")
    assert cli.run("exec", "c1", "--", "cat", input="line1\nline2\n").stdout == "line1\nline2\n"
    big = "x" * 300_000 + "\n"
    assert cli.run("exec", "c1", "--", "wc", "-c", input=big).stdout.split()[0] == str(len(big))
    out = cli.run("exec", "c1", "--env", "GREETING=hi there", "--cwd", "/tmp", "--", "sh", "-c",
                  'echo "$GREETING" "$(pwd)" "$HOME"')
    assert out.stdout == "hi there /tmp /root\n"
    assert cli.run("exec", "c1", "-n", "--", "cat").stdout == ""
    cli.run("config", "set", "c1", "environment.FROM_CONFIG=yes")
    assert cli.run("exec", "c1", "--", "sh", "-c", "echo $FROM_CONFIG").stdout == "yes\n"
    assert cli.run("exec", "c1", "--", "no-such-command", check=False).returncode == 127


def test_limits_applied_through_cgroups(s1: Server, cli: Cli) -> None:
    cli.run("launch", "busybox", "c1", "-c", "limits.memory=96MiB", "-c", "limits.cpu=1", "-c",
            "limits.processes=50", "-q")
    assert _cgroup(s1, "memory", "c1", "memory.limit_in_bytes") == str(96 * 2**20)
    assert _cgroup(s1, "cpuset", "c1", "cpuset.cpus") == "0"
    assert _cgroup(s1, "pids", "c1", "pids.max") == "50"
    cli.run("config", "set", "c1", "limits.memory=128MiB")
    cli.run("restart", "c1", "--force")
    assert _cgroup(s1, "memory", "c1", "memory.limit_in_bytes") == str(128 * 2**20)


def test_state_changes_and_clean_stop(s1: Server, cli: Cli) -> None:
    cli.run("launch", "busybox", "c1", "-q")
    cli.run("freeze", "c1")
    assert cli.json("list")[0]["status"] == "Frozen"
    cli.fails("start", "c1")
    cli.run("unfreeze", "c1")
    cli.run("stop", "c1", "--timeout", "20")  # busybox init halts cleanly on SIGUSR1
    assert cli.json("list")[0]["status"] == "Stopped"
    cli.run("start", "c1")
    cli.run("restart", "c1", "--force")
    assert cli.json("list")[0]["status"] == "Running"
    err = cli.fails("delete", "c1")
    assert "stop it first" in err
    cli.run("delete", "c1", "--force")
    assert cli.json("list") == []
    assert not (s1.state_dir / "storage-pools/default/containers/c1").exists()
    assert not (s1.state_dir / "containers/c1").exists()


def test_config_show_edit_unset_rename_info_logs(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-c", "user.note=hello", "-q")
    shown = cli.run("config", "show", "c1").stdout
    assert "user.note: hello" in shown
    edited = shown.replace("user.note: hello", "user.note: changed")
    cli.run("config", "edit", "c1", input=edited)
    assert cli.run("config", "get", "c1", "user.note").stdout == "changed\n"
    cli.run("config", "unset", "c1", "user.note")
    assert cli.run("config", "get", "c1", "user.note").stdout == "\n"
    assert "volatile.base_image" in cli.run("config", "show", "c1").stdout  # volatile keys survive edits
    cli.run("rename", "c1", "c2")
    cli.run("start", "c2")
    assert cli.run("exec", "c2", "--", "hostname").stdout == "c2\n"
    info = cli.run("info", "c2").stdout
    assert "Status: RUNNING" in info and "Processes:" in info
    assert "Log:" in cli.run("info", "c2", "--show-log").stdout
    cli.run("delete", "c2", "--force")


def test_server_config_https_address_change(s1: Server, cli: Cli) -> None:
    from tests.integration.harness import free_port

    port = free_port("127.0.0.1")
    local = Cli(cli.conf_dir.parent / "root-s1", s1)
    local.run("config", "set", "core.https_address", f"127.0.0.1:{port}")
    assert local.run("config", "get", "core.https_address").stdout.strip() == f"127.0.0.1:{port}"
    err = cli.fails("list", "s1:")  # the old address no longer answers
    assert "Cannot reach" in err
    local.run("config", "set", "core.https_address", s1.address)
    assert cli.json("list", "s1:") == []
