"""Writes progress events where the gateway finds them: the task's Redis stream (for
replay) and its pub/sub channel (for live relay).

Events emitted at the same time by concurrent tasks of a process go out together, in
one script call (shared.groupcommit). A caller's own events keep their order, since it
awaits each emit.

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
from shared.redis import idempotent
from shared.schemas import ProgressEvent, encode_event
from shared.wire import Wire

log = logging.getLogger(__name__)

EVENTS_WRITTEN = Counter("longhaul_events_written_total", "Progress events written to Redis")
EVENTS_FAILED = Counter("longhaul_events_failed_total", "Progress events Redis did not take")

# One script call writes a whole batch: per event an XADD (its id is the seq, so a
# duplicate or late write is refused by Redis itself and the stream never holds one
# seq twice; that refusal is expected and not counted), the PUBLISH of live events and
# the expiry. As a pipeline of single commands, packing and parsing them cost the
# client more than Redis spent running them; and since packing costs the client per
# argument, an event is its stream (a key) and its body: the seqs and flags of all come
# in one argument, and each channel is its stream's name with the channels' prefix.
# Returns {refused, first error}.
_WRITE_EVENTS = """
local maxlen, ttl, channels, cut = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local refused, first, i = 0, '', 0
for seq, flags in string.gmatch(ARGV[5], '(%d+):(%d)') do
    i = i + 1
    local stream, body = KEYS[i], ARGV[5 + i]
    local added = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, seq .. '-0', 'e', body)
    if type(added) == 'table' and added.err
        and not string.find(added.err, 'equal or smaller', 1, true) then
        refused = refused + 1
        if first == '' then first = added.err end
    end
    flags = tonumber(flags)
    if flags % 2 == 1 then redis.call('PUBLISH', channels .. string.sub(stream, cut), body) end
    -- Also a stream this write made anew (Redis restarted, or evicted it mid-task):
    -- with no expiry it stayed for good if its terminal write was lost.
    if flags >= 2 or redis.call('PTTL', stream) == -1 then redis.call('PEXPIRE', stream, ttl) end
end
return {refused, first}
"""

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
        self._script = redis.register_script(_WRITE_EVENTS)
        # A channel is its stream's name with this prefix in place of the streams' one.
        self._channels = wire.event_channel("")
        self._cut = len(wire.event_stream("")) + 1
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

    async def announce(self, event: ProgressEvent) -> bool:
        """Publish ``event`` to live clients without appending it to the stream; True when
        Redis took it. For an event that may have been lost, announced by someone else than
        its writer, who may still be about to write it with the events before it: in the
        stream it would go first, and Redis would then refuse those as late. A client
        that lacks the ones before catches up from the stream or the row."""
        if not self.breaker.allow():
            EVENTS_FAILED.inc()
            return False
        try:
            # Publishing twice is harmless (clients drop an event by seq), so a connection
            # lost after the PUBLISH was sent is retried on a fresh one.
            with idempotent():
                await self._redis.publish(
                    self._wire.event_channel(event.task_id), encode_event(event)
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.failed()
            EVENTS_FAILED.inc()
            log.warning("progress event not announced", extra={"error": repr(exc)})
            return False
        self.breaker.succeeded()
        return True

    async def aclose(self) -> None:
        """Wait for what is being written (shutdown)."""
        await self._group.aclose()

    async def _write_batch(self, batch: list[list[tuple[ProgressEvent, bool]]]) -> list[bool]:
        ok = await self._write([item for items in batch for item in items])
        return [ok] * len(batch)

    async def _write(self, events: list[tuple[ProgressEvent, bool]]) -> bool:
        keys: list[str] = []
        marks: list[str] = []
        bodies: list[bytes] = []
        stream = self._wire.event_stream
        for event, publish in events:
            keys.append(stream(event.task_id))
            expire = event.seq == 1 or event.state.terminal or event.seq % _EXPIRE_EVERY == 0
            marks.append(f"{event.seq}:{int(publish) | int(expire) << 1}")
            bodies.append(encode_event(event))
        args: list[bytes | str | int] = [
            self._maxlen,
            self._retention_ms,
            self._channels,
            self._cut,
            ",".join(marks),
            *bodies,
        ]
        try:
            # Running the script twice is harmless (Redis refuses a seq's second XADD, the
            # gateway drops a PUBLISH by seq, the PEXPIRE sets the same expiry), so a
            # connection lost after it was sent is retried on a fresh one.
            with idempotent():
                refused, first_error = await self._script(keys=keys, args=args)
        except ResponseError as exc:
            # Redis is up but refused the whole script (out of memory, say).
            refused, first_error = len(events), str(exc)
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.failed()
            EVENTS_FAILED.inc(len(events))
            log.warning(
                "progress events not written to Redis",
                extra={"count": len(events), "error": repr(exc)},
            )
            return False
        self.breaker.succeeded()
        if refused:
            EVENTS_FAILED.inc(len(events))
            log.warning(
                "progress events partly refused by Redis",
                extra={"refused": refused, "error": _text(first_error)},
            )
            return False
        EVENTS_WRITTEN.inc(len(events))
        return True


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
