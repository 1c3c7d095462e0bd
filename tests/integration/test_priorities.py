"""Priorities with real processes, RabbitMQ and PostgreSQL: a task of priority
HIGH_PRIORITY or above travels in the high lane, on every path that publishes it, and a
worker starts it before the normal tasks that wait."""

from __future__ import annotations

import aio_pika

from services.api.backpressure import QueueMonitor
from shared import amqp
from shared.settings import CommonSettings
from tests.conftest import Isolated
from tests.support import eventually


async def test_back_pressure_counts_both_lanes(isolated: Isolated) -> None:
    """The API's backlog sample adds the high lane's ready messages to the normal one's."""
    deployment = isolated.deployment
    wire = deployment.wire
    settings = CommonSettings(namespace=deployment.namespace)
    connection = await aio_pika.connect_robust(deployment.amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        topology = await amqp.declare(channel, settings, wire)
        for routing_key, count in ((wire.tasks_routing_key, 2), (wire.high_tasks_routing_key, 3)):
            for _ in range(count):
                await topology.exchange.publish(aio_pika.Message(b"{}"), routing_key=routing_key)
        monitor = QueueMonitor(
            connection, isolated.db, wire, limit=100, interval_s=0.05, timeout=10
        )

        async def sampled() -> int:
            await monitor._sample()
            return monitor.depth if monitor.depth == 5 else 0

        assert await eventually(sampled, within=10, what="both lanes counted") == 5
    finally:
        await connection.close()
