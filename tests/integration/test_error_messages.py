"""Errors that lead with the cause and say what to do, and never show a secret (issue 17, item 4)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.integration.harness import Cli, Server
from tests.integration.test_live_migration import _start_counter

_HEX_SECRET = re.compile(r"^[0-9a-f]{64}$")


def _operation_secrets(server: Server) -> set[str]:
    """Every websocket secret of the server's operations (running or finished, as the API lists them)."""
    found: set[str] = set()
    listing = server.api("GET", "/1.0/operations?recursion=1")

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and _HEX_SECRET.match(value):
            found.add(value)

    for op in (op for ops in listing.values() for op in ops or []):
        walk(op.get("metadata") or {})
    return found


def _logs(server: Server) -> str:
    """What the server wrote: its stderr (the harness's file) and its own log file."""
    own = server.state_dir / "logs" / "stapesd.log"
    return server.log() + (own.read_text(errors="replace") if own.exists() else "")


def test_a_lazy_move_the_target_refuses_says_why_first_and_shows_no_secret(s1: Server, s2: Server,
                                                                          two: Cli) -> None:
    """The source may move it (privileged), the target may not take it (unprivileged there): the reason
    (vm.unprivileged_userfaultfd) comes first, the source's consequential failure is short, and none of the
    operations' secrets appear in the CLI's output or either server's logs."""
    sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd")
    before = sysctl.read_text().strip()
    sysctl.write_text("0")
    try:
        two.run("launch", "s1:busybox", "c1", "-q", "-c", "migration.lazy=true", "-c", "security.privileged=true")
        _start_counter(two, "s1:c1")
        two.run("launch", "s1:busybox", "u1", "-q", "-c", "migration.lazy=true")
        cases = [(mode, "c1", "target (s2)", ("-c", "security.privileged=false")) for mode in ("pull", "push", "relay")]
        cases += [(mode, "u1", "source (s1)", ()) for mode in ("pull", "push", "relay")]
        for mode, name, side, extra in cases:
            result = two.run("move", f"s1:{name}", "s2:", *extra, "--mode", mode, "-q", check=False)
            assert result.returncode == 1, result
            err = result.stderr
            assert err.startswith(f"Error: Migration failed on the {side}: "), err
            assert err.count("\n") == 1, err
            assert "vm.unprivileged_userfaultfd=1" in err[:300], err
            assert len(err) < 600, f"{len(err)} characters: {err}"
            cause_at = err.index("vm.unprivileged_userfaultfd=1")
            assert "403" not in err[:cause_at] and "websocket" not in err[:cause_at], err
            for noise in ("websocket?", "secret=", "URL(", "/1.0/operations/"):
                assert noise not in err, f"{noise!r} in {err}"
            assert [i["status"] for i in two.json("list", "s1:")] == ["Running", "Running"], mode
            assert two.json("list", "s2:") == [], mode
            secrets = _operation_secrets(s1) | _operation_secrets(s2)
            assert len(secrets) >= 3, secrets
            shown = result.stdout + result.stderr + _logs(s1) + _logs(s2)
            leaked = [s for s in secrets if s in shown]
            assert not leaked, f"{len(leaked)} secrets in the output or logs ({mode})"
    finally:
        sysctl.write_text(before)
        two.run("delete", "s1:c1", "s1:u1", "--force", check=False)


def test_a_name_taken_on_the_target_names_it_and_says_what_to_do(s1: Server, s2: Server, two: Cli) -> None:
    two.run("init", "s1:busybox", "c1", "-q")
    two.run("init", "s2:busybox", "c1", "-q")
    for command in ("copy", "move"):
        err = two.fails(command, "s1:c1", "s2:")
        assert err.count("\n") == 1, err
        assert "already exists on s2" in err, err
        assert "s2:NEWNAME" in err, err
    assert [i["name"] for i in two.json("list", "s1:")] == ["c1"]


def test_usage_errors_are_one_line_that_says_what_to_do(cli: Cli) -> None:
    cases = {
        ("exec",): ("missing argument NAME", "see 'stapes exec --help'"),
        ("exec", "c1"): ("missing argument COMMAND", "see 'stapes exec --help'"),
        ("launch",): ("missing argument", "see 'stapes launch --help'"),
        ("move", "c1", "s2:", "--mode", "sideways"): ("--mode", "see 'stapes move --help'"),
        ("list", "--bogus"): ("no such option --bogus", "see 'stapes list --help'"),
        ("nosuchcommand",): ("no such command 'nosuchcommand'", "see 'stapes --help'"),
        ("snapshot", "create"): ("missing argument", "see 'stapes snapshot create --help'"),
    }
    for args, expected in cases.items():
        result = cli.run(*args, check=False)
        assert result.returncode == 2, (args, result)
        assert result.stderr.startswith("Error: "), (args, result.stderr)
        assert result.stderr.count("\n") == 1, (args, result.stderr)
        for part in expected:
            assert part in result.stderr, (args, result.stderr)
    usage = cli.run("exec", check=False).stderr
    assert "stapes exec NAME" in usage, usage
    json.dumps(usage)
