"""A running VM's live move through QEMU: its disk mirrored while it runs, its memory by QEMU's own migration
stream, both over the daemons' own websockets (never a port of QEMU's: QEMU runs unprivileged, and every
socket it uses here is a descriptor the server hands it over QMP, `getfd`).

On the channels the migration service lends the session (LiveLink):
- `criu` (the state channel), source -> target: first one JSON message, the machine as the source runs it
  (what QEMU needs identical on both ends: machine type, CPU model and topology, memory, the disks' and nics'
  guest-visible identity, the UUID) and the policy's choices the target must share (post-copy); target ->
  source: one JSON message when it listens (`ready`, or why it cannot). Then QEMU's migration stream, carried
  both ways (its return path) until QEMU closes it, each direction ended by a barrier; after the handover, the
  target's verdict (`alive`) as one last JSON message.
- `fs`, once the volume's config files went (the disk itself is not sent before: `live_disk_mirrored`): the
  NBD connection of the source's `blockdev-mirror` to the target's NBD export of its disk.

The source mirrors the disk (full), waits until the mirror is READY, switches it to write-blocking (every
guest write is on both disks before the guest sees it done), then starts the memory migration with
`pause-before-switchover`. QEMU pauses the guest there; only the mirror is ended (`block-job-cancel` of a READY
mirror: a consistent copy, no pivot), then `migrate-continue`. Once the stream is complete the target holds its
copy paused until the source recorded that it gave its own up (the handover), then runs it and proves it alive
(the guest agent answers, where it answered on the source); only then does the source's QEMU quit. Before
the handover any failure cancels the migration and the mirror and continues the guest on the source.

The monitor loop reads `query-migrate` and calls the pure policy (qemu_policy.py) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qemu.qmp import EventListener

from stapes.api.errors import BadRequest, InternalError, StapesError
from stapes.server.instances import qemu_policy as policy
from stapes.server.instances.driver import InstanceSpec, LiveLink, LiveSource, LiveTarget, LiveTerms
from stapes.server.instances.qemu_machine import CPU_MODELS, MAX_CPUS, MIN_MEMORY_MIB, ROOT_NODE, Machine, Nic
from stapes.server.streams import Channel, drop, tunnel

if TYPE_CHECKING:
    from stapes.server.instances.qemu import QemuDriver

log = logging.getLogger(__name__)

MIRROR_NODE = "stapes-mirror"  # the source's NBD client node, and the mirror job's id
MIRROR_JOB = "stapes-mirror"
EXPORT = "stapes-root"  # the target's NBD export of its root disk
NBD_SOCKET = "nbd.sock"  # in the move's working directory (0700, root's): the target's NBD listener
MAX_DESCRIPTION = 64 << 10  # the machine's JSON from the peer
READY_TIMEOUT = 120.0  # the target starting its QEMU and listening
VERDICT_TIMEOUT = 60.0  # the target running the guest and proving it alive
ALIVE_TIMEOUT = 30.0  # the guest's agent answering on the target
POLL = 0.25  # query-migrate / query-block-jobs while nothing is urgent
SWITCHOVER_POLL = 0.002  # inside the pause: every millisecond counts
SWITCHOVER_TIMEOUT = 120.0  # from migrate-continue to QEMU's "completed"
MACHINE_TYPES = ("q35",)
ACTIVE = {"setup", "active", "pre-switchover", "device", "postcopy-active", "postcopy-paused",
          "postcopy-recover", "wait-unplug"}


def describe(machine: Machine, *, postcopy: bool, agent: bool) -> dict[str, Any]:
    """What the target needs to build the same machine (pure)."""
    return {
        "machine_type": machine.machine_type, "cpu_model": machine.cpu_model, "cpus": machine.cpus,
        "memory_mib": machine.memory_mib, "uuid": machine.uuid,
        "disks": [{"name": d.name, "boot_index": d.boot_index, "readonly": d.readonly} for d in machine.disks],
        "nics": [{"name": n.name, "mac": n.mac, "mtu": n.mtu} for n in machine.nics],
        "postcopy": postcopy, "agent": agent,
    }


def _field(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"Protocol error: the source's machine description has no valid {key!r}")
    return value


def rebuild(own: Machine, described: Any, *, host_memory_mib: int, machine_types: Collection[str] = ()) -> Machine:
    """The machine this server builds for the instance (`own`, its own paths, taps and accelerator), with the
    guest-visible identity of the source's; refused, saying why, where this server cannot build the same
    machine (pure). The source's versioned machine type must be one this QEMU builds (`machine_types`, or its
    own); the bare alias, as an older source sends it, is taken as is. The description is a peer's: every
    field is checked."""
    if not isinstance(described, dict):
        raise BadRequest("Protocol error: the source's machine description is not an object")
    machine_type = _field(described, "machine_type", str)
    if machine_type not in (*MACHINE_TYPES, own.machine_type, *machine_types):
        raise BadRequest(f"The source runs the VM as machine type {machine_type[:40]!r}, which QEMU here does not "
                         f"build (its newest is {own.machine_type!r}): upgrade QEMU here to the source's version "
                         "or later, or stop the VM and move it (--stateless)")
    cpu_model = _field(described, "cpu_model", str)
    ours = CPU_MODELS.get(own.accel, "max")
    if cpu_model != ours:
        raise BadRequest(f"The source runs the VM with CPU model {cpu_model!r}, and this server ({own.accel}) can "
                         f"only offer {ours!r}: the guest would see its CPU change under it; stop the VM and "
                         "move it, or use --stateless")
    cpus = _field(described, "cpus", int)
    if not 1 <= cpus <= MAX_CPUS:
        raise BadRequest(f"Protocol error: the source's VM has {cpus} CPUs (1 to {MAX_CPUS} are possible)")
    memory = _field(described, "memory_mib", int)
    if not MIN_MEMORY_MIB <= memory <= max(host_memory_mib, MIN_MEMORY_MIB):
        raise BadRequest(f"The source's VM has {memory} MiB of memory and this host {host_memory_mib} MiB: "
                         "move it to a larger server, or lower limits.memory and restart it first")
    machine_uuid = _field(described, "uuid", str)
    if len(machine_uuid) != 36 or any(c not in "0123456789abcdef-" for c in machine_uuid.lower()):
        raise BadRequest("Protocol error: the source's machine UUID is not a UUID")
    disks = _field(described, "disks", list)
    theirs = [(d.get("name"), d.get("boot_index"), d.get("readonly")) if isinstance(d, dict) else None
              for d in disks]
    if theirs != [(d.name, d.boot_index, d.readonly) for d in own.disks]:
        raise BadRequest("The source's VM has other disks than the instance here (only its root disk moves "
                         "live): stop the VM and move it")
    nics = _field(described, "nics", list)
    by_name = {n.name: n for n in own.nics}
    rebuilt: list[Nic] = []
    for entry in nics:
        if not isinstance(entry, dict) or entry.get("name") not in by_name:
            raise BadRequest(f"The source's VM has nic {entry.get('name') if isinstance(entry, dict) else entry!r}"
                             ", which the instance here lacks: give the target the same nics")
        mac, mtu = entry.get("mac"), entry.get("mtu")
        if not isinstance(mac, str) or len(mac) != 17 or mac.count(":") != 5:
            raise BadRequest("Protocol error: a nic of the source's VM has no valid MAC address")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535):
            raise BadRequest("Protocol error: a nic of the source's VM has an invalid MTU")
        rebuilt.append(replace(by_name[entry["name"]], mac=mac.lower(), mtu=mtu))
    if len(rebuilt) != len(own.nics):
        raise BadRequest("The instance here has nics the source's VM lacks: give the target the same nics")
    return replace(own, machine_type=machine_type, cpu_model=cpu_model, cpus=cpus, memory_mib=memory,
                   uuid=machine_uuid, nics=tuple(sorted(rebuilt, key=lambda n: n.name)))


async def send_json(channel: Channel, message: dict[str, Any]) -> None:
    await channel.send(json.dumps(message).encode())


async def receive_json(channel: Channel, what: str, timeout: float) -> dict[str, Any]:
    try:
        data = await asyncio.wait_for(channel.receive(), timeout)
    except TimeoutError:
        raise InternalError(f"The {what} did not come within {timeout:.0f}s") from None
    if data is None or len(data) > MAX_DESCRIPTION:
        raise BadRequest(f"Protocol error: the {what} is missing or too large")
    try:
        message = json.loads(data)
    except ValueError:
        raise BadRequest(f"Protocol error: the {what} is not JSON") from None
    if not isinstance(message, dict):
        raise BadRequest(f"Protocol error: the {what} is not an object")
    return message


class _Tunnels:
    """Local sockets carried over channels, both ways, each a task; a broken one fails `watch`."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        self.sockets: list[socket.socket] = []
        self.writers: list[asyncio.StreamWriter] = []

    def pair(self) -> tuple[socket.socket, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets += [ours, theirs]
        return ours, theirs

    async def carry(self, sock: socket.socket, channel: Channel, name: str) -> None:
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        self.writers.append(writer)
        self.tasks.append(asyncio.create_task(tunnel(reader, writer, channel), name=name))

    async def carry_to(self, path: Path, channel: Channel, name: str) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
        self.writers.append(writer)
        self.tasks.append(asyncio.create_task(tunnel(reader, writer, channel), name=name))

    def broken(self) -> str | None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and (err := task.exception()) is not None:
                return err.message if isinstance(err, StapesError) else str(err)
        return None

    async def ended(self, timeout: float) -> None:
        """Waits (bounded) for every tunnel to end on its own (both sides done), then closes what is left."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout)
        await self.close()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:  # a task cancelled before it ran never dropped its own
            drop(writer)
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


class QemuLiveSource(LiveSource):
    recoverable: ClassVar[bool] = True
    resumed_note: ClassVar[str] = ", its guest continued where it was"

    def __init__(self, driver: QemuDriver, spec: InstanceSpec, directory: Path, terms: LiveTerms) -> None:
        super().__init__(spec, directory, terms)
        self.driver = driver
        self.policy = policy.LivePolicy.from_config(spec.config)
        self.tunnels = _Tunnels()
        self.migrating = False
        self.started = 0.0

    async def _qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        return await self.driver.execute(self.spec, command, arguments, timeout)

    async def run_until_paused(self, link: LiveLink, pausing: Callable[[], Awaitable[None]]) -> None:
        try:
            await self._run_until_paused(link, pausing)
        except BaseException as err:
            began = time.monotonic()
            log.info("%s: the live move stopped (%s); continuing the guest here", self.spec.name,
                     err.message if isinstance(err, StapesError) else type(err).__name__)
            await asyncio.shield(self.resume_here())
            log.info("%s: continued here in %.2fs", self.spec.name, time.monotonic() - began)
            raise

    async def _run_until_paused(self, link: LiveLink, pausing: Callable[[], Awaitable[None]]) -> None:
        self.started = time.monotonic()
        machine = await self.driver.running_machine(self.spec)
        agent = await self.driver.agent_answers(self.spec)
        await send_json(link.state, {"machine": describe(machine, postcopy=self.policy.action == "postcopy",
                                                         agent=agent)})
        ready = await receive_json(link.state, "target's word that it listens", READY_TIMEOUT)
        if ready.get("ready") is not True:
            raise InternalError(f"The target cannot take the VM: {str(ready.get('error') or 'no reason given')}")
        disk_bytes = await self.driver.disk_size(self.spec)
        data_bytes = machine.memory_mib * 2**20 + disk_bytes
        steps = policy.downtime_steps(self.policy, data_bytes)
        timeout = policy.completion_timeout(self.policy, machine.memory_mib * 2**20, disk_bytes, timeout_floor())
        deadline = None if timeout is None else self.started + timeout

        # The disk: an NBD client on our end of a socketpair, carried over fs to the target's export.
        ours, qemus = self.tunnels.pair()
        await self.tunnels.carry(ours, link.fs, "nbd tunnel")
        await self.driver.pass_fd(self.spec, qemus.fileno(), MIRROR_NODE)
        qemus.close()
        await self._qmp("blockdev-add", {"driver": "nbd", "node-name": MIRROR_NODE, "export": "root",
                                         "server": {"type": "fd", "str": MIRROR_NODE}}, timeout=30)
        await self._qmp("blockdev-mirror", {"job-id": MIRROR_JOB, "device": ROOT_NODE, "target": MIRROR_NODE,
                                            "sync": "full", "auto-dismiss": False,
                                            "speed": policy.mirror_speed(self.policy),
                                            "buf-size": policy.mirror_buffer(self.policy)})
        link.report(live_stage="disk")
        while True:
            job = await self._mirror_job()
            if job is None or job.get("status") in ("concluded", "null", "aborting"):
                error = (job or {}).get("error") or "no reason given"
                with contextlib.suppress(InternalError):
                    await self._qmp("job-dismiss", {"id": MIRROR_JOB})
                raise InternalError(f"The disk mirror to the target ended before it was in sync ({error})"
                                    f"{self._broken_note()}")
            done, total = int(job.get("offset", 0)), int(job.get("len", 0))
            link.report(progress=_progress("disk", done, total, self.started), vm=_disk_figures(done, total))
            if job.get("ready"):
                break
            self._check_deadline(deadline, timeout)
            await asyncio.sleep(POLL)
        await self._qmp("block-job-change", {"id": MIRROR_JOB, "type": "mirror", "copy-mode": "write-blocking"})
        self.figures["disk_bytes"] = disk_bytes
        self.figures["disk_s"] = round(time.monotonic() - self.started, 3)
        log.info("%s: its disk in sync on the target after %.2fs (%d MiB mirrored); now its memory",
                 self.spec.name, self.figures["disk_s"], done // 2**20)

        # The memory: QEMU's stream on our end of another socketpair, carried over the state channel.
        await self._qmp("migrate-set-capabilities", {"capabilities": policy.capabilities(self.policy)})
        await self._qmp("migrate-set-parameters", policy.parameters(self.policy, steps))
        ours, qemus = self.tunnels.pair()
        await self.tunnels.carry(ours, link.state, "migration tunnel")
        await self.driver.pass_fd(self.spec, qemus.fileno(), "stapes-migrate")
        qemus.close()
        await pausing()
        memory_started = time.monotonic()
        self.migrating = True
        client = await self.driver.qmp(self.spec)
        events = EventListener(("MIGRATION", "MIGRATION_PASS"))
        client.register_listener(events)
        try:
            await self._migrate(link, steps, deadline, memory_started, events)
        finally:
            client.remove_listener(events)

    async def _migrate(self, link: LiveLink, steps: list[tuple[float, int]], deadline: float | None,
                       memory_started: float, events: EventListener) -> None:
        """The memory phase: QEMU's figures read on each of its events (or every POLL s), the policy obeyed,
        until QEMU pauses the guest before the switchover; then only the mirror ends."""
        await self._qmp("migrate", {"uri": "fd:stapes-migrate"})
        link.report(live_stage="memory")
        history: list[policy.Figures] = []
        downtime = steps[0][1]
        acted = False
        while True:
            answer = await self._qmp("query-migrate")
            figures = policy.Figures.from_query(answer, time.monotonic() - memory_started)
            history = [*history[-400:], figures]
            if figures.status == "pre-switchover":
                break
            if figures.status in ("failed", "cancelled"):
                raise InternalError(f"QEMU's migration {figures.status}: {figures.error or 'no reason given'}"
                                    f"{self._broken_note()}")
            link.report(progress=_progress("memory", figures.transferred, figures.transferred + figures.remaining,
                                           memory_started), vm=_memory_figures(figures, downtime))
            decision = policy.decide(self.policy, steps, None if deadline is None else deadline - memory_started,
                                     history, downtime, acted)
            if decision.downtime_ms is not None and decision.downtime_ms != downtime:
                downtime = decision.downtime_ms
                await self._qmp("migrate-set-parameters", {"downtime-limit": downtime})
            if decision.action == "abort":
                raise InternalError(f"The live move was stopped: {decision.reason}")
            if decision.action == "postcopy" and not acted:
                acted = True
                log.info("%s: switching to post-copy (%s)", self.spec.name, decision.reason)
                await self._qmp("migrate-start-postcopy")
            elif decision.action == "throttle" and not acted:
                acted = True
                log.info("%s: throttling the guest (%s)", self.spec.name, decision.reason)
                await self._qmp("migrate-set-parameters", {"max-cpu-throttle": policy.MAX_THROTTLE})
            if (broken := self.tunnels.broken()) is not None:
                raise InternalError(f"The connection to the target broke during the memory transfer: {broken}")
            with contextlib.suppress(TimeoutError):  # the pause is noticed at once: it counts as downtime
                await asyncio.wait_for(events.get(), POLL)
        # Paused (pre-switchover): end the mirror, nothing else, and let QEMU send the rest.
        self.paused_at = time.monotonic()
        link.report(live_stage="switchover")
        await self._qmp("block-job-cancel", {"device": MIRROR_JOB})
        ends_by = time.monotonic() + SWITCHOVER_TIMEOUT
        while (job := await self._mirror_job()) is not None and job.get("status") != "concluded":  # noqa: ASYNC110
            if time.monotonic() > ends_by:
                raise InternalError(f"QEMU did not end the disk mirror within {SWITCHOVER_TIMEOUT:.0f}s of the "
                                    f"pause{self._broken_note()}")
            await asyncio.sleep(SWITCHOVER_POLL)
        if job is not None:
            await self._qmp("job-dismiss", {"id": MIRROR_JOB})
            if job.get("error"):
                raise InternalError(f"The disk mirror failed as it ended: {job['error']}")
        await self._qmp("migrate-continue", {"state": "pre-switchover"})
        self.figures["iterations"] = history[-1].iteration
        self.figures["memory_bytes"] = history[-1].transferred

    async def finish(self, link: LiveLink) -> None:
        deadline = time.monotonic() + SWITCHOVER_TIMEOUT
        while True:
            answer = await self._qmp("query-migrate")
            status = str(answer.get("status", ""))
            if status == "completed":
                break
            if time.monotonic() > deadline:
                raise InternalError(f"QEMU did not complete the switchover within {SWITCHOVER_TIMEOUT:.0f}s "
                                    f"(it reports {status!r}){self._broken_note()}")
            if status not in ACTIVE:
                raise InternalError(f"QEMU's migration {status}: {answer.get('error-desc') or 'no reason given'}"
                                    f"{self._broken_note()}")
            await asyncio.sleep(SWITCHOVER_POLL)
        figures = policy.Figures.from_query(answer, time.monotonic() - self.started)
        self.figures["downtime_ms"] = figures.downtime_ms
        self.figures["memory_bytes"] = figures.transferred
        self.figures["total_s"] = round(time.monotonic() - self.started, 3)
        with contextlib.suppress(InternalError):  # closes the NBD connection: its tunnel ends
            await self._qmp("blockdev-del", {"node-name": MIRROR_NODE})
        await self.tunnels.ended(10)
        link.report(live_stage="handover", vm={"downtime_ms": figures.downtime_ms})

    async def resume_here(self) -> None:
        """The migration and the mirror cancelled, the guest continued: as it was before the move."""
        await self.tunnels.close()
        try:
            await self.driver.cancel_migration(self.spec)
        except StapesError as err:
            raise InternalError(f"the VM could not be continued on the source: {err.message}") from None

    async def release(self, link: LiveLink) -> None:
        """The target runs the guest once we gave it up; its verdict decides what our paused copy becomes."""
        try:
            verdict = await receive_json(link.state, "target's word that the VM runs there", VERDICT_TIMEOUT)
        except StapesError as err:
            raise InternalError(
                f"The target did not say whether {self.spec.name!r} runs there after the handover ({err.message}): "
                "its copy here stays paused (Frozen), never run twice; check the target: delete it here if it "
                "runs there, otherwise unfreeze it here (stapes start)") from None
        if verdict.get("alive") is True:
            await self.driver.stop(self.spec, timeout=0, force=True)
            return
        reason = str(verdict.get("reason") or "no reason given")[:500]
        await self.driver.cancel_migration(self.spec)
        raise InternalError(f"The VM did not come alive on the target ({reason}): it was removed there and "
                            "runs on the source again, its guest continued where it was")

    async def close(self) -> None:
        await self.tunnels.close()

    async def _mirror_job(self) -> dict[str, Any] | None:
        for job in await self._qmp("query-block-jobs"):
            if isinstance(job, dict) and job.get("device") == MIRROR_JOB:
                return job
        return None

    def _check_deadline(self, deadline: float | None, timeout: float | None) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise InternalError(f"The disk mirror did not get in sync within {timeout:.0f}s (migration.timeout "
                                "per GiB of memory and disk): set a larger migration.timeout, or stop the VM "
                                "and move it")

    def _broken_note(self) -> str:
        broken = self.tunnels.broken()
        return f" (the connection to the target: {broken})" if broken else ""


class QemuLiveTarget(LiveTarget):
    def __init__(self, driver: QemuDriver, spec: InstanceSpec, directory: Path) -> None:
        super().__init__(spec, directory)
        self.driver = driver
        self.tunnels = _Tunnels()
        self.link: LiveLink | None = None
        self.agent = False
        self.released = False
        self.started_qemu = False

    async def _qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        return await self.driver.execute(self.spec, command, arguments, timeout)

    async def receive(self, link: LiveLink) -> None:
        self.link = link
        message = await receive_json(link.state, "source's machine description", READY_TIMEOUT)
        described = message.get("machine")
        try:
            await self._listen(link, described)
        except StapesError as err:
            with contextlib.suppress(Exception):
                await send_json(link.state, {"ready": False, "error": err.message})
            raise
        await send_json(link.state, {"ready": True})
        ours, qemus = self.tunnels.sockets[-2:]
        await self.tunnels.carry(ours, link.state, "migration tunnel")
        await self.tunnels.carry_to(self.directory / NBD_SOCKET, link.fs, "nbd tunnel")
        link.report(live_stage="memory")
        # Bounded by this instance's own policy, whatever the source does (it may keep the links busy forever).
        machine = await self.driver.running_machine(self.spec)
        limit = policy.completion_timeout(policy.LivePolicy.from_config(self.spec.config),
                                          machine.memory_mib * 2**20, await self.driver.disk_size(self.spec),
                                          timeout_floor())
        allowed = None if limit is None else limit * 1.5
        deadline = None if allowed is None else time.monotonic() + allowed
        while True:
            answer = await self._qmp("query-migrate")
            status = str(answer.get("status", ""))
            if status == "completed":
                break
            if deadline is not None and allowed is not None and time.monotonic() > deadline:
                raise InternalError(f"The source's VM did not arrive within {allowed:.0f}s (1.5 times its "
                                    "migration.timeout)")
            if status in ("failed", "cancelled"):
                raise InternalError(f"QEMU here could not take the VM's state: {answer.get('error-desc') or status}")
            if (broken := self.tunnels.broken()) is not None:
                raise InternalError(f"The connection to the source broke during the move: {broken}")
            await asyncio.sleep(0.01)
        await self._qmp("nbd-server-stop")
        await self.tunnels.ended(10)

    async def _listen(self, link: LiveLink, described: Any) -> None:
        if not isinstance(described, dict):
            raise BadRequest("Protocol error: the source sent no machine description")
        self.agent = described.get("agent") is True
        postcopy = described.get("postcopy") is True
        await asyncio.to_thread(_private, self.directory)
        self.started_qemu = True
        await self.driver.start_incoming(self.spec, lambda own, host_mib: rebuild(
            own, described, host_memory_mib=host_mib, machine_types=self.driver.accelerator.machine_types))
        if postcopy:
            try:
                await self._qmp("migrate-set-capabilities",
                                {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
            except InternalError as err:
                raise BadRequest(
                    f"This server cannot take the VM in post-copy (migration.timeout_action=postcopy): {err.message}. "
                    "Post-copy needs userfaultfd for QEMU's unprivileged user, which this host allows only with "
                    "vm.unprivileged_userfaultfd=1 (for every user of the host); set that here, or give the VM "
                    "migration.timeout_action=abort or auto-converge") from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.directory / NBD_SOCKET))
            listener.listen(1)
            await self.driver.pass_fd(self.spec, listener.fileno(), "stapes-nbd")
        finally:
            listener.close()
        await self._qmp("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "stapes-nbd"}},
                                             "max-connections": 1})
        # An incoming QEMU holds its disks inactive (the source owns them until the switchover); this disk is
        # written by the source's mirror only, so it is made active (writable) for the export.
        await self._qmp("blockdev-set-active", {"node-name": ROOT_NODE, "active": True})
        await self._qmp("block-export-add", {"type": "nbd", "id": EXPORT, "node-name": ROOT_NODE, "name": "root",
                                             "writable": True})
        self.tunnels.pair()
        await self.driver.pass_fd(self.spec, self.tunnels.sockets[-1].fileno(), "stapes-incoming")
        self.tunnels.sockets[-1].close()
        await self._qmp("migrate-incoming", {"uri": "fd:stapes-incoming"})

    async def start(self, link: LiveLink) -> None:
        """The state is in; the guest is held paused until the source gave its copy up (the handover)."""
        if not self.terms.handover:
            await self.release()

    async def release(self) -> None:
        self.released = True
        await self._qmp("cont")
        reason = await self._alive()
        if reason is not None:
            raise InternalError(f"The VM did not come alive here: {reason}")
        if self.link is not None:
            with contextlib.suppress(StapesError):
                await send_json(self.link.state, {"alive": True})

    async def _alive(self) -> str | None:
        """None when the guest runs: QEMU says so, and its agent answers (where it answered on the source)."""
        status = (await self._qmp("query-status")).get("status")
        if status != "running":
            return f"QEMU reports it {status!r} after it was continued"
        if not self.agent:
            await asyncio.sleep(1)
            status = (await self._qmp("query-status")).get("status")
            return None if status == "running" else f"QEMU reports it {status!r} a second after it was continued"
        if await self.driver.agent_answers(self.spec, ALIVE_TIMEOUT):
            return None
        return f"its guest agent, which answered on the source, did not answer within {ALIVE_TIMEOUT:.0f}s"

    async def abort(self) -> None:
        if self.released and self.link is not None:
            with contextlib.suppress(Exception):
                await send_json(self.link.state, {"alive": False, "reason": "the target failed after the handover"})
        await self.tunnels.close()
        if self.started_qemu:
            with contextlib.suppress(StapesError):
                await self.driver.stop(self.spec, timeout=0, force=True)

    async def finish(self) -> None:
        await self.tunnels.close()


def timeout_floor() -> float:
    """The completion timeout's floor: policy.MIN_TIMEOUT; STAPES_LIVE_MIN_TIMEOUT (seconds) lowers it for the
    tests that make the timeout fire, as STAPES_MIGRATION_IDLE_TIMEOUT does for idle links."""
    try:
        floor = float(os.environ.get("STAPES_LIVE_MIN_TIMEOUT", policy.MIN_TIMEOUT))
    except ValueError:
        return policy.MIN_TIMEOUT
    return floor if floor > 0 else policy.MIN_TIMEOUT


def _private(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    (directory / NBD_SOCKET).unlink(missing_ok=True)


def _progress(stage: str, done: int, total: int, started: float) -> dict[str, Any]:
    elapsed = max(time.monotonic() - started, 1e-3)
    rate = done / elapsed
    figures: dict[str, Any] = {"stage": stage, "bytes": done, "total": total, "rate": int(rate)}
    if total > 0:
        figures["percent"] = min(100, int(100 * done / total))
        if rate > 0:
            figures["eta"] = max(0, int((total - done) / rate))
    return figures


def _disk_figures(done: int, total: int) -> dict[str, Any]:
    return {"phase": "disk", "disk_bytes": done, "disk_total": total}


def _memory_figures(f: policy.Figures, downtime: int) -> dict[str, Any]:
    return {"phase": "memory", "memory_bytes": f.transferred, "memory_remaining": f.remaining,
            "memory_total": f.total, "rate_mbps": f.mbps, "dirty_rate_pages": f.dirty_rate,
            "iteration": f.iteration, "expected_downtime_ms": f.expected_downtime_ms, "downtime_limit_ms": downtime,
            "throttle_percent": f.throttle_percent, "eta": policy.eta(f)}
