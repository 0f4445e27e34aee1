"""Every wait on a tool is bounded, and one stuck instance never takes the others down with it (issue 16,
defect 6): a container whose LXC monitor stops answering shows as Error, with the reason, in every listing."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.integration.harness import Cli, Server


def _monitor_of(server: Server, name: str) -> int:
    """The pid of the container's LXC monitor (its init's parent)."""
    info = subprocess.run(["lxc-info", "-P", str(server.state_dir / "containers"), "-n", name, "-p", "-H"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    init = int(info.strip())
    monitor = int(Path(f"/proc/{init}/stat").read_text().rpartition(")")[2].split()[1])
    assert "lxc monitor" in Path(f"/proc/{monitor}/cmdline").read_text(), monitor
    return monitor


def test_an_instance_whose_monitor_hangs_never_breaks_the_listing(s1: Server, cli: Cli) -> None:
    """A stopped (SIGSTOP) monitor accepts lxc-info's connection and never answers: lxc-info and lxc-ls hang
    on it. Listings (every recursion level) still answer, within a bound, with the others as they are."""
    for name in ("c1", "c2"):
        cli.run("launch", "s1:busybox", name, "-q")
    cli.run("init", "s1:busybox", "c3", "-q")
    monitor = _monitor_of(s1, "c1")  # the default project's containers keep their names in LXC
    os.kill(monitor, signal.SIGSTOP)
    try:
        for recursion in (1, 2):
            started = time.monotonic()
            listing = {i["name"]: i for i in s1.api("GET", f"/1.0/instances?recursion={recursion}")}
            assert time.monotonic() - started < 45
            assert {n: i["status"] for n, i in listing.items()} == {"c1": "Error", "c2": "Running",
                                                                   "c3": "Stopped"}, listing
            assert "did not answer" in listing["c1"]["status_error"], listing["c1"]
        state = s1.api("GET", "/1.0/instances/c1/state")
        assert state["status"] == "Error" and "monitor" in state["status_error"], state
        listed = cli.run("list", "s1:", "--format", "csv", timeout=90).stdout
        assert "c2" in listed and "c3" in listed, listed
    finally:
        os.kill(monitor, signal.SIGCONT)
    assert [i["status"] for i in cli.json("list", "s1:")] == ["Running", "Running", "Stopped"]
