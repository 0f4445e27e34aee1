"""What an exec session holds back and reports when a command cannot be executed (pure parts)."""

from __future__ import annotations

from stapes.server.instances.exec_session import _Head, window_size
from stapes.server.instances.lxc import LxcDriver, exec_failure

REPORT = b'lxc-attach: c1: ../src/lxc/attach.c: lxc_attach_run_command: 1841 No such file or directory - ' \
         b'Failed to exec "nosuch"\n'


def test_exec_failure_needs_the_report_and_the_status() -> None:
    assert exec_failure(REPORT, 127) == "Command not found"
    assert exec_failure(REPORT.replace(b"No such file", b"Permission denied"), 126) == "Command not executable"
    assert exec_failure(REPORT, 1) is None
    assert exec_failure(b"sh: nosuch: not found\n", 127) is None


class _Driver:
    exec_failure_prefix = LxcDriver.exec_failure_prefix

    def exec_failure(self, head: bytes, code: int) -> str | None:
        return exec_failure(head, code)


def test_head_holds_only_what_starts_as_the_report() -> None:
    head = _Head(_Driver())  # type: ignore[arg-type]
    assert head.take(b"/ # ") == b"/ # "
    assert head.take(b"more") == b"more"
    head = _Head(_Driver())  # type: ignore[arg-type]
    assert head.take(REPORT[:12]) == b"" and head.take(REPORT[12:]) == b""
    assert head.finish(127) == b"" and head.failure(127) == "Command not found"
    head = _Head(_Driver())  # type: ignore[arg-type]
    assert head.take(REPORT) == b"" and head.finish(0) == REPORT


def test_window_sizes_from_control_messages() -> None:
    assert window_size("80") == 80 and window_size(24) == 24
    for bad in (0, -1, 10001, "x", None, True, [80], 1.5):
        assert window_size(bad) is None
