"""The source half of an instance's migration: offer, send the volume, and for a live move run the driver's
source session between the control messages, deciding commit or rollback.

A live move, in the service's terms (the bytes are the session's, instances/driver.py): the session runs
until the instance is paused (the record of the move is written before and after: recovery.py), finishes
sending, and the service says "all sent"; a live copy runs here again at once. Once the target confirmed,
the move is recorded as given up (two copies never run, whichever server dies when), the target is told to
let its copy run (a handover), and the session releases what the instance left here. Until then any
failure has the session resume the instance here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from stapes.api.config_keys import is_true
from stapes.api.errors import BadRequest, InternalError, StapesError
from stapes.api.requests import MigrationTarget
from stapes.api.status import StatusCode
from stapes.server.faults import pause_point
from stapes.server.instances.driver import InstanceDriver, InstanceSpec, LiveLink, LiveSource, LiveTerms
from stapes.server.instances.service import InstanceService
from stapes.server.migration import protocol, recovery
from stapes.server.migration.channels import (
    channel_names,
    open_channels,
    peer_reason,
    progress_of,
    receive_control,
    send_control,
    send_over,
    stream_bytes,
    target_confirmed,
)
from stapes.server.migration.policy import PrecopySettings
from stapes.server.operations import Operation
from stapes.server.paths import StatePaths
from stapes.server.storage.base import PoolDriver, Volume, block_size
from stapes.server.storage.service import TRANSFER_TYPES, open_transport
from stapes.server.store.db import InstanceRow, SnapshotRow
from stapes.server.streams import Channel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _LiveRequest:
    """What the source decided about a live move before the header: the driver, and the policy."""

    driver: InstanceDriver
    spec: InstanceSpec
    directory: Path  # this move's working directory (the session's, and the record's)
    keep_running: bool  # a copy, running here again once its state is sent
    precopy: PrecopySettings
    lazy: bool


class MigrationSource:
    def __init__(self, instances: InstanceService, paths: StatePaths) -> None:
        self._instances = instances
        self._paths = paths

    async def check(self, project: str, name: str, live: bool) -> None:
        row = await self._instances.get(project, name)
        status = await self._instances.status(row)
        if live:
            if status != StatusCode.RUNNING:
                raise BadRequest(f"Instance {name!r} is {status.label.lower()}: only a running instance moves live; "
                                 "move it without --live (a stopped one moves as it is)")
            refusal = await self._instances.driver(row.type).live_refusal(await self._instances.spec(row))
            if refusal is not None:
                raise BadRequest(f"Instance {name!r} cannot move live: {refusal}")
            return
        if status != StatusCode.STOPPED:
            raise BadRequest(
                f"Instance {name!r} is running: stop it first, or use --stateless to stop it, move it and start it "
                "on the target")

    async def run(self, op: Operation, project: str, name: str, target: MigrationTarget | None,
                  transport: str | None = None, instance_only: bool = False, live: bool = False,
                  keep_running: bool = False) -> None:
        """`transport` narrows what we offer (benchmarks, tests); rsync stays the fallback. `live`: the
        running instance moves with its state; `keep_running`: it goes on running here too (a live copy)."""
        async with self._instances.locked(project, name):
            await self.check(project, name, live=live)
            row = await self._instances.get(project, name)
            spec = await self._instances.spec(row)
            pool = await self._instances.pool_of(spec)
            snapshots = [] if instance_only else await self._instances.snapshots(project, name)
            sendable = tuple(t for t in pool.migration_transports if transport in (None, t))
            driver = self._instances.driver(row.type)
            lazy = live and not keep_running and is_true(spec.config.get("migration.lazy"))
            if lazy and (refusal := driver.lazy_refusal(spec)) is not None:
                raise BadRequest(f"Instance {name!r} has migration.lazy=true, but {refusal}: unset it to move it "
                                 "with its memory")
            request = _LiveRequest(driver, spec, self._paths.migrations / op.id, keep_running=keep_running,
                                   precopy=self._precopy_settings(op, row, spec), lazy=lazy) if live else None
            async with open_channels(op, self._paths, target, "target", channel_names(live)) as channels:
                await self._send(op, channels, Volume.of(row.type, project, name), pool, sendable, snapshots,
                                 request)
                op.settle()

    def _precopy_settings(self, op: Operation, row: InstanceRow, spec: InstanceSpec) -> PrecopySettings:
        """The instance's pre-copy settings, off (and said so in one line) where its driver cannot do it."""
        settings = PrecopySettings.from_config(spec.config)
        if not settings.enabled:
            return settings
        refusal = self._instances.driver(row.type).precopy_refusal()
        if refusal is None:
            return settings
        note = f"migration.incremental.memory is set, but {refusal}"
        log.info("%s: %s", row.name, note)
        op.update_metadata(precopy=note)
        return PrecopySettings(enabled=False, goal=settings.goal, iterations=settings.iterations)

    async def _send(self, op: Operation, channels: dict[str, Channel], instance_volume: Volume, pool: PoolDriver,
                    sendable: tuple[str, ...], snapshots: list[SnapshotRow], live: _LiveRequest | None) -> None:
        control, fs = channels["control"], channels["fs"]
        volume = pool.volume_path(instance_volume)
        paths = {s.name: pool.snapshot_path(instance_volume, s.name) for s in snapshots}
        mirrored = live is not None and live.driver.live_disk_mirrored and instance_volume.block
        if mirrored:  # the volume goes without its disk: only a transport that can leave it out
            sendable = tuple(t for t in sendable if TRANSFER_TYPES[t].leaves_disk)
        total = (await stream_bytes(volume) if not mirrored else 0) + sum([await stream_bytes(p)
                                                                          for p in paths.values()])
        volume_size, snapshot_sizes = None, {}
        if instance_volume.block:  # Incus's volumeSize and snapshot `size`: the disks' apparent sizes
            volume_size = await asyncio.to_thread(block_size, volume)
            snapshot_sizes = {name: await asyncio.to_thread(block_size, p) for name, p in paths.items()}
        live_type = protocol.state_type(live.driver.live_state_type) if live is not None else 0
        header = protocol.offer_header(sendable, refresh=False, total_bytes=total, snapshots=snapshots,
                                       live=live is not None, predump=live is not None and live.precopy.enabled,
                                       lazy=live is not None and live.lazy,
                                       streamed_state=live is not None and live.driver.streamed_state,
                                       live_type=live_type, content=instance_volume.content,
                                       volume_size=volume_size, snapshot_sizes=snapshot_sizes)
        await pause_point("source-before-header", self._paths.root)
        await control.send(header.SerializeToString())
        answer = protocol.parse_header(await control.receive(), "target")
        transport = protocol.check_answer(answer, list(header.stapesTransports), list(paths),
                                          instance_volume.content)
        if live is not None and live.driver.live_disk_mirrored and not answer.stapesTransports:
            raise protocol.ProtocolError(
                "The target is an Incus server, which rebuilds its own device tree for a VM: QEMU's stream of "
                "this one cannot match it, so it cannot move live there; stop the VM first, or move it with "
                "--stateless")
        if live is not None and not protocol.live_accepted(answer, live_type):
            raise protocol.ProtocolError("Protocol error: the target answered without accepting the live move")
        op.update_metadata(transport=transport)
        progress = progress_of(op, "fs", total)
        features = protocol.rsync_features(answer)
        sender = open_transport(transport, fs, progress, features, pool.config.get("rsync.bwlimit"))
        if mirrored:  # the session mirrors the disk while the VM runs
            sender.disk_elsewhere.add(volume)
        await send_over(control, sender, [*(paths[snapshot] for snapshot in answer.snapshotNames), volume])
        progress.finish()
        if live is not None:
            terms = LiveTerms(precopy=live.precopy.enabled, lazy=live.lazy,
                              streamed=protocol.state_streamed(header, answer),
                              handover=protocol.handed_over(header, answer))
            session = live.driver.live_source(live.spec, live.directory, terms, precopy=live.precopy,
                                              keep_running=live.keep_running)
            link = LiveLink(state=channels["criu"], fs=fs, volume=volume, rsync_features=features,
                            report=op.update_metadata, reached=self._reached)
            try:
                await self._send_live(control, session, link, keep_running=live.keep_running)
            finally:
                await asyncio.shield(session.close())
                await asyncio.to_thread(shutil.rmtree, live.directory, True)
            return
        await pause_point("source-before-commit", self._paths.root)
        await send_control(control, True)
        result = await receive_control(control)
        if not result.success:
            raise InternalError(f"The target failed: {result.message}")

    async def _reached(self, name: str) -> None:
        await pause_point(name, self._paths.root)

    async def _send_live(self, control: Channel, session: LiveSource, link: LiveLink, *, keep_running: bool) -> None:
        """The session pauses the instance (its files then hold still for the last sync) and sends its state;
        then the target's word. Until the target confirmed, any failure has the session run the instance here
        again; a copy runs here again as soon as its state is sent."""
        spec = session.spec

        def record(*, moved: bool, complete: bool = True) -> None:
            recovery.record_move(session.directory, spec, moved=moved, complete=complete)

        async def pausing() -> None:
            if session.recoverable:  # the pause may outlive this server: should it stop, its start finds out
                await asyncio.to_thread(record, moved=False, complete=False)
                await self._reached("source-before-checkpoint")
            link.report(live_stage="checkpoint")

        try:
            await session.run_until_paused(link, pausing)
        except StapesError as err:
            with contextlib.suppress(Exception):
                await send_control(control, False, err.message)
            raise
        figures = session.figures
        link.report(live_stage="transfer", live=figures)
        resumed = given_up = False
        try:
            if session.recoverable:  # should this server stop from now on, it resumes the instance at start
                await asyncio.to_thread(record, moved=False)
            await self._reached("source-after-checkpoint")
            await session.finish(link)
            await send_control(control, True)
            await session.sent(link)
            if keep_running:  # a copy runs here again at once (the target starts it meanwhile)
                resumed = True
                await asyncio.shield(session.resume_here())
                await asyncio.to_thread(recovery.forget_move, session.directory)
            await target_confirmed(control)  # started there (and held, in a handover)
            if not keep_running and session.recoverable:  # it runs there now: a restart here must not run it too
                await asyncio.to_thread(record, moved=True)
                given_up = True
            if session.terms.handover:
                await send_control(control, True)  # the target lets its copy run
            if given_up:
                await self._reached("source-after-handover")
        except (StapesError, OSError) as err:
            reason = err.message if isinstance(err, StapesError) else str(err)
            if not reason.startswith("The target failed") and not resumed:
                reason = f"Sending the running state failed: {await peer_reason(control, err)}"
                with contextlib.suppress(Exception):
                    await send_control(control, False, reason)
            if resumed:  # a copy: it already runs here again (or its own resume failed: that is the error)
                raise InternalError(reason) from None
            if given_up:  # recorded as moved: running it here too could make two copies
                raise InternalError(f"{reason}; {spec.name!r} was already handed over: it stays stopped "
                                    "here; check that it runs on the target") from None
            try:
                await asyncio.shield(session.resume_here())
            except StapesError as resume_error:
                raise InternalError(f"{reason}; and {resume_error.message}") from None
            raise InternalError(f"{reason} ({spec.name!r} runs on the source again{session.resumed_note})") \
                from None
        except BaseException:
            if not resumed and not given_up:
                await asyncio.shield(session.resume_here())
            raise
        figures["frozen_s"] = round(time.monotonic() - session.paused_at, 3)
        if not keep_running:
            await session.release(link)
        link.report(live_stage="done", live=figures)
