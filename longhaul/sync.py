"""``SyncClient``: the Python client for synchronous code (Django or Flask views,
scripts). It runs the one async ``Client`` in an event loop of its own, on a daemon
thread, so both send the same requests, retry alike and raise the same errors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Coroutine, Generator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar
from uuid import UUID

from longhaul.client import Client, RetryPolicy
from shared.schemas import ProgressEvent, Schedule, Task, TaskState

T = TypeVar("T")


class _Closed(RuntimeError):
    """The SyncClient was closed before or during the call."""


class SyncClient:
    """``Client`` for synchronous code: the same methods with the same arguments,
    results, errors and retries; each call blocks its thread until done. One per
    process, shared by its threads: their calls run side by side in one event loop,
    on one connection pool.

    The loop's thread starts at first use, so a client made at import time, before a
    server forks its workers, serves each of them; it stops at ``close()`` or at exit.
    Not for a thread running an event loop: await a ``Client`` there."""

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        gateway_url: str | None = None,
        retry: RetryPolicy | None = None,
        timeout_s: float = 30.0,
        stream_read_timeout_s: float = 60.0,
    ) -> None:
        self._client = Client(
            api_url,
            api_key,
            gateway_url=gateway_url,
            retry=retry,
            timeout_s=timeout_s,
            stream_read_timeout_s=stream_read_timeout_s,
        )
        # Guards starting and closing, and orders every call's scheduling before the
        # stop that close() schedules: none is left in a loop that no longer runs.
        self._lock = threading.Lock()
        self._closed = False
        # Set at first use: the loop, the process it runs in, what stops it (once:
        # called by close(), at the client's collection or at exit).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0
        self._stop: weakref.finalize[..., SyncClient] | None = None

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """End the calls in flight (they raise ``RuntimeError``; an iterator being read
        just ends), close the connections and stop the loop's thread. Idempotent. Unlike
        the calls, allowed in an event loop's thread (an ASGI app's shutdown, say): it
        is brief."""
        with self._lock:
            self._closed = True
        if self._stop is not None:
            self._stop()

    # ------------------------------------------------------------ tasks

    def submit(
        self,
        type: str,
        args: Mapping[str, Any] | None = None,
        *,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        delay_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """See ``Client.submit``."""
        return self._call(
            self._client.submit(
                type,
                args,
                priority=priority,
                max_attempts=max_attempts,
                timeout_s=timeout_s,
                delay_s=delay_s,
                idempotency_key=idempotency_key,
            )
        )

    def submit_batch(
        self, tasks: Sequence[Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> list[Task]:
        """See ``Client.submit_batch``."""
        return self._call(self._client.submit_batch(tasks, idempotency_key=idempotency_key))

    def get(self, task_id: UUID | str) -> Task:
        return self._call(self._client.get(task_id))

    def tasks(
        self,
        *,
        state: TaskState | str | None = None,
        type: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        page: int = 50,
    ) -> Generator[Task, None, None]:
        """See ``Client.tasks``: a page is read when the one before is used up."""
        return self._iterate(
            self._client.tasks(
                state=state,
                type=type,
                created_after=created_after,
                created_before=created_before,
                page=page,
            )
        )

    def cancel(self, task_id: UUID | str) -> Task:
        """See ``Client.cancel``."""
        return self._call(self._client.cancel(task_id))

    def retry(self, task_id: UUID | str) -> Task:
        """See ``Client.retry``."""
        return self._call(self._client.retry(task_id))

    # ------------------------------------------------------------ schedules

    def create_schedule(
        self,
        name: str,
        cron: str,
        type: str,
        args: Mapping[str, Any] | None = None,
        *,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        enabled: bool = True,
    ) -> Schedule:
        """See ``Client.create_schedule``."""
        return self._call(
            self._client.create_schedule(
                name,
                cron,
                type,
                args,
                priority=priority,
                max_attempts=max_attempts,
                timeout_s=timeout_s,
                enabled=enabled,
            )
        )

    def schedules(self, *, page: int = 50) -> Generator[Schedule, None, None]:
        """See ``Client.schedules``: a page is read when the one before is used up."""
        return self._iterate(self._client.schedules(page=page))

    def get_schedule(self, schedule_id: UUID | str) -> Schedule:
        """See ``Client.get_schedule``."""
        return self._call(self._client.get_schedule(schedule_id))

    def update_schedule(
        self,
        schedule_id: UUID | str,
        *,
        enabled: bool | None = None,
        cron: str | None = None,
        args: Mapping[str, Any] | None = None,
    ) -> Schedule:
        """See ``Client.update_schedule``."""
        return self._call(
            self._client.update_schedule(schedule_id, enabled=enabled, cron=cron, args=args)
        )

    def delete_schedule(self, schedule_id: UUID | str) -> None:
        """See ``Client.delete_schedule``."""
        self._call(self._client.delete_schedule(schedule_id))

    # ------------------------------------------------------------ progress

    def events(
        self, task_id: UUID | str, after_seq: int = 0
    ) -> Generator[ProgressEvent, None, None]:
        """See ``Client.events``. Left early, ``close()`` it (or leave a
        ``contextlib.closing`` block) to end its stream now, not when collected."""
        return self._iterate(self._client.events(task_id, after_seq))

    def wait(self, task_id: UUID | str, timeout_s: float | None = None) -> Task:
        """See ``Client.wait``. Its ``TimeoutError`` ends the stream it was reading."""
        return self._call(self._client.wait(task_id, timeout_s))

    # ------------------------------------------------------------ the bridge

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """What ``coro`` returns or raises, run in the loop while this thread waits."""
        future = self._submit(coro)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise _Closed("the SyncClient was closed during the call") from None
        finally:
            # The caller gave up (a KeyboardInterrupt, a time limit's exception): the
            # loop drops the call too, rather than go on for no one. Once done, a no-op.
            future.cancel()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        try:
            _refuse_in_loop()
            with self._lock:
                return asyncio.run_coroutine_threadsafe(coro, self._running_loop())
        except BaseException:
            coro.close()  # it will never run: no "never awaited" warning
            raise

    def _iterate(self, items: AsyncGenerator[T, None]) -> Generator[T, None, None]:
        """``items`` as a plain iterator; a misuse is raised now, not at the first read."""
        _refuse_in_loop()
        with self._lock:
            self._running_loop()
        return self._read(items)

    def _read(self, items: AsyncGenerator[T, None]) -> Generator[T, None, None]:
        while True:
            try:
                item = self._call(items.__anext__())
            except (StopAsyncIteration, _Closed):
                return  # the end, or close() ended it
            try:
                yield item
            except GeneratorExit:
                # Left at an item: its stream is released now. Closed: close() did it.
                with contextlib.suppress(_Closed):
                    self._call(items.aclose())
                raise

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop, started at first use. Called holding the lock."""
        if self._closed or (self._stop is not None and not self._stop.alive):
            raise _Closed("the SyncClient is closed")
        if self._loop is None:
            loop, stop = asyncio.new_event_loop(), asyncio.Event()
            thread = threading.Thread(
                target=_serve, args=(loop, self._client, stop), name="longhaul-client"
            )
            # A daemon: an application that exits without close() is not held up by
            # it; the finalizer below, run at exit too, stops it in order.
            thread.daemon = True
            thread.start()
            self._loop, self._pid = loop, os.getpid()
            self._stop = weakref.finalize(self, _stop, self._lock, loop, stop, thread, self._pid)
        elif self._pid != os.getpid():
            # The loop's thread was not forked with the process: calls would hang.
            raise RuntimeError(
                "this SyncClient was first used before the fork: make one in each process"
            )
        return self._loop


def _refuse_in_loop() -> None:
    """A call blocks its thread: in an event loop's thread it would stall that loop, or
    deadlock in the SyncClient's own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        "SyncClient was called in a thread running an event loop, which it would block: "
        "await a longhaul.Client there"
    )


def _serve(loop: asyncio.AbstractEventLoop, client: Client, stop: asyncio.Event) -> None:
    """The loop's thread."""
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        runner.run(_until_stopped(client, stop))


async def _until_stopped(client: Client, stop: asyncio.Event) -> None:
    """Calls run beside this until ``stop``. Then those still running end (their
    callers see the close), streams left at an event are closed, and only then the
    connections they use."""
    await stop.wait()
    calls = asyncio.all_tasks() - {asyncio.current_task()}
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()
    await client.aclose()


def _stop(
    lock: threading.Lock,
    loop: asyncio.AbstractEventLoop,
    stop: asyncio.Event,
    thread: threading.Thread,
    pid: int,
) -> None:
    """Stop the loop's thread and wait for it (unless on it)."""
    if os.getpid() != pid:
        return  # a forked child's copy: the loop is the parent's
    with lock:  # after the calls scheduled so far; those to come are refused
        loop.call_soon_threadsafe(stop.set)
    if threading.current_thread() is not thread:
        thread.join()
