"""Issue 17, items 5 and 6: figures in units people read (CPU seconds, GiB/MiB, the progress line with its
total, no 1970 for "no expiry", leases of existing instances only, the bridge's real MAC), and stapesd as a
service (--version, its private log file, SIGHUP, SIGTERM leaving the instances running, the systemd unit)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import STAPESD, Cli, Cluster, Server, wait_for
from tests.integration.test_incus_client import incus
from tests.integration.test_unprivileged_networks import wait_address

REPO = Path(__file__).resolve().parents[2]
SIZE = r"\d+(?:\.\d+)?(?:B|KiB|MiB|GiB|TiB)"


def test_info_storage_and_progress_show_people_units(two: Cli) -> None:
    two.run("launch", "s1:busybox", "c1", "-q")
    two.run("exec", "s1:c1", "--", "sh", "-c", "dd if=/dev/urandom of=/big bs=1M count=24 2>/dev/null")
    info = two.run("info", "s1:c1").stdout
    assert re.search(r"^CPU usage \(in seconds\): \d+$", info, re.M), info
    assert "(ns)" not in info
    assert re.search(rf"^Memory usage: {SIZE}$", info, re.M), info
    pool = two.run("storage", "info", "s1:default").stdout
    assert re.fullmatch(rf"space used: {SIZE}\ntotal space: {SIZE}\n", pool), pool
    two.run("stop", "s1:c1", "--force")
    copied = two.run("copy", "s1:c1", "s2:c2", "--transport", "rsync")
    line = copied.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"Copying c1: 100% {SIZE}/{SIZE} {SIZE}/s", line), copied.stderr


def test_a_snapshot_without_expiry_shows_none_in_incus_info(cluster: Cluster, s1: Server) -> None:
    cli = cluster.cli(s1)
    cli.run("init", "busybox", "c1", "-q")
    cli.run("snapshot", "create", "c1", "snap0")
    snap = s1.api("GET", "/1.0/instances/c1/snapshots/snap0")
    assert snap["expires_at"] == "0001-01-01T00:00:00Z", snap
    image = s1.api("GET", "/1.0/images?recursion=1")[0]
    assert image["expires_at"] == "0001-01-01T00:00:00Z", image
    if shutil.which("incus") is None:
        pytest.skip("incus-client is not installed")
    conf = cluster.root / "incus-client"
    conf.mkdir()
    token = cli.run("config", "trust", "add", "incus-user").stdout.strip().splitlines()[-1]
    incus(conf, "remote", "add", "st", token)
    info = incus(conf, "info", "st:c1").stdout
    assert "snap0" in info, info
    assert "1970" not in info and "0001" not in info, info


def test_leases_of_deleted_instances_go_and_the_bridge_has_its_own_mac(cli: Cli, s1: Server) -> None:
    cli.run("launch", "busybox", "c1", "-q")
    cli.run("launch", "busybox", "c2", "-q")
    wait_address(cli, "s1:c1")
    wait_address(cli, "s1:c2")
    assert sorted(lease["hostname"] for lease in cli.json("network", "list-leases", "stapesbr0")) == ["c1", "c2"]
    cli.run("delete", "c1", "--force")
    assert [lease["hostname"] for lease in cli.json("network", "list-leases", "stapesbr0")] == ["c2"]
    info = cli.run("network", "info", "stapesbr0").stdout
    mac = re.search(r"^MAC address: (\S+)$", info, re.M)
    assert mac is not None and mac.group(1) != "00:00:00:00:00:00", info
    name = re.search(r"^Interface: (\S+)$", info, re.M)
    assert name is not None, info
    link = json.loads(subprocess.run(["ip", "-j", "link", "show", name.group(1)], capture_output=True, text=True,
                                     check=True).stdout)[0]
    assert link["address"] == mac.group(1), (link, info)


def test_stapesd_version() -> None:
    result = subprocess.run([STAPESD, "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"stapesd \d+\.\d+\.\d+\n", result.stdout), result.stdout


def test_the_daemon_logs_to_its_private_file_and_stops_cleanly_on_sigterm(cluster: Cluster, s1: Server) -> None:
    cli = cluster.cli(s1)
    log = s1.state_dir / "logs" / "stapesd.log"
    assert "stapesd ready" in log.read_text()
    assert "stapesd ready" in s1.log()  # and on stderr, as before (journald, the harness)
    assert stat.S_IMODE(log.stat().st_mode) & 0o077 == 0, oct(log.stat().st_mode)
    assert log.stat().st_uid == 0
    cli.run("launch", "busybox", "c1", "-q")

    log.rename(log.with_suffix(".log.1"))  # logrotate, then its SIGHUP
    os.kill(s1.pid, signal.SIGHUP)
    wait_for(log.exists, 10, "the log file reopened")
    proc = s1.proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    s1.proc = None
    assert "stapesd stopping" in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert not (s1.state_dir / "unix.socket").exists()
    # As when incus.service stops: the instances go on running without their server, and are its again after.
    state = subprocess.run(["lxc-info", "-P", str(s1.state_dir / "containers"), "-n", "c1", "-s", "-H"],
                           capture_output=True, text=True, check=False).stdout.strip()
    assert state == "RUNNING", state
    s1.start()
    assert [(i["name"], i["status"]) for i in cli.json("list")] == [("c1", "Running")]


def test_make_install_puts_a_unit_that_starts_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "STAPES_UNIT_DIR": str(tmp_path), "STAPESD": "/opt/stapes/bin/stapesd"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "install-service.sh")], env=env, capture_output=True,
                            text=True, check=True)
    unit = (tmp_path / "stapes.service").read_text()
    assert "ExecStart=/opt/stapes/bin/stapesd --state-dir /var/lib/stapes" in unit
    assert "KillMode=process" in unit and "WantedBy=multi-user.target" in unit
    assert stat.S_IMODE((tmp_path / "stapes.service").stat().st_mode) == 0o644
    assert "not started" in result.stdout, result.stdout  # installing (and daemon-reload) only
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "stapes.service")], capture_output=True,
                               text=True, check=False)
        assert check.returncode == 0 or "/opt/stapes/bin/stapesd" in check.stderr, check.stderr
    again = subprocess.run(["bash", str(REPO / "scripts" / "install-service.sh")], env=env, capture_output=True,
                           text=True, check=True)
    assert "up to date" in again.stdout
