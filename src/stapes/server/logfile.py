"""The daemon's own log: standard error (journald collects it under systemd) and `<state>/logs/stapesd.log`.

The file is root's alone (0600: a log may name instances, addresses and users), bounded in size (rotated at
10 MiB, five old files kept) and reopened on SIGHUP, so an external logrotate that moved it away works too.
Secrets never reach either: every record goes through `redact` (stapes.api.redact) first.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
from pathlib import Path

from stapes.api.redact import redact

LOG_NAME = "stapesd.log"
MAX_BYTES = 10 * 2**20
BACKUPS = 5
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class RedactingFormatter(logging.Formatter):
    """Whatever a message or an exception's text holds (aiohttp's errors carry the URL they failed on, with
    its `?secret=`), secrets come out as `secret=<redacted>`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are created 0600 (whatever the umask) and that `reopen()`s."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # an older file, or one made by someone else, is made private too
        return io.TextIOWrapper(os.fdopen(fd, "ab"), encoding=self.encoding or "utf-8", errors=self.errors,
                                line_buffering=False)

    def reopen(self) -> None:
        """After logrotate moved the file away (SIGHUP): the next record goes to a new file at the path."""
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def setup(state_dir: Path, *, verbose: bool = False) -> PrivateRotatingFileHandler | None:
    """Log to stderr and to the state directory's log file; returns the file's handler (None when the file
    cannot be written: the daemon still runs, logging to stderr, and says why)."""
    formatter = RedactingFormatter(FORMAT)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    stderr = logging.StreamHandler()
    stderr.setFormatter(formatter)
    root.addHandler(stderr)
    logs = state_dir / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        handler = PrivateRotatingFileHandler(logs / LOG_NAME, maxBytes=MAX_BYTES, backupCount=BACKUPS)
    except OSError as err:
        logging.getLogger("stapesd").warning("cannot write the log file in %s: %s (logging to stderr only)",
                                             logs, err)
        return None
    handler.setFormatter(formatter)
    root.addHandler(handler)
    return handler
