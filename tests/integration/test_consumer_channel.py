"""The worker's consumer against the real RabbitMQ: deliveries come straight from
aiormq's channel, not through aio-pika's wrapper, and still arrive after the robust
channel restored the consumer (with aio-pika's wrapper), until the watch puts the
direct path back. Checks what services/worker/consumer.py relies on in both libraries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aio_pika
import aiormq
import pytest

from services.worker.consumer import Consumer
from tests.conftest import Deployment
from tests.support import eventually, until, watched_until


class _Recording:
    """A runner that records what it is given."""

    def __init__(self) -> None:
        self.running: dict[Any, Any] = {}
        self.given: list[tuple[bytes, dict[str, Any]]] = []

    async def process(self, body: bytes, headers: Mapping[str, Any]) -> None:
        self.given.append((body, dict(headers)))


@pytest.fixture
async def connection(
    fresh_namespace: Deployment,
) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(fresh_namespace.amqp_url, timeout=10)
    try:
        yield connection
    finally:
        await connection.close()


async def _underlay(channel: aio_pika.abc.AbstractChannel) -> aiormq.Channel:
    underlay = await asyncio.wait_for(channel.get_underlay_channel(), 10)
    assert isinstance(underlay, aiormq.Channel)
    return underlay


async def test_deliveries_skip_aio_pikas_wrapper_and_survive_a_restore(
    connection: aio_pika.abc.AbstractRobustConnection, fresh_namespace: Deployment
) -> None:
    consumed = await connection.channel()
    await consumed.set_qos(prefetch_count=8)
    # Exclusive: gone with the connection, whatever the test does.
    queue = await consumed.declare_queue(f"{fresh_namespace.namespace}.direct", exclusive=True)
    runner = _Recording()
    consumer = Consumer(queue, runner, timeout=5, prefetch=8)  # type: ignore[arg-type]
    publisher = await connection.channel()

    async def send(body: bytes) -> None:
        message = aio_pika.Message(body, headers={"sent": body.decode()})
        await publisher.default_exchange.publish(message, routing_key=queue.name)

    def bodies() -> list[bytes]:
        return [body for body, _ in runner.given]

    await consumer.start()
    first = await _underlay(consumed)
    [tag] = first.consumers
    direct = first.consumers[tag]
    assert direct is consumer._lanes[0].direct  # not aio-pika's wrapper
    await send(b"one")
    await eventually(until(lambda: bodies() == [b"one"]), within=10, what="the first delivery")
    assert runner.given[0][1] == {"sent": "one"}

    # The broker closes the channel (a channel error); the robust channel opens another
    # and consumes again, with aio-pika's wrapper.
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await first.basic_publish(b"", exchange=f"{fresh_namespace.namespace}.missing")

    async def restored() -> bool:
        underlay = await _underlay(consumed)
        return underlay is not first and tag in underlay.consumers

    await eventually(restored, within=10, what="the consumer restored on a new channel")
    second = await _underlay(consumed)
    assert second.consumers[tag] is not direct
    await send(b"two")
    await eventually(until(lambda: bodies() == [b"one", b"two"]), within=10, what="restored path")

    await watched_until(
        consumer, until(lambda: second.consumers[tag] is direct), within=10, what="direct again"
    )
    await send(b"three")
    await eventually(until(lambda: len(runner.given) == 3), within=10, what="the third delivery")
    assert runner.given[2] == (b"three", {"sent": "three"})
    await consumer.drain(grace_s=5, handback_s=1)
    # Every delivery was acked: closing the channel returns none to the queue.
    await consumed.close()
    left = await publisher.declare_queue(queue.name, passive=True)
    assert left.declaration_result.message_count == 0
