"""Profiles, projects, storage pools, images, operations and events, through the CLI."""

from __future__ import annotations

import json
import subprocess
import tarfile
import threading
import time
from pathlib import Path

from tests.integration.harness import STAPES, Cli, Server


def test_profiles_expand_into_instances(s1: Server, cli: Cli) -> None:
    cli.run("profile", "create", "small")
    cli.run("profile", "set", "small", "limits.memory=80MiB")
    cli.run("profile", "set", "small", "user.tier", "bronze")
    cli.run("init", "busybox", "c1", "-p", "default", "-p", "small", "-q")
    instance = cli.json("list")[0]
    assert instance["profiles"] == ["default", "small"]
    assert instance["expanded_config"]["limits.memory"] == "80MiB"
    assert "limits.memory" not in instance["config"]
    err = cli.fails("profile", "delete", "small")
    assert "in use" in err
    cli.run("profile", "remove", "c1", "small")
    cli.run("profile", "delete", "small")
    assert [p["name"] for p in cli.json("profile", "list")] == ["default"]
    cli.fails("profile", "set", "default", "limits.memory=tiny")


def test_projects_keep_instances_apart(s1: Server, cli: Cli) -> None:
    cli.run("project", "create", "staging")
    cli.run("--project", "staging", "launch", "busybox", "c1", "-q")
    cli.run("launch", "busybox", "c1", "-q")  # same name, other project
    assert [i["name"] for i in cli.json("--project", "staging", "list")] == ["c1"]
    both = cli.json("list", "--all-projects")
    assert sorted((i["project"], i["name"]) for i in both) == [("default", "c1"), ("staging", "c1")]
    assert cli.run("--project", "staging", "exec", "c1", "--", "hostname").stdout == "c1\n"
    err = cli.fails("project", "delete", "staging")
    assert "not empty" in err
    cli.run("--project", "staging", "delete", "c1", "--force")
    cli.run("project", "delete", "staging")
    cli.run("delete", "c1", "--force")


def test_storage_pools(s1: Server, cli: Cli, tmp_path: Path) -> None:
    source = s1.state_dir.parent / "fastpool"  # outside the state dir, where unprivileged roots can traverse
    cli.run("storage", "create", "fast", "dir", f"source={source}")
    cli.run("launch", "busybox", "c1", "-s", "fast", "-q")
    assert (source / "containers/c1/rootfs/bin/busybox").exists()
    pools = {p["name"]: p for p in cli.json("storage", "list")}
    assert pools["fast"]["used_by"] == ["/1.0/instances/c1"]
    assert "space used" in cli.run("storage", "info", "fast").stdout
    assert "in use" in cli.fails("storage", "delete", "fast")
    cli.run("delete", "c1", "--force")
    cli.run("storage", "delete", "fast")
    assert not source.exists()
    err = cli.fails("storage", "create", "p2", "dir", "source=relative/path")
    assert "absolute" in err


def _unified_tarball(path: Path, marker: str) -> None:
    root = path.parent / "image-src"
    (root / "rootfs/etc").mkdir(parents=True)
    (root / "rootfs/bin").mkdir()
    (root / "rootfs/sbin").mkdir()
    for tool in ("busybox",):
        subprocess.run(["cp", "/bin/busybox", str(root / "rootfs/bin" / tool)], check=True)
    for applet in ("sh", "cat", "hostname", "sleep", "sync", "reboot"):
        (root / "rootfs/bin" / applet).symlink_to("busybox")
    (root / "rootfs/sbin/init").symlink_to("../bin/busybox")
    (root / "rootfs/etc/inittab").write_text("::respawn:/bin/sleep 1000000\n")
    (root / "rootfs/etc/marker").write_text(marker)
    (root / "metadata.yaml").write_text("architecture: x86_64\ncreation_date: 1700000000\n"
                                        "properties:\n  os: custom\n  description: test image\n")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root / "metadata.yaml", "metadata.yaml")
        tar.add(root / "rootfs", "rootfs")


def test_image_import_alias_launch_delete(s1: Server, cli: Cli, tmp_path: Path) -> None:
    tarball = tmp_path / "custom.tar.gz"
    _unified_tarball(tarball, "imported-image")
    out = cli.run("image", "import", str(tarball), "--alias", "custom").stdout
    assert "fingerprint" in out
    images = {", ".join(a["name"] for a in i["aliases"]): i for i in cli.json("image", "list")}
    assert images["custom"]["properties"]["os"] == "custom"
    cli.run("launch", "custom", "c1", "-q")
    assert cli.run("exec", "c1", "--", "cat", "/etc/marker").stdout == "imported-image"
    assert cli.json("list")[0]["config"]["image.os"] == "custom"
    assert "already in the store" in cli.fails("image", "import", str(tarball))
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        tar.add(tmp_path / "image-src/rootfs", "rootfs")
    assert "no metadata.yaml" in cli.fails("image", "import", str(bad))
    cli.run("image", "build", "busybox", "--alias", "bb2")
    assert "bb2" in cli.run("image", "alias", "list", "--format", "csv").stdout
    cli.run("image", "delete", "custom")
    assert "custom" not in cli.run("image", "list", "--format", "csv").stdout
    cli.run("delete", "c1", "--force")


def test_operations_and_events(s1: Server, cli: Cli) -> None:
    events: list[dict[str, object]] = []
    monitor = subprocess.Popen([STAPES, "monitor", "--type", "lifecycle"], env=cli.env(),
                               stdout=subprocess.PIPE, text=True)
    reader = threading.Thread(target=lambda: [events.append(json.loads(line)) for line in monitor.stdout or []],
                              daemon=True)
    reader.start()
    try:
        time.sleep(1)
        cli.run("launch", "busybox", "c1", "-q")
        cli.run("stop", "c1", "--force")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(events) < 3:
            time.sleep(0.1)
    finally:
        monitor.terminate()
        monitor.wait(10)
    actions = [e["metadata"]["action"] for e in events]  # type: ignore[index]
    assert actions[:3] == ["instance-created", "instance-started", "instance-stopped"]
    ops = cli.json("operation", "list")
    assert {"Creating instance", "Stopping instance"} <= {o["description"] for o in ops}
    op = ops[0]
    assert op["id"] in cli.run("operation", "show", op["id"]).stdout
    assert "already finished" in cli.fails("operation", "delete", op["id"])
    cli.run("delete", "c1")
