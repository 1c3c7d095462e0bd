"""Reading a task's Redis stream: the events retained after a seq, for replay.

The reads of the moment share one pipelined round trip (shared.groupcommit): clients
subscribe in bursts (a page of tasks, a reconnect storm after a gateway restart), and a
read per subscription would each take a connection and a round trip."""

from __future__ import annotations

import logging
from typing import cast
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.errors import MalformedMessage
from shared.groupcommit import GroupCommit
from shared.schemas import ProgressEvent, parse_event
from shared.wire import Wire

log = logging.getLogger(__name__)

_PAGE = 500

Entries = list[tuple[bytes, dict[bytes, bytes]]]


class StreamReader:
    def __init__(self, redis: Redis, wire: Wire, *, max_events: int) -> None:
        self._redis = redis
        self._wire = wire
        self._max_events = max_events
        # A page is up to 500 entries: 64 pages bound one reply to some megabytes.
        self._reads: GroupCommit[tuple[str, int], Entries] = GroupCommit(
            self._read_pages, name="stream-reads", max_batch=64
        )

    async def after(self, task_id: UUID, seq: int) -> list[ProgressEvent]:
        """Retained events with seq > ``seq``, ascending. Redis unreachable reads as an
        empty stream: the caller then falls back to the database, which is the truth."""
        key = self._wire.event_stream(task_id)
        out: list[ProgressEvent] = []
        start = seq + 1
        try:
            while len(out) < self._max_events:
                entries = await self._reads.submit((key, start))
                for entry_id, fields in entries:
                    body = fields.get(b"e")
                    if body is None:
                        continue
                    try:
                        out.append(parse_event(body))
                    except MalformedMessage as exc:
                        log.warning(
                            "malformed event in stream",
                            extra={"stream": key, "entry": entry_id, "error": str(exc)},
                        )
                if len(entries) < _PAGE:
                    break
                start = int(entries[-1][0].split(b"-", 1)[0]) + 1
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "stream unreadable, falling back to the database",
                extra={"stream": key, "error": repr(exc)},
            )
            return []
        return out

    async def aclose(self) -> None:
        """Wait for the reads in flight (shutdown)."""
        await self._reads.aclose()

    async def _read_pages(self, reads: list[tuple[str, int]]) -> list[Entries]:
        """One page of each stream from its start seq, in one pipelined round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, start in reads:
                pipe.xrange(key, min=f"{start}-0", max="+", count=_PAGE)
            return cast(list[Entries], await pipe.execute())
