"""What an instance driver must offer, and what it declares it can do."""

from __future__ import annotations

import asyncio
import re
import socket
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stapes.api.status import StatusCode
from stapes.server.idmap import IdRange


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


class InstanceDriver(ABC):
    """Lifecycle, and live migration as a fixed set of hooks on both sides (as Ganeti's hypervisors have
    them): the source says whether an instance can move live and checkpoints it; the target says whether it
    can accept it and restores it; each side then finalizes with the outcome, and rollback is part of it. The
    migration service calls these hooks only, whatever the instance type."""

    instance_type: ClassVar[str]
    # Whether the instance runs in a user namespace mapped into root's subordinate ids (unprivileged
    # containers); a VM is isolated by the hypervisor instead and has no id map.
    id_mapped: ClassVar[bool] = False
    # Files a checkpoint writes front to back and never rewrites (the memory pages): a live move may send them
    # while the checkpoint still writes them, so the transfer overlaps the dump. None: the state goes after it.
    growing_state_files: ClassVar[GrowingFiles | None] = None
    # The files a received checkpoint may hold (its own names): None, and a live move's state is not accepted.
    state_files: ClassVar[StateFiles | None] = None

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

    # Live migration. The defaults refuse: a driver that can move instances live overrides them all.
    async def live_refusal(self, spec: InstanceSpec) -> str | None:
        """Source: None when this running instance can be checkpointed here; otherwise why not, and what to do."""
        return f"{self.instance_type}s cannot move live with this server: move with --stateless"

    async def accept_refusal(self, spec: InstanceSpec) -> str | None:
        """Target: None when an instance checkpointed elsewhere can be restored here; otherwise why not."""
        return f"{self.instance_type}s cannot move live to this server: move with --stateless"

    def state_size_limit(self, spec: InstanceSpec) -> int:
        """Target: the most bytes one checkpoint (or one pre-copy round) of this instance may hold, files and
        memory pages together; a source sending more is refused while it sends (the disk never fills)."""
        raise NotImplementedError

    async def check_state(self, spec: InstanceSpec, state: Path) -> None:
        """Target, before `restore`: the received checkpoint (`state`/final, and its pre-copy rounds
        `state`/predump-<n>) names nothing outside the instance's own root and devices; raises BadRequest
        saying what was refused otherwise."""
        raise NotImplementedError

    def precopy_refusal(self) -> str | None:
        """None when memory can be copied in rounds while the instance runs (pre-copy); otherwise why not."""
        return "this driver copies no memory in rounds"

    async def predump(self, spec: InstanceSpec, state: Path, parent: Path | None) -> MemoryRound:
        """Source: one pre-copy round into the empty directory `state`, only what changed since `parent`'s
        round; the instance keeps running."""
        raise NotImplementedError

    def lazy_refusal(self, spec: InstanceSpec) -> str | None:
        """None when the memory can follow the restore on demand (post-copy); otherwise why not."""
        return "this driver cannot send memory after the restore"

    async def checkpoint(self, spec: InstanceSpec, state: Path, parent: Path | None = None,
                         lazy_socket: socket.socket | None = None, serving: asyncio.Event | None = None) -> None:
        """Source: write the running state into the empty directory `state` (only what changed since the
        pre-copy round in `parent`); the instance stops with it (its files then hold still for the last sync).
        A failed checkpoint leaves it running. `lazy_socket`: everything but the memory, which is then served
        on that socket (one end of a socketpair: no listener anyone could reach) until the target has all of
        it; `serving` is set once the rest of the state is complete and the memory is being served; only then
        does this return."""
        raise NotImplementedError

    async def checkpoint_outcome(self, spec: InstanceSpec, state: Path) -> bool:
        """At start, for a checkpoint this server began before it stopped: waits (bounded) until the tool that
        writes it (which outlives the server) has ended, then says whether it completed (the instance then
        lives only in `state`: restore it) or not (it ran on, or never stopped)."""
        return False

    async def finalize_source(self, spec: InstanceSpec, state: Path, *, resume: bool) -> None:
        """Source, at the end. `resume`: the instance runs here again from `state`, as it was (a failed move,
        or a copy); otherwise it moved, and what it left here is cleaned up."""
        raise NotImplementedError

    async def restore(self, spec: InstanceSpec, state: Path, lazy_socket: socket.socket | None = None) -> None:
        """Target: run the defined instance from the state the source checkpointed. `lazy_socket`: its memory
        comes, on demand, from the source's page server at the far end of this socket (one end of a socketpair
        the migration carries to the source)."""
        raise NotImplementedError

    async def hold_restore(self, spec: InstanceSpec) -> None:
        """Target, before `restore`: the restored instance must not run until `release_restore` (the source
        has not given its own copy up yet). Recorded on disk, so that a restart of this server tells a held
        copy (removed) from a released one (kept)."""
        raise NotImplementedError

    async def release_restore(self, spec: InstanceSpec) -> None:
        """Target: the source gave its copy up: record that, then let the restored instance run."""
        raise NotImplementedError

    async def restore_released(self, spec: InstanceSpec) -> bool:
        """At start, for an instance whose creation was interrupted: whether its restored copy had been
        released (it is the only copy then: keep it, running); otherwise it is removed as usual."""
        return False

    async def abort_checkpoint(self, spec: InstanceSpec) -> None:
        """Source: stop a lazy checkpoint whose target never took the memory; the instance runs on here."""
        raise NotImplementedError

    async def memory_arrived(self, spec: InstanceSpec) -> None:
        """Target, after a lazy restore: returns once all the memory is here."""
        raise NotImplementedError

    async def finalize_target(self, spec: InstanceSpec, *, success: bool) -> None:
        """Target, at the end: on failure nothing of the restored instance may keep running."""
        raise NotImplementedError
