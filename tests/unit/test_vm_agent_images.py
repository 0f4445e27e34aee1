"""The VM image pieces that need no VM: the qcow2 checks, the kernel package's name, module dependencies and
the initramfs's cpio (pure); the image store's import and unpack of VM tarballs that unpack to more than they
are (sparse members, compression), and qemu-img's resource limits."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from stapes.api.errors import BadRequest
from stapes.server import process
from stapes.server.images import busybox_vm
from stapes.server.images import store as store_module
from stapes.server.images.store import MAX_DISK_SIZE, ImageStore, check_disk_info, convert_cpu_seconds
from stapes.server.store.db import ImageRow

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


# importing and unpacking VM images: what a tarball unpacks to is bounded

MIB = 1 << 20
needs_tools = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("zstd") is None,
                                 reason="needs qemu-img and zstd")


class FakeStore:
    def __init__(self) -> None:
        self.rows: list[ImageRow] = []

    async def images(self) -> list[ImageRow]:
        return list(self.rows)

    async def create_image(self, row: ImageRow) -> None:
        self.rows.append(row)


def _image_store(tmp_path: Path) -> ImageStore:
    directory = tmp_path / "images"
    directory.mkdir()
    return ImageStore(FakeStore(), directory)  # type: ignore[arg-type]


def _tree(root: Path, *, disk: bool = True) -> Path:
    root.mkdir()
    (root / "metadata.yaml").write_text("architecture: x86_64\nproperties:\n  os: test\n")
    (root / "templates").mkdir()
    (root / "templates" / "hostname.tpl").write_text("{{ container.name }}\n")
    if disk:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root / "rootfs.img"), "16M"], check=True)
    return root


def _tar(tarball: Path, root: Path, *names: str, options: tuple[str, ...] = ()) -> Path:
    subprocess.run(["tar", "-cf", str(tarball), *options, "-C", str(root), *names], check=True)
    return tarball


def _largest(directory: Path) -> int:
    return max((p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file()), default=0)


@needs_tools
async def test_a_sparse_disk_member_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    """A 10 KiB tarball whose GNU-sparse rootfs.img says 256 MiB: tar -xO would write every zero."""
    root = _tree(tmp_path / "t", disk=False)
    with open(root / "rootfs.img", "wb") as file:
        file.truncate(256 * MIB)
    upload = _tar(tmp_path / "sparse.tar", root, "metadata.yaml", "rootfs.img", options=("--sparse",))
    assert upload.stat().st_size < 64 << 10
    images = _image_store(tmp_path)
    with pytest.raises(BadRequest, match="sparse tar member"):
        await images.import_file(upload)
    assert _largest(images.directory) == 0 and not any(images.directory.iterdir())


@needs_tools
async def test_a_compressed_disk_is_held_to_a_bound_of_the_upload(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", disk=False)
    with open(root / "rootfs.img", "wb") as file:
        for _ in range(128):
            file.write(bytes(MIB))
    upload = _tar(tmp_path / "bomb.tar.zst", root, "metadata.yaml", "rootfs.img", options=("--zstd",))
    assert upload.stat().st_size < 64 << 10
    images = _image_store(tmp_path)
    with pytest.raises(BadRequest, match=f"unpacks to .* more than the {64 * MIB} accepted"):
        await images.import_file(upload)
    assert _largest(images.directory) <= 64 * MIB + MIB
    assert not any(images.directory.iterdir())


@needs_tools
@pytest.mark.parametrize(("member", "words"), [
    ("templates_big", "unpacks to more than"),  # a member no one takes, but tar would extract
    ("templates/big.tpl", "at most 1048576 are accepted"),
])
async def test_a_split_metadata_tarball_that_unpacks_to_more_is_refused(tmp_path: Path, member: str,
                                                                       words: str) -> None:
    """A 16 KiB .tar.zst of metadata.yaml and a 64 MiB member (or a template of 2 MiB)."""
    root = _tree(tmp_path / "t")
    with open(root / member, "wb") as file:
        file.write(bytes(64 * MIB if member == "templates_big" else 2 * MIB))
    upload = _tar(tmp_path / "meta.tar.zst", root, "metadata.yaml", "templates", "templates_big"
                  if member == "templates_big" else "metadata.yaml", options=("--zstd",))
    assert upload.stat().st_size < 64 << 10
    images = _image_store(tmp_path)
    disk = tmp_path / "rootfs.img"
    shutil.copy(root / "rootfs.img", disk)
    with pytest.raises(BadRequest, match=words):
        await images.import_file(upload, rootfs=disk)
    assert not any(images.directory.iterdir())


@needs_tools
async def test_a_template_that_is_a_link_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    (root / "templates" / "passwd.tpl").symlink_to("/etc/shadow")
    upload = _tar(tmp_path / "link.tar", root, "metadata.yaml", "templates", "rootfs.img")
    with pytest.raises(BadRequest, match="passwd.tpl.* not a regular file"):
        await _image_store(tmp_path).import_file(upload)


def _bomb_config(tarball: Path) -> None:
    """A metadata tarball as a pre-fix store may hold (a split image's was kept as uploaded): a templates*
    member that is no template, larger than any template may be."""
    with tarfile.open(tarball, "w") as tar:
        for name, size in (("metadata.yaml", 21), ("templates_big", 32 * MIB)):
            info = tarfile.TarInfo(name)
            info.size = size
            with open("/dev/zero", "rb") as zeros:
                tar.addfile(info, zeros)


@needs_tools
async def test_unpack_takes_only_metadata_and_templates(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    (root / "templates_extra").write_text("not a template\n")
    (root / "notes").mkdir()
    (root / "notes" / "x").write_text("x\n")
    upload = _tar(tmp_path / "vm.tar.gz", root, "metadata.yaml", "templates", "templates_extra", "notes",
                  "rootfs.img", options=("--gzip",))
    images = _image_store(tmp_path)
    row = await images.import_file(upload)
    assert row.type == "virtual-machine" and row.properties == {"os": "test"}
    with tarfile.open(images.path(row.fingerprint)) as kept:
        assert sorted(kept.getnames()) == ["metadata.yaml", "templates", "templates/hostname.tpl"]
    target = tmp_path / "volume"
    target.mkdir()
    await images.unpack(row.fingerprint, target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "metadata.yaml", "root.img", "templates", "templates/hostname.tpl"]
    assert (target / "root.img").stat().st_size == 16 * MIB
    # A metadata tarball stored before these checks is held to them when it is unpacked.
    fingerprint = "f" * 64
    _bomb_config(images.path(fingerprint))
    shutil.copy(root / "rootfs.img", images.disk_path(fingerprint))
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(BadRequest, match="could not be unpacked: .*unpacks to more than"):
        await images.unpack(fingerprint, other)
    assert not (other / "templates_big").exists()


@needs_tools
async def test_qemu_img_runs_under_resource_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As OpenStack's `prlimit --as=1G --cpu=30 qemu-img info` (OSSA-2016-012); convert under a CPU limit that
    fits a real 10 GiB image."""
    root = _tree(tmp_path / "t")
    ran: list[list[str]] = []
    real_run = process.run

    async def recording(argv: list[str], **kwargs: Any) -> process.Result:
        ran.append(list(argv))
        return await real_run(argv, **kwargs)

    monkeypatch.setattr(process, "run", recording)
    images = _image_store(tmp_path)
    row = await images.import_file(_tar(tmp_path / "vm.tar", root, "metadata.yaml", "templates", "rootfs.img"))
    target = tmp_path / "volume"
    target.mkdir()
    await images.unpack(row.fingerprint, target)
    info = [argv for argv in ran if "qemu-img" in argv and "info" in argv]
    convert = [argv for argv in ran if "qemu-img" in argv and "convert" in argv]
    assert info and convert
    for argv in info:
        assert argv[:4] == ["prlimit", "--cpu=30", f"--as={1 << 30}", "--"], argv
    for argv in convert:
        assert argv[0] == "prlimit" and argv[1].startswith("--cpu="), argv
    assert 300 <= convert_cpu_seconds(10 << 30) <= 3600  # fits a 10 GiB image's convert, bounds a hostile one
    # The limit is real: in 8 MiB of address space qemu-img cannot even start.
    monkeypatch.setattr(store_module, "INFO_ADDRESS_SPACE", 8 * MIB)
    with pytest.raises(BadRequest, match="not a readable qcow2"):
        await store_module.disk_info(images.disk_path(row.fingerprint))
