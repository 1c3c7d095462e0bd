"""One client connection: its queue, its subscriptions and their catch-up.

Everything that reaches the client goes through one worker task in queue order (client
commands, live events, resyncs, rechecks), so per task the frames leave in seq order
and the cursor needs no lock. The hub only ``offer``s: too many events waiting marks
the connection slow and it is closed, never waited for; so does a socket that takes
nothing for close_timeout_s while the worker waits for it. Client commands are bounded
apart (the reader waits for room), so a burst of subscribes is not mistaken for a
client that does not read.

No step of the worker sleeps: when the database is ahead of the stream (the writer
commits, then writes the event), the session sends what the stream holds and comes
back to the task after a grace period, while the rest of the connection moves on."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from services.ws_gateway import frames
from services.ws_gateway.catchup import (
    LiveCheck,
    Verdict,
    check_live,
    plan_catch_up,
    row_is_next_event,
)
from services.ws_gateway.hub import Resync
from services.ws_gateway.metrics import GatewayMetrics
from services.ws_gateway.registry import Refused, Registry
from services.ws_gateway.repository import TaskRepository
from services.ws_gateway.streams import StreamReader
from services.ws_gateway.writes import CoalescedWrites
from shared.db import ANY_PG_ERROR
from shared.schemas import ProgressEvent
from shared.taskrows import event_from_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recheck:
    """Back to a task whose stream lagged the database, after the grace period."""

    task_id: UUID
    last_seq: int  # what the database showed: nothing to do once the cursor is there


@dataclass(frozen=True)
class Behind:
    """From the sweep: tasks whose subscription here may lack events the database had
    a whole check ago, with those seqs. One item per connection and check, however
    many tasks it watches. A first look, as at a subscribe: the stream may hold what
    live delivery lost; else the grace, then the row."""

    seqs: tuple[tuple[UUID, int], ...]


Item = ProgressEvent | Resync | Recheck | Behind | frames.ClientOp

# Client commands read ahead of the worker: beyond this the reader waits (TCP pushes back).
_OPS_AHEAD = 64
# A client whose socket has this much we could not hand to the kernel is not reading
# (websockets' default write limit: send() waits above it).
_UNREAD_BYTES = 32 * 1024
# Events waiting through no fault of the client: this many times the queue size at most.
_OWN_BACKLOG_FACTOR = 16


class Tail(enum.Enum):
    """What to do when the database is ahead of the stream's last event."""

    WAIT = "wait"  # sleep the grace period, read again, then snapshot (one-shot callers)
    DEFER = "defer"  # send what the stream has; the caller comes back after the grace
    SNAPSHOT = "snapshot"  # waited enough: the row stands in for what is missing


@dataclass(frozen=True)
class CatchUp:
    events: list[ProgressEvent]
    # Tail.DEFER only: the stream is behind the database; come back after the grace.
    recheck: bool = False


class DependencyDown(Exception):
    """PostgreSQL did not answer: the client should reconnect and resume later."""


class _Stalled(Exception):
    """The client took nothing we wrote for close_timeout_s: it is closed as slow."""


@dataclass(frozen=True)
class Deps:
    registry: Registry[Any]
    repository: TaskRepository
    streams: StreamReader
    metrics: GatewayMetrics
    queue_size: int
    snapshot_grace_s: float
    close_timeout_s: float
    frame_cache: frames.FrameCache


class Catcher:
    """Catch-up of one task from ``delivered``: shared by WebSocket sessions and SSE streams."""

    def __init__(self, deps: Deps, tenant_id: UUID) -> None:
        self._deps = deps
        self._tenant_id = tenant_id

    async def row(self, task_id: UUID) -> Mapping[str, Any] | None:
        try:
            return await self._deps.repository.task_row(task_id, self._tenant_id)
        except ANY_PG_ERROR as exc:
            raise DependencyDown(f"PostgreSQL: {exc!r}") from exc

    async def events(
        self, task_id: UUID, delivered: int, row: Mapping[str, Any], tail: Tail
    ) -> CatchUp:
        """The events that bring a client at ``delivered`` up to date, in order."""
        if row_is_next_event(delivered, row["last_seq"], row["state"]):
            return CatchUp([event_from_row(row)])
        streams = self._deps.streams
        stream = await streams.after(task_id, delivered)
        plan = plan_catch_up(delivered, [e.seq for e in stream], row["last_seq"])
        grace = self._deps.snapshot_grace_s
        if plan.tail_missing and grace > 0 and tail is not Tail.SNAPSHOT:
            # The worker commits, then writes the event: give a late write a moment
            # rather than replacing a real event with a snapshot.
            if tail is Tail.DEFER:
                return CatchUp(_contiguous(stream, delivered), recheck=True)
            await asyncio.sleep(grace)
            stream = await streams.after(task_id, delivered)
            plan = plan_catch_up(delivered, [e.seq for e in stream], row["last_seq"])
        if plan.verdict is Verdict.NOTHING:
            return CatchUp([])
        if plan.verdict is Verdict.STREAM:
            return CatchUp(_contiguous(stream, delivered))
        if row["last_seq"] < 1:
            return CatchUp([])  # a task with no event yet has nothing to show
        # Only the tail missing: the retained events before it still go, with their data.
        before = _contiguous(stream, delivered) if plan.tail_missing else []
        snapshot = event_from_row(row, snapshot=True)
        return CatchUp([*before, snapshot, *_contiguous(stream, snapshot.seq)])


def _contiguous(stream: list[ProgressEvent], after: int) -> list[ProgressEvent]:
    """The stream's events that follow ``after`` without a hole; a hole is left for the
    next live event to find (it then catches up again)."""
    out: list[ProgressEvent] = []
    cursor = after
    for event in stream:
        if event.seq == cursor + 1:
            out.append(event)
            cursor = event.seq
        elif event.seq > cursor + 1:
            break
    return out


class Session:
    def __init__(self, ws: ServerConnection, tenant_id: UUID, deps: Deps) -> None:
        self.ws = ws
        self.tenant_id = tenant_id
        self._deps = deps
        self._catcher = Catcher(deps, tenant_id)
        # Created with the first item: an asyncio.Queue is three deques (~2 KiB).
        self._queue: asyncio.Queue[Item] | None = None
        self._events_queued = 0  # live events and resyncs waiting: the slow-consumer count
        self._pending = 0  # items queued or being processed: while any, no direct send
        self._ops_room: asyncio.Semaphore | None = None
        self._cursors: dict[UUID, int] = {}
        # Per task, the pending recheck and the row's seq it checks for.
        self._rechecks: dict[UUID, tuple[asyncio.TimerHandle, int]] = {}
        # An idle connection (most of them) costs no task of its own: the handler's task
        # reads, the worker starts with the first item, and falling behind or failing
        # cancels the read instead of a task of its own waiting for it.
        self._worker: asyncio.Task[None] | None = None
        self._reading: asyncio.Task[Any] | None = None
        self._ended = False
        self._slow = False
        # A resync waits in the queue: another one would re-read the same streams.
        self._resync_queued = False
        self._writes = CoalescedWrites(ws)

    # Sessions are registry keys: identity is the right equality.
    __hash__ = object.__hash__

    def offer(self, item: ProgressEvent | Resync | Recheck | Behind) -> None:
        if self._slow or self._ended:
            return
        if isinstance(item, ProgressEvent) and self._pending == 0 and self._send_now(item):
            return
        if isinstance(item, Resync):
            # The one waiting reads every stream when it starts, after this reconnect.
            if self._resync_queued:
                return
            self._resync_queued = True
        if self._falling_behind():
            self._slow = True
            self._deps.metrics.drops.inc()
            self._end()
            return
        self._events_queued += 1
        self._pending += 1
        self._items().put_nowait(item)
        self._start_worker()

    def behind(self, task_id: UUID, seq: int) -> bool:
        """Subscribed to the task and not yet sent ``seq`` of it."""
        return self._cursors.get(task_id, seq) < seq

    def _send_now(self, event: ProgressEvent) -> bool:
        """The common case, written at once without waking the worker: nothing is waiting
        or being processed (so order holds), the event is the next seq and the client's
        socket takes it. Anything else goes through the queue."""
        delivered = self._cursors.get(event.task_id)
        if delivered is None or check_live(delivered, event.seq) is not LiveCheck.SEND:
            return False
        frame = self._deps.frame_cache.frame(event)
        # Only while the frame fits below the mark: past it the socket is waited for,
        # and only the worker waits (bounded, after its items).
        if not self._writable(len(frame)):
            return False
        self._writes.write(frame)
        self._cursors[event.task_id] = event.seq
        self._deps.metrics.relayed["live"].inc()
        return True

    def _falling_behind(self) -> bool:
        """Too many events waiting, because the client does not read. A backlog of our
        own making (catch-ups, a busy process) with the client's socket draining is not
        the client's fault: it only counts once it reaches the hard cap (memory)."""
        waiting = self._events_queued
        if waiting < self._deps.queue_size:
            return False
        unread = self.ws.transport.get_write_buffer_size() >= _UNREAD_BYTES
        return unread or waiting >= self._deps.queue_size * _OWN_BACKLOG_FACTOR

    def _items(self) -> asyncio.Queue[Item]:
        # Unbounded: offer() bounds the events, the reader's semaphore the commands.
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def _start_worker(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name=f"ws-{self.ws.id.hex[:8]}-work")
            self._worker.add_done_callback(lambda _: self._end())

    def stop(self) -> None:
        """Stop serving (the API key that opened it was revoked): run() returns, and its
        caller closes the connection."""
        self._end()

    def _end(self) -> None:
        """The worker ended or the client fell behind: stop reading (see run())."""
        if self._ended:
            return
        self._ended = True
        if self._reading is not None and self._reading is not asyncio.current_task():
            self._reading.cancel()

    async def run(self) -> None:
        """Serve the connection until the client leaves, it falls behind, or we stop.

        The handler's own task reads the client's frames (no extra task per idle
        connection); _end() cancels that read, and only that cancellation is absorbed."""
        me = asyncio.current_task()
        self._reading = me
        results: list[BaseException | None] = []
        try:
            await self._read()
        except asyncio.CancelledError:
            if not self._ended or me is None or me.uncancel() > 0:
                raise  # not ours: the server is stopping the handler
        except ConnectionClosed:
            pass  # the client went away mid-frame
        finally:
            self._reading = None
            for timer, _ in self._rechecks.values():
                timer.cancel()
            self._rechecks.clear()
            if self._worker is not None:
                self._worker.cancel()
                results = list(await asyncio.gather(self._worker, return_exceptions=True))
        for result in results:
            if isinstance(result, DependencyDown):
                log.warning("closing a connection: dependency down", extra={"error": str(result)})
                await self.close(CloseCode.TRY_AGAIN_LATER, "dependency unavailable")
            elif isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError | ConnectionClosed | _Stalled
            ):
                log.error("connection failed", exc_info=result)
                await self.close(CloseCode.INTERNAL_ERROR, "internal error")
        if self._slow:
            log.info("closing a slow connection", extra={"tenant_id": str(self.tenant_id)})
            await self.close(CloseCode.TRY_AGAIN_LATER, "slow consumer")

    async def close(self, code: int, reason: str) -> None:
        """Close the connection with ``code``; a no-op once it is closed."""
        # close() waits for the write buffer to drain, which a client that does not
        # read never lets happen: bound it, then drop the TCP connection.
        try:
            async with asyncio.timeout(self._deps.close_timeout_s):
                await self.ws.close(code, reason)
        except TimeoutError:
            self.ws.transport.abort()

    async def _read(self) -> None:
        async for frame in self.ws:
            if self._ops_room is None:
                self._ops_room = asyncio.Semaphore(_OPS_AHEAD)
            await self._ops_room.acquire()
            self._pending += 1
            self._items().put_nowait(frames.parse_client_frame(frame))
            self._start_worker()

    async def _work(self) -> None:
        items = self._items()
        while True:
            item = await items.get()
            if isinstance(item, ProgressEvent | Resync | Recheck | Behind):
                self._events_queued -= 1
            elif self._ops_room is not None:
                self._ops_room.release()
            try:
                await self._process(item)
                if items.empty() and not self._writable():
                    # Idle with frames the client has not taken: websockets' keepalive
                    # ping would wait behind them, and its timeout would never start.
                    await self._socket_took_it()
            finally:
                self._pending -= 1

    async def _process(self, item: Item) -> None:
        if isinstance(item, ProgressEvent):
            await self._live(item)
        elif isinstance(item, Resync):
            self._resync_queued = False  # a reconnect from here on needs its own reads
            for task_id in list(self._cursors):
                await self._catch_up(task_id)
        elif isinstance(item, Recheck):
            if (pending := self._rechecks.get(item.task_id)) and pending[1] == item.last_seq:
                del self._rechecks[item.task_id]
            if self.behind(item.task_id, item.last_seq):
                await self._catch_up(item.task_id, tail=Tail.SNAPSHOT)
        elif isinstance(item, Behind):
            for task_id, seq in item.seqs:
                if self.behind(task_id, seq):
                    await self._catch_up(task_id)
        elif isinstance(item, frames.Subscribe):
            await self._subscribe(item)
        elif isinstance(item, frames.Unsubscribe):
            self._deps.registry.unsubscribe(self, item.task_id)
            self._cursors.pop(item.task_id, None)
            if (pending := self._rechecks.pop(item.task_id, None)) is not None:
                pending[0].cancel()
        else:
            await self._send_frame(frames.error_frame(item.code, item.message, item.task_id))

    async def _subscribe(self, op: frames.Subscribe) -> None:
        try:
            # Live first: from here on the hub queues this task's events for us, so
            # whatever the stream read below misses arrives through the queue.
            self._deps.registry.subscribe(self, op.task_id)
        except Refused as exc:
            await self._send_frame(frames.error_frame(exc.code, exc.message, op.task_id))
            return
        row = await self._catcher.row(op.task_id)
        if row is None:
            self._deps.registry.unsubscribe(self, op.task_id)
            self._cursors.pop(op.task_id, None)
            await self._send_frame(frames.error_frame("not_found", "no such task", op.task_id))
            return
        # A repeated subscribe restarts from the seq it names: the client asked for it.
        self._cursors[op.task_id] = op.after_seq
        await self._catch_up(op.task_id, row)

    async def _live(self, event: ProgressEvent) -> None:
        delivered = self._cursors.get(event.task_id)
        if delivered is None:
            return  # unsubscribed while the event waited in the queue
        verdict = check_live(delivered, event.seq)
        if verdict is LiveCheck.GAP:
            await self._catch_up(event.task_id)
            delivered = self._cursors.get(event.task_id)
            if delivered is None or check_live(delivered, event.seq) is not LiveCheck.SEND:
                return
        elif verdict is LiveCheck.DUPLICATE:
            return
        await self._send(event, "live")

    async def _catch_up(
        self, task_id: UUID, row: Mapping[str, Any] | None = None, tail: Tail = Tail.DEFER
    ) -> None:
        if row is None:
            row = await self._catcher.row(task_id)
            if row is None:
                return  # the task is gone (tenant deleted): nothing more will come
        delivered = self._cursors.get(task_id)
        if delivered is None:
            return
        caught = await self._catcher.events(task_id, delivered, row, tail)
        for event in caught.events:
            await self._send(event, "snapshot" if event.snapshot else "replay")
        last_seq = int(row["last_seq"])
        pending = self._rechecks.get(task_id)
        if caught.recheck and (pending is None or pending[1] < last_seq):
            # The live event will most likely fill the tail meanwhile; if not, the
            # recheck sends the row as a snapshot. One pending for an older seq would
            # find nothing missing and leave the newer tail to the sweep: replaced.
            if pending is not None:
                pending[0].cancel()
            timer = asyncio.get_running_loop().call_later(
                self._deps.snapshot_grace_s, self.offer, Recheck(task_id, last_seq)
            )
            self._rechecks[task_id] = (timer, last_seq)

    async def _send(self, event: ProgressEvent, source: str) -> None:
        frame = self._deps.frame_cache.frame(event)
        if self._writable():
            # Written without waiting, as _send_now does: send()'s lock and drain are
            # for a socket that is filling up, where waiting is the back pressure we want.
            self._writes.write(frame)
        else:
            await self._send_frame(frame)  # after the frames queued by _writes: order holds
        self._cursors[event.task_id] = event.seq
        self._deps.metrics.relayed[source].inc()

    async def _send_frame(self, frame: str) -> None:
        await self._bounded(self.ws.send(frame))

    async def _socket_took_it(self) -> None:
        """Wait until the client has taken most of what we wrote."""
        self._writes.flush()  # else the transport does not know yet it is full
        with contextlib.suppress(OSError):  # the client left: the reader sees it closed
            await self._bounded(self.ws.drain())

    async def _bounded(self, waiting: Awaitable[None]) -> None:
        """Wait for the client's socket, for close_timeout_s at most: a client that takes
        nothing for that long does not read, and websockets' keepalive ping, queued
        behind our frames, would never tell. Raises _Stalled: closed as slow (run())."""
        try:
            async with asyncio.timeout(self._deps.close_timeout_s):
                await waiting
        except TimeoutError:
            self._slow = True
            self._deps.metrics.drops.inc()
            raise _Stalled from None

    def _writable(self, more: int = 0) -> bool:
        """Open, and the kernel takes what we write (nothing much buffered by us, this
        turn's queued frames included, and ``more`` bytes still to write)."""
        ws = self.ws
        buffered = ws.transport.get_write_buffer_size() + self._writes.pending + more
        return ws.protocol.state is State.OPEN and buffered < _UNREAD_BYTES
