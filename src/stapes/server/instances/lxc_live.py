"""The LXC driver's live sessions: a container's running state as CRIU writes it, on the state channel.

Source: pre-copy rounds while it runs (`predump-<n>/`, each a tar followed by a MigrationSync), then the
final checkpoint (`final/`, parented on the last round; the container stops), its memory pages sent while
CRIU writes them where both ends agreed (growing.py), then, side by side, the last rsync of what changed in
the volume (fs) and the rest of the checkpoint (a tar on the state channel). The checkpoint stays on the
source's disk until the target confirmed: any failure before restores the container here from it. Post-copy
(lazy pages): CRIU dumps all but the memory and serves the memory through a socketpair tunnelled over the
state channel, on demand, once the target restored.

Target: the rounds and the final checkpoint file by file, each checked before it exists (statefiles.py),
the links among them (`parent`) checked, what the images name checked against the received root
(criu_images.py), then `lxc-checkpoint -r`, held until the source gave its copy up in a handover.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stapes.api.errors import BadRequest, InternalError, StapesError
from stapes.server.instances.driver import InstanceSpec, LiveLink, LiveSource, LiveTarget, LiveTerms, StateFiles
from stapes.server.migration import migrate_pb2 as pb
from stapes.server.migration import protocol
from stapes.server.migration.channels import stopped, to_the_end, together, unless_broken, volume_bytes
from stapes.server.migration.growing import receive_growing, send_growing
from stapes.server.migration.policy import PrecopySettings, another_precopy_round
from stapes.server.migration.statefiles import StateBudget, receive_state_files
from stapes.server.storage.transfer import rsync_receive, rsync_send, tar_send
from stapes.server.streams import Channel, stdout_to_channel, tunnel

if TYPE_CHECKING:
    from stapes.server.instances.lxc import LxcDriver

log = logging.getLogger(__name__)
MAX_PRECOPY_ROUNDS = 999  # the configuration's own limit


class CriuSource(LiveSource):
    """Pre-copy rounds, the final checkpoint (the container stops), then the rest of it beside the last sync."""

    def __init__(self, driver: LxcDriver, spec: InstanceSpec, directory: Path, terms: LiveTerms,
                 precopy: PrecopySettings) -> None:
        super().__init__(spec, directory, terms)
        self._driver = driver
        self._precopy = precopy
        self._pages: asyncio.Future[dict[str, int]] | None = None  # the memory pages, sent as CRIU writes them

    @property
    def final(self) -> Path:
        return self.directory / "final"

    async def run_until_paused(self, link: LiveLink, pausing: Callable[[], Awaitable[None]]) -> None:
        await asyncio.to_thread(self.final.mkdir, parents=True)
        try:
            parent = await self._rounds(link) if self._precopy.enabled else None
            await pausing()  # the dump outlives this server: should it stop meanwhile, its start finds out
            self.paused_at = time.monotonic()
            checkpoint = asyncio.ensure_future(self._driver.checkpoint(self.spec, self.final, parent))
            self._pages = self._stream_pages(checkpoint, link.state)
            if await to_the_end(checkpoint):
                await stopped(self._pages)
                if checkpoint.exception() is None:
                    await asyncio.shield(self.resume_here())
                raise asyncio.CancelledError
            checkpoint.result()
        except StapesError:
            await stopped(self._pages)
            raise
        self.figures["checkpoint_s"] = round(time.monotonic() - self.paused_at, 3)

    def _stream_pages(self, checkpoint: asyncio.Future[None], state: Channel) -> asyncio.Future[dict[str, int]] | None:
        """Where both ends agreed, the memory pages start travelling as the checkpoint writes them."""
        files = self._driver.growing_state_files
        if not self.terms.streamed or files is None:
            return None
        return asyncio.ensure_future(send_growing(self.final, files.pattern, checkpoint, state))

    async def _rounds(self, link: LiveLink) -> Path | None:
        """Pre-copy rounds while the container runs, each sent at once and followed by a MigrationSync saying
        whether it was the last; returns the last round's directory (the final checkpoint's parent)."""
        rounds: list[dict[str, Any]] = []
        parent: Path | None = None
        synced: float | None = None
        while another_precopy_round(self._precopy, len(rounds), synced):
            link.report(live_stage=f"pre-copy round {len(rounds) + 1}")
            started = time.monotonic()
            directory = self.directory / f"predump-{len(rounds) + 1}"
            await asyncio.to_thread(directory.mkdir)
            predump = asyncio.ensure_future(self._driver.predump(self.spec, directory, parent))
            if await to_the_end(predump):
                raise asyncio.CancelledError
            memory = predump.result()
            synced = memory.synced_percent
            await tar_send(directory, link.state, None)
            last = not another_precopy_round(self._precopy, len(rounds) + 1, synced)
            await link.state.send(pb.MigrationSync(finalPreDump=last).SerializeToString())
            rounds.append({"round": len(rounds) + 1, "pages_written": memory.pages_written,
                           "pages_skipped": memory.pages_skipped, "synced_percent": round(synced, 1),
                           "bytes": await volume_bytes(directory), "seconds": round(time.monotonic() - started, 3)})
            link.report(precopy_rounds=rounds)
            parent = directory
        return parent

    async def finish(self, link: LiveLink) -> None:
        """What changed in the volume (rsync, deletions too) beside the pages still being written, then the
        rest of the checkpoint in one tar."""
        async def rest_of_state() -> None:
            sent = await self._pages if self._pages is not None else {}
            if self._pages is not None:
                self.figures["streamed_bytes"] = sum(sent.values())
            await tar_send(self.final, link.state, None, leave_out=list(sent))

        await together(rsync_send(link.volume, link.fs, None, [*link.rsync_features, "delete"]), rest_of_state())
        self.figures["transfer_s"] = round(time.monotonic() - self.paused_at - self.figures["checkpoint_s"], 3)
        self.figures["state_bytes"] = await volume_bytes(self.final)

    async def resume_here(self) -> None:
        try:
            await self._driver.finalize_source(self.spec, self.final, resume=True)
        except StapesError as err:
            log.error("live migration rollback of %s failed: %s", self.spec.name, err.message)
            raise

    async def release(self, link: LiveLink) -> None:
        await self._driver.finalize_source(self.spec, self.final, resume=False)

    async def close(self) -> None:
        await stopped(self._pages)


class CriuLazySource(LiveSource):
    """Post-copy: CRIU dumps everything but the memory and serves the memory on a socketpair (no listener);
    that state and what changed in the volume go to the target, which restores at once; then the memory
    flows through the state channel (joined to CRIU's socket) as the target asks for it. Until the target
    confirmed, a failure stops CRIU and the container runs on here, its memory untouched; after, a broken
    link loses it (the documented risk of migration.lazy)."""

    recoverable: ClassVar[bool] = False  # CRIU holds the container until it ends: nothing to resume from
    resumed_note: ClassVar[str] = ": CRIU let it go on"

    def __init__(self, driver: LxcDriver, spec: InstanceSpec, directory: Path, terms: LiveTerms) -> None:
        super().__init__(spec, directory, terms)
        self._driver = driver
        # CRIU's page server serves one end of a socketpair it inherits; the other end is tunnelled to the
        # target: the memory never crosses a socket another local user could reach.
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._checkpoint: asyncio.Future[None] | None = None
        self._tunnel: asyncio.Future[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._confirmed = asyncio.Event()

    @property
    def final(self) -> Path:
        return self.directory / "final"

    async def run_until_paused(self, link: LiveLink, pausing: Callable[[], Awaitable[None]]) -> None:
        await asyncio.to_thread(self.final.mkdir, parents=True)
        serving = asyncio.Event()
        self.paused_at = time.monotonic()
        await pausing()
        theirs = self._theirs
        checkpoint = asyncio.ensure_future(self._driver.checkpoint(self.spec, self.final, None, lazy_socket=theirs,
                                                                   serving=serving))
        checkpoint.add_done_callback(lambda _: theirs.close())
        self._checkpoint = checkpoint
        try:
            await _until_set(serving, checkpoint, "CRIU's lazy dump")
        except (StapesError, OSError) as err:
            await asyncio.shield(self.resume_here())
            reason = err.message if isinstance(err, StapesError) else str(err)
            raise InternalError(f"{reason} ({self.spec.name!r} runs on the source again{self.resumed_note})") \
                from None
        except BaseException:
            await asyncio.shield(self.resume_here())
            raise
        theirs.close()  # CRIU's now: the tunnel sees the end of its stream once CRIU ends
        self.figures.update({"checkpoint_s": round(time.monotonic() - self.paused_at, 3),
                             "state_bytes": await volume_bytes(self.final), "lazy": True})

    async def finish(self, link: LiveLink) -> None:
        await together(rsync_send(link.volume, link.fs, None, [*link.rsync_features, "delete"]),
                       tar_send(self.final, link.state, None))

    async def sent(self, link: LiveLink) -> None:
        """The target's restore needs pages already; but its "I have them all" reaches CRIU only once the
        target confirmed: CRIU would end the container here at once, the target still able to fail."""
        await link.reached("source-before-memory")
        reader, self._writer = await asyncio.open_unix_connection(sock=self._ours)
        self._tunnel = asyncio.ensure_future(_lazy_tunnel(reader, self._writer, link.state, self._confirmed,
                                                          self._abort))

    async def _abort(self) -> None:
        await self._driver.abort_checkpoint(self.spec)
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)

    async def resume_here(self) -> None:
        await self._abort()  # CRIU first: the end of its socket would read as "all sent"
        await stopped(self._tunnel)
        if self._writer is not None:
            self._writer.close()  # the tunnel's, had it not started yet

    async def release(self, link: LiveLink) -> None:
        self._confirmed.set()
        link.report(live_stage="memory", live=self.figures)
        assert self._tunnel is not None and self._checkpoint is not None
        try:
            await together(self._tunnel, self._checkpoint)
        except (StapesError, OSError) as err:
            reason = err.message if isinstance(err, StapesError) else str(err)
            raise InternalError(f"The link broke while the memory of {self.spec.name!r} was moving (lazy pages): "
                                f"{reason}; the container is lost") from None
        self.figures["memory_s"] = round(time.monotonic() - self.paused_at - self.figures["frozen_s"], 3)
        await self._driver.finalize_source(self.spec, self.final, resume=False)

    async def close(self) -> None:
        self._theirs.close()
        if self._tunnel is None:  # otherwise the tunnel's transport owns it
            self._ours.close()


class CriuTarget(LiveTarget):
    """The rounds and the final checkpoint, checked, then `lxc-checkpoint -r` (held in a handover)."""

    def __init__(self, driver: LxcDriver, spec: InstanceSpec, directory: Path) -> None:
        super().__init__(spec, directory)
        self._driver = driver
        self._pages: list[asyncio.Future[None]] = []  # the lazy-pages tunnel
        self._lazy_socket: socket.socket | None = None
        self._started = False  # nothing runs before the restore: a failure before it has nothing to undo

    @property
    def final(self) -> Path:
        return self.directory / "final"

    async def receive(self, link: LiveLink) -> None:
        """The pre-copy rounds, then what changed while the first pass ran (rsync, deletions too) beside the
        final checkpoint; the links among them checked."""
        await asyncio.to_thread(self.final.mkdir, parents=True)
        budget = self._budget()
        if self.terms.precopy:
            await self._receive_rounds(link.state, budget)
        await together(rsync_receive(link.volume, link.fs, None, [*link.rsync_features, "delete"], link.admit),
                       self._receive_final(link, budget))
        await asyncio.to_thread(check_state_links, self.directory)

    def _state_files(self) -> StateFiles:
        if self._driver.state_files is None:
            raise BadRequest(f"This server cannot take {self.spec.name!r} live: its driver accepts no checkpoint")
        return self._driver.state_files

    def _budget(self) -> StateBudget:
        """The driver's bound for one checkpoint of the instance, for each pre-copy round and the final one (as
        many rounds as the instance's own configuration here allows, and the final checkpoint)."""
        per_round = self._driver.state_size_limit(self.spec)
        rounds = PrecopySettings.from_config(self.spec.config).iterations
        return StateBudget(self.directory, per_round, per_round * (rounds + 1))

    async def _receive_rounds(self, state: Channel, budget: StateBudget) -> None:
        """The source's pre-copy rounds, each into predump-<n>, until one is marked the last."""
        for number in range(1, MAX_PRECOPY_ROUNDS + 1):
            directory = self.directory / f"predump-{number}"
            await asyncio.to_thread(directory.mkdir)
            await receive_state_files(directory, state, self._state_files(), budget,
                                      links={f"../predump-{n}" for n in range(1, number)})
            if protocol.parse_sync(await state.receive(), "source").finalPreDump:
                return
        raise protocol.ProtocolError(f"Protocol error: the source sent more than {MAX_PRECOPY_ROUNDS} pre-copy "
                                     "rounds")

    async def _receive_final(self, link: LiveLink, budget: StateBudget) -> None:
        """The final checkpoint: the pages that travelled while it was written (if so agreed), then the rest;
        each file checked before it is written, all of it within the driver's bound (statefiles.py)."""
        await link.reached("target-before-state")
        files = self._driver.growing_state_files
        if self.terms.streamed and files is not None:
            await receive_growing(self.final, files.pattern, files.mode, link.state, budget.admit)
        rounds = await asyncio.to_thread(lambda: [p.name for p in self.directory.glob("predump-*")])
        await receive_state_files(self.final, link.state, self._state_files(), budget,
                                  links={f"../{n}" for n in rounds})

    async def check(self) -> None:
        """What its images name, against the received root: before the restore."""
        await self._driver.check_state(self.spec, self.directory)

    async def start(self, link: LiveLink) -> None:
        self._started = True
        if self.terms.lazy:  # CRIU's lazy-pages daemon inherits one end of a socketpair, the tunnel the other
            self._lazy_socket, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            self._pages.append(asyncio.ensure_future(tunnel(reader, writer, link.state)))
        # A tunnel that breaks meanwhile (the source gone) ends the restore: CRIU would wait for pages forever.
        if self.terms.handover:
            await self._driver.hold_restore(self.spec)
        await unless_broken(self._driver.restore(self.spec, self.final, lazy_socket=self._lazy_socket), self._pages)
        if self._lazy_socket is not None:
            self._lazy_socket.close()  # CRIU's now: the tunnel sees the end of its stream once CRIU ends

    async def release(self) -> None:
        await self._driver.release_restore(self.spec)

    async def until_complete(self, link: LiveLink) -> None:
        if self.terms.lazy:
            link.report(live_stage="memory")
            await together(self._pages[0], self._driver.memory_arrived(self.spec))

    async def finish(self) -> None:
        self._close_socket()
        await self._driver.finalize_target(self.spec, success=True)

    async def abort(self) -> None:
        if not self._started:
            return
        for task in self._pages:
            task.cancel()
        self._close_socket()
        await self._driver.finalize_target(self.spec, success=False)

    def _close_socket(self) -> None:
        if self._lazy_socket is not None:
            self._lazy_socket.close()


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
