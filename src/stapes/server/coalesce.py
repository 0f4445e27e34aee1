"""One run of an expensive query for many concurrent callers, never a stale answer.

A caller gets the result of a run that started after it asked; everyone who asks while that run waits to
start shares it. Two hundred clients listing instances at once cost a few `lxc-ls` runs, not two hundred,
and nobody sees a state older than their request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalesced(Generic[T]):
    def __init__(self, fetch: Callable[[], Awaitable[T]]) -> None:
        self._fetch = fetch
        self._lock = asyncio.Lock()
        self._batch: asyncio.Future[T] | None = None

    async def get(self) -> T:
        if self._batch is not None:  # a run is waiting to start after the one in flight: join it
            return await asyncio.shield(self._batch)
        batch: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._batch = batch
        try:
            async with self._lock:  # the run in flight started before we asked: wait for it to end
                self._batch = None  # from here on, newcomers form the next batch
                result = await self._fetch()
        except BaseException as err:
            if self._batch is batch:
                self._batch = None
            if isinstance(err, asyncio.CancelledError):
                batch.cancel()
            else:
                batch.set_exception(err)
                batch.exception()  # retrieved here: followers re-raise it, none may be left to
            raise
        batch.set_result(result)
        return result
