"""The event stream behind /1.0/events: operation, lifecycle and logging events, fanned out to listeners."""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass, field
from typing import Any


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


@dataclass(eq=False)
class Listener:
    types: frozenset[str]
    project: str | None
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(maxsize=1000))


class EventHub:
    def __init__(self) -> None:
        self._listeners: set[Listener] = set()

    def subscribe(self, types: frozenset[str], project: str | None) -> Listener:
        listener = Listener(types, project)
        self._listeners.add(listener)
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    def publish(self, kind: str, metadata: dict[str, Any], project: str = "default") -> None:
        event = {"type": kind, "timestamp": now_iso(), "metadata": metadata, "location": "none",
                 "project": project}
        for listener in list(self._listeners):
            if kind not in listener.types:
                continue
            if listener.project is not None and listener.project != project:
                continue
            if listener.queue.full():
                # A listener that stopped reading is dropped rather than allowed to hold memory.
                self._listeners.discard(listener)
                continue
            listener.queue.put_nowait(event)

    def lifecycle(self, action: str, source: str, project: str, context: dict[str, Any] | None = None) -> None:
        self.publish("lifecycle", {"action": action, "source": source, "context": context or {}}, project)
