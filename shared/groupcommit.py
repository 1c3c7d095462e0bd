"""Group commit: the items of concurrent callers written together, in one round trip.

While one batch is being written, the next one gathers; a caller waits for the batch
that holds its item and gets its own result (or the batch's exception). Under light
load a batch is one item and costs nothing extra; under load the round trips (and, for
PostgreSQL, the commits) per item fall with the number of callers.

The writer is one task at a time, started by the first waiting item: nothing runs
while nothing is waiting. ``linger_s`` makes it wait that long before each write, for
more items to join, or until ``enough`` are waiting: for writes nobody waits on (acks),
fewer round trips at moderate load are worth a few milliseconds. Two options keep one
caller's trouble its own:

* ``key``: items with the same key never share a batch; a later one waits for the next
  batch and so sees the earlier one's effect (a duplicate delivery of a task);
* ``alone_on``: when a batch fails with an error this accepts (one bad row, a deadlock),
  its items are written again one by one, and only the failing item's caller gets it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from shared.futures import mark_retrieved

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        name: str,
        max_batch: int = 500,
        key: Callable[[T], Hashable] | None = None,
        alone_on: Callable[[Exception], bool] | None = None,
        linger_s: float = 0.0,
        enough: int | None = None,
    ) -> None:
        """``write`` takes a batch and returns one result per item, in order."""
        self._write = write
        self._name = name
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._enough = min(enough or max_batch, max_batch)
        # Set while the writer lingers: resolved early once ``enough`` items wait.
        self._gathering: asyncio.Future[None] | None = None
        self._key = key
        self._alone_on = alone_on
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        # A caller cancelled meanwhile cancels only its own future, which the writer
        # skips: its item is still written with the batch of others.
        return await self._enqueue(item)

    def add(self, items: Sequence[T]) -> None:
        """Queue items nobody waits for; their outcome is dropped (``write`` reports its
        own failures). ``aclose`` still waits for them."""
        for item in items:
            self._enqueue(item)

    def _enqueue(self, item: T) -> asyncio.Future[R]:
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # Marks the outcome as seen even when nobody awaits it (any more).
        done.add_done_callback(mark_retrieved)
        self._waiting.append((item, done))
        gathering = self._gathering
        if gathering is not None and len(self._waiting) >= self._enough and not gathering.done():
            gathering.set_result(None)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name=self._name)
        return done

    async def aclose(self) -> None:
        """Wait for what is being written (shutdown). Shielded: awaiting a task directly
        would hand a cancellation of this caller on to the writer, and the items of
        other callers would go unwritten."""
        if self._writer is not None:
            await asyncio.shield(self._writer)

    async def _write_all(self) -> None:
        try:
            while self._waiting:
                if self._linger_s and len(self._waiting) < self._enough:
                    await self._linger()
                await self._write_batch(self._take())
        except BaseException:
            # The writer itself was cancelled (the loop is stopping): nothing will write
            # what still waits, so its callers must not wait for it either.
            waiting, self._waiting = self._waiting, []
            for _, f in waiting:
                f.cancel()
            raise

    async def _write_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._outcomes([item for item, _ in batch])
        except BaseException as exc:
            for _, f in batch:
                if f.done():
                    continue
                if isinstance(exc, Exception):
                    f.set_exception(exc)  # every caller of the batch gets it
                else:
                    f.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (_, f), outcome in zip(batch, outcomes, strict=True):
            if f.done():
                continue
            if isinstance(outcome, _Failed):
                f.set_exception(outcome.error)
            else:
                f.set_result(outcome)

    async def _linger(self) -> None:
        loop = asyncio.get_running_loop()
        self._gathering = gathering = loop.create_future()
        timer = loop.call_later(self._linger_s, _resolve, gathering)
        try:
            await gathering
        finally:
            timer.cancel()
            self._gathering = None

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        """The next batch, in arrival order; what is left (over the size, or a key
        already in the batch) waits for the next one, in order."""
        batch: list[tuple[T, asyncio.Future[R]]] = []
        later: list[tuple[T, asyncio.Future[R]]] = []
        keys: set[Hashable] = set()
        for entry in self._waiting:
            key = None if self._key is None else self._key(entry[0])
            if len(batch) >= self._max_batch or (key is not None and key in keys):
                later.append(entry)
                continue
            keys.add(key)
            batch.append(entry)
        self._waiting = later
        return batch

    async def _outcomes(self, items: list[T]) -> list[R | _Failed]:
        try:
            return list(await self._checked(items))
        except Exception as exc:
            if len(items) == 1 or self._alone_on is None or not self._alone_on(exc):
                raise
        return [await self._alone(item) for item in items]

    async def _alone(self, item: T) -> R | _Failed:
        try:
            return (await self._checked([item]))[0]
        except Exception as exc:  # noqa: BLE001 - this item's caller gets it
            return _Failed(exc)

    async def _checked(self, items: list[T]) -> Sequence[R]:
        results = await self._write(items)
        if len(results) != len(items):
            raise RuntimeError(f"{self._name}: {len(results)} results for {len(items)}")
        return results


class _Failed:
    """One item's failure in a batch whose other items were written."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
