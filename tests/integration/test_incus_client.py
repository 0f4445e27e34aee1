"""The official `incus` client (Debian's incus-client) drives a Stapes server: trust token, list, info,
launch from the built-in image, exec, stop, start, delete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration import counter
from tests.integration.harness import Cluster, Server

pytestmark = pytest.mark.skipif(shutil.which("incus") is None, reason="incus-client is not installed")


def incus(conf: Path, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, INCUS_CONF=str(conf), HOME=str(conf))
    result = subprocess.run(["incus", *args], env=env, capture_output=True, text=True, input=input, timeout=120,
                            check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"incus {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def test_incus_client_drives_stapes(cluster: Cluster, s1: Server) -> None:
    conf = cluster.root / "incus-client"
    conf.mkdir()
    token = cluster.cli(s1).run("config", "trust", "add", "incus-user").stdout.strip().splitlines()[-1]
    incus(conf, "remote", "add", "st", token)
    assert "st" in incus(conf, "remote", "list", "--format", "csv").stdout

    assert json.loads(incus(conf, "list", "st:", "--format", "json").stdout) == []
    incus(conf, "launch", "st:busybox", "st:c1")
    listed = json.loads(incus(conf, "list", "st:", "--format", "json").stdout)
    assert [(i["name"], i["status"]) for i in listed] == [("c1", "Running")]
    table = incus(conf, "list", "st:").stdout
    assert "| c1" in table and "RUNNING" in table

    assert incus(conf, "exec", "st:c1", "--", "cat", "/etc/hostname").stdout == "c1\n"
    result = incus(conf, "exec", "st:c1", "--", "sh", "-c", "cat; echo oops >&2; exit 5", input="piped\n",
                   check=False)
    assert (result.returncode, result.stdout) == (5, "piped\n")
    assert "oops" in result.stderr

    info = incus(conf, "info", "st:c1").stdout
    assert "Name: c1" in info and "Status: RUNNING" in info

    incus(conf, "stop", "st:c1", "--force")
    assert json.loads(incus(conf, "list", "st:", "--format", "json").stdout)[0]["status"] == "Stopped"
    incus(conf, "start", "st:c1")
    assert json.loads(incus(conf, "list", "st:", "--format", "json").stdout)[0]["status"] == "Running"
    incus(conf, "delete", "st:c1", "--force")
    assert json.loads(incus(conf, "list", "st:", "--format", "json").stdout) == []
    assert not (s1.state_dir / "storage-pools/default/containers/c1").exists()

    err = incus(conf, "exec", "st:nosuch", "--", "true", check=False)
    assert err.returncode != 0 and "not found" in err.stderr


@pytest.mark.parametrize("mode", ["pull", "push", "relay"])
def test_incus_client_moves_and_copies_between_stapes_servers(cluster: Cluster, s1: Server, s2: Server,
                                                              mode: str) -> None:
    conf = cluster.root / "incus-client"
    conf.mkdir()
    for server, remote in ((s1, "a"), (s2, "b")):
        token = cluster.cli(server).run("config", "trust", "add", f"incus-{remote}").stdout.strip().splitlines()[-1]
        incus(conf, "remote", "add", remote, token)
    incus(conf, "init", "a:busybox", "a:c1")
    incus(conf, "copy", "a:c1", "b:c1-copy", "--mode", mode)
    incus(conf, "move", "a:c1", "b:c1", "--mode", mode)
    assert json.loads(incus(conf, "list", "a:", "--format", "json").stdout) == []
    names = sorted(i["name"] for i in json.loads(incus(conf, "list", "b:", "--format", "json").stdout))
    assert names == ["c1", "c1-copy"]
    incus(conf, "start", "b:c1")
    assert incus(conf, "exec", "b:c1", "--", "cat", "/etc/hostname").stdout == "c1\n"
    # A running container: the official client asks for a live move, and its processes go on.
    seen, pid = counter.start(lambda command: incus(conf, "exec", "b:c1", "--", *command, check=False).stdout)
    incus(conf, "move", "b:c1", "a:c1", "--mode", mode)
    counter.assert_counting(lambda command: incus(conf, "exec", "a:c1", "--", *command, check=False).stdout,
                            seen, pid)
    assert json.loads(incus(conf, "list", "b:", "--format", "json").stdout)[0]["name"] == "c1-copy"
    incus(conf, "delete", "a:c1", "--force")
