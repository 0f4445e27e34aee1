"""Virtual-machine images on a real server: the built-in tiny VM image, Incus's VM format imported unified
and split, its type shown, and hostile qcow2 disks (a backing file, an external data file, not qcow2 at all)
refused with nothing left behind."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.integration.harness import Cli, Server

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("sfdisk") is None,
                                reason="needs qemu-utils and fdisk (scripts/setup-vm.sh)")


def metadata_tarball(tmp: Path, name: str = "meta.tar", description: str = "test VM") -> Path:
    work = tmp / f"{name}.d"
    work.mkdir()
    (work / "metadata.yaml").write_text(yaml.safe_dump({
        "architecture": "x86_64", "creation_date": 1700000000, "properties": {"description": description}}))
    (work / "templates").mkdir()
    (work / "templates" / "hostname.tpl").write_text("{{ container.name }}\n")
    tarball = tmp / name
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(work), "metadata.yaml", "templates"], check=True)
    return tarball


def qcow2(path: Path, *options: str, size: str = "8M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), size], check=True)
    return path


def unified(tmp: Path, disk: Path, name: str = "vm.tar") -> Path:
    work = tmp / f"{name}.d"
    work.mkdir()
    (work / "metadata.yaml").write_text(yaml.safe_dump({"architecture": "x86_64", "properties": {"os": "t"}}))
    shutil.copy(disk, work / "rootfs.img")
    tarball = tmp / name
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(work), "metadata.yaml", "rootfs.img"], check=True)
    return tarball


def image_files(server: Server) -> set[str]:
    return {p.name for p in (server.state_dir / "images").iterdir()}


def images(cli: Cli) -> dict[str, dict]:
    return {i["fingerprint"]: i for i in cli.json("image", "list", "s1:")}


async def split_upload(server: Server, meta: Path, rootfs: Path) -> dict:
    """Incus's split upload, as its client sends it: multipart/form-data, 'metadata' then 'rootfs.img'."""
    form = aiohttp.FormData()
    form.add_field("metadata", meta.read_bytes(), filename=meta.name)
    form.add_field("rootfs.img", rootfs.read_bytes(), filename=rootfs.name)
    connector = aiohttp.UnixConnector(path=str(server.state_dir / "unix.socket"))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post("http://stapes/1.0/images", data=form) as response:
            op = await response.json()
        if op.get("type") == "error":
            return op
        async with session.get(f"http://stapes{op['operation']}/wait") as response:
            return await response.json()


def test_tiny_vm_image_builds_and_lists_as_a_virtual_machine(s1: Server, cli: Cli) -> None:
    cli.run("image", "build", "busybox", "--vm", "s1:", "-q", timeout=600)
    aliases = {a["name"]: a for a in s1.api("GET", "/1.0/images/aliases?recursion=1")}
    assert aliases["busybox-vm"]["type"] == "virtual-machine"
    row = images(cli)[aliases["busybox-vm"]["target"]]
    assert row["type"] == "virtual-machine" and "BusyBox VM" in row["properties"]["description"]
    assert "VIRTUAL-MACHINE" in cli.run("image", "list", "s1:").stdout
    fingerprint = row["fingerprint"]
    assert {fingerprint, f"{fingerprint}.rootfs"} <= image_files(s1)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2",
                                      str(s1.state_dir / "images" / f"{fingerprint}.rootfs")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    cli.run("image", "delete", "s1:busybox-vm")
    assert not {fingerprint, f"{fingerprint}.rootfs"} & image_files(s1)


def test_unified_and_split_vm_images_import(s1: Server, cli: Cli, tmp_path: Path) -> None:
    disk = qcow2(tmp_path / "disk.qcow2")
    cli.run("image", "import", str(unified(tmp_path, disk)), "s1:", "--alias", "uni", "-q")
    result = asyncio.run(split_upload(s1, metadata_tarball(tmp_path), disk))
    assert result.get("metadata", {}).get("status") == "Success", result
    split_fp = result["metadata"]["metadata"]["fingerprint"]
    rows = images(cli)
    assert {row["type"] for row in rows.values()} >= {"virtual-machine"}
    assert rows[split_fp]["type"] == "virtual-machine"
    assert rows[split_fp]["properties"]["description"] == "test VM"
    # A container image still imports as one.
    root = tmp_path / "ct"
    (root / "rootfs").mkdir(parents=True)
    (root / "metadata.yaml").write_text("architecture: x86_64\n")
    subprocess.run(["tar", "-cf", str(tmp_path / "ct.tar"), "-C", str(root), "metadata.yaml", "rootfs"], check=True)
    cli.run("image", "import", str(tmp_path / "ct.tar"), "s1:", "--alias", "ct", "-q")
    types = {a["name"]: a["type"] for a in s1.api("GET", "/1.0/images/aliases?recursion=1")}
    assert types["uni"] == "virtual-machine" and types["ct"] == "container"


def test_hostile_vm_disks_are_refused_with_nothing_left(s1: Server, cli: Cli, tmp_path: Path) -> None:
    before = image_files(s1)
    secret = tmp_path / "host-file"
    secret.write_bytes(b"host data" * 1000)
    cases = {
        "backing file": qcow2(tmp_path / "backed.qcow2", "-b", str(secret), "-F", "raw"),
        "external file": qcow2(tmp_path / "datafile.qcow2", "-o",
                               f"data_file={tmp_path / 'data.raw'},data_file_raw=on"),
        "not a readable qcow2": tmp_path / "raw.img",
    }
    (tmp_path / "raw.img").write_bytes(b"\0" * 65536)
    for n, (words, disk) in enumerate(cases.items()):
        error = cli.fails("image", "import", str(unified(tmp_path, disk, f"bad{n}.tar")), "s1:")
        assert words in error, error
        result = asyncio.run(split_upload(s1, metadata_tarball(tmp_path, f"meta{n}.tar"), disk))
        assert words in json.dumps(result), result
    huge = qcow2(tmp_path / "huge.qcow2", size="2T")
    assert "virtual size" in cli.fails("image", "import", str(unified(tmp_path, huge, "huge.tar")), "s1:")
    # Both kinds of root at once, and a split upload missing its disk.
    both = tmp_path / "both"
    (both / "rootfs").mkdir(parents=True)
    (both / "metadata.yaml").write_text("architecture: x86_64\n")
    shutil.copy(qcow2(tmp_path / "ok.qcow2"), both / "rootfs.img")
    subprocess.run(["tar", "-cf", str(tmp_path / "both.tar"), "-C", str(both), "metadata.yaml", "rootfs",
                    "rootfs.img"], check=True)
    assert "both" in cli.fails("image", "import", str(tmp_path / "both.tar"), "s1:")
    assert image_files(s1) == before
    assert secret.read_bytes() == b"host data" * 1000
