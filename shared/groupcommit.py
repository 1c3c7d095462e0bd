"""Group commit: the items of concurrent callers written together, in one round trip.

While one batch is being written, the next one gathers; a caller waits for the batch
that holds its item and gets its own result (or the batch's exception). Under light
load a batch is one item and costs nothing extra; under load the round trips (and, for
PostgreSQL, the commits) per item fall with the number of callers.

The writer is one task at a time, started by the first waiting item: nothing runs
while nothing is waiting. A writer that falls back to item by item reports an item's
own failure as ``Failed``: only that caller gets the exception."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Failed:
    """One item's failure in a batch whose other items were written."""

    error: Exception


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[R | Failed]]],
        *,
        name: str,
        max_batch: int = 500,
    ) -> None:
        """``write`` takes a batch and returns one result per item, in order."""
        self._write = write
        self._name = name
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # Marks the outcome as seen even when the caller was cancelled meanwhile.
        done.add_done_callback(_seen)
        self._waiting.append((item, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name=self._name)
        # Shielded: a caller cancelled meanwhile must not cancel the batch of others.
        return await asyncio.shield(done)

    async def aclose(self) -> None:
        """Wait for what is being written (shutdown)."""
        if self._writer is not None:
            await self._writer

    async def _write_all(self) -> None:
        while self._waiting:
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            futures = [f for _, f in batch]
            try:
                results = list(await self._write([item for item, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"{self._name}: {len(results)} results for {len(batch)}")
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
                for f in futures:
                    if not f.done():
                        f.set_exception(exc)
                continue
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            for f, result in zip(futures, results, strict=True):
                if f.done():
                    continue
                if isinstance(result, Failed):
                    f.set_exception(result.error)
                else:
                    f.set_result(result)


def _seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
