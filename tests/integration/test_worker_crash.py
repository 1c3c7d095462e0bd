"""A worker process killed between committing a task's outcome and acking its message:
the broker redelivers the message, and another worker absorbs the duplicate."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import asyncpg
import pytest

from services.api.repository import ApiRepository, NewTask
from shared.db import create_pool
from shared.ids import uuid7
from shared.schemas import TaskRequest
from tests.conftest import Deployment, Isolated, Tenant
from tests.support import System, eventually, worker_metric


@pytest.fixture
async def system(deployment: Deployment) -> AsyncIterator[System]:
    sys_ = System(deployment.env())
    try:
        yield sys_
    finally:
        sys_.stop()


async def queue_depth(deployment: Deployment) -> int:
    connection = await aio_pika.connect(deployment.amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(deployment.wire.tasks_queue, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def test_crash_after_commit_is_absorbed_by_the_next_worker(
    system: System, deployment: Deployment, db: asyncpg.Pool, tenant: Tenant
) -> None:
    """With worker.after_commit=crash the first worker dies after the commit and before
    the ack; a second worker gets the redelivery and acks it without running the task
    again: the task stays succeeded with attempts 1 and the queue ends empty."""
    crashing = await system.start_worker(failpoints="worker.after_commit=crash")
    pool = await create_pool(deployment.database_url, max_size=2)
    try:
        task_id = uuid7()
        await ApiRepository(pool, timeout=10).insert(
            tenant.id, [NewTask(id=task_id, request=TaskRequest(type="demo.noop"))]
        )
    finally:
        await pool.close()

    async def crashed() -> bool:
        return not crashing.alive()

    await eventually(crashed, within=30, what="the worker to crash at its failpoint")
    assert crashing.proc.returncode == 137
    assert "failpoint worker.after_commit: crashing" in crashing.output()
    row = await db.fetchrow("SELECT state, attempts, last_seq FROM tasks WHERE id = $1", task_id)
    assert (row["state"], row["attempts"]) == ("succeeded", 1)
    # The message was never acked: the broker holds it for the next consumer.
    await eventually(
        lambda: _depth_is(deployment, 1), within=15, what="the unacked message to be back"
    )

    second = await system.start_worker()
    await eventually(
        lambda: _depth_is(deployment, 0), within=30, what="the redelivery to be consumed"
    )
    # Stopping the worker returns any unacked message to the queue: none must come back.
    assert second.terminate() == 0
    assert await queue_depth(deployment) == 0
    after = await db.fetchrow("SELECT state, attempts, last_seq FROM tasks WHERE id = $1", task_id)
    assert dict(after) == dict(row)
    assert await db.fetchval("SELECT count(*) FROM dead_letters WHERE task_id = $1", task_id) == 0


async def _depth_is(deployment: Deployment, wanted: int) -> bool:
    return await queue_depth(deployment) == wanted


async def test_acks_cover_finished_deliveries_and_never_a_running_one(
    isolated: Isolated,
) -> None:
    """Deliveries that finish together are acked with one multiple ack; those that finish
    while an older delivery still runs are acked alone. So when the worker is killed
    while the oldest delivery runs, every finished task's message is gone from the queue
    and exactly the running one comes back. Its own database: the queue holds nothing
    but this test's."""
    dep, db, tenant = isolated.deployment, isolated.db, isolated.tenant
    system = System(dep.env())
    try:
        worker = await system.start_worker()
        repo = ApiRepository(db, timeout=10)
        sleeper = uuid7()
        await repo.insert(
            tenant.id,
            [NewTask(id=sleeper, request=TaskRequest(type="demo.sleep", args={"seconds": 60}))],
        )

        async def running() -> bool:
            return await db.fetchval("SELECT state FROM tasks WHERE id = $1", sleeper) == "running"

        await eventually(running, within=30, what="the oldest delivery to run")
        quick = [uuid7() for _ in range(40)]
        for task_id in quick:  # one by one: many small runs of finished deliveries
            await repo.insert(
                tenant.id, [NewTask(id=task_id, request=TaskRequest(type="demo.noop"))]
            )

        async def all_done() -> bool:
            done = await db.fetchval(
                "SELECT count(*) FROM tasks WHERE id = ANY($1) AND state = 'succeeded'", quick
            )
            return bool(done == len(quick))

        await eventually(all_done, within=60, what="the quick tasks to succeed")
        # A delivery ends once its ack is written (acks linger a few milliseconds first):
        # only the sleeper is left in flight when every quick task's ack is out.
        async with aiohttp.ClientSession() as http:

            async def only_the_sleeper_in_flight() -> bool:
                return await worker_metric(system, http, "longhaul_worker_in_flight") == 1

            await eventually(only_the_sleeper_in_flight, within=10, what="the quick acks")
        await eventually(lambda: _depth_is(dep, 0), within=10, what="nothing ready in the queue")
        worker.kill9()
        await eventually(
            lambda: _depth_is(dep, 1), within=30, what="the running delivery to come back"
        )
        assert await db.fetchval("SELECT state FROM tasks WHERE id = $1", sleeper) == "running"
    finally:
        system.stop()
