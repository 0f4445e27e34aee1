"""Issue 17: errors that lead with the cause and never show a secret, usage errors in one line, figures in
units people read, the daemon's private log file (pure pieces)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from stapes.api.redact import redact
from stapes.api.timefmt import NEVER, iso
from stapes.cli import units
from stapes.cli.errors import usage_message
from stapes.client.failures import SideFailure, failure_message, is_consequence
from stapes.server import logfile
from stapes.server.networks.bridge import bridge_mac

SECRET = "3b37070fdf58dc4aa6061fce2c5c368c93a27e59210f47b1ec8ec854efac767c"
AIOHTTP_403 = (f"403, message='Invalid response status', url='https://127.0.0.1:36763/1.0/operations/aa37/"
               f"websocket?secret={SECRET}'")


def test_redact_removes_every_secret_form() -> None:
    for text in (AIOHTTP_403, f"URL('https://h/1.0/operations/x/websocket?secret={SECRET}&a=1')",
                 f"{{'control': '{SECRET}', 'fs': '{SECRET}'}}", f'{{"secret": "{SECRET}"}}',
                 f"/websocket?token={SECRET}"):
        out = redact(text)
        assert SECRET not in out, out
        assert "<redacted>" in out
    fingerprint = "ab" * 32  # a certificate's fingerprint is no secret: it stays
    assert redact(f"certificate {fingerprint} does not match") == f"certificate {fingerprint} does not match"


LAZY_REASON = ("Instance 'u1' has migration.lazy=true, but an unprivileged container's restore needs userfaultfd "
               "inside its user namespace, which this host allows only with vm.unprivileged_userfaultfd=1")


def test_the_root_cause_comes_first_and_the_consequence_is_short() -> None:
    refused = "The source refused the control websocket with HTTP 403 (its operation had ended)"
    message = failure_message([SideFailure("target", "s2", refused), SideFailure("source", "s1", LAZY_REASON)])
    assert message.startswith(f"Migration failed on the source (s1): {LAZY_REASON}"), message
    assert message.endswith("; the target (s2) stopped too: " + refused), message

    echoed = f"The target failed: {LAZY_REASON}"
    message = failure_message([SideFailure("source", "s1", echoed), SideFailure("target", "s2", LAZY_REASON)])
    assert message == (f"Migration failed on the target (s2): {LAZY_REASON}; the source (s1) stopped too: "
                       "The target failed")
    # where the instance runs now is the side's outcome: it is kept whole, after the gist
    resumed = f"The target failed: {LAZY_REASON} ('c1' runs on the source again)"
    message = failure_message([SideFailure("source", "s1", resumed), SideFailure("target", "s2", LAZY_REASON)])
    assert message.endswith("; the source (s1) stopped too: The target failed ('c1' runs on the source again)"), \
        message
    # two causes of their own: both, the target's first (as before)
    both = failure_message([SideFailure("source", "s1", "disk full"), SideFailure("target", "s2", "no pool")])
    assert both == "Migration failed on the target (s2): no pool; and on the source (s1): disk full"
    # a secret in any of them is redacted
    assert SECRET not in failure_message([SideFailure("target", "s2", f"Cannot open: {AIOHTTP_403}")])
    assert is_consequence("The control connection was lost: reset")
    assert not is_consequence("Cannot open the control websocket of https://h:1/1.0/operations/x: refused")


def _command() -> click.Group:
    @click.group()
    def top() -> None:
        pass

    @top.command(name="exec")
    @click.argument("name")
    @click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
    def exec_(name: str, command: tuple[str, ...]) -> None:
        pass

    @top.command(name="list")
    @click.argument("remote", required=False)
    @click.option("--columns")
    def list_(remote: str | None, columns: str | None) -> None:
        pass

    return top


@pytest.mark.parametrize(("args", "expected"), [
    (["exec"], "missing argument NAME: stapes exec NAME -- COMMAND...; see 'stapes exec --help'"),
    (["exec", "c1"], "missing argument COMMAND: stapes exec NAME -- COMMAND...; see 'stapes exec --help'"),
    (["list", "--colums"], "no such option --colums (did you mean --columns?): stapes list [REMOTE]; "
                           "see 'stapes list --help'"),
    (["nosuch"], "no such command 'nosuch'; see 'stapes --help'"),
])
def test_usage_errors_are_one_line(args: list[str], expected: str) -> None:
    with pytest.raises(click.UsageError) as caught:
        _command().main(args, prog_name="stapes", standalone_mode=False)
    assert usage_message(caught.value) == expected


def test_the_stapes_command_prints_usage_errors_in_one_line() -> None:
    from stapes.cli.main import cli

    result = CliRunner().invoke(cli, ["exec"], prog_name="stapes")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == ["Error: missing argument NAME: stapes exec NAME -- COMMAND...; see 'stapes exec --help'"], lines


def test_figures_in_units_people_read() -> None:
    assert units.size(512) == "512B"
    assert units.size(int(9.85 * 2**20)) == "9.85MiB"
    assert units.size(3 * 2**30 // 2) == "1.50GiB"
    assert units.compact_size(110 * 2**20) == "110MiB"
    assert units.seconds(12_700_000_000) == "12"
    line = units.transfer({"bytes": int(9.85 * 2**20), "total": 110 * 2**20, "rate": 12 * 2**20, "percent": 9,
                           "eta": 8})
    assert line == "9% 9.85MiB/110MiB 12MiB/s ETA 8s"
    assert units.transfer({"bytes": 2**20, "rate": 2**20}) == "1.00MiB 1MiB/s"
    assert units.transfer({"stage": "building"}) == ""
    assert units.duration(125) == "2m05s"
    assert units.when(NEVER) == "never" and units.when("1970-01-01T00:00:00Z") == "never"
    assert units.when("2026-01-01T10:00:00Z") == "2026-01-01T10:00:00Z"
    assert iso(0, NEVER) == "0001-01-01T00:00:00Z"


def test_a_bridge_has_a_stable_mac_of_its_own() -> None:
    mac = bridge_mac("stapes:/var/lib/stapes:stapesbr0")
    assert mac == bridge_mac("stapes:/var/lib/stapes:stapesbr0") != bridge_mac("stapes:/var/lib/stapes:other")
    assert mac.startswith("00:16:3e:") and len(mac) == 17 and mac != "00:00:00:00:00:00"


def test_the_daemon_log_file_is_private_redacted_and_reopened(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    previous_umask = os.umask(0)  # whatever the umask, the file is root's alone
    try:
        handler = logfile.setup(tmp_path, verbose=False)
        assert handler is not None
        logging.getLogger("stapesd").info("dialing /websocket?secret=%s", SECRET)
        path = tmp_path / "logs" / "stapesd.log"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        text = path.read_text()
        assert "dialing /websocket?secret=<redacted>" in text and SECRET not in text
        path.rename(tmp_path / "logs" / "stapesd.log.1")  # logrotate, then SIGHUP
        handler.reopen()
        logging.getLogger("stapesd").info("after rotation")
        assert "after rotation" in path.read_text()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(previous_umask)
        for added in [h for h in root.handlers if h not in before]:
            root.removeHandler(added)
            added.close()
