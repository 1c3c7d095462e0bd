"""Priorities against the real RabbitMQ and PostgreSQL (the API and the worker as
processes): a task of priority HIGH_PRIORITY or above travels in the high lane, on every
path that publishes it, a worker starts it before the normal tasks that wait, and back
pressure counts both lanes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import aio_pika
import aiohttp
import pytest

from services.api.backpressure import QueueMonitor
from services.api.repository import ApiRepository, NewTask
from services.worker.repository import WorkerRepository
from shared import amqp, outbox
from shared.ids import uuid7
from shared.schemas import TaskMessage, TaskRequest, parse_task_message
from shared.settings import CommonSettings
from shared.wire import HIGH_PRIORITY
from tests.conftest import Isolated
from tests.support import System, eventually, register_task_types


async def _submit(
    http: aiohttp.ClientSession, system: System, isolated: Isolated, **body: Any
) -> UUID:
    url = f"{system.api_url}/v1/tasks"
    async with http.post(url, json=body, headers=isolated.tenant.headers) as r:
        assert r.status == 202, await r.text()
        return UUID((await r.json())["id"])


@pytest.fixture
async def amqp_channel(isolated: Isolated) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(isolated.deployment.amqp_url, timeout=10)
    yield await connection.channel()
    await connection.close()


async def _backlog_then_high(
    isolated: Isolated, http: aiohttp.ClientSession, system: System, n: int, seconds: float
) -> tuple[list[UUID], UUID]:
    """``n`` normal demo.sleep tasks of ``seconds``, then, once the first runs, one of
    priority 9 (0.01 s); returns when all succeeded: (the normal ones, the high one)."""
    normal = [
        await _submit(http, system, isolated, type="demo.sleep", args={"seconds": seconds})
        for _ in range(n)
    ]

    async def one_started() -> bool:
        started = await isolated.db.fetchval(
            "SELECT count(started_at) FROM tasks WHERE id = ANY($1::uuid[])", normal
        )
        return bool(started)

    await eventually(one_started, within=30, what="the backlog to start running")
    high = await _submit(
        http, system, isolated, type="demo.sleep", args={"seconds": 0.01}, priority=9
    )

    async def all_done() -> bool:
        done = await isolated.db.fetchval(
            "SELECT count(*) FROM tasks WHERE state = 'succeeded' AND id = ANY($1::uuid[])",
            [*normal, high],
        )
        return bool(done == n + 1)

    await eventually(all_done, within=60, what="every task to succeed")
    return normal, high


async def test_a_high_priority_task_starts_before_the_waiting_normal_ones(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """A worker of concurrency 1 with a backlog of normal tasks submitted first: a task
    of priority 9 submitted last waits only for the running task, not for the backlog
    (no reserved slot: the shared slot's order alone)."""
    system = System(isolated.deployment.env(worker_concurrency="1", worker_high_reserved="0"))
    try:
        await system.start_worker()
        await system.start_api()
        normal, high = await _backlog_then_high(isolated, http, system, 8, 0.3)
        high_row = await isolated.db.fetchrow(
            "SELECT created_at, started_at FROM tasks WHERE id = $1", high
        )
        # The normal tasks that had not started when the high one was accepted.
        waiting = await isolated.db.fetch(
            "SELECT started_at FROM tasks WHERE id = ANY($1::uuid[]) AND started_at > $2",
            normal,
            high_row["created_at"],
        )
        assert len(waiting) >= 5, "the backlog drained before the high task came"
        # At most one of them (a delivery already on its way to the free slot) starts
        # before it; without lanes, all of them would.
        before = [r for r in waiting if r["started_at"] < high_row["started_at"]]
        assert len(before) <= 1, (len(before), len(waiting))
    finally:
        system.stop()


async def test_a_high_priority_task_runs_in_the_reserve_beside_a_busy_normal_lane(
    isolated: Isolated, http: aiohttp.ClientSession
) -> None:
    """A worker of concurrency 1 and one reserved slot, its slot taken by a long normal
    task and another waiting: a priority-9 task starts at once in the reserved slot and
    ends before the long one, while the waiting normal task never takes the reserve."""
    system = System(isolated.deployment.env(worker_concurrency="1", worker_high_reserved="1"))
    try:
        await system.start_worker()
        await system.start_api()
        normal, high = await _backlog_then_high(isolated, http, system, 2, 2.0)
        rows = {
            r["id"]: r
            for r in await isolated.db.fetch(
                "SELECT id, started_at, finished_at FROM tasks WHERE id = ANY($1::uuid[])",
                [*normal, high],
            )
        }
        first, second = rows[normal[0]], rows[normal[1]]
        # Without the reserve it would wait for the first normal task to end.
        assert rows[high]["finished_at"] < first["finished_at"]
        # The reserve was free all along, yet the second normal task waited for the slot.
        assert second["started_at"] >= first["finished_at"]
    finally:
        system.stop()


async def _next_message(channel: aio_pika.abc.AbstractChannel, queue_name: str) -> TaskMessage:
    queue = await channel.declare_queue(queue_name, passive=True)

    async def got() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await queue.get(no_ack=True, fail=False)

    message = await eventually(got, within=20, what=f"a message in {queue_name}")
    return parse_task_message(message.body)


async def _ready(channel: aio_pika.abc.AbstractChannel, queue_name: str) -> int:
    declared = await channel.declare_queue(queue_name, passive=True)
    result = await declared.declare()
    return int(result.message_count or 0)


async def test_every_publish_of_a_high_priority_task_goes_to_the_high_lane(
    isolated: Isolated, http: aiohttp.ClientSession, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    """The API's hand-over, a worker's retry (the outbox relay's poll) and a rerun (POST
    /retry) of a task of priority HIGH_PRIORITY all publish to the high lane; a task
    just below it goes to the normal lane. No worker runs: the test takes the messages."""
    env = isolated.deployment.env()
    wire = isolated.deployment.wire
    await register_task_types(env)
    system = System(env)
    try:
        await system.start_api()
        low = await _submit(http, system, isolated, type="demo.noop", priority=HIGH_PRIORITY - 1)
        assert (await _next_message(amqp_channel, wire.tasks_queue)).task_id == low

        task_id = await _submit(http, system, isolated, type="demo.noop", priority=HIGH_PRIORITY)
        first = await _next_message(amqp_channel, wire.high_tasks_queue)
        assert (first.task_id, first.attempt) == (task_id, 1)

        # As a worker's claim would, then its retry: the next attempt through the outbox.
        await isolated.db.execute(
            "UPDATE tasks SET state = 'running', attempts = 1, started_at = now() WHERE id = $1",
            task_id,
        )
        repo = WorkerRepository(isolated.db, timeout=10)
        try:
            row = await repo.retry_later(first, {"type": "flaky", "message": "again"}, 0)
        finally:
            await repo.aclose()
        assert row is not None
        second = await _next_message(amqp_channel, wire.high_tasks_queue)
        assert (second.task_id, second.attempt) == (task_id, 2)

        # Failed for good, then rerun by the API.
        await isolated.db.execute(
            "UPDATE tasks SET state = 'failed', attempts = 2, finished_at = now() WHERE id = $1",
            task_id,
        )
        url = f"{system.api_url}/v1/tasks/{task_id}/retry"
        async with http.post(url, headers=isolated.tenant.headers) as r:
            assert r.status == 202, await r.text()
        third = await _next_message(amqp_channel, wire.high_tasks_queue)
        assert (third.task_id, third.attempt) == (task_id, 3)

        await asyncio.sleep(0.2)  # anything misrouted would be there by now
        assert await _ready(amqp_channel, wire.tasks_queue) == 0
        assert await _ready(amqp_channel, wire.high_tasks_queue) == 0
    finally:
        system.stop()


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
            connection, isolated.db, wire, limit=100, delayed_limit=100, interval_s=0.05, timeout=10
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
