"""Priorities with real processes, RabbitMQ and PostgreSQL: a task of priority
HIGH_PRIORITY or above travels in the high lane, on every path that publishes it, and a
worker starts it before the normal tasks that wait."""

from __future__ import annotations

import aio_pika

from services.api.backpressure import QueueMonitor
from services.api.repository import ApiRepository, NewTask
from shared import amqp, outbox
from shared.ids import uuid7
from shared.schemas import TaskRequest
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


async def test_every_outbox_row_carries_its_tasks_priority(isolated: Isolated) -> None:
    """The API's insert and every later outbox.enqueue (retries, pass-ons, requeues,
    reruns and redrives all go through it) copy the task's priority into the row."""
    db = isolated.db
    tasks = [
        NewTask(id=uuid7(), request=TaskRequest(type="demo.noop", priority=priority))
        for priority in (0, 4, 5, 9)
    ]
    await ApiRepository(db, timeout=10).insert(isolated.tenant.id, tasks)
    ids = [t.id for t in tasks]
    first = await db.fetch(
        "SELECT task_id, priority FROM outbox WHERE task_id = ANY($1::uuid[])", ids
    )
    assert {r["task_id"]: r["priority"] for r in first} == {t.id: t.request.priority for t in tasks}
    await db.execute("DELETE FROM outbox WHERE task_id = ANY($1::uuid[])", ids)
    async with db.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT {outbox.MESSAGE_COLUMNS} FROM tasks WHERE id = ANY($1::uuid[])", ids
        )
        await outbox.enqueue(conn, [outbox.next_attempt(r) for r in rows])
    later = await db.fetch(
        "SELECT task_id, attempt, priority FROM outbox WHERE task_id = ANY($1::uuid[])", ids
    )
    assert {r["task_id"]: (r["attempt"], r["priority"]) for r in later} == {
        t.id: (1, t.request.priority) for t in tasks
    }
