"""RabbitMQ plumbing: connecting, declaring the topology, publishing with confirms.

The topology: a durable direct exchange routes task messages to one durable quorum
queue. The queue dead-letters crash loops (past ``x-delivery-limit``) at least once to
the dead-letter queue, and refuses publishes past ``x-max-length`` (``reject-publish``,
which at-least-once dead-lettering requires anyway): a nack the relay sees, never a
silently dropped message."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError
from pamqp.commands import Basic

from shared.settings import CommonSettings
from shared.wire import Wire


async def connect(url: str, name: str, timeout: float) -> AbstractRobustConnection:
    """A robust connection named after its process, so the broker's UI tells who is who."""
    return await aio_pika.connect_robust(
        url, timeout=timeout, client_properties={"connection_name": name}
    )


async def close(connection: AbstractRobustConnection, timeout: float) -> None:
    """Close within ``timeout``: a connection to a broker that is down may never answer."""
    with contextlib.suppress(AMQPError, OSError, RuntimeError, TimeoutError):
        await asyncio.wait_for(connection.close(), timeout)


def task_queue_arguments(settings: CommonSettings, wire: Wire) -> dict[str, Any]:
    """Every declarer must pass identical arguments, or the broker refuses the declare."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": settings.delivery_limit,
        "x-dead-letter-exchange": wire.dead_letter_exchange,
        "x-dead-letter-routing-key": wire.dead_letter_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-max-length": settings.queue_max_length,
    }


@dataclass(frozen=True)
class Topology:
    exchange: AbstractExchange
    queue: AbstractQueue
    dead_letters: AbstractQueue


async def declare(channel: AbstractChannel, settings: CommonSettings, wire: Wire) -> Topology:
    """Declare (idempotently) every exchange and queue Longhaul uses."""
    dlx = await channel.declare_exchange(
        wire.dead_letter_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dead = await channel.declare_queue(
        wire.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead.bind(dlx, routing_key=wire.dead_letter_queue)
    exchange = await channel.declare_exchange(
        wire.tasks_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(
        wire.tasks_queue, durable=True, arguments=task_queue_arguments(settings, wire)
    )
    await queue.bind(exchange, routing_key=wire.tasks_routing_key)
    return Topology(exchange=exchange, queue=queue, dead_letters=dead)


_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


@dataclass(frozen=True)
class Outgoing:
    message_id: str
    body: bytes
    trace_id: str | None = None


@dataclass(frozen=True)
class Published:
    """What became of a batch: which messages the broker confirmed, and why not others."""

    confirmed: list[bool]
    # Nacked or returned: the broker is refusing (queue full, no route).
    refused: int = 0
    # No confirm in time, or no channel: the broker is slow or unreachable.
    failed: int = 0
    error: str | None = None


class Publisher:
    """Publishes persistent messages with confirms; a batch is pipelined, not sent one
    round trip at a time, and bounded by one timeout for the whole batch."""

    def __init__(
        self, channel: AbstractChannel, exchange: str, routing_key: str, timeout: float
    ) -> None:
        # A channel opened with publisher confirms and on_return_raises.
        self._channel = channel
        self._exchange = exchange
        self._routing_key = routing_key
        self._timeout = timeout

    async def publish(self, batch: Sequence[Outgoing]) -> Published:
        tasks = [asyncio.create_task(self._publish_one(item), name="publish") for item in batch]
        # One bound for the batch: it also covers a publish that would wait forever on
        # a connection being restored.
        _, pending = await asyncio.wait(tasks, timeout=self._timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        confirmed, refused, failed, error = [], 0, 0, None
        for task in tasks:
            exc = None if task.cancelled() else task.exception()
            ok = not task.cancelled() and exc is None
            confirmed.append(ok)
            if ok:
                continue
            if isinstance(exc, aio_pika.exceptions.DeliveryError):
                refused += 1
            else:
                failed += 1
            error = error or (f"{type(exc).__name__}: {exc}" if exc else "no confirm in time")
        return Published(confirmed, refused, failed, error)

    async def _publish_one(self, item: Outgoing) -> None:
        # Straight to the channel underneath, with the frame's properties built here:
        # aio-pika's Message sets every property through a locked __setattr__ and then
        # copies them into these, a quarter of a relay's publishing CPU. The channel was
        # opened with on_return_raises, so an unroutable message still raises.
        if self._channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the publishing channel is closed")
        channel = await self._channel.get_underlay_channel()
        await channel.basic_publish(
            item.body,
            exchange=self._exchange,
            routing_key=self._routing_key,
            properties=Basic.Properties(
                content_type="application/json",
                delivery_mode=_PERSISTENT,
                message_id=item.message_id,
                correlation_id=item.trace_id,
            ),
            mandatory=True,
        )
