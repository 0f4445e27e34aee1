"""Moving an instance between servers: the source and target (sink) halves of one migration.

Source: offers a header on the control channel, sends the volume on the fs channel with the transport the
target chose, then reports its own result and waits for the target's. Target: reserves the instance, answers
the header, receives into a new volume, defines the instance, and confirms; on any failure or cancellation
it removes everything it created. The source instance is never modified: deleting it after a move is the
client's step, taken only once both sides reported success.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from stapes.api.errors import BadRequest, InternalError, StapesError
from stapes.api.status import StatusCode
from stapes.server import process
from stapes.server.instances.service import InstanceService
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration import protocol, transports
from stapes.server.migration.channel import Channel, ChannelClosed
from stapes.server.migration.dial import dial
from stapes.server.migration.progress import Progress
from stapes.server.operations import Operation
from stapes.server.paths import StatePaths
from stapes.server.store.db import InstanceRow

log = logging.getLogger(__name__)
CHANNELS = ("control", "fs")
CONNECT_TIMEOUT = 60.0
FULL_MARGIN = 2**20  # less free than this after a failed receive: the pool filled up


async def _volume_bytes(path: Path) -> int:
    result = await process.run(["du", "-s", "-B1", "--apparent-size", str(path)], check=False)
    try:
        return int(result.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


def _progress(op: Operation, stage: str, total: int) -> Progress:
    def publish(figures: dict[str, Any]) -> None:
        op.update_metadata(fs_progress=figures["text"], progress=figures)

    return Progress(stage, total, publish)


async def _send_control(control: Channel, success: bool, message: str = "") -> None:
    await control.send(pb.MigrationControl(success=success, message=message).SerializeToString())


async def _receive_control(control: Channel) -> pb.MigrationControl:
    data = await control.receive()
    if data is None:
        raise InternalError("Protocol error: an empty message on the control channel")
    message: pb.MigrationControl = pb.MigrationControl.FromString(data)
    return message


async def _peer_reason(control: Channel, fallback: StapesError | BaseException) -> str:
    """When a transfer breaks, the other side usually said why on the control channel: prefer that."""
    with contextlib.suppress(Exception):
        reply = await asyncio.wait_for(_receive_control(control), 2)
        if not reply.success and reply.message:
            return reply.message
    return fallback.message if isinstance(fallback, StapesError) else str(fallback)


class MigrationService:
    def __init__(self, instances: InstanceService, paths: StatePaths) -> None:
        self._instances = instances
        self._paths = paths

    @contextlib.asynccontextmanager
    async def _channels(self, op: Operation, peer: dict[str, Any] | None) -> AsyncIterator[dict[str, Channel]]:
        """Dial the peer's operation (pull target, push source) or wait for the peer to dial ours."""
        if peer is not None:
            async with dial(str(peer.get("operation") or ""), dict(peer.get("secrets") or {}), CHANNELS,
                            str(peer.get("certificate") or ""), self._paths.server_cert,
                            self._paths.server_key) as channels:
                yield channels
            return
        try:
            sockets = {name: await op.channel(name, CONNECT_TIMEOUT) for name in CHANNELS}
        except TimeoutError:
            raise InternalError("The other side never connected to the migration websockets") from None
        channels = {name: Channel(name, ws) for name, ws in sockets.items()}
        try:
            yield channels
        finally:
            for channel in channels.values():
                await channel.close()
            for name in CHANNELS:
                op.release(name)

    # source
    async def check_source(self, project: str, name: str, live: bool) -> None:
        row = await self._instances.get(project, name)
        if live:
            raise BadRequest("Live migration is not supported yet: stop the instance, or move it with --stateless")
        status = await self._instances.status(row)
        if status != StatusCode.STOPPED:
            raise BadRequest(
                f"Instance {name!r} is running: stop it first, or use --stateless to stop it, move it and start it "
                "on the target")

    async def run_source(self, op: Operation, project: str, name: str, target: dict[str, Any] | None,
                         transport: str | None = None) -> None:
        """`transport` narrows what we offer (benchmarks, tests); rsync stays the fallback."""
        async with self._instances.locked(project, name):
            await self.check_source(project, name, live=False)
            row = await self._instances.get(project, name)
            spec = await self._instances.spec(row)
            pool = await self._instances.pool_of(spec)
            async with self._channels(op, target) as channels:
                sendable = tuple(t for t in pool.migration_transports if transport in (None, t))
                await self._send(op, channels["control"], channels["fs"], spec.volume, sendable)

    async def _send(self, op: Operation, control: Channel, fs: Channel, volume: Path,
                    sendable: tuple[str, ...]) -> None:
        total = await _volume_bytes(volume)
        await control.send(protocol.offer_header(sendable, refresh=False, total_bytes=total).SerializeToString())
        reply = await control.receive()
        if reply is None:
            raise InternalError("Protocol error: the target answered the migration header with nothing")
        answer = pb.MigrationHeader.FromString(reply)
        transport = protocol.chosen_transport(answer)
        op.update_metadata(transport=transport)
        progress = _progress(op, "fs", total)
        try:
            await transports.send(transport, volume, fs, progress, protocol.rsync_features(answer))
        except (StapesError, OSError) as err:
            reason = await _peer_reason(control, err)
            with contextlib.suppress(Exception):
                await _send_control(control, False, reason)
            raise InternalError(f"Transfer to the target failed: {reason}") from None
        progress.publish()
        await _send_control(control, True)
        result = await _receive_control(control)
        if not result.success:
            raise InternalError(f"The target failed: {result.message}")

    # target
    async def run_sink(self, op: Operation, row: InstanceRow, source: dict[str, Any]) -> None:
        mode = source.get("mode") or "pull"
        peer = source if mode == "pull" else None

        async with self._channels(op, peer) as channels:
            control, fs = channels["control"], channels["fs"]

            async def fill(volume: Path) -> None:
                data = await control.receive()
                if data is None:
                    raise InternalError("Protocol error: the source sent an empty migration header")
                offer = pb.MigrationHeader.FromString(data)
                pool = await self._instances.pool_of(await self._instances.spec(row))
                answer, transport = protocol.answer_header(offer, pool.migration_transports)
                await control.send(answer.SerializeToString())
                op.update_metadata(transport=transport)
                progress = _progress(op, "fs", offer.stapesTotalBytes)
                try:
                    await transports.receive(transport, volume, fs, progress, protocol.rsync_features(answer))
                except (StapesError, OSError) as err:
                    usage = await pool.usage()
                    if usage["total"] - usage["used"] < FULL_MARGIN:
                        raise InternalError(
                            f"Storage pool {pool.pool!r} is full ({usage['total'] // 2**20} MiB, "
                            f"{offer.stapesTotalBytes // 2**20} MiB needed): free space or choose another "
                            "pool with -s") from None
                    reason = await _peer_reason(control, err)
                    raise InternalError(f"Receiving from the source failed: {reason}") from None
                progress.publish()
                result = await _receive_control(control)
                if not result.success:
                    raise InternalError(f"The source failed: {result.message}")

            async def confirm() -> None:
                await _send_control(control, True)

            try:
                await self._instances.create_with(row, fill, confirm)
            except BaseException as err:
                message = err.message if isinstance(err, StapesError) else (
                    "cancelled" if isinstance(err, asyncio.CancelledError) else str(err))
                with contextlib.suppress(Exception):
                    await asyncio.shield(_send_control(control, False, message))
                if isinstance(err, ChannelClosed):
                    raise InternalError(f"The source went away during the transfer: {err.message}") from None
                raise
