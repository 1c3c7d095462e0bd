"""One call per key at a time: callers that come while it runs share its outcome.

For reads behind a short cache: when an entry expires, every request in flight misses
it at the same moment, and without this each one would make the same read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self, name: str) -> None:
        self._name = name
        self._running: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        """``call()``'s result, or that of the call for ``key`` already running."""
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(_awaited(call), name=self._name)
            self._running[key] = task
            task.add_done_callback(lambda done: self._done(key, done))
        # Shielded: one caller that goes away must not cancel the others' call.
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        """Cancel the calls still running, and wait for them (a process's stop)."""
        running = list(self._running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # seen, even when every caller that waited went away


async def _awaited(call: Callable[[], Awaitable[V]]) -> V:
    return await call()
