from __future__ import annotations

import pytest

from stapes.api.config_keys import parse_size, validate_instance_config, validate_server_config
from stapes.api.devices import expand_devices, root_disk, validate_devices
from stapes.api.errors import BadRequest
from stapes.api.names import validate_entity_name, validate_instance_name


@pytest.mark.parametrize("name", ["c1", "a", "web-01", "A" * 63, "x-y-z"])
def test_valid_instance_names(name: str) -> None:
    validate_instance_name(name)


@pytest.mark.parametrize(("name", "message"), [
    ("", "empty"), ("1abc", "digit"), ("-abc", "hyphen"), ("abc-", "end with a hyphen"),
    ("a_b", "only letters"), ("a.b", "only letters"), ("a" * 64, "63"), ("é", "only letters"),
])
def test_invalid_instance_names(name: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        validate_instance_name(name)


@pytest.mark.parametrize("name", ["", "a/b", "..", "a b", "x:y"])
def test_invalid_entity_names(name: str) -> None:
    with pytest.raises(BadRequest):
        validate_entity_name("profile", name)


@pytest.mark.parametrize(("text", "size"), [("256MiB", 256 * 2**20), ("1GB", 10**9), ("1024", 1024),
                                            ("2 GiB", 2 * 2**30), ("10kB", 10_000)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_instance_config_schema() -> None:
    validate_instance_config({"limits.memory": "64MiB", "limits.cpu": "0-1", "user.anything": "x",
                              "environment.FOO": "bar", "volatile.base_image": "abc", "boot.autostart": "true",
                              "migration.incremental.memory.goal": "70", "limits.processes": "100",
                              "volatile.uuid": "0b6a1b0e-5d1c-4f5e-9a43-6f1f2b3c4d5e"})
    for bad, message in [
        ({"limits.memory": "1MiB"}, "too small"), ({"limits.memory": "150%"}, "out of range"),
        ({"limits.cpu": "0"}, "at least 1"), ({"limits.cpu": "a-b"}, "not a CPU count"),
        ({"boot.autostart": "maybe"}, "not a boolean"), ({"security.nesting": "true"}, "Unknown"),
        ({"migration.incremental.memory.goal": "101"}, "out of range"),
        ({"volatile.uuid": "0b6a1b0e-5d1c-4f5e-9a43-6f1f2b3c4d5e,x=y"}, "8-4-4-4-12 hexadecimal"),
    ]:
        with pytest.raises(BadRequest, match=message):
            validate_instance_config(bad)


def test_server_config_schema() -> None:
    validate_server_config({"core.https_address": "127.0.0.1:8443", "user.x": "y"})
    validate_server_config({"core.https_address": "[::1]:8443"})
    for bad in ({"core.https_address": "127.0.0.1"}, {"core.https_address": "h:99999"}, {"images.x": "1"}):
        with pytest.raises(BadRequest):
            validate_server_config(bad)


def test_devices() -> None:
    validate_devices({"root": {"type": "disk", "path": "/", "pool": "default"},
                      "data": {"type": "disk", "path": "/data", "source": "/srv"}})
    for bad, message in [
        ({"g": {"type": "gpu"}}, "unsupported type"),
        ({"eth0": {"type": "nic"}}, "needs a managed 'network'"),
        ({"eth0": {"type": "nic", "network": "n", "parent": "br0"}}, "takes no"),
        ({"eth0": {"type": "nic", "nictype": "bridged"}}, "needs the host bridge"),
        ({"eth0": {"type": "nic", "network": "n", "hwaddr": "11:22:33:44:55:66"}}, "multicast"),
        ({"eth0": {"type": "nic", "network": "n", "name": "a/b"}}, "not an interface name"),
        ({"a": {"type": "nic", "network": "n"}, "b": {"type": "nic", "network": "n", "name": "a"}},
         "same interface"),
        ({"d": {"type": "disk", "path": "/x"}}, "needs a host 'source'"),
        ({"d": {"type": "disk", "path": "rel", "source": "/s"}}, "absolute"),
        ({"d": {"type": "disk", "path": "/", "bogus": "1"}}, "unknown key"),
        ({"d": {"type": "disk"}}, "needs 'path'"),
    ]:
        with pytest.raises(BadRequest, match=message):
            validate_devices(bad)


def test_expand_devices_later_wins_and_none_removes() -> None:
    profile_a = {"root": {"type": "disk", "path": "/", "pool": "a"}, "data": {"type": "disk", "path": "/d",
                                                                             "source": "/s"}}
    profile_b = {"root": {"type": "disk", "path": "/", "pool": "b"}}
    local = {"data": {"type": "none"}}
    expanded = expand_devices([profile_a, profile_b], local)
    assert expanded == {"root": {"type": "disk", "path": "/", "pool": "b"}}
    assert root_disk(expanded) == ("root", {"type": "disk", "path": "/", "pool": "b"})
    assert root_disk({}) is None
