"""Remove what a server's networks and VMs left on the host: its QEMU processes (by their pid files, each
checked to be that QEMU), its bridges and VM taps (found by their ifalias), the bridges' nftables tables and
dnsmasq processes (VM taps live only as long as their QEMU holds them; earlier versions made them
persistent). For `make demo` and the test harness, after the server stopped:

    python -m stapes.server.networks.cleanup STATE_DIR
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from stapes.server.instances.qemu import running_pid
from stapes.server.networks.bridge import is_our_dnsmasq


def _qemu_pid(pid_file: Path) -> int | None:
    """The QEMU running from the pid file's directory, if one still does: the process holding QEMU's lock on
    the file (the pid written in it is not trusted: it may have been reused), as qemu.running_pid checks."""
    return running_pid(pid_file.parent)


def kill_vms(state_dir: Path, timeout: float = 10.0) -> list[int]:
    """SIGKILL every QEMU the server's VMs run in (`<state>/qemu/*/qemu.pid`); returns their pids, once gone."""
    state_dir = state_dir.resolve()
    pids = [pid for pid_file in sorted((state_dir / "qemu").glob("*/qemu.pid"))
            if (pid := _qemu_pid(pid_file)) is not None]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid_file in sorted((state_dir / "qemu").glob("*/qemu.pid")):
        while _qemu_pid(pid_file) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    return pids


def cleanup(state_dir: Path) -> list[str]:
    """Returns the bridges removed (its VMs' QEMU processes and taps go too)."""
    kill_vms(state_dir)
    prefix = f"stapes:{state_dir.resolve()}:"
    removed = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            alias = link.get("IFLA_IFALIAS") or ""
            if alias.startswith(prefix):
                name = link.get("IFLA_IFNAME")
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=link["index"])
                if alias.startswith(f"{prefix}/tap/"):  # a VM's tap (bridge.tap_alias): no table of its own
                    continue
                subprocess.run(["nft", "-f", "-"], input=f"table inet stapes_{name}\ndelete table inet "
                               f"stapes_{name}\n".encode(), capture_output=True, check=False)
                removed.append(str(name))
    for pid_file in (state_dir / "networks").glob("*/dnsmasq.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            if is_our_dnsmasq(Path(f"/proc/{pid}/cmdline").read_bytes(), pid_file.parent):
                os.kill(pid, signal.SIGTERM)
    return removed


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stapes.server.networks.cleanup STATE_DIR")
    for bridge in cleanup(Path(sys.argv[1])):
        print(f"removed bridge {bridge}")
