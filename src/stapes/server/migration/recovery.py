"""A source server that stopped in the middle of a live move: the record it keeps of the move while it runs,
and what its next start does with it. The record is generic (which instance, whether it paused, whether the
target confirmed); what the instance's session left beside it is its driver's to resume from
(`InstanceDriver.recover_source`)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from stapes.server.instances.driver import InstanceSpec
from stapes.server.instances.service import InstanceService

log = logging.getLogger(__name__)
SOURCE_RECORD = "source.json"  # a source's live move: which instance, whether it paused, whether it moved


@dataclass(frozen=True)
class LeftCheckpoint:
    """A live move's record found at start: the source server stopped in the middle of the move."""

    directory: Path
    project: str
    name: str
    moved: bool  # the target had confirmed: the instance runs there
    complete: bool = True  # False: the server stopped while the instance was being paused


def record_move(directory: Path, spec: InstanceSpec, *, moved: bool, complete: bool = True) -> None:
    """Written (atomically) before the instance pauses, again once its state is complete, and once the
    target confirmed. Blocking."""
    record = {"project": spec.project, "name": spec.name, "moved": moved, "complete": complete}
    directory.mkdir(parents=True, exist_ok=True)  # a session may keep nothing of its own there
    temporary = directory / f".{SOURCE_RECORD}"
    temporary.write_text(json.dumps(record))
    temporary.rename(directory / SOURCE_RECORD)


def forget_move(directory: Path) -> None:
    """A live copy runs here again: a restart has nothing to put back. Blocking."""
    (directory / SOURCE_RECORD).unlink(missing_ok=True)


def left_checkpoints(migrations: Path) -> list[LeftCheckpoint]:
    """The working directories that hold a source's record (ours, still read with care: a broken one is left
    out, and its directory removed). Blocking."""
    found = []
    for directory in sorted(migrations.iterdir()) if migrations.is_dir() else []:
        try:
            record = json.loads((directory / SOURCE_RECORD).read_text())
            project, name, moved = record["project"], record["name"], record["moved"]
            complete = record.get("complete", True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if isinstance(project, str) and isinstance(name, str) and isinstance(moved, bool) \
                and isinstance(complete, bool):
            found.append(LeftCheckpoint(directory, project, name, moved, complete))
    return found


async def remove_leftovers(migrations: Path) -> list[LeftCheckpoint]:
    """At start, before any migration runs: the working directories a crash left behind are removed, but
    for the records of instances this server was moving live (`recover` deals with those)."""
    left = await asyncio.to_thread(left_checkpoints, migrations)
    kept = {c.directory for c in left}
    if migrations.exists():
        for directory in await asyncio.to_thread(lambda: list(migrations.iterdir())):
            if directory not in kept:
                await asyncio.to_thread(shutil.rmtree, directory, True)
    return left


async def recover(instances: InstanceService, left: list[LeftCheckpoint]) -> None:
    """After a crash of this (source) server in the middle of a live move, before instances start again:
    one the target did not confirm runs again from its state, its processes as they were (not booted
    afresh); one the target confirmed stays stopped here, as it runs there."""
    for checkpoint in left:
        try:
            row = await instances.get(checkpoint.project, checkpoint.name)
            if checkpoint.moved:
                await instances.driver(row.type).release_moved(await instances.spec(row))
                await instances.record_power_state(row.project, row.name, running=False)
                log.warning("%s moved live to another server before this one stopped: it stays stopped here; "
                            "delete it here once it runs there", row.name)
                continue
            spec = await instances.spec(row)
            driver = instances.driver(row.type)
            if not await driver.recover_source(spec, checkpoint.directory, complete=checkpoint.complete):
                log.warning("%s was being checkpointed when this server stopped; the checkpoint did not "
                            "complete, so it ran on (or boots afresh if it was stopped)", row.name)
                continue
            log.warning("%s was being moved live when this server stopped: it runs again here, from its "
                        "checkpoint", row.name)
        except Exception as err:  # one instance never keeps the server down
            log.warning("could not put %s back from its checkpoint (%s): it boots afresh if it was running",
                        checkpoint.name, err)
        finally:
            await asyncio.to_thread(shutil.rmtree, checkpoint.directory, True)
