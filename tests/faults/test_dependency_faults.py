"""Restarts of RabbitMQ, Redis and PostgreSQL, each on a private instance used by this
test's processes only (the shared services are never touched): accepted tasks all
succeed, no attempt runs twice, and while the dependency is down the API answers
quickly (202 or 503), never hangs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import pytest
from redis.asyncio import Redis

from shared.db import migrate
from tests.conftest import Deployment, _cleanup, create_tenant
from tests.faults.conftest import MakeRun
from tests.faults.harness import FaultRun
from tests.faults.ledger_tasks import LEDGER_DDL
from tests.faults.private import PrivatePostgres, PrivateRabbit, PrivateRedis
from tests.faults.proxy import CutProxy
from tests.support import eventually

N = 40
DOWN_S = 3.0


async def _submit_while_down(run: FaultRun, seconds: float) -> tuple[list[UUID], list[object]]:
    """POST tasks one after another for ``seconds`` while a dependency is down: each must
    be answered (submit_one fails the test on a hang). Return the 202s and all statuses."""
    accepted: list[UUID] = []
    statuses: list[object] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status, task_id = await run.submit_one(sleep_s=0.2, within=20)
        statuses.append(status)
        if task_id is not None:
            accepted.append(task_id)
        await asyncio.sleep(0.2)
    return accepted, statuses


async def _busy(run: FaultRun, ids: list[UUID]) -> None:
    async def some_ran() -> bool:
        return await run.executions(ids) > 0

    await eventually(some_ran, within=30, what="tasks to start running")


# ---------------------------------------------------------------------------- RabbitMQ


@pytest.fixture
def rabbit() -> Iterator[PrivateRabbit]:
    node = PrivateRabbit()
    try:
        node.start()
        yield node
    finally:
        node.close()


async def test_rabbitmq_restart(rabbit: PrivateRabbit, make_run: MakeRun) -> None:
    """Stop and start the broker mid-run: consumers come back (aio-pika issue 231), the
    API never hangs while it is down, and the acks of deliveries from before the restart
    (stale channel) are absorbed without crashing the worker."""
    run = make_run(env={"LONGHAUL_AMQP_URL": rabbit.url})
    queue = run.wire.tasks_queue
    await run.start_api()
    await run.start_worker()
    await run.start_worker()
    ids = await run.submit(N, sleep_s=1.0)
    await _busy(run, ids)

    async def consuming() -> int:
        return await asyncio.to_thread(rabbit.consumers, queue)

    async def both_consuming_high() -> int:
        # The high lane is consumed on channels of its own: both workers' come back too.
        count = await asyncio.to_thread(rabbit.consumers, run.wire.high_tasks_queue)
        return count if count == 2 else 0

    consumers_before = await eventually(consuming, within=20, interval=0.5, what="consumers")
    await asyncio.to_thread(rabbit.stop)
    stopped = time.monotonic()
    during, statuses = await _submit_while_down(run, DOWN_S)
    await asyncio.to_thread(rabbit.start)
    restarted = time.monotonic()
    consumers_after = await eventually(consuming, within=60, interval=0.5, what="consumers > 0")
    recover_s = time.monotonic() - restarted
    high_consumers_after = await eventually(
        both_consuming_high, within=60, interval=0.5, what="both high-lane consumers"
    )
    settle_s = await run.settle(ids + during)
    stale_acks = sum(p.output().count("could not settle a delivery") for p in run.workers())
    await run.judge(
        "RabbitMQ restart",
        ids + during,
        recover_s=recover_s,
        notes="recover_s: broker up again to consumers > 0",
        down_s=round(restarted - stopped, 2),
        consumers_before=consumers_before,
        consumers_after=consumers_after,
        high_consumers_after=high_consumers_after,
        answers_while_down=statuses,
        stale_acks_absorbed=stale_acks,
        settle_s=round(settle_s, 2),
    )
    assert all(p.alive() for p in run.workers()) and len(run.workers()) == 2
    assert set(statuses) <= {202, 503}, statuses


async def test_a_rabbitmq_outage_past_the_loops_bounds_stops_no_process(
    deployment: Deployment, make_run: MakeRun
) -> None:
    """A hung essential loop stops its process (shared.lifecycle's watchdog), so none may
    wait on the broker for the whole outage: with a 1 s I/O timeout, the worker's
    consumer watch may go 21 s without a turn and the API's queue monitor 15 s, and the
    broker is cut off from both for 25 (each connection aborted, each new one refused).
    Both ride it out and serve again after."""
    url = urlsplit(deployment.amqp_url)
    async with CutProxy(url.port or 5672) as proxy:
        proxied = url._replace(netloc=f"{url.netloc.rsplit(':', 1)[0]}:{proxy.port}").geturl()
        run = make_run(env={"LONGHAUL_AMQP_URL": proxied})
        api = await run.start_api(io_timeout_s="1")
        worker = await run.start_worker(io_timeout_s="1")
        await run.settle(await run.submit(2, sleep_s=0.1))  # consuming
        proxy.cut()
        await asyncio.sleep(25)
        proxy.restore()
        assert api.alive(), api.output()[-3000:]
        assert worker.alive(), worker.output()[-3000:]

        async def accepted() -> list[UUID]:
            return await run.submit(1, sleep_s=0.1)  # 503 until the API is connected again

        ids = await eventually(accepted, within=60, interval=0.5, what="a task accepted")
        ids += await run.submit(9, sleep_s=0.1)
        settle_s = await run.settle(ids)
        await run.judge(
            "RabbitMQ cut off 25 s",
            ids,
            recover_s=None,
            notes="tasks submitted once it was back; no process stopped",
            settle_s=round(settle_s, 2),
        )
        assert api.alive() and worker.alive()


# ---------------------------------------------------------------------------- Redis


async def test_redis_restart(make_run: MakeRun, redis_server: PrivateRedis) -> None:
    """Redis (no persistence) stops and starts mid-run: progress events are lost for a
    while, which is allowed (Redis is not the truth); tasks are not."""
    run = make_run(env={"LONGHAUL_REDIS_URL": redis_server.url}, redis_url=redis_server.url)
    await run.start_api()
    await run.start_worker()
    await run.start_worker()
    ids = await run.submit(N, sleep_s=1.0)
    await _busy(run, ids)
    await asyncio.to_thread(redis_server.stop)
    during, statuses = await _submit_while_down(run, DOWN_S)
    await asyncio.to_thread(redis_server.start)
    restarted = time.monotonic()
    settle_s = await run.settle(ids + during)

    # After the restart the workers write events again: a fresh task's stream ends with
    # its terminal event. (Its seq-1 "queued" event may be missing: the API's pooled
    # connections are stale after the restart, its write retries after the worker wrote
    # seq 2, and Redis refuses the late id; the gateway covers such a gap with a snapshot.)
    probe = await run.submit(3, sleep_s=0.0)
    await run.settle(probe)
    probe_events = await run._terminal_events(probe)
    head_missing = sum(1 for events in probe_events.values() if events and events[0][0] != 1)
    await run.judge(
        "Redis restart",
        ids + during + probe,
        recover_s=time.monotonic() - restarted,
        notes="recover_s: Redis up again to every task terminal",
        answers_while_down=statuses,
        probe_streams_missing_seq1=head_missing,
        settle_s=round(settle_s, 2),
    )
    assert all(events and events[-1][1] == "succeeded" for events in probe_events.values()), (
        f"no terminal events written after the restart: {probe_events}"
    )
    assert set(statuses) <= {202, 503}, statuses


# ---------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
async def pg_namespace(deployment: Deployment) -> AsyncIterator[str]:
    """Its own queues and Redis keys on the shared broker and Redis, removed after."""
    namespace = f"{deployment.namespace}_pg"
    yield namespace
    await _cleanup(
        Deployment(deployment.run_id, namespace, "", deployment.amqp_url, deployment.redis_url),
        Redis.from_url(deployment.redis_url),
    )


async def test_postgres_restart(
    make_run: MakeRun, private_pg: PrivatePostgres, pg_namespace: str
) -> None:
    """PostgreSQL (the truth) restarts mid-run: workers wait and retry, the API answers
    503 meanwhile, and afterwards every accepted task succeeds exactly once per attempt."""
    await migrate(private_pg.url, timeout=30)
    pool = await asyncpg.create_pool(private_pg.url, min_size=1, max_size=4)
    assert pool is not None
    run: FaultRun | None = None
    try:
        await pool.execute(LEDGER_DDL)
        owner = await create_tenant(pool)
        run = make_run(
            env={"LONGHAUL_DATABASE_URL": private_pg.url, "LONGHAUL_NAMESPACE": pg_namespace},
            pool=pool,
            api_key=owner.key,
            namespace=pg_namespace,
        )
        await run.start_worker()
        await run.start_worker()
        await run.start_api()
        ids = await run.submit(N, sleep_s=1.0)
        await _busy(run, ids)
        await asyncio.to_thread(private_pg.stop, "fast")
        during, statuses = await _submit_while_down(run, DOWN_S)
        await asyncio.to_thread(private_pg.start)
        restarted = time.monotonic()
        settle_s = await run.settle(ids + during)
        await run.judge(
            "PostgreSQL restart",
            ids + during,
            recover_s=time.monotonic() - restarted,
            notes="recover_s: PostgreSQL up again to every task terminal",
            answers_while_down=statuses,
            settle_s=round(settle_s, 2),
        )
        assert set(statuses) <= {202, 503}, statuses
        assert all(p.alive() for p in run.workers()) and len(run.workers()) == 2
    finally:
        if run is not None:  # before the fixture stops PostgreSQL under them
            run.system.stop()
        await pool.close()
