from __future__ import annotations

from pathlib import Path

import pytest

from stapes.api.errors import BadRequest, NotFound, error_for_status
from stapes.api.filters import matches, parse
from stapes.api.tokens import decode_token, encode_token
from stapes.cli.config import _split_set_args
from stapes.client.config import ClientConfig
from stapes.server.instances.driver import ExecRequest, InstanceSpec
from stapes.server.instances.lxc import exec_environment, render_config

INSTANCE = {"name": "c1", "status": "Running", "type": "container", "config": {"user.tier": "gold"}}


def test_filters() -> None:
    assert matches(INSTANCE, "")
    assert matches(INSTANCE, "name eq c1")
    assert matches(INSTANCE, "status eq running and type eq container")
    assert not matches(INSTANCE, "name eq c2")
    assert matches(INSTANCE, "name eq c2 or name eq c1")
    assert matches(INSTANCE, "name ne c2")
    assert matches(INSTANCE, "not name eq c2")
    assert matches(INSTANCE, "config.user.tier eq gold")
    for bad in ("name eq", "name gt 1", "name eq c1 and", "name eq c1 xor name eq c2"):
        with pytest.raises(BadRequest):
            parse(bad)


def test_token_round_trip_is_incus_shaped() -> None:
    token = encode_token("laptop", "ab" * 32, ["127.0.0.1:8443"], "cd" * 32, 0)
    body = decode_token(token)
    assert body == {"client_name": "laptop", "fingerprint": "ab" * 32, "addresses": ["127.0.0.1:8443"],
                    "secret": "cd" * 32, "expires_at": "0001-01-01T00:00:00Z"}
    for bad in ("", "not-base64!", "aGVsbG8=", encode_token("x", "f", [], "s", 0)[:-8]):
        with pytest.raises(ValueError):
            decode_token(bad)


def test_error_classes_round_trip() -> None:
    err = error_for_status(404, "gone")
    assert isinstance(err, NotFound) and err.message == "gone"
    assert error_for_status(418, "teapot").status == 500


def test_client_config_parse(tmp_path: Path) -> None:
    conf = ClientConfig.load(tmp_path)
    assert conf.default_remote == "local"
    remote, name = conf.parse("c1")
    assert (remote.name, name) == ("local", "c1")
    with pytest.raises(NotFound, match="does not exist"):
        conf.parse("s9:c1")
    with pytest.raises(BadRequest):
        conf.parse(":c1")
    conf.save()
    assert ClientConfig.load(tmp_path).remotes["local"].addr == "unix://"


def test_config_set_argument_forms() -> None:
    assert _split_set_args(("core.https_address", "1.2.3.4:8443")) == (None, {"core.https_address": "1.2.3.4:8443"})
    assert _split_set_args(("a=1", "b=2")) == (None, {"a": "1", "b": "2"})
    assert _split_set_args(("c1", "limits.cpu=1")) == ("c1", {"limits.cpu": "1"})
    assert _split_set_args(("c1", "limits.cpu", "1")) == ("c1", {"limits.cpu": "1"})
    assert _split_set_args(("s1:", "core.x=1")) == ("s1:", {"core.x": "1"})


def _spec(config: dict[str, str], project: str = "default") -> InstanceSpec:
    return InstanceSpec(project, "c1", config, {"root": {"type": "disk", "path": "/", "pool": "p"},
                                                "data": {"type": "disk", "path": "/data", "source": "/srv",
                                                         "readonly": "true"}}, Path("/pool/c1"))


def test_render_lxc_config_v1_and_v2() -> None:
    text = render_config(_spec({"limits.memory": "64MiB", "limits.cpu": "1", "limits.processes": "10",
                                "raw.lxc": "lxc.environment = X=1"}),
                         lxc_dir=Path("/lxc/c1"), server_id="abcd", cgroup2=False, apparmor=False)
    assert "lxc.rootfs.path = dir:/pool/c1/rootfs" in text
    assert "lxc.cgroup.memory.limit_in_bytes = 67108864" in text
    assert "lxc.cgroup.cpuset.cpus = 0" in text
    assert "lxc.cgroup.pids.max = 10" in text
    assert "lxc.cgroup.dir.container = stapes-abcd.payload.c1" in text
    assert "lxc.mount.entry = /srv data none bind,create=dir,ro 0 0" in text
    assert text.rstrip().endswith("lxc.environment = X=1")
    v2 = render_config(_spec({"limits.memory": "64MiB"}, project="p1"), lxc_dir=Path("/l"), server_id="x",
                       cgroup2=True, apparmor=False)
    assert "lxc.cgroup2.memory.max = 67108864" in v2
    assert "stapes-x.payload.p1_c1" in v2


def test_exec_environment_precedence() -> None:
    request = ExecRequest(["true"], {"A": "request"}, "", 0, 0, interactive=True)
    env = exec_environment({"environment.A": "config", "environment.B": "config"}, request)
    assert env["A"] == "request" and env["B"] == "config" and env["TERM"] == "xterm" and env["HOME"] == "/root"
    with pytest.raises(BadRequest):
        exec_environment({}, ExecRequest(["true"], {"A=B": "x"}, "", 0, 0, interactive=False))


def test_root_cause_of_a_tool_failure() -> None:
    from stapes.server.streams import root_cause

    tar = ("tar: ./rootfs/random.bin: Cannot write: No space left on device\n"
           "tar: Exiting with failure status due to previous errors\n")
    assert root_cause(tar) == "tar: ./rootfs/random.bin: Cannot write: No space left on device"
    assert root_cause("rsync error: error in rsync protocol data stream (code 12)\n") == (
        "rsync error: error in rsync protocol data stream (code 12)")
    assert root_cause("") == ""


def test_progress_says_100_percent_only_when_the_transfer_is_complete() -> None:
    from stapes.server.progress import figures, human

    # rsync sent a small share of the total (the rest was already there): not yet done, then done.
    running = figures(25_000, 6_000_000, 0.5)
    assert (running["percent"], running["eta"]) == (0, 119)
    assert figures(6_000_000, 6_000_000, 1.0)["percent"] == 99  # the bytes are there, the tool has not exited
    done = figures(25_000, 6_000_000, 0.5, complete=True)
    assert (done["percent"], done["eta"]) == (100, 0)
    assert human(done) == "100% 24.41KiB (48.83KiB/s)"
