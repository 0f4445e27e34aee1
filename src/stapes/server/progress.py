"""Transfer progress: bytes, rate, percent and ETA, published into the operation's metadata."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

PUBLISH_INTERVAL = 0.5


def figures(done: int, total: int, elapsed: float, *, complete: bool = False) -> dict[str, Any]:
    """Pure: what the progress line shows. `complete`: the data is all in place, whatever crossed the wire
    (rsync sends only differences, so the bytes moved may stay far below the total): 100 %, nothing left."""
    rate = int(done / elapsed) if elapsed > 0 else 0
    result: dict[str, Any] = {"bytes": done, "rate": rate}
    if total > 0:
        result["total"] = total
        result["percent"] = 100 if complete else min(99, int(done * 100 / total))
        result["eta"] = 0 if complete else (int(max(total - done, 0) / rate) if rate > 0 else None)
    return result


def human(figures_: dict[str, Any]) -> str:
    """Incus's fs_progress style: '12.50MiB (45.00MiB/s)', with percent and ETA when known."""
    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if n < 1024 or unit == "TiB":
                return f"{n:.2f}{unit}"
            n /= 1024
        return ""

    text = f"{size(figures_['bytes'])} ({size(figures_['rate'])}/s)"
    if "percent" in figures_:
        text = f"{figures_['percent']}% {text}"
        if figures_.get("eta"):
            text += f" ETA {figures_['eta']}s"
    return text


class Progress:
    def __init__(self, stage: str, total: int, publish: Callable[[dict[str, Any]], None]) -> None:
        self.stage = stage
        self.total = total
        self.done = 0
        self._publish = publish
        self._start = time.monotonic()
        self._last = self._start  # the first figures after half a second, not from the first few bytes

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last >= PUBLISH_INTERVAL:
            self._last = now
            self.publish()

    def publish(self, *, complete: bool = False) -> None:
        current = figures(self.done, self.total, time.monotonic() - self._start, complete=complete)
        self._publish({"stage": self.stage, **current, "text": human(current)})

    def finish(self) -> None:
        """The transfer succeeded: the last figures say 100 %."""
        self.publish(complete=True)
