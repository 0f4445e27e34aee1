"""Moving a custom storage volume between servers: the source and target halves, on the same channels,
header negotiation and transports as an instance's migration (control + fs websockets; btrfs, tar-stream or
rsync as both pools' drivers declare). No snapshots, no live state: a volume is files only.

Source: `POST /1.0/storage-pools/<p>/volumes/custom/<v> {migration: true}` offers the header, sends the
volume with the transport the target chose, says "all sent" and waits for the target's word. Target:
`POST /1.0/storage-pools/<p>/volumes/custom {name, source: {type: migration, ...}}` reserves the name,
answers, receives into a new volume, records it and confirms; on any failure it removes what it received
(`VolumeService.create_with`). The source volume is never modified; a move deletes it only after both sides
reported success (the client's step).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from stapes.api.errors import InternalError
from stapes.api.requests import InstanceSource, MigrationTarget
from stapes.server.migration import protocol
from stapes.server.migration.channels import (
    CHANNELS,
    progress_of,
    receive_control,
    received_alongside_control,
    report_failure,
    send_control,
    send_over,
    source_finished,
    stream_bytes,
)
from stapes.server.migration.service import MigrationService
from stapes.server.operations import Operation
from stapes.server.storage.base import PoolDriver
from stapes.server.storage.bound import ReceiveBound
from stapes.server.storage.service import open_transport
from stapes.server.storage.volumes import VolumeService
from stapes.server.store.db import VolumeRow
from stapes.server.streams import Channel

__all__ = ["CHANNELS", "VolumeMigration"]


class VolumeMigration:
    def __init__(self, volumes: VolumeService, migration: MigrationService) -> None:
        self._volumes = volumes
        self._migration = migration  # its channels: dialled (pull target, push source) or waited for

    async def run_source(self, op: Operation, pool: str, project: str, name: str,
                         target: MigrationTarget | None) -> None:
        row = await self._volumes.get(pool, project, name)
        path = await self._volumes.path(row)
        driver = await self._volumes.driver(row.pool)
        async with self._migration.channels(op, target, "target", CHANNELS) as channels:
            await self._send(op, channels, path, driver)
            op.settle()

    async def _send(self, op: Operation, channels: dict[str, Channel], path: Path, pool: PoolDriver) -> None:
        control, fs = channels["control"], channels["fs"]
        total = await stream_bytes(path)
        header = protocol.offer_header(pool.migration_transports, refresh=False, total_bytes=total)
        await control.send(header.SerializeToString())
        answer = protocol.parse_header(await control.receive(), "target")
        transport = protocol.check_answer(answer, list(header.stapesTransports), [])
        op.update_metadata(transport=transport)
        progress = progress_of(op, "fs", total)
        sender = open_transport(transport, fs, progress, protocol.rsync_features(answer),
                                pool.config.get("rsync.bwlimit"))
        await send_over(control, sender, [path])
        progress.finish()
        await send_control(control, True)
        result = await receive_control(control)
        if not result.success:
            raise InternalError(f"The target failed: {result.message}")

    async def run_sink(self, op: Operation, row: VolumeRow, source: InstanceSource) -> None:
        peer = source if source.mode == "pull" else None
        async with self._migration.channels(op, peer, "source", CHANNELS) as channels:
            control = channels["control"]

            async def fill(path: Path, pool: PoolDriver) -> None:
                await self._receive(op, channels, path, pool)

            async def confirm() -> None:
                await send_control(control, True)

            await report_failure(control, self._volumes.create_with(row, fill, confirm))
            op.settle()
            await source_finished(control)

    async def _receive(self, op: Operation, channels: dict[str, Channel], path: Path, pool: PoolDriver) -> None:
        control, fs = channels["control"], channels["fs"]
        offer = protocol.parse_header(await control.receive(), "source")
        protocol.check_offer(offer)
        if offer.snapshotNames:
            raise protocol.ProtocolError("Volume snapshots are not supported yet: copy the volume without them "
                                         "(--volume-only)")
        answer, transport = protocol.answer_header(offer, pool.migration_transports, [])
        await control.send(answer.SerializeToString())
        op.update_metadata(transport=transport)
        progress = progress_of(op, "fs", offer.stapesTotalBytes)
        receiver = open_transport(transport, fs, progress, protocol.rsync_features(answer))
        declared = offer.stapesTotalBytes if offer.stapesTransports and transport != protocol.RSYNC else None
        receiver.bound = ReceiveBound(pool.pool, pool.root, declared)
        said = asyncio.create_task(receive_control(control))
        transfer = asyncio.create_task(receiver.receive(path, snapshot=False))
        try:
            await received_alongside_control(said, transfer, offer)
            if path.is_symlink() or not path.is_dir():
                raise InternalError("The received volume is not a directory")
        finally:
            for task in (said, transfer):
                task.cancel()
            await asyncio.gather(said, transfer, return_exceptions=True)
            await asyncio.shield(receiver.close())
        progress.finish()
