"""Consumes the task queue: one asyncio task per delivery (prefetch bounds how many),
acked only after the runner committed the outcome.

Draining: cancel the consumer so the broker sends no more, let running tasks finish
within the grace period, hand back the rest, then give up on any that still hang."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError
from prometheus_client import Counter, Gauge

from services.worker.runner import Runner, StopReason

log = logging.getLogger(__name__)

DELIVERIES = Counter("longhaul_worker_deliveries_total", "Task messages delivered to this worker")
ACK_FAILURES = Counter(
    "longhaul_worker_ack_failures_total",
    "Acks that failed (stale channel); the redelivery is absorbed",
)
IN_FLIGHT = Gauge("longhaul_worker_in_flight", "Deliveries being processed")
CONSUMING = Gauge("longhaul_worker_consuming", "1 while the broker delivers to this worker")


class Consumer:
    def __init__(self, queue: AbstractQueue, runner: Runner, timeout: float) -> None:
        self._queue = queue
        self._runner = runner
        self._timeout = timeout
        self._tag: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)

    async def consuming(self) -> bool:
        """Whether the broker still delivers to our consumer on the current channel."""
        if self._tag is None:
            return False
        try:
            underlay = await self._queue.channel.get_underlay_channel()
        except aiormq.exceptions.ChannelInvalidStateError:
            return False  # reconnecting: the robust channel restores the consumer
        consumers: dict[str, object] = getattr(underlay, "consumers", {})  # aiormq.Channel
        return self._tag in consumers

    async def watch(self, stop: asyncio.Event, interval_s: float = 5.0) -> None:
        """Consume again if the consumer is gone while the channel is up.

        The robust connection restores consumers after a reconnect, but not after the
        broker cancels one (a deleted queue, a quorum leader that went away, aio-pika
        issue 231 after some restarts). Two misses in a row are required: right after a
        reconnect the restore may simply not have run yet, and consuming twice with one
        tag would close the channel."""
        missed = False
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if stop.is_set() or self._tag is None:
                return
            if await self.consuming():
                missed = False
                CONSUMING.set(1)
                continue
            CONSUMING.set(0)
            if not missed:
                missed = True
                continue
            try:
                await self._queue.consume(self._on_message, consumer_tag=self._tag)
            except (AMQPError, aiormq.exceptions.ChannelInvalidStateError, RuntimeError) as exc:
                log.warning("could not consume again; will retry", extra={"error": repr(exc)})
                continue
            log.warning("the broker had dropped our consumer; consuming again")
            missed = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        DELIVERIES.inc()
        task = asyncio.create_task(self._handle(message), name=f"delivery-{message.delivery_tag}")
        self._tasks.add(task)
        IN_FLIGHT.set(len(self._tasks))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        IN_FLIGHT.set(len(self._tasks))

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._runner.process(message.body, message.headers or {})
        except asyncio.CancelledError:
            # Stopping: not acked, so the broker redelivers it when the channel closes.
            raise
        except Exception:
            # A bug, not a task failure: requeue; a message that keeps crashing us is
            # dead-lettered by the queue's delivery limit.
            log.exception("processing failed unexpectedly; requeueing the message")
            await self._settle(message, ack=False)
            return
        await self._settle(message, ack=True)

    async def _settle(self, message: AbstractIncomingMessage, *, ack: bool) -> None:
        try:
            if ack:
                await message.ack()
            else:
                await message.nack(requeue=True)
        except (AMQPError, aiormq.exceptions.ChannelInvalidStateError, RuntimeError) as exc:
            # The channel this came on is gone (broker restart): the broker redelivers
            # the message on a new channel, and the runner absorbs the duplicate.
            ACK_FAILURES.inc()
            log.info(
                "could not settle a delivery; its redelivery will be absorbed",
                extra={"error": repr(exc)},
            )

    async def drain(self, grace_s: float, handback_s: float) -> None:
        """Stop taking work and let what runs finish, hand it back or give it up."""
        if self._tag is not None:
            try:
                # Bounded: while the broker is down the robust channel would wait for
                # the reconnect forever, and a stopping worker must still stop.
                await asyncio.wait_for(self._queue.cancel(self._tag), self._timeout)
            except (
                AMQPError,
                aiormq.exceptions.ChannelInvalidStateError,
                RuntimeError,
                TimeoutError,
            ) as exc:
                log.info(
                    "consumer cancel failed; closing the channel stops it",
                    extra={"error": repr(exc)},
                )
            self._tag = None
        if self._tasks:
            log.info("draining", extra={"in_flight": len(self._tasks), "grace_s": grace_s})
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        if self._tasks:
            for running in list(self._runner.running.values()):
                running.stop(StopReason.SHUTDOWN)
            await asyncio.wait(set(self._tasks), timeout=handback_s)
        for task in set(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
