"""The built-in tiny VM image (`busybox-vm`), built on the server from Debian packages, nothing else.

Incus's VM image format: a unified tarball of metadata.yaml and rootfs.img, a qcow2 disk: GPT with an EFI
system partition holding one unified kernel image as \\EFI\\BOOT\\BOOTX64.EFI (systemd-boot's EFI stub with
Debian's kernel, its command line and a busybox initramfs: OVMF boots it straight, no boot menu), and a small
ext4 data partition (label stapes-data). The kernel comes from Debian's `linux-image-amd64` (its dependency
linux-image-<version>-amd64, fetched with `apt-get download` into the cache and unpacked there, never
installed on the host); the initramfs holds busybox-static, the virtio modules from that package (inserted in
dependency order), the guest agent, and an init that brings eth0 up by DHCP, starts the agent, mounts the data
partition, powers off on the ACPI power button, and prints `heartbeat N` on the serial console every second.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import yaml

from stapes.api.errors import InternalError, PreconditionFailed
from stapes.server.images.agent import build_agent
from stapes.server.images.busybox import UDHCPC_SCRIPT, find_busybox
from stapes.server.images.store import ARCHITECTURE

RECIPE = "4"  # bump when anything below changes what is built
KERNEL_PACKAGE = "linux-image-amd64"
EFI_STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
CMDLINE = os.environ.get("STAPES_TINY_CMDLINE") or "console=ttyS0,115200 quiet loglevel=3 panic=5"
# What the guest needs of the kernel's modules (their dependencies come along, from the modules' own
# `depends`); missing ones (a kernel that builds them in) are skipped.
MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "virtio_net", "virtio_console", "virtio_rng",
           "crc32c_generic", "ext4", "evdev", "button")
ESP_MIB = 24
DATA_MIB = 16
DATA_LABEL = "stapes-data"
MIB = 1 << 20

INIT = """\
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
hostname -F /etc/hostname
ip link set lo up
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done
# Everything else in the background: the heartbeat starts at once.
(
    (while :; do /usr/sbin/stapes-agent >/dev/null 2>&1; sleep 1; done) &
    # The power button (ACPI: `stapes stop`) powers off; acpid opens the input devices it finds when it
    # starts, and the button's appears only once its module has probed.
    (i=0; while [ ! -e /dev/input/event1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
     acpid -c /etc/acpi -l /dev/null) &  # its default log, /var/log/acpid.log, cannot be made here
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
    [ -e /sys/class/net/eth0 ] && udhcpc -b -t 10 -T 1 -i eth0 -x "hostname:$(hostname)" >/dev/null 2>&1
    data=$(findfs LABEL=stapes-data 2>/dev/null)
    [ -n "$data" ] && mkdir -p /mnt/data && mount -t ext4 "$data" /mnt/data
) &
n=1
while :; do
    echo "heartbeat $n" > /dev/ttyS0
    n=$((n+1))
    sleep 1
done
"""

POWER_BUTTON = """\
#!/bin/sh
echo "power button: powering off" > /dev/ttyS0
umount /mnt/data 2>/dev/null
sync
poweroff -f
"""


def cache_dir() -> Path:
    from stapes.server.images.debian import cache_dir as shared
    return shared()


# -- the kernel --------------------------------------------------------------------------------------------

def _run(argv: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise PreconditionFailed(f"{argv[0]} is not installed: scripts/setup-vm.sh installs what the VM images "
                                 "need") from None
    except subprocess.TimeoutExpired:
        raise InternalError(f"{argv[0]} did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise InternalError(f"{' '.join(argv[:2])} failed: {lines[-1] if lines else result.returncode}")
    return result.stdout


def kernel_package_name(depends: str) -> str:
    """linux-image-amd64's dependency that holds the kernel (pure: unit-tested):
    'linux-image-6.1.0-57-amd64 (= 6.1.192-3)' -> 'linux-image-6.1.0-57-amd64'."""
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ")[0]
        if re.fullmatch(r"linux-image-\d[\w.+-]*", name) and not name.endswith("-unsigned"):
            return name
    raise InternalError(f"{KERNEL_PACKAGE} depends on no kernel package ({depends!r})")


def ensure_kernel(cache: Path) -> Path:
    """The unpacked kernel package (its boot/ and lib/modules/) in the cache. STAPES_KERNEL_DEB: a
    linux-image-*.deb to use instead of downloading one."""
    kernels = cache / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=kernels) as tmp:
        deb = os.environ.get("STAPES_KERNEL_DEB")
        if deb:
            package = Path(deb)
        else:
            existing = sorted(kernels.glob("linux-image-*/boot/vmlinuz-*"))
            if existing and time.time() - existing[-1].stat().st_mtime < 7 * 86400:
                return existing[-1].parents[1]
            _run(["apt-get", "download", KERNEL_PACKAGE], cwd=Path(tmp))
            meta = next(Path(tmp).glob(f"{KERNEL_PACKAGE}_*.deb"))
            name = kernel_package_name(_run(["dpkg-deb", "-f", str(meta), "Depends"]))
            _run(["apt-get", "download", name], cwd=Path(tmp))
            package = next(Path(tmp).glob(f"{name}_*.deb"))
        target = kernels / package.name.removesuffix(".deb")
        if (target / "boot").is_dir():
            os.utime(next(target.glob("boot/vmlinuz-*")))
            return target
        unpacked = Path(tmp) / "x"
        _run(["dpkg-deb", "-x", str(package), str(unpacked)])
        if not list(unpacked.glob("boot/vmlinuz-*")):
            raise InternalError(f"{package.name} holds no boot/vmlinuz-*")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(unpacked, target)
    return target


def _module_index(modules: Path) -> tuple[dict[str, Path], set[str]]:
    found = {path.name.split(".ko")[0].replace("-", "_"): path for path in modules.rglob("*.ko*")}
    builtin_file = modules / "modules.builtin"
    builtin = {Path(line.strip()).name.split(".ko")[0].replace("-", "_")
               for line in (builtin_file.read_text().splitlines() if builtin_file.exists() else [])}
    return found, builtin


def module_depends(ko: bytes) -> list[str]:
    """The `depends=` of a module's .modinfo (pure: unit-tested)."""
    at = ko.find(b"\0depends=")
    if at < 0:
        return []
    end = ko.find(b"\0", at + 9)
    return [d.replace("-", "_") for d in ko[at + 9:end].decode(errors="replace").split(",") if d]


def module_order(modules: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """The modules to insert, each after what it depends on; built-in ones left out."""
    found, builtin = _module_index(modules)
    order: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in builtin or name in order or name in trail or name not in found:
            return
        if found[name].suffix != ".ko":
            raise InternalError(f"{found[name].name}: compressed modules are not supported by the tiny image")
        for dep in module_depends(found[name].read_bytes()):
            visit(dep, (*trail, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return [(name, found[name]) for name in order]


# -- the initramfs (newc cpio, written here: no root, no device nodes on the host) ---------------------------

class Cpio:
    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.inode += 1
        header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self.out.write(header + name.encode() + b"\0")
        self.out.write(b"\0" * (-(len(header) + len(name) + 1) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def build_initramfs(kernel: Path, agent: Path) -> bytes:
    busybox = find_busybox()
    cpio = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/udhcpc", "etc/acpi", "etc/acpi/PWRF", "dev",
              "proc", "sys", "tmp", "run", "root", "mnt", "lib", "lib/modules"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            cpio.symlink(f"bin/{applet}", "busybox")
    cpio.file("init", INIT.encode(), 0o755)
    cpio.file("usr/sbin/stapes-agent", agent.read_bytes(), 0o755)
    cpio.file("etc/udhcpc/default.script", UDHCPC_SCRIPT.encode(), 0o755)
    cpio.file("etc/acpi/PWRF/00000080", POWER_BUTTON.encode(), 0o755)
    cpio.file("etc/hostname", b"busybox-vm\n")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/profile", b"export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n")
    modules_root = next((kernel / "lib/modules").iterdir())
    order = module_order(modules_root, MODULES)
    for name, path in order:
        cpio.file(f"lib/modules/{name}.ko", path.read_bytes())
    cpio.file("lib/modules/order", "".join(f"{name}\n" for name, _ in order).encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


# -- the UKI, the partitions, the disk ----------------------------------------------------------------------

def _section_end(stub: Path) -> int:
    """Where the stub's own sections end (objdump -h), so that the added ones go after them."""
    end = 0
    for line in _run(["objdump", "-h", str(stub)]).splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].isdigit():
            end = max(end, int(fields[3], 16) + int(fields[2], 16))
    return end


def build_uki(vmlinuz: Path, initrd: Path, work: Path, command_line: str | None = None) -> Path:
    if not EFI_STUB.exists():
        raise PreconditionFailed(f"{EFI_STUB} is missing: install systemd-boot-efi (scripts/setup-vm.sh)")
    cmdline = work / "cmdline"
    cmdline.write_text((command_line or CMDLINE) + "\0")
    osrel = work / "os-release"
    osrel.write_text('NAME="Stapes busybox VM"\nID=stapes-busybox\n')
    offset = (_section_end(EFI_STUB) + 0xFFFF) & ~0xFFFF
    argv = ["objcopy"]
    for section, path in ((".osrel", osrel), (".cmdline", cmdline), (".linux", vmlinuz), (".initrd", initrd)):
        argv += [f"--add-section={section}={path}", f"--change-section-vma={section}={offset:#x}"]
        offset = (offset + path.stat().st_size + 0xFFFF) & ~0xFFFF
    uki = work / "BOOTX64.EFI"
    _run([*argv, str(EFI_STUB), str(uki)])
    return uki


def build_esp(uki: Path, work: Path) -> Path:
    esp = work / "esp.img"
    size_mib = max(ESP_MIB, (uki.stat().st_size >> 20) + 4)
    _run(["mkfs.vfat", "-C", "-n", "STAPES-ESP", str(esp), str(size_mib * 1024)])
    _run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"])
    _run(["mcopy", "-i", str(esp), str(uki), "::/EFI/BOOT/BOOTX64.EFI"])
    return esp


def build_data(work: Path) -> Path:
    content = work / "data"
    content.mkdir()
    (content / "README").write_text("The data partition of Stapes's busybox-vm image, mounted at /mnt/data.\n")
    data = work / "data.img"
    _run(["mkfs.ext4", "-q", "-F", "-L", DATA_LABEL, "-E", "root_owner=0:0", "-d", str(content), str(data),
          f"{DATA_MIB}M"])
    return data


def assemble_disk(parts: list[tuple[Path, str]], disk: Path) -> None:
    """A GPT disk holding `parts` (image, sfdisk type) in order, 1 MiB aligned."""
    start = MIB
    layout = ["label: gpt"]
    placed = []
    for image, kind in parts:
        size = (image.stat().st_size + MIB - 1) // MIB * MIB
        layout.append(f"start={start // 512}, size={size // 512}, type={kind}")
        placed.append((image, start))
        start += size
    with disk.open("wb") as out:
        out.truncate(start + MIB)  # the backup GPT at the end
    subprocess.run(["sfdisk", "--quiet", str(disk)], input="\n".join(layout) + "\n", text=True, check=True,
                   capture_output=True)
    with disk.open("r+b") as out:
        for image, offset in placed:
            out.seek(offset)
            with image.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)


def _build(tarball: Path) -> None:
    """The image, from the cache when this recipe was built with this kernel and agent before (every server
    of the host, every daemon start, then only copies it)."""
    cache = cache_dir()
    kernel = ensure_kernel(cache)
    agent = build_agent(cache)
    cached = cache / f"busybox-vm-r{RECIPE}-{kernel.name}-{agent.name}-{find_busybox().stat().st_size}.tar"
    if cached.exists():
        shutil.copyfile(cached, tarball)
        return
    _build_into(kernel, agent, tarball)
    with tempfile.NamedTemporaryFile(dir=cache, prefix=".busybox-vm-", delete=False) as partial:
        shutil.copyfile(tarball, partial.name)
    os.replace(partial.name, cached)  # complete, then visible to other builds


def _build_into(kernel: Path, agent: Path, tarball: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="stapes-busybox-vm-", dir=tarball.parent) as tmp:
        work = Path(tmp)
        vmlinuz = next(kernel.glob("boot/vmlinuz-*"))
        initrd = work / "initrd.gz"
        initrd.write_bytes(build_initramfs(kernel, agent))
        uki = build_uki(vmlinuz, initrd, work)
        disk = work / "disk.raw"
        assemble_disk([(build_esp(uki, work), "U"), (build_data(work), "L")], disk)
        image = work / "image"
        image.mkdir()
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(disk), str(image / "rootfs.img")])
        metadata = {
            "architecture": ARCHITECTURE, "creation_date": int(time.time()),
            "properties": {"os": "busybox", "release": "vm", "variant": "tiny",
                           "description": f"BusyBox VM (Debian kernel {vmlinuz.name.removeprefix('vmlinuz-')}, "
                                          "built locally)"},
            "templates": {},
        }
        (image / "metadata.yaml").write_text(yaml.safe_dump(metadata))
        _run(["tar", "-cf", str(tarball), "--numeric-owner", "-C", str(image), "metadata.yaml", "rootfs.img"])


async def build_busybox_vm_image(tarball: Path) -> None:
    await asyncio.to_thread(_build, tarball)


def main() -> None:
    """`python -m stapes.server.images.busybox_vm`: the setup puts the tiny VM image into the host's cache, so
    that no server fetches a kernel package while it serves (and the first `launch busybox-vm` is quick)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".warm-", dir=cache_dir()) as tmp:
        _build(Path(tmp) / "image.tar")
    print(f"setup: the busybox-vm image is in {cache_dir()}")


if __name__ == "__main__":
    main()
