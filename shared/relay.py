"""The transactional-outbox relay: publishes committed outbox rows with publisher
confirms and deletes them only after the broker confirmed them.

Rows are claimed with ``FOR UPDATE SKIP LOCKED`` inside the publishing transaction, so
any number of relays (every API and worker process runs one) share the rows without
publishing one twice in the normal case. A crash between the confirm and the commit
publishes the rows again later: the worker absorbs such duplicates (the message's
attempt no longer matches). Rows with a future ``available_at`` are retries and delayed
tasks: the relay sleeps until the earliest is due, so no consumer holds them. Each
message goes to its task's lane, by the priority its row carries (the Publisher routes).

The API's fresh tasks take a shorter way (``hand_over``): their rows are inserted
claimed (``claimed_until``) by the inserting process, whose relay publishes them from
memory right after the commit and then deletes them, with no claim, no transaction and
no wake-up of its polling loop in between. Should that process die first, its rows are
released to every relay within about two seconds: each relay holds a session advisory
lock on its owner key (``claimed_by``) on its LISTEN connection, which dies with the
process (or, its host gone, when PostgreSQL's keepalive finds the connection dead, in
about 8 s), and every relay releases, once a second, the rows claimed by a key whose
lock nobody holds. Rows inserted while the lock is not held (no LISTEN connection) carry
no key, and they and those of processes of an earlier version wait for their claim to
lapse; then any relay's poll publishes them."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from typing import NamedTuple
from uuid import UUID

import asyncpg
from prometheus_client import Counter, Gauge

from shared.amqp import Outgoing, Published, Publisher
from shared.db import ANY_PG_ERROR, NOTIFY_CHANNEL
from shared.errors import DependencyError
from shared.events import EventSink
from shared.failpoints import Failpoints
from shared.groupcommit import GroupCommit
from shared.liveness import beat, stale_after
from shared.taskrows import (
    PREVIOUS_COLUMNS,
    event_from_row,
    previous_events,
    qualified,
)

log = logging.getLogger(__name__)

PUBLISHED = Counter("longhaul_outbox_published_total", "Outbox rows published and confirmed")
PUBLISH_FAILURES = Counter("longhaul_outbox_publish_failures_total", "Relay batches not confirmed")
BROKER_REFUSING = Gauge("longhaul_outbox_broker_refusing", "1 while the broker refuses publishes")
ORPHANS_RELEASED = Counter(
    "longhaul_outbox_orphans_released_total",
    "Handed-over rows released because the process that claimed them died",
)

# The first key of every relay's owner lock (the second is its owner key): "LHOB".
OWNER_LOCK_CLASS = 0x4C484F42
# A handed-over row is published within milliseconds by a live claimer: one claimed for
# longer is checked for a dead one, once per this long by each relay.
ORPHAN_AFTER_S = 1.0

_CLAIM = """
SELECT id, task_id, attempt, body, priority FROM outbox
WHERE available_at <= now() AND (claimed_until IS NULL OR claimed_until <= now())
ORDER BY available_at, id
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

# A retry that is due becomes queued before its message is published, in a
# transaction of its own: its event then reaches Redis before any worker can claim the
# attempt (and write the next seq). Fenced by attempt: a stale row changes nothing.
_PROMOTE = f"""
WITH old AS (
    SELECT {qualified("t")}, o.attempt AS next_attempt
    FROM outbox AS o JOIN tasks AS t ON t.id = o.task_id
    WHERE o.available_at <= now() AND o.attempt > 1 AND t.state = 'retrying'
      AND t.attempts = o.attempt - 1
    FOR UPDATE OF t
)
UPDATE tasks AS t
SET state = 'queued', next_attempt_at = NULL, last_seq = t.last_seq + 1, updated_at = now()
FROM old
WHERE t.id = old.id AND t.state = 'retrying' AND t.attempts = old.next_attempt - 1
RETURNING {qualified("t")}, {PREVIOUS_COLUMNS}
"""


# Handed-over first attempts the broker confirmed leave the outbox together, this long
# after the first of them at most: at moderate load a DELETE (and its commit) per
# publish was a third of the API's statements. Far below the claim, which must not
# lapse before they are gone (that would publish them again).
SETTLE_LINGER_S = 0.1

# Published rows, by row id (both ways of publishing). By the task's id, a retry's new
# row (a task cancelled before it ran and retried within the linger) would go too, and
# nothing would ever publish the retry.
_DELETE_PUBLISHED = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"

# Handed-over rows the broker did not confirm, or that this process will not publish in
# time, released at once to every relay's poll (which backs off while the broker is
# away).
_RELEASE_HANDED = "UPDATE outbox SET claimed_until = NULL WHERE id = ANY($1::bigint[])"

# Claimed rows whose claimer died (its owner lock is gone with its connection), released
# to every relay's poll. Advisory locks are per database: pg_locks shows every one's.
# Rows another relay holds (releasing them too, or publishing them) are skipped, not
# waited for: this runs in the flush loop. The rows are collected once, into an array:
# as ``id IN (subquery)``, a plan made while the outbox was empty (a worker's generic
# plans are made on the first call) ran the locking subquery once per outbox row, a
# read of the whole outbox for each of its rows (1 s a call at 1,700 rows).
_RELEASE_ORPHANS = """
UPDATE outbox SET claimed_until = NULL
WHERE id = ANY(ARRAY(
    SELECT id FROM outbox
    WHERE claimed_until > now() AND claimed_by IS NOT NULL
      AND available_at < now() - make_interval(secs => $2)
      AND claimed_by::bigint NOT IN (
          SELECT l.objid::bigint FROM pg_locks AS l
          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
            AND l.classid::bigint = $1
            AND l.database = (
                SELECT oid FROM pg_database WHERE datname = current_database()))
    FOR UPDATE SKIP LOCKED))
RETURNING id
"""

# The LISTEN connection's: a host that vanished (no FIN, no RST) leaves its owner lock
# held until PostgreSQL finds the connection dead, by default after two hours.
_LISTENER_KEEPALIVE = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "3",
}


class Handed(NamedTuple):
    """A first attempt committed and claimed for this process: its outbox row, its
    message, and the time (``time.monotonic()``) its claim lapses, at the earliest."""

    row_id: int
    task_id: UUID
    body: bytes
    claimed_until: float
    # The task's: which lane the message goes to.
    priority: int = 0


def in_time_for(
    batch: Sequence[Handed], now: float, timeout: float
) -> tuple[list[Handed], list[Handed]]:
    """Split ``batch`` (at ``time.monotonic()`` ``now``) into the rows whose claim outlasts
    a publish and a deletion, each within ``timeout``, and the rest. Pure.

    A best effort: past that (a broker reconnecting, a queue of deletions) a claim may
    still lapse first and another relay publish the task again, a duplicate the worker
    absorbs."""
    deadline = now + 2 * timeout + SETTLE_LINGER_S
    in_time = [h for h in batch if h.claimed_until >= deadline]
    late = [h for h in batch if h.claimed_until < deadline]
    return in_time, late


# What a flush may meet while PostgreSQL or RabbitMQ is away: retried after a backoff.
_FLUSH_ERRORS: tuple[type[BaseException], ...] = (DependencyError, *ANY_PG_ERROR)


def described(exc: BaseException) -> str:
    """A flush error as a log line's ``error``, naming the dependency: a bare
    "[Errno 111] Connection refused" does not say whose. Pure."""
    if isinstance(exc, DependencyError):  # ours: they begin with the dependency's name
        return str(exc)[:300]
    return f"PostgreSQL: {type(exc).__name__}: {exc}"[:300]


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: Publisher,
        events: EventSink,
        *,
        dsn: str,
        failpoints: Failpoints,
        batch_size: int = 200,
        poll_s: float = 1.0,
        timeout: float = 5.0,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._events = events
        self._dsn = dsn
        self._failpoints = failpoints
        self._batch_size = batch_size
        self._poll_s = poll_s
        self._timeout = timeout
        self._wake = asyncio.Event()
        # First attempts committed by this process, claimed for it.
        self._handed: list[Handed] = []
        self._handed_ready = asyncio.Event()
        self._published: GroupCommit[int, None] = GroupCommit(
            self._delete_handed, name="outbox-deletes", linger_s=SETTLE_LINGER_S, enough=batch_size
        )
        self._listener: asyncpg.Connection | None = None
        self._listen_retry_at = 0.0
        # This process's key for the rows it claims (``claimed_by``), locked on the
        # LISTEN connection while it is open. Positive: pg_locks shows it as an oid.
        self.owner = secrets.randbelow(2**31 - 1) + 1
        self._owner_locked = False
        self._orphans_checked_at = 0.0
        # True while the broker refuses publishes (queue full, or down): the API
        # stops admitting tasks until a publish goes through again.
        self.refusing = False

    def wake(self) -> None:
        """Ask for a flush now: called in-process right after an outbox commit."""
        self._wake.set()

    def hand_over(self, fresh: Sequence[Handed]) -> None:
        """Publish these first attempts from memory: their outbox rows are committed and
        claimed for this process (see the module's docstring)."""
        if fresh:
            self._handed.extend(fresh)
            self._handed_ready.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set: handed-over rows at once, the others as they
        become due. What was handed over before ``stop`` is still published."""
        try:
            # The poll beats (shared.liveness); the handed-over rows' loop may rightly
            # wait for rows as long as no request comes, so it does not.
            async with asyncio.TaskGroup() as group:
                group.create_task(self._poll(stop), name="relay-poll")
                group.create_task(self._publish_handed(stop), name="relay-handed")
        finally:
            await self._published.aclose()
            # Last: its owner lock says the handed-over rows are being published, and
            # the last of them were, just above.
            if self._listener is not None:
                await self._close_listener()

    def stale_after_s(self) -> float:
        """How long the poll may go without a beat (shared.liveness): a turn waits up
        to poll_s, or a failure's backoff (5 s at most), and makes up to six calls (the
        listener, the orphans, a flush's select, publish and delete, the next due)."""
        return stale_after(max(self._poll_s, 5.0), self._timeout, calls=6)

    def owner_key(self) -> int | None:
        """The key to claim rows with (``claimed_by``) while this relay holds its owner
        lock; None otherwise: rows claimed then wait for their claim to lapse, since
        every relay would take them for a dead process's."""
        listening = self._listener is not None and not self._listener.is_closed()
        return self.owner if self._owner_locked and listening else None

    async def _publish_handed(self, stop: asyncio.Event) -> None:
        stopping = asyncio.create_task(stop.wait(), name="relay-handed-stop-wait")
        try:
            while self._handed or not stop.is_set():
                if not self._handed:
                    ready = asyncio.create_task(self._handed_ready.wait(), name="relay-handed-wait")
                    try:
                        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        ready.cancel()
                    self._handed_ready.clear()
                    continue
                batch = self._handed[: self._batch_size]
                del self._handed[: self._batch_size]
                try:
                    in_time, late = in_time_for(batch, time.monotonic(), self._timeout)
                    if late:
                        await self._release_late(late)
                    await self._publish_claimed(in_time)
                except _FLUSH_ERRORS as exc:
                    # Released or, failing that, left to their claim's lapse: some relay's
                    # poll publishes them. Nothing to retry here.
                    PUBLISH_FAILURES.inc()
                    log.warning("handed-over publish failed", extra={"error": described(exc)})
                    if stop.is_set():
                        # Stopping with the broker or PostgreSQL away: the rest would
                        # fail alike, each after a timeout. Their claims lapse too.
                        log.warning(
                            "handed-over tasks left to other relays",
                            extra={"count": len(self._handed)},
                        )
                        self._handed.clear()
        finally:
            stopping.cancel()

    async def _release_late(self, late: list[Handed]) -> None:
        """Rows queued here too long to be published within their claim: released to
        every relay's poll (the wake-up starts ours), not left claimed until the claim
        lapses."""
        log.warning(
            "handed-over tasks left to the relays' polls: their claim lapses too soon",
            extra={"count": len(late)},
        )
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.execute(_RELEASE_HANDED, [h.row_id for h in late])
        self._wake.set()

    async def _publish_claimed(self, batch: list[Handed]) -> None:
        if not batch:
            return
        await self._failpoints.hit("relay.before_publish")
        result = await self._publisher.publish(
            [Outgoing(message_id=f"{h.task_id}:1", body=h.body, priority=h.priority) for h in batch]
        )
        await self._failpoints.hit("relay.after_confirm")
        done = [h.row_id for h, ok in zip(batch, result.confirmed, strict=True) if ok]
        left = [h.row_id for h, ok in zip(batch, result.confirmed, strict=True) if not ok]
        self._published.add(done)
        if left:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                await conn.execute(_RELEASE_HANDED, left)
            self._wake.set()
        self._account(result, len(batch), len(done))

    async def _delete_handed(self, row_ids: list[int]) -> list[None]:
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                await conn.execute(_DELETE_PUBLISHED, row_ids)
        except ANY_PG_ERROR as exc:
            # Their claims lapse and they are published again: duplicates, absorbed.
            log.warning(
                "published outbox rows not deleted",
                extra={"count": len(row_ids), "error": str(exc)[:300]},
            )
        return [None] * len(row_ids)

    async def _poll(self, stop: asyncio.Event) -> None:
        """Flush until ``stop`` is set; on error, back off and try again."""
        failures = 0
        stopping = asyncio.create_task(stop.wait(), name="relay-stop-wait")
        try:
            while not stop.is_set():
                beat()
                await self._ensure_listener()
                if time.monotonic() >= self._orphans_checked_at + ORPHAN_AFTER_S:
                    self._orphans_checked_at = time.monotonic()
                    try:
                        await self.release_orphans()
                    except ANY_PG_ERROR as exc:
                        log.warning(
                            "rows of processes that died not looked for",
                            extra={"error": described(exc)},
                        )
                try:
                    published = await self.flush_once()
                except _FLUSH_ERRORS as exc:
                    failures += 1
                    PUBLISH_FAILURES.inc()
                    log.warning("outbox relay flush failed", extra={"error": described(exc)})
                    await self._sleep(stopping, min(0.05 * 2**failures, 5.0))
                    continue
                failures = 0
                if published >= self._batch_size:
                    continue  # more may be due right now
                if self._wake.is_set():
                    # New rows were committed meanwhile (the common case under load):
                    # flush again without asking when the next delayed row is due.
                    self._wake.clear()
                    continue
                await self._sleep(stopping, await self._until_next_due())
        finally:
            stopping.cancel()

    async def release_orphans(self) -> int:
        """Release to every relay's poll the handed-over rows of processes that died
        (see the module's docstring); return how many."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            released = await conn.fetch(_RELEASE_ORPHANS, OWNER_LOCK_CLASS, ORPHAN_AFTER_S)
        if released:
            ORPHANS_RELEASED.inc(len(released))
            log.warning(
                "handed-over tasks of a process that died released to the relays",
                extra={"count": len(released)},
            )
        return len(released)

    async def flush_once(self) -> int:
        """Publish one batch of due rows; return how many were published.

        Rows the broker confirmed are deleted even when others of the batch were not:
        those stay for the next flush. Raises DependencyError when any failed."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            promoted = await conn.fetch(_PROMOTE)
        if promoted:
            await self._events.emit(
                [event_from_row(r) for r in promoted],
                backfill=previous_events(promoted),
            )
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self._batch_size)
            if not rows:
                # Nothing left to refuse: what the broker refused went out through
                # another relay, or was handed back. Kept set, it refused every submit
                # here for good (only a full publish of ours cleared it).
                self._set_refusing(False)
                return 0
            await self._failpoints.hit("relay.before_publish")
            result = await self._publisher.publish(
                [
                    Outgoing(
                        message_id=f"{r['task_id']}:{r['attempt']}",
                        body=r["body"],
                        priority=r["priority"],
                    )
                    for r in rows
                ]
            )
            await self._failpoints.hit("relay.after_confirm")
            done = [r["id"] for r, ok in zip(rows, result.confirmed, strict=True) if ok]
            if done:
                await conn.execute(_DELETE_PUBLISHED, done)
        self._account(result, len(rows), len(done))
        return len(rows)

    def _account(self, result: Published, sent: int, done: int) -> None:
        """Count what was confirmed; raise DependencyError when not everything was."""
        PUBLISHED.inc(done)
        # Only the broker's own refusals (nacks: queue at x-max-length) stop the API from
        # admitting; a slow confirm is retried, and an unreachable broker shows in the
        # API's queue-depth samples.
        if result.refused:
            self._set_refusing(True)
        elif done == sent:
            self._set_refusing(False)
        if result.refused or result.failed:
            raise DependencyError(
                f"RabbitMQ did not confirm {sent - done} of {sent} messages "
                f"({result.refused} refused): {result.error}"
            )

    def _set_refusing(self, value: bool) -> None:
        if value != self.refusing:
            self.refusing = value
            BROKER_REFUSING.set(int(value))

    async def _until_next_due(self) -> float:
        """Seconds until the earliest row that is not yet due becomes due, at most poll_s.

        Rows already due are left out: after a flush that took fewer than a batch, those
        are locked by another relay's flush (or were committed since, and their NOTIFY
        or wake-up is on its way). Counting them made every idle relay flush again at
        once for as long as another one held rows: under load, a busy loop of five
        statements per turn in every process. An unlocked row left behind by a relay
        that died is still found by the poll."""
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                due: float | None = await conn.fetchval(
                    "SELECT extract(epoch FROM min(available_at) - now()) FROM outbox"
                    " WHERE available_at > now()"
                )
        except ANY_PG_ERROR:
            return self._poll_s
        if due is None:
            return self._poll_s
        return max(0.0, min(self._poll_s, float(due)))

    async def _sleep(self, stopping: asyncio.Task[bool], seconds: float) -> None:
        """Wait for a wake-up, a NOTIFY, ``stop`` or the timeout, whichever comes first."""
        if self._wake.is_set():
            self._wake.clear()
            return
        waker = asyncio.create_task(self._wake.wait(), name="relay-wake-wait")
        try:
            await asyncio.wait(
                {waker, stopping}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waker.cancel()
        self._wake.clear()

    async def _ensure_listener(self) -> None:
        """Keep a LISTEN connection open, holding the owner lock; without it the relay
        still polls every poll_s."""
        if self._listener is not None and not self._listener.is_closed():
            if not self._owner_locked and time.monotonic() >= self._listen_retry_at:
                await self._lock_owner(self._listener)
            return
        self._owner_locked = False
        # Not again until poll_s after a failure: this runs before every flush, and a
        # PostgreSQL at its connection limit got a new attempt from every relay per flush.
        if time.monotonic() < self._listen_retry_at:
            return
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(
                self._dsn, timeout=self._timeout, server_settings=_LISTENER_KEEPALIVE
            )
            # Bounded: its LISTEN has no timeout of its own, and a silent network would
            # hang the relay's poll (taken for hung, shared.liveness).
            await asyncio.wait_for(
                conn.add_listener(NOTIFY_CHANNEL, self._on_notify), self._timeout
            )
        except ANY_PG_ERROR as exc:  # a timeout among them
            log.debug("outbox LISTEN unavailable", extra={"error": str(exc)})
            if conn is not None:
                conn.terminate()  # connected, but not listening: not left open
            self._listener = None
            self._listen_retry_at = time.monotonic() + self._poll_s
            return
        self._listener = conn
        await self._lock_owner(conn)

    async def _lock_owner(self, conn: asyncpg.Connection) -> None:
        """Take the owner lock, held while ``conn`` lives (see release_orphans). Not got
        (the key held by another process, or by this one's previous session that the
        server has not yet found closed): tried again after poll_s, and meanwhile rows
        are claimed with no key."""
        try:
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)",
                OWNER_LOCK_CLASS,
                self.owner,
                timeout=self._timeout,
            )
        except ANY_PG_ERROR as exc:  # a timeout among them
            log.debug("owner lock not taken", extra={"error": str(exc)})
            got = False
        self._owner_locked = bool(got)
        if not got:
            self._listen_retry_at = time.monotonic() + self._poll_s

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    async def _close_listener(self) -> None:
        assert self._listener is not None
        try:
            await asyncio.wait_for(self._listener.close(), self._timeout)
        except ANY_PG_ERROR:
            self._listener.terminate()
        self._listener = None
