"""Pause points for fault tests, so a test can kill a server at an exact step of a migration.

With `STAPES_PAUSE_AT=<point>` in the daemon's environment, reaching that point writes
`<state dir>/paused-at-<point>` and waits there until the process is killed or the test removes the file.
With `STAPES_FAIL_AT=<point>`, reaching it fails the migration there. Without the variables, each point is a
no-op. Points: source-before-header, target-before-header, source-before-commit, target-before-commit, and
for live moves source-before-checkpoint, source-after-checkpoint (the instance is stopped on the source),
target-before-state (the target reads no state yet: the source's streamed pages back up),
source-after-handover (the target confirmed a live move; the source has not cleaned up yet),
source-before-memory (a lazy move: all but the memory sent, the target restoring; no page served yet).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from stapes.api.errors import InternalError

PAUSE_AT = os.environ.get("STAPES_PAUSE_AT", "")
FAIL_AT = os.environ.get("STAPES_FAIL_AT", "")


async def pause_point(name: str, state_dir: Path) -> None:
    if name == FAIL_AT:
        raise InternalError(f"Failed on purpose at {name} (STAPES_FAIL_AT)")
    if name != PAUSE_AT:
        return
    marker = state_dir / f"paused-at-{name}"
    await asyncio.to_thread(marker.touch)
    for _ in range(36000):
        if not await asyncio.to_thread(marker.exists):
            return
        await asyncio.sleep(0.1)
