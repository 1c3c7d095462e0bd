"""Back pressure: the queue depth, sampled a few times a second (never per request),
and the drain rate measured from it, so a refusal can say when to come back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque

from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from aio_pika.exceptions import AMQPError
from prometheus_client import Gauge

from shared.wire import Wire

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("longhaul_api_queue_depth", "Ready messages in the task queue (sampled)")
DRAIN_RATE = Gauge("longhaul_api_drain_rate", "Measured messages/s leaving the task queue")

# How long an admitted task may take to reach the queue (the insert, the relay's claim,
# the publish and its confirm): a sample started sooner after it may not count it yet.
_IN_FLIGHT_S = 0.1


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


class QueueMonitor:
    """Samples the depth of the task queue with a passive declare on its own channel."""

    def __init__(
        self, connection: AbstractRobustConnection, wire: Wire, interval_s: float, timeout: float
    ) -> None:
        self._connection = connection
        self._wire = wire
        self._interval = interval_s
        self._timeout = timeout
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self.depth = 0
        # When the last sample succeeded: a stale sample means the broker is unreachable.
        self.sampled_at = 0.0
        self.estimator = DrainEstimator()
        # Tasks admitted by this process that the last sample may not count yet.
        self._recent: deque[tuple[float, int]] = deque()
        self._recent_total = 0

    def fresh(self, max_age_s: float) -> bool:
        return time.monotonic() - self.sampled_at <= max_age_s

    def admitted(self, count: int = 1) -> None:
        """Count tasks this process admitted: until a sample sees them, a burst between
        two samples would otherwise overshoot the limit by all it sends in one interval."""
        self._recent.append((time.monotonic(), count))
        self._recent_total += count

    @property
    def estimated_depth(self) -> int:
        """What to compare with the limit: the sampled depth plus the tasks admitted
        here that the sample may not have counted yet."""
        return self.depth + self._recent_total

    def _counted_until(self, when: float) -> None:
        """Forget admissions the broker had counted by a sample started at ``when``."""
        while self._recent and self._recent[0][0] < when - _IN_FLIGHT_S:
            self._recent_total -= self._recent.popleft()[1]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(self._sample(), self._timeout)
            except (AMQPError, OSError, TimeoutError, RuntimeError) as exc:
                log.debug("queue depth sample failed", extra={"error": repr(exc)})
                self._channel = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)

    async def _sample(self) -> None:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
            self._queue = None
        if self._queue is None:
            self._queue = await self._channel.declare_queue(self._wire.tasks_queue, passive=True)
        # Declare again on every sample: aio-pika's robust channel answers a repeated
        # passive declare_queue() from its cache, with the count of the first one.
        started = time.monotonic()
        result = await self._queue.declare(timeout=self._timeout)
        depth = int(result.message_count or 0)
        now = time.monotonic()
        self.estimator.sample(now, depth)
        self.depth, self.sampled_at = depth, now
        self._counted_until(started)
        QUEUE_DEPTH.set(depth)
        DRAIN_RATE.set(self.estimator.rate)
