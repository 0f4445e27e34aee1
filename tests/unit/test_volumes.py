"""Custom storage volumes: names, keys, disk devices and the LXC lines for them (pure rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stapes.api.devices import validate_devices, volume_disks
from stapes.api.errors import BadRequest, InternalError
from stapes.api.volumes import validate_content_type, validate_volume_config, validate_volume_name
from stapes.server.idmap import IdRange
from stapes.server.instances import hotplug
from stapes.server.instances.driver import InstanceSpec
from stapes.server.instances.lxc import render_config
from stapes.server.storage.base import Volume
from stapes.server.storage.volumes import _rename_old_layout, check_idmap_kind, custom_volume, idmap_text
from stapes.server.store.db import VolumeRow

MAP = (IdRange(True, False, 1000000, 0, 65536), IdRange(False, True, 1000000, 0, 65536))
ROOT = {"type": "disk", "path": "/", "pool": "p"}


@pytest.mark.parametrize("name", ["", "..", "a/b", "a b", "x" * 64, "bad\n", "q?"])
def test_bad_volume_names(name: str) -> None:
    with pytest.raises(BadRequest, match="Invalid storage volume name"):
        validate_volume_name(name)


def test_volume_keys_user_only_and_unsupported_ones_said_so() -> None:
    validate_volume_config({"user.a": "b"})
    with pytest.raises(BadRequest, match="'size' is not supported: quotas"):
        validate_volume_config({"size": "1GiB"})
    with pytest.raises(BadRequest, match="Unknown storage volume key 'zfs.x'"):
        validate_volume_config({"zfs.x": "1"})
    with pytest.raises(BadRequest, match="block"):
        validate_content_type("block")


def test_disk_devices_attaching_a_volume() -> None:
    devices = {"root": ROOT, "data": {"type": "disk", "pool": "p", "source": "vol", "path": "/srv"},
               "host": {"type": "disk", "source": "/srv/host", "path": "/h"}}
    validate_devices(devices)
    assert list(volume_disks(devices)) == ["data"]
    with pytest.raises(BadRequest, match="Invalid device 'd': Invalid storage volume name"):
        validate_devices({"d": {"type": "disk", "pool": "p", "source": "../../etc", "path": "/x"}})


def test_custom_volumes_live_in_custom() -> None:
    assert (custom_volume("default", "v").kind, custom_volume("default", "v").directory) == ("custom", "v")
    assert custom_volume("dev", "v").directory == "dev:v"


def test_on_disk_names_of_two_projects_never_collide() -> None:
    """Project `pp`'s volume `sec` and the default project's `pp_sec` were both `custom/pp_sec`."""
    assert custom_volume("pp", "sec").directory != custom_volume("default", "pp_sec").directory
    with pytest.raises(BadRequest):
        validate_volume_name("a:b")  # the separator is in no volume (or project) name
    assert Volume.of("container", "pp", "c1").directory == "pp_c1"  # the instances' own are unchanged


def test_old_layout_renamed_but_never_a_default_projects_volume(tmp_path: Path) -> None:
    for name in ("pp_sec", "qq_x"):
        (tmp_path / name).mkdir()
    rows = [VolumeRow("p", "pp", "sec"), VolumeRow("p", "default", "pp_sec"), VolumeRow("p", "qq", "x")]
    _rename_old_layout(tmp_path, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pp_sec", "qq:x"]


def _spec(idmap: tuple[IdRange, ...]) -> InstanceSpec:
    devices = {"root": ROOT, "data": {"type": "disk", "pool": "p", "source": "vol", "path": "/srv/data"}}
    return InstanceSpec("default", "c1", {}, devices, Path("/pool/containers/c1"), {}, idmap,
                        {"data": Path("/pool/custom/vol")})


def test_lxc_mounts_a_volume_through_the_servers_idmapped_mount() -> None:
    unprivileged = render_config(_spec(MAP), lxc_dir=Path("/l/c1"), server_id="x", cgroup2=False, apparmor=False)
    mount = hotplug.mount_dir(Path("/l/c1/volumes"), "data")
    assert f"lxc.mount.entry = {mount} srv/data none bind,create=dir 0 0  # device data" in unprivileged
    assert "/pool/custom" not in unprivileged  # the pool's own directories stay root's alone
    privileged = render_config(_spec(()), lxc_dir=Path("/l/c1"), server_id="x", cgroup2=False, apparmor=False)
    assert "lxc.mount.entry = /pool/custom/vol srv/data none bind,create=dir 0 0  # device data" in privileged


async def test_a_version_2_database_gains_the_volumes_table(tmp_path: Path) -> None:
    """A database from before custom volumes (schema 2, no storage_volumes table) is brought up to date."""
    import sqlite3

    from stapes.server.store.db import SCHEMA, SCHEMA_VERSION, Store, VolumeRow

    path = tmp_path / "stapes.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA.split("CREATE TABLE IF NOT EXISTS storage_volumes")[0])
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    assert "storage_volumes" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    store = await Store.open(path)
    try:
        assert await store.volumes() == []
        await store.create_volume(VolumeRow("default", "default", "v", config={"user.a": "b"}))
        assert [(v.name, v.config) for v in await store.volumes("default")] == [("v", {"user.a": "b"})]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "a\\b", "a b", ""])
def test_device_names_never_dots_or_path_parts(name: str) -> None:
    with pytest.raises(BadRequest, match="Invalid device name"):
        validate_devices({name: {"type": "disk", "pool": "p", "source": "v", "path": "/mnt/v"}})


def test_a_device_name_is_never_a_path_part_of_the_mounts() -> None:
    """A device `..` (from before the name rule) mounted the volume over the container's LXC directory."""
    devices = {"root": ROOT, "..": {"type": "disk", "pool": "p", "source": "vol", "path": "/srv"}}
    spec = InstanceSpec("default", "c1", {}, devices, Path("/pool/containers/c1"), {}, MAP, {"..": Path("/v")})
    text = render_config(spec, lxc_dir=Path("/l/c1"), server_id="x", cgroup2=False, apparmor=False)
    source = next(line.split()[2] for line in text.splitlines() if line.endswith("# device .."))
    assert Path(source).parent == Path("/l/c1/volumes") and Path(source).name.startswith("d"), source
    for name in ("..", ".", "a", "x" * 64):
        assert hotplug.mount_dir(Path("/l/c1/volumes"), name).parent == Path("/l/c1/volumes")


def _running(tmp_path: Path, idmap: tuple[IdRange, ...], devices: dict[str, dict[str, str]]) -> InstanceSpec:
    volumes = {}
    for name in devices:
        (tmp_path / name).mkdir(exist_ok=True)
        volumes[name] = tmp_path / name
    return InstanceSpec("default", "c1", {}, {"root": ROOT, **devices}, tmp_path / "c1", {}, idmap, volumes)


async def test_read_only_hot_attach_refused_into_a_running_unprivileged_container(tmp_path: Path) -> None:
    new = _running(tmp_path, MAP, {"d": {"type": "disk", "pool": "p", "source": "d", "path": "/m", "readonly": "true"}})
    with pytest.raises(BadRequest, match="stop it first: read-only is applied at start"):
        await hotplug.replug(None, new, pid=1, mounts=tmp_path / "m", mkdir=_no_mkdir)


async def _no_mkdir(path: str) -> str:
    return ""


def test_readonly_is_part_of_what_a_hotplug_compares(tmp_path: Path) -> None:
    rw = _running(tmp_path, (), {"d": {"type": "disk", "pool": "p", "source": "d", "path": "/m"}})
    ro = _running(tmp_path, (), {"d": {"type": "disk", "pool": "p", "source": "d", "path": "/m", "readonly": "true"}})
    assert hotplug.plugs(rw) != hotplug.plugs(ro)


class _Helper:
    """process.run for the hotplug helper: records the calls, fails the attach of `fail`."""

    def __init__(self, fail: str) -> None:
        self.fail = fail
        self.calls: list[list[str]] = []

    async def __call__(self, argv: list[str], **kwargs: object) -> object:
        from stapes.server.process import Result

        args = list(argv[3:])
        self.calls.append(args)
        failed = args[0] == "attach" and args[3] == self.fail
        return Result(argv, 1 if failed else 0, b"", b"move_mount: nope" if failed else b"")


async def test_a_failed_hot_attach_undoes_what_the_call_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stapes.server import process

    helper = _Helper(fail="/b")
    monkeypatch.setattr(process, "run", helper)
    old = _running(tmp_path, (), {"x": {"type": "disk", "pool": "p", "source": "x", "path": "/x"}})
    new = _running(tmp_path, (), {"a": {"type": "disk", "pool": "p", "source": "a", "path": "/a"},
                                  "b": {"type": "disk", "pool": "p", "source": "b", "path": "/b"}})
    with pytest.raises(InternalError, match="Cannot attach disk device 'b'"):
        await hotplug.replug(old, new, pid=7, mounts=tmp_path / "m", mkdir=_no_mkdir)
    assert [c[0] + " " + c[-1] for c in helper.calls] == [
        "detach /x", "attach /a", "attach /b",  # the call
        "detach /a", "attach /x"]  # undone, in reverse


async def test_a_failed_detach_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stapes.server import process

    async def busy(argv: list[str], **kwargs: object) -> object:
        return process.Result(argv, 1, b"", b"umount /x: a process inside uses it")

    monkeypatch.setattr(process, "run", busy)
    old = _running(tmp_path, (), {"x": {"type": "disk", "pool": "p", "source": "x", "path": "/x"}})
    new = _running(tmp_path, (), {})
    with pytest.raises(InternalError, match="Cannot detach disk device 'x'.*uses it"):
        await hotplug.replug(old, new, pid=7, mounts=tmp_path / "m", mkdir=_no_mkdir)


def test_a_volume_is_found_in_a_mountinfo_by_device_and_root(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    "40 22 0:50 / /pool rw - btrfs /dev/loop0 rw\n"
                    "41 22 0:50 /custom/my\\040vol /elsewhere rw - btrfs /dev/loop0 rw\n")
    assert hotplug.identity(Path("/pool/custom/my vol"), info) == ("0:50", "/custom/my vol")
    assert hotplug.identity(Path("/srv/x"), info) == ("8:1", "/srv/x")


def test_a_volume_is_never_used_by_both_kinds() -> None:
    row = VolumeRow("p", "default", "v", config={"volatile.idmap.last": idmap_text(MAP)})
    check_idmap_kind(row, False, "d", "c1")
    with pytest.raises(BadRequest, match="last used by an unprivileged instance"):
        check_idmap_kind(row, True, "d", "c2")
    row.config["volatile.idmap.last"] = idmap_text(())
    with pytest.raises(BadRequest, match="last used by a privileged instance"):
        check_idmap_kind(row, False, "d", "c2")
    check_idmap_kind(VolumeRow("p", "default", "new"), True, "d", "c3")  # never used: either


class _Instances:
    volume_claim: object = None


async def _service(tmp_path: Path) -> tuple[object, object]:
    import contextlib

    from stapes.api.errors import Conflict
    from stapes.server.storage.service import StorageService
    from stapes.server.storage.volumes import VolumeService
    from stapes.server.store.db import PoolRow, ProjectRow, Store

    store = await Store.open(tmp_path / "db")
    with contextlib.suppress(Conflict):
        await store.create_project(ProjectRow("default"))
    for pool in ("p", "q"):
        (tmp_path / pool / "custom").mkdir(parents=True)
        await store.create_pool(PoolRow(pool, "dir", config={"source": str(tmp_path / pool)}))
    users: list[InstanceRowLike] = []

    class Service(VolumeService):
        async def attached(self, pool: str, project: str, name: str) -> list[Any]:
            return [u for u in users if u.volume == (pool, name)]

    svc = Service(store, StorageService(store, None), _Instances())  # type: ignore[arg-type]
    return svc, users


class InstanceRowLike:
    def __init__(self, name: str, volume: tuple[str, str]) -> None:
        self.name, self.project, self.volume = name, "default", volume


async def test_a_delete_waits_for_an_attach_holding_the_volume_and_then_sees_it(tmp_path: Path) -> None:
    import asyncio

    svc, users = await _service(tmp_path)
    await svc.create(VolumeRow("p", "default", "v"))  # type: ignore[attr-defined]
    async with svc._instances.volume_claim([("p", "default", "v")]):  # type: ignore[attr-defined]
        deleting = asyncio.create_task(svc.delete("p", "default", "v"))  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        assert not deleting.done()  # waits for the attach
        users.append(InstanceRowLike("c1", ("p", "v")))  # the attach commits
    with pytest.raises(BadRequest, match="in use by c1"):
        await deleting
    assert (tmp_path / "p" / "custom" / "v").is_dir()


async def test_a_local_move_holds_the_source_and_undoes_the_copy_if_refused(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from stapes.api.errors import Conflict

    svc, users = await _service(tmp_path)
    await svc.create(VolumeRow("p", "default", "v"))  # type: ignore[attr-defined]
    (tmp_path / "p" / "custom" / "v" / "f").write_text("x")
    copying = asyncio.Event()
    original = svc.copy_local  # type: ignore[attr-defined]

    async def slow_copy(*args: Any) -> None:
        copying.set()
        await asyncio.sleep(0.1)
        await original(*args)
        users.append(InstanceRowLike("c1", ("p", "v")))  # attached meanwhile, some other way

    monkeypatch.setattr(svc, "copy_local", slow_copy)
    moving = asyncio.create_task(svc.move_local("p", "default", "v", "q", "v"))  # type: ignore[attr-defined]
    await copying.wait()
    with pytest.raises(Conflict, match="busy"):
        svc.check_idle("p", "default", "v")  # type: ignore[attr-defined]
    with pytest.raises(BadRequest, match="in use by c1"):
        await moving
    assert not (tmp_path / "q" / "custom" / "v").exists()
    assert [v.pool for v in await svc._store.volumes()] == ["p"]  # type: ignore[attr-defined]
    svc.check_idle("p", "default", "v")  # type: ignore[attr-defined]


async def test_a_copy_keeps_the_files_id_map_record_and_a_client_never_changes_it(tmp_path: Path) -> None:
    svc, _ = await _service(tmp_path)
    tainted = idmap_text(MAP)
    await svc.create(VolumeRow("p", "default", "v", config={"volatile.idmap.last": tainted}))  # type: ignore[attr-defined]
    await svc.copy_local("p", "v", VolumeRow("q", "default", "c", config={"volatile.idmap.last": "[]"}))  # type: ignore[attr-defined]
    assert (await svc.get("q", "default", "c")).config["volatile.idmap.last"] == tainted  # type: ignore[attr-defined]
    with pytest.raises(BadRequest, match="volatile"):
        await svc.update("q", "default", "c", None, {"volatile.idmap.last": ""}, replace=False)  # type: ignore[attr-defined]
    await svc.update("q", "default", "c", None, {"user.a": "b"}, replace=True)  # type: ignore[attr-defined]
    assert (await svc.get("q", "default", "c")).config == {"user.a": "b", "volatile.idmap.last": tainted}  # type: ignore[attr-defined]
