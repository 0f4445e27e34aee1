"""Debian virtual machine images (`stapes image build debian/12 --vm`), built on the server from the Debian
archive with mmdebstrap, in Incus's VM image format (metadata.yaml + a qcow2 rootfs.img).

The disk: GPT, an EFI system partition holding a unified kernel image (systemd-boot's EFI stub with the guest's
own kernel and initramfs, its command line `root=LABEL=stapes-root console=ttyS0 net.ifnames=0`) as
\\EFI\\BOOT\\BOOTX64.EFI, which OVMF boots straight; then the root filesystem (ext4 made with mkfs.ext4 -d: no
loop mount). systemd runs the guest, with a getty on the serial console (root has no password there), eth0 by
DHCP (ifupdown), and the Stapes guest agent as a unit. A kernel upgraded inside the guest is not put into the
ESP (the UKI keeps the kernel it was built with).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from stapes.server import process
from stapes.server.images.agent import build_agent
from stapes.server.images.busybox_vm import assemble_disk, build_uki
from stapes.server.images.debian import (
    DEFAULT_MIRROR,
    EXCLUDED,
    RELEASES,
    Progress,
    _run_reporting,
    cache_dir,
    cached_or_prepared,
    release_of,
)
from stapes.server.images.store import ARCHITECTURE

RECIPE = "1"
PACKAGES = ("linux-image-amd64", "systemd-sysv", "udev", "dbus", "ifupdown", "isc-dhcp-client", "iproute2",
            "iputils-ping", "netbase", "procps", "kmod", "e2fsprogs", "initramfs-tools")
CMDLINE = "root=LABEL=stapes-root rw console=ttyS0,115200 net.ifnames=0"
ROOT_LABEL = "stapes-root"
INITRAMFS_MODULES = "virtio_pci\nvirtio_blk\nvirtio_scsi\nsd_mod\nvirtio_net\nvirtio_console\next4\n"
AGENT_UNIT = """\
[Unit]
Description=Stapes guest agent (exec over virtio-serial)
After=local-fs.target

[Service]
ExecStart=/usr/local/sbin/stapes-agent
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""
INTERFACES = "auto lo\niface lo inet loopback\n\nallow-hotplug eth0\niface eth0 inet dhcp\n"
MIB = 1 << 20


def mmdebstrap_argv(release: str, target: Path, mirror: str) -> list[str]:
    """(pure) A small systemd system with a kernel; the initramfs holds only the virtio drivers."""
    modules = INITRAMFS_MODULES.replace("\n", "\\n")
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            # Before the kernel's postinst builds the initramfs: a small one (MODULES=list), with virtio.
            "--essential-hook=mkdir -p \"$1/etc/initramfs-tools/conf.d\" \"$1/usr/share/initramfs-tools/modules.d\"",
            "--essential-hook=echo MODULES=list > \"$1/etc/initramfs-tools/conf.d/stapes.conf\"",
            f"--essential-hook=printf '{modules}' > \"$1/usr/share/initramfs-tools/modules.d/stapes\""]
    argv += [f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDED]
    return [*argv, RELEASES[release], str(target), mirror]


def customise(root: Path, agent: Path, release: str) -> None:
    """What a Stapes VM needs beyond the packages. Blocking: run it in a thread."""
    shutil.copy2(agent, root / "usr/local/sbin/stapes-agent")
    (root / "etc/systemd/system/stapes-agent.service").write_text(AGENT_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "stapes-agent.service"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/systemd/system/stapes-agent.service")
    (root / "etc/network/interfaces").write_text(INTERFACES)
    (root / "etc/hostname").write_text("debian\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 debian\n::1 localhost ip6-localhost\n")
    (root / "etc/fstab").write_text(f"LABEL={ROOT_LABEL} / ext4 rw,discard,errors=remount-ro 0 1\n")
    shadow = root / "etc/shadow"
    lines = [":".join([f[0], "", *f[2:]]) if f[0] == "root" else ":".join(f)
             for f in (line.split(":") for line in shadow.read_text().splitlines())]
    shadow.write_text("\n".join(lines) + "\n")  # root logs in on the serial console without a password
    (root / "etc/machine-id").write_text("")  # each VM gets its own at first boot
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (root / leftover).glob("*"):
            if path.is_file():
                path.unlink()


def _tree_size(root: Path) -> int:
    total = 0
    for top, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


def _disk(root: Path, work: Path, agent: Path, release: str) -> Path:
    """Blocking: the UKI, the ESP, the root filesystem and the disk (raw)."""
    from stapes.server.images import busybox_vm

    customise(root, agent, release)
    vmlinuz = max(root.glob("boot/vmlinuz-*"))
    initrd = max(root.glob("boot/initrd.img-*"))
    uki = build_uki(vmlinuz, initrd, work, CMDLINE)
    esp = busybox_vm.build_esp(uki, work)
    size_mib = (_tree_size(root) * 3 // 2 + 256 * MIB) // MIB
    rootfs = work / "root.ext4"
    busybox_vm._run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(root), str(rootfs), f"{size_mib}M"],
                    timeout=1800)
    disk = work / "disk.raw"
    assemble_disk([(esp, "U"), (rootfs, "L")], disk)
    return disk


async def build_debian_vm_image(name: str, upload: Path, progress: Progress) -> None:
    """Write the unified VM image tarball of `name` (debian/12, debian/13) to `upload`, from the cache if fresh."""
    release = release_of(name)
    cache = cache_dir()
    cached = cache / f"debian-{release}-vm-{ARCHITECTURE}-r{RECIPE}.tar"
    if await cached_or_prepared(cached, upload, progress):
        return
    agent = await asyncio.to_thread(build_agent, cache)
    with tempfile.TemporaryDirectory(prefix="stapes-debian-vm-", dir=cache) as tmp:
        os.chmod(tmp, 0o755)
        work = Path(tmp)
        root = work / "rootfs"
        mirror = os.environ.get("STAPES_DEBIAN_MIRROR") or DEFAULT_MIRROR
        await _run_reporting(mmdebstrap_argv(release, root, mirror), progress)
        progress("making the disk (EFI system partition, root filesystem)")
        disk = await asyncio.to_thread(_disk, root, work, agent, release)
        image = work / "image"
        image.mkdir()
        progress("converting the disk to qcow2")
        await process.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(disk),
                           str(image / "rootfs.img")], timeout=1800)
        metadata = {
            "architecture": ARCHITECTURE, "creation_date": int(time.time()),
            "properties": {"os": "debian", "release": RELEASES[release], "version": release, "init": "systemd",
                           "description": f"Debian {release} ({RELEASES[release]}) virtual machine, built by Stapes"},
            "templates": {},
        }
        (image / "metadata.yaml").write_text(yaml.safe_dump(metadata))
        packed = work / "image.tar"
        await process.run(["tar", "-cf", str(packed), "--numeric-owner", "-C", str(image), "metadata.yaml",
                           "rootfs.img"], timeout=1800)
        await asyncio.to_thread(shutil.copyfile, packed, upload)
        await asyncio.to_thread(os.replace, packed, cached)
