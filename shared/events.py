"""Writes progress events where the gateway finds them: the task's Redis stream (for
replay) and its pub/sub channel (for live relay).

Events emitted at the same time by concurrent tasks of a process go out together, in
one pipelined round trip (shared.groupcommit). A caller's own events keep their order,
since it awaits each emit.

Redis is not the truth: an event that cannot be written is logged and counted, and the
gateway recovers the state from PostgreSQL (a snapshot event)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared.breaker import Breaker
from shared.groupcommit import GroupCommit
from shared.schemas import ProgressEvent, encode_event
from shared.wire import Wire

log = logging.getLogger(__name__)

EVENTS_WRITTEN = Counter("longhaul_events_written_total", "Progress events written to Redis")
EVENTS_FAILED = Counter("longhaul_events_failed_total", "Progress events Redis did not take")

# Refresh a stream's expiry on its first event, its terminal one and every so often in
# between: a PEXPIRE per event would be a third of all commands.
_EXPIRE_EVERY = 32


class EventSink:
    def __init__(
        self,
        redis: Redis,
        wire: Wire,
        *,
        retention_s: float,
        maxlen: int,
        breaker: Breaker | None = None,
    ) -> None:
        self._redis = redis
        # Shared with the process's other Redis users: while Redis is down, emitting
        # costs nothing instead of a timeout per event.
        self.breaker = breaker or Breaker()
        self._wire = wire
        self._retention_ms = int(retention_s * 1000)
        self._maxlen = maxlen
        self._group: GroupCommit[list[tuple[ProgressEvent, bool]], bool] = GroupCommit(
            self._write_batch, name="event-writer"
        )

    async def emit(
        self, events: Sequence[ProgressEvent], *, backfill: Sequence[ProgressEvent] = ()
    ) -> bool:
        """Append to each task's stream and publish; True when Redis took them all.

        ``backfill``: earlier events another process most likely wrote already, appended
        to the stream first (a duplicate is refused there) but not published: a live
        client that missed one finds the gap at the next event and reads the stream."""
        if not events and not backfill:
            return True
        if not self.breaker.allow():
            EVENTS_FAILED.inc(len(events) + len(backfill))
            return False
        return await self._group.submit(
            [*((e, False) for e in backfill), *((e, True) for e in events)]
        )

    async def aclose(self) -> None:
        """Wait for what is being written (shutdown)."""
        await self._group.aclose()

    async def _write_batch(self, batch: list[list[tuple[ProgressEvent, bool]]]) -> list[bool]:
        ok = await self._write([item for items in batch for item in items])
        return [ok] * len(batch)

    async def _write(self, events: list[tuple[ProgressEvent, bool]]) -> bool:
        pipe = self._redis.pipeline(transaction=False)
        for event, publish in events:
            body = encode_event(event)
            stream = self._wire.event_stream(event.task_id)
            # The entry id is the seq: a duplicate or late write is refused by Redis
            # itself (ids must grow), so the stream never holds one seq twice.
            pipe.xadd(
                stream, {"e": body}, id=f"{event.seq}-0", maxlen=self._maxlen, approximate=True
            )
            if event.seq == 1 or event.state.terminal or event.seq % _EXPIRE_EVERY == 0:
                pipe.pexpire(stream, self._retention_ms)
            if publish:
                pipe.publish(self._wire.event_channel(event.task_id), body)
        try:
            results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.failed()
            EVENTS_FAILED.inc(len(events))
            log.warning(
                "progress events not written to Redis",
                extra={"count": len(events), "error": repr(exc)},
            )
            return False
        errors = [
            r
            for r in results
            if isinstance(r, Exception)
            and not (isinstance(r, ResponseError) and "equal or smaller" in str(r))
        ]
        if errors:
            EVENTS_FAILED.inc(len(events))
            log.warning("progress events partly refused by Redis", extra={"error": repr(errors[0])})
            return False
        self.breaker.succeeded()
        EVENTS_WRITTEN.inc(len(events))
        return True
