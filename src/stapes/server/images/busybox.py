"""The built-in busybox container image, made from the host's busybox-static: no network needed."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from stapes.api.errors import PreconditionFailed
from stapes.server.images.store import ARCHITECTURE

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
DIRS = ("bin", "sbin", "etc", "etc/udhcpc", "proc", "sys", "dev", "tmp", "root", "run", "var/log", "usr/bin",
        "usr/sbin", "mnt")

INITTAB = """\
::sysinit:/bin/hostname -F /etc/hostname
::sysinit:/etc/rc.network
::respawn:/bin/sh -c 'exec sleep 2147483647'
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
"""


# Started by init: loopback up, and eth0 (if the container has one) configured by DHCP. udhcpc stays in the
# background to renew the lease; it sends the hostname, so the network's DNS knows the container by name.
RC_NETWORK = """\
#!/bin/sh
ip link set lo up
[ -e /sys/class/net/eth0 ] || exit 0
exec udhcpc -b -t 5 -T 1 -i eth0 -x "hostname:$(hostname)" >/dev/null 2>&1
"""

# What udhcpc runs on each DHCP event (Debian's busybox looks for it here): configure the address, the default
# route and the resolver. IPv6 comes from router advertisements (the kernel's autoconfiguration).
UDHCPC_SCRIPT = """\
#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    ;;
esac
exit 0
"""


def find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if candidate.exists():
            return candidate
    raise PreconditionFailed(
        "No static busybox on this host: install the busybox-static package (make install does it)"
    )


def _build(tarball: Path) -> None:
    busybox = find_busybox()
    with tempfile.TemporaryDirectory(prefix="stapes-busybox-", dir=tarball.parent) as tmp:
        root = Path(tmp) / "rootfs"
        for d in DIRS:
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "tmp").chmod(0o1777)
        shutil.copy2(busybox, root / "bin/busybox")
        applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            link = root / "bin" / applet
            if not link.exists():
                link.symlink_to("busybox")
        (root / "sbin/init").symlink_to("../bin/busybox")
        (root / "etc/inittab").write_text(INITTAB)
        (root / "etc/hostname").write_text("busybox\n")
        for path, text in (("etc/udhcpc/default.script", UDHCPC_SCRIPT), ("etc/rc.network", RC_NETWORK)):
            (root / path).write_text(text)
            (root / path).chmod(0o755)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        (root / "etc/profile").write_text("export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n")
        metadata = {
            "architecture": ARCHITECTURE,
            "creation_date": int(time.time()),
            "properties": {"os": "busybox", "description": "BusyBox (built locally from busybox-static)"},
            "templates": {},
        }
        (Path(tmp) / "metadata.yaml").write_text(yaml.safe_dump(metadata))
        subprocess.run(
            ["tar", "-czf", str(tarball), "--numeric-owner", "-C", tmp, "metadata.yaml", "rootfs"], check=True
        )


async def build_busybox_image(tarball: Path) -> None:
    await asyncio.to_thread(_build, tarball)
