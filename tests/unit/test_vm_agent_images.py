"""The VM image pieces that need no VM: the qcow2 checks, the kernel package's name, module dependencies and
the initramfs's cpio (pure)."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from stapes.api.errors import BadRequest
from stapes.server.images import busybox_vm
from stapes.server.images.store import MAX_DISK_SIZE, check_disk_info

GOOD = {"format": "qcow2", "virtual-size": 1 << 30, "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}


def test_a_plain_qcow2_passes() -> None:
    assert check_disk_info(GOOD) == 1 << 30


@pytest.mark.parametrize(("change", "words"), [
    ({"format": "raw"}, "not a qcow2"),
    ({"backing-filename": "/etc/shadow"}, "backing file"),
    ({"full-backing-filename": "/etc/shadow"}, "backing file"),
    ({"format-specific": {"data": {"data-file": "/dev/sda"}}}, "external file"),
    ({"format-specific": {"data": {"encrypt": {"format": "luks"}}}}, "encrypted"),
    ({"encrypted": True}, "encrypted"),
    ({"format-specific": {"data": {"corrupt": True}}}, "corrupt"),
    ({"virtual-size": MAX_DISK_SIZE + 1}, "virtual size"),
    ({"virtual-size": True}, "virtual size"),
    ({"virtual-size": "big"}, "virtual size"),
])
def test_what_could_reach_beyond_the_file_is_refused(change: dict, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        check_disk_info({**GOOD, **change})


def test_kernel_package_name() -> None:
    assert busybox_vm.kernel_package_name("linux-image-6.1.0-57-amd64 (= 6.1.192-3)") == "linux-image-6.1.0-57-amd64"
    assert busybox_vm.kernel_package_name(
        "linux-image-6.12.38+deb13-amd64-unsigned (= 1) | linux-image-6.12.38+deb13-amd64 (= 1)"
    ) == "linux-image-6.12.38+deb13-amd64"


def test_module_depends() -> None:
    ko = b"\x7fELF....\0license=GPL\0depends=virtio,virtio_ring,net-failover\0name=virtio_net\0"
    assert busybox_vm.module_depends(ko) == ["virtio", "virtio_ring", "net_failover"]
    assert busybox_vm.module_depends(b"\0depends=\0name=x\0") == []
    assert busybox_vm.module_depends(b"no modinfo") == []


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio to read the archive back")
def test_cpio_reads_back(tmp_path: Path) -> None:
    archive = busybox_vm.Cpio()
    archive.directory("etc")
    archive.file("etc/hostname", b"x\n", 0o644)
    archive.file("init", b"#!/bin/sh\n", 0o755)
    archive.symlink("sh", "busybox")
    archive.chardev("console", 5, 1)
    listing = subprocess.run(["cpio", "-itv"], input=gzip.decompress(gzip.compress(archive.finish())),
                             capture_output=True, check=True).stdout.decode()
    assert "etc/hostname" in listing and "sh -> busybox" in listing and "5,   1" in listing
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--no-absolute-filenames", "--nonmatching", "console"], cwd=out,
                   input=archive.finish(), capture_output=True, check=True)
    assert (out / "etc/hostname").read_bytes() == b"x\n"
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
