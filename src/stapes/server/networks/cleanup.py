"""Remove what a server's networks left on the host: its bridges (found by their ifalias), their nftables
tables and dnsmasq processes. For `make demo` and the test harness, after the server stopped:

    python -m stapes.server.networks.cleanup STATE_DIR
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from stapes.server.networks.bridge import is_our_dnsmasq


def cleanup(state_dir: Path) -> list[str]:
    """Returns the bridges removed."""
    prefix = f"stapes:{state_dir.resolve()}:"
    removed = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            alias = link.get("IFLA_IFALIAS") or ""
            if alias.startswith(prefix):
                name = link.get("IFLA_IFNAME")
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=link["index"])
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
