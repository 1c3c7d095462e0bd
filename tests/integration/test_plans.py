"""The per-task statements reach tasks by key once the table is big: none of them scans
it. A scan costs nothing on the small tables of the other tests, so it would go
unnoticed there; here a private database holds 20,000 finished tasks, analyzed, as a
deployment in service does, and PostgreSQL's own counters say how tasks was read.

Caught before: the relay's promotion of due retries read the whole table on every
flush (no index led to the few tasks in state 'retrying')."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import pytest

from services.api.repository import ApiRepository, NewTask
from services.worker.repository import WorkerRepository
from services.ws_gateway.repository import TaskRepository
from shared.db import create_pool, migrate
from shared.ids import uuid7
from shared.relay import _PROMOTE
from shared.schemas import TaskMessage, TaskRequest
from tests.conftest import PG_ADMIN_URL, Deployment

HISTORY = 20_000


@pytest.fixture
async def big_db(deployment: Deployment) -> AsyncIterator[str]:
    name = f"{deployment.namespace}_plans"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    await migrate(url, timeout=30)
    try:
        conn = await asyncpg.connect(url)
        try:
            tenant = uuid7()
            await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'history')", tenant)
            await conn.execute(
                """
                INSERT INTO tasks (id, tenant_id, type, args, state, attempts, max_attempts,
                                   priority, timeout_s, last_seq, finished_at)
                SELECT gen_random_uuid(), $1, 'demo.noop', '{}', 'succeeded', 1, 3, 0, 60,
                       3, now()
                FROM generate_series(1, $2)
                """,
                tenant,
                HISTORY,
            )
            # A backlog of retries in the outbox when it was last analyzed (after an
            # outage, say): the planner then expects many due retries there and few
            # tasks in state 'retrying', and would start from the tasks side.
            await conn.execute(
                "INSERT INTO outbox (task_id, attempt, body) SELECT id, 2, '' FROM tasks LIMIT 2000"
            )
            await conn.execute("ANALYZE")
            # One due retry left, of a task that moved on: the promotion changes
            # nothing but has to look (an empty outbox would spare it the join).
            await conn.execute("DELETE FROM outbox WHERE id <> (SELECT min(id) FROM outbox)")
        finally:
            await conn.close()
        yield url
    finally:
        admin = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _tasks_scans(url: str) -> tuple[int, int]:
    """(sequential scans, index scans) of tasks so far. A backend reports its counts
    when it exits, so callers close their pools first."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname = 'tasks'"
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["seq_scan"]), int(row["idx_scan"] or 0)


async def test_per_task_statements_use_indexes_on_a_big_table(big_db: str) -> None:
    seq_before, idx_before = await _tasks_scans(big_db)

    api_pool = await create_pool(big_db, max_size=2)
    worker_pool = await create_pool(big_db, max_size=2, generic_plans=True)
    try:
        tenant = uuid7()
        await api_pool.execute("INSERT INTO tenants (id, name) VALUES ($1, 't')", tenant)
        api = ApiRepository(api_pool, timeout=10, notify=False)
        worker = WorkerRepository(worker_pool, timeout=10)
        gateway = TaskRepository(worker_pool, timeout=10)
        ids: list[UUID] = []
        # Enough rounds that every statement runs on its cached plan.
        for _ in range(8):
            new = NewTask(uuid7(), TaskRequest(type="demo.noop", args={}))
            await api.insert(tenant, [new])
            ids.append(new.id)
            message = TaskMessage(task_id=new.id, tenant_id=tenant, type="demo.noop", attempt=1)
            claimed = await worker.claim(message, "w1", 30.0)
            assert claimed is not None
            assert await worker.succeed(new.id, 1, {"ok": True}) is not None
            assert await gateway.task_row(new.id, tenant) is not None
            await api_pool.fetch(_PROMOTE)
        await api.aclose()
        await worker.aclose()
        await gateway.aclose()
    finally:
        await api_pool.close()
        await worker_pool.close()

    seq_after, idx_after = await _tasks_scans(big_db)
    assert seq_after == seq_before, "a per-task statement scanned the whole tasks table"
    # The statements did read tasks, through its indexes.
    assert idx_after - idx_before >= 8 * 3
