"""Pause points for fault tests, so a test can kill a server at an exact step of a migration.

With `STAPES_PAUSE_AT=<point>` in the daemon's environment, reaching that point writes
`<state dir>/paused-at-<point>` and waits there (until the process is killed). Without the variable, each
point is a no-op. Points: source-before-header, target-before-header, source-before-commit,
target-before-commit.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

PAUSE_AT = os.environ.get("STAPES_PAUSE_AT", "")


async def pause_point(name: str, state_dir: Path) -> None:
    if name != PAUSE_AT:
        return
    await asyncio.to_thread((state_dir / f"paused-at-{name}").touch)
    await asyncio.sleep(3600)
