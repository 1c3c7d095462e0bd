"""The events of one running attempt, in order: its start, then its progress reports.

A handler may report thousands of times a second; at most ``max_rate`` reports per
second reach PostgreSQL and Redis, the latest one always does (on flush), and every
write goes through one lock so seqs are handed out in the order events are written.

The start (`running`) event is committed with the claim but written to Redis only
with the attempt's next event, or once the attempt has run for a moment: most tasks
are short, and they then cost one event write (a script call, a published message, a
WebSocket frame's wake-up) instead of two. A client sees both events, in order, at once.
Only a success is written together with it: after any other outcome another process
may write the task's next event (runner.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson

from services.worker.ratelimit import RateGate
from shared.events import EventSink
from shared.schemas import ProgressEvent

log = logging.getLogger(__name__)

Write = Callable[[float, str | None], Awaitable[ProgressEvent | None]]


class Events(Protocol):
    async def emit(self, events: Sequence[ProgressEvent]) -> object: ...


class StartEvent:
    """Holds an attempt's start event (and the earlier ones it backfills) until the
    first :meth:`emit`, which writes them ahead of its own events."""

    def __init__(
        self, sink: EventSink, event: ProgressEvent, backfill: Sequence[ProgressEvent]
    ) -> None:
        self._sink = sink
        self._held: tuple[list[ProgressEvent], Sequence[ProgressEvent]] | None = (
            [event],
            backfill,
        )
        # Two callers (the runner's timer, the reporter) must not both take the held
        # events, nor write theirs before the start event is in.
        self._lock = asyncio.Lock()

    async def emit(self, events: Sequence[ProgressEvent] = ()) -> None:
        async with self._lock:
            held, backfill = self._held or ([], ())
            self._held = None
            await self._sink.emit([*held, *events], backfill=backfill)


MAX_MESSAGE = 2000
MAX_DATA_BYTES = 64 * 1024


class ProgressReporter:
    def __init__(
        self,
        write: Write,
        events: Events,
        *,
        max_rate: float,
        name: str,
        on_fenced: Callable[[], None] = lambda: None,
    ) -> None:
        self._write = write
        self._events = events
        self._on_fenced = on_fenced
        self._gate = RateGate(max_rate)
        self._lock = asyncio.Lock()
        self._pending: tuple[float, str | None, Any] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._progress = 0.0
        self._name = name
        # Set once the attempt is no longer ours (cancelled, reaped): reports are dropped.
        self.fenced_out = False

    async def report(self, progress: float, message: str | None, data: Any) -> None:
        """Raises TypeError or ValueError to the handler for ``data`` that is not JSON or
        is too large: found here, not in a write held back for later, where it failed
        the attempt's outcome (and, in a shared event batch, other tasks' events)."""
        if data is not None:
            try:
                encoded = orjson.dumps(data)
            except TypeError as exc:
                raise TypeError(f"progress data is not JSON: {exc}") from None
            if len(encoded) > MAX_DATA_BYTES:
                raise ValueError(f"progress data is over {MAX_DATA_BYTES} bytes as JSON")
            data = orjson.loads(encoded)  # what will be sent, not a live object
        if self.fenced_out:
            return
        progress = min(1.0, max(self._progress, float(progress)))  # never decreasing
        self._progress = progress
        if message is not None:
            # PostgreSQL text holds neither NUL nor a lone surrogate.
            message = str(message)[:MAX_MESSAGE].replace("\x00", "")
            message = message.encode("utf-8", "replace").decode("utf-8")
        self._pending = (progress, message, data)
        if self._flusher is not None and not self._flusher.done():
            return  # the scheduled flush will send the latest
        if self._gate.wait(time.monotonic()) == 0.0:
            await self._send()
        else:
            self._flusher = asyncio.create_task(self._flush_later(), name=f"progress-{self._name}")

    async def close(self) -> None:
        """Deliver the last held-back report; called before the terminal state."""
        if self._flusher is not None:
            # Not cancelled: a write cut in half would leave a seq the stream lacks.
            # It waits one interval at most.
            await self._flusher
            self._flusher = None
        if self._pending is not None and not self.fenced_out:
            await self._send()

    async def abort(self) -> None:
        """End reporting: called when the run ends, after :meth:`close`, or instead of it
        when the run is cancelled (a stopping worker's drain gave up on it). Then the
        held-back report is dropped and the task that would write it is stopped and
        awaited here: nobody would await it later, and it would write once the worker
        had closed its pools. A write it has begun is cut, as the handler's own are: the
        drain must not wait for PostgreSQL, whose writes retry while it is away. Reports
        from then on (an abandoned handler's) are dropped."""
        self.fenced_out = True
        self._pending = None
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.wait({self._flusher})
            self._flusher = None

    async def _flush_later(self) -> None:
        # Until nothing is held back: a report made while this task was writing found it
        # running and left the sending to it (report()).
        while self._pending is not None and not self.fenced_out:
            await asyncio.sleep(self._gate.wait(time.monotonic()))
            try:
                await self._send()
            except Exception:  # a lost report must not cost the outcome
                log.warning("held-back progress report not written", exc_info=True)

    async def _send(self) -> None:
        async with self._lock:
            if self._pending is None:
                return
            progress, message, data = self._pending
            self._pending = None
            self._gate.sent(time.monotonic())
            event = await self._write(progress, message)
            if event is None:
                self.fenced_out = True
                self._on_fenced()
                return
            if data is not None:
                event = event.model_copy(update={"data": data})
            await self._events.emit([event])
