"""Probes run as the host's unprivileged user `nobody`, as a hostile local user would: what it can read, list,
run or connect to under a server's state directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
PYTHON = "/usr/bin/python3"  # Debian's: the venv's interpreter may live where nobody cannot go

_PROBE = r"""
import json, os, stat, sys
found = []
for path in json.load(sys.stdin):
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            os.listdir(path)
            found.append(["list", path])
        elif stat.S_ISREG(mode):
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
            found.append(["read", path])
        else:
            found.append(["reach", path])
    except OSError:
        pass
print(json.dumps(found))
"""


def run_as_nobody(*argv: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_NOBODY, *argv], input=input, capture_output=True, text=True, timeout=timeout,
                          check=False, cwd="/")


def every_path(root: Path) -> list[str]:
    """Everything below `root`, as root sees it (no link followed, no other filesystem entered)."""
    found = [str(root)]
    device = root.stat().st_dev
    for top, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            found.append(os.path.join(top, name))
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(top, d)).st_dev == device]
    return found


def reachable_by_nobody(paths: list[str]) -> dict[str, str]:
    """Of `paths`, those nobody can list (a directory), read (a file) or at least reach (anything else): path ->
    how. Only symlinks are left out (lstat of one says nothing of what it points to)."""
    result = run_as_nobody(PYTHON, "-c", _PROBE, input=json.dumps([p for p in paths if not os.path.islink(p)]))
    assert result.returncode == 0, result.stderr
    return {path: how for how, path in json.loads(result.stdout)}
