"""The guest agent's binary: agent/stapes-agent.c built static with the host's gcc, cached by its source's hash."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from stapes.api.errors import PreconditionFailed

SOURCE_NAME = "stapes-agent.c"
CFLAGS = ("-static", "-O2", "-Wall", "-s")


def agent_source() -> Path:
    """The C source: STAPES_AGENT_SOURCE, else the repository's agent/ (an editable install, as make install)."""
    override = os.environ.get("STAPES_AGENT_SOURCE")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[4] / "agent" / SOURCE_NAME


def build_agent(cache: Path) -> Path:
    """The static agent binary (blocking: run it in a thread). Built once per source version into `cache`."""
    source = agent_source()
    try:
        text = source.read_bytes()
    except OSError as err:
        raise PreconditionFailed(f"The guest agent's source {source} cannot be read ({err.strerror}): set "
                                 "STAPES_AGENT_SOURCE to agent/stapes-agent.c") from None
    digest = hashlib.sha256(text + " ".join(CFLAGS).encode()).hexdigest()[:16]
    binary = cache / f"stapes-agent-{digest}"
    if binary.exists():
        return binary
    if shutil.which("gcc") is None:
        raise PreconditionFailed("gcc is not installed: the guest agent is built with it (scripts/setup-vm.sh "
                                 "installs gcc and libc6-dev)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stapes-agent-", dir=cache) as tmp:
        built = Path(tmp) / "stapes-agent"
        result = subprocess.run(["gcc", *CFLAGS, "-o", str(built), str(source), "-lutil"], capture_output=True,
                                text=True, timeout=300)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            raise PreconditionFailed(f"The guest agent did not build: {' / '.join(lines[-3:])} (a static glibc "
                                     "comes with libc6-dev)")
        built.chmod(0o755)
        os.replace(built, binary)
    return binary
