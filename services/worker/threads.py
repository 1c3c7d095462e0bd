"""Plain ``def`` handlers: the worker's pool of threads they run in, and each run's way
back to the event loop (progress reports) and from it (the stop, as ``ctx.cancelled``).

A thread cannot be interrupted. So the coroutine that runs a handler in one never ends
before the thread does: cancelled, it sets ``ctx.cancelled`` and keeps waiting. To the
runner it is then a handler that ignores its cancellation, and what holds for those
holds here (abandoned past ``LONGHAUL_CANCEL_GRACE_S``, its attempt held until it ended:
its next attempt never runs beside it). ``asyncio.to_thread`` would end at once on a
cancel while its thread ran on."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import Gauge

from services.worker.sdk import CancelSignal, PermanentError, Progress, where

WAITING_FOR_THREAD = Gauge(
    "longhaul_worker_waiting_for_thread",
    "Def handlers waiting for a free thread of the pool, their timeout running: there is"
    " a thread per run slot, so only threads held by abandoned handlers make one wait",
)


class HandlerThreads:
    """The worker's own pool, one thread for each run slot: asyncio's default pool is
    small and shared with the loop's own blocking calls (name lookups). Threads start
    as they are first needed."""

    def __init__(self, size: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="longhaul-handler")

    def attempt(self, report: Progress) -> ThreadRun:
        """A run of one ``def`` handler, reporting through ``report`` (on the loop)."""
        return ThreadRun(self._pool, report)

    def shutdown(self) -> None:
        """Called once the drain ended: no run is left to start one. Not waited for: a
        thread still running is an abandoned handler's, which the worker's exit ends."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class ThreadRun:
    def __init__(self, pool: ThreadPoolExecutor, report: Progress) -> None:
        self._pool = pool
        self._report = report
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self.cancelled = CancelSignal(self._stop)
        # The thread's reports in flight (cut by the stop), and their tasks on the loop
        # (awaited before the run ends).
        self._lock = threading.Lock()
        self._waiting: set[concurrent.futures.Future[None]] = set()
        self._reports: set[asyncio.Task[Any]] = set()

    async def __call__(self, fn: Callable[[Any, Any], Any], ctx: Any, args: Any) -> Any:
        """Run ``fn(ctx, args)`` in a pool thread (in this task's context: its logs
        carry the task id) and return or raise what it did. Ends only once the thread
        ended; see the module's docstring."""
        # Counted from here until its thread starts it (_call) or it is cancelled before
        # that: a queued future does one or the other, never both.
        WAITING_FOR_THREAD.inc()
        try:
            work = self._pool.submit(contextvars.copy_context().run, _call, fn, ctx, args)
        except BaseException:
            WAITING_FOR_THREAD.dec()
            raise
        work.add_done_callback(_never_started)
        ended = asyncio.wrap_future(work)
        told = False
        while not ended.done():
            try:
                await asyncio.wait({ended})
            except asyncio.CancelledError:
                if work.done():
                    # It ended before the stop came and never saw it: as for an async
                    # handler already done, the stop does not reach it (its end stands,
                    # a stop's or a deadline's: see the runner's _ended_unstopped).
                    _uncancel()
                    continue
                told = True
                self._told()
                if work.cancel():  # still waiting for a thread: nothing runs on
                    raise
        if self._reports:  # ones the stop cut, still unwinding
            await asyncio.wait(set(self._reports))
        if told and ended.exception() is None:
            # It stopped as asked: ended as an async handler that let its
            # CancelledError through. What it raised instead is kept (and logged if
            # it was abandoned).
            raise asyncio.CancelledError
        return ended.result()

    def report_progress(self, progress: float, message: str | None, data: Any) -> None:
        """``ctx.report_progress`` of the handler's thread: hands the report to the loop
        and waits for it, so its errors are raised here and reports stay in order. Once
        the attempt is told to stop, reports are dropped, the one waited for included."""
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # waiting here would block the loop that must take the report
            raise RuntimeError(
                "SyncTaskContext.report_progress is for the handler's own thread; an"
                " async def handler takes a TaskContext"
            )
        if self._stop.is_set():
            return  # the stop decided the attempt's outcome: nothing left to report
        future = asyncio.run_coroutine_threadsafe(
            self._reporting(progress, message, data), self._loop
        )
        with self._lock:
            self._waiting.add(future)
        if self._stop.is_set():
            future.cancel()  # the stop came as it was sent, and may have missed it
        try:
            future.result()
        except concurrent.futures.CancelledError:
            pass  # cut short by the stop; ctx.cancelled tells the handler
        finally:
            with self._lock:
                self._waiting.discard(future)

    async def _reporting(self, progress: float, message: str | None, data: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._reports.add(task)
        try:
            await self._report(progress, message, data)
        finally:
            self._reports.discard(task)

    def _told(self) -> None:
        """Tell the thread to stop, and cut the report it waits for: an async handler's
        cancellation cuts its report too (a write retried while PostgreSQL is away
        would keep the thread from seeing the stop)."""
        self._stop.set()
        with self._lock:
            waiting = list(self._waiting)
        for future in waiting:
            future.cancel()


def _call(fn: Callable[[Any, Any], Any], ctx: Any, args: Any) -> Any:
    WAITING_FOR_THREAD.dec()
    result = fn(ctx, args)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited, on purpose: no warning
        raise PermanentError(
            f"{where(fn)} returned {type(result).__name__}: a plain def runs in a thread,"
            " and what it returns is not awaited; declare it async def",
            type="invalid_result",
        )
    return result


def _never_started(work: concurrent.futures.Future[Any]) -> None:
    if work.cancelled():
        WAITING_FOR_THREAD.dec()


def _uncancel() -> None:
    task = asyncio.current_task()
    assert task is not None
    while task.uncancel():
        pass
