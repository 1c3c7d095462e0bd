"""Back pressure: the backlog (the ready messages of both task queues, the normal and
the high lane, and the outbox rows due to join them), sampled a few times a second
(never per request), and the drain rate measured from it, so a refusal can say when to
come back; and the store of delayed work (the outbox rows not yet due), sampled less
often."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterator

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import AMQPError
from prometheus_client import Gauge

from shared import outbox
from shared.db import ANY_PG_ERROR
from shared.liveness import beat
from shared.wire import Wire

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge(
    "longhaul_api_queue_depth", "Ready messages in the task queues, both lanes (sampled)"
)
SAMPLE_AGE = Gauge(
    "longhaul_api_queue_depth_age_seconds",
    "Seconds since the queue depth was last sampled: the gauges above keep their last"
    " value while the broker is unreachable, and this grows",
)
OUTBOX_DUE = Gauge("longhaul_api_outbox_due", "Outbox rows due, not yet published (sampled)")
DRAIN_RATE = Gauge("longhaul_api_drain_rate", "Measured messages/s leaving the backlog")
OUTBOX_DELAYED = Gauge(
    "longhaul_api_outbox_delayed",
    "Outbox rows not yet due: delayed tasks and retries in their backoff (sampled, capped)",
)

# How often the outbox rows not yet due are counted. That count reads as many rows as
# are delayed, up to the limit (some 15-25 ms for 100,000), where the due count reads
# the few the relay has yet to publish: not at every depth sample. A count a second old
# costs little: this process's own admissions are in the ledger until a count sees
# them; what it misses is the rows come due since (it refuses a little longer) and
# other API processes' admissions of the last second (the limit bounds storage, not
# latency: a small overshoot harms nothing).
DELAYED_INTERVAL_S = 1.0


class DrainEstimator:
    """Estimates how fast the queue drains from successive depth samples. Pure.

    A falling depth is a lower bound of the consumption rate (publishes hide some of
    it), which errs on the side of a longer Retry-After."""

    def __init__(self, smoothing: float = 0.3, floor: float = 1.0) -> None:
        self._smoothing = smoothing
        self._floor = floor
        self._last: tuple[float, int] | None = None
        self.rate = floor

    def sample(self, now: float, depth: int) -> None:
        if self._last is not None:
            then, before = self._last
            elapsed = now - then
            if elapsed > 0 and depth < before:
                observed = (before - depth) / elapsed
                self.rate = max(
                    self._floor, self._smoothing * observed + (1 - self._smoothing) * self.rate
                )
        self._last = (now, depth)

    def retry_after(self, depth: int, limit: int, cap_s: int = 60) -> int:
        """Seconds until the queue should be back under ``limit`` at the measured rate."""
        excess = max(1, depth - limit + 1)
        return max(1, min(cap_s, math.ceil(excess / self.rate)))


class AdmissionLedger:
    """The tasks this process admitted that the last sample may not count yet. Pure.

    An admission is pending until its transaction ends, then committed at that moment;
    a sample counts it once the sample's outbox count began after the commit: the row
    is then in the outbox or, published, in the queue (or in both, counted twice for a
    moment, which errs on the side of refusing). No guess of how long a publish takes."""

    def __init__(self) -> None:
        self._pending = 0
        self._committed: deque[tuple[float, int]] = deque()
        self._committed_total = 0

    @property
    def unseen(self) -> int:
        return self._pending + self._committed_total

    def begin(self, count: int) -> None:
        self._pending += count

    def end(self, count: int, committed_at: float | None) -> None:
        """The admission's transaction ended: committed at ``committed_at``, or not (None)."""
        self._pending -= count
        if committed_at is not None and count:
            self._committed.append((committed_at, count))
            self._committed_total += count

    def seen_by(self, sample_started: float) -> None:
        """Forget the admissions committed before a sample that started at this moment."""
        while self._committed and self._committed[0][0] < sample_started:
            self._committed_total -= self._committed.popleft()[1]


class QueueMonitor:
    """Samples the backlog: the outbox rows due (one count) and then the task queues'
    depth, both lanes' (passive declares on the monitor's own channel). In that order a
    row the relay moves between the two is counted twice, never missed. Every
    ``DELAYED_INTERVAL_S`` it also counts the outbox rows not yet due."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        pool: asyncpg.Pool,
        wire: Wire,
        *,
        limit: int,
        delayed_limit: int,
        interval_s: float,
        timeout: float,
    ) -> None:
        self._connection = connection
        self._pool = pool
        self._limit = limit
        self._delayed_limit = delayed_limit
        self._delayed_interval = max(interval_s, DELAYED_INTERVAL_S)
        self._delayed_next = 0.0
        self._wire = wire
        self._interval = interval_s
        self._timeout = timeout
        self._channel: AbstractChannel | None = None
        self._queues: list[AbstractQueue] = []
        self.depth = 0
        self.outbox_due = 0
        # When the last sample succeeded: a stale sample means the broker is unreachable.
        self.sampled_at = 0.0
        self.delayed = 0
        self.estimator = DrainEstimator()
        self.ledger = AdmissionLedger()
        # The delayed tasks admitted here that the last count of rows not yet due may
        # miss (the ledger above counts them too, as part of the admission).
        self.delayed_ledger = AdmissionLedger()
        # Computed at each scrape, not kept up by the loop: a loop stuck in a sample
        # still shows its age.
        SAMPLE_AGE.set_function(lambda: time.monotonic() - self.sampled_at)

    def fresh(self, max_age_s: float) -> bool:
        return time.monotonic() - self.sampled_at <= max_age_s

    @contextlib.contextmanager
    def admitting(self, count: int = 1, delayed: int = 0) -> Iterator[None]:
        """Count ``count`` tasks admitted, ``delayed`` of them with a delay, around the
        transaction that stores them: until a sample sees them, a burst between two
        samples would otherwise overshoot the limit by all it sends in one interval."""
        self.ledger.begin(count)
        self.delayed_ledger.begin(delayed)
        committed_at: float | None = None
        try:
            yield
            committed_at = time.monotonic()
        finally:
            self.ledger.end(count, committed_at)
            self.delayed_ledger.end(delayed, committed_at)

    @property
    def estimated_depth(self) -> int:
        """What to compare with the limit: the sampled backlog plus the tasks admitted
        here that the sample may not have counted yet."""
        return self.depth + self.outbox_due + self.ledger.unseen

    @property
    def estimated_delayed(self) -> int:
        """What to compare with the delayed limit: the outbox rows not yet due at the
        last count plus the delayed tasks admitted here that it may not have counted."""
        return self.delayed + self.delayed_ledger.unseen

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            beat()
            try:
                await asyncio.wait_for(self._sample(), self._timeout)
            except (AMQPError, OSError, TimeoutError, RuntimeError) as exc:
                log.debug("queue depth sample failed", extra={"error": repr(exc)})
                await self._drop_channel()
            # Apart from the depth's sample: a slow count must not make it stale.
            if time.monotonic() >= self._delayed_next:
                await self._sample_delayed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

    async def _sample(self) -> None:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
            self._queues = []
        if not self._queues:
            self._queues = [
                await self._channel.declare_queue(name, passive=True)
                for name in self._wire.task_queues
            ]
        started = time.monotonic()
        # A bound of its own, shorter than the sample's: a PostgreSQL that hangs must not
        # cost the queue's depth, nor read as a broker that is away.
        outbox_due = await self._count_outbox(self._timeout / 2)
        # Declare again on every sample: aio-pika's robust channel answers a repeated
        # passive declare_queue() from its cache, with the count of the first one.
        depth = 0
        for queue in self._queues:
            result = await queue.declare(timeout=self._timeout)
            depth += int(result.message_count or 0)
        now = time.monotonic()
        # Both counts are taken together or not at all: a new outbox count beside an old
        # depth would miss the rows the relay moved into the queue in between. With the
        # old outbox count those are counted twice, and nothing committed since is taken
        # as seen.
        if outbox_due is not None:
            self.outbox_due = outbox_due
            self.ledger.seen_by(started)
        self.depth, self.sampled_at = depth, now
        self.estimator.sample(now, depth + self.outbox_due)
        QUEUE_DEPTH.set(depth)
        OUTBOX_DUE.set(self.outbox_due)
        DRAIN_RATE.set(self.estimator.rate)

    async def _count_outbox(self, timeout: float) -> int | None:
        """The outbox rows due (counted up to what refuses anyway), or None when
        PostgreSQL did not answer in time."""
        try:
            async with asyncio.timeout(timeout), self._pool.acquire() as conn:
                return await outbox.due_count(conn, cap=self._limit + 1)
        except ANY_PG_ERROR as exc:
            log.debug("outbox count failed", extra={"error": repr(exc)})
            return None

    async def _sample_delayed(self) -> None:
        """Count the outbox rows not yet due (up to what refuses anyway); on a failure
        keep the last count, and the admissions since in the ledger, until the next."""
        started = time.monotonic()
        self._delayed_next = started + self._delayed_interval
        try:
            # Bounded like the due count: a PostgreSQL that hangs delays the next depth
            # sample by no more than that.
            async with asyncio.timeout(self._timeout / 2), self._pool.acquire() as conn:
                delayed = await outbox.delayed_count(conn, cap=self._delayed_limit + 1)
        except ANY_PG_ERROR as exc:
            log.debug("delayed outbox count failed", extra={"error": repr(exc)})
            return
        self.delayed = delayed
        self.delayed_ledger.seen_by(started)
        OUTBOX_DELAYED.set(delayed)

    async def _drop_channel(self) -> None:
        """After a failed sample: close the channel (a new one next time), not leak it."""
        channel, self._channel, self._queues = self._channel, None, []
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(AMQPError, OSError, TimeoutError, RuntimeError):
                await asyncio.wait_for(channel.close(), self._timeout)
