"""Which accelerator virtual machines run with here: KVM only where a short probe boot proves it works,
TCG (QEMU's own translator) otherwise, with the reason kept for `GET /1.0` and `stapes info`.

Why a probe and not just /dev/kvm: a host may have /dev/kvm from a module that cannot run ordinary guests
(PVM, as on the machine this was written on: QEMU fails with "failed to set MSR 0x10a" or the guest
hangs). The probe starts QEMU as a VM would be started (`-accel kvm -cpu host`, q35), with a 64 KiB
firmware of its own whose reset vector writes one byte to an `isa-debug-exit` port, which makes QEMU exit
with status (byte << 1) | 1: that status within a few seconds, and the vCPU was set up and ran guest code.
Anything else (an error, a crash, a hang) and VMs use TCG.

Also here: whether QEMU is usable at all (the binary, its version, Debian's OVMF firmware).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stapes.server import process

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
OVMF_DIR = Path("/usr/share/OVMF")
OVMF_CODE = "OVMF_CODE_4M.fd"
OVMF_VARS = "OVMF_VARS_4M.fd"
PROBE_TIMEOUT = 5.0
PROBE_BYTE = 0x31
PROBE_EXIT = (PROBE_BYTE << 1) | 1  # isa-debug-exit's exit status for that byte: 99


@dataclass(frozen=True)
class QemuHost:
    """QEMU as this host has it; `refusal` says why VMs cannot run here (None: they can)."""

    binary: str | None
    firmware_code: Path
    firmware_vars: Path
    refusal: str | None = None


@dataclass(frozen=True)
class Accelerator:
    name: str  # "kvm", "tcg", or "" when QEMU is not usable
    reason: str
    qemu_version: str = ""  # "10.0.2"
    probe_seconds: float = 0.0
    machine_type: str = "q35"  # what the alias stands for in this QEMU ("pc-q35-10.0"), as VMs start with it
    machine_types: tuple[str, ...] = ()  # every versioned q35 type this QEMU builds (a live move's target)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "qemu_version": self.qemu_version}


def parse_version(text: str) -> str:
    """'QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2...)' -> '10.0.2' (pure)."""
    match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else ""


def find_qemu(firmware_dir: Path = OVMF_DIR) -> QemuHost:
    """Whether QEMU and the UEFI firmware are installed (a look at the file system only: no process)."""
    code, variables = firmware_dir / OVMF_CODE, firmware_dir / OVMF_VARS
    binary = shutil.which(QEMU_BINARY)
    if binary is None:
        return QemuHost(None, code, variables, f"QEMU is not installed ({QEMU_BINARY} is not on PATH: "
                        "scripts/setup-system.sh installs qemu-system-x86 and qemu-utils)")
    missing = [str(p) for p in (code, variables) if not p.is_file()]
    if missing:
        return QemuHost(binary, code, variables, f"the UEFI firmware is missing ({', '.join(missing)}): install "
                        "Debian's ovmf package")
    return QemuHost(binary, code, variables)


def parse_machine_types(text: str) -> tuple[str, tuple[str, ...]]:
    """`qemu-system-x86_64 -machine help` -> (the versioned type `q35` stands for, every `pc-q35-X.Y`) (pure).
    ("q35", ()) when the listing names no alias: the VM then starts as `q35`, as before."""
    current = re.search(r"^q35\s.*\(alias of (pc-q35-\d+\.\d+)\)", text, re.M)
    versioned = tuple(sorted(set(re.findall(r"^(pc-q35-\d+\.\d+)\s", text, re.M))))
    return (current.group(1) if current else "q35"), versioned


async def machine_types(binary: str) -> tuple[str, tuple[str, ...]]:
    """A VM starts with a versioned machine type, never the alias: the alias moves with each QEMU release,
    and a live move's stream fits only the same type on the target (Incus records it as
    volatile.vm.definition)."""
    try:
        result = await process.run([binary, "-machine", "help"], check=False, timeout=15)
    except TimeoutError:
        return "q35", ()
    return parse_machine_types(result.stdout.decode(errors="replace"))


async def qemu_version(binary: str) -> str:
    try:
        result = await process.run([binary, "--version"], check=False, timeout=15)
    except TimeoutError:
        return ""
    return parse_version(result.stdout.decode(errors="replace"))


def probe_firmware() -> bytes:
    """64 KiB of firmware (QEMU wants a multiple of 64 KiB) whose reset vector (the last 16 bytes, run in real
    mode at 0xfffffff0) does `mov al, 0x31; out 0xf4, al; hlt; jmp $-3`; the rest is `hlt`."""
    code = bytes([0xB0, PROBE_BYTE, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
    image = bytearray(b"\xf4" * 65536)
    image[0xFFF0:0xFFF0 + len(code)] = code
    return bytes(image)


def probe_argv(binary: str, firmware: Path) -> list[str]:
    return [binary, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "16", "-nodefaults",
            "-no-user-config", "-display", "none", "-bios", str(firmware),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]


def _kvm_refusal() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "this host has no /dev/kvm"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        return f"/dev/kvm cannot be opened ({err.strerror})"
    return None


def _first_error(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines
    return errors[0].removeprefix(f"{QEMU_BINARY}: ") if errors else ""


async def probe(host: QemuHost, workdir: Path, timeout: float = PROBE_TIMEOUT) -> Accelerator:
    """KVM when a probe boot under it ran guest code within `timeout`; TCG otherwise, saying why. `workdir`:
    root's own (the state directory), where the probe's firmware file goes."""
    if host.refusal is not None or host.binary is None:
        return Accelerator("", host.refusal or "QEMU is not usable")
    version = await qemu_version(host.binary)
    if not version:
        return Accelerator("", f"{host.binary} --version failed: QEMU is not usable")
    current, versioned = await machine_types(host.binary)
    refusal = await asyncio.to_thread(_kvm_refusal)
    if refusal is not None:
        return Accelerator("tcg", f"{refusal}: guests run under TCG (emulated, slower)", version,
                           machine_type=current, machine_types=versioned)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".kvm-probe-", dir=workdir) as directory:
        firmware = Path(directory) / "probe.bin"
        await asyncio.to_thread(firmware.write_bytes, probe_firmware())
        proc = await process.spawn(probe_argv(host.binary, firmware), stdin=asyncio.subprocess.DEVNULL,
                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        timed_out, stderr = False, b""
        try:
            async with process.reaped(proc):  # killed and reaped when it hangs
                _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            timed_out = True
    seconds = time.monotonic() - started
    if proc.returncode == PROBE_EXIT:
        return Accelerator("kvm", f"a probe boot under KVM ran guest code ({seconds:.2f}s)", version, seconds,
                           machine_type=current, machine_types=versioned)
    if timed_out:
        why = f"a probe boot under KVM did not finish within {timeout:.0f}s (KVM hangs here)"
    else:
        detail = _first_error(stderr) or f"exit status {proc.returncode}"
        why = f"a probe boot under KVM failed ({detail})"
    return Accelerator("tcg", f"{why}: guests run under TCG (emulated, slower)", version, seconds,
                       machine_type=current, machine_types=versioned)
