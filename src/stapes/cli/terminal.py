"""The user's terminal during an interactive session (exec, console): raw while it runs, restored after."""

from __future__ import annotations

import contextlib
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from types import FrameType

# Ended by these, the client still restores the terminal (SIGKILL cannot be caught: `stty sane` or `reset`
# repairs a terminal a killed client left raw).
RESTORING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _exit_on(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """stdin in raw mode while the body runs (keys go to the session as typed, ^C included), and its settings
    restored however the body ends: a return, an error, SIGTERM or SIGHUP (an exit with 128 + the signal while
    nothing else handles them; an exec's own handlers forward them first)."""
    if not enabled:
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    previous = {sig: signal.signal(sig, _exit_on) for sig in RESTORING_SIGNALS}
    try:
        tty.setraw(fd)
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):  # a hung-up terminal has nothing to restore
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
