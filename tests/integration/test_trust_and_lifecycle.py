"""The issue's own check: two servers, one client trusted on both with tokens, a container on one of them
that survives a restart of its server."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

from tests.integration.harness import Cli, Cluster, Server


def test_two_servers_tokens_launch_exec_list_restart(cluster: Cluster, s1: Server, s2: Server) -> None:
    cli = cluster.cli()
    cli.trust(s1, "s1")
    cli.trust(s2, "s2")
    remotes = cli.run("remote", "list", "--format", "csv").stdout
    assert f"s1,{s1.url}" in remotes and f"s2,{s2.url}" in remotes

    cli.run("launch", "s1:busybox", "c1", "-c", "limits.memory=64MiB", "-q")
    assert cli.run("exec", "s1:c1", "--", "cat", "/etc/hostname").stdout == "c1\n"

    listed = cli.json("list", "s1:")
    assert [(i["name"], i["status"]) for i in listed] == [("c1", "Running")]
    assert listed[0]["config"]["limits.memory"] == "64MiB"
    assert cli.json("list", "s2:") == []

    s1.stop()
    s1.start()
    after = cli.json("list", "s1:")
    assert [(i["name"], i["status"]) for i in after] == [("c1", "Running")]
    assert after[0]["config"]["limits.memory"] == "64MiB"
    assert cli.run("exec", "s1:c1", "--", "cat", "/etc/hostname").stdout == "c1\n"
    cli.run("delete", "s1:c1", "--force", "-q")
    assert cli.json("list", "s1:") == []


def test_stopped_instance_restarts_with_host_power_state(cluster: Cluster, s1: Server, cli: Cli) -> None:
    """A container that was running when its server went away (host reboot) is started again."""
    cli.run("launch", "s1:busybox", "web", "-q")
    s1.stop()
    s1.kill_containers()
    s1.start()
    assert cli.json("list", "s1:")[0]["status"] == "Running"
    cli.run("stop", "s1:web", "--force")
    s1.stop()
    s1.start()
    assert cli.json("list", "s1:")[0]["status"] == "Stopped"
    cli.run("delete", "s1:web")


def _get(url: str, context: ssl.SSLContext) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_untrusted_client_sees_only_server_info(cluster: Cluster, s1: Server) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    status, body = _get(f"{s1.url}/1.0", context)
    assert status == 200 and body["metadata"]["auth"] == "untrusted"  # type: ignore[index]
    assert "environment" not in body["metadata"]  # type: ignore[operator]
    status, body = _get(f"{s1.url}/1.0/instances", context)
    assert status == 403 and body["type"] == "error" and "not trusted" in str(body["error"])


def test_tokens_are_single_use_and_checked(cluster: Cluster, s1: Server) -> None:
    root = cluster.cli(s1)
    token = root.run("config", "trust", "add", "laptop").stdout.strip().splitlines()[-1]
    first = cluster.cli()
    first.run("remote", "add", "s1", s1.url, "--token", token)
    assert "laptop" in root.run("config", "trust", "list", "--format", "csv").stdout

    other = Cli(cluster.root / "other-client")
    err = other.fails("remote", "add", "s1", s1.url, "--token", token)
    assert "already used" in err
    assert other.fails("remote", "add", "s1", s1.url, "--token", "not-a-token")
    err = other.fails("list", "s1:")
    assert "does not exist" in err and "remote add" in err


def test_unreachable_server_and_revoked_trust(cluster: Cluster, s1: Server, cli: Cli) -> None:
    fingerprint = json.loads(cluster.cli(s1).run("config", "trust", "list", "--format", "json").stdout)[0]
    cluster.cli(s1).run("config", "trust", "remove", fingerprint["fingerprint"][:12])
    err = cli.fails("list", "s1:")
    assert "not trusted" in err
    s1.stop()
    err = cli.fails("list", "s1:")
    assert "Cannot reach" in err
    s1.start()
