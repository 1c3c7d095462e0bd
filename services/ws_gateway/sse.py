"""The Server-Sent Events fallback, ``GET /v1/tasks/{id}/events``: one task's events as
one long response, live, as a standard ``EventSource`` reads them.

websockets' server answers a plain HTTP request with one complete response. So once a
request has passed every check (origin, room, token, the task's existence), the stream
takes the connection over: it writes the response head itself and then the task's
events as they happen, chunked, until the terminal event has gone out, the client
leaves or the gateway stops. The handshake waits for it; the gateway's own connection
class keeps the handshake deadline off such a connection (see handshake.py).

Same order, no-gap and snapshot rules as the WebSocket: live events that follow on from
the client's last seq go out as they come; anything else (the first pass, a hole, a
resync, the sweep's finding) reads the row and catches up, as a subscribe does. A
reconnect resumes with
``Last-Event-ID``; with a single-use token in the URL it needs a new token, as a new
WebSocket does."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Response

from services.ws_gateway import frames
from services.ws_gateway.session import Catcher, Deps, Tail
from shared.digits import decimal_int
from shared.schemas import ProgressEvent, TaskState

log = logging.getLogger(__name__)

# How long an EventSource waits before it reconnects after the connection drops.
RETRY_MS = 1000
# The end of a chunked body: the client can tell a finished stream from a cut one.
LAST_CHUNK = b"0\r\n\r\n"
# A catch-up goes out in pieces of about this size, each once the client has taken the
# one before (the connection's write limit): a long one is never buffered whole.
_PIECE_CHARS = 64 * 1024


class NotFound(Exception):
    pass


class Ended(Exception):
    """The client has the task's terminal event: nothing will follow."""


def parse_last_event_id(header: str | None, query: str | None) -> int | None:
    raw = header if header is not None else query
    if raw is None or raw == "":
        return 0
    return decimal_int(raw, 0, frames.MAX_SEQ)


def head(extra: Mapping[str, str], chunked: bool = True) -> bytes:
    """The response head of a stream. Chunked, so that a proxy passes each event on as
    it comes and the client sees a clean end; nothing may cache or buffer it. An
    HTTP/1.0 client knows no chunks: its response ends where the connection does."""
    headers = Headers(
        [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-store"),
            *([("Transfer-Encoding", "chunked")] if chunked else []),
            ("Connection", "close"),
            ("X-Accel-Buffering", "no"),  # nginx: do not hold the response back
        ]
    )
    for key, value in extra.items():
        headers[key] = value
    return Response(200, "OK", headers, b"").serialize()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def opening() -> bytes:
    # The comment line is sent at once, so that the client (and any proxy) sees the
    # stream open before the first event.
    return f"retry: {RETRY_MS}\n: longhaul\n\n".encode()


HEARTBEAT = b": keepalive\n\n"


def message(event: ProgressEvent, frame: str) -> str:
    """One SSE message: ``id`` is the seq, so ``Last-Event-ID`` resumes; the data is the
    WebSocket's event frame. No ``event:`` field: EventSource's onmessage sees every
    frame, snapshots too (their JSON says so)."""
    return f"id: {event.seq}\ndata: {frame}\n\n"


class Stream:
    """One client's stream of one task. A registry listener like a WebSocket session:
    it holds a place under the same caps for as long as it is open, and each event,
    resync or sweep finding only wakes it; the catch-up from the row and the stream
    decides what goes out, so nothing is sent twice or out of order."""

    def __init__(
        self, deps: Deps, tenant_id: UUID, task_id: UUID, after_seq: int, heartbeat_s: float
    ) -> None:
        self._deps = deps
        self._tenant_id = tenant_id
        self._task_id = task_id
        self._catcher = Catcher(deps, tenant_id)
        self._heartbeat_s = heartbeat_s
        self.delivered = after_seq
        self.woken = asyncio.Event()
        self._stopping = False
        self._row: Mapping[str, Any] | None = None
        # Live events since the last wake-up, and whether only the reads can tell what
        # is missing: live events that follow on from the cursor go out as they are,
        # without reading the row and the stream for each.
        self._live: list[ProgressEvent] = []
        self._read_needed = False
        self._connection: ServerConnection | None = None
        # Chunks are for HTTP/1.1 clients (serve()).
        self._chunked = True

    __hash__ = object.__hash__

    # ---- the registry's and the sweep's listener interface

    def offer(self, item: object) -> None:
        if isinstance(item, ProgressEvent):
            # One the client already has (published again, or late from an earlier
            # attempt) is no news.
            if item.seq <= self.delivered:
                return
            if len(self._live) >= self._deps.queue_size:
                # Piling up while the client is slow to read: the reads will catch up.
                self._live.clear()
                self._read_needed = True
            else:
                self._live.append(item)
        else:
            self._read_needed = True  # a resync or the sweep: Redis may have lost some
        self.woken.set()

    def behind(self, task_id: UUID, seq: int) -> bool:
        """For the sweep: the row is ahead of what this client has."""
        return task_id == self._task_id and self.delivered < seq

    def stop(self) -> None:
        """The gateway is stopping, or the API key that opened the stream was revoked: end
        the response cleanly (the client reconnects, elsewhere or to be refused)."""
        self._stopping = True
        self.woken.set()

    def abort(self) -> None:
        """The gateway's stop is overdue: drop the connection."""
        if self._connection is not None:
            self._connection.transport.abort()

    # ---- the request

    async def open(self) -> None:
        """Take a place and subscribe, then read the row: raises Refused over a cap,
        NotFound for a task the tenant does not have, Ended when the client has the
        terminal event already. Call close() in any case."""
        self._deps.registry.open(self, self._tenant_id)
        # Live first, then the row: whatever the reads miss wakes the stream.
        self._deps.registry.subscribe(self, self._task_id)
        row = await self._catcher.row(self._task_id)
        if row is None:
            raise NotFound(str(self._task_id))
        # Equal, not beyond: a client ahead of the database gets a snapshot (events()).
        if TaskState(row["state"]).terminal and self.delivered == row["last_seq"]:
            raise Ended(str(self._task_id))
        self._row = row

    def close(self) -> None:
        self._deps.registry.close(self)

    async def serve(
        self, connection: ServerConnection, extra: Mapping[str, str], chunked: bool = True
    ) -> None:
        """Write the response until it ends, then close the connection. Not ``chunked``
        (an HTTP/1.0 client): the body as it is, ended by the close."""
        self._connection = connection
        self._chunked = chunked
        transport = connection.transport
        closed = asyncio.create_task(connection.wait_closed(), name="sse-closed")
        closed.add_done_callback(lambda _: self.woken.set())
        try:
            transport.write(head(extra, chunked) + self._framed(opening()))
            if await self._pump(connection, closed):
                if chunked:
                    transport.write(LAST_CHUNK)
                transport.close()  # once what is buffered has gone
                try:
                    async with asyncio.timeout(self._deps.close_timeout_s):
                        await asyncio.shield(closed)
                except TimeoutError:
                    pass  # a client that does not read: aborted below
        finally:
            # The client left or fell behind, or an error: the client sees the stream
            # cut (no last chunk) and reconnects. A no-op once closed.
            transport.abort()
            await closed

    async def _pump(self, connection: ServerConnection, closed: asyncio.Task[None]) -> bool:
        """Send what is new until there is nothing more to wait for. True when the stream
        ends as it should (the terminal event sent, the task gone, the gateway stopping);
        False when the client left or fell behind."""
        row = self._row
        while not closed.done():
            # The first pass catches up from open()'s row and leaves the wake-ups that
            # came during that read for the next pass: when the row alone is the next
            # event, the stream is not read, and those events would be lost until the
            # sweep. Later passes send live events that follow on from the cursor as
            # they are; anything else (a hole, a resync, the sweep) reads the row and
            # the stream, as a subscribe does.
            run = None if row is not None else self._take_wakeups()
            if run is not None:
                events, source = run, "live"
            else:
                row = row or await self._catcher.row(self._task_id)
                if row is None:
                    return True  # the task is gone (its tenant deleted): nothing will come
                caught = await self._catcher.events(self._task_id, self.delivered, row, Tail.WAIT)
                events, source = caught.events, "replay"
            if events:
                if not await self._write(connection, events, source):
                    return False
                # The last event sent, not the row read before the stream: a retry may
                # have followed the terminal state the row showed.
                if TaskState(events[-1].state).terminal:
                    return True
            elif row is not None and _ended(row, self.delivered):
                return True
            row = None
            while not self.woken.is_set() and not self._stopping:
                try:
                    async with asyncio.timeout(self._heartbeat_s):
                        await self.woken.wait()
                except TimeoutError:
                    # Keeps proxies from closing an idle response; finds a client gone.
                    if not await self._send(connection, HEARTBEAT):
                        return False
            if self._stopping:
                return not closed.done()
        return False

    def _take_wakeups(self) -> list[ProgressEvent] | None:
        """The live events to send as they are, or None when the reads must decide.
        Cleared before the reads: a wake-up after this point is not lost, and one before
        it is covered by them (the worker writes the event, then publishes)."""
        self.woken.clear()
        live, self._live = self._live, []
        if self._read_needed:
            self._read_needed = False
            return None
        return live_run(live, self.delivered)

    async def _write(
        self, connection: ServerConnection, events: list[ProgressEvent], source: str
    ) -> bool:
        cache = self._deps.frame_cache
        piece: list[str] = []
        size = 0
        for i, event in enumerate(events):
            text = message(event, cache.frame(event))
            piece.append(text)
            size += len(text)
            if size >= _PIECE_CHARS or i == len(events) - 1:
                if not await self._send(connection, "".join(piece).encode()):
                    return False
                self.delivered = event.seq
                piece, size = [], 0
        for event in events:
            self._deps.metrics.relayed["snapshot" if event.snapshot else source].inc()
        return True

    async def _send(self, connection: ServerConnection, data: bytes) -> bool:
        """Write a chunk once the client has taken what was before it (the connection's
        write limit); False for a client that left or does not read (slow)."""
        try:
            async with asyncio.timeout(self._deps.close_timeout_s):
                await connection.drain()
        except TimeoutError:
            self._deps.metrics.drops.inc()
            log.info("closing a slow SSE stream", extra={"task_id": str(self._task_id)})
            return False
        except OSError:
            return False  # the client left meanwhile
        if connection.transport.is_closing():
            return False
        connection.transport.write(self._framed(data))
        return True

    def _framed(self, data: bytes) -> bytes:
        return chunk(data) if self._chunked else data


def _ended(row: Mapping[str, Any], delivered: int) -> bool:
    return TaskState(row["state"]).terminal and delivered >= row["last_seq"]


def live_run(live: list[ProgressEvent], delivered: int) -> list[ProgressEvent] | None:
    """The live events to send as they are: those after ``delivered``, when they follow
    on from it without a hole. None when there are none, or a hole that only the row
    and the stream can fill."""
    fresh = sorted({e.seq: e for e in live if e.seq > delivered}.values(), key=lambda e: e.seq)
    if not fresh or [e.seq for e in fresh] != list(
        range(delivered + 1, delivered + 1 + len(fresh))
    ):
        return None
    return fresh
