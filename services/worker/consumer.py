"""Consumes the task queue: one asyncio task per delivery (prefetch bounds how many),
acked only after the runner committed the outcome.

Draining: cancel the consumer so the broker sends no more, let running tasks finish
within the grace period, hand back the rest, then give up on any that still hang."""

from __future__ import annotations

import asyncio
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


class Consumer:
    def __init__(self, queue: AbstractQueue, runner: Runner) -> None:
        self._queue = queue
        self._runner = runner
        self._tag: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)

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
                await self._queue.cancel(self._tag)
            except (AMQPError, aiormq.exceptions.ChannelInvalidStateError, RuntimeError) as exc:
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
