"""The Server-Sent Events fallback, ``GET /v1/tasks/{id}/events``, as long polling.

websockets' server answers a non-WebSocket request with one complete response (a body
of bytes, then end of stream): it cannot stream. So each request returns what is new
after ``Last-Event-ID`` (waiting up to a poll period for something to happen) as a
finite ``text/event-stream`` with a ``retry`` hint; an SSE client reconnects and
resumes with ``Last-Event-ID``. Same order, no-gap and snapshot rules as the WebSocket."""

from __future__ import annotations

import asyncio
from uuid import UUID

from services.ws_gateway import frames
from services.ws_gateway.hub import Resync
from services.ws_gateway.session import Catcher, Deps, Tail
from shared.digits import decimal_int
from shared.schemas import ProgressEvent, TaskState

RETRY_MS = 500


class NotFound(Exception):
    pass


class Waiter:
    """A registry listener that only wants to know that something new happened: an
    event the client already has (published again, or late from an earlier attempt)
    does not end the poll with nothing to send."""

    def __init__(self, after_seq: int) -> None:
        self.woken = asyncio.Event()
        self._after_seq = after_seq

    __hash__ = object.__hash__

    def offer(self, item: ProgressEvent | Resync) -> None:
        if isinstance(item, ProgressEvent) and item.seq <= self._after_seq:
            return
        self.woken.set()

    def behind(self, task_id: UUID, seq: int) -> bool:
        """Never, for the sweep: a poll reads the row itself, and lasts one poll period."""
        return False


def poll_wait(poll_s: float, handshake_timeout_s: float, snapshot_grace_s: float) -> float:
    """How long a poll may wait for news and still answer inside websockets'
    open_timeout, which bounds process_request: it reads twice, each read may wait the
    snapshot grace, and a second is left for the rest."""
    return max(0.0, min(poll_s, handshake_timeout_s - 1 - 2 * snapshot_grace_s))


class Ended(Exception):
    """The client has the task's terminal event: nothing will follow."""


async def poll(
    deps: Deps, tenant_id: UUID, task_id: UUID, after_seq: int, wait_s: float
) -> list[ProgressEvent]:
    """The events after ``after_seq``, waiting up to ``wait_s`` when there are none yet.
    Raises Ended when the task has ended and the client has every event of it."""
    catcher = Catcher(deps, tenant_id)
    waiter = Waiter(after_seq)
    deps.registry.open(waiter, tenant_id)
    try:
        deps.registry.subscribe(waiter, task_id)
        row = await catcher.row(task_id)
        if row is None:
            raise NotFound(str(task_id))
        events = (await catcher.events(task_id, after_seq, row, Tail.WAIT)).events
        # Equal, not beyond: a client ahead of the database gets a snapshot (events()).
        if TaskState(row["state"]).terminal and after_seq == row["last_seq"]:
            raise Ended(str(task_id))
        if events or TaskState(row["state"]).terminal:
            return events
        try:
            async with asyncio.timeout(wait_s):
                await waiter.woken.wait()
        except TimeoutError:
            return []
        row = await catcher.row(task_id)
        if row is None:
            raise NotFound(str(task_id))
        return (await catcher.events(task_id, after_seq, row, Tail.WAIT)).events
    finally:
        deps.registry.close(waiter)


def body(events: list[ProgressEvent]) -> bytes:
    # The comment line keeps proxies from treating an empty poll as a broken response.
    parts = [f"retry: {RETRY_MS}\n: longhaul\n\n"]
    parts.extend(frames.sse_message(e) for e in events)
    return "".join(parts).encode()


def parse_last_event_id(header: str | None, query: str | None) -> int | None:
    raw = header if header is not None else query
    if raw is None or raw == "":
        return 0
    return decimal_int(raw, 0, frames.MAX_SEQ)
