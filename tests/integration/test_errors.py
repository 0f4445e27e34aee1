"""Bad input: one clear line, a non-zero exit, the right HTTP status, and nothing changed on the server."""

from __future__ import annotations

import json
import subprocess

from tests.integration.harness import Cli, Server


def _snapshot(cli: Cli) -> list[tuple[str, str, dict[str, str]]]:
    return [(i["name"], i["status"], i["config"]) for i in cli.json("list")]


def test_refused_requests_change_nothing(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "c1", "-q")
    before = _snapshot(cli)

    cases = {
        ("launch", "busybox", "1abc"): "must not start with a digit",
        ("launch", "busybox", "bad_name"): "only letters, digits and hyphens",
        ("launch", "busybox", "a" * 64): "at most 63 characters",
        ("launch", "busybox", "c1"): "already exists",
        ("launch", "nosuchimage", "c2"): "Image 'nosuchimage' not found",
        ("launch", "busybox", "c2", "-c", "limits.bogus=1"): "Unknown instance configuration key 'limits.bogus'",
        ("launch", "busybox", "c2", "-c", "limits.memory=lots"): "is not a size",
        ("launch", "busybox", "c2", "-p", "nosuch"): "Profile 'nosuch' not found",
        ("launch", "busybox", "c2", "-s", "nosuch"): "Storage pool 'nosuch' not found",
        ("launch", "busybox", "c2", "--no-profiles"): "No root disk device",
        ("start", "nosuch"): "Instance 'nosuch' not found",
        ("stop", "c1"): "already stopped",
        ("exec", "c1", "--", "true"): "is not running",
        ("config", "set", "c1", "limits.cpu=zero"): "not a CPU count",
        ("config", "set", "core.https_address", "nonsense"): "is not an address",
        ("config", "set", "core.bogus", "1"): "Unknown server configuration key",
        ("list", "nosuchremote:"): "Remote 'nosuchremote' does not exist",
        ("profile", "delete", "default"): "cannot be deleted",
        ("project", "delete", "default"): "cannot be deleted",
        ("storage", "create", "p2", "zfs"): "Unknown storage driver 'zfs'",
        ("storage", "create", "p3", "dir", "rsync.bwlimit=fast"): "Invalid rsync.bwlimit",
        ("storage", "create", "p4", "dir", "compression=on"): "Unknown configuration for a dir pool",
    }
    for args, expected in cases.items():
        err = cli.fails(*args)
        assert expected in err, f"{args}: {err}"
        assert err.count("\n") == 1, f"{args}: the error should be one line: {err!r}"

    assert _snapshot(cli) == before
    assert [p["name"] for p in cli.json("profile", "list")] == ["default"]
    assert [p["name"] for p in cli.json("storage", "list")] == ["default"]
    # no volume or LXC directory was left by the refused creations
    assert sorted(p.name for p in (s1.state_dir / "containers").iterdir()) == ["c1"]
    assert sorted(p.name for p in (s1.state_dir / "storage-pools/default/containers").iterdir()) == ["c1"]


def test_http_status_codes(s1: Server, cli: Cli) -> None:
    def call(method: str, path: str, body: object = None) -> tuple[int, dict[str, object]]:
        args = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket", str(s1.state_dir / "unix.socket"),
                "-X", method, f"http://stapes{path}"]
        if body is not None:
            args += ["-d", json.dumps(body)]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        text, _, code = out.rpartition("\n")
        return int(code), json.loads(text)

    assert call("GET", "/1.0/instances/nosuch")[0] == 404
    code, body = call("POST", "/1.0/instances", {"name": "-x", "source": {"type": "image", "alias": "busybox"}})
    assert code == 400 and body["type"] == "error" and body["error_code"] == 400
    cli.run("init", "busybox", "c1", "-q")
    assert call("POST", "/1.0/instances", {"name": "c1", "source": {"type": "image", "alias": "busybox"}})[0] == 409
    assert call("GET", "/1.0/nosuch")[0] == 404
    code, body = call("PUT", "/1.0/instances/c1/state", {"action": "dance"})
    assert code == 400 and "Unknown action" in str(body["error"])
    code, body = call("POST", "/1.0/instances", {"name": "x", "config": {"limits.cpu": 2}})
    assert code == 400 and "Expected `str`" in str(body["error"]) and "$.config" in str(body["error"])
    assert [i["name"] for i in cli.json("list")] == ["c1"]


def test_failed_start_reports_lxc_error_and_keeps_instance(s1: Server, cli: Cli) -> None:
    cli.run("init", "busybox", "broken", "-c", "raw.lxc=lxc.init.cmd = /no/such/init", "-q")
    err = cli.fails("start", "broken")
    assert "Failed to start 'broken'" in err or "broken" in err
    assert cli.json("list")[0]["status"] == "Stopped"
    cli.run("delete", "broken")
