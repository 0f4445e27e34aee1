"""pylxd (PyPI), as people script with it, drives Stapes servers: trust token, create, start, exec, stop,
migrate, delete; errors carry their message."""

from __future__ import annotations

from pathlib import Path

import pytest

from stapes.certs import ensure_certificate
from tests.integration.harness import Server, wait_for

pylxd = pytest.importorskip("pylxd")


def _client(server: Server, certs: Path) -> pylxd.Client:
    crt, key = certs / "client.crt", certs / "client.key"
    if not crt.exists():
        ensure_certificate(crt, key, server=False)
    client = pylxd.Client(endpoint=server.url, cert=(str(crt), str(key)), verify=False, timeout=120)
    token = server.api("POST", "/1.0/certificates", {"name": "pylxd", "type": "client", "token": True})
    client.authenticate(token["metadata"]["token"])
    assert client.trusted
    return client


def test_pylxd_drives_stapes(s1: Server, s2: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # requests lets these override verify=False (self-signed servers, as with Incus: trust is the token's job)
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    one, two = _client(s1, tmp_path), _client(s2, tmp_path)

    instance = one.instances.create({"name": "p1", "source": {"type": "image", "alias": "busybox"}}, wait=True)
    instance.start(wait=True)
    assert one.instances.get("p1").status == "Running"
    result = instance.execute(["sh", "-c", "cat /etc/hostname; echo oops >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, "p1\n", "oops\n")
    instance.stop(wait=True, force=True)
    assert one.instances.get("p1").status == "Stopped"

    moved = instance.migrate(two, wait=True)  # a copy, then a delete of the source it does not wait for
    assert moved.name == "p1"
    wait_for(lambda: one.instances.all() == [], 30, "pylxd's delete of the migrated source")
    assert [(i.name, i.status) for i in two.instances.all()] == [("p1", "Stopped")]

    with pytest.raises(pylxd.exceptions.LXDAPIException) as failure:
        two.instances.get("nosuch")
    assert "not found" in str(failure.value).lower()
    with pytest.raises(pylxd.exceptions.LXDAPIException) as failure:
        two.instances.create({"name": "bad/name", "source": {"type": "image", "alias": "busybox"}}, wait=True)
    assert str(failure.value).strip(), "an error must say what went wrong"

    two.instances.get("p1").delete(wait=True)
    assert two.instances.all() == []
