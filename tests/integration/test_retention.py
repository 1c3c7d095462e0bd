"""Finished tasks are deleted after LONGHAUL_TASK_RETENTION_S, and nothing else is.

The worker's purge runs against the real PostgreSQL: end to end with a worker whose
retention is one second, and through the repository for the batches and the states."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID

import aiohttp
import asyncpg
import pytest

from services.worker.maintenance import purge
from services.worker.repository import WorkerRepository
from shared import deadletters
from shared.ids import uuid7
from tests.conftest import Deployment, Tenant
from tests.support import System, api_and_worker, eventually


@pytest.fixture
async def system(deployment: Deployment) -> AsyncIterator[System]:
    # Not module-scoped: this worker purges whatever finished a second ago in the whole
    # database, and the tests below count what their own purges delete.
    env = deployment.env(task_retention_s="1")
    async with api_and_worker(env) as system:
        yield system


async def _status(http: aiohttp.ClientSession, system: System, tenant: Tenant, tid: str) -> int:
    async with http.get(f"{system.api_url}/v1/tasks/{tid}", headers=tenant.headers) as r:
        return r.status


async def test_a_finished_task_is_gone_after_the_retention_and_a_running_one_stays(
    system: System, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    ids = {}
    for name, body in (
        ("done", {"type": "demo.noop"}),
        # Far longer than the purge takes, even on a busy machine.
        ("running", {"type": "demo.sleep", "args": {"seconds": 60, "steps": 60}}),
    ):
        async with http.post(f"{system.api_url}/v1/tasks", json=body, headers=tenant.headers) as r:
            assert r.status == 202, await r.text()
            ids[name] = (await r.json())["id"]

    async def gone() -> bool:
        return await _status(http, system, tenant, ids["done"]) == 404

    await eventually(gone, within=20, what="the finished task to be purged")
    async with http.get(f"{system.api_url}/v1/tasks/{ids['running']}", headers=tenant.headers) as r:
        assert r.status == 200
        assert (await r.json())["state"] == "running"

    # Leave nothing running behind for the tests that share this deployment's queue.
    url = f"{system.api_url}/v1/tasks/{ids['running']}"
    async with http.post(f"{url}/cancel", headers=tenant.headers) as r:
        assert r.status == 202, await r.text()

    async def cancelled() -> bool:
        async with http.get(url, headers=tenant.headers) as r:
            # Finished, it may be purged (404) a second later.
            return r.status == 404 or bool((await r.json())["state"] == "cancelled")

    await eventually(cancelled, within=20, what="the long task to be cancelled")


async def _insert(
    db: asyncpg.Pool, tenant: Tenant, state: str, finished_ago_s: float | None
) -> UUID:
    task_id = uuid7()
    await db.execute(
        """
        INSERT INTO tasks (id, tenant_id, type, args, state, attempts, max_attempts, priority,
                           timeout_s, last_seq, started_at, finished_at)
        VALUES ($1, $2, 'demo.noop', '{}', $3, 1, 3, 0, 60, 3, now() - interval '3 days',
                now() - make_interval(secs => $4))
        """,
        task_id,
        tenant.id,
        state,
        finished_ago_s,
    )
    return task_id


async def _exists(db: asyncpg.Pool, ids: list[UUID]) -> set[UUID]:
    rows = await db.fetch("SELECT id FROM tasks WHERE id = ANY($1::uuid[])", ids)
    return {r["id"] for r in rows}


async def test_purge_deletes_only_finished_tasks_past_retention_in_batches(
    db: asyncpg.Pool, tenant: Tenant
) -> None:
    day = 86_400.0
    old = [await _insert(db, tenant, s, 2 * day) for s in ("succeeded", "failed", "cancelled")]
    recent = await _insert(db, tenant, "succeeded", 60)
    running = await _insert(db, tenant, "running", None)
    queued = await _insert(db, tenant, "queued", None)
    repo = WorkerRepository(db, timeout=10)
    # Oldest first, at most a batch at a time; only ours are that old in this database.
    assert [await repo.purge_finished(day, limit=2) for _ in range(3)] == [2, 1, 0]
    assert await _exists(db, [*old, recent, running, queued]) == {recent, running, queued}


async def test_the_purge_job_deletes_a_backlog_and_stops_when_told(
    db: asyncpg.Pool, tenant: Tenant
) -> None:
    ids = [await _insert(db, tenant, "succeeded", 3600) for _ in range(5)]
    stop = asyncio.Event()
    job = asyncio.create_task(purge(WorkerRepository(db, timeout=10), 1.0, stop, batch=2))
    try:

        async def all_gone() -> bool:
            return not await _exists(db, ids)

        await eventually(all_gone, within=10, what="the backlog to be purged")
    finally:
        stop.set()
        await asyncio.wait_for(job, 5)


async def test_redriving_the_dead_letter_of_a_purged_task_says_it_has_no_task(
    db: asyncpg.Pool, tenant: Tenant
) -> None:
    letter_id, purged_task = uuid7(), uuid7()
    await db.execute(
        "INSERT INTO dead_letters (id, tenant_id, task_id, reason, body)"
        " VALUES ($1, $2, $3, 'max_attempts', '')",
        letter_id,
        tenant.id,
        purged_task,
    )
    async with db.acquire() as conn, conn.transaction():
        result = await deadletters.redrive(conn, letter_id, tenant.id, "id")
    assert result.outcome is deadletters.Redrive.NO_TASK
