"""What every migration (instance or volume, live or not) shares: its websockets, its control messages, and
the small concurrency rules both halves follow. Nothing here knows an instance type or a state format."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any

from stapes.api.errors import InternalError, StapesError
from stapes.api.requests import InstanceSource, MigrationTarget
from stapes.server import process
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration import protocol
from stapes.server.migration.dial import dial
from stapes.server.operations import Operation
from stapes.server.paths import StatePaths
from stapes.server.progress import Progress
from stapes.server.storage.bound import DeclaredSizeExceeded, PoolFull
from stapes.server.storage.transfer import Transport, payload
from stapes.server.streams import IDLE_TIMEOUT, Channel, ChannelClosed, idle_timeout

CHANNELS = ("control", "fs")
LIVE_CHANNELS = ("control", "fs", "criu")
CONNECT_TIMEOUT = 60.0
SOURCE_CLOSE_WAIT = 10.0
TAR_ENTRY_BYTES = 1536  # tar's header and padding per file: 1.0-1.6 KiB on average, measured on real trees


def channel_names(live: bool) -> tuple[str, ...]:
    """The websockets of a migration: a live one adds `criu` (Incus's name) for the running state."""
    return LIVE_CHANNELS if live else CHANNELS


@contextlib.asynccontextmanager
async def open_channels(op: Operation, paths: StatePaths, peer: MigrationTarget | InstanceSource | None,
                        peer_name: str, names: Sequence[str] = CHANNELS) -> AsyncIterator[dict[str, Channel]]:
    """Dial the peer's operation (pull target, push source) or wait for the peer to dial ours; either
    way, a peer that goes silent for IDLE_TIMEOUT ends the migration."""
    if peer is not None:
        async with dial(peer.operation, dict(peer.secrets or {}), tuple(names), peer.certificate,
                        paths.server_cert, paths.server_key, peer_name) as channels, \
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


async def together(*work: Awaitable[None]) -> None:
    """Run concurrently; the first failure cancels the rest and is raised as itself."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def stopped(task: asyncio.Future[Any] | None) -> None:
    """Cancel `task` if it still runs, and wait until it has ended."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def to_the_end(task: asyncio.Future[Any]) -> bool:
    """Wait until `task` ended even if we are cancelled meanwhile: a tool killed in the middle of a dump could
    leave the instance frozen. Returns whether a cancellation arrived (the caller raises it once it has put
    things back)."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


async def unless_broken(work: Awaitable[None], watched: Sequence[asyncio.Future[None]]) -> None:
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
        await stopped(task)


async def volume_bytes(path: Path) -> int:
    result = await process.run(["du", "-s", "-B1", "--apparent-size", str(path)], check=False)
    try:
        return int(result.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


async def stream_bytes(path: Path) -> int:
    """What a volume's stream carries, about: its files' apparent size (a sparse file's data only: tar --sparse
    and btrfs send skip holes, so a VM's disk counts what it holds, and progress shows its share) plus tar's
    cost per entry. The target holds the source to it (storage/bound.py), so it errs on the high side."""
    data, entries = await asyncio.to_thread(payload, path)
    return data + TAR_ENTRY_BYTES * entries


def progress_of(op: Operation, stage: str, total: int) -> Progress:
    """Progress published in the operation's metadata (`fs_progress` for Incus's client, `progress`)."""
    def publish(figures: dict[str, Any]) -> None:
        op.update_metadata(fs_progress=figures["text"], progress=figures)

    return Progress(stage, total, publish)


async def report_failure(control: Channel, work: Awaitable[None]) -> None:
    """Target: run `work`; on any failure (or cancellation) tell the source why before raising it."""
    try:
        await work
    except BaseException as err:
        message = err.message if isinstance(err, StapesError) else (
            "cancelled" if isinstance(err, asyncio.CancelledError) else str(err))
        with contextlib.suppress(Exception):
            await asyncio.shield(send_control(control, False, message))
        if isinstance(err, ChannelClosed):
            raise InternalError(f"The source went away during the transfer: {err.message}") from None
        raise


async def send_control(control: Channel, success: bool, message: str = "") -> None:
    await control.send(pb.MigrationControl(success=success, message=message).SerializeToString())


async def receive_control(control: Channel) -> pb.MigrationControl:
    return protocol.parse_control(await control.receive(), "other side")


async def target_confirmed(control: Channel) -> None:
    """The target's word: success, or its reason raised."""
    result = await receive_control(control)
    if not result.success:
        raise InternalError(f"The target failed: {result.message}")


async def send_over(control: Channel, sender: Transport, paths: list[Path]) -> None:
    """The source's files, each path in order; a failure is told to the target (with the target's own reason
    when it gave one) before it is raised, and the transport is closed whatever happens."""
    try:
        for path in paths:
            await sender.send(path)
    except (StapesError, OSError) as err:
        reason = await peer_reason(control, err)
        with contextlib.suppress(Exception):
            await send_control(control, False, reason)
        raise InternalError(f"Transfer to the target failed: {reason}") from None
    finally:
        await asyncio.shield(sender.close())


async def peer_reason(control: Channel, fallback: StapesError | BaseException) -> str:
    """When a transfer breaks, the other side usually said why on the control channel: prefer that."""
    said = asyncio.create_task(receive_control(control))
    try:
        return await reason_from(said, fallback)
    finally:
        said.cancel()


async def source_finished(control: Channel) -> None:
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
        reason = failure_reason(said)
        if reason is not None:
            raise InternalError(f"The source failed: {reason}")
    try:
        await transfer
    except (PoolFull, DeclaredSizeExceeded):
        raise
    except (StapesError, OSError) as err:
        raise InternalError(f"Receiving from the source failed: {await reason_from(said, err)}") from None
    if protocol.sender_reports_completion(offer):
        result = await said
        if not result.success:
            raise InternalError(f"The source failed: {result.message}")


def failure_reason(said: asyncio.Task[pb.MigrationControl]) -> str | None:
    """What a finished read of the peer's control message says went wrong; None when it reported success."""
    if (failure := said.exception()) is not None:
        return failure.message if isinstance(failure, StapesError) else str(failure)
    reply = said.result()
    return None if reply.success else (reply.message or "no reason given")


async def reason_from(said: asyncio.Task[pb.MigrationControl], fallback: StapesError | BaseException) -> str:
    """The peer's reason from its control message (read by `said`, waited for 2 s at most), or `fallback`'s."""
    with contextlib.suppress(Exception):
        reply = await asyncio.wait_for(asyncio.shield(said), 2)
        if not reply.success and reply.message:
            return reply.message
    return fallback.message if isinstance(fallback, StapesError) else str(fallback)
