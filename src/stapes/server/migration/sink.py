"""The target (sink) half of an instance's migration: reserve the instance, answer the header, receive into a
new volume, define the instance and confirm; on any failure or cancellation remove everything it created.

A live move, in the service's terms (the bytes are the session's, instances/driver.py): the driver's target
session prepares before the answer goes, receives the state once the volume is here, is checked, and starts
the defined instance; the service then confirms. In a handover the started copy is held until the source
says it gave its own up; then the session releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

from stapes.api.errors import BadRequest, InternalError, NotFound, StapesError
from stapes.api.requests import InstanceSource
from stapes.api.status import StatusCode
from stapes.server.faults import pause_point
from stapes.server.idmap import unshift
from stapes.server.instances.driver import InstanceDriver, LiveLink, LiveTarget, LiveTerms
from stapes.server.instances.service import InstanceService
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration import protocol
from stapes.server.migration.channels import (
    channel_names,
    open_channels,
    progress_of,
    receive_control,
    received_alongside_control,
    report_failure,
    send_control,
    source_finished,
)
from stapes.server.migration.peer_snapshots import check_peer_snapshot
from stapes.server.operations import Operation
from stapes.server.paths import StatePaths
from stapes.server.storage.base import BLOCK, PoolDriver, Volume
from stapes.server.storage.bound import DeclaredSizeExceeded, PoolFull, ReceiveBound
from stapes.server.storage.service import open_transport
from stapes.server.storage.transfer import Transport
from stapes.server.store.db import InstanceRow
from stapes.server.streams import Channel

FULL_MARGIN = 2**20  # less free than this after a failed receive: the pool filled up



def remove_special_entries(volume: Path) -> list[str]:
    """Removes every entry of a VM volume that is neither a directory nor a regular file (symlinks, devices,
    sockets, FIFOs: what a refresh's peer may have sent); returns their paths inside the volume. Blocking."""
    removed = []
    for top, dirs, files in os.walk(volume):  # follows no links: a symlink to a directory is listed in dirs
        for name in (*dirs, *files):
            path = os.path.join(top, name)
            if not (stat.S_ISDIR(mode := os.lstat(path).st_mode) or stat.S_ISREG(mode)):
                os.unlink(path)
                removed.append(os.path.relpath(path, volume))
    return sorted(removed)

class MigrationSink:
    def __init__(self, instances: InstanceService, paths: StatePaths) -> None:
        self._instances = instances
        self._paths = paths

    async def run(self, op: Operation, row: InstanceRow, source: InstanceSource) -> None:
        """A new instance: everything it received is removed again if anything fails."""
        async with self._channels(op, source) as channels:
            control = channels["control"]
            driver = self._instances.driver(row.type)
            directory = self._paths.migrations / op.id
            live = driver.live_target(await self._instances.spec(row), directory) if source.live else None

            async def fill(volume: Path) -> None:
                try:
                    await self._receive(op, channels, row, volume, refresh=False, live=live)
                except BaseException:
                    if live is not None:  # prepared (a listening hypervisor, say): undone before the volume goes
                        await asyncio.shield(live.abort())
                    raise

            async def confirm() -> None:
                if live is not None:
                    await self._start(op, channels, row, live)
                    return
                await pause_point("target-before-commit", self._paths.root)
                await send_control(control, True)

            try:
                await report_failure(control, self._instances.create_with(row, fill, confirm))
            finally:
                if live is not None:
                    await asyncio.to_thread(shutil.rmtree, directory, True)
            op.settle()
            await source_finished(control)

    def _link(self, op: Operation, channels: dict[str, Channel], volume: Path, features: list[str],
              receiver: Transport | None = None) -> LiveLink:
        return LiveLink(state=channels["criu"], fs=channels["fs"], volume=volume, rsync_features=features,
                        report=op.update_metadata, reached=self._reached,
                        admit=receiver.bound.delta if receiver is not None and receiver.bound else None)

    async def _reached(self, name: str) -> None:
        await pause_point(name, self._paths.root)

    async def _start(self, op: Operation, channels: dict[str, Channel], row: InstanceRow, live: LiveTarget) -> None:
        """The instance is defined; run it from the source's state and confirm. Whatever fails after the
        start began stops it again (create_with then removes the rest)."""
        control = channels["control"]
        spec = await self._instances.spec(row)
        live.spec = spec
        link = self._link(op, channels, spec.volume, [])
        op.update_metadata(live_stage="restore")
        started = time.monotonic()
        try:
            await live.start(link)
            row.config["volatile.last_state.power"] = "RUNNING"
            await pause_point("target-before-commit", self._paths.root)
            await send_control(control, True)
            if live.terms.handover:  # started, held: it runs only once the source says it gave its copy up
                op.update_metadata(live_stage="handover")
                await self._source_gave_up(control)
                await live.release()
                await pause_point("target-after-release", self._paths.root)
            await live.until_complete(link)
        except BaseException:
            await asyncio.shield(live.abort())
            raise
        await live.finish()
        op.update_metadata(live_stage="done", live={"restore_s": round(time.monotonic() - started, 3)})

    @staticmethod
    async def _source_gave_up(control: Channel) -> None:
        """The source's last word in a handover: it recorded that the instance moved, so it never runs it again.
        Anything else (a failure, the link lost, silence for the idle timeout) and the held copy is removed."""
        try:
            result = await receive_control(control)
        except (StapesError, OSError) as err:
            reason = err.message if isinstance(err, StapesError) else str(err)
            raise InternalError(f"The source did not hand the instance over ({reason}): it keeps running there")\
                from None
        if not result.success:
            raise InternalError(f"The source failed: {result.message or 'no reason given'}")

    async def run_refresh(self, op: Operation, row: InstanceRow, source: InstanceSource) -> None:
        """An existing copy brought up to date: rsync sends only what changed, plus the snapshots the copy
        lacks; snapshots the source no longer has are removed. Snapshots received before a failure are removed
        again; the instance's files may be left partly updated (still a consistent set of files per file)."""
        async with self._instances.locked(row.project, row.name):
            current = await self._instances.get(row.project, row.name)
            if await self._instances.status(current) != StatusCode.STOPPED:
                raise BadRequest(f"Instance {row.name!r} is running on the target: stop it before refreshing it")
            spec = await self._instances.spec(current)
            async with self._channels(op, source) as channels:
                control = channels["control"]

                async def work() -> None:
                    await self._receive(op, channels, row, spec.volume, refresh=True)
                    await self._instances.update_unlocked(row)
                    await send_control(control, True)

                await report_failure(control, work())
                op.settle()
                await source_finished(control)

    @contextlib.asynccontextmanager
    async def _channels(self, op: Operation, source: InstanceSource) -> AsyncIterator[dict[str, Channel]]:
        peer = source if source.mode == "pull" else None
        async with open_channels(op, self._paths, peer, "source", channel_names(source.live)) as channels:
            yield channels

    async def _receive_volumes(self, op: Operation, row: InstanceRow, volume: Path, pool: PoolDriver,
                               receiver: Transport, offer: pb.MigrationHeader, answer: pb.MigrationHeader,
                               *, refresh: bool, channels: dict[str, Channel], live: LiveTarget | None) -> None:
        """Snapshots first, oldest first, then the volume (twice from a running Incus sender), then a live
        move's state. What a refresh half-received is removed again; a new copy is removed whole by
        create_with."""
        driver = self._instances.driver(row.type)
        messages = {s.name: s for s in offer.snapshots}
        shifted = protocol.source_idmap(offer)
        volume_of_row = Volume.of(row.type, row.project, row.name)
        received: list[str] = []
        try:
            for name in answer.snapshotNames:
                if refresh:
                    # Seed the new snapshot with the copy we already have: rsync then sends only the difference.
                    await pool.create_snapshot(volume_of_row, name, writable=True)
                    target = pool.snapshot_path(volume_of_row, name)
                else:
                    target = await pool.prepare_snapshot_target(volume_of_row, name)
                received.append(name)
                await receiver.receive(target, snapshot=True, size=protocol.snapshot_block_size(offer, name))
                await asyncio.to_thread(driver.check_volume_layout, target)
                if shifted:
                    await asyncio.to_thread(unshift, target, shifted)
                message = messages.get(name) or pb.Snapshot(name=name, ephemeral=False, architecture=0,
                                                            stateful=False)
                await self._instances.record_snapshot(protocol.snapshot_row(row.project, row.name, message))
            for _ in range(2 if protocol.final_sync(offer) else 1):
                await receiver.receive(volume, snapshot=False, size=protocol.volume_block_size(offer))
            if live is not None:
                await live.receive(self._link(op, channels, volume, protocol.rsync_features(answer), receiver))
            try:
                await asyncio.to_thread(driver.check_volume_layout, volume)
            except BadRequest as err:
                if not refresh or volume_of_row.content != BLOCK:
                    raise  # a new copy is removed whole (create_with)
                # A refresh received into the existing volume: nothing the peer sent may stay there to be
                # followed at the next start (a symlink named like a file the server writes).
                removed = await asyncio.to_thread(remove_special_entries, volume)
                raise BadRequest(f"{err.message}; the refresh removed from the instance's volume what is neither "
                                 f"a directory nor a regular file: {', '.join(removed) or 'nothing'}") from None
            if live is not None:
                await live.check()
            if shifted:
                await asyncio.to_thread(unshift, volume, shifted)
        except (StapesError, OSError) as err:
            if refresh:
                for name in received:
                    try:
                        await self._instances.delete_snapshot_unlocked(row.project, row.name, name)
                    except NotFound:
                        await pool.delete_snapshot(volume_of_row, name)
            if isinstance(err, PoolFull | DeclaredSizeExceeded):
                raise  # stopped by the receive bound, which said why
            usage = await pool.usage()
            if usage["total"] - usage["used"] < FULL_MARGIN:
                raise PoolFull(
                    f"Storage pool {pool.pool!r} is full ({usage['total'] // 2**20} MiB, "
                    f"{offer.stapesTotalBytes // 2**20} MiB needed): free space or choose another "
                    "pool with -s") from None
            raise

    async def _accept_live(self, row: InstanceRow, driver: InstanceDriver, offer: pb.MigrationHeader) -> None:
        """The driver says whether it can take the instance live (post-copy too, when offered)."""
        spec = await self._instances.spec(row)
        refusal = await driver.accept_refusal(spec)
        if refusal is None and offer.stapesLazy:
            refusal = driver.lazy_refusal(spec)
        if refusal is not None:
            raise BadRequest(f"This server cannot take {row.name!r} live: {refusal}")

    async def _receive(self, op: Operation, channels: dict[str, Channel], row: InstanceRow, volume: Path, *,
                       refresh: bool, live: LiveTarget | None = None) -> None:
        control, fs = channels["control"], channels["fs"]
        driver = self._instances.driver(row.type)
        await pause_point("target-before-header", self._paths.root)
        offer = protocol.parse_header(await control.receive(), "source")
        protocol.check_offer(offer)
        # The state type this driver takes (a driver without one refuses below, as accept_refusal says why).
        live_type = protocol.state_type(driver.live_state_type) if driver.live_state_type else pb.CRIU_RSYNC
        protocol.check_live(offer, live is not None, live_type)
        if live is not None:
            await self._accept_live(row, driver, offer)
        for snap in offer.snapshots:  # a snapshot must stay restorable here: its profiles must exist
            for profile in snap.profiles:
                try:
                    await self._instances.profile(profile)
                except NotFound:
                    raise BadRequest(f"Snapshot {snap.name!r} uses profile {profile!r}, which this server lacks: "
                                     "create it here first, or copy with --instance-only") from None
            await check_peer_snapshot(self._instances, row, snap)  # as a client's devices (host paths, bridges)
        pool = await self._instances.pool_of(await self._instances.spec(row))
        content = Volume.of(row.type, row.project, row.name).content
        usage = await pool.usage()
        protocol.check_volume(offer, content, usage["total"] - usage["used"], pool.pool)
        existing = {s.name for s in await self._instances.snapshots(row.project, row.name)}
        wanted = [n for n in offer.snapshotNames if n not in existing]
        answer, transport = protocol.answer_header(
            offer, pool.migration_transports, wanted, refresh=refresh,
            streamed_state=live is not None and driver.streamed_state, live_type=live_type, content=content)
        if live is not None:
            live.terms = LiveTerms(precopy=offer.predump, lazy=offer.stapesLazy,
                                   streamed=protocol.state_streamed(offer, answer),
                                   handover=protocol.handed_over(offer, answer))
            await live.prepare()
        await control.send(answer.SerializeToString())
        op.update_metadata(transport=transport)
        if refresh:
            for gone in existing - set(offer.snapshotNames):
                await self._instances.delete_snapshot_unlocked(row.project, row.name, gone)
        progress = progress_of(op, "fs", offer.stapesTotalBytes)
        receiver = open_transport(transport, fs, progress, protocol.rsync_features(answer))
        # Held to the size a Stapes source declared (tar, btrfs), and to the pool's free space always.
        declared = offer.stapesTotalBytes if offer.stapesTransports and transport != protocol.RSYNC else None
        receiver.bound = ReceiveBound(pool.pool, pool.root, declared)
        # The source's one control message: a failure at any time, or (Stapes) "all sent" at the end.
        said = asyncio.create_task(receive_control(control))
        transfer = asyncio.create_task(self._receive_volumes(op, row, volume, pool, receiver, offer, answer,
                                                             refresh=refresh, channels=channels, live=live))
        try:
            await received_alongside_control(said, transfer, offer)
        finally:
            for task in (said, transfer):
                task.cancel()
            await asyncio.gather(said, transfer, return_exceptions=True)
            await asyncio.shield(receiver.close())
        progress.finish()
