"""What an instance driver must offer, and what it declares it can do."""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stapes.api.errors import BadRequest
from stapes.api.status import StatusCode
from stapes.server.idmap import IdRange
from stapes.server.migration.policy import PrecopySettings
from stapes.server.streams import Channel


@dataclass
class InstanceSpec:
    """Everything a driver needs to know about one instance, already expanded from its profiles."""

    project: str
    name: str
    config: Mapping[str, str]
    devices: Mapping[str, Mapping[str, str]]
    volume: Path
    nics: Mapping[str, str] = field(default_factory=dict)  # nic device -> the host bridge it joins
    idmap: tuple[IdRange, ...] = ()  # empty: privileged (no user namespace)
    volumes: Mapping[str, Path] = field(default_factory=dict)  # disk device -> its custom volume's directory
    disk: Path | None = None  # a block root disk (a VM's raw image, inside `volume`); None: `volume` is the root

    @property
    def runtime_name(self) -> str:
        """The name the hypervisor knows: unique per server, also across projects."""
        return self.name if self.project == "default" else f"{self.project}_{self.name}"


@dataclass
class RuntimeState:
    status: StatusCode
    pid: int = -1
    processes: int = -1
    memory: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)
    network: dict[str, Any] | None = None
    error: str = ""  # why the status is Error: the state could not be read (a query that timed out)

    def to_json(self) -> dict[str, Any]:
        body = {
            "status": self.status.label, "status_code": int(self.status), "pid": self.pid,
            "processes": self.processes, "memory": self.memory or {"usage": 0, "usage_peak": 0},
            "cpu": self.cpu or {"usage": 0}, "disk": {}, "network": self.network,
        }
        if self.error:
            body["status_error"] = self.error
        return body


@dataclass(frozen=True)
class MemoryRound:
    """What one pre-copy round of a live move wrote, from the hypervisor's own figures."""

    pages_written: int
    pages_skipped: int  # unchanged since the previous round: already on the target

    @property
    def synced_percent(self) -> float:
        total = self.pages_written + self.pages_skipped
        return 100.0 if total == 0 else 100.0 - 100.0 * self.pages_written / total


@dataclass(frozen=True)
class ExecRequest:
    command: list[str]
    environment: dict[str, str]
    cwd: str
    user: int
    group: int
    interactive: bool


@dataclass(frozen=True)
class GrowingFiles:
    """State files a checkpoint writes front to back and never rewrites, and the mode it gives them (the
    target creates them itself; a restore may read them from inside a user namespace)."""

    pattern: re.Pattern[str]
    mode: int


@dataclass(frozen=True)
class StateFiles:
    """What a checkpoint of this driver may hold when a peer sends it: only regular files, each a plain name
    matching `pattern` (never a path), created by the target with `mode`; anything else is refused before it
    exists on disk."""

    pattern: re.Pattern[str]
    mode: int


@dataclass(frozen=True)
class LiveTerms:
    """What both ends of one live move agreed in the header and its answer (protocol.py decides them)."""

    precopy: bool = False  # memory copied in rounds while the instance runs, before it pauses
    lazy: bool = False  # post-copy: the memory follows the start on the target, on demand
    streamed: bool = False  # the state travels while it is being written, not after (stapesStreamedState)
    handover: bool = False  # the target holds its started copy until the source gave its own up


@dataclass
class LiveLink:
    """What the migration service lends a live session: the state channel (`criu`, Incus's name, whatever the
    driver sends on it) is the session's alone; `fs` is free again once the volume went (the last sync of a
    container's files, or a VM's disk mirror); the session reports stages and figures with `report` and
    passes the fault-injection points with `reached`."""

    state: Channel
    fs: Channel
    volume: Path  # the instance's volume (source: sent; target: received)
    rsync_features: list[str]
    report: Callable[..., None]  # Operation.update_metadata
    reached: Callable[[str], Awaitable[None]]  # faults.pause_point with this server's state directory
    admit: Callable[[int], Awaitable[None]] | None = None  # target: the receive bound of the volume's bytes


class LiveSource(ABC):
    """The source half of one live move, opened by the instance's driver. The migration service keeps the
    channels, the header, the control messages and the commit-or-rollback decision; the session owns the
    bytes of the running state. Its hooks, in order: `run_until_paused`, `finish`, `sent`, then either
    `release` (the target confirmed) or `resume_here` (it did not); `close` always."""

    # A crash of this server after the pause leaves a state this server resumes from at its start (the
    # service then records the move in its working directory, and `InstanceDriver.recover_source` reads it).
    recoverable: ClassVar[bool] = True
    # Said after "runs on the source again" when a failure put the instance back (how it runs again).
    resumed_note: ClassVar[str] = ""

    def __init__(self, spec: InstanceSpec, directory: Path, terms: LiveTerms) -> None:
        self.spec = spec
        self.directory = directory  # this move's working directory, the server's own (removed at the end)
        self.terms = terms
        self.figures: dict[str, Any] = {}  # published with the operation (checkpoint_s, transfer_s, ...)
        self.paused_at = 0.0  # time.monotonic() when the instance stopped running here

    @abstractmethod
    async def run_until_paused(self, link: LiveLink, pausing: Callable[[], Awaitable[None]]) -> None:
        """Copy what can move while the instance runs, then pause it with its state complete (post-copy: with
        the state but its memory, served from here). `pausing` is awaited just before the pause (the service
        records it). A failure leaves the instance running here and is raised; cancelled, the same, then
        CancelledError."""

    @abstractmethod
    async def finish(self, link: LiveLink) -> None:
        """The instance is paused: send what is left of its state, and what changed meanwhile."""

    async def sent(self, link: LiveLink) -> None:  # noqa: B027 - optional
        """The service told the target it has everything: start serving what follows the start (post-copy)."""

    @abstractmethod
    async def resume_here(self) -> None:
        """Before the target confirmed (a failure, or a live copy): the instance runs here again, as it was."""

    @abstractmethod
    async def release(self, link: LiveLink) -> None:
        """The target confirmed and runs it: what the instance left here goes (post-copy: once its memory
        is all there)."""

    async def close(self) -> None:  # noqa: B027 - optional
        """Always, at the end: nothing the session started keeps running."""


class LiveTarget(ABC):
    """The target half of one live move, opened by the instance's driver. Hooks, in order: `prepare` before
    the answer goes, `receive` once the volume is here, `check`, `start` once the instance is defined, then
    `release` (a handover: the source gave its copy up), `until_complete`, and `finish` (success) or `abort`."""

    def __init__(self, spec: InstanceSpec, directory: Path) -> None:
        self.spec = spec
        self.directory = directory  # this move's working directory, the server's own (removed at the end)
        self.terms = LiveTerms()  # set by the service before `prepare`: what the answer says

    async def prepare(self) -> None:  # noqa: B027 - optional
        """Before the answer goes to the source (`terms` are set): be ready for its state (a QEMU target
        listens before the source sends)."""

    @abstractmethod
    async def receive(self, link: LiveLink) -> None:
        """The source's state, and what changed in the volume meanwhile; each byte checked as it arrives."""

    async def check(self) -> None:  # noqa: B027 - optional
        """After the received volume's layout was checked: the state names nothing outside the instance."""

    @abstractmethod
    async def start(self, link: LiveLink) -> None:
        """Run the defined instance from the received state (held, in a handover, until `release`)."""

    async def release(self) -> None:
        """A handover: the source gave its copy up; record that, then let the instance run."""
        raise NotImplementedError

    async def until_complete(self, link: LiveLink) -> None:  # noqa: B027 - optional
        """Post-copy: returns once all of the state is here."""

    async def finish(self) -> None:  # noqa: B027 - optional
        """It runs here, the move is over."""

    @abstractmethod
    async def abort(self) -> None:
        """On any failure after `prepare` (called once, before the received volume is removed): nothing of the
        instance keeps running here."""


class InstanceDriver(ABC):
    """Lifecycle, and live migration as sessions the driver opens on both sides (as Ganeti's hypervisors
    have their hooks): the source says whether an instance can move live and its session pauses and sends
    it; the target says whether it can accept it and its session receives and starts it; rollback is a hook
    of both. The migration service calls these only, whatever the instance type."""

    instance_type: ClassVar[str]
    # Whether the instance runs in a user namespace mapped into root's subordinate ids (unprivileged
    # containers); a VM is isolated by the hypervisor instead and has no id map.
    id_mapped: ClassVar[bool] = False
    # The live state type the header names (Incus's CRIUType: "CRIU_RSYNC" for containers, "VM_QEMU" for
    # virtual machines); None: this driver moves nothing live.
    live_state_type: ClassVar[str | None] = None
    # The session can send its state while it is being written (negotiated: stapesStreamedState).
    streamed_state: ClassVar[bool] = False
    # The live session moves the volume's block disk itself (a mirror while the instance runs): the transfer
    # before it sends the files beside the disk and the disk's size only.
    live_disk_mirrored: ClassVar[bool] = False

    def check_instance(  # noqa: B027 - most types take what the generic checks took
            self, config: Mapping[str, str], devices: Mapping[str, Mapping[str, str]]) -> None:
        """Refuse (BadRequest, saying what is supported) expanded config keys or devices this type cannot
        honour; the generic checks have run already."""

    @abstractmethod
    async def define(self, spec: InstanceSpec) -> None:
        """Write (or rewrite) the runtime definition; called on create and on every config change."""

    @abstractmethod
    async def undefine(self, spec: InstanceSpec) -> None: ...

    async def hotplug(self, old: InstanceSpec | None, new: InstanceSpec) -> None:  # noqa: B027 - optional
        """A running instance's attached custom volumes changed (`volumes`): apply it at once."""

    @abstractmethod
    async def start(self, spec: InstanceSpec) -> None: ...

    @abstractmethod
    async def stop(self, spec: InstanceSpec, *, timeout: float, force: bool) -> None: ...

    @abstractmethod
    async def freeze(self, spec: InstanceSpec) -> None: ...

    @abstractmethod
    async def unfreeze(self, spec: InstanceSpec) -> None: ...

    @abstractmethod
    async def state(self, spec: InstanceSpec, *, detail: bool) -> RuntimeState: ...

    @abstractmethod
    async def states(self, specs: list[InstanceSpec]) -> dict[str, RuntimeState]:
        """Status of many instances in one go (for listings), keyed by runtime name; bounded in time: an
        instance whose state cannot be read shows as Error (with the reason), never failing the others."""

    @abstractmethod
    async def exec(self, spec: InstanceSpec, request: ExecRequest, stdio: tuple[Any, Any, Any]
                   ) -> asyncio.subprocess.Process: ...

    # How the driver's report that an exec's command could not be executed starts (b"": it has none).
    exec_failure_prefix: ClassVar[bytes] = b""

    def exec_failure(self, head: bytes, code: int) -> str | None:
        """Why an exec's command never ran ("Command not found"), when its exit status `code` and `head`, the
        first output it wrote, are the driver's own report of that (which the user is not shown); None when
        the command ran."""
        return None

    @abstractmethod
    def log_files(self, spec: InstanceSpec) -> dict[str, Path]: ...

    def check_volume_layout(self, volume: Path) -> None:
        """A volume received or unpacked for this driver (from an image, a backup, a peer) is shaped as the
        driver needs it, nothing in its place that would lead out of it; BadRequest otherwise. Blocking."""
        if volume.is_symlink() or not volume.is_dir():
            raise BadRequest("The instance's files are not a volume: a symlink or a file was received in its place")

    def prepare_volume(self, volume: Path, name: str) -> None:  # noqa: B027 - optional
        """A new volume (created, copied, moved or renamed) becomes instance `name`'s. Blocking."""

    # Live migration. The defaults refuse: a driver that can move instances live overrides them.
    async def live_refusal(self, spec: InstanceSpec) -> str | None:
        """Source: None when this running instance can move live from here; otherwise why not, and what to do."""
        return f"{self.instance_type}s cannot move live with this server: move with --stateless"

    async def accept_refusal(self, spec: InstanceSpec) -> str | None:
        """Target: None when an instance running elsewhere can be taken live here; otherwise why not."""
        return f"{self.instance_type}s cannot move live to this server: move with --stateless"

    def precopy_refusal(self) -> str | None:
        """None when memory can be copied in rounds while the instance runs (pre-copy); otherwise why not."""
        return "this driver copies no memory in rounds"

    def lazy_refusal(self, spec: InstanceSpec) -> str | None:
        """None when the memory can follow the start on the target, on demand (post-copy); otherwise why not."""
        return "this driver cannot send memory after the restore"

    def live_source(self, spec: InstanceSpec, directory: Path, terms: LiveTerms, *, precopy: PrecopySettings,
                    keep_running: bool) -> LiveSource:
        """Source: the session of one live move, opened once the target answered (`terms`)."""
        raise NotImplementedError

    def live_target(self, spec: InstanceSpec, directory: Path) -> LiveTarget:
        """Target: the session of one live move."""
        raise NotImplementedError

    async def recover_source(self, spec: InstanceSpec, directory: Path, *, complete: bool) -> bool:
        """At start, for a live move this server was the source of when it stopped, the target not having
        confirmed: the instance runs here again from what its session left in `directory` (True), or it never
        paused (`complete` False and the tool that pauses it says so: it ran on; False)."""
        return False

    async def release_moved(self, spec: InstanceSpec) -> None:  # noqa: B027 - optional
        """At start, for a live move this server was the source of and that the target had confirmed: what the
        instance still runs here (a VM's paused QEMU) goes; it runs there."""

    async def restore_released(self, spec: InstanceSpec) -> bool:
        """At start, for an instance whose creation was interrupted: whether its live-moved copy had been
        released (it is the only copy then: keep it, running); otherwise it is removed as usual."""
        return False
