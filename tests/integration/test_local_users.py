"""The host's other users are hostile too: probes run as `nobody` against real servers, with unprivileged,
privileged, running and stopped containers, a pending trust token, and during a real live move. Nothing they
can read or reach may hold secrets, keys, instance files or an instance's memory; nothing they plant inside
a container gains them anything outside."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from stapes.api.tokens import decode_token
from tests.integration.harness import STAPES, Cluster, Server, wait_for
from tests.integration.localuser import AS_NOBODY, PYTHON, every_path, reachable_by_nobody, run_as_nobody

# Nothing in these says anything about an instance: the public certificate, CRIU's options, the socket (which
# nobody may stat but not connect to).
PUBLIC = {"server.crt": "read", "criu.conf": "read", "unix.socket": "reach"}


def _public(server: Server) -> dict[str, str]:
    return {str(server.state_dir / name): how for name, how in PUBLIC.items()}


def test_nobody_reaches_nothing_under_the_state_directory(cluster: Cluster) -> None:
    s1 = cluster.server("s1", "127.0.0.1")
    cli = cluster.cli()
    cli.trust(s1, "s1")
    cli.run("launch", "s1:busybox", "c1", "-q")  # unprivileged, running
    cli.run("launch", "s1:busybox", "c2", "-q", "-c", "security.privileged=true")
    cli.run("launch", "s1:busybox", "c3", "-q")
    cli.run("stop", "s1:c3")
    cli.run("snapshot", "create", "s1:c3", "snap0")
    cli.run("config", "trust", "add", "s1:pending")  # a token root has not handed out yet
    paths = every_path(s1.state_dir)
    assert len(paths) > 200, "the probe saw too little to prove anything"
    assert any(p.endswith("/rootfs/bin/busybox") for p in paths)
    assert reachable_by_nobody(paths) == _public(s1)


def test_a_setuid_file_planted_inside_runs_nowhere_outside(cluster: Cluster) -> None:
    """Root inside an unprivileged container makes a setuid-root copy of busybox (unshifted on disk: uid 0 there
    is uid 0 on the host); no host user may get to it, neither through the volume nor through the id-mapped view
    of it, running or stopped."""
    s1 = cluster.server("s1", "127.0.0.1")
    cli = cluster.cli()
    cli.trust(s1, "s1")
    cli.run("launch", "s1:busybox", "c1", "-q")
    cli.run("exec", "s1:c1", "--", "sh", "-c", "cp /bin/busybox /root/planted && chmod 4755 /root/planted")
    planted = [Path(p) for p in every_path(s1.state_dir) if p.endswith("/root/planted")]
    assert planted and all(p.stat().st_mode & 0o4000 for p in planted), planted
    assert any(p.stat().st_uid == 0 for p in planted), "the file on disk should be root's (unshifted)"
    for state in ("running", "stopped"):
        for path in planted:
            # Through a shell of nobody's: setpriv's own exec still holds root's capabilities while the kernel
            # looks the path up.
            result = run_as_nobody("/bin/sh", "-c", 'exec "$0" true', str(path))
            assert result.returncode == 126 and "Permission denied" in result.stderr, (state, path, result)
        assert reachable_by_nobody([str(p) for p in planted]) == {}
        if state == "running":
            cli.run("stop", "s1:c1")


def test_trust_tokens_are_kept_as_hashes(cluster: Cluster) -> None:
    s1 = cluster.server("s1", "127.0.0.1")
    token = s1.api("POST", "/1.0/certificates", {"name": "laptop", "type": "client", "token": True})
    secret = str(decode_token(token["metadata"]["token"])["secret"])
    database = s1.state_dir / "database"
    stored = b"".join(path.read_bytes() for path in database.iterdir())
    assert secret.encode() not in stored, "the token's secret is in the database as it was sent"
    cli = cluster.cli()
    cli.run("remote", "add", "s1", s1.url, "--token", token["metadata"]["token"])  # still spends
    assert cli.json("list", "s1:") == []
    assert cli.conf_dir.stat().st_mode & 0o777 == 0o700  # the client's key and remotes: its user's alone
    assert (cli.conf_dir / "client.key").stat().st_mode & 0o777 == 0o600
    assert reachable_by_nobody(every_path(cli.conf_dir)) == {}
    assert {p.stat().st_mode & 0o777 for p in database.iterdir()} == {0o600}
    assert database.stat().st_mode & 0o777 == 0o700


_GET = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[1])
except OSError as err:
    print("refused", err.errno)
    raise SystemExit
for path in ("/1.0", "/1.0/instances"):
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: stapes\r\nConnection: keep-alive\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    header, _, body = head.partition(b"\r\n\r\n")
    length = int([l for l in header.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(body) < length:
        body += sock.recv(65536)
    print(header.split(b"\r\n")[0].decode(), body.decode())
"""


def test_the_unix_socket_trusts_root_alone(cluster: Cluster) -> None:
    s1 = cluster.server("s1", "127.0.0.1")
    sock = str(s1.state_dir / "unix.socket")
    result = run_as_nobody(PYTHON, "-c", _GET, sock)
    assert result.stdout.startswith("refused 13"), result  # EACCES: not even a connection
    # A user in root's group may connect, but is no more trusted than an unknown TLS client.
    in_group = subprocess.run([AS_NOBODY[0], "--reuid=nobody", "--regid=0", "--clear-groups", PYTHON, "-c", _GET,
                               sock], capture_output=True, text=True, timeout=60, cwd="/")
    lines = in_group.stdout.splitlines()
    assert len(lines) == 2, in_group
    assert " 200 " in lines[0] and json.loads(lines[0].split(" ", 3)[3])["metadata"]["auth"] == "untrusted"
    assert " 403 " in lines[1], lines[1]
    assert s1.api("GET", "/1.0")["auth"] == "trusted"  # root still is


def test_a_live_move_shows_no_memory_to_local_users(cluster: Cluster) -> None:
    """A string that lives only in a shell variable inside the container is in the checkpoint's pages on both
    servers while the move runs; nobody can read any of it, on either side."""
    s1 = cluster.server("s1", "127.0.0.1", {"STAPES_PAUSE_AT": "source-after-checkpoint"})
    s2 = cluster.server("s2", "127.0.0.2", {"STAPES_PAUSE_AT": "target-before-commit"})
    cli = cluster.cli()
    cli.trust(s1, "s1")
    cli.trust(s2, "s2")
    cli.run("launch", "s1:busybox", "c1", "-q")
    marker = "only-in-memory-" + "7f3a" * 4
    cli.run("exec", "s1:c1", "--", "sh", "-c",
            f"setsid sh -c 'x=$(echo {marker[:10]})$(echo {marker[10:]}); while true; do sleep 1; done' "
            "</dev/null >/dev/null 2>&1 &")
    move = subprocess.Popen([STAPES, "move", "s1:c1", "s2:"], env=cli.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for server, point in ((s1, "source-after-checkpoint"), (s2, "target-before-commit")):
            paused = server.state_dir / f"paused-at-{point}"
            wait_for(paused.exists, 60, f"{server.name} to reach {point}")
            pages = list((server.state_dir / "migrations").glob("*/final/pages-*.img"))
            assert pages, f"no checkpoint on {server.name} to probe"
            assert any(marker.encode() in p.read_bytes() for p in pages), "the witness is not in the memory"
            paths = every_path(server.state_dir / "migrations")
            assert reachable_by_nobody(paths) == {}, server.name
            everything = [p for p in every_path(server.state_dir) if "/paused-at-" not in p]  # the test's own
            assert reachable_by_nobody(everything) == _public(server), server.name
            paused.unlink()
        _, err = move.communicate(timeout=120)
        assert move.returncode == 0, err
    finally:
        if move.poll() is None:
            move.kill()
            move.communicate()
    assert [i["status"] for i in cli.json("list", "s2:")] == ["Running"]
