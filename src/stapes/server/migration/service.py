"""Moving an instance between servers: the facade the REST handlers and the daemon call.

Source (source.py): offers a header on the control channel, sends the volume on the fs channel with the
transport the target chose, then reports its own result and waits for the target's. Target (sink.py):
reserves the instance, answers the header, receives into a new volume, defines the instance, and confirms;
on any failure or cancellation it removes everything it created. The source instance is never modified:
deleting it after a move is the client's step, taken only once both sides reported success.

A live move adds the instance's running state through its driver's sessions only (instances/driver.py:
`LiveSource`, `LiveTarget`); this package keeps the channels, the header, the control messages and the
commit-or-rollback decision. Between two Stapes servers the started copy is held until the source, having
recorded that it gave its own copy up, says so: two copies never run, whichever server dies when
(recovery.py; docs/reliability.md lists the kill points).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from stapes.api.requests import InstanceSource, MigrationTarget
from stapes.server.instances.service import InstanceService
from stapes.server.migration import recovery
from stapes.server.migration.channels import CHANNELS, channel_names, open_channels
from stapes.server.migration.recovery import LeftCheckpoint
from stapes.server.migration.sink import MigrationSink
from stapes.server.migration.source import MigrationSource
from stapes.server.operations import Operation
from stapes.server.paths import StatePaths
from stapes.server.store.db import InstanceRow
from stapes.server.streams import Channel

__all__ = ["LeftCheckpoint", "MigrationService", "channel_names"]


class MigrationService:
    def __init__(self, instances: InstanceService, paths: StatePaths) -> None:
        self._instances = instances
        self._paths = paths
        self._source = MigrationSource(instances, paths)
        self._sink = MigrationSink(instances, paths)

    async def remove_leftovers(self) -> list[LeftCheckpoint]:
        """At start, before any migration runs: the working directories a crash left behind are removed, but
        for the live moves this server was the source of (`recover` deals with those)."""
        return await recovery.remove_leftovers(self._paths.migrations)

    async def recover(self, left: list[LeftCheckpoint]) -> None:
        """After a crash of this (source) server in the middle of a live move, before instances start again."""
        await recovery.recover(self._instances, left)

    @contextlib.asynccontextmanager
    async def channels(self, op: Operation, peer: MigrationTarget | InstanceSource | None, peer_name: str,
                       names: Sequence[str] = CHANNELS) -> AsyncIterator[dict[str, Channel]]:
        """A migration's websockets (also a custom volume's, volumes.py): dialled or waited for."""
        async with open_channels(op, self._paths, peer, peer_name, names) as channels:
            yield channels

    async def check_source(self, project: str, name: str, live: bool) -> None:
        await self._source.check(project, name, live)

    async def run_source(self, op: Operation, project: str, name: str, target: MigrationTarget | None,
                         transport: str | None = None, instance_only: bool = False, live: bool = False,
                         keep_running: bool = False) -> None:
        await self._source.run(op, project, name, target, transport, instance_only, live, keep_running)

    async def run_sink(self, op: Operation, row: InstanceRow, source: InstanceSource) -> None:
        await self._sink.run(op, row, source)

    async def run_refresh(self, op: Operation, row: InstanceRow, source: InstanceSource) -> None:
        await self._sink.run_refresh(op, row, source)
