"""Moving an instance between servers: the source and target (sink) halves of one migration.

Source: offers a header on the control channel, sends the volume on the fs channel with the transport the
target chose, then reports its own result and waits for the target's. Target: reserves the instance, answers
the header, receives into a new volume, defines the instance, and confirms; on any failure or cancellation
it removes everything it created. The source instance is never modified: deleting it after a move is the
client's step, taken only once both sides reported success.

A live move adds the instance's running state, through its driver's hooks only: once the volume is on the
target, the source driver checkpoints the instance (a move stops it there); what changed in the volume
meanwhile follows on the fs channel (rsync) while the state goes on the criu channel; the target driver
restores it and the target confirms. If the target fails or the link breaks before it confirmed, the source
driver runs the instance again from its own checkpoint. Between two Stapes servers the restored copy is held
(its processes stopped) until the source, having recorded that it gave its own copy up, says so: two copies
never run, whichever server dies when (docs/reliability.md lists the kill points).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stapes.api.config_keys import is_true
from stapes.api.errors import BadRequest, InternalError, NotFound, StapesError
from stapes.api.requests import InstanceSource, MigrationTarget
from stapes.api.status import StatusCode
from stapes.server import process
from stapes.server.faults import pause_point
from stapes.server.idmap import unshift
from stapes.server.instances.driver import InstanceDriver, InstanceSpec, StateFiles
from stapes.server.instances.service import InstanceService, check_volume_layout
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration import protocol
from stapes.server.migration.dial import dial
from stapes.server.migration.growing import receive_growing, send_growing
from stapes.server.migration.policy import PrecopySettings, another_precopy_round
from stapes.server.migration.statefiles import StateBudget, receive_state_files
from stapes.server.operations import Operation
from stapes.server.paths import StatePaths
from stapes.server.progress import Progress
from stapes.server.storage.base import PoolDriver, Volume
from stapes.server.storage.bound import DeclaredSizeExceeded, PoolFull, ReceiveBound
from stapes.server.storage.service import open_transport
from stapes.server.storage.transfer import Transport, rsync_receive, rsync_send, tar_send
from stapes.server.store.db import InstanceRow, SnapshotRow
from stapes.server.streams import IDLE_TIMEOUT, Channel, ChannelClosed, idle_timeout, stdout_to_channel, tunnel

log = logging.getLogger(__name__)
CHANNELS = ("control", "fs")
LIVE_CHANNELS = ("control", "fs", "criu")


def channel_names(live: bool) -> tuple[str, ...]:
    """The websockets of a migration: a live one adds `criu` (Incus's name) for the running state."""
    return LIVE_CHANNELS if live else CHANNELS


async def _together(*work: Awaitable[None]) -> None:
    """Run concurrently; the first failure cancels the rest and is raised as itself."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stopped(task: asyncio.Future[Any] | None) -> None:
    """Cancel `task` if it still runs, and wait until it has ended."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _to_the_end(task: asyncio.Future[Any]) -> bool:
    """Wait until `task` ended even if we are cancelled meanwhile: CRIU killed in the middle of a dump could
    leave the container frozen. Returns whether a cancellation arrived (the caller raises it once it has put
    things back)."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


SOURCE_RECORD = "source.json"  # a source's checkpoint: which instance, whether it is complete, whether it moved


@dataclass(frozen=True)
class LeftCheckpoint:
    """A live move's checkpoint found at start: the source server stopped in the middle of the move."""

    directory: Path
    project: str
    name: str
    moved: bool  # the target had confirmed: the instance runs there
    complete: bool = True  # False: the server stopped while the checkpoint was being written


def _record_checkpoint(live: _Live, *, moved: bool, complete: bool = True) -> None:
    """Written (atomically) before the checkpoint begins, again once it is complete, and once the target
    confirmed."""
    record = {"project": live.spec.project, "name": live.spec.name, "moved": moved, "complete": complete}
    temporary = live.state / f".{SOURCE_RECORD}"
    temporary.write_text(json.dumps(record))
    temporary.rename(live.state / SOURCE_RECORD)


def _left_checkpoints(migrations: Path) -> list[LeftCheckpoint]:
    """The working directories that hold a source's complete checkpoint and its record (ours, still read
    with care: a broken one is left out, and its directory removed)."""
    found = []
    for directory in sorted(migrations.iterdir()) if migrations.is_dir() else []:
        try:
            record = json.loads((directory / SOURCE_RECORD).read_text())
            project, name, moved = record["project"], record["name"], record["moved"]
            complete = record.get("complete", True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if isinstance(project, str) and isinstance(name, str) and isinstance(moved, bool) \
                and isinstance(complete, bool) and (directory / "final").is_dir():
            found.append(LeftCheckpoint(directory, project, name, moved, complete))
    return found


@dataclass
class _Live:
    """One side's part of a live move: the driver that checkpoints or restores, and where the state lives."""

    driver: InstanceDriver
    spec: InstanceSpec
    state: Path  # the working directory: predump-<n>/ for each pre-copy round, final/ for the checkpoint
    keep_running: bool = False  # source: a copy, running here again once its state is sent
    precopy: PrecopySettings = PrecopySettings(enabled=False, goal=0, iterations=0)
    lazy: bool = False  # post-copy: the memory follows the restore, on demand (CRIU lazy pages)
    streamed: bool = False  # the memory pages travel while the checkpoint writes them (growing.py)
    handover: bool = False  # the target holds its restored copy until the source gave its own up (protocol)

    @property
    def final(self) -> Path:
        return self.state / "final"
CONNECT_TIMEOUT = 60.0
FULL_MARGIN = 2**20  # less free than this after a failed receive: the pool filled up


async def _volume_bytes(path: Path) -> int:
    result = await process.run(["du", "-s", "-B1", "--apparent-size", str(path)], check=False)
    try:
        return int(result.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


TAR_ENTRY_BYTES = 1536  # tar's header and padding per file: 1.0-1.6 KiB on average, measured on real trees


async def _stream_bytes(path: Path) -> int:
    """What a volume's stream carries, about: its files' apparent size plus tar's cost per entry. The target
    holds the source to it (storage/bound.py), so it errs on the high side."""
    result = await process.run(["du", "-s", "--inodes", str(path)], check=False)
    try:
        entries = int(result.stdout.split()[0])
    except (IndexError, ValueError):
        entries = 0
    return await _volume_bytes(path) + TAR_ENTRY_BYTES * entries


def _progress(op: Operation, stage: str, total: int) -> Progress:
    def publish(figures: dict[str, Any]) -> None:
        op.update_metadata(fs_progress=figures["text"], progress=figures)

    return Progress(stage, total, publish)


async def _send_control(control: Channel, success: bool, message: str = "") -> None:
    await control.send(pb.MigrationControl(success=success, message=message).SerializeToString())


async def _receive_control(control: Channel) -> pb.MigrationControl:
    return protocol.parse_control(await control.receive(), "other side")


async def send_over(control: Channel, sender: Transport, paths: list[Path]) -> None:
    """The source's files, each path in order; a failure is told to the target (with the target's own reason
    when it gave one) before it is raised, and the transport is closed whatever happens."""
    try:
        for path in paths:
            await sender.send(path)
    except (StapesError, OSError) as err:
        reason = await _peer_reason(control, err)
        with contextlib.suppress(Exception):
            await _send_control(control, False, reason)
        raise InternalError(f"Transfer to the target failed: {reason}") from None
    finally:
        await asyncio.shield(sender.close())


async def _peer_reason(control: Channel, fallback: StapesError | BaseException) -> str:
    """When a transfer breaks, the other side usually said why on the control channel: prefer that."""
    said = asyncio.create_task(_receive_control(control))
    try:
        return await _reason_from(said, fallback)
    finally:
        said.cancel()


MAX_PRECOPY_ROUNDS = 999  # the configuration's own limit


def _state_files(live: _Live) -> StateFiles:
    if live.driver.state_files is None:
        raise BadRequest(f"This server cannot take {live.spec.name!r} live: its driver accepts no checkpoint")
    return live.driver.state_files


def _state_budget(live: _Live) -> StateBudget:
    """The driver's bound for one checkpoint of the instance, for each pre-copy round and the final one (as
    many rounds as the instance's own configuration here allows, and the final checkpoint)."""
    per_round = live.driver.state_size_limit(live.spec)
    rounds = PrecopySettings.from_config(live.spec.config).iterations
    return StateBudget(live.state, per_round, per_round * (rounds + 1))


async def _receive_precopy(criu: Channel, live: _Live, budget: StateBudget) -> None:
    """The source's pre-copy rounds, each into predump-<n>, until one is marked the last."""
    for number in range(1, MAX_PRECOPY_ROUNDS + 1):
        directory = live.state / f"predump-{number}"
        await asyncio.to_thread(directory.mkdir)
        await receive_state_files(directory, criu, _state_files(live), budget,
                                  links={f"../predump-{n}" for n in range(1, number)})
        if protocol.parse_sync(await criu.receive(), "source").finalPreDump:
            return
    raise protocol.ProtocolError(f"Protocol error: the source sent more than {MAX_PRECOPY_ROUNDS} pre-copy rounds")


async def _receive_state(live: _Live, criu: Channel, root: Path, budget: StateBudget) -> None:
    """The final checkpoint: the pages that travelled while it was written (if so agreed), then the rest;
    each file checked before it is written, all of it within the driver's bound (statefiles.py)."""
    await pause_point("target-before-state", root)
    files = live.driver.growing_state_files
    if live.streamed and files is not None:
        await receive_growing(live.final, files.pattern, files.mode, criu, budget.admit)
    rounds = await asyncio.to_thread(lambda: [p.name for p in live.state.glob("predump-*")])
    await receive_state_files(live.final, criu, _state_files(live), budget, links={f"../{n}" for n in rounds})


def check_state_links(state: Path) -> None:
    """The only links in a received state are each round's `parent`, naming an earlier round beside it (CRIU
    reads the memory it skipped from there): a link anywhere else would have the restore read host files."""
    rounds = sorted(int(p.name.split("-")[1]) for p in state.glob("predump-*"))
    links = [Path(top) / name for top, dirs, files in os.walk(state) for name in [*dirs, *files]
             if (Path(top) / name).is_symlink()]  # os.walk follows no links
    for path in links:
        where = path.parent.name
        current = int(where.split("-")[1]) if where.startswith("predump-") else len(rounds) + 1
        target = os.readlink(path)
        allowed = {f"../predump-{n}" for n in rounds if n < current}
        if path.name != "parent" or path.parent.parent != state or target not in allowed:
            raise protocol.ProtocolError(f"Protocol error: the source's state holds a link {path.name} -> "
                                         f"{target!r}, which is not a pre-copy round's parent")


SOURCE_CLOSE_WAIT = 10.0


async def _source_finished(control: Channel) -> None:
    """After confirming, the target's operation ends only once the source closed its side (as Incus's target
    does), so a client acting on the target's success (deleting the moved source) finds the source's operation
    over. Bounded: a source that never closes delays the end by SOURCE_CLOSE_WAIT at most."""
    with contextlib.suppress(StapesError, TimeoutError):
        async with asyncio.timeout(SOURCE_CLOSE_WAIT):
            while True:
                await control.receive()


async def received_alongside_control(said: asyncio.Task[pb.MigrationControl], transfer: asyncio.Task[None],
                                     offer: pb.MigrationHeader) -> None:
    """The target's wait for the files and for the source's one control message: a failure the source reports
    at any time ends it; an error of the transfer is told with the source's reason when it gave one; a Stapes
    source's "all sent" must arrive and say success."""
    await asyncio.wait({said, transfer}, return_when=asyncio.FIRST_COMPLETED)
    if not transfer.done():  # the source spoke first: unless it says it sent everything, stop
        reason = _failure_reason(said)
        if reason is not None:
            raise InternalError(f"The source failed: {reason}")
    try:
        await transfer
    except (PoolFull, DeclaredSizeExceeded):
        raise
    except (StapesError, OSError) as err:
        raise InternalError(f"Receiving from the source failed: {await _reason_from(said, err)}") from None
    if protocol.sender_reports_completion(offer):
        result = await said
        if not result.success:
            raise InternalError(f"The source failed: {result.message}")


def _failure_reason(said: asyncio.Task[pb.MigrationControl]) -> str | None:
    """What a finished read of the peer's control message says went wrong; None when it reported success."""
    if (failure := said.exception()) is not None:
        return failure.message if isinstance(failure, StapesError) else str(failure)
    reply = said.result()
    return None if reply.success else (reply.message or "no reason given")


async def _reason_from(said: asyncio.Task[pb.MigrationControl], fallback: StapesError | BaseException) -> str:
    """The peer's reason from its control message (read by `said`, waited for 2 s at most), or `fallback`'s."""
    with contextlib.suppress(Exception):
        reply = await asyncio.wait_for(asyncio.shield(said), 2)
        if not reply.success and reply.message:
            return reply.message
    return fallback.message if isinstance(fallback, StapesError) else str(fallback)


class MigrationService:
    def __init__(self, instances: InstanceService, paths: StatePaths) -> None:
        self._instances = instances
        self._paths = paths

    async def remove_leftovers(self) -> list[LeftCheckpoint]:
        """At start, before any migration runs: the working directories a crash left behind are removed, but
        for the checkpoints of instances this server was moving live (`recover` deals with those)."""
        left = await asyncio.to_thread(_left_checkpoints, self._paths.migrations)
        kept = {c.directory for c in left}
        if self._paths.migrations.exists():
            for directory in await asyncio.to_thread(lambda: list(self._paths.migrations.iterdir())):
                if directory not in kept:
                    await asyncio.to_thread(shutil.rmtree, directory, True)
        return left

    async def recover(self, left: list[LeftCheckpoint]) -> None:
        """After a crash of this (source) server in the middle of a live move, before instances start again:
        one the target did not confirm runs again from its checkpoint, its processes as they were (not booted
        afresh); one the target confirmed stays stopped here, as it runs there."""
        for checkpoint in left:
            try:
                row = await self._instances.get(checkpoint.project, checkpoint.name)
                if checkpoint.moved:
                    await self._instances.record_power_state(row.project, row.name, running=False)
                    log.warning("%s moved live to another server before this one stopped: it stays stopped here; "
                                "delete it here once it runs there", row.name)
                    continue
                spec = await self._instances.spec(row)
                driver = self._instances.driver(row.type)
                if not checkpoint.complete and not await driver.checkpoint_outcome(spec, checkpoint.directory /
                                                                                   "final"):
                    log.warning("%s was being checkpointed when this server stopped; the checkpoint did not "
                                "complete, so it ran on (or boots afresh if it was stopped)", row.name)
                    continue
                await driver.finalize_source(spec, checkpoint.directory / "final", resume=True)
                log.warning("%s was being moved live when this server stopped: it runs again here, from its "
                            "checkpoint", row.name)
            except Exception as err:  # one instance never keeps the server down
                log.warning("could not put %s back from its checkpoint (%s): it boots afresh if it was running",
                            checkpoint.name, err)
            finally:
                await asyncio.to_thread(shutil.rmtree, checkpoint.directory, True)

    @contextlib.asynccontextmanager
    async def _channels(self, op: Operation, peer: MigrationTarget | InstanceSource | None, peer_name: str,
                        names: Sequence[str] = CHANNELS) -> AsyncIterator[dict[str, Channel]]:
        """Dial the peer's operation (pull target, push source) or wait for the peer to dial ours; either
        way, a peer that goes silent for IDLE_TIMEOUT ends the migration."""
        if peer is not None:
            async with dial(peer.operation, dict(peer.secrets or {}), tuple(names), peer.certificate,
                            self._paths.server_cert, self._paths.server_key, peer_name) as channels, \
                    idle_timeout(channels.values(), IDLE_TIMEOUT, peer_name):
                yield channels
            return
        try:
            sockets = {name: await op.channel(name, CONNECT_TIMEOUT) for name in names}
        except TimeoutError:
            raise InternalError(f"The {peer_name} never connected to the migration websockets (waited "
                                f"{CONNECT_TIMEOUT:.0f}s)") from None
        channels = {name: Channel(name, ws) for name, ws in sockets.items()}
        try:
            async with idle_timeout(channels.values(), IDLE_TIMEOUT, peer_name):
                yield channels
        finally:
            await asyncio.gather(*(channel.close() for channel in channels.values()))
            for name in names:
                op.release(name)

    # source
    async def check_source(self, project: str, name: str, live: bool) -> None:
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

    async def run_source(self, op: Operation, project: str, name: str, target: MigrationTarget | None,
                         transport: str | None = None, instance_only: bool = False, live: bool = False,
                         keep_running: bool = False) -> None:
        """`transport` narrows what we offer (benchmarks, tests); rsync stays the fallback. `live`: the
        running instance moves with its state; `keep_running`: it goes on running here too (a live copy)."""
        async with self._instances.locked(project, name):
            await self.check_source(project, name, live=live)
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
            state = _Live(driver, spec, self._paths.migrations / op.id, keep_running=keep_running,
                          precopy=self._precopy_settings(op, row, spec), lazy=lazy) if live else None
            async with self._channels(op, target, "target", channel_names(live)) as channels:
                await self._send(op, channels, Volume.of(row.type, project, name), pool, sendable, snapshots, state)
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
                    sendable: tuple[str, ...], snapshots: list[SnapshotRow], live: _Live | None) -> None:
        control, fs = channels["control"], channels["fs"]
        volume = pool.volume_path(instance_volume)
        paths = {s.name: pool.snapshot_path(instance_volume, s.name) for s in snapshots}
        total = await _stream_bytes(volume) + sum([await _stream_bytes(p) for p in paths.values()])
        header = protocol.offer_header(sendable, refresh=False, total_bytes=total, snapshots=snapshots,
                                       live=live is not None, predump=live is not None and live.precopy.enabled,
                                       lazy=live is not None and live.lazy,
                                       streamed_state=live is not None and live.driver.growing_state_files is not None)
        await pause_point("source-before-header", self._paths.root)
        await control.send(header.SerializeToString())
        answer = protocol.parse_header(await control.receive(), "target")
        transport = protocol.check_answer(answer, list(header.stapesTransports), list(paths))
        if live is not None and not protocol.live_accepted(answer):
            raise protocol.ProtocolError("Protocol error: the target answered without accepting the live move")
        if live is not None:
            live.streamed = protocol.state_streamed(header, answer)
            live.handover = protocol.handed_over(header, answer)
        op.update_metadata(transport=transport)
        progress = _progress(op, "fs", total)
        features = protocol.rsync_features(answer)
        sender = open_transport(transport, fs, progress, features, pool.config.get("rsync.bwlimit"))
        await send_over(control, sender, [*(paths[snapshot] for snapshot in answer.snapshotNames), volume])
        progress.finish()
        if live is not None and live.lazy:
            await self._send_lazy_state(op, channels, volume, features, live)
            return
        if live is not None:
            await self._send_state(op, channels, volume, features, live)
            return
        await pause_point("source-before-commit", self._paths.root)
        await _send_control(control, True)
        result = await _receive_control(control)
        if not result.success:
            raise InternalError(f"The target failed: {result.message}")

    async def _send_state(self, op: Operation, channels: dict[str, Channel], volume: Path, features: list[str],
                          live: _Live) -> None:
        """Checkpoint (the instance stops, so its files hold still), then what changed in the volume (fs) and
        the state (criu) side by side, then the target's word. Until the target confirmed, any failure runs
        the instance here again from the checkpoint; a copy runs here again as soon as its state is sent."""
        control = channels["control"]
        await asyncio.to_thread(live.final.mkdir, parents=True)
        pages: asyncio.Future[dict[str, int]] | None = None
        try:
            try:
                parent = await self._precopy(op, channels["criu"], live) if live.precopy.enabled else None
                # The dump outlives this server: should it stop meanwhile, its start finds out how it ended.
                await asyncio.to_thread(_record_checkpoint, live, moved=False, complete=False)
                await pause_point("source-before-checkpoint", self._paths.root)
                op.update_metadata(live_stage="checkpoint")
                started = time.monotonic()
                checkpoint = asyncio.ensure_future(live.driver.checkpoint(live.spec, live.final, parent))
                pages = self._stream_pages(live, checkpoint, channels["criu"])
                if await _to_the_end(checkpoint):
                    await _stopped(pages)
                    if checkpoint.exception() is None:
                        await asyncio.shield(self._resume_source(live))
                    raise asyncio.CancelledError
                checkpoint.result()
            except StapesError as err:
                await _stopped(pages)
                with contextlib.suppress(Exception):
                    await _send_control(control, False, err.message)
                raise
            figures: dict[str, Any] = {"checkpoint_s": round(time.monotonic() - started, 3)}
            op.update_metadata(live_stage="transfer", live=figures)
            resumed = given_up = False
            try:
                # Should this server stop from now on, it puts the instance back from the checkpoint at start.
                await asyncio.to_thread(_record_checkpoint, live, moved=False)
                await pause_point("source-after-checkpoint", self._paths.root)
                await _together(rsync_send(volume, channels["fs"], None, [*features, "delete"]),
                                self._send_rest_of_state(live, pages, channels["criu"], figures))
                figures["transfer_s"] = round(time.monotonic() - started - figures["checkpoint_s"], 3)
                await _send_control(control, True)
                if live.keep_running:  # a copy runs here again at once (the target restores meanwhile)
                    resumed = True
                    await asyncio.shield(live.driver.finalize_source(live.spec, live.final, resume=True))
                    await asyncio.to_thread((live.state / SOURCE_RECORD).unlink, True)
                await self._target_confirmed(control)  # restored there (and held, in a handover)
                if not live.keep_running:  # it runs there now: a restart here must not run it too
                    await asyncio.to_thread(_record_checkpoint, live, moved=True)
                    given_up = True
                if live.handover:
                    await _send_control(control, True)  # the target lets its copy run
                if given_up:
                    await pause_point("source-after-handover", self._paths.root)
            except (StapesError, OSError) as err:
                reason = err.message if isinstance(err, StapesError) else str(err)
                if not reason.startswith("The target failed") and not resumed:
                    reason = f"Sending the running state failed: {await _peer_reason(control, err)}"
                    with contextlib.suppress(Exception):
                        await _send_control(control, False, reason)
                if resumed:  # a copy: it already runs here again (or its own restore failed: that is the error)
                    raise InternalError(reason) from None
                if given_up:  # recorded as moved: running it here too could make two copies
                    raise InternalError(f"{reason}; {live.spec.name!r} was already handed over: it stays stopped "
                                        "here; check that it runs on the target") from None
                try:
                    await asyncio.shield(self._resume_source(live))
                except StapesError as resume_error:
                    raise InternalError(f"{reason}; and {resume_error.message}") from None
                raise InternalError(f"{reason} ({live.spec.name!r} runs on the source again)") from None
            except BaseException:
                if not resumed and not given_up:
                    await asyncio.shield(self._resume_source(live))
                raise
            finally:
                await _stopped(pages)
            figures["frozen_s"] = round(time.monotonic() - started, 3)
            figures["state_bytes"] = await _volume_bytes(live.final)  # counted once the target runs it
            op.update_metadata(live_stage="done", live=figures)
            if not live.keep_running:
                await live.driver.finalize_source(live.spec, live.final, resume=False)
        finally:
            await asyncio.to_thread(shutil.rmtree, live.state, True)

    @staticmethod
    def _stream_pages(live: _Live, checkpoint: asyncio.Future[None], criu: Channel
                      ) -> asyncio.Future[dict[str, int]] | None:
        """Where both ends agreed, the memory pages start travelling as the checkpoint writes them."""
        files = live.driver.growing_state_files
        if not live.streamed or files is None:
            return None
        return asyncio.ensure_future(send_growing(live.final, files.pattern, checkpoint, criu))

    @staticmethod
    async def _send_rest_of_state(live: _Live, pages: asyncio.Future[dict[str, int]] | None, criu: Channel,
                                  figures: dict[str, Any]) -> None:
        """The pages that were still being written, then the rest of the checkpoint in one tar."""
        sent = await pages if pages is not None else {}
        if pages is not None:
            figures["streamed_bytes"] = sum(sent.values())
        await tar_send(live.final, criu, None, leave_out=list(sent))

    async def _send_lazy_state(self, op: Operation, channels: dict[str, Channel], volume: Path,
                               features: list[str], live: _Live) -> None:
        """Post-copy: CRIU dumps everything but the memory and serves the memory on a socketpair (no listener);
        that state and what changed in the volume go to the target, which restores at once; then the memory
        flows through the `criu` channel (joined to CRIU's socket) as the target asks for it. Until the target
        confirmed, a failure stops CRIU and the container runs on here, its memory untouched; after, a broken
        link loses it (the documented risk of migration.lazy)."""
        try:
            await self._send_lazy_state_in(op, channels, volume, features, live)
        finally:
            await asyncio.to_thread(shutil.rmtree, live.state, True)

    async def _send_lazy_state_in(self, op: Operation, channels: dict[str, Channel], volume: Path,
                                  features: list[str], live: _Live) -> None:
        control, criu = channels["control"], channels["criu"]
        await asyncio.to_thread(live.final.mkdir, parents=True)
        # CRIU's page server serves one end of a socketpair it inherits; the other end is tunnelled to the
        # target: the memory never crosses a socket another local user could reach.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        serving = asyncio.Event()
        started = time.monotonic()
        op.update_metadata(live_stage="checkpoint")
        checkpoint = asyncio.ensure_future(live.driver.checkpoint(live.spec, live.final, None, lazy_socket=theirs,
                                                                  serving=serving))
        checkpoint.add_done_callback(lambda _: theirs.close())
        pages: asyncio.Future[None] | None = None

        async def abort() -> None:
            await live.driver.abort_checkpoint(live.spec)
            await asyncio.gather(checkpoint, return_exceptions=True)

        try:
            try:
                await _until_set(serving, checkpoint, "CRIU's lazy dump")
            except StapesError as err:
                with contextlib.suppress(Exception):
                    await _send_control(control, False, err.message)
                raise
            theirs.close()  # CRIU's now: the tunnel sees the end of its stream once CRIU ends
            figures: dict[str, Any] = {"checkpoint_s": round(time.monotonic() - started, 3),
                                       "state_bytes": await _volume_bytes(live.final), "lazy": True}
            op.update_metadata(live_stage="transfer", live=figures)
            await pause_point("source-after-checkpoint", self._paths.root)
            await _together(rsync_send(volume, channels["fs"], None, [*features, "delete"]),
                            tar_send(live.final, criu, None))
            await _send_control(control, True)
            await pause_point("source-before-memory", self._paths.root)
            # The target's restore needs pages already; but its "I have them all" reaches CRIU only once the target
            # confirmed: CRIU would end the container here at once, the target still able to fail.
            confirmed = asyncio.Event()
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            pages = asyncio.ensure_future(_lazy_tunnel(reader, writer, criu, confirmed, abort))
            try:
                await self._target_confirmed(control)
            except BaseException:
                await asyncio.shield(abort())  # CRIU first: the end of its socket would read as "all sent"
                await _stopped(pages)
                writer.close()  # the tunnel's, had it not started yet
                raise
            confirmed.set()
            figures["frozen_s"] = round(time.monotonic() - started, 3)
            op.update_metadata(live_stage="memory", live=figures)
        except (StapesError, OSError) as err:
            await asyncio.shield(abort())
            reason = err.message if isinstance(err, StapesError) else str(err)
            raise InternalError(f"{reason} ({live.spec.name!r} runs on the source again: CRIU let it go on)") \
                from None
        except BaseException:
            await asyncio.shield(abort())
            raise
        finally:
            if pages is None:  # otherwise the tunnel's transport owns it
                ours.close()
        try:
            await _together(pages, checkpoint)
        except (StapesError, OSError) as err:
            reason = err.message if isinstance(err, StapesError) else str(err)
            raise InternalError(f"The link broke while the memory of {live.spec.name!r} was moving (lazy pages): "
                                f"{reason}; the container is lost") from None
        figures["memory_s"] = round(time.monotonic() - started - figures["frozen_s"], 3)
        op.update_metadata(live_stage="done", live=figures)
        await live.driver.finalize_source(live.spec, live.final, resume=False)

    @staticmethod
    async def _source_gave_up(control: Channel) -> None:
        """The source's last word in a handover: it recorded that the instance moved, so it never runs it again.
        Anything else (a failure, the link lost, silence for the idle timeout) and the held copy is removed."""
        try:
            result = await _receive_control(control)
        except (StapesError, OSError) as err:
            reason = err.message if isinstance(err, StapesError) else str(err)
            raise InternalError(f"The source did not hand the instance over ({reason}): it keeps running there")\
                from None
        if not result.success:
            raise InternalError(f"The source failed: {result.message or 'no reason given'}")

    @staticmethod
    async def _target_confirmed(control: Channel) -> None:
        result = await _receive_control(control)
        if not result.success:
            raise InternalError(f"The target failed: {result.message}")

    async def _precopy(self, op: Operation, criu: Channel, live: _Live) -> Path | None:
        """Pre-copy rounds while the instance runs, each sent at once and followed by a MigrationSync saying
        whether it was the last; returns the last round's directory (the final checkpoint's parent)."""
        rounds: list[dict[str, Any]] = []
        parent: Path | None = None
        synced: float | None = None
        while another_precopy_round(live.precopy, len(rounds), synced):
            op.update_metadata(live_stage=f"pre-copy round {len(rounds) + 1}")
            started = time.monotonic()
            directory = live.state / f"predump-{len(rounds) + 1}"
            await asyncio.to_thread(directory.mkdir)
            predump = asyncio.ensure_future(live.driver.predump(live.spec, directory, parent))
            if await _to_the_end(predump):
                raise asyncio.CancelledError
            memory = predump.result()
            synced = memory.synced_percent
            await tar_send(directory, criu, None)
            last = not another_precopy_round(live.precopy, len(rounds) + 1, synced)
            await criu.send(pb.MigrationSync(finalPreDump=last).SerializeToString())
            rounds.append({"round": len(rounds) + 1, "pages_written": memory.pages_written,
                           "pages_skipped": memory.pages_skipped, "synced_percent": round(synced, 1),
                           "bytes": await _volume_bytes(directory), "seconds": round(time.monotonic() - started, 3)})
            op.update_metadata(precopy_rounds=rounds)
            parent = directory
        return parent

    async def _resume_source(self, live: _Live) -> None:
        try:
            await live.driver.finalize_source(live.spec, live.final, resume=True)
        except StapesError as err:
            log.error("live migration rollback of %s failed: %s", live.spec.name, err.message)
            raise

    # target
    async def run_sink(self, op: Operation, row: InstanceRow, source: InstanceSource) -> None:
        """A new instance: everything it received is removed again if anything fails."""
        async with self._sink_channels(op, source) as channels:
            control = channels["control"]
            live = _Live(self._instances.driver(row.type), await self._instances.spec(row),
                         self._paths.migrations / op.id) if source.live else None  # lazy: from the offer

            async def fill(volume: Path) -> None:
                await self._receive(op, channels, row, volume, refresh=False, live=live)

            async def confirm() -> None:
                if live is not None:
                    await self._restore(op, channels, row, live)
                    return
                await pause_point("target-before-commit", self._paths.root)
                await _send_control(control, True)

            try:
                await self._report_failure(control, self._instances.create_with(row, fill, confirm))
            finally:
                if live is not None:
                    await asyncio.to_thread(shutil.rmtree, live.state, True)
            op.settle()
            await _source_finished(control)

    async def _restore(self, op: Operation, channels: dict[str, Channel], row: InstanceRow, live: _Live) -> None:
        """The instance is defined; run it from the source's state and confirm. Whatever fails after the
        restore began stops it again (create_with then removes the rest)."""
        control = channels["control"]
        spec = await self._instances.spec(row)
        op.update_metadata(live_stage="restore")
        started = time.monotonic()
        pages: list[asyncio.Future[None]] = []
        lazy_socket: socket.socket | None = None
        try:
            if live.lazy:  # CRIU's lazy-pages daemon inherits one end of a socketpair, the tunnel the other
                lazy_socket, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                reader, writer = await asyncio.open_unix_connection(sock=ours)
                pages.append(asyncio.ensure_future(tunnel(reader, writer, channels["criu"])))
            # A tunnel that breaks meanwhile (the source gone) ends the restore: CRIU would wait for pages forever.
            if live.handover:
                await live.driver.hold_restore(spec)
            await _unless_broken(live.driver.restore(spec, live.final, lazy_socket=lazy_socket), pages)
            if lazy_socket is not None:
                lazy_socket.close()  # CRIU's now: the tunnel sees the end of its stream once CRIU ends
            row.config["volatile.last_state.power"] = "RUNNING"
            await pause_point("target-before-commit", self._paths.root)
            await _send_control(control, True)
            if live.handover:  # restored, held: it runs only once the source says it gave its copy up
                op.update_metadata(live_stage="handover")
                await self._source_gave_up(control)
                await live.driver.release_restore(spec)
                await pause_point("target-after-release", self._paths.root)
            if live.lazy:
                op.update_metadata(live_stage="memory")
                await _together(pages[0], live.driver.memory_arrived(spec))
        except BaseException:
            for task in pages:
                task.cancel()
            await asyncio.shield(live.driver.finalize_target(spec, success=False))
            raise
        finally:
            if lazy_socket is not None:
                lazy_socket.close()
        await live.driver.finalize_target(spec, success=True)
        op.update_metadata(live_stage="done", live={"restore_s": round(time.monotonic() - started, 3)})

    async def run_refresh(self, op: Operation, row: InstanceRow, source: InstanceSource) -> None:
        """An existing copy brought up to date: rsync sends only what changed, plus the snapshots the copy
        lacks; snapshots the source no longer has are removed. Snapshots received before a failure are removed
        again; the instance's files may be left partly updated (still a consistent set of files per file)."""
        async with self._instances.locked(row.project, row.name):
            current = await self._instances.get(row.project, row.name)
            if await self._instances.status(current) != StatusCode.STOPPED:
                raise BadRequest(f"Instance {row.name!r} is running on the target: stop it before refreshing it")
            spec = await self._instances.spec(current)
            async with self._sink_channels(op, source) as channels:
                control = channels["control"]

                async def work() -> None:
                    await self._receive(op, channels, row, spec.volume, refresh=True)
                    await self._instances.update_unlocked(row)
                    await _send_control(control, True)

                await self._report_failure(control, work())
                op.settle()
                await _source_finished(control)

    @contextlib.asynccontextmanager
    async def _sink_channels(self, op: Operation, source: InstanceSource) -> AsyncIterator[dict[str, Channel]]:
        peer = source if source.mode == "pull" else None
        async with self._channels(op, peer, "source", channel_names(source.live)) as channels:
            yield channels

    async def _receive_volumes(self, row: InstanceRow, volume: Path, pool: PoolDriver,
                               receiver: Transport, offer: pb.MigrationHeader, answer: pb.MigrationHeader,
                               *, refresh: bool, channels: dict[str, Channel], live: _Live | None) -> None:
        """Snapshots first, oldest first, then the volume (twice from a running Incus sender). What a refresh
        half-received is removed again; a new copy is removed whole by create_with."""
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
                await receiver.receive(target, snapshot=True)
                await asyncio.to_thread(check_volume_layout, target)
                if shifted:
                    await asyncio.to_thread(unshift, target, shifted)
                message = messages.get(name) or pb.Snapshot(name=name, ephemeral=False, architecture=0,
                                                            stateful=False)
                await self._instances.record_snapshot(protocol.snapshot_row(row.project, row.name, message))
            for _ in range(2 if protocol.final_sync(offer) else 1):
                await receiver.receive(volume, snapshot=False)
            if live is not None:
                # The pre-copy rounds, then what changed while the first pass ran (rsync, deletions too) beside
                # the final checkpoint.
                await asyncio.to_thread(live.final.mkdir, parents=True)
                budget = _state_budget(live)
                if offer.predump:
                    await _receive_precopy(channels["criu"], live, budget)
                features = [*protocol.rsync_features(answer), "delete"]
                await _together(rsync_receive(volume, channels["fs"], None, features,
                                              receiver.bound.delta if receiver.bound else None),
                                _receive_state(live, channels["criu"], self._paths.root, budget))
                await asyncio.to_thread(check_state_links, live.state)
            await asyncio.to_thread(check_volume_layout, volume)
            if live is not None:  # what its images name, against the received root: before the restore
                await live.driver.check_state(live.spec, live.state)
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

    async def _report_failure(self, control: Channel, work: Awaitable[None]) -> None:
        try:
            await work
        except BaseException as err:
            message = err.message if isinstance(err, StapesError) else (
                "cancelled" if isinstance(err, asyncio.CancelledError) else str(err))
            with contextlib.suppress(Exception):
                await asyncio.shield(_send_control(control, False, message))
            if isinstance(err, ChannelClosed):
                raise InternalError(f"The source went away during the transfer: {err.message}") from None
            raise

    async def _receive(self, op: Operation, channels: dict[str, Channel], row: InstanceRow, volume: Path, *,
                       refresh: bool, live: _Live | None = None) -> None:
        control, fs = channels["control"], channels["fs"]
        await pause_point("target-before-header", self._paths.root)
        offer = protocol.parse_header(await control.receive(), "source")
        protocol.check_offer(offer)
        protocol.check_live(offer, live is not None)
        if live is not None:
            refusal = await live.driver.accept_refusal(live.spec)
            if refusal is None and offer.stapesLazy:
                refusal = live.driver.lazy_refusal(live.spec)
            if refusal is not None:
                raise BadRequest(f"This server cannot take {row.name!r} live: {refusal}")
            live.lazy = offer.stapesLazy
        for snap in offer.snapshots:  # a snapshot must stay restorable here: its profiles must exist
            protocol.check_snapshot_raw_keys(snap, row.config)
            for profile in snap.profiles:
                try:
                    await self._instances.profile(profile)
                except NotFound:
                    raise BadRequest(f"Snapshot {snap.name!r} uses profile {profile!r}, which this server lacks: "
                                     "create it here first, or copy with --instance-only") from None
        pool = await self._instances.pool_of(await self._instances.spec(row))
        existing = {s.name for s in await self._instances.snapshots(row.project, row.name)}
        wanted = [n for n in offer.snapshotNames if n not in existing]
        answer, transport = protocol.answer_header(
            offer, pool.migration_transports, wanted, refresh=refresh,
            streamed_state=live is not None and live.driver.growing_state_files is not None)
        if live is not None:
            live.streamed = protocol.state_streamed(offer, answer)
            live.handover = protocol.handed_over(offer, answer)
        await control.send(answer.SerializeToString())
        op.update_metadata(transport=transport)
        if refresh:
            for gone in existing - set(offer.snapshotNames):
                await self._instances.delete_snapshot_unlocked(row.project, row.name, gone)
        progress = _progress(op, "fs", offer.stapesTotalBytes)
        receiver = open_transport(transport, fs, progress, protocol.rsync_features(answer))
        # Held to the size a Stapes source declared (tar, btrfs), and to the pool's free space always.
        declared = offer.stapesTotalBytes if offer.stapesTransports and transport != protocol.RSYNC else None
        receiver.bound = ReceiveBound(pool.pool, pool.root, declared)
        # The source's one control message: a failure at any time, or (Stapes) "all sent" at the end.
        said = asyncio.create_task(_receive_control(control))
        transfer = asyncio.create_task(self._receive_volumes(row, volume, pool, receiver, offer, answer,
                                                                refresh=refresh, channels=channels, live=live))
        try:
            await received_alongside_control(said, transfer, offer)
        finally:
            for task in (said, transfer):
                task.cancel()
            await asyncio.gather(said, transfer, return_exceptions=True)
            await asyncio.shield(receiver.close())
        progress.finish()



_PAGE_REQUEST = struct.Struct("=I4xQQQ")  # CRIU's struct page_server_iov (x86_64): cmd, nr_pages, vaddr, dst_id
_PS_CMD_MASK = 0xFFFF
_PS_CLOSING = {0x1023, 0x1024}  # PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE: the lazy-pages daemon has every page


async def _lazy_tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: Channel,
                       confirmed: asyncio.Event, abort: Callable[[], Awaitable[None]]) -> None:
    """Source: CRIU's page server (`reader`, `writer`) and the target's lazy-pages daemon (`channel`). The
    daemon only sends requests, fixed-size records; its closing one is held back until `confirmed`. Until
    then CRIU must never see its socket end (it would take that for "all sent" and end the container here):
    however the tunnel ends unconfirmed, `abort` stops CRIU first."""

    async def requests() -> None:
        pending = bytearray()
        async for chunk in channel.stream():
            pending += chunk
            while len(pending) >= _PAGE_REQUEST.size:
                record = bytes(pending[:_PAGE_REQUEST.size])
                del pending[:_PAGE_REQUEST.size]
                if _PAGE_REQUEST.unpack(record)[0] & _PS_CMD_MASK in _PS_CLOSING:
                    await confirmed.wait()
                writer.write(record)
            await writer.drain()
        if pending:
            raise InternalError("CRIU's lazy-pages daemon on the target sent a truncated page request")
        await confirmed.wait()
        writer.write_eof()

    try:
        await asyncio.gather(stdout_to_channel(reader, channel, None), requests())
    finally:
        if not confirmed.is_set():
            await asyncio.shield(abort())
        writer.close()


async def _unless_broken(work: Awaitable[None], watched: Sequence[asyncio.Future[None]]) -> None:
    """`work`, cancelled if one of the `watched` tasks fails first (its error is raised then)."""
    task = asyncio.ensure_future(work)
    try:
        pending: set[asyncio.Future[None]] = {task, *watched}
        while not task.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                error = None if finished is task or finished.cancelled() else finished.exception()
                if error is not None:
                    raise error
        task.result()
    finally:
        await _stopped(task)


async def _until_set(event: asyncio.Event, task: asyncio.Future[Any], what: str) -> None:
    """Until `event` is set, or `task` (the tool that is to set it) ends first."""
    waiting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if not event.is_set():
        task.result()
        raise InternalError(f"{what} ended before it served the memory")
