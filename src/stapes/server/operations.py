"""Operation registry: background work with a status, metadata, progress, cancellation and websockets.

An operation wraps one coroutine. Websocket operations hand out one secret per channel; a client opens
`/1.0/operations/<id>/websocket?secret=...` once per secret and the coroutine receives the socket through
`await op.channel(name)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from stapes.api.errors import BadRequest, Forbidden, NotFound, StapesError
from stapes.api.redact import redact
from stapes.api.status import StatusCode
from stapes.server.events import EventHub, now_iso

log = logging.getLogger(__name__)

Runner = Callable[["Operation"], Awaitable[dict[str, Any] | None]]
FINISHED_RETENTION = 300.0


class Operation:
    def __init__(
        self, registry: OperationRegistry, *, op_class: str, description: str, project: str,
        resources: dict[str, list[str]] | None = None, channels: tuple[str, ...] = (), may_cancel: bool = True,
    ) -> None:
        self.registry = registry
        self.id = str(uuid.uuid4())
        self.op_class = op_class
        self.description = description
        self.project = project
        self.resources = resources or {}
        self.may_cancel = may_cancel
        self.status = StatusCode.PENDING
        self.metadata: dict[str, Any] = {}
        self.err = ""
        self.created_at = now_iso()
        self.updated_at = self.created_at
        self.finished_at = 0.0
        self.secrets = {name: secrets.token_hex(32) for name in channels}
        self._sockets: dict[str, asyncio.Future[web.WebSocketResponse]] = {}
        self._claimed: set[str] = set()
        self._released: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()
        self.on_cancel: Callable[[], Awaitable[None]] | None = None
        self._when_settled: list[Callable[[], None]] = []

    @property
    def url(self) -> str:
        return f"/1.0/operations/{self.id}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "class": self.op_class, "description": self.description,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "status": self.status.label, "status_code": int(self.status), "resources": self.resources,
            "metadata": self.metadata, "may_cancel": self.may_cancel and not self.status.is_final,
            "err": self.err, "location": "none",
        }

    def update_metadata(self, **values: Any) -> None:
        self.metadata.update(values)
        self._touch()

    def _touch(self) -> None:
        self.updated_at = now_iso()
        self.registry.events.publish("operation", self.to_json(), self.project)

    def when_settled(self, callback: Callable[[], None]) -> None:
        self._when_settled.append(callback)

    def settle(self) -> None:
        """The outcome is decided and only cleanup remains (closing a peer's sockets, which a peer that never
        answers a close frame can stretch): what waited for the outcome, such as an instance's claim, ends now,
        so a client acting on the peer's success (deleting the moved source) is not refused meanwhile."""
        callbacks, self._when_settled = self._when_settled, []
        for callback in callbacks:
            callback()

    def start(self, runner: Runner) -> None:
        self.status = StatusCode.RUNNING
        self._task = asyncio.create_task(self._run(runner), name=f"operation {self.id}")
        self._touch()

    async def _run(self, runner: Runner) -> None:
        try:
            result = await runner(self)
            if result:
                self.metadata.update(result)
            self.status = StatusCode.SUCCESS
        except asyncio.CancelledError:
            self.status = StatusCode.CANCELLED
            self.err = self.err or "The operation was cancelled"
            log.warning("operation %s (%s, %s) cancelled", self.id, self.description, self._subject())
        except StapesError as err:
            self.status = StatusCode.FAILURE
            self.err = redact(err.message)  # it travels to clients, peers and logs: never a secret in it
            log.warning("operation %s (%s, %s) failed: %s", self.id, self.description, self._subject(), err.message)
        except Exception as err:  # an operation must always end with a status, never vanish
            log.exception("operation %s (%s) failed", self.id, self.description)
            self.status = StatusCode.FAILURE
            self.err = redact(f"Internal error: {err or type(err).__name__}")
        finally:
            self.settle()
            for fut in self._sockets.values():
                if not fut.done():
                    fut.cancel()
            for event in self._released.values():
                event.set()
            self.finished_at = time.monotonic()
            self.done.set()
            self._touch()

    def _subject(self) -> str:
        return ", ".join(url for urls in self.resources.values() for url in urls) or "no resource"

    async def cancel(self) -> None:
        if self.status.is_final:
            raise BadRequest("The operation has already finished")
        if not self.may_cancel:
            raise BadRequest("This operation cannot be cancelled")
        self.status = StatusCode.CANCELLING
        self._touch()
        if self.on_cancel is not None:
            await self.on_cancel()
        if self._task is not None:
            self._task.cancel()
        elif not self.done.is_set():
            self.status = StatusCode.CANCELLED
            self.err = "The operation was cancelled"
            self.finished_at = time.monotonic()
            self.done.set()
            self._touch()

    def finish_without_task(self, status: StatusCode, err: str = "") -> None:
        """For operations that are placeholders (trust tokens): they end when something else happens."""
        self.status = status
        self.err = err
        self.finished_at = time.monotonic()
        self.done.set()
        self._touch()

    # websockets
    def _socket_future(self, name: str) -> asyncio.Future[web.WebSocketResponse]:
        if name not in self._sockets:
            self._sockets[name] = asyncio.get_running_loop().create_future()
            self._released[name] = asyncio.Event()
        return self._sockets[name]

    def claim_channel(self, secret: str) -> str:
        """The channel a secret opens, claimed at once (before the upgrade): a second connection with the
        same secret, or any connection to a finished operation, is refused."""
        for name, expected in self.secrets.items():
            if secrets.compare_digest(expected, secret):
                if self.status.is_final:
                    raise Forbidden("The operation has finished: its websockets cannot be opened any more")
                if name in self._claimed:
                    raise Forbidden(f"The secret for websocket {name!r} was already used")
                self._claimed.add(name)
                return name
        raise Forbidden("Invalid websocket secret")

    def unclaim_channel(self, name: str) -> None:
        """The upgrade itself failed: the secret may be tried again."""
        self._claimed.discard(name)

    async def attach(self, name: str, ws: web.WebSocketResponse) -> None:
        """Called by the websocket handler; returns when the operation is done with the socket."""
        fut = self._socket_future(name)
        if fut.done():
            raise Forbidden(f"The secret for websocket {name!r} was already used")
        fut.set_result(ws)
        await self._released[name].wait()

    async def channel(self, name: str, timeout: float | None = None) -> web.WebSocketResponse:
        return await asyncio.wait_for(asyncio.shield(self._socket_future(name)), timeout)

    def channel_attached(self, name: str) -> bool:
        fut = self._sockets.get(name)
        return fut is not None and fut.done() and not fut.cancelled()

    def release(self, name: str) -> None:
        self._socket_future(name)
        self._released[name].set()


class OperationRegistry:
    def __init__(self, events: EventHub) -> None:
        self.events = events
        self._ops: dict[str, Operation] = {}

    def create(self, **kwargs: Any) -> Operation:
        self._expire()
        op = Operation(self, **kwargs)
        self._ops[op.id] = op
        return op

    def get(self, op_id: str) -> Operation:
        op = self._ops.get(op_id)
        if op is None:
            raise NotFound(f"Operation {op_id!r} not found (finished operations are kept for five minutes)")
        return op

    def list(self, project: str | None = None) -> list[Operation]:
        self._expire()
        return [op for op in self._ops.values() if project is None or op.project == project]

    def _expire(self) -> None:
        cutoff = time.monotonic() - FINISHED_RETENTION
        for op_id in [i for i, op in self._ops.items() if op.done.is_set() and op.finished_at < cutoff]:
            del self._ops[op_id]

    async def shutdown(self) -> None:
        for op in list(self._ops.values()):
            if op._task is not None and not op._task.done():
                op._task.cancel()
                with contextlib.suppress(BaseException):
                    await op._task
