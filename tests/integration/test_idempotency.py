"""Idempotency keys in the database itself: inserts racing under one key, without the
route's lookup in front (which answers most repeats before they insert), so the unique
index alone decides. Real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from services.api import requests as rq
from services.api.repository import ApiRepository, NewTask
from shared.db import create_pool
from shared.ids import uuid7
from shared.schemas import TaskRequest
from tests.conftest import Deployment, Tenant


def _requests(count: int, priority: int) -> list[TaskRequest]:
    return [TaskRequest(type="idem.race", priority=priority) for _ in range(count)]


async def test_racing_inserts_under_one_key_store_exactly_one_request_whole(
    deployment: Deployment, tenant: Tenant, db: asyncpg.Pool
) -> None:
    """Batches of five and of three and single requests, all under one key, inserted at
    once, ten rounds: each round one of them is stored, all of its tasks, and every
    other insert stores nothing and returns no rows."""
    pool = await create_pool(deployment.database_url, max_size=12, timeout=30)
    try:
        repo = ApiRepository(pool, timeout=10)
        for _ in range(10):
            key = f"race-{uuid.uuid4().hex}"
            shapes = [_requests(5, 1), _requests(3, 2), _requests(1, 3)] * 4
            inserts = []
            for requests in shapes:
                tasks = [NewTask(id=uuid7(), request=r) for r in requests]
                typed = [rq.Typed(r, {}) for r in requests]
                if len(requests) == 1:
                    keys, fingerprint = [key], rq.request_hash(typed[0])
                else:
                    keys, fingerprint = rq.batch_keys(key, len(requests)), rq.batch_hash(typed)
                inserts.append(repo.insert(tenant.id, tasks, keys, fingerprint))
            results = await asyncio.gather(*inserts)
            [winner] = [rows for rows in results if rows]
            assert sum(1 for rows in results if not rows) == len(shapes) - 1
            stored = await db.fetch(
                "SELECT id, priority FROM tasks WHERE tenant_id = $1"
                " AND (idempotency_key = $2 OR idempotency_key LIKE $2 || E'\\n%')",
                tenant.id,
                key,
            )
            assert sorted(r["id"] for r in stored) == sorted(r["id"] for r in winner)
            assert {r["priority"] for r in stored} == {winner[0]["priority"]}
            outbox = await db.fetchval(
                "SELECT count(*) FROM outbox WHERE task_id = ANY($1::uuid[])",
                [r["id"] for r in stored],
            )
            assert outbox == len(stored)
    finally:
        await pool.close()
