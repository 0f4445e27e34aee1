"""What the target checks of a checkpoint from a peer, before CRIU restores it as root: images recorded from
real dumps of a busybox container (unprivileged and privileged, tests/unit/data/criu) pass; the same images
changed with CRIU's own image library (pycriu) to name host resources are refused; and the checkpoint's tar
is refused member by member before anything but a regular file exists on disk."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from stapes.api.errors import BadRequest, InternalError
from stapes.server.instances import criu_images as ci
from stapes.server.instances.driver import StateFiles
from stapes.server.instances.lxc import config_lines, device_rules, external_mount_keys
from stapes.server.migration.statefiles import StateBudget, receive_state_files

DATA = Path(__file__).parent / "data/criu"
KEYS = {"sys/fs/fuse/connections"}  # what liblxc's common.conf binds (the one external mount in these dumps)
PAGES = {"unprivileged": 73728, "privileged": 77824}  # pages-1.img's size in each dump

try:
    pycriu = ci._pycriu()
except InternalError as err:  # pragma: no cover - a machine without make install
    pytest.skip(str(err), allow_module_level=True)


def _checkpoint(tmp_path: Path, kind: str = "unprivileged") -> Path:
    """A final checkpoint directory made of the recorded images, with a pages file of the size they map."""
    final = tmp_path / "state/final"
    shutil.copytree(DATA / kind, final)
    for name in os.listdir(final):
        os.chmod(final / name, 0o600)
    with (final / "pages-1.img").open("wb") as pages:
        pages.truncate(PAGES[kind])
    if kind == "unprivileged":
        with (final / "pages-2.img").open("wb") as pages:
            pages.truncate(69632)
    return tmp_path / "state"


def _allowed(kind: str = "unprivileged", rootfs: Path = Path("/nonexistent")) -> ci.Allowed:
    return ci.Allowed(external_keys=KEYS, privileged=kind == "privileged", rootfs=rootfs)


def _change(path: Path, edit: Callable[[list[dict[str, Any]]], None]) -> None:
    """Decode an image with pycriu, change its entries, encode it again with pycriu."""
    with path.open("rb") as image:
        decoded = pycriu.images.load(image, pretty=True)
    edit(decoded["entries"])
    with path.open("wb") as image:
        pycriu.images.dump(decoded, image)


def _refused(state: Path, kind: str = "unprivileged", rootfs: Path = Path("/nonexistent")) -> str:
    with pytest.raises(BadRequest) as caught:
        ci.check_checkpoint(state, _allowed(kind, rootfs), ci.IMAGE_NAMES)
    assert caught.value.message.startswith("The source's checkpoint ") and caught.value.message.endswith(
        ": refused"), caught.value.message
    return caught.value.message


@pytest.mark.parametrize("kind", ["unprivileged", "privileged"])
def test_real_dumps_pass(tmp_path: Path, kind: str) -> None:
    ci.check_checkpoint(_checkpoint(tmp_path, kind), _allowed(kind), ci.IMAGE_NAMES)


def test_image_names_are_criu_s_own() -> None:
    for name in ("core-1.img", "pages-12.img", "pagemap-7.img", "mountpoints-13.img", "tmpfs-dev-40.tar.gz.img",
                 "ghost-file-1f.img", "stats-dump", "dump.log", "pre-dump.log", "files.img", "lxc-dump.out"):
        assert ci.IMAGE_NAMES.fullmatch(name), name
    for name in ("passwd", "pages-1.img.x", "../pages-1.img", "restore.log", "criu-restore.conf", "parent",
                 "pages-a.img", "core-1"):
        assert not ci.IMAGE_NAMES.fullmatch(name), name


def _mounts(state: Path) -> Path:
    return state / "final/mountpoints-13.img"


def _mount(entries: list[dict[str, Any]], mountpoint: str) -> dict[str, Any]:
    return next(e for e in entries if e["mountpoint"] == mountpoint)


def test_an_autodetected_external_mount_of_a_host_path_is_refused(tmp_path: Path) -> None:
    """--ext-mount-map auto binds an autodetected external mount from the host path in its source."""
    state = _checkpoint(tmp_path)

    def host_etc(entries: list[dict[str, Any]]) -> None:
        null = _mount(entries, "/dev/null")
        null["source"], null["mountpoint"], null["root"] = "/etc", "/mnt", "/"
        null["parent_mnt_id"] = _mount(entries, "/")["mnt_id"]

    _change(_mounts(state), host_etc)
    assert "binds the host's '/etc' on '/mnt'" in _refused(state)


def test_an_autodetected_device_bind_is_refused_in_a_privileged_container(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path, "privileged")
    unprivileged = pycriu.images.load((DATA / "unprivileged/mountpoints-13.img").open("rb"), pretty=True)
    null = _mount(unprivileged["entries"], "/dev/null")

    def add_null(entries: list[dict[str, Any]]) -> None:
        null["parent_mnt_id"] = _mount(entries, "/dev")["mnt_id"]
        entries.insert(0, null)

    _change(_mounts(state), add_null)
    assert "binds the host's '/dev/null'" in _refused(state, "privileged")


def test_an_external_mount_the_target_does_not_map_is_refused(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path)
    _change(_mounts(state), lambda entries: _mount(entries, "/sys/fs/fuse/connections").update(ext_key="etc"))
    assert "external mount 'etc'" in _refused(state)


@pytest.mark.parametrize("kind", ["unprivileged", "privileged"])
def test_a_block_device_mount_is_refused(tmp_path: Path, kind: str) -> None:
    """A host disk mounted by name (CRIU's AUTO type) or as a filesystem CRIU does not know."""
    state = _checkpoint(tmp_path, kind)

    def ext4(entries: list[dict[str, Any]]) -> None:
        tmpfs = _mount(entries, "/sys/fs/cgroup")
        tmpfs.update(fstype=pycriu.images.pb.fstype.Value("AUTO"), fsname="ext4", source="/dev/loop0")

    _change(_mounts(state), ext4)
    assert "mounts a 'ext4' filesystem on '/sys/fs/cgroup'" in _refused(state, kind)
    shutil.rmtree(tmp_path / "state")
    state = _checkpoint(tmp_path, kind)
    _change(_mounts(state), lambda entries: _mount(entries, "/dev").update(
        fstype=pycriu.images.pb.fstype.Value("DEVTMPFS"), source="devtmpfs"))
    assert "mounts a DEVTMPFS filesystem" in _refused(state, kind)


def test_a_known_filesystem_from_a_block_device_is_refused(tmp_path: Path) -> None:
    if not os.path.exists("/dev/loop0") or not stat.S_ISBLK(os.stat("/dev/loop0").st_mode):
        pytest.skip("no /dev/loop0 here")
    state = _checkpoint(tmp_path, "privileged")
    _change(_mounts(state), lambda entries: _mount(entries, "/sys/fs/cgroup").update(source="/dev/loop0"))
    assert "mounts the block device '/dev/loop0'" in _refused(state, "privileged")


@pytest.mark.parametrize(("field", "value"), [("mountpoint", "/../../etc"), ("root", "/../.."),
                                               ("mountpoint", "relative")])
def test_mount_paths_with_dot_dot_are_refused(tmp_path: Path, field: str, value: str) -> None:
    state = _checkpoint(tmp_path)
    _change(_mounts(state), lambda entries: _mount(entries, "/sys/fs/cgroup").update({field: value}))
    assert "which is not a plain absolute path" in _refused(state)


def test_a_mount_outside_its_parent_is_refused(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path)
    _change(_mounts(state), lambda entries: _mount(entries, "/dev/pts").update(mountpoint="/etc"))
    assert "mounts on '/etc', which is not below its parent mount '/dev'" in _refused(state)


def test_a_bind_of_the_root_filesystem_outside_the_container_s_root_is_refused(tmp_path: Path) -> None:
    """A bind of the root's filesystem must lie below the container's root in it."""
    state = _checkpoint(tmp_path)

    def bind_etc(entries: list[dict[str, Any]]) -> None:
        root, tmpfs = _mount(entries, "/"), _mount(entries, "/sys/fs/cgroup")
        tmpfs.update(fstype=root["fstype"], root_dev=root["root_dev"], source=root["source"], root="/etc")

    _change(_mounts(state), bind_etc)
    assert "mounts a UNSUPPORTED filesystem" in _refused(state)


def test_a_second_root_is_refused(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path)
    _change(_mounts(state), lambda entries: _mount(entries, "/proc").update(parent_mnt_id=999))
    assert "without one root" in _refused(state)


def test_a_mount_through_a_symlink_in_the_root_is_refused(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "proc").symlink_to("/etc")
    state = _checkpoint(tmp_path)
    assert "passes through a symlink" in _refused(state, rootfs=rootfs)


def _dev_tmpfs(state: Path, *members: tarfile.TarInfo, drop: str = "") -> None:
    """The /dev tmpfs's contents (tmpfs-dev-40.tar.gz.img) with crafted members added (and one dropped)."""
    image = state / "final/tmpfs-dev-40.tar.gz.img"
    out = io.BytesIO()
    with tarfile.open(image, "r:gz") as source, tarfile.open(fileobj=out, mode="w:gz") as tar:
        for member in source:
            if member.name != drop:
                tar.addfile(member, source.extractfile(member) if member.isreg() else None)
        for member in members:
            tar.addfile(member)
    image.write_bytes(out.getvalue())


def _node(name: str, kind: bytes, major: int = 0, minor: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.linkname, info.mode = kind, major, minor, linkname, 0o666
    return info


@pytest.mark.parametrize("kind", ["unprivileged", "privileged"])
def test_a_block_device_in_a_tmpfs_is_refused(tmp_path: Path, kind: str) -> None:
    """CRIU unpacks a tmpfs's contents with GNU tar, as root: device nodes included."""
    state = _checkpoint(tmp_path, kind)
    _dev_tmpfs(state, _node("./loop0", tarfile.BLKTYPE, 7, 0))
    message = ci.Allowed(external_keys=KEYS, privileged=kind == "privileged", rootfs=Path("/nonexistent"),
                         device_rules=PRIVILEGED_RULES if kind == "privileged" else None)
    with pytest.raises(BadRequest) as caught:
        ci.check_checkpoint(state, message, ci.IMAGE_NAMES)
    assert "makes the device 7:0 ('./loop0') in the tmpfs on '/dev'" in caught.value.message


def test_the_privileged_dev_s_own_nodes_pass(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path, "privileged")  # /dev/null, zero, ... as real nodes: LXC's autodev
    ci.check_checkpoint(state, ci.Allowed(external_keys=KEYS, privileged=True, rootfs=Path("/nonexistent"),
                                          device_rules=PRIVILEGED_RULES), ci.IMAGE_NAMES)
    _dev_tmpfs(state, _node("./mem", tarfile.CHRTYPE, 1, 1))  # /dev/mem: not granted
    assert "makes the device 1:1" in _cgroups_refused(state)


def test_a_mount_through_a_symlink_in_a_tmpfs_is_refused(tmp_path: Path) -> None:
    """/dev/pts is mounted after /dev's contents: a link there would lead the mount out of the container."""
    state = _checkpoint(tmp_path)
    _dev_tmpfs(state, _node("./pts", tarfile.SYMTYPE, linkname="/etc"), drop="./pts")
    assert "mounts on '/dev/pts', which passes through a symlink in the tmpfs on '/dev'" in _refused(state)


@pytest.mark.parametrize(("member", "said"), [
    (_node("../../etc/x", tarfile.REGTYPE), "unpacks '../../etc/x'"),
    (_node("./x", tarfile.LNKTYPE, linkname="/etc/shadow"), "links './x' to '/etc/shadow'"),
])
def test_tmpfs_contents_that_leave_it_are_refused(tmp_path: Path, member: tarfile.TarInfo, said: str) -> None:
    state = _checkpoint(tmp_path)
    _dev_tmpfs(state, member)
    assert said in _refused(state)


def _files(state: Path) -> Path:
    return state / "final/files.img"


@pytest.mark.parametrize("name", ["/../../etc/shadow", "etc/shadow", "/bin/../../../etc/shadow"])
def test_open_file_paths_that_leave_the_root_are_refused(tmp_path: Path, name: str) -> None:
    state = _checkpoint(tmp_path)
    _change(_files(state), lambda entries: entries[0]["reg"].update(name=name))
    assert f"names an open file {name!r}" in _refused(state)


def test_an_open_file_on_a_mount_the_container_lacks_is_refused(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path)
    _change(_files(state), lambda entries: entries[0]["reg"].update(mnt_id=4242))
    assert "on mount 4242" in _refused(state)


def test_a_page_map_larger_than_its_pages_is_refused(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path)
    _change(state / "final/pagemap-1.img", lambda entries: entries[1].update(nr_pages=1 << 20))
    assert "pages from pages-1.img" in _refused(state)


def test_pages_in_a_parent_round_without_one_are_refused(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path)
    _change(state / "final/pagemap-1.img", lambda entries: entries[1].update(flags="PE_PARENT"))
    assert "parent round" in _refused(state)


def test_a_page_map_without_its_pages_is_refused(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path)
    (state / "final/pages-1.img").unlink()
    assert "lacks" in _refused(state)


def test_a_broken_image_is_refused(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path)
    (state / "final/files.img").write_bytes(b"\x00" * 40)
    assert "an image CRIU cannot read" in _refused(state)


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need root")
@pytest.mark.parametrize("kind", ["device", "fifo", "hard link", "symlink", "name"])
def test_the_layout_holds_regular_files_with_criu_s_names_only(tmp_path: Path, kind: str) -> None:
    state = _checkpoint(tmp_path)
    final = state / "final"
    os.unlink(final / "pages-2.img")
    if kind == "device":
        os.mknod(final / "pages-2.img", 0o644 | stat.S_IFBLK, os.makedev(7, 0))
    elif kind == "fifo":
        os.mkfifo(final / "pages-2.img")
    elif kind == "hard link":
        os.link(final / "pages-1.img", final / "pages-2.img")
    elif kind == "symlink":
        os.symlink("/dev/loop0", final / "pages-2.img")
    else:
        (final / "passwd").write_text("x")
    _refused(state)


def test_external_mount_keys_follow_lxc_s_includes(tmp_path: Path) -> None:
    (tmp_path / "inc.d").mkdir()
    (tmp_path / "inc.d/a.conf").write_text("lxc.mount.entry = /x y/z none bind,optional 0 0\n")
    text = (f"lxc.include = {tmp_path / 'inc.d'}\n"
            "lxc.mount.entry = /srv/a\\040b mnt/a\\040b none bind,create=dir 0 0  # device d\n"
            "lxc.mount.entry = proc proc proc nodev 0 0\n")
    assert external_mount_keys(config_lines(text)) == {"y/z", "mnt/a b"}


def test_device_rules_follow_lxc_s_resets(tmp_path: Path) -> None:
    common = ("lxc.cgroup.devices.deny = a\nlxc.cgroup.devices.allow = c 1:3 rwm\n"
              "lxc.cgroup.devices.allow = b *:*  m\n")
    assert device_rules(config_lines(common)) == {"c 1:3 rwm", "b *:* m"}
    assert device_rules(config_lines(common + "lxc.cgroup.devices.deny =\nlxc.cgroup.devices.allow =\n")) is None


PRIVILEGED_RULES = {"c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 5:0 rwm", "c 5:1 rwm",
                    "c 5:2 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 136:* rwm", "c 10:229 rwm"}  # LXC's common.conf


def _cgroup(entries: list[dict[str, Any]], controller: str) -> dict[str, Any]:
    return next(c for c in entries[0]["controllers"] if c["cnames"] == [controller])["dirs"][0]


def _cgroups_refused(state: Path, **limits: Any) -> str:
    allowed = ci.Allowed(external_keys=KEYS, privileged=True, rootfs=Path("/nonexistent"),
                         device_rules=PRIVILEGED_RULES, **limits)
    with pytest.raises(BadRequest) as caught:
        ci.check_checkpoint(state, allowed, ci.IMAGE_NAMES)
    return caught.value.message


def test_the_recorded_cgroups_pass_with_the_target_s_own_rules(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path, "privileged")
    ci.check_checkpoint(state, ci.Allowed(external_keys=KEYS, privileged=True, rootfs=Path("/nonexistent"),
                                          device_rules=PRIVILEGED_RULES), ci.IMAGE_NAMES)


def test_a_cgroup_image_that_allows_a_host_disk_is_refused(tmp_path: Path) -> None:
    """liblxc restores with --manage-cgroups=full: CRIU would write the image's devices list."""
    state = _checkpoint(tmp_path, "privileged")

    def allow_loop(entries: list[dict[str, Any]]) -> None:
        prop = next(p for p in _cgroup(entries, "devices")["properties"] if p["name"] == "devices.list")
        prop["value"] += "\nb 7:* rwm"

    _change(state / "final/cgroup.img", allow_loop)
    assert "allows the container the devices b 7:* rwm" in _cgroups_refused(state)


def test_a_cgroup_image_that_lifts_the_memory_limit_is_refused(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path, "privileged")  # recorded without a limit: the image says unlimited
    assert "raises the container's memory.limit_in_bytes" in _cgroups_refused(state, memory_limit=64 << 20)
    assert "raises the container's pids.max to max" in _cgroups_refused(state, processes_limit=100)


@pytest.mark.parametrize("name", ["../../release_agent", "cgroup.procs/../../x"])
def test_a_cgroup_property_that_is_a_path_is_refused(tmp_path: Path, name: str) -> None:
    """CRIU writes <cgroup>/<name>: a path would reach the host's cgroup files (release_agent runs as root)."""
    state = _checkpoint(tmp_path, "privileged")
    _change(state / "final/cgroup.img",
            lambda entries: _cgroup(entries, "pids")["properties"].append({"name": name, "value": "/tmp/x"}))
    assert f"sets a cgroup property {name!r}" in _cgroups_refused(state)


def test_a_cgroup_path_with_dot_dot_is_refused(tmp_path: Path) -> None:
    state = _checkpoint(tmp_path, "privileged")
    _change(state / "final/cgroup.img", lambda entries: entries[0]["sets"][0]["ctls"][0].update(path="/../.."))
    assert "names a cgroup '/../..'" in _cgroups_refused(state)
    state = _checkpoint(tmp_path / "again", "privileged")
    _change(state / "final/cgroup.img", lambda entries: _cgroup(entries, "pids").update(dir_name=".."))
    assert "holds a cgroup named '..'" in _cgroups_refused(state)


# The checkpoint's tar, member by member

class _Channel:
    def __init__(self, data: bytes, chunk: int = 65536) -> None:
        self.data = data
        self.chunk = chunk
        self.read = 0

    async def stream(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), self.chunk):
            self.read = start + self.chunk
            yield self.data[start:start + self.chunk]


FILES = StateFiles(re.compile(r"[a-z]+-[0-9]+\.img"), 0o600)


def _tar(*members: tuple[str, bytes | str | None, bytes]) -> bytes:
    """(name, type, data) members: type b"0" a file, else a link target or a device."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o4755
            if kind == b"0":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = kind if isinstance(kind, bytes) else tarfile.SYMTYPE
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = data.decode()
            info.devmajor, info.devminor = 7, 0
            tar.addfile(info)
    return out.getvalue()


async def _receive(tmp_path: Path, data: bytes, per_round: int = 1 << 20, links: set[str] | None = None) -> Path:
    directory = tmp_path / "final"
    directory.mkdir(exist_ok=True)
    await receive_state_files(directory, _Channel(data), FILES,  # type: ignore[arg-type]
                              StateBudget(tmp_path, per_round, 2 * per_round), links or set())
    return directory


async def test_regular_files_are_received_with_the_driver_s_mode(tmp_path: Path) -> None:
    directory = await _receive(tmp_path, _tar(("./", tarfile.DIRTYPE, b""), ("./core-1.img", b"0", b"abc"),
                                              ("./parent", tarfile.SYMTYPE, b"../predump-1")), links={"../predump-1"})
    assert (directory / "core-1.img").read_bytes() == b"abc"
    assert stat.S_IMODE((directory / "core-1.img").stat().st_mode) == 0o600  # not the tar's set-id 4755
    assert os.readlink(directory / "parent") == "../predump-1"


@pytest.mark.parametrize(("member", "said"), [
    (("pages-1.img", tarfile.BLKTYPE, b""), "a block device"),
    (("pages-1.img", tarfile.CHRTYPE, b""), "a character device"),
    (("pages-1.img", tarfile.FIFOTYPE, b""), "a FIFO"),
    (("pages-1.img", tarfile.LNKTYPE, b"core-1.img"), "a hard link"),
    (("pages-1.img", tarfile.SYMTYPE, b"/dev/loop0"), "a symbolic link"),
    (("parent", tarfile.SYMTYPE, b"/"), "a symbolic link"),
    (("sub", tarfile.DIRTYPE, b""), "a directory"),
    (("../pages-1.img", b"0", b"x"), "not a plain name"),
    (("passwd", b"0", b"x"), "not one a checkpoint writes"),
    (("core-1.img", b"0", b"again"), "twice"),
])
async def test_anything_but_a_regular_file_is_refused_before_it_exists(tmp_path: Path, member: tuple[str, Any, bytes],
                                                                      said: str) -> None:
    with pytest.raises(BadRequest) as caught:
        await _receive(tmp_path, _tar(("core-1.img", b"0", b"abc"), member))
    assert said in caught.value.message and caught.value.message.endswith(": refused"), caught.value.message
    assert sorted(os.listdir(tmp_path / "final")) == ["core-1.img"]  # nothing of the refused member
    assert not (tmp_path / "pages-1.img").exists()


async def test_the_stream_is_read_to_its_end_after_the_tar_s_end(tmp_path: Path) -> None:
    """The tar's padding after its end is read up to the barrier (the next message is the protocol's)."""
    data = _tar(("core-1.img", b"0", b"abc"))
    channel = _Channel(data, chunk=512)
    (tmp_path / "final").mkdir()
    await receive_state_files(tmp_path / "final", channel, FILES,  # type: ignore[arg-type]
                              StateBudget(tmp_path, 1 << 20, 1 << 21))
    assert channel.read >= len(data) and (tmp_path / "final/core-1.img").read_bytes() == b"abc"


async def test_a_checkpoint_larger_than_the_bound_is_refused_before_it_is_written(tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as caught:
        await _receive(tmp_path, _tar(("pages-1.img", b"0", b"\0" * 300_000)), per_round=200_000)
    assert "larger than this instance's memory allows" in caught.value.message
    assert os.listdir(tmp_path / "final") == []


def test_the_budget_counts_every_round_and_the_total(tmp_path: Path) -> None:
    budget = StateBudget(tmp_path, 100, 250)
    budget.admit("predump-1", 100)
    with pytest.raises(BadRequest):
        budget.admit("predump-1", 1)
    budget.admit("predump-2", 100)
    with pytest.raises(BadRequest):
        budget.admit("final", 51)
    budget.admit("final", 50)
