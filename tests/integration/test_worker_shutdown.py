"""A worker stopped by its operator (SIGTERM) hands its running attempts back: not
counted against the task's attempts, and never while their handler still runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from services.api.repository import ApiRepository, NewTask
from shared.ids import uuid7
from shared.schemas import TaskRequest
from tests.conftest import Isolated
from tests.integration.shutdown_tasks import LEDGER_DDL
from tests.support import ServiceProcess, System, eventually

STUBBORN = ("--tasks", "tests.integration.shutdown_tasks")


@pytest.fixture
async def system(isolated: Isolated) -> AsyncIterator[System]:
    await isolated.db.execute(LEDGER_DDL)
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


# The same handler as an async def, and as a plain def run in a thread, which cannot be
# interrupted: each ignores its stop.
STUBBORN_TYPES = pytest.mark.parametrize(
    "stubborn_type",
    [pytest.param("test.stubborn", id="async"), pytest.param("test.stubborn_thread", id="def")],
)


@STUBBORN_TYPES
@pytest.mark.parametrize(
    "hold_s",
    [
        pytest.param(1.5, id="ends-in-the-last-wait"),
        pytest.param(600, id="ended-by-the-exit"),
    ],
)
async def test_the_next_attempt_never_runs_beside_an_abandoned_handler(
    system: System, isolated: Isolated, hold_s: float, stubborn_type: str
) -> None:
    """Worker A's handler ignores its cancellation (for ``hold_s``, past its cancel
    grace): its attempt is handed back only once it ended, or as A exits, so the attempt
    worker B then runs starts after every step attempt 1 took."""
    stopping = await system.start_worker(*STUBBORN, shutdown_grace_s="0", cancel_grace_s="1")
    task_id = await _insert(isolated, TaskRequest(type=stubborn_type, args={"hold_s": hold_s}))
    await _row(isolated.db, task_id, "running")
    await system.start_worker(*STUBBORN)
    assert await _stop(stopping) == 0
    row = await _row(isolated.db, task_id, "succeeded")
    assert (row["attempts"], row["result"]) == (2, 2)
    steps: list[Any] = await isolated.db.fetch(
        "SELECT attempt, step FROM shutdown_ledger WHERE task_id = $1 ORDER BY id", task_id
    )
    attempts = [s["attempt"] for s in steps]
    assert attempts == sorted(attempts), steps  # attempt 2 started after attempt 1's last step
    first = [s["step"] for s in steps if s["attempt"] == 1]
    assert first[0] == "start" and first[-1] == ("end" if hold_s < 600 else "tick"), first
    assert [s["step"] for s in steps if s["attempt"] == 2] == ["start", "end"]


@STUBBORN_TYPES
@pytest.mark.parametrize(("max_attempts", "state"), [(3, "succeeded"), (1, "failed")])
async def test_a_timed_out_attempt_is_settled_once_its_handler_ended(
    system: System, isolated: Isolated, max_attempts: int, state: str, stubborn_type: str
) -> None:
    """Attempt 1 times out and ignores its cancellation past its cancel grace: it stays
    running until its handler ended, and only then retries (attempt 2 runs after it, on
    either of two workers) or fails."""
    for _ in range(2):
        await system.start_worker(*STUBBORN, cancel_grace_s="0.2")
    request = TaskRequest(
        type=stubborn_type,
        args={"hold_s": 2},
        timeout_s=0.3,
        max_attempts=max_attempts,
        backoff={"base_s": 0, "cap_s": 0},
    )
    task_id = await _insert(isolated, request)
    row = await _row(isolated.db, task_id, state)
    steps: list[Any] = await isolated.db.fetch(
        "SELECT attempt, step, seen FROM shutdown_ledger WHERE task_id = $1 ORDER BY id", task_id
    )
    first = [(s["step"], s["seen"]) for s in steps if s["attempt"] == 1]
    assert first[0][0] == "start" and first[-1][0] == "end", first
    assert {seen for _, seen in first} == {"running 1"}, first  # never retried beside it
    if state == "succeeded":
        assert (row["attempts"], row["result"]) == (2, 2)
        assert [(s["attempt"], s["step"]) for s in steps[len(first) :]] == [
            (2, "start"),
            (2, "end"),
        ], steps
    else:
        assert (row["attempts"], row["error"]["type"]) == (1, "timeout")
        assert len(first) == len(steps), steps
