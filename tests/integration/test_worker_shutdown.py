"""A worker stopped by its operator (SIGTERM) hands its running attempts back, not
counted against the task's attempts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import pytest

from services.api.repository import ApiRepository, NewTask
from shared.ids import uuid7
from shared.schemas import TaskRequest
from tests.conftest import Isolated
from tests.support import ServiceProcess, System, eventually


@pytest.fixture
async def system(isolated: Isolated) -> AsyncIterator[System]:
    sys_ = System(isolated.deployment.env())
    try:
        yield sys_
    finally:
        sys_.stop()


async def _insert(isolated: Isolated, request: TaskRequest) -> UUID:
    task_id = uuid7()
    await ApiRepository(isolated.db, timeout=10).insert(
        isolated.tenant.id, [NewTask(id=task_id, request=request)]
    )
    return task_id


async def _row(db: asyncpg.Pool, task_id: UUID, state: str) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        row: asyncpg.Record | None = await db.fetchrow(
            "SELECT * FROM tasks WHERE id = $1 AND state = $2", task_id, state
        )
        return row

    return await eventually(check, within=30, what=f"the task {state}")


async def _stop(worker: ServiceProcess) -> int:
    return await asyncio.to_thread(worker.terminate)


async def test_a_hand_back_does_not_use_up_an_attempt(system: System, isolated: Isolated) -> None:
    """A task on its only attempt, interrupted by its worker's SIGTERM: it is queued
    again with one attempt more allowed, neither failed nor dead-lettered."""
    worker = await system.start_worker(shutdown_grace_s="0")
    task_id = await _insert(
        isolated, TaskRequest(type="demo.sleep", args={"seconds": 600}, max_attempts=1)
    )
    await _row(isolated.db, task_id, "running")
    assert await _stop(worker) == 0
    row = await isolated.db.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
    assert (row["state"], row["attempts"], row["max_attempts"], row["message"]) == (
        "queued",
        1,
        2,
        "attempt interrupted (shutdown)",
    )
    letters = await isolated.db.fetchval(
        "SELECT count(*) FROM dead_letters WHERE task_id = $1", task_id
    )
    assert letters == 0
