"""The per-task statements read a handful of rows, however big the tables are, whatever
their statistics say and whichever plan PostgreSQL picks (generic plans here, the kind
a prepared statement may switch to after five runs).

On the small tables of the other tests a scan costs nothing and would go unnoticed.
Here a private database holds 20,000 finished tasks, analyzed, as a deployment in
service does; then 2,000 tasks start running (more than the statistics know of, as
after a burst), 5,000 delayed tasks' messages wait in the outbox and another tenant
has 3,000 dead letters. PostgreSQL's own counters say how many rows and index entries
the statements read.

Caught before, each reading a number of rows that grew with the table:

* the relay's promotion of due retries scanned the whole table on every flush (no
  index led to the few tasks in state 'retrying');
* the success statement and its siblings went through the index of running tasks'
  leases, reading every running task's entry for each one they changed;
* cancelling a queued task read the whole outbox, delayed tasks' messages included;
* a tenant's page of dead letters read every tenant's;
* the relays' orphan check, planned on an empty outbox, read the whole outbox again
  for each of its rows (its own test, below)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from services.api.repository import ApiRepository, NewTask
from services.worker.repository import WorkerRepository
from services.ws_gateway.repository import TaskRepository
from shared.db import create_pool, migrate
from shared.ids import uuid7
from shared.relay import (
    _CLAIM,
    _DELETE_PUBLISHED,
    _PROMOTE,
    _RELEASE_HANDED,
    _RELEASE_ORPHANS,
    ORPHAN_AFTER_S,
    OWNER_LOCK_CLASS,
    Handed,
)
from shared.schemas import TaskMessage, TaskRequest
from tests.conftest import Deployment, scratch_database

HISTORY = 20_000
RUNNING = 2_000
ROUNDS = 8
# Rows and index entries one statement may read for the one task it is about.
PER_STATEMENT = 20


@pytest.fixture
async def migrated_db(deployment: Deployment) -> AsyncIterator[str]:
    """A private database, migrated and empty."""
    async with scratch_database(f"{deployment.namespace}_plans", create=False) as url:
        await migrate(url, timeout=30)
        yield url


@pytest.fixture
async def big_db(migrated_db: str) -> str:
    conn = await asyncpg.connect(migrated_db)
    try:
        await _load(conn)
    finally:
        await conn.close()
    return migrated_db


async def _load(conn: asyncpg.Connection) -> None:
    tenant = uuid7()
    await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, 'history')", tenant)
    await conn.execute(
        """
        INSERT INTO tasks (id, tenant_id, type, args, state, attempts, max_attempts,
                           priority, timeout_s, last_seq, finished_at)
        SELECT gen_random_uuid(), $1, 'demo.noop', '{}', 'succeeded', 1, 3, 0, 60, 3, now()
        FROM generate_series(1, $2)
        """,
        tenant,
        HISTORY,
    )
    # A backlog of retries in the outbox when it was last analyzed (after an outage,
    # say): the planner then expects many due retries there and few tasks in state
    # 'retrying', and would start from the tasks side.
    await conn.execute(
        "INSERT INTO outbox (task_id, attempt, body) SELECT id, 2, '' FROM tasks LIMIT 2000"
    )
    await conn.execute("ANALYZE")
    # One due retry left, of a task that moved on: the promotion changes nothing but
    # has to look (an empty outbox would spare it the join).
    await conn.execute("DELETE FROM outbox WHERE id <> (SELECT min(id) FROM outbox)")
    # Tasks scheduled for later: their messages wait in the outbox.
    await conn.execute(
        "INSERT INTO outbox (task_id, attempt, body, available_at)"
        " SELECT id, 1, '', now() + interval '1 hour' FROM tasks LIMIT 5000"
    )
    # The relays have run since: the first claim after a burst of deletes walks their
    # dead index entries once (2,000 here), a cost of the burst, not of a task.
    async with conn.transaction():
        await conn.fetch(_CLAIM, 10)
    # Another tenant's dead letters.
    await conn.execute(
        "INSERT INTO dead_letters (id, tenant_id, reason, body)"
        " SELECT gen_random_uuid(), $1, 'unknown_type', '' FROM generate_series(1, 3000)",
        tenant,
    )
    # Running tasks of other workers, started after the ANALYZE.
    await conn.execute(
        """
        INSERT INTO tasks (id, tenant_id, type, args, state, attempts, max_attempts,
                           priority, timeout_s, last_seq, started_at, worker_id,
                           lease_expires_at)
        SELECT gen_random_uuid(), $1, 'demo.sleep', '{}', 'running', 1, 3, 0, 600, 2,
               now(), 'elsewhere', now() + interval '10 minutes'
        FROM generate_series(1, $2)
        """,
        tenant,
        RUNNING,
    )


async def _rows_read(url: str) -> int:
    """Rows and index entries of tasks, the outbox and dead letters read so far. A backend reports its counts when
    it exits, so callers close their pools first."""
    conn = await asyncpg.connect(url)
    try:
        value = await conn.fetchval(
            "SELECT (SELECT sum(seq_tup_read) FROM pg_stat_user_tables WHERE relname = ANY($1))"
            " + (SELECT sum(idx_tup_read) FROM pg_stat_user_indexes WHERE relname = ANY($1))",
            ["tasks", "outbox", "dead_letters"],
        )
    finally:
        await conn.close()
    return int(value)


async def test_per_task_statements_read_a_handful_of_rows(big_db: str) -> None:
    before = await _rows_read(big_db)

    # Generic plans for the API's statements too: PostgreSQL may switch any prepared
    # statement to its generic plan after five runs, and that plan must not scan either.
    api_pool = await create_pool(big_db, max_size=2, generic_plans=True)
    worker_pool = await create_pool(big_db, max_size=2, generic_plans=True)
    statements = 0
    try:
        tenant = uuid7()
        await api_pool.execute("INSERT INTO tenants (id, name) VALUES ($1, 't')", tenant)
        handed: list[Handed] = []
        api = ApiRepository(api_pool, timeout=10, hand_over=handed.extend, claim_s=60)
        worker = WorkerRepository(worker_pool, timeout=10)
        gateway = TaskRepository(worker_pool, timeout=10)
        # Enough rounds that every statement runs on its cached plan.
        for _ in range(ROUNDS):
            ok, failed = await _one_task(api, worker, tenant), await _one_task(api, worker, tenant)
            assert await worker.succeed(ok, 1, {"ok": True}) is not None
            error = {"type": "boom", "message": "no", "retryable": False}
            assert await worker.finish(failed, 1, "failed", error) is not None
            assert await gateway.task_row(ok, tenant) is not None
            await api_pool.fetch(_PROMOTE)
            async with worker_pool.acquire() as conn, conn.transaction():
                await conn.fetch(_CLAIM, 10)  # the relay's claim (not published)
            # The API's relay: the handed-over rows published, one released.
            published = [h.row_id for h in handed]
            await api_pool.execute(_DELETE_PUBLISHED, published[1:])
            await api_pool.execute(_RELEASE_HANDED, published[:1])
            handed.clear()
            assert await worker.reap() == []
            assert await worker.purge_finished(3600) == 0
            queued = NewTask(uuid7(), TaskRequest(type="demo.noop", args={}))
            await api.insert(tenant, [queued])
            assert (await api.cancel(tenant, queued.id))[0] == "cancelled"
            assert await api.dead_letters(tenant, None, 50) == []
            # Two tasks' insert, claim, progress and renewal; success, failure, the
            # gateway's read, the relay's promotion and claim, the deletion and the
            # release of handed-over rows, the reaper; a third task's insert and the
            # two statements of its cancellation; a page of dead letters; the purge.
            statements += 2 * 4 + 8 + 3 + 1 + 1
        await api.aclose()
        await worker.aclose()
        await gateway.aclose()
    finally:
        await api_pool.close()
        await worker_pool.close()

    read = await _rows_read(big_db) - before
    assert read <= statements * PER_STATEMENT, (
        f"{read} rows and index entries read by {statements} per-task statements"
    )


async def _one_task(api: ApiRepository, worker: WorkerRepository, tenant: UUID) -> UUID:
    """A task inserted, claimed, reporting progress and renewing its lease."""
    new = NewTask(uuid7(), TaskRequest(type="demo.noop", args={}))
    await api.insert(tenant, [new])
    message = TaskMessage(task_id=new.id, tenant_id=tenant, type="demo.noop", attempt=1)
    assert await worker.claim(message, "w1", 30.0) is not None
    assert await worker.progress(new.id, 1, 0.5, "half") is not None
    assert await worker.renew_leases({new.id: 1}, "w1", 30.0) == ([], [], [new.id])
    return new.id


def _outbox_rows_read(plan: dict[str, Any]) -> int:
    """Outbox rows an EXPLAIN ANALYZE plan (JSON) read, over every node and loop."""
    own = 0
    if plan.get("Relation Name") == "outbox":
        seen = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
        own = seen * plan["Actual Loops"]
    return own + sum(_outbox_rows_read(child) for child in plan.get("Plans", []))


async def test_the_orphan_check_reads_the_outbox_once_with_a_plan_made_when_it_was_empty(
    migrated_db: str,
) -> None:
    """Every relay looks for a dead process's rows once a second. A worker's plans are
    generic and made on the first call, when the outbox of a new deployment is empty;
    then a backlog builds up. With that plan, the check must read each outbox row once:
    it read the whole outbox again for each of its rows (1 s a call at 1,700 rows)."""
    backlog = 2_000
    conn = await asyncpg.connect(
        migrated_db, server_settings={"plan_cache_mode": "force_generic_plan"}
    )
    try:
        await conn.execute("VACUUM ANALYZE outbox")
        await conn.execute(f"PREPARE orphans(bigint, float8) AS {_RELEASE_ORPHANS}")
        check = f"EXECUTE orphans({OWNER_LOCK_CLASS}, {ORPHAN_AFTER_S})"
        assert await conn.fetch(check) == []  # the plan, made on an empty outbox
        live, dead = 7, 8
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", OWNER_LOCK_CLASS, live)
        ids = await conn.fetch(
            """
            INSERT INTO outbox (task_id, attempt, body, available_at, claimed_until,
                                claimed_by)
            SELECT gen_random_uuid(), 1, '', now() - interval '10 seconds',
                   now() + interval '1 hour', CASE WHEN n <= 5 THEN $1::int ELSE $2::int END
            FROM generate_series(1, $3) AS n
            RETURNING id, claimed_by
            """,
            dead,
            live,
            backlog,
        )
        explaining = conn.transaction()
        await explaining.start()
        try:  # EXPLAIN ANALYZE releases them too: undone, for the real call below
            explained = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {check}")
        finally:
            await explaining.rollback()
        read = _outbox_rows_read(json.loads(explained)[0]["Plan"])
        assert read <= 3 * backlog, f"{read} outbox rows read for a backlog of {backlog}"
        released = sorted(r["id"] for r in await conn.fetch(check))
        assert released == sorted(r["id"] for r in ids if r["claimed_by"] == dead)
    finally:
        await conn.close()
