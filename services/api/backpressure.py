"""Back pressure: the queue depth, sampled a few times a second (never per request),
and the drain rate measured from it, so a refusal can say when to come back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.exceptions import AMQPError
from prometheus_client import Gauge

from shared.wire import Wire

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("longhaul_api_queue_depth", "Ready messages in the task queue (sampled)")
DRAIN_RATE = Gauge("longhaul_api_drain_rate", "Measured messages/s leaving the task queue")


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
        self.depth = 0
        # When the last sample succeeded: a stale sample means the broker is unreachable.
        self.sampled_at = 0.0
        self.estimator = DrainEstimator()

    def fresh(self, max_age_s: float) -> bool:
        return time.monotonic() - self.sampled_at <= max_age_s

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
        queue = await self._channel.declare_queue(self._wire.tasks_queue, passive=True)
        depth = int(queue.declaration_result.message_count or 0)
        now = time.monotonic()
        self.estimator.sample(now, depth)
        self.depth, self.sampled_at = depth, now
        QUEUE_DEPTH.set(depth)
        DRAIN_RATE.set(self.estimator.rate)
